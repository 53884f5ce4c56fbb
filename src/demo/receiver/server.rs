//! The receiver itself: how it starts (options, identity, errors), how it
//! stops and restarts on the same port, and the handle the demo, tests and
//! benchmarks hold (faults to set, the recording to read). It must never
//! hold a state lock across an `.await`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::post;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::conn::TrackingAcceptor;
use super::faults::{FailFault, Faults};
use super::handler::ingest;
use super::recording::Recording;
use super::{
    BatchRecord, EphemeralPki, INGEST_PATH, MAX_BODY_BYTES, ReceivedEvent, ReceiverStats, Scripted,
    Shared, Verdict, lock,
};
use crate::tls::{self, TlsError};

/// How long [`Receiver::restart`] retries binding the old port.
const REBIND_FOR: Duration = Duration::from_secs(5);
/// How long [`Receiver::stop`] waits for open connections to go away.
const STOP_DRAIN: Duration = Duration::from_secs(2);

/// The server's certificate and key, and whom it trusts for client
/// certificates.
#[derive(Debug, Clone, Copy)]
pub enum ServerIdentity<'a> {
    /// Server certificate from the PKI; client certificates checked against
    /// its CA.
    Pki(&'a EphemeralPki),
    /// Explicit PEM; `client_ca_pem` is needed when client certificates are
    /// required.
    Pem {
        cert_pem: &'a str,
        key_pem: &'a str,
        client_ca_pem: Option<&'a str>,
    },
}

/// How to start a [`Receiver`].
#[derive(Debug, Clone, Copy)]
pub struct ReceiverOptions<'a> {
    /// Listen address; port 0 picks a free port (kept across restarts).
    pub bind: SocketAddr,
    pub identity: ServerIdentity<'a>,
    /// Fail the TLS handshake of clients without a valid certificate.
    pub require_client_cert: bool,
    /// Keep each event's `data`. Benchmarks that only need the verdict can
    /// turn this off to keep memory flat; `data` is then `null`.
    pub record_data: bool,
}

impl<'a> ReceiverOptions<'a> {
    /// `127.0.0.1:0`, the PKI's server certificate, no client certificates,
    /// data recorded.
    pub fn new(pki: &'a EphemeralPki) -> Self {
        ReceiverOptions {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            identity: ServerIdentity::Pki(pki),
            require_client_cert: false,
            record_data: true,
        }
    }
}

/// Why the receiver could not start or restart.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("receiver TLS set-up: {0}")]
    Tls(#[from] TlsError),
    #[error("receiver: client certificates are required but no client CA was given")]
    NoClientCa,
    #[error("receiver cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct Running {
    handle: axum_server::Handle<SocketAddr>,
    task: JoinHandle<()>,
}

