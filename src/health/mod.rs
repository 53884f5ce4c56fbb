//! The health server: HTTPS only (rustls), for the central team's tooling.
//! `GET /healthz` (alive), `GET /readyz` (journal open, writer alive,
//! sources and forwarders running), `GET /api/v1/status` (JSON).
//!
//! It only reads: status counters, the journal's shared statistics and short
//! read transactions. It must never write to the journal or block a source.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum_server::tls_rustls::RustlsConfig;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{Config, HealthConfig, read_secret};
use crate::journal::{Journal, Reader, unix_micros};
use crate::status::{SinkState, SinkStatus, SourceSnapshot, SourceStatus, rfc3339_us};

/// Everything the health server reports on.
pub struct AgentView {
    pub agent_id: String,
    pub started: Instant,
    pub journal: Journal,
    pub sources: Vec<Arc<SourceStatus>>,
    pub sinks: Vec<Arc<SinkStatus>>,
    /// True between a completed start-up and the beginning of shutdown.
    pub ready: AtomicBool,
    pub stall_after: Duration,
    reader: Mutex<Option<Reader>>,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub agent_id: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub journal: JournalReport,
    pub sources: Vec<SourceSnapshot>,
    pub sinks: Vec<SinkReport>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct JournalReport {
    pub path: String,
    pub writer_alive: bool,
    pub head_seq: u64,
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub capacity_ratio: f64,
    pub events_stored: u64,
    pub duplicates: u64,
    pub evicted_telemetry: u64,
    pub evicted_critical: u64,
    pub quarantined: Option<QuarantineReport>,
}

#[derive(Debug, Serialize)]
pub struct QuarantineReport {
    pub moved_to: String,
    pub reason: String,
    pub time: String,
}

#[derive(Debug, Serialize)]
pub struct SinkReport {
    pub name: String,
    pub kind: &'static str,
    pub state: SinkState,
    pub cursor: u64,
    pub backlog_events: u64,
    pub oldest_undelivered_age_seconds: Option<f64>,
    pub delivered: u64,
    pub attempts: u64,
    pub dead_letters: u64,
    pub last_success_time: Option<String>,
    pub last_error: Option<String>,
    pub last_error_time: Option<String>,
}

impl AgentView {
    pub fn new(
        config: &Config,
        journal: Journal,
        sources: Vec<Arc<SourceStatus>>,
        sinks: Vec<Arc<SinkStatus>>,
    ) -> AgentView {
        AgentView {
            agent_id: config.agent.id.clone(),
            started: Instant::now(),
            journal,
            sources,
            sinks,
            ready: AtomicBool::new(false),
            stall_after: config
                .health
                .as_ref()
                .map_or(Duration::from_secs(60), |h| h.stall_after),
            reader: Mutex::new(None),
        }
    }

