//! The OPC UA source (`[[sources.opcua]]`): a client session to one server,
//! one subscription with a monitored item per configured node, and every
//! data change appended to the journal (`plantrelay.opcua.data_change`).
//!
//! This module owns the connection life cycle: endpoint selection and
//! security, server certificate trust, the session event loop and its
//! supervision, namespace resolution, subscription and monitored items,
//! the resync snapshot, per-node retries and the source status. [`mapping`]
//! owns how a data value becomes an event; [`pki`] owns the certificate
//! folders; [`nodes`] owns node id parsing and namespace resolution.
//! Within the life cycle kept here, `session` owns the client, the
//! endpoint choice and the security of a session; `subscription` what a
//! session sets up (namespaces, resync snapshot, subscription, monitored
//! items) and the per-node retries and health; `feed` what the session's
//! event loop and subscription callback report; `appender` the journal
//! appends.
//!
//! It must never drop a data change silently: every notification goes to
//! the appender, which retries a failed append until the journal takes it
//! (or has stopped); only at the queue's bound is a value superseded by a
//! newer one of the same node dropped, and that is counted and logged. It must never trust a server certificate that is
//! neither in `trusted/`, pinned by `server_cert_sha256`, nor accepted by
//! `trust_unknown_server`.
//!
//! # Connection, one generation at a time
//!
//! Every (re)connect builds everything from scratch: a fresh `GetEndpoints`,
//! a new session (async-opcua's own reconnect is switched off:
//! `session_retry_limit = 0`, `recreate_subscriptions = false`), the
//! namespace array read again and every `nsu=` node id resolved to the
//! index the server has *now* (indexes can change across server restarts),
//! then a resync snapshot and the subscription. Nothing of an old session
//! is reused, so nothing stale (an old namespace index, a subscription the
//! restarted server no longer knows) can survive a reconnect. A failed
//! attempt or a lost session is followed by a jittered, growing delay
//! ([`BACKOFF_INITIAL`] doubling to [`BACKOFF_MAX`]).
//!
//! # Liveness
//!
//! - The session event loop is polled by a driver task of this source;
//!   its end, or a `ConnectionLost`, ends the generation at once.
//! - **Publish watchdog**: the server must answer a publish request (data
//!   or keep-alive) at least every revised publishing interval × revised
//!   keep-alive count, counted from the first interval without data: a
//!   server enters its keep-alive state one interval after the last data,
//!   and its publishing timer restarts with each message, so a keep-alive
//!   is due up to (keep-alive count + 2) intervals after the last response
//!   (measured here: 2.7 s at 200 ms × 10 after a burst), and later on a
//!   saturated host, where the server's timers slip (over 5 s at
//!   200 ms × 20). No answer for that window plus [`WATCHDOG_SLACK`] or
//!   half the keep-alive window, whichever is longer, ends the generation:
//!   a server that still accepts TCP (and even answers reads) but stopped
//!   publishing is detected, and the source never reports "connected"
//!   over a dead publish loop.
//! - Session keep-alive: a Read of the server state every keep-alive
//!   window; two failures in a row close the session.
//! - `connect_timeout` bounds endpoint discovery, the session activation and
//!   every set-up request; requests time out after `connect_timeout` too.
//! - TCP keepalive is on (idle 10 s, interval 5 s) on the session socket,
//!   so a silently vanished peer is noticed by the kernel as well.
//!
//! # Subscription timing
//!
//! `publishing_interval`, `keep_alive_count` and `lifetime_count` come from
//! the config (validated: lifetime ≥ 3 × keep-alive). The publish request
//! timeout is set to twice the keep-alive window plus `connect_timeout`, so
//! a healthy idle subscription never times out its own publish requests.
//! Each node's `sampling_interval`, `queue_size` (default 10: with a queue
//! of 1, values faster than the publishing interval are lost) and
//! `deadband` are requested per monitored item, `discard_oldest = true`.
//!
//! # Resync snapshot
//!
//! After every (re)connect, before the subscription is created, every
//! resolved node is read once (Value and DisplayName) and each good or
//! uncertain value is journaled with `"resync": true`. Event ids are the
//! same for the same change whichever way it arrives (see [`mapping`]),
//! so the subscription's initial value of an unchanged node is a journal
//! duplicate, and a snapshot of a value already delivered is too.
//!
//! # Per-node problems
//!
//! A node whose namespace URI is not on the server, or whose monitored item
//! the server refuses (`BadNodeIdUnknown`, …), does not block the others:
//! it is listed in the source status (`bad_nodes`) and retried every
//! [`NODE_RETRY`] on the live session (5 s). A monitored node whose latest
//! data change carries a bad status (a tag deleted on the server, a device
//! that stopped answering) is listed there too, with that status, until a
//! good or uncertain value arrives; the bad value itself is journaled.
//!
//! # Lost notification messages
//!
//! The server numbers its notification messages. A gap in the numbers (for
//! example a publish response the server could not send because it was
//! larger than its max message size, `BadResponseTooLarge`) is logged at
//! `warn` and recorded as the source's last error: data changes are
//! missing, and plant IT should know. [`MAX_NOTIFICATIONS_PER_PUBLISH`]
//! keeps responses small enough for common server limits.
//!
//! # Request sizes
//!
//! The resync Read and CreateMonitoredItems go out in batches of `CHUNK`
//! nodes, or fewer where the server's OperationLimits (read once per
//! session) are lower. A set-up that fails closes its session, so that
//! retries do not pile up sessions on the server.
//!
//! # Back-pressure
//!
//! Notifications are handed to the appender in arrival order; the appender
//! appends up to [`BATCH_MAX`] at a time (group commit) and waits for the
//! commit. The client library acknowledges notifications to the server
//! itself, so a journal slower than the server queues notifications in
//! memory: at most `max_queued_changes`; beyond that the queue keeps only
//! the newest value per node, and every value superseded there is dropped,
//! counted (`dropped` in the source status) and logged (see [`queue`]).