/// The embedded HTTPS upstream. Dropping it shuts the server down.
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: RustlsConfig,
    running: Mutex<Option<Running>>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Binds, builds the TLS configuration and starts serving. Must be called
    /// within a Tokio runtime. Needs no process-wide crypto provider: ring is
    /// passed explicitly (see [`crate::tls`]).
    pub async fn start(opts: ReceiverOptions<'_>) -> Result<Receiver, ReceiverError> {
        let (cert, key, ca) = match opts.identity {
            ServerIdentity::Pki(pki) => (
                pki.server_cert_pem(),
                pki.server_key_pem(),
                Some(pki.ca_pem()),
            ),
            ServerIdentity::Pem {
                cert_pem,
                key_pem,
                client_ca_pem,
            } => (cert_pem, key_pem, client_ca_pem),
        };
        let client_ca = if opts.require_client_cert {
            Some(ca.ok_or(ReceiverError::NoClientCa)?)
        } else {
            None
        };
        let config = tls::server_config_from_pem(cert, key, client_ca)?;
        let tls = RustlsConfig::from_config(Arc::new(config));

        let listener = bind(opts.bind).map_err(|source| ReceiverError::Bind {
            addr: opts.bind,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ReceiverError::Bind {
                addr: opts.bind,
                source,
            })?;
        let receiver = Receiver {
            shared: Arc::new(Shared {
                recording: Mutex::new(Recording::default()),
                faults: Mutex::new(Faults::default()),
                script: Mutex::new(std::collections::VecDeque::new()),
                conns: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                record_data: opts.record_data,
            }),
            addr,
            tls,
            running: Mutex::new(None),
        };
        receiver.serve(listener)?;
        tracing::info!(
            %addr,
            mtls = opts.require_client_cert,
            "demo receiver listening on https://{addr}{INGEST_PATH}"
        );
        Ok(receiver)
    }

    fn serve(&self, listener: std::net::TcpListener) -> Result<(), ReceiverError> {
        let handle = axum_server::Handle::new();
        let acceptor = RustlsAcceptor::new(self.tls.clone()).acceptor(TrackingAcceptor {
            shared: self.shared.clone(),
        });
        let server = axum_server::from_tcp(listener)
            .map_err(|source| ReceiverError::Bind {
                addr: self.addr,
                source,
            })?
            .acceptor(acceptor)
            .handle(handle.clone())
            .http1_only();
        let app = Router::new()
            .route(INGEST_PATH, post(ingest))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.shared.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let addr = self.addr;
        let task = tokio::spawn(async move {
            if let Err(e) = server.serve(app).await {
                tracing::error!(%addr, error = %e, "demo receiver stopped with an error");
            }
        });
        *lock(&self.running) = Some(Running { handle, task });
        Ok(())
    }

    /// The listening address (stable across [`Receiver::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>/v1/events`.
    pub fn url(&self) -> String {
        format!("https://{}{INGEST_PATH}", self.addr)
    }

    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Closes the listener and every open connection. Returns once new
    /// connections are refused (and open ones are closed, or after 2 s).
    pub async fn stop(&self) {
        let Some(running) = lock(&self.running).take() else {
            return;
        };
        running.handle.shutdown();
        for conn in lock(&self.shared.conns).values() {
            conn.killed.store(true, Ordering::Release);
        }
        let mut task = running.task;
        match tokio::time::timeout(STOP_DRAIN, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "demo receiver task ended abnormally"),
            Err(_) => {
                // Dropping the serve future closes the listener too.
                tracing::warn!("demo receiver did not shut down in time; aborting it");
                task.abort();
                let _ = task.await;
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_DRAIN;
        while running.handle.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(addr = %self.addr, "demo receiver stopped");
    }

    /// Listens again on the same address after [`Receiver::stop`], retrying
    /// the bind for a few seconds. A no-op while running.
    pub async fn restart(&self) -> Result<(), ReceiverError> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + REBIND_FOR;
        let listener = loop {
            match bind(self.addr) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(source) => {
                    return Err(ReceiverError::Bind {
                        addr: self.addr,
                        source,
                    });
                }
            }
        };
        self.serve(listener)?;
        tracing::info!(addr = %self.addr, "demo receiver restarted");
        Ok(())
    }

    // -- faults ------------------------------------------------------------

    /// Answer `status` (with `Retry-After: <secs>` if given) instead of
    /// accepting, for a fraction `probability` (0.0..=1.0) of requests. A
    /// status outside 100..=999 is answered as 500.
    pub fn set_fail(&self, status: u16, retry_after: Option<u64>, probability: f64) {
        let code = StatusCode::from_u16(status).unwrap_or_else(|_| {
            tracing::warn!(status, "invalid status for set_fail; answering 500 instead");
            StatusCode::INTERNAL_SERVER_ERROR
        });
        lock(&self.shared.faults).fail = Some(FailFault {
            status: code,
            retry_after,
            probability,
        });
    }

    /// Delay every request by `latency` before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// Drop the connection without an HTTP answer for a fraction
    /// `probability` of requests (nothing of those batches is recorded).
    pub fn set_reset(&self, probability: f64) {
        lock(&self.shared.faults).reset_probability = probability;
    }

    /// Answer 422 `{"error":"rejected","id":…,"reason":…}` to any batch with
    /// one of these ids, accepting nothing of it. Replaces the previous list.
    pub fn reject_ids<I, S>(&self, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        lock(&self.shared.faults).rejected = Arc::new(ids.into_iter().map(Into::into).collect());
    }

    /// Answer the next requests, one each, as scripted (before any other
    /// fault); once the script is used up, the other faults apply again.
    pub fn script<I>(&self, answers: I)
    where
        I: IntoIterator<Item = Scripted>,
    {
        lock(&self.shared.script).extend(answers);
    }

    /// Back to accepting everything, at once.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
        lock(&self.shared.script).clear();
    }

    // -- recording ---------------------------------------------------------

    /// Every accepted event, in arrival order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        lock(&self.shared.recording).events.clone()
    }

    /// How many accepted events match `f`, without copying them.
    pub fn count_events(&self, f: impl Fn(&ReceivedEvent) -> bool) -> usize {
        lock(&self.shared.recording)
            .events
            .iter()
            .filter(|e| f(e))
            .count()
    }

    /// `(source, id)` of every accepted event, in arrival order.
    pub fn ids(&self) -> Vec<(String, String)> {
        lock(&self.shared.recording)
            .events
            .iter()
            .map(|e| (e.source.clone(), e.id.clone()))
            .collect()
    }

    /// Every accepted batch, in arrival order.
    pub fn batches(&self) -> Vec<BatchRecord> {
        lock(&self.shared.recording).batches.clone()
    }

    /// The `Idempotency-Key` of every accepted batch (`None` when absent).
    pub fn idempotency_keys(&self) -> Vec<Option<String>> {
        lock(&self.shared.recording)
            .batches
            .iter()
            .map(|b| b.idempotency_key.clone())
            .collect()
    }

    pub fn stats(&self) -> ReceiverStats {
        lock(&self.shared.recording).stats
    }

    /// Order, duplicates and completeness of everything received so far.
    pub fn verdict(&self) -> Verdict {
        Verdict::compute(&lock(&self.shared.recording).events)
    }

    /// Waits until `n_unique` distinct `(source, id)` have arrived; false on
    /// timeout.
    pub async fn wait_for(&self, n_unique: usize, timeout: Duration) -> bool {
        let n = n_unique as u64;
        self.wait_until(timeout, |s| s.unique_ids >= n).await
    }

    /// Waits until `done(stats)` holds, re-checking after every request the
    /// receiver handles; false on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&ReceiverStats) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Register before checking so that no notification is lost.
            notified.as_mut().enable();
            if done(&self.stats()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&self.stats());
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(running) = lock(&self.running).take() {
            running.handle.shutdown();
            running.task.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Lets restart() take the port back while old connections sit in
    // TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}