    /// Why the agent is not ready (empty: ready).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ready.load(Ordering::Relaxed) {
            out.push("agent is starting or stopping".to_string());
        }
        if !self.journal.stats().writer_alive.load(Ordering::Relaxed) {
            out.push("journal writer is not running".to_string());
        }
        for s in &self.sources {
            if !s.started.load(Ordering::Relaxed) {
                out.push(format!("source '{}' is not started", s.name));
            }
        }
        for s in &self.sinks {
            if !s.progress().running {
                out.push(format!("forwarder of sink '{}' is not running", s.name));
            }
        }
        out
    }

    /// Builds the status report. Blocking (short journal reads): call it
    /// from `spawn_blocking`.
    pub fn status(&self) -> StatusReport {
        let js = self.journal.stats();
        let head = js.head_seq.load(Ordering::Relaxed);
        let used = js.used_bytes.load(Ordering::Relaxed);
        let max = self.journal.options().max_size;
        let now_us = unix_micros(SystemTime::now());
        let mut warnings = Vec::new();

        let mut guard = self.reader.lock().ok();
        if let Some(slot) = guard.as_mut()
            && slot.is_none()
        {
            **slot = self.journal.reader().ok();
        }
        let reader = guard.as_ref().and_then(|g| g.as_ref());

        let sinks = self
            .sinks
            .iter()
            .map(|s| {
                let p = s.progress();
                let position = reader.and_then(|r| r.position(&s.name, head).ok());
                let cursor = position.as_ref().map_or(p.cursor, |pos| pos.cursor);
                let backlog = head.saturating_sub(cursor);
                let oldest_age = position
                    .as_ref()
                    .and_then(|pos| pos.oldest_undelivered_us)
                    .map(|t| ((now_us - t).max(0) as f64) / 1e6);
                let dead_letters = reader
                    .and_then(|r| r.dead_letter_count(&s.name).ok())
                    .unwrap_or(p.dead_letters);
                let since_success = p
                    .last_success_us
                    .map(|t| (now_us - t).max(0) as u64)
                    .unwrap_or(self.started.elapsed().as_micros() as u64);
                let state = if backlog > 0
                    && oldest_age.is_some()
                    && since_success >= self.stall_after.as_micros() as u64
                {
                    SinkState::Stalled
                } else if p.consecutive_failures > 0 {
                    SinkState::Retrying
                } else {
                    SinkState::Ok
                };
                if state == SinkState::Stalled {
                    warnings.push(format!(
                        "sink '{}' stalled: no delivery for {}s with {} events waiting",
                        s.name,
                        since_success / 1_000_000,
                        backlog
                    ));
                }
                SinkReport {
                    name: s.name.clone(),
                    kind: s.kind,
                    state,
                    cursor,
                    backlog_events: backlog,
                    oldest_undelivered_age_seconds: oldest_age,
                    delivered: p.delivered,
                    attempts: p.attempts,
                    dead_letters,
                    last_success_time: p.last_success_us.map(rfc3339_us),
                    last_error: p.last_error.as_ref().map(|(_, m)| m.clone()),
                    last_error_time: p.last_error.as_ref().map(|(t, _)| rfc3339_us(*t)),
                }
            })
            .collect();
        let quarantined = self.journal.quarantine().map(|q| QuarantineReport {
            moved_to: q.moved_to.display().to_string(),
            reason: q.reason.clone(),
            time: humantime::format_rfc3339_seconds(q.time).to_string(),
        });
        if quarantined.is_some() {
            warnings.push("the journal was found damaged at start-up and replaced".into());
        }
        let evicted_t = js.evicted_telemetry.load(Ordering::Relaxed);
        let evicted_c = js.evicted_critical.load(Ordering::Relaxed);
        if evicted_t + evicted_c > 0 {
            warnings.push(format!(
                "journal full: {evicted_t} telemetry and {evicted_c} critical events evicted"
            ));
        }
        StatusReport {
            agent_id: self.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: self.not_ready_reasons().is_empty(),
            journal: JournalReport {
                path: self.journal.path().display().to_string(),
                writer_alive: js.writer_alive.load(Ordering::Relaxed),
                head_seq: head,
                used_bytes: used,
                max_bytes: max,
                capacity_ratio: if max > 0 {
                    used as f64 / max as f64
                } else {
                    0.0
                },
                events_stored: js.events_stored.load(Ordering::Relaxed),
                duplicates: js.duplicates.load(Ordering::Relaxed),
                evicted_telemetry: evicted_t,
                evicted_critical: evicted_c,
                quarantined,
            },
            sources: self.sources.iter().map(|s| s.snapshot()).collect(),
            sinks,
            warnings,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("health: {0}")]
pub struct HealthError(String);

struct AppState {
    view: Arc<AgentView>,
    token: Option<String>,
    open_probes: bool,
}

pub struct HealthServer {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    tls: RustlsConfig,
    state: Arc<AppState>,
}

impl HealthServer {
    /// Loads certificates and the token, and binds the port.
    pub async fn bind(
        cfg: &HealthConfig,
        view: Arc<AgentView>,
    ) -> Result<HealthServer, HealthError> {
        let tls = crate::tls::server_config(&cfg.tls_cert, &cfg.tls_key, cfg.client_ca.as_deref())
            .map_err(|e| HealthError(e.to_string()))?;
        let token = match &cfg.token_file {
            Some(p) => Some(read_secret(p).map_err(|e| HealthError(format!("token_file: {e}")))?),
            None => None,
        };
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| HealthError(format!("cannot listen on {}: {e}", cfg.listen)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| HealthError(format!("listener on {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HealthError(format!("listener on {}: {e}", cfg.listen)))?;
        Ok(HealthServer {
            listener,
            addr,
            tls: RustlsConfig::from_config(Arc::new(tls)),
            state: Arc::new(AppState {
                view,
                token,
                open_probes: cfg.open_probes,
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn serve(self, stop: CancellationToken) -> Result<(), HealthError> {
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/api/v1/status", get(status))
            .layer(middleware::from_fn_with_state(self.state.clone(), auth))
            .with_state(self.state.clone());
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(self.listener, self.tls)
            .map_err(|e| HealthError(format!("listener on {}: {e}", self.addr)))?
            .handle(handle.clone());
        let h = handle.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            h.graceful_shutdown(Some(Duration::from_secs(2)));
        });
        server
            .serve(app.into_make_service())
            .await
            .map_err(|e| HealthError(format!("server on {}: {e}", self.addr)))
    }
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let probe = path == "/healthz" || path == "/readyz";
    if let Some(token) = &state.token
        && !(probe && state.open_probes)
    {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "unauthorized\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let reasons = state.view.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "ready": false, "reasons": reasons })),
        )
            .into_response()
    }
}

async fn status(State(state): State<Arc<AppState>>) -> Response {
    let view = state.view.clone();
    match tokio::task::spawn_blocking(move || view.status()).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => {
            warn!(error = %e, "status report failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "status report failed\n").into_response()
        }
    }
}