mod appender;
mod feed;
mod mapping;
mod nodes;
pub mod pki;
mod queue;
mod session;
mod subscription;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use opcua::client::{Client, IdentityToken, Session};
use opcua::types::StatusCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use mapping::{DATA_CHANGE_EVENT_TYPE, Mapper, NodeMeta, event_id, variant_json};
pub use nodes::{NodeRef, parse_node_id};

use self::appender::{Appender, appender_result};
use self::feed::{Driver, LoopEvent};
use self::session::{connect_failure, user_identity_cert};
use self::subscription::{Live, publish_bad_nodes};
use super::reconnect::ReconnectBackoff;
use crate::config::{OpcuaSourceConfig, read_secret};
use crate::journal::Journal;
use crate::status::SourceStatus;
use crate::warn_limit::WarnLimiter;

/// Most data changes in one journal append.
pub const BATCH_MAX: usize = 2000;
pub use super::reconnect::{BACKOFF_INITIAL, BACKOFF_MAX, STABLE_AFTER};
/// Added to the keep-alive window before the publish watchdog fires.
pub const WATCHDOG_SLACK: Duration = Duration::from_millis(500);
/// How long the server may stay silent before the publish watchdog ends
/// the generation: the keep-alive window, two more intervals, and the
/// slack or half the window, whichever is longer (module doc).
///
/// Both values are the server's revised ones, so they are input: a server
/// may answer an interval of 10^300 ms (async-opcua saturates it to
/// `u64::MAX` ms) and any keep-alive count, and `Duration`'s `*` and `+`
/// panic on overflow. Saturated, such a window never fires, which is what
/// the server announced.
fn watchdog_window(publishing_interval: Duration, keep_alive_count: u32) -> Duration {
    let keep_alive = publishing_interval.saturating_mul(keep_alive_count.max(1));
    keep_alive
        .saturating_add(publishing_interval.saturating_mul(2))
        .saturating_add(WATCHDOG_SLACK.max(keep_alive / 2))
}

/// How often nodes the server refused are tried again.
pub const NODE_RETRY: Duration = Duration::from_secs(5);
/// Most notifications the server may put in one publish response. A
/// server refuses to send a response larger than its own max message size
/// (`BadResponseTooLarge`; async-opcua's default is 327,675 bytes, which
/// holds about 10,000 scalar notifications) and the notifications in it are
/// lost; with 1,000 a response stays around 30–60 KiB for scalar values,
/// and the server sends a busy cycle as several responses, which the client
/// asks for back to back.
pub const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 1_000;

