//! The NATS JetStream sink: one publish per event into a JetStream stream,
//! with `Nats-Msg-Id` = the event id so that the server drops what it
//! already holds (within the stream's duplicate window), and the event as a
//! CloudEvent in the NATS binary binding: `ce-*` headers, `data` as the
//! body.
//!
//! Headers: `Nats-Msg-Id`; `ce-specversion`, `ce-id`, `ce-source`
//! (`plantrelay://<agent>/<source>`), `ce-type`, `ce-subject` (the event's
//! stream), `ce-time` (source time, when given), `ce-sequence`,
//! `ce-streamsequence`, `ce-deliveryclass`, and `ce-<name>` for every
//! extension attribute (strings unquoted, other values as JSON text), values
//! percent-encoded as the binding asks; `content-type` is the event's
//! `datacontenttype`, else `application/json` unless the data is binary
//! (`data_base64`, sent decoded as the body).
//!
//! This module owns the NATS connection of one sink ([`Sink::connect`]
//! opens it and checks, before the first publish, that a stream captures
//! the subjects; a connection that breaks is replaced by a new one at the
//! next send, never re-established with publishes still queued on it, see
//! [`JetStreamSink::open`]), the subject of each event
//! (the `subject` template, every token made valid), the mapping of
//! publish acknowledgements to a [`SendOutcome`], and counters of what the
//! server acknowledged and deduplicated ([`JetStreamCounters`]).
//!
//! A batch is published pipelined (nothing waits for an acknowledgement
//! between publishes); then the acknowledgements are awaited in order and
//! the acknowledged prefix is what the forwarder may count as delivered.
//! The first missing acknowledgement (timeout, connection lost, no stream
//! for the subject) is a retry of the rest: resending from there is safe
//! because the server deduplicates on `Nats-Msg-Id`. Only a message the
//! server can never take (larger than its `max_payload` or the stream's
//! maximum message size) is rejected, naming that event.
//!
//! It must never decide about cursors or dead letters, never refuse to
//! start because the server is unreachable or the stream is missing (that
//! is a failed [`Sink::connect`], retried with backoff while the agent keeps
//! journaling), never create or change a stream unless `create_stream` says
//! so, and never install a crypto provider of its own: TLS uses the rustls
//! configuration of [`crate::tls`].
//!
//! [`Sink::connect`]: super::Sink::connect
//! [`SendOutcome`]: super::SendOutcome

mod connection;
mod message;
mod publish;
mod stream;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;

use super::{ForwarderSettings, RetryPolicy};
use crate::config::{JetStreamSinkConfig, read_credentials, read_secret};
use crate::tls::{ClientTls, client_config};

use connection::{Auth, Upstream, parse_creds};
pub use message::{Outgoing, SubjectTemplate, outgoing, subject_matches};
pub use publish::{Failure, failure, outcome};

/// Errors building the sink from its config; they name the sink.
#[derive(Debug, thiserror::Error)]
#[error("sinks.jetstream '{sink}': {detail}")]
pub struct JetStreamSinkError {
    pub sink: String,
    pub detail: String,
}

/// What the server acknowledged for this sink since the agent started; the
/// agent may export them as metrics (the sink itself is owned by its
/// forwarder, so they are shared).
#[derive(Debug, Default)]
pub struct JetStreamCounters {
    published: AtomicU64,
    acknowledged: AtomicU64,
    duplicates: AtomicU64,
}

