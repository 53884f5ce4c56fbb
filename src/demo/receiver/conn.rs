//! Connections: a kill switch per TCP connection, so that a handler can make
//! its own connection drop without an HTTP answer. It wraps each accepted
//! stream before TLS and must never read or alter the bytes it passes on.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{Shared, lock};

#[derive(Default)]
pub(super) struct ConnState {
    pub(super) killed: AtomicBool,
}

/// The TCP stream under TLS. Once its connection is killed every read and
/// write fails and the socket is closed with a RST, so the client never sees
/// an HTTP answer. A kill is only ever triggered from a request handler, which
/// then hands hyper a response to write: that write is what fails, so no
/// waker needs to be stored.
pub(super) struct TrackedStream {
    inner: TcpStream,
    peer: SocketAddr,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl TrackedStream {
    fn check(&self) -> std::io::Result<()> {
        if self.conn.killed.load(Ordering::Acquire) {
            // Zero linger: the close below (on drop) sends a RST.
            let _ = self.inner.set_zero_linger();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by the receiver's fault injection",
            ));
        }
        Ok(())
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        let mut conns = lock(&self.shared.conns);
        if conns
            .get(&self.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
        {
            conns.remove(&self.peer);
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Wraps each accepted TCP stream (before TLS) in a [`TrackedStream`].
#[derive(Clone)]
pub(super) struct TrackingAcceptor {
    pub(super) shared: Arc<Shared>,
}

impl<S> Accept<TcpStream, S> for TrackingAcceptor {
    type Stream = TrackedStream;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(TrackedStream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let result = stream.peer_addr().map(|peer| {
            let _ = stream.set_nodelay(true);
            let conn = Arc::new(ConnState::default());
            lock(&self.shared.conns).insert(peer, conn.clone());
            (
                TrackedStream {
                    inner: stream,
                    peer,
                    conn,
                    shared: self.shared.clone(),
                },
                service,
            )
        });
        std::future::ready(result)
    }
}
