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

pub(crate) mod mapping;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use mapping::{
    MAX_ID_LEN, Properties, REJECT_KEEP_BYTES, REJECTED_EVENT_TYPE, StreamTemplate, content_id,
};

use self::mapping::{Mapped, Mapper, Message};
use crate::config::MqttSourceConfig;
use crate::journal::{AppendOutcome, Journal, JournalError};
use crate::mqtt::link::{Conn, Incoming, IncomingPublish, LinkError, LinkSettings};
use crate::schema::Schemas;
use crate::status::SourceStatus;
use crate::tls::TlsError;

/// Most messages in one journal append.
pub const BATCH_MAX: usize = 1000;
use super::reconnect::Backoff;
pub use super::reconnect::{BACKOFF_INITIAL, BACKOFF_MAX, STABLE_AFTER};
/// How often the same kind of problem is logged at `warn`.
const WARN_EVERY: Duration = Duration::from_secs(60);

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
            // Our acks carry the TCP ACKs back to the broker.
            quickack: false,
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
            window: journal.commit_window(),
            journal,
            mapper: self.mapper,
            status: status.clone(),
            warnings: WarnLimiter::default(),
            max_inflight: self.max_inflight,
            spacing: None,
            last_received: None,
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

/// The appender's report on one message: stored (or known, or rejected)
/// and ready to be acknowledged on connection `epoch`.
#[derive(Debug, Clone, Copy)]
struct Done {
    epoch: u64,
    pkid: u16,
    qos: u8,
}

/// One turn of the connected loop.
enum Step {
    Shutdown,
    Done(usize),
    Read(Result<Incoming, LinkError>),
    Ping,
    Dead,
}

/// Per-connection bookkeeping.
struct Live {
    conn: Conn,
    since: Instant,
    keep_alive: Duration,
    last_rx: Instant,
    last_tx: Instant,
    ping_outstanding: bool,
}

/// The task that owns the socket.
struct Connection {
    name: String,
    broker: String,
    settings: LinkSettings,
    max_inflight: usize,
    max_payload: u64,
    status: Arc<SourceStatus>,
}

impl Connection {
    async fn run(
        self,
        tx: mpsc::UnboundedSender<Message>,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
        appender: JoinHandle<Result<(), MqttSourceError>>,
        shutdown: CancellationToken,
    ) -> Result<(), MqttSourceError> {
        let mut tx = Some(tx);
        let mut live: Option<Live> = None;
        let mut epoch = 0u64;
        let mut inflight = 0usize;
        let mut backoff = Backoff::new();
        let mut failures = 0u64;
        let mut subscribed_once = false;
        let mut subscribe_pkid = 0u16;
        let mut stopping = false;
        let mut appender_done = false;
        let mut done = Vec::with_capacity(1024);
        info!(source = %self.name, broker = %self.broker, client_id = %self.settings.client_id, "MQTT source starting");

        loop {
            if !stopping && appender_done {
                // The appender only ends early when the journal stopped.
                error!(source = %self.name, "the journal has stopped; the MQTT source stops");
                stopping = true;
                tx = None;
            }
            let Some(l) = live.as_mut() else {
                if stopping {
                    break;
                }
                let connect = async {
                    let mut c = Conn::connect(&self.settings).await?;
                    let resubscribe = !subscribed_once || !c.session_present;
                    if resubscribe {
                        subscribe_pkid = subscribe_pkid.checked_add(1).unwrap_or(1);
                        c.conn.subscribe(subscribe_pkid, &self.settings.topics);
                        c.conn.flush().await?;
                    }
                    Ok::<_, LinkError>((c, resubscribe))
                };
                let attempt = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        stopping = true;
                        tx = None;
                        continue;
                    }
                    r = connect => r,
                };
                // Reports that came in meanwhile belong to older connections.
                while let Ok(_stale) = done_rx.try_recv() {
                    inflight -= 1;
                }
                match attempt {
                    Ok((c, resubscribed)) => {
                        epoch += 1;
                        self.on_connected(
                            c.session_present,
                            subscribed_once,
                            resubscribed,
                            failures,
                        );
                        subscribed_once |= resubscribed;
                        failures = 0;
                        let now = Instant::now();
                        live = Some(Live {
                            conn: c.conn,
                            since: now,
                            keep_alive: c.keep_alive,
                            last_rx: now,
                            last_tx: now,
                            ping_outstanding: false,
                        });
                    }
                    Err(e) => {
                        let delay = self.lost(&e, None, &mut failures, &mut backoff);
                        let until = tokio::time::Instant::now() + delay;
                        // Wait, still counting what the appender finishes.
                        loop {
                            tokio::select! {
                                () = shutdown.cancelled(), if !stopping => {
                                    stopping = true;
                                    tx = None;
                                    break;
                                }
                                n = done_rx.recv_many(&mut done, 4096), if !appender_done => {
                                    if n == 0 {
                                        appender_done = true;
                                        break;
                                    }
                                    inflight -= done.len();
                                    done.clear();
                                }
                                () = tokio::time::sleep_until(until) => break,
                            }
                        }
                    }
                }
                continue;
            };