/// Why an OPC UA source could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpcuaSourceError {
    #[error("sources.opcua '{name}': password_file: {source}")]
    Password {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sources.opcua '{name}': user_cert/user_key: {detail}")]
    UserCert { name: String, detail: String },
    #[error("sources.opcua '{name}': PKI folder {}: {detail}", path.display())]
    Pki {
        name: String,
        path: PathBuf,
        detail: String,
    },
    #[error("sources.opcua '{name}': node {node_id}: {detail}")]
    Node {
        name: String,
        node_id: String,
        detail: String,
    },
    #[error("sources.opcua '{name}': the OPC UA client could not be set up: {detail}")]
    Client { name: String, detail: String },
    #[error("sources.opcua '{name}': the journal has stopped; no more data changes can be stored")]
    JournalClosed { name: String },
}

/// Why one connection generation ended (retried after a delay).
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Failed(String),
    #[error("no publish response for {0:?} (keep-alive window): the server stopped publishing{1}")]
    Silent(Duration, String),
    #[error("the journal has stopped")]
    JournalClosed,
}

/// The sending side to the appender.
type Feed = queue::Sender;

/// A configured (not yet running) OPC UA source.
pub struct OpcuaSource {
    name: String,
    cfg: OpcuaSourceConfig,
    pki_dir: PathBuf,
    identity: IdentityToken,
    nodes: Vec<nodes::NodeSpec>,
    app_uri: String,
}

