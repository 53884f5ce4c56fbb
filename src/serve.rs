//! The one HTTP server loop every listener of the agent runs (HTTP ingest,
//! plain and TLS; the health server): our own accept loop on a tokio
//! [`TcpListener`], each connection driven by hyper's HTTP/1.1 server with
//! its timer set.
//!
//! This module owns what a client on the plant network can do to a listener
//! before any route sees a request: how many connections it may hold, how
//! long it may take to finish a TLS handshake, to send a request's headers,
//! to send its body and get its answer, and how long an idle keep-alive
//! connection stays open. It must never let one host keep another out, never
//! spin on a failing `accept`, and never panic on anything a peer sends.
//!
//! # Limits ([`Limits`])
//!
//! - **`header_timeout`**: a connection must complete its TLS handshake, and
//!   then each request its request line and headers, within this. hyper's
//!   `header_read_timeout` (armed with [`TokioTimer`]) counts from the moment
//!   the connection is ready for its next request, so it is also the idle
//!   keep-alive timeout: an idle connection is closed once it passes, the
//!   same as one trickling its headers a byte at a time (slowloris). There is
//!   no separate idle key: a longer idle wait would be a longer slowloris
//!   window, and hyper's header timer would cut it anyway.
//! - **`request_timeout`**: from the end of the headers until the response
//!   is ready: the body read and the handler. Past it the client gets `408`
//!   with `Connection: close`. For ingest this cannot break durable-before-ack:
//!   a `408` is not an ack, and a retried event that was committed after all
//!   is acknowledged again as a duplicate.
//! - **`max_connections`** per listener: when every slot is taken the loop
//!   *stops accepting*. New connections wait in the kernel's accept queue
//!   (no file descriptor of ours) and are taken in arrival order as slots
//!   free, which the timeouts above guarantee within `header_timeout` for
//!   idle and slow peers. Accepting and closing at the cap would instead
//!   refuse a legitimate client outright and reward whoever reconnects fastest.
//! - **`max_connections_per_ip`** (IPv6: per /64): a connection over it is
//!   accepted and closed at once. It has to be accepted to leave the accept
//!   queue, where it would hold up the hosts queued behind it. With the
//!   per-IP cap below `max_connections`, one host can never fill a listener,
//!   so a client from another host gets in at once, whatever that host holds.
//!
//! Also fixed here: at most [`MAX_HEADER_BUF`] bytes of request line and
//! headers per connection (hyper's default is ~400 KiB; that times a
//! thousand slow connections is memory the gateway does not have).
//!
//! HTTP/2 is not served: the TLS configurations offer only `http/1.1` in
//! ALPN and every client of the agent (MES, scrapers, `plantrelay status`)
//! speaks HTTP/1.1, so h2's own attack surface (stream floods, resets) stays
//! out.
//!
//! `accept` errors never end the loop and never make it spin: a connection
//! that died in the queue is skipped; anything else (out of file
//! descriptors, out of memory) backs off, 10 ms doubling to 1 s, and is
//! logged at most once a minute with the number of repeats.
//!
//! Shutdown: on cancellation the loop stops accepting, idle connections are
//! closed, and requests in flight are answered (hyper's graceful shutdown),
//! for at most the `grace` given.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Largest request line plus headers a connection may buffer (hyper's
/// `max_buf_size`, which also bounds its read and write buffers).
pub const MAX_HEADER_BUF: usize = 64 * 1024;

/// How often one kind of listener trouble is logged at `warn`.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Back-off after an `accept` error that is not one connection's own.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a listener allows each peer; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
}