impl JetStreamCounters {
    /// Messages handed to the connection (re-sends included).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Publish acknowledgements received, duplicates included.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Acknowledgements with `duplicate: true`: re-sends (after a retry, a
    /// restart, a crash) the server already held and dropped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

pub struct JetStreamSink {
    name: String,
    agent_id: String,
    /// Server URLs as given to async-nats.
    servers: Vec<String>,
    /// The servers for messages, without credentials.
    shown: String,
    auth: Auth,
    tls: Option<rustls::ClientConfig>,
    stream: Option<String>,
    create_stream: bool,
    duplicate_window: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    /// Acknowledgements one batch may have outstanding.
    inflight: usize,
    template_text: String,
    template: SubjectTemplate,
    upstream: Mutex<Option<Upstream>>,
    counters: Arc<JetStreamCounters>,
}

impl JetStreamSink {
    pub fn new(
        cfg: &JetStreamSinkConfig,
        agent_id: &str,
    ) -> Result<JetStreamSink, JetStreamSinkError> {
        let err = |detail: String| JetStreamSinkError {
            sink: cfg.name.clone(),
            detail,
        };
        let wants_tls = cfg.url.iter().any(|u| u.scheme() == "tls")
            || cfg.ca_file.is_some()
            || cfg.client_cert.is_some();
        let tls = if wants_tls {
            Some(
                client_config(&ClientTls {
                    ca_file: cfg.ca_file.clone(),
                    ca_only: false,
                    client_cert: cfg.client_cert.clone(),
                    client_key: cfg.client_key.clone(),
                })
                .map_err(|e| err(e.to_string()))?,
            )
        } else {
            None
        };
        let auth = match (&cfg.token_file, &cfg.credentials_file) {
            (Some(path), _) => Auth::Token(read_secret(path).map_err(|e| err(e.to_string()))?),
            (None, Some(path)) => {
                let text = read_credentials(path).map_err(|e| err(e.to_string()))?;
                // Parsed now so that a damaged file is a config error, not
                // a connection failure retried forever.
                let (jwt, seed) = parse_creds(&text).map_err(|e| {
                    err(format!(
                        "{} is not a NATS credentials file: {e}",
                        path.display()
                    ))
                })?;
                Auth::Creds { jwt, seed }
            }
            (None, None) => Auth::None,
        };
        if cfg.url.is_empty() {
            return Err(err("url: at least one server is required".into()));
        }
        let shown = cfg
            .url
            .iter()
            .map(|u| match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
                (Some(h), None) => format!("{}://{h}", u.scheme()),
                _ => u.scheme().to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(JetStreamSink {
            name: cfg.name.clone(),
            agent_id: agent_id.to_string(),
            servers: cfg.url.iter().map(|u| u.as_str().to_string()).collect(),
            shown,
            auth,
            tls,
            stream: cfg.stream.clone(),
            create_stream: cfg.create_stream,
            duplicate_window: cfg.duplicate_window,
            timeout: cfg.timeout,
            retry: RetryPolicy {
                initial: cfg.retry_initial,
                max: cfg.retry_max,
            },
            // Room for a batch, and for the acknowledgements of a failed
            // batch still held by async-nats until they time out.
            inflight: cfg.batch_max_events.max(256).saturating_mul(2),
            template_text: cfg.subject.clone(),
            template: SubjectTemplate::new(&cfg.subject, agent_id),
            upstream: Mutex::new(None),
            counters: Arc::new(JetStreamCounters::default()),
        })
    }

    /// The forwarder settings of this sink's config.
    pub fn settings(cfg: &JetStreamSinkConfig) -> ForwarderSettings {
        ForwarderSettings::of(cfg)
    }

    /// The counters of this sink, shared: take them before the sink moves
    /// into its forwarder.
    pub fn counters(&self) -> Arc<JetStreamCounters> {
        self.counters.clone()
    }

    /// The subject template with `{agent}` filled in.
    pub fn template(&self) -> &SubjectTemplate {
        &self.template
    }

    /// Whether the connection to a server is up now.
    pub fn is_connected(&self) -> bool {
        self.current()
            .is_some_and(|u| u.client.connection_state() == State::Connected)
    }

    fn current(&self) -> Option<Upstream> {
        self.upstream.lock().ok().and_then(|u| u.clone())
    }

    fn set_current(&self, up: Option<Upstream>) {
        if let Ok(mut slot) = self.upstream.lock() {
            *slot = up;
        }
    }
}
