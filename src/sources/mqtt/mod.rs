//! The MQTT source (`[[sources.mqtt]]`): subscribes to topics on a plant
//! broker and acknowledges each message to the broker **only after the
//! journal has answered its append** (stored, or known as a duplicate). A
//! crash anywhere between receive and commit leaves the message
//! unacknowledged, and the broker redelivers it to the persistent session.
//!
//! This module owns the connection life cycle (connect, subscribe,
//! reconnect, dead-link detection), the ack rules and the back-pressure.
//! [`mapping`] owns how a message becomes an event; [`link`] owns the wire
//! (MQTT 3.1.1 and 5 on rumqttc's packet codec, and why not rumqttc's event
//! loop).
//!
//! # Two tasks
//!
//! Each in its own file: `connection` and `appender`.
//!
//! - The **connection task** owns the socket. It reads continuously and
//!   hands each PUBLISH, in arrival order, to the appender over a channel; it
//!   never waits for the journal. It writes the acks the appender reports,
//!   all that are ready in one write; it pings, answers PUBREL with PUBCOMP,
//!   and watches the link.
//! - The **appender** takes whatever has queued up (up to [`BATCH_MAX`]
//!   messages; under a steady trickle it waits up to `journal.commit_window`
//!   from the first one's arrival for more, see `Appender::gather`), maps
//!   it, appends it to the journal in **one** append (group commit), and
//!   when the journal has answered reports every message back in arrival
//!   order. One append at a time: per topic, journal order is
//!   arrival order, and acks go out in the order the messages came (as MQTT
//!   requires).
//!
//! PUBACK (QoS 1) and PUBREC (QoS 2) are written only for messages the
//! appender reported, i.e. after the commit. A failed append (journal full
//! under `when_full = "block"` after `block_timeout`, disk full, I/O) is
//! retried with the same messages in the same order until it succeeds;
//! nothing is acknowledged meanwhile, so the broker keeps the rest.
//! Rejected payloads are part of the same append (as `plantrelay.rejected`
//! records) or, with `on_invalid = "drop"`, counted and logged; either way
//! they are acknowledged with their batch so the broker never redelivers
//! them forever.
//!
//! # Back-pressure: `max_inflight`
//!
//! At most `max_inflight` messages are received and not yet acknowledged on
//! the wire. At the limit the connection task stops reading (acks and pings
//! go on): TCP back-pressure, and the broker holds the rest. With MQTT 5 the
//! broker knows the limit (it is our Receive Maximum) and holds QoS 1/2
//! messages itself; a 3.1.1 broker learns it from the TCP window.
//!
//! # Acks never cross connections
//!
//! Every message carries the epoch of the connection it arrived on; each
//! new connection has a new epoch. An ack is written only on the connection
//! its message came on: the broker may reuse a packet id on the next
//! connection, and a stale PUBACK would acknowledge a different, not yet
//! stored message. A message whose ack was dropped this way is redelivered
//! by the broker, found in the journal as a duplicate, and acknowledged
//! then.
//!
//! # Connection
//!
//! - Client id: `client_id`, default `plantrelay-<agent id>-<source name>`,
//!   stable across restarts so the broker keeps the session;
//!   `clean_session = false` by default (MQTT 5: clean start off, session
//!   expiry "never").
//! - Subscriptions (every `topics` entry with its QoS) are sent on the first
//!   connection of the process and again whenever a CONNACK says
//!   `session_present = false` (the broker lost or never had the session).
//! - After a failure the source waits a jittered, growing delay
//!   ([`BACKOFF_INITIAL`] doubling to [`BACKOFF_MAX`]; reset only after a
//!   connection that lasted [`STABLE_AFTER`], so a broker that accepts and
//!   drops at once is not hammered) before it reconnects.
//! - PINGREQ when nothing was sent or received for `keep_alive`; a link on
//!   which nothing (not even a PINGRESP) arrived for 1.5 × `keep_alive` is
//!   dropped and re-established (not while reading is paused for
//!   back-pressure).
//! - Every reconnect starts a fresh client state (the broker's session
//!   survives): no client-side state can wedge across reconnects (the
//!   rumqttc `CollisionTimeout` livelock, rumqtt#1014, cannot happen: the
//!   source never publishes).
//! - `mqtts://`: rustls with ring; trust is `ca_file` alone when given (the
//!   system store otherwise); `client_cert`/`client_key` for mutual TLS.

mod appender;
mod connection;
pub(crate) mod mapping;

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use mapping::{
    MAX_ID_LEN, Properties, REJECT_KEEP_BYTES, REJECTED_EVENT_TYPE, StreamTemplate, content_id,
};

use self::appender::{Appender, Window};
use self::connection::Connection;
use self::mapping::Mapper;
use crate::config::MqttSourceConfig;
use crate::journal::Journal;
use crate::mqtt::link::LinkSettings;
use crate::schema::Schemas;
use crate::status::SourceStatus;
use crate::tls::TlsError;
use crate::warn_limit::WarnLimiter;