/// A TLS server configuration that can be swapped while serving (SIGHUP):
/// new handshakes use the new one, open connections keep theirs.
#[derive(Clone)]
pub struct TlsConfig(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl TlsConfig {
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsConfig {
        TlsConfig(Arc::new(RwLock::new(config)))
    }

    pub fn reload(&self, config: Arc<rustls::ServerConfig>) {
        // A poisoned lock only means a writer panicked between two plain
        // assignments: the value inside is whole.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = config;
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One listener to serve: what it is called in logs, its socket, TLS if
/// any, its limits.
pub struct Listener {
    /// How logs name it, e.g. `sources.http 'mes'` or `health`.
    pub label: String,
    pub socket: TcpListener,
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    /// How long in-flight requests may take to finish after `shutdown`;
    /// `None`: until they are done (each is bounded by `request_timeout`).
    pub grace: Option<Duration>,
}

/// What a request learns about its connection: the peer's address and the
/// client certificate chain it presented, if any. `tag` turns it into the
/// request extension the routes read.
pub type Tagger<E> = dyn Fn(SocketAddr, Option<&[CertificateDer<'_>]>) -> E + Send + Sync;

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting and lets requests in flight finish (see [`Listener::grace`]).
/// Every request carries the extension `tag` makes for its connection.
pub async fn serve<E>(
    listener: Listener,
    app: Router,
    tag: Arc<Tagger<E>>,
    shutdown: CancellationToken,
) where
    E: Clone + Send + Sync + 'static,
{
    let Listener {
        label,
        socket,
        tls,
        limits,
        grace,
    } = listener;
    let label: Arc<str> = label.into();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = PerIp::new(limits.max_connections_per_ip);
    let tracker = TaskTracker::new();
    let mut trouble = RateLimitedLog::default();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        if slots.available_permits() == 0 {
            trouble.warn(
                &label,
                "connection_cap",
                &format!(
                    "max_connections ({}) reached: new connections wait until one closes",
                    limits.max_connections
                ),
            );
        }
        let slot = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) if is_connection_error(&e) => {
                debug!(listener = %label, error = %e, "a connection died before it was accepted");
                continue;
            }
            Err(e) => {
                trouble.warn(
                    &label,
                    "accept",
                    &format!(
                        "accepting connections failed: {e}{}; retrying in {} ms",
                        accept_hint(&e),
                        backoff.as_millis()
                    ),
                );
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Some(ip_slot) = per_ip.try_take(remote.ip()) else {
            trouble.warn(
                &label,
                "per_ip_cap",
                &format!(
                    "max_connections_per_ip ({}) reached for {}: further connections from it are closed",
                    limits.max_connections_per_ip,
                    remote.ip()
                ),
            );
            drop(stream);
            continue;
        };
        // Small responses go out at once instead of waiting for an ACK.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(listener = %label, peer = %remote, error = %e, "TCP_NODELAY not set");
        }
        let conn = Connection {
            label: label.clone(),
            remote,
            limits,
            app: app.clone(),
            tag: tag.clone(),
            shutdown: shutdown.clone(),
        };
        let tls = tls.as_ref().map(TlsConfig::current);
        tracker.spawn(async move {
            conn.run(stream, tls).await;
            drop((slot, ip_slot));
        });
    }
    // Closing the socket now refuses new connections while the open ones
    // finish.
    drop(socket);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        info!(listener = %label, connections = open, "listener stopped accepting; waiting for requests in flight");
    }
    match grace {
        Some(grace) => {
            if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                warn!(
                    listener = %label,
                    connections = tracker.len(),
                    grace_ms = grace.as_millis() as u64,
                    "connections still open after the shutdown grace period; closing them"
                );
            }
        }
        None => tracker.wait().await,
    }
}

/// Errors `accept` returns for one connection that died in the queue.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

fn accept_hint(e: &io::Error) -> &'static str {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    match e.raw_os_error() {
        Some(EMFILE) => {
            " (the process is out of file descriptors: raise LimitNOFILE= in the unit, or lower max_connections)"
        }
        Some(ENFILE) => " (the system is out of file descriptors)",
        _ => "",
    }
}

/// One accepted connection and what it needs to serve its requests.
struct Connection<E> {
    label: Arc<str>,
    remote: SocketAddr,
    limits: Limits,
    app: Router,
    tag: Arc<Tagger<E>>,
    shutdown: CancellationToken,
}

impl<E: Clone + Send + Sync + 'static> Connection<E> {
    async fn run(self, stream: TcpStream, tls: Option<Arc<rustls::ServerConfig>>) {
        let Some(tls) = tls else {
            let ext = (self.tag)(self.remote, None);
            return self.http(stream, ext).await;
        };
        let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
        let stream = tokio::select! {
            () = self.shutdown.cancelled() => return,
            r = tokio::time::timeout(self.limits.header_timeout, handshake) => match r {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(listener = %self.label, peer = %self.remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(listener = %self.label, peer = %self.remote, "TLS handshake not completed within header_timeout; closed");
                    return;
                }
            },
        };
        let ext = (self.tag)(self.remote, stream.get_ref().1.peer_certificates());
        self.http(stream, ext).await;
    }

    async fn http<S>(self, stream: S, ext: E)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let request_timeout = self.limits.request_timeout;
        let inner = TowerToHyperService::new(self.app);
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ext.clone());
            let answer = inner.call(req);
            async move {
                match tokio::time::timeout(request_timeout, answer).await {
                    Ok(answer) => answer,
                    Err(_) => Ok(request_timed_out(request_timeout)),
                }
            }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .keep_alive(true)
            .max_buf_size(MAX_HEADER_BUF);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            // Timeouts, resets and garbage are the peer's business; the
            // counters that matter are the answers the routes give.
            debug!(listener = %self.label, peer = %self.remote, error = %e, "connection ended");
        }
    }
}