impl std::fmt::Debug for OpcuaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpcuaSource")
            .field("name", &self.name)
            .field("endpoint", &self.cfg.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl OpcuaSource {
    /// Reads the identity files and parses the node ids, so that a bad file
    /// fails start-up rather than every connect. Creates nothing yet.
    pub fn new(
        cfg: &OpcuaSourceConfig,
        agent_id: &str,
        state_dir: &std::path::Path,
    ) -> Result<OpcuaSource, OpcuaSourceError> {
        let name = cfg.name.clone();
        let identity = match (
            &cfg.username,
            &cfg.password_file,
            &cfg.user_cert,
            &cfg.user_key,
        ) {
            (Some(user), password, _, _) => {
                let password = match password {
                    Some(path) => {
                        read_secret(path).map_err(|source| OpcuaSourceError::Password {
                            name: name.clone(),
                            source,
                        })?
                    }
                    None => String::new(),
                };
                IdentityToken::new_user_name(user.clone(), password)
            }
            (None, _, Some(cert), Some(key)) => {
                user_identity_cert(cert, key).map_err(|detail| OpcuaSourceError::UserCert {
                    name: name.clone(),
                    detail,
                })?
            }
            _ => IdentityToken::Anonymous,
        };
        let nodes = cfg
            .nodes
            .iter()
            .map(|n| {
                nodes::NodeSpec::new(n).map_err(|detail| OpcuaSourceError::Node {
                    name: name.clone(),
                    node_id: n.node_id.clone(),
                    detail,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OpcuaSource {
            pki_dir: pki::source_dir(state_dir, &cfg.name),
            app_uri: format!("urn:plantrelay:{agent_id}:{}", cfg.name),
            name,
            cfg: cfg.clone(),
            identity,
            nodes,
        })
    }

    /// The folder holding this source's certificates (`own/`, `private/`,
    /// `trusted/`, `rejected/`).
    pub fn pki_dir(&self) -> &std::path::Path {
        &self.pki_dir
    }

    /// Runs until `shutdown` is cancelled. Returns an error only when the
    /// journal has stopped or the client cannot be set up at all.
    pub async fn run(
        self,
        journal: Journal,
        status: Arc<SourceStatus>,
        shutdown: CancellationToken,
    ) -> Result<(), OpcuaSourceError> {
        status.started.store(true, Ordering::Relaxed);
        let result = self.run_inner(journal, status.clone(), shutdown).await;
        status.connected.store(false, Ordering::Relaxed);
        if let Err(e) = &result {
            error!(source = %self.name, error = %e, "OPC UA source stopped");
            status.record_error(e.to_string());
        }
        result
    }

    async fn run_inner(
        &self,
        journal: Journal,
        status: Arc<SourceStatus>,
        shutdown: CancellationToken,
    ) -> Result<(), OpcuaSourceError> {
        if self.cfg.trust_unknown_server {
            warn!(
                source = %self.name,
                endpoint = %self.cfg.endpoint,
                "trust_unknown_server = true: any server certificate is accepted and stored in trusted/; for commissioning only"
            );
        }
        let client = self.client()?;
        let (feed, rx) = queue::channel(self.cfg.max_queued_changes, &self.name, status.clone());
        let appender = Appender {
            name: self.name.clone(),
            journal,
            mapper: Mapper::new(&self.cfg),
            nodes: self.nodes.iter().map(|n| n.meta.clone()).collect(),
            names: self.nodes.iter().map(|n| n.meta.node_id.clone()).collect(),
            status: status.clone(),
        };
        let mut appender = tokio::spawn(appender.run(rx));
        let mut backoff = ReconnectBackoff::new();
        let mut generation = 0u64;
        info!(
            source = %self.name,
            endpoint = %self.cfg.endpoint,
            policy = %self.cfg.security_policy,
            mode = %self.cfg.security_mode,
            nodes = self.nodes.len(),
            pki = %self.pki_dir.display(),
            "OPC UA source starting"
        );
        // Failed generations in a row (a stable one resets the count).
        let mut failures: u64 = 0;
        let result = loop {
            generation += 1;
            let started = Instant::now();
            let generation_run = self.generation(&client, &feed, &status, &shutdown, generation);
            tokio::pin!(generation_run);
            let outcome = tokio::select! {
                biased;
                r = &mut appender => break appender_result(&self.name, r),
                r = &mut generation_run => r,
                () = shutdown.cancelled() => {
                    // A live session sees the shutdown too and closes itself
                    // (CloseSession); one still connecting is dropped.
                    if status.connected.load(Ordering::Relaxed) {
                        let _ = tokio::time::timeout(Duration::from_secs(3), &mut generation_run).await;
                    }
                    break Ok(());
                }
            };
            status.connected.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => break Ok(()),
                Err(LinkError::JournalClosed) => {
                    break Err(OpcuaSourceError::JournalClosed {
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    if started.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                        failures = 0;
                    }
                    failures += 1;
                    let wait = backoff.delay();
                    let message = format!("{}: {e}", self.cfg.endpoint);
                    // The first failure and every 20th while it lasts (as
                    // the MQTT source does): a PLC off for a weekend is
                    // tried every 5 s.
                    if failures == 1 || failures.is_multiple_of(20) {
                        warn!(source = %self.name, error = %message, attempts = failures, retry_in_ms = wait.as_millis() as u64, "OPC UA connection failed or lost; reconnecting");
                    } else {
                        debug!(source = %self.name, error = %message, attempts = failures, "OPC UA connection failed");
                    }
                    status.record_error(message);
                    tokio::select! {
                        () = shutdown.cancelled() => break Ok(()),
                        r = &mut appender => break appender_result(&self.name, r),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        // Let the appender store what was received, then stop it.
        drop(feed);
        if !appender.is_finished() {
            match tokio::time::timeout(Duration::from_secs(10), &mut appender).await {
                Ok(r) => appender_result(&self.name, r)?,
                Err(_) => {
                    warn!(source = %self.name, "data changes still waiting for the journal at shutdown were not stored");
                    appender.abort();
                }
            }
        }
        info!(source = %self.name, "OPC UA source stopped");
        result
    }

    /// One connection generation: connect, set up, then watch until it ends.
    /// `Ok` only on shutdown.
    async fn generation(
        &self,
        client: &Client,
        feed: &Feed,
        status: &Arc<SourceStatus>,
        shutdown: &CancellationToken,
        generation: u64,
    ) -> Result<(), LinkError> {
        let t0 = Instant::now();
        let timeout = self.cfg.connect_timeout;
        let url = self.cfg.endpoint.as_str().to_owned();
        let endpoints = tokio::time::timeout(timeout, client.get_server_endpoints_from_url(&url))
            .await
            .map_err(|_| {
                LinkError::Failed(format!("no answer to GetEndpoints within {timeout:?}"))
            })?
            .map_err(|e| LinkError::Failed(format!("GetEndpoints failed: {e}")))?;
        let endpoint = self.pick_endpoint(&url, &endpoints)?;
        self.check_server_cert(client, &endpoint)?;

        let (session, event_loop) = client
            .session_builder()
            .connect_to_endpoint_directly(endpoint)
            .map_err(|e| LinkError::Failed(format!("endpoint: {e}")))?
            .with_connector(nodes::KeepaliveSource)
            .user_identity_token(self.identity.clone())
            .build(client.certificate_store().clone())
            .map_err(|e| LinkError::Failed(format!("session set-up: {e}")))?;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let driver = Driver::spawn(event_loop, events_tx);

        // Wait for the session to be activated.
        let activated = tokio::time::timeout(timeout, async {
            while let Some(ev) = events.recv().await {
                match ev {
                    LoopEvent::Connected => return Ok(()),
                    LoopEvent::Ended(code) | LoopEvent::Lost(code) => {
                        return Err(LinkError::Failed(connect_failure(code, &self.pki_dir)));
                    }
                    LoopEvent::Publish | LoopEvent::PublishFailed(_) => {}
                }
            }
            Err(LinkError::Failed("session event loop ended".into()))
        })
        .await;
        match activated {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(LinkError::Failed(format!(
                    "session not activated within connect_timeout ({timeout:?})"
                )));
            }
        }

        let setup = tokio::time::timeout(
            timeout + Duration::from_millis(50) * (self.nodes.len() as u32 / 100),
            self.set_up(&session, feed, status, generation),
        );
        let live = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                close(&session, driver).await;
                return Ok(());
            }
            ev = wait_lost(&mut events) => return Err(ev),
            // A failed set-up closes its session: a server keeps an
            // abandoned one until it times out, and a source that fails
            // set-up on every attempt would use up the server's sessions
            // (BadTooManySessions, for every client of that server).
            r = setup => match r {
                Ok(Ok(live)) => live,
                Ok(Err(e)) => {
                    close(&session, driver).await;
                    return Err(e);
                }
                Err(_) => {
                    close(&session, driver).await;
                    return Err(LinkError::Failed(format!(
                        "subscription set-up not finished within {timeout:?}"
                    )));
                }
            },
        };
        status.connected.store(true, Ordering::Relaxed);
        publish_bad_nodes(status, &live);
        info!(
            source = %self.name,
            generation,
            subscription = live.subscription_id,
            monitored = self.nodes.len() - live.bad.len(),
            refused = live.bad.len(),
            publishing_interval_ms = live.publishing_interval.as_millis() as u64,
            keep_alive_count = live.keep_alive_count,
            setup_ms = t0.elapsed().as_millis() as u64,
            "OPC UA session up, subscription created, resync snapshot taken"
        );
        self.watch(session, driver, events, live, feed, status, shutdown)
            .await
    }

    /// Watches a live session until it is lost, goes silent, or shutdown.
    #[allow(clippy::too_many_arguments)]
    async fn watch(
        &self,
        session: Arc<Session>,
        driver: Driver,
        mut events: mpsc::UnboundedReceiver<LoopEvent>,
        mut live: Live,
        feed: &Feed,
        status: &SourceStatus,
        shutdown: &CancellationToken,
    ) -> Result<(), LinkError> {
        let window = watchdog_window(live.publishing_interval, live.keep_alive_count);
        let warnings = WarnLimiter::default();
        let mut last_publish = Instant::now();
        let mut last_failure: Option<StatusCode> = None;
        let mut tick = tokio::time::interval(
            (window / 10).clamp(Duration::from_millis(20), Duration::from_millis(500)),
        );
        let mut retry =
            tokio::time::interval_at(tokio::time::Instant::now() + NODE_RETRY, NODE_RETRY);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    close(&session, driver).await;
                    return Ok(());
                }
                ev = events.recv() => match ev {
                    Some(LoopEvent::Publish) => {
                        last_publish = Instant::now();
                        last_failure = None;
                    }
                    Some(LoopEvent::PublishFailed(code)) => {
                        if code == StatusCode::BadResponseTooLarge {
                            // The server dropped a notification message it
                            // could not send: those data changes are lost.
                            // Up to once a publishing interval: limited.
                            if let Some(suppressed) = warnings.check("response_too_large") {
                                warn!(
                                    source = %self.name,
                                    status = %code,
                                    max_notifications_per_publish = MAX_NOTIFICATIONS_PER_PUBLISH,
                                    suppressed_since_last_warning = suppressed,
                                    "the server could not send a publish response within its max message size; the data changes in it are lost — raise the server's max message size"
                                );
                            }
                            status.record_error(format!(
                                "{}: publish response too large for the server's max message size ({code}); data changes were lost",
                                self.cfg.endpoint
                            ));
                        } else {
                            debug!(source = %self.name, status = %code, "publish request failed");
                        }
                        last_failure = Some(code);
                    }
                    Some(LoopEvent::Connected) => {}
                    Some(LoopEvent::Lost(code)) | Some(LoopEvent::Ended(code)) => {
                        driver.abort();
                        return Err(LinkError::Failed(format!("connection lost: {code}")));
                    }
                    None => {
                        driver.abort();
                        return Err(LinkError::Failed("session event loop ended".into()));
                    }
                },
                _ = tick.tick() => {
                    if feed.is_closed() {
                        driver.abort();
                        return Err(LinkError::JournalClosed);
                    }
                    let silent = last_publish.elapsed();
                    if silent > window {
                        driver.abort();
                        let why = last_failure
                            .map(|code| format!(" (last publish error: {code})"))
                            .unwrap_or_default();
                        return Err(LinkError::Silent(silent, why));
                    }
                    if live.health.take_changed() {
                        publish_bad_nodes(status, &live);
                    }
                }
                _ = retry.tick(), if !live.bad.is_empty() => {
                    self.retry_bad(&session, &mut live).await;
                    publish_bad_nodes(status, &live);
                }
            }
        }
    }
}

/// Closes the session gracefully (bounded), then stops the driver.
async fn close(session: &Arc<Session>, driver: Driver) {
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    driver.abort();
}

/// Waits until the event loop reports the connection gone.
async fn wait_lost(events: &mut mpsc::UnboundedReceiver<LoopEvent>) -> LinkError {
    loop {
        match events.recv().await {
            Some(LoopEvent::Lost(code)) | Some(LoopEvent::Ended(code)) => {
                return LinkError::Failed(format!("connection lost during set-up: {code}"));
            }
            Some(_) => {}
            None => return LinkError::Failed("session event loop ended during set-up".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_window_follows_the_servers_revised_values() {
        // 200 ms × 10: 2 s of keep-alive, two intervals, and 1 s (half the
        // window, longer than the slack).
        let w = watchdog_window(Duration::from_millis(200), 10);
        assert_eq!(w, Duration::from_millis(2000 + 400 + 1000));
        // 100 ms × 3: the slack is the longer of the two.
        let w = watchdog_window(Duration::from_millis(100), 3);
        assert_eq!(w, Duration::from_millis(300 + 200 + 500));
        // A count of 0 counts as 1.
        let w = watchdog_window(Duration::from_secs(1), 0);
        assert_eq!(w, Duration::from_millis(1000 + 2000 + 500));
    }

    #[test]
    fn a_servers_absurd_revision_saturates_instead_of_panicking() {
        // What async-opcua makes of a revised interval of 1e300 ms.
        let huge = Duration::from_millis(u64::MAX);
        for count in [0, 1, 3, 1000] {
            assert!(watchdog_window(huge, count) > huge * 3, "count {count}");
        }
        for count in [1001, u32::MAX] {
            assert_eq!(watchdog_window(huge, count), Duration::MAX, "count {count}");
        }
        // Each product fits and only the sums overflow.
        let w = watchdog_window(Duration::from_secs(u64::MAX / 3), 2);
        assert_eq!(w, Duration::MAX);
        // 10^13 ms × u32::MAX overflows the product itself.
        let w = watchdog_window(Duration::from_millis(10_000_000_000_000), u32::MAX);
        assert_eq!(w, Duration::MAX);
    }
}