/// Most messages in one journal append.
pub const BATCH_MAX: usize = 1000;
pub use super::reconnect::{BACKOFF_INITIAL, BACKOFF_MAX, STABLE_AFTER};

/// Why an MQTT source could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqttSourceError {
    /// The password file could not be read.
    #[error("sources.mqtt '{name}': password_file: {source}")]
    Password {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The TLS set-up failed (CA, client certificate or key).
    #[error("sources.mqtt '{name}': {source}")]
    Tls {
        name: String,
        #[source]
        source: TlsError,
    },
    /// The URL has no host.
    #[error("sources.mqtt '{name}': url {url}: no host")]
    Url { name: String, url: String },
    /// The journal writer stopped: nothing more can be stored.
    #[error("sources.mqtt '{name}': the journal has stopped; no more messages can be stored")]
    JournalClosed { name: String },
}

/// A configured (not yet connected) MQTT source.
pub struct MqttSource {
    name: String,
    broker: String,
    settings: LinkSettings,
    mapper: Mapper,
    max_inflight: usize,
    max_payload: u64,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("name", &self.name)
            .field("broker", &self.broker)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// Reads the password file and builds TLS, so that a bad file fails
    /// start-up rather than every connect.
    // Called once at start-up: the size of the error does not matter.
    #[allow(clippy::result_large_err)]
    pub fn new(cfg: &MqttSourceConfig, agent_id: &str) -> Result<MqttSource, MqttSourceError> {
        let name = cfg.name.clone();
        let (host, port, tls_wanted) =
            crate::mqtt::endpoint(&cfg.url).ok_or_else(|| MqttSourceError::Url {
                name: name.clone(),
                url: cfg.url.to_string(),
            })?;
        let credentials = crate::mqtt::login(cfg.username.as_ref(), cfg.password_file.as_ref())
            .map_err(|source| MqttSourceError::Password {
                name: name.clone(),
                source,
            })?;
        let tls = if tls_wanted {
            let config = crate::mqtt::client_tls(
                cfg.ca_file.as_deref(),
                cfg.client_cert.as_deref(),
                cfg.client_key.as_deref(),
            )
            .map_err(|source| MqttSourceError::Tls {
                name: name.clone(),
                source,
            })?;
            Some(config)
        } else {
            None
        };
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| default_client_id(agent_id, &cfg.name));
        let settings = LinkSettings {
            protocol: cfg.protocol,
            host: host.clone(),
            port,
            client_id,
            keep_alive: cfg.keep_alive,
            clean_session: cfg.clean_session,
            credentials,
            tls,
            max_inflight: cfg.max_inflight.max(1),
            io_timeout: (cfg.keep_alive * 2).clamp(Duration::from_secs(3), Duration::from_secs(10)),
            // Under a trickle only (see connection.rs, QUICKACK_SPACING).
            quickack: true,
            topics: cfg
                .topics
                .iter()
                .map(|t| (t.filter.clone(), t.qos))
                .collect(),
        };
        Ok(MqttSource {
            broker: format!("{}://{host}:{port}", cfg.url.scheme()),
            name,
            settings,
            mapper: Mapper::new(cfg),
            max_inflight: usize::from(cfg.max_inflight.max(1)),
            max_payload: cfg.max_payload,
        })
    }

    /// The JSON Schemas the data of this source's events must match.
    pub fn with_schemas(mut self, schemas: Arc<Schemas>) -> MqttSource {
        self.mapper = self.mapper.with_schemas(&schemas);
        self
    }

    /// The client id the source connects with.
    pub fn client_id(&self) -> &str {
        &self.settings.client_id
    }

    /// Runs until `shutdown` is cancelled: then it stops taking new
    /// messages, lets the appender store what was received and writes those
    /// acks, sends DISCONNECT, and returns. Returns an error only when the
    /// journal has stopped.
    pub async fn run(
        self,
        journal: Journal,
        status: Arc<SourceStatus>,
        shutdown: CancellationToken,
    ) -> Result<(), MqttSourceError> {
        status.started.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let appender = Appender {
            name: self.name.clone(),
            window: Window::new(journal.commit_window(), self.max_inflight),
            journal,
            mapper: self.mapper,
            status: status.clone(),
            warnings: WarnLimiter::default(),
        };
        let appender = tokio::spawn(appender.run(rx, done_tx));
        let connection = Connection {
            name: self.name,
            broker: self.broker,
            settings: self.settings,
            max_inflight: self.max_inflight,
            max_payload: self.max_payload,
            status: status.clone(),
        };
        let result = connection.run(tx, done_rx, appender, shutdown).await;
        status.connected.store(false, Ordering::Relaxed);
        if let Err(e) = &result {
            status.record_error(e.to_string());
        }
        result
    }
}

/// `plantrelay-<agent id>-<source name>`.
pub fn default_client_id(agent_id: &str, source: &str) -> String {
    format!("plantrelay-{agent_id}-{source}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_client_id_is_stable() {
        assert_eq!(default_client_id("gw-1", "line3"), "plantrelay-gw-1-line3");
    }
}