            let paused = !stopping && inflight >= self.max_inflight;
            if paused {
                // Nothing is read while paused: silence now says nothing
                // about the link, so the dead-link clock starts afresh.
                l.last_rx = Instant::now();
            }
            let ping_at = if l.ping_outstanding {
                l.last_tx + l.keep_alive
            } else {
                l.last_tx.min(l.last_rx) + l.keep_alive
            };
            let dead_at = l.last_rx + l.keep_alive.mul_f64(1.5);
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled(), if !stopping => Step::Shutdown,
                n = done_rx.recv_many(&mut done, 4096), if !appender_done => Step::Done(n),
                r = l.conn.read(), if !paused => Step::Read(r),
                () = tokio::time::sleep_until(ping_at.into()) => Step::Ping,
                () = tokio::time::sleep_until(dead_at.into()), if !paused => Step::Dead,
            };
            let result: Result<(), LinkError> = match step {
                Step::Shutdown => {
                    info!(source = %self.name, "MQTT source stopping: storing what was received, acknowledging it, then disconnecting");
                    stopping = true;
                    tx = None;
                    Ok(())
                }
                Step::Done(0) => {
                    appender_done = true;
                    Ok(())
                }
                Step::Done(_) => {
                    inflight -= done.len();
                    for d in done.drain(..) {
                        if d.epoch == epoch {
                            l.conn.ack(d.pkid, d.qos);
                        }
                    }
                    self.flush(l).await
                }
                Step::Read(Ok(first)) => {
                    // Handle everything the last read brought in, then
                    // write once.
                    let mut next = Some(first);
                    let mut flush = false;
                    let mut result = Ok(());
                    while let Some(incoming) = next.take() {
                        match self.on_packet(l, incoming, tx.as_ref(), epoch, &mut inflight) {
                            Ok(f) => flush |= f,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                        if !stopping && inflight >= self.max_inflight {
                            break;
                        }
                        match l.conn.buffered() {
                            Ok(p) => next = p,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    if result.is_ok() && flush {
                        result = self.flush(l).await;
                    }
                    result
                }
                Step::Read(Err(e)) => Err(e),
                Step::Ping => {
                    l.conn.ping();
                    l.ping_outstanding = true;
                    self.flush(l).await
                }
                Step::Dead => Err(LinkError(format!(
                    "nothing received from the broker for {} (keep_alive × 1.5): the link is dead",
                    humantime::format_duration(l.keep_alive.mul_f64(1.5))
                ))),
            };

            match result {
                Ok(()) if stopping && appender_done => {
                    // Every ack of the last batch is written: say goodbye.
                    l.conn.disconnect();
                    if let Err(e) = l.conn.flush().await {
                        debug!(source = %self.name, error = %e, "DISCONNECT not sent");
                    }
                    break;
                }
                Ok(()) => {}
                Err(e) => {
                    let since = l.since;
                    live = None;
                    self.lost(&e, Some(since), &mut failures, &mut backoff);
                    // A jittered pause before the reconnect.
                    if !stopping {
                        let delay = backoff.delay();
                        tokio::select! {
                            () = shutdown.cancelled() => {
                                stopping = true;
                                tx = None;
                            }
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }

        drop(tx);
        // Let the appender finish what it holds (nothing more is acked).
        let result = match appender.await {
            Ok(r) => r,
            Err(e) => {
                error!(source = %self.name, error = %e, "the MQTT appender task failed");
                Ok(())
            }
        };
        info!(source = %self.name, "MQTT source stopped");
        result
    }

    /// Handles one packet from the broker; `Ok(true)` when something was
    /// queued to write.
    fn on_packet(
        &self,
        l: &mut Live,
        incoming: Incoming,
        tx: Option<&mpsc::UnboundedSender<Message>>,
        epoch: u64,
        inflight: &mut usize,
    ) -> Result<bool, LinkError> {
        l.last_rx = Instant::now();
        l.ping_outstanding = false;
        match incoming {
            Incoming::Publish(p) => {
                if let Some(tx) = tx {
                    *inflight += 1;
                    self.forward(tx, epoch, p);
                }
                // While stopping: neither stored nor acked; the broker
                // redelivers it to the next session.
                Ok(false)
            }
            Incoming::PubRel(pkid) => {
                l.conn.pubcomp(pkid);
                Ok(true)
            }
            Incoming::SubAck(codes) => {
                self.on_suback(&codes);
                Ok(false)
            }
            Incoming::Disconnect(reason) => Err(LinkError(format!(
                "the broker ended the connection: {reason}"
            ))),
            Incoming::ConnAck { .. } => Err(LinkError("unexpected CONNACK from the broker".into())),
            // The source publishes nothing: acks of publishes are noise.
            Incoming::PubAck { .. } | Incoming::PubRec { .. } | Incoming::PubComp(_) => Ok(false),
            Incoming::Other => Ok(false),
        }
    }

    /// Writes what is queued; on success notes the time.
    async fn flush(&self, l: &mut Live) -> Result<(), LinkError> {
        l.conn.flush().await?;
        l.last_tx = Instant::now();
        Ok(())
    }

    /// Bookkeeping for a failed connect or a lost connection; returns the
    /// delay before the next attempt (for failed connects).
    fn lost(
        &self,
        e: &LinkError,
        connected_since: Option<Instant>,
        failures: &mut u64,
        backoff: &mut Backoff,
    ) -> Duration {
        self.status.connected.store(false, Ordering::Relaxed);
        self.status.record_error(e.0.clone());
        match connected_since {
            Some(since) => {
                if since.elapsed() >= STABLE_AFTER.max(self.settings.keep_alive) {
                    backoff.reset();
                }
                warn!(source = %self.name, broker = %self.broker, error = %e, "MQTT connection lost; reconnecting");
                Duration::ZERO
            }
            None => {
                *failures += 1;
                let delay = backoff.delay();
                if *failures == 1 || failures.is_multiple_of(20) {
                    warn!(source = %self.name, broker = %self.broker, error = %e, attempts = *failures, retry_in_ms = delay.as_millis() as u64, "cannot connect to the MQTT broker; retrying");
                } else {
                    debug!(source = %self.name, error = %e, attempts = *failures, "MQTT connect failed");
                }
                delay
            }
        }
    }

    /// `connected` in the status means "receiving": with a subscription in
    /// flight it is set when the SUBACK arrives (a message published before
    /// the broker has the subscription is not ours to receive).
    fn on_connected(
        &self,
        session_present: bool,
        subscribed_once: bool,
        subscribing: bool,
        failures: u64,
    ) {
        if !subscribing {
            self.status.connected.store(true, Ordering::Relaxed);
        }
        if !session_present && subscribed_once && !self.settings.clean_session {
            warn!(source = %self.name, broker = %self.broker, "the broker has no session for us any more (session_present = false): resubscribing; what it held for us while the session was gone is lost on the broker");
        } else {
            info!(source = %self.name, broker = %self.broker, session_present, after_failed_attempts = failures, "connected to the MQTT broker");
        }
    }

    fn on_suback(&self, codes: &[Option<String>]) {
        let mut refused = 0;
        for ((filter, qos), code) in self.settings.topics.iter().zip(codes) {
            if let Some(reason) = code {
                refused += 1;
                error!(source = %self.name, topic = %filter, qos, reason = %reason, "the broker refused the subscription");
                self.status
                    .record_error(format!("subscription to {filter} refused: {reason}"));
            }
        }
        if refused == 0 {
            info!(source = %self.name, topics = codes.len(), "subscribed");
        }
        self.status.connected.store(true, Ordering::Relaxed);
    }

    fn forward(&self, tx: &mpsc::UnboundedSender<Message>, epoch: u64, p: IncomingPublish) {
        let msg = Message::new(
            epoch,
            p.pkid,
            p.qos,
            p.retain,
            p.topic,
            p.payload,
            p.properties,
            self.max_payload,
        );
        // A send error means the appender is gone; the loop notices.
        let _ = tx.send(msg);
    }
}

/// The task that maps, appends and reports, in arrival order.
struct Appender {
    name: String,
    journal: Journal,
    mapper: Mapper,
    status: Arc<SourceStatus>,
    warnings: WarnLimiter,
    /// `journal.commit_window`: how long the first message of a batch may
    /// wait for others to share its commit.
    window: Duration,
    max_inflight: usize,
    /// Mean time between messages (a moving average), and when the last
    /// one arrived.
    spacing: Option<Duration>,
    last_received: Option<std::time::SystemTime>,
}

/// What one message became in an append.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Event,
    Rejected,
}

impl Appender {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Message>,
        done: mpsc::UnboundedSender<Done>,
    ) -> Result<(), MqttSourceError> {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        while rx.recv_many(&mut batch, BATCH_MAX).await > 0 {
            self.gather(&mut rx, &mut batch).await;
            self.commit(&batch).await?;
            for m in batch.drain(..) {
                let _ = done.send(Done {
                    epoch: m.epoch,
                    pkid: m.pkid,
                    qos: m.qos,
                });
            }
        }
        Ok(())
    }

    /// The commit window, kept here rather than in the journal: the first
    /// message of a batch waits, up to `journal.commit_window` from its
    /// arrival, for more to share its commit (fewer commits, fewer pages
    /// written, under light traffic). The append then commits at once
    /// ([`Journal::append_gathered`]), so a message waits one window, not
    /// the rest of the one in progress and then its own. The same rules as
    /// the journal's own window: no wait when messages come further apart
    /// than the window (nothing to gather); none past
    /// `WINDOW_ENOUGH_EVENTS` (more saves no page writes) or `max_inflight`
    /// (the broker sends no more until the acks).
    async fn gather(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Message>,
        batch: &mut Vec<Message>,
    ) {
        self.note_arrivals(batch);
        let Some(first) = batch.first().map(|m| m.received) else {
            return;
        };
        if self.window.is_zero() || self.spacing.is_none_or(|s| s > self.window) {
            return;
        }
        let age = std::time::SystemTime::now()
            .duration_since(first)
            .unwrap_or_default();
        let Some(left) = self.window.checked_sub(age) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + left;
        let enough = self
            .max_inflight
            .min(BATCH_MAX)
            .min(crate::journal::WINDOW_ENOUGH_EVENTS);
        while batch.len() < enough {
            let before = batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(batch, BATCH_MAX - before)).await {
                Ok(n) if n > 0 => self.note_arrivals(&batch[before..]),
                // Closed (the source is stopping) or the window passed.
                _ => break,
            }
        }
    }

    /// Keeps the moving average of the time between messages.
    fn note_arrivals(&mut self, messages: &[Message]) {
        for m in messages {
            if let Some(gap) = self
                .last_received
                .and_then(|t| m.received.duration_since(t).ok())
            {
                let gap = gap.min(self.window * 100);
                self.spacing = Some(self.spacing.map_or(gap, |avg| (avg * 7 + gap) / 8));
            }
            self.last_received = Some(m.received);
        }
    }

    /// Appends the batch (retrying until the journal takes it) and counts.
    async fn commit(&mut self, batch: &[Message]) -> Result<(), MqttSourceError> {
        let checkpoint = self.mapper.checkpoint();
        let mut attempt = 0u32;
        loop {
            let refusals_before = self.mapper.schema_refusals();
            let mut events = Vec::with_capacity(batch.len());
            let mut kinds = Vec::with_capacity(batch.len());
            let mut dropped = 0u64;
            for m in batch {
                match self.mapper.map(m) {
                    Mapped::Event(e) => {
                        events.push(e);
                        kinds.push(Kind::Event);
                    }
                    Mapped::Rejected(e, reason) => {
                        self.log_reject(&m.topic, &reason, "journaled as a rejected record");
                        events.push(e);
                        kinds.push(Kind::Rejected);
                    }
                    Mapped::Dropped(reason) => {
                        self.log_reject(&m.topic, &reason, "dropped (on_invalid = \"drop\")");
                        dropped += 1;
                    }
                }
            }
            let by_schema = self.mapper.schema_refusals() - refusals_before;
            if events.is_empty() {
                self.status.record_reject(dropped);
                self.record_schema_refusals(by_schema);
                return Ok(());
            }
            match self.journal.append_gathered(events).await {
                Ok(outcomes) => {
                    let (mut stored, mut duplicates, mut rejected) = (0u64, 0u64, dropped);
                    for (kind, outcome) in kinds.iter().zip(&outcomes) {
                        match (kind, outcome) {
                            (_, AppendOutcome::Duplicate { .. }) => duplicates += 1,
                            (Kind::Event, AppendOutcome::Stored { .. }) => stored += 1,
                            (Kind::Rejected, AppendOutcome::Stored { .. }) => rejected += 1,
                        }
                    }
                    self.status.record_events(stored, duplicates);
                    if rejected > 0 {
                        self.status.record_reject(rejected);
                    }
                    self.record_schema_refusals(by_schema);
                    if attempt > 0 {
                        info!(source = %self.name, attempts = attempt + 1, "journal append succeeded; acknowledging to the broker again");
                    }
                    return Ok(());
                }
                Err(JournalError::Closed) => {
                    return Err(MqttSourceError::JournalClosed {
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    attempt += 1;
                    let message = e.to_string();
                    if let Some(suppressed) = self.warnings.check("append") {
                        warn!(source = %self.name, error = %message, messages = batch.len(), attempt, suppressed, "journal append failed; holding the acks (the broker keeps the messages) and retrying");
                    }
                    self.status.record_error(message);
                    self.mapper.restore(checkpoint.clone());
                    tokio::time::sleep(super::append_retry_delay(&e, attempt)).await;
                }
            }
        }
    }

    fn record_schema_refusals(&self, n: u64) {
        if n > 0 {
            self.status
                .record_schema_rejects(self.mapper.event_type(), n);
        }
    }

    fn log_reject(&self, topic: &str, reason: &str, what: &str) {
        match self.warnings.check("reject") {
            Some(suppressed) => {
                warn!(source = %self.name, topic = %topic, reason = %reason, suppressed, "invalid MQTT payload {what}")
            }
            None => {
                debug!(source = %self.name, topic = %topic, reason = %reason, "invalid MQTT payload {what}")
            }
        }
    }
}

/// Logs a kind of problem at `warn` at most once per [`WARN_EVERY`], with
/// the number suppressed in between.
#[derive(Default)]
struct WarnLimiter {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl WarnLimiter {
    fn check(&self, kind: &'static str) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < WARN_EVERY => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_client_id_is_stable() {
        assert_eq!(default_client_id("gw-1", "line3"), "plantrelay-gw-1-line3");
    }
}