fn request_timed_out(limit: Duration) -> Response<Body> {
    let mut resp = Response::new(Body::from(format!(
        "request not completed within request_timeout ({})\n",
        humantime::format_duration(limit)
    )));
    *resp.status_mut() = StatusCode::REQUEST_TIMEOUT;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Open connections per peer address (IPv6 per /64: one host usually holds
/// the whole prefix).
#[derive(Clone)]
struct PerIp {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A held per-IP slot; given back on drop.
struct IpSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    fn new(max: usize) -> PerIp {
        PerIp {
            max,
            open: Arc::default(),
        }
    }

    fn try_take(&self, ip: IpAddr) -> Option<IpSlot> {
        let ip = match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let [a, b, c, d, ..] = v6.segments();
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
            v4 => v4,
        };
        // Poisoning: the map is only counted up and down; a count is whole.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// `warn` once per [`LOG_EVERY`] per kind, with how often it happened in
/// between; the rest at `debug`.
#[derive(Default)]
struct RateLimitedLog {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RateLimitedLog {
    fn warn(&mut self, label: &str, kind: &'static str, message: &str) {
        let now = Instant::now();
        match self.last.get_mut(kind) {
            Some((at, repeats)) if now.duration_since(*at) < LOG_EVERY => {
                *repeats += 1;
                debug!(listener = %label, kind, "{message}");
            }
            entry => {
                let repeats = entry.map(|(_, r)| *r).unwrap_or(0);
                self.last.insert(kind, (now, 0));
                warn!(listener = %label, kind, repeats_since_last_warning = repeats, "{message}");
            }
        }
    }
}

/// File descriptors kept free for everything but the listeners: the journal
/// (database, WAL, shared memory), upstream connections, broker and OPC UA
/// sessions, certificates read at reload, the runtime's own.
pub const FD_RESERVE: u64 = 128;

/// Raises the soft open-file limit to the hard one where allowed (best
/// effort: under the packaged unit's `SystemCallFilter=~@resources` the call
/// is refused and `LimitNOFILE=` is what counts), then warns if the
/// listeners' connection caps plus [`FD_RESERVE`] do not fit. Returns the
/// soft limit in force, if it could be read.
pub fn check_open_file_limit(listener_caps: u64) -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current;
    if let (Some(current), Some(max)) = (limit.current, limit.maximum)
        && current < max
    {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        ) {
            Ok(()) => {
                debug!(from = current, to = max, "open-file limit raised");
                soft = Some(max);
            }
            Err(e) => {
                debug!(soft = current, hard = max, error = %e, "open-file limit not raised");
            }
        }
    }
    let needed = listener_caps.saturating_add(FD_RESERVE);
    if let Some(soft) = soft
        && needed > soft
    {
        warn!(
            open_file_limit = soft,
            listener_connections = listener_caps,
            reserve = FD_RESERVE,
            "the listeners' max_connections ({listener_caps}) plus {FD_RESERVE} for the journal and upstream exceed the open-file limit ({soft}): \
             a flood of connections could starve the journal; raise LimitNOFILE= or lower max_connections"
        );
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_ip_cap_counts_each_address_and_gives_slots_back_on_drop() {
        let per_ip = PerIp::new(2);
        let a: IpAddr = "10.0.3.7".parse().unwrap();
        let b: IpAddr = "10.0.3.8".parse().unwrap();
        let first = per_ip.try_take(a).unwrap();
        let _second = per_ip.try_take(a).unwrap();
        assert!(per_ip.try_take(a).is_none(), "a third from one address");
        assert!(
            per_ip.try_take(b).is_some(),
            "another address is not held up"
        );
        drop(first);
        assert!(
            per_ip.try_take(a).is_some(),
            "a closed connection frees its slot"
        );
    }

    #[test]
    fn the_per_ip_cap_counts_an_ipv6_slash_64_as_one_host_and_a_mapped_ipv4_as_itself() {
        let per_ip = PerIp::new(1);
        let _one = per_ip.try_take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(
            per_ip
                .try_take("2001:db8:1:2:ffff::9".parse().unwrap())
                .is_none()
        );
        assert!(
            per_ip
                .try_take("2001:db8:1:3::1".parse().unwrap())
                .is_some()
        );
        let _v4 = per_ip.try_take("10.0.3.7".parse().unwrap()).unwrap();
        assert!(
            per_ip
                .try_take("::ffff:10.0.3.7".parse().unwrap())
                .is_none()
        );
    }
}
