//! The health server: HTTPS only (rustls, no plain-HTTP listener), for the
//! central team's tooling.
//!
//! Read endpoints: `GET /healthz` (alive), `GET /readyz` (journal writer,
//! sources, forwarders running and no sink stalled; 503 with the reasons),
//! `GET /api/v1/status` (JSON, [`crate::status::report`]), `GET /metrics` (Prometheus text,
//! [`metrics`]). Admin endpoints ([`admin`], admin token): replay, dead
//! letters. Who may call what: [`auth`]. Certificates are reloaded through
//! a [`TlsReloader`] (SIGHUP in `plantrelay run`).
//!
//! Module map: [`crate::status::report`] (not this module's: the service
//! notifications read it too) builds the one snapshot that status,
//! readiness and metrics are rendered from; `metrics` renders it for
//! Prometheus; `page` renders it as HTML; `auth`
//! the token and client-certificate checks; `admin` the write endpoints and
//! their audit lines; `tls` the server configuration, the reload hook and
//! the acceptor that hands each request its client certificate.
//!
//! It only reads, except through the admin endpoints, which act through the
//! journal's own API. It must never block a source or a forwarder: journal
//! reads run on the blocking pool, in short read transactions.

pub mod admin;
pub mod auth;
pub mod metrics;
pub mod page;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use auth::Peer;
pub use tls::TlsReloader;

use crate::config::{HealthConfig, read_secret};
use crate::serve::{self, TlsConfig};
use crate::status::{AgentView, StatusReport};

#[derive(Debug, thiserror::Error)]
#[error("health: {0}")]
pub struct HealthError(pub(crate) String);

/// How long requests in flight may take to finish once the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub(crate) struct AppState {
    view: Arc<AgentView>,
    auth: auth::Auth,
}

pub struct HealthServer {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    tls: TlsConfig,
    limits: serve::Limits,
    reloader: TlsReloader,
    state: Arc<AppState>,
}

impl HealthServer {
    /// Loads certificates and tokens, and binds the port.
    pub async fn bind(
        cfg: &HealthConfig,
        view: Arc<AgentView>,
    ) -> Result<HealthServer, HealthError> {
        let server_config = tls::server_config(cfg).map_err(|e| HealthError(e.to_string()))?;
        let secret = |key: &str, path: &Option<std::path::PathBuf>| match path {
            Some(p) => read_secret(p)
                .map(Some)
                .map_err(|e| HealthError(format!("{key}: {e}"))),
            None => Ok(None),
        };
        let read_token = secret("token_file", &cfg.token_file)?;
        let admin_token = secret("admin_token_file", &cfg.admin_token_file)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| HealthError(format!("cannot listen on {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HealthError(format!("listener on {}: {e}", cfg.listen)))?;
        let tls = TlsConfig::new(Arc::new(server_config));
        Ok(HealthServer {
            listener,
            addr,
            limits: serve::Limits {
                max_connections: cfg.max_connections,
                max_connections_per_ip: cfg.max_connections_per_ip,
                header_timeout: cfg.header_timeout,
                request_timeout: cfg.request_timeout,
            },
            reloader: TlsReloader::new(tls.clone(), cfg.clone(), view.clone()),
            tls,
            state: Arc::new(AppState {
                view,
                auth: auth::Auth {
                    read_token,
                    admin_token,
                    open_probes: cfg.open_probes,
                    client_certs: cfg.client_ca.is_some(),
                },
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The hook that reloads this server's certificates.
    pub fn tls_reloader(&self) -> TlsReloader {
        self.reloader.clone()
    }

    /// The routes, with authentication applied to every one of them and to
    /// the 404 fallback.
    fn router(state: Arc<AppState>) -> Router {
        let admin = Router::new()
            .route("/api/v1/sinks/{name}/replay", post(admin::replay))
            .route("/api/v1/dead-letters", get(admin::list_dead_letters))
            .route(
                "/api/v1/dead-letters/{id}/retry",
                post(admin::retry_dead_letter),
            )
            .route("/api/v1/dead-letters/{id}", delete(admin::drop_dead_letter))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::admin_auth,
            ));
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/", get(page))
            .route("/api/v1/status", get(status))
            .route("/metrics", get(metrics))
            .merge(admin)
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(
                state.clone(),
                auth::read_auth,
            ))
            .with_state(state)
    }

    /// Serves until `stop` is cancelled; then requests in flight get
    /// [`SHUTDOWN_GRACE`] to finish. Every request carries the [`Peer`]
    /// extension of its connection (address, client certificate subject).
    pub async fn serve(self, stop: CancellationToken) -> Result<(), HealthError> {
        let app = Self::router(self.state.clone());
        // The status page's backlog history: a report every 30 s, scraped
        // or not.
        let sampler = {
            let (state, stop) = (self.state.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
                loop {
                    tokio::select! {
                        _ = tick.tick() => { let _ = snapshot(&state).await; }
                        _ = stop.cancelled() => return,
                    }
                }
            })
        };
        let listener = serve::Listener {
            label: "health".to_owned(),
            socket: self.listener,
            tls: Some(self.tls),
            limits: self.limits,
            grace: Some(SHUTDOWN_GRACE),
        };
        let tag: Arc<serve::Tagger<Peer>> =
            Arc::new(|addr, certs| Peer::from_certs(Some(addr), certs));
        serve::serve(listener, app, tag, stop).await;
        sampler.abort();
        Ok(())
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// The snapshot, built on the blocking pool; `None` if that task failed
/// (logged).
async fn snapshot(state: &AppState) -> Option<StatusReport> {
    let view = state.view.clone();
    tokio::task::spawn_blocking(move || view.status())
        .await
        .inspect_err(|e| warn!(error = %e, "status report failed"))
        .ok()
}

fn report_failed() -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, "status report failed\n").into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let Some(report) = snapshot(&state).await else {
        return report_failed();
    };
    if report.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "ready": false, "reasons": report.not_ready_reasons })),
        )
            .into_response()
    }
}

async fn status(State(state): State<Arc<AppState>>) -> Response {
    match snapshot(&state).await {
        Some(report) => axum::Json(report).into_response(),
        None => report_failed(),
    }
}

async fn page(State(state): State<Arc<AppState>>) -> Response {
    match snapshot(&state).await {
        Some(report) => {
            axum::response::Html(page::render(&report, &state.view.history)).into_response()
        }
        None => report_failed(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match snapshot(&state).await {
        Some(report) => (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            metrics::render(&report),
        )
            .into_response(),
        None => report_failed(),
    }
}
