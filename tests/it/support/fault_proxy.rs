//! A TCP fault proxy for integration tests: put it between a client (the
//! agent's sink) and a peer (the demo receiver, a broker) and switch, at run
//! time, between passing traffic through, cutting every connection,
//! swallowing traffic (a blackhole: the far end looks alive but never
//! answers) and adding latency.
//!
//! It works on bytes only: it never looks into TLS or HTTP. It is bounded
//! ([`MAX_CONNECTIONS`] connections, one [`CHUNK`]-byte buffer per direction)
//! and never outlives its handle: dropping the [`FaultProxy`] closes the
//! listener and every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Connections served at once; more are reset on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Read size per direction; in [`Mode::Delay`] the delay applies per chunk.
pub const CHUNK: usize = 16 * 1024;
/// How long a new connection waits for the upstream to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both directions as they come.
    Pass,
    /// Reset every open connection now; reset new ones on accept.
    Cut,
    /// Accept and read, never forward or answer. New connections are not
    /// even forwarded upstream.
    Blackhole,
    /// Forward, sleeping this long before each chunk, in both directions.
    Delay(Duration),
}

/// A running proxy; see the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` in [`Mode::Pass`], forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fault proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy: local_addr");
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(listener, upstream, mode_rx, accepted.clone()));
        FaultProxy {
            addr,
            mode,
            accepted,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    pub fn delay(&self, per_chunk: Duration) {
        self.mode.send_replace(Mode::Delay(per_chunk));
    }

    /// Connections accepted so far (including those reset at once).
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task; the dropped sender wakes them too.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    accepted: Arc<AtomicU64>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            result = listener.accept() => match result {
                Ok((client, _)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let current = *mode.borrow();
                    if current == Mode::Cut || conns.len() >= MAX_CONNECTIONS {
                        reset(&client);
                        continue;
                    }
                    conns.spawn(serve(client, upstream, mode.clone()));
                }
                // E.g. out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Closes with a RST rather than a FIN once the stream is dropped.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Resolves once the mode is [`Mode::Cut`] or the proxy is gone.
async fn cut_or_gone(mut mode: watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Cut).await;
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    let _ = client.set_nodelay(true);
    if *mode.borrow() == Mode::Blackhole {
        let mut buf = vec![0u8; CHUNK];
        tokio::select! {
            _ = async { while let Ok(1..) = client.read(&mut buf).await {} } => {}
            _ = cut_or_gone(mode.clone()) => reset(&client),
        }
        return;
    }
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut server = tokio::select! {
        result = connect => match result {
            Ok(Ok(server)) => server,
            _ => return reset(&client),
        },
        _ = cut_or_gone(mode.clone()) => return reset(&client),
    };
    let _ = server.set_nodelay(true);
    let cut = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let both = async {
            tokio::join!(
                pump(&mut cr, &mut sw, mode.clone()),
                pump(&mut sr, &mut cw, mode.clone())
            )
        };
        tokio::select! {
            _ = both => false,
            _ = cut_or_gone(mode.clone()) => true,
        }
    };
    // The pumps also stop on a cut they see first: reset in that case too.
    if cut || *mode.borrow() == Mode::Cut {
        reset(&client);
        reset(&server);
    }
}

/// Copies one direction chunk by chunk, applying the mode current at each
/// chunk; on end of input, half-closes the other side. On [`Mode::Cut`] it
/// returns without a half-close (a FIN would let the peer see a clean end of
/// stream instead of a reset): the caller resets both sockets.
async fn pump<R, W>(from: &mut R, to: &mut W, mode: watch::Receiver<Mode>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let current = *mode.borrow();
        match current {
            Mode::Pass => {}
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Blackhole => continue,
            Mode::Cut => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
