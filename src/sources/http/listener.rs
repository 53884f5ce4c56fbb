//! The listener of one `[[sources.http]]` table: the bearer token, TLS,
//! binding the address, and serving the ingest route with the connection
//! caps and timeouts of [`crate::serve`].
//!
//! It owns who may send (the token, compared in constant time) and where;
//! what a request may do once in is [`super`]'s. It must never print the
//! token, and never start serving before the address is bound: a source
//! that cannot listen fails start-up with the address and the cause.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::routing::post;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::answer::not_found;
use super::{HttpSourceError, INGEST_PATH, Ingest, Limits, post_events};
use crate::config::{HttpSourceConfig, read_secret};
use crate::event::Class;
use crate::journal::Journal;
use crate::schema::Schemas;
use crate::serve;
use crate::status::SourceStatus;
use crate::tls;
use crate::warn_limit::WarnLimiter;

/// A bound (not yet serving) ingest listener.
pub struct HttpSource {
    name: String,
    class: Class,
    max_body: u64,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    token: Option<Token>,
    tls: Option<Arc<rustls::ServerConfig>>,
    listener_limits: serve::Limits,
    limits: Limits,
    schemas: Arc<Schemas>,
    require_schema: bool,
}

impl fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSource")
            .field("name", &self.name)
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

/// The bearer token; never printed.
pub(super) struct Token(Box<[u8]>);

impl Token {
    /// Constant-time check of an `Authorization` header value.
    pub(super) fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header else {
            return false;
        };
        let value = value.as_bytes();
        let Some(space) = value.iter().position(|b| *b == b' ') else {
            return false;
        };
        let (scheme, rest) = value.split_at(space);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
        let given = rest.trim_ascii();
        // `ct_eq` on slices of different lengths is false without comparing
        // the contents: only the length can leak, never a prefix.
        bool::from(given.ct_eq(&self.0))
    }
}

impl HttpSource {
    /// Reads the token file, builds TLS if configured, and binds the
    /// listener (so the agent can report "listeners bound" before it serves).
    /// Errors name the source, the address and the cause
    /// (`sources.http 'mes': cannot listen on 127.0.0.1:8081: address in use`).
    pub async fn bind(cfg: &HttpSourceConfig) -> Result<HttpSource, HttpSourceError> {
        let name = cfg.name.clone();
        let token = match &cfg.token_file {
            Some(path) => {
                let secret = read_secret(path).map_err(|source| HttpSourceError::Token {
                    name: name.clone(),
                    source,
                })?;
                Some(Token(secret.into_bytes().into_boxed_slice()))
            }
            None => None,
        };
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => {
                let config =
                    tls::server_config(cert, key, None).map_err(|source| HttpSourceError::Tls {
                        name: name.clone(),
                        source,
                    })?;
                Some(Arc::new(config))
            }
            (Some(_), None) => {
                return Err(HttpSourceError::IncompleteTls {
                    name,
                    given: "tls_cert",
                });
            }
            (None, Some(_)) => {
                return Err(HttpSourceError::IncompleteTls {
                    name,
                    given: "tls_key",
                });
            }
            (None, None) => None,
        };
        let bind_err = |source: io::Error| HttpSourceError::Bind {
            name: name.clone(),
            addr: cfg.listen,
            reason: describe_bind_error(&source),
            source,
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        debug!(source = %name, addr = %local_addr, tls = tls.is_some(), "HTTP ingest listener bound");
        Ok(HttpSource {
            name,
            class: cfg.class,
            max_body: cfg.max_body,
            listener,
            local_addr,
            token,
            tls,
            listener_limits: serve::Limits {
                max_connections: cfg.max_connections,
                max_connections_per_ip: cfg.max_connections_per_ip,
                header_timeout: cfg.header_timeout,
                request_timeout: cfg.request_timeout,
            },
            limits: Limits::new(cfg),
            schemas: Arc::new(Schemas::default()),
            require_schema: cfg.require_schema,
        })
    }

    /// The JSON Schemas the data of this source's events must match, by type.
    pub fn with_schemas(mut self, schemas: Arc<Schemas>) -> HttpSource {
        self.schemas = schemas;
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets
    /// requests in flight finish (graceful): each of them is still answered
    /// after its journal commit.
    pub async fn serve(
        self,
        journal: Journal,
        status: Arc<SourceStatus>,
        shutdown: CancellationToken,
    ) -> Result<(), HttpSourceError> {
        let HttpSource {
            name,
            class,
            max_body,
            listener,
            local_addr,
            token,
            tls,
            listener_limits,
            limits,
            schemas,
            require_schema,
        } = self;
        let ingest = Arc::new(Ingest {
            name: name.clone(),
            class,
            max_body,
            token,
            journal,
            status: status.clone(),
            warnings: WarnLimiter::default(),
            slots: tokio::sync::Semaphore::new(limits.max_concurrent_requests),
            waiting: tokio::sync::Semaphore::new(super::waiting_budget_kib(max_body) as usize),
            limits,
            schemas,
            require_schema,
        });
        let app = Router::new()
            .route(INGEST_PATH, post(post_events))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(
                usize::try_from(max_body).unwrap_or(usize::MAX),
            ))
            .with_state(ingest);

        status
            .started
            .store(true, std::sync::atomic::Ordering::Relaxed);
        status
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let scheme = if tls.is_some() { "https" } else { "http" };
        info!(source = %name, addr = %local_addr, "HTTP ingest listening on {scheme}://{local_addr}{INGEST_PATH}");

        let listener = serve::Listener {
            label: format!("sources.http '{name}'"),
            socket: listener,
            tls: tls.map(serve::TlsConfig::new),
            limits: listener_limits,
            // The agent bounds the whole shutdown; each request is bounded
            // by request_timeout.
            grace: None,
        };
        serve::serve(listener, app, Arc::new(|_, _| ()), shutdown).await;
        status
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        info!(source = %name, addr = %local_addr, "HTTP ingest stopped");
        Ok(())
    }
}

fn describe_bind_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address in use (another process listens there)".into(),
        io::ErrorKind::AddrNotAvailable => "address not available (no such local address)".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_check() {
        let token = Token(b"s3cret".to_vec().into_boxed_slice());
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(token.accepts(Some(&h("Bearer s3cret"))));
        assert!(token.accepts(Some(&h("bearer  s3cret"))));
        assert!(!token.accepts(Some(&h("Bearer s3cre"))));
        assert!(!token.accepts(Some(&h("Bearer s3cretx"))));
        assert!(!token.accepts(Some(&h("Basic s3cret"))));
        assert!(!token.accepts(Some(&h("Bearers3cret"))));
        assert!(!token.accepts(None));
    }
}
