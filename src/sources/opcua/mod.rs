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
//! The resync Read and CreateMonitoredItems go out in batches of [`CHUNK`]
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

mod mapping;
mod nodes;
pub mod pki;
mod queue;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use opcua::client::{
    Client, ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore,
    Session, SessionPollResult, SubscriptionActivity,
};
use opcua::crypto::SecurityPolicy as UaPolicy;
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DataValue,
    DeadbandType, EndpointDescription, ExtensionObject, MessageSecurityMode,
    MonitoredItemCreateRequest, NodeId, NotificationMessage, ReadValueId, StatusCode,
    TimestampsToReturn, Variant,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use mapping::{DATA_CHANGE_EVENT_TYPE, Mapper, NodeMeta, event_id, variant_json};
pub use nodes::{NodeRef, parse_node_id};

use crate::config::{Deadband, OpcuaSourceConfig, SecurityMode, SecurityPolicy, read_secret};
use crate::event::NewEvent;
use crate::journal::{AppendOutcome, Journal, JournalError};
use crate::status::SourceStatus;

/// Most data changes in one journal append.
pub const BATCH_MAX: usize = 2000;
use super::reconnect::Backoff;
pub use super::reconnect::{BACKOFF_INITIAL, BACKOFF_MAX, STABLE_AFTER};
/// Added to the keep-alive window before the publish watchdog fires.
pub const WATCHDOG_SLACK: Duration = Duration::from_millis(500);
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
/// Most nodes in one Read or CreateMonitoredItems request; less when the
/// server's OperationLimits say so (see [`Batches`]).
const CHUNK: usize = 500;
/// `Server_ServerCapabilities_OperationLimits_MaxNodesPerRead`.
const MAX_NODES_PER_READ: u32 = 11705;
/// `Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall`.
const MAX_MONITORED_ITEMS_PER_CALL: u32 = 11714;

/// How many nodes go into one request on this session: [`CHUNK`], or less
/// where the server's OperationLimits are lower (a server answers a larger
/// call with `BadTooManyOperations` as a whole, and set-up would fail on
/// every reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batches {
    /// Nodes per resync Read (two attributes each).
    read_nodes: usize,
    /// Items per CreateMonitoredItems.
    create_items: usize,
}

impl Batches {
    /// From the values of MaxNodesPerRead and MaxMonitoredItemsPerCall
    /// (0, missing or unreadable: no limit).
    fn from_limits(max_nodes_per_read: Option<u32>, max_items_per_call: Option<u32>) -> Batches {
        let limit = |v: Option<u32>| match v {
            Some(n) if n > 0 => (n as usize).min(CHUNK),
            _ => CHUNK,
        };
        Batches {
            // Each node is read with two attributes (Value, DisplayName).
            read_nodes: match max_nodes_per_read {
                Some(n) if n > 0 => ((n / 2) as usize).clamp(1, CHUNK),
                _ => CHUNK,
            },
            create_items: limit(max_items_per_call),
        }
    }
}

/// Why an OPC UA source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
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

use self::queue::Item;

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
    ) -> Result<OpcuaSource, SourceError> {
        let name = cfg.name.clone();
        let identity = match (
            &cfg.username,
            &cfg.password_file,
            &cfg.user_cert,
            &cfg.user_key,
        ) {
            (Some(user), password, _, _) => {
                let password = match password {
                    Some(path) => read_secret(path).map_err(|source| SourceError::Password {
                        name: name.clone(),
                        source,
                    })?,
                    None => String::new(),
                };
                IdentityToken::new_user_name(user.clone(), password)
            }
            (None, _, Some(cert), Some(key)) => {
                user_identity_cert(cert, key).map_err(|detail| SourceError::UserCert {
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
                nodes::NodeSpec::new(n).map_err(|detail| SourceError::Node {
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
    ) -> Result<(), SourceError> {
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
    ) -> Result<(), SourceError> {
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
        let mut backoff = Backoff::new();
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
                    break Err(SourceError::JournalClosed {
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    if started.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                    let wait = backoff.delay();
                    let message = format!("{}: {e}", self.cfg.endpoint);
                    warn!(source = %self.name, error = %message, retry_in_ms = wait.as_millis() as u64, "OPC UA connection failed or lost; reconnecting");
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

    /// The client: application instance certificate (created on first
    /// run), trust store, timeouts. async-opcua's own reconnect is off.
    fn client(&self) -> Result<Client, SourceError> {
        pki::ensure_layout(&self.pki_dir).map_err(|detail| SourceError::Pki {
            name: self.name.clone(),
            path: self.pki_dir.clone(),
            detail,
        })?;
        let window = self.cfg.publishing_interval * self.cfg.keep_alive_count;
        let request_timeout = self.cfg.connect_timeout;
        let client = ClientBuilder::new()
            .application_name(format!("plantrelay {}", self.name))
            .application_uri(self.app_uri.clone())
            .product_uri("urn:plantrelay")
            .pki_dir(self.pki_dir.clone())
            .create_sample_keypair(true)
            .trust_server_certs(self.cfg.trust_unknown_server)
            .verify_server_certs(true)
            .session_retry_limit(0)
            .recreate_subscriptions(false)
            .session_timeout(
                u32::try_from((window * 4).max(Duration::from_secs(60)).as_millis())
                    .unwrap_or(u32::MAX),
            )
            .keep_alive_interval(window.max(Duration::from_secs(1)))
            .max_failed_keep_alive_count(2)
            .request_timeout(request_timeout)
            .publish_timeout(window * 2 + request_timeout)
            .min_publish_interval(Duration::from_millis(10))
            .channel_lifetime(600_000)
            // A publish response carries up to MAX_NOTIFICATIONS_PER_PUBLISH
            // values: the default decoding limits (1,000 array elements)
            // would turn a busy subscription into BadDecodingError.
            .max_array_length(MAX_NOTIFICATIONS_PER_PUBLISH as usize * 2 + 10_000)
            .max_message_size(64 << 20)
            .max_chunk_count(4096)
            .session_name(format!("plantrelay {}", self.name))
            .client()
            .map_err(|errors| SourceError::Client {
                name: self.name.clone(),
                detail: errors.join("; "),
            })?;
        pki::restrict_private_key(&self.pki_dir);
        Ok(client)
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

    /// Chooses the server endpoint with the configured policy and mode.
    fn pick_endpoint(
        &self,
        url: &str,
        endpoints: &[EndpointDescription],
    ) -> Result<EndpointDescription, LinkError> {
        let policy = ua_policy(self.cfg.security_policy);
        let mode = ua_mode(self.cfg.security_mode);
        // Matched on policy and mode only, and then connected at the
        // configured URL: servers behind NAT or a port forward advertise
        // addresses the agent cannot reach.
        let found = endpoints.iter().find(|e| {
            e.security_mode == mode && UaPolicy::from_uri(e.security_policy_uri.as_ref()) == policy
        });
        if let Some(e) = found {
            let mut e = e.clone();
            e.endpoint_url = url.into();
            return Ok(e);
        }
        let offered = endpoints
            .iter()
            .map(|e| {
                format!(
                    "{} {:?}",
                    e.security_policy_uri
                        .as_ref()
                        .rsplit('#')
                        .next()
                        .unwrap_or_default(),
                    e.security_mode
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(LinkError::Failed(format!(
            "the server offers no endpoint with security_policy \"{}\" and security_mode \"{}\" (it offers: {offered})",
            self.cfg.security_policy, self.cfg.security_mode
        )))
    }

    /// Applies `server_cert_sha256`: a pinned certificate is placed in
    /// `trusted/`; any other certificate is refused before a session is
    /// attempted. Without a pin the library's trust list decides.
    fn check_server_cert(
        &self,
        client: &Client,
        ep: &EndpointDescription,
    ) -> Result<(), LinkError> {
        if self.cfg.security_policy == SecurityPolicy::None {
            return Ok(());
        }
        let Some(pin) = &self.cfg.server_cert_sha256 else {
            return Ok(());
        };
        let der =
            ep.server_certificate.value.as_deref().ok_or_else(|| {
                LinkError::Failed("the server endpoint has no certificate".into())
            })?;
        let fingerprint = pki::sha256_hex(der);
        if !pki::fingerprint_eq(pin, &fingerprint) {
            let _ = pki::store_rejected(&self.pki_dir, der);
            return Err(LinkError::Failed(format!(
                "server certificate SHA-256 {fingerprint} does not match server_cert_sha256 {pin}; refused"
            )));
        }
        let _ = client;
        pki::store_trusted(&self.pki_dir, der).map_err(|e| {
            LinkError::Failed(format!("cannot store the pinned server certificate: {e}"))
        })?;
        Ok(())
    }

    /// Namespaces, snapshot, subscription and monitored items.
    async fn set_up(
        &self,
        session: &Arc<Session>,
        feed: &Feed,
        status: &Arc<SourceStatus>,
        generation: u64,
    ) -> Result<Live, LinkError> {
        let ns = session
            .read_namespace_array()
            .await
            .map_err(|e| LinkError::Failed(format!("reading the server's NamespaceArray: {e}")))?;
        let mut bad: Vec<BadNode> = Vec::new();
        let mut resolved: Vec<(usize, NodeId)> = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            match n.resolve(&ns) {
                Ok(id) => resolved.push((i, id)),
                Err(detail) => bad.push(BadNode {
                    index: i,
                    status: detail,
                }),
            }
        }

        // Resync snapshot (and display names) before the subscription: the
        // subscription's initial values then come after it in the journal.
        let batches = self.batches(session).await;
        let mut names = Vec::new();
        let mut snapshot = Vec::new();
        for chunk in resolved.chunks(batches.read_nodes) {
            let ids: Vec<ReadValueId> = chunk
                .iter()
                .flat_map(|(_, id)| {
                    [
                        read_id(id, AttributeId::Value),
                        read_id(id, AttributeId::DisplayName),
                    ]
                })
                .collect();
            let values = session
                .read(&ids, TimestampsToReturn::Both, 0.0)
                .await
                .map_err(|e| LinkError::Failed(format!("resync read: {e}")))?;
            for ((index, _), pair) in chunk.iter().zip(values.chunks(2)) {
                let [value, name] = pair else { continue };
                if let Some(Variant::LocalizedText(t)) = &name.value {
                    names.push((*index, t.text.to_string()));
                }
                let code = value.status.unwrap_or(StatusCode::Good);
                if code.is_bad() {
                    bad.push(BadNode {
                        index: *index,
                        status: code.to_string(),
                    });
                } else {
                    snapshot.push((*index, value.clone()));
                }
            }
        }
        feed.names(names);
        let snapshot_len = snapshot.len();
        feed.changes(snapshot, true);
        debug!(source = %self.name, generation, values = snapshot_len, "resync snapshot read");

        let health = Arc::new(NodeHealth::default());
        // Node ids by index, for logs and status: one list for the callback
        // and the watch loop.
        let names_of: Arc<[String]> = self.nodes.iter().map(|n| n.meta.node_id.clone()).collect();
        let callback = Notifications {
            source: self.name.clone(),
            feed: feed.clone(),
            health: health.clone(),
            names_of: names_of.clone(),
            status: status.clone(),
            last_sequence: 0,
        };
        let subscription_id = session
            .create_subscription(
                self.cfg.publishing_interval,
                self.cfg.lifetime_count,
                self.cfg.keep_alive_count,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                callback,
            )
            .await
            .map_err(|e| LinkError::Failed(format!("CreateSubscription: {e}")))?;
        let (publishing_interval, keep_alive_count) = {
            let state = session.subscription_state.lock();
            state
                .get(subscription_id)
                .map(|s| (s.publishing_interval(), s.max_keep_alive_count()))
                .unwrap_or((self.cfg.publishing_interval, self.cfg.keep_alive_count))
        };
        let already_bad: Vec<usize> = bad.iter().map(|b| b.index).collect();
        let to_create: Vec<(usize, NodeId)> = resolved
            .into_iter()
            .filter(|(i, _)| !already_bad.contains(i))
            .collect();
        bad.extend(
            self.create_items(session, subscription_id, &to_create, batches)
                .await?,
        );
        bad.sort_by_key(|b| b.index);
        bad.dedup_by_key(|b| b.index);
        Ok(Live {
            subscription_id,
            publishing_interval,
            keep_alive_count,
            bad,
            batches,
            health,
            names_of,
        })
    }

    /// The server's operation limits for this session's request sizes.
    async fn batches(&self, session: &Arc<Session>) -> Batches {
        let ids = [
            read_id(&NodeId::new(0, MAX_NODES_PER_READ), AttributeId::Value),
            read_id(
                &NodeId::new(0, MAX_MONITORED_ITEMS_PER_CALL),
                AttributeId::Value,
            ),
        ];
        let values = match session.read(&ids, TimestampsToReturn::Neither, 0.0).await {
            Ok(v) => v,
            Err(e) => {
                debug!(source = %self.name, error = %e, "OperationLimits not readable; default request sizes");
                Vec::new()
            }
        };
        let value = |i: usize| match values.get(i).and_then(|v| v.value.as_ref()) {
            Some(Variant::UInt32(n)) => Some(*n),
            _ => None,
        };
        let batches = Batches::from_limits(value(0), value(1));
        debug!(
            source = %self.name,
            max_nodes_per_read = ?value(0),
            max_monitored_items_per_call = ?value(1),
            read_nodes = batches.read_nodes,
            create_items = batches.create_items,
            "request sizes from the server's OperationLimits"
        );
        batches
    }

    /// Creates monitored items; returns the nodes the server refused.
    async fn create_items(
        &self,
        session: &Arc<Session>,
        subscription_id: u32,
        items: &[(usize, NodeId)],
        batches: Batches,
    ) -> Result<Vec<BadNode>, LinkError> {
        let mut bad = Vec::new();
        for chunk in items.chunks(batches.create_items) {
            let requests: Vec<MonitoredItemCreateRequest> = chunk
                .iter()
                .map(|(i, id)| self.nodes[*i].request(*i, id.clone()))
                .collect();
            let results = session
                .create_monitored_items(subscription_id, TimestampsToReturn::Both, requests)
                .await
                .map_err(|e| LinkError::Failed(format!("CreateMonitoredItems: {e}")))?;
            for ((index, _), r) in chunk.iter().zip(&results) {
                if r.result.status_code.is_bad() {
                    bad.push(BadNode {
                        index: *index,
                        status: r.result.status_code.to_string(),
                    });
                }
            }
        }
        Ok(bad)
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
        let keep_alive = live.publishing_interval * live.keep_alive_count.max(1);
        let window = keep_alive + live.publishing_interval * 2 + WATCHDOG_SLACK.max(keep_alive / 2);
        let mut last_publish = Instant::now();
        let mut last_failure: Option<StatusCode> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(
            (window.as_millis() as u64 / 10).clamp(20, 500),
        ));
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
                            warn!(
                                source = %self.name,
                                status = %code,
                                max_notifications_per_publish = MAX_NOTIFICATIONS_PER_PUBLISH,
                                "the server could not send a publish response within its max message size; the data changes in it are lost — raise the server's max message size"
                            );
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

    /// Tries the refused nodes again on the live session.
    async fn retry_bad(&self, session: &Arc<Session>, live: &mut Live) {
        let ns = match session.read_namespace_array().await {
            Ok(ns) => ns,
            Err(e) => {
                debug!(source = %self.name, error = %e, "namespace array read for the node retry failed");
                return;
            }
        };
        let mut still = Vec::new();
        let mut items = Vec::new();
        for b in live.bad.drain(..) {
            match self.nodes[b.index].resolve(&ns) {
                Ok(id) => items.push((b.index, id)),
                Err(status) => still.push(BadNode {
                    index: b.index,
                    status,
                }),
            }
        }
        match self
            .create_items(session, live.subscription_id, &items, live.batches)
            .await
        {
            Ok(refused) => {
                let refused_idx: Vec<usize> = refused.iter().map(|b| b.index).collect();
                for (i, _) in items.iter().filter(|(i, _)| !refused_idx.contains(i)) {
                    info!(source = %self.name, node = %live.names_of[*i], "node is monitored again");
                }
                still.extend(refused);
            }
            Err(e) => {
                debug!(source = %self.name, error = %e, "node retry failed");
                still.extend(items.into_iter().map(|(index, _)| BadNode {
                    index,
                    status: "retry failed".into(),
                }));
            }
        }
        for b in &still {
            debug!(source = %self.name, node = %live.names_of[b.index], status = %b.status, "node still refused; retrying later");
        }
        live.bad = still;
    }
}

/// Shows the nodes not monitored right now in the source status: those the
/// server refused (retried) and those whose latest data change on the live
/// subscription had a bad status (until a good one arrives).
fn publish_bad_nodes(status: &SourceStatus, live: &Live) {
    let mut bad: Vec<(usize, String)> = live
        .bad
        .iter()
        .map(|b| (b.index, b.status.clone()))
        .collect();
    for (index, code) in live.health.bad() {
        if !bad.iter().any(|(i, _)| *i == index) {
            bad.push((index, code));
        }
    }
    bad.sort_by_key(|(i, _)| *i);
    status.set_bad_nodes(
        bad.into_iter()
            .filter_map(|(i, code)| live.names_of.get(i).map(|n| (n.clone(), code)))
            .collect(),
    );
}

/// Nodes whose latest data change on the live subscription had a bad status
/// (index → status name), shared by the subscription callback (writer) and
/// the watch loop (which publishes it).
#[derive(Debug, Default)]
struct NodeHealth {
    bad: std::sync::Mutex<std::collections::BTreeMap<usize, String>>,
    changed: std::sync::atomic::AtomicBool,
}

impl NodeHealth {
    /// Records the status of a node's latest data change; true when the
    /// node's state (good, or which bad status) changed.
    fn record(&self, index: usize, code: StatusCode) -> bool {
        let Ok(mut bad) = self.bad.lock() else {
            return false;
        };
        let changed = if code.is_bad() {
            let name = code.to_string();
            bad.insert(index, name.clone()).as_ref() != Some(&name)
        } else {
            bad.remove(&index).is_some()
        };
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
        changed
    }

    /// Whether the set changed since the last call.
    fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }

    fn bad(&self) -> Vec<(usize, String)> {
        self.bad
            .lock()
            .map(|b| b.iter().map(|(i, s)| (*i, s.clone())).collect())
            .unwrap_or_default()
    }
}

/// A node the server refused (or whose namespace it lacks), and why.
#[derive(Debug, Clone)]
struct BadNode {
    index: usize,
    status: String,
}

/// A live session's subscription.
struct Live {
    subscription_id: u32,
    publishing_interval: Duration,
    keep_alive_count: u32,
    /// Nodes the server refused or that could not be resolved (retried).
    bad: Vec<BadNode>,
    /// Request sizes the server allows.
    batches: Batches,
    /// Monitored nodes whose latest value is bad.
    health: Arc<NodeHealth>,
    names_of: Arc<[String]>,
}

fn read_id(id: &NodeId, attribute: AttributeId) -> ReadValueId {
    ReadValueId {
        node_id: id.clone(),
        attribute_id: attribute as u32,
        ..Default::default()
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

/// The X.509 user identity: the certificate as PEM or DER whatever the file
/// is called (async-opcua's own loader goes by the extension and refuses
/// `.crt`), the private key as PEM.
fn user_identity_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<IdentityToken, String> {
    let bytes = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let x509 = opcua::crypto::X509::from_pem(&bytes)
        .or_else(|_| opcua::crypto::X509::from_der(&bytes))
        .map_err(|e| {
            format!(
                "{}: not a PEM or DER X.509 certificate: {e:?}",
                cert.display()
            )
        })?;
    let key = opcua::crypto::PrivateKey::read_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key: {e:?}", key.display()))?;
    Ok(IdentityToken::new_x509(x509, key))
}

/// A readable reason for a failed activation, with the trust and identity
/// hints.
fn connect_failure(code: StatusCode, pki_dir: &std::path::Path) -> String {
    if matches!(
        code,
        StatusCode::BadIdentityTokenRejected
            | StatusCode::BadIdentityTokenInvalid
            | StatusCode::BadUserAccessDenied
            | StatusCode::BadUserSignatureInvalid
    ) {
        return format!(
            "session activation failed: {code}: the server refused the user identity — check username and password_file, or user_cert and user_key, and the user's rights on the server"
        );
    }
    if code == StatusCode::BadCertificateUntrusted || code == StatusCode::BadSecurityChecksFailed {
        format!(
            "{code}: the server certificate is not trusted; it was stored in {} — check its fingerprint, then run `plantrelay opcua trust` (or move it to trusted/), or pin it with server_cert_sha256",
            pki_dir.join("rejected").display()
        )
    } else {
        format!("session activation failed: {code}")
    }
}

fn ua_policy(p: SecurityPolicy) -> UaPolicy {
    match p {
        SecurityPolicy::None => UaPolicy::None,
        SecurityPolicy::Basic256Sha256 => UaPolicy::Basic256Sha256,
        SecurityPolicy::Aes128Sha256RsaOaep => UaPolicy::Aes128Sha256RsaOaep,
        SecurityPolicy::Aes256Sha256RsaPss => UaPolicy::Aes256Sha256RsaPss,
    }
}

fn ua_mode(m: SecurityMode) -> MessageSecurityMode {
    match m {
        SecurityMode::None => MessageSecurityMode::None,
        SecurityMode::Sign => MessageSecurityMode::Sign,
        SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}

/// The data-change filter of a node's deadband (none without one).
fn deadband_filter(deadband: Option<Deadband>) -> ExtensionObject {
    let (kind, value) = match deadband {
        None => return ExtensionObject::null(),
        Some(Deadband::Absolute(v)) => (DeadbandType::Absolute, v),
        Some(Deadband::Percent(v)) => (DeadbandType::Percent, v),
    };
    ExtensionObject::from_message(DataChangeFilter {
        trigger: DataChangeTrigger::StatusValue,
        deadband_type: kind as u32,
        deadband_value: value,
    })
}

/// What the event loop driver reports.
#[derive(Debug)]
enum LoopEvent {
    Connected,
    Publish,
    PublishFailed(StatusCode),
    Lost(StatusCode),
    Ended(StatusCode),
}

/// The task that polls async-opcua's session event loop.
struct Driver {
    task: JoinHandle<()>,
}

impl Driver {
    fn spawn<T>(
        event_loop: opcua::client::SessionEventLoop<T>,
        tx: mpsc::UnboundedSender<LoopEvent>,
    ) -> Driver
    where
        T: opcua::client::transport::Connector + Send + Sync + 'static,
    {
        use futures_util::StreamExt as _;
        let task = tokio::spawn(async move {
            let stream = event_loop.enter();
            let mut stream = std::pin::pin!(stream);
            loop {
                let ev = match stream.next().await {
                    None => LoopEvent::Ended(StatusCode::BadConnectionClosed),
                    Some(Err(code)) => LoopEvent::Ended(code),
                    Some(Ok(SessionPollResult::Reconnected(_))) => LoopEvent::Connected,
                    Some(Ok(SessionPollResult::ConnectionLost(code))) => LoopEvent::Lost(code),
                    Some(Ok(SessionPollResult::ReconnectFailed(code))) => LoopEvent::Lost(code),
                    Some(Ok(SessionPollResult::Subscription(SubscriptionActivity::Publish))) => {
                        LoopEvent::Publish
                    }
                    Some(Ok(SessionPollResult::Subscription(
                        SubscriptionActivity::PublishFailed(code),
                    ))) => LoopEvent::PublishFailed(code),
                    Some(Ok(SessionPollResult::Subscription(
                        SubscriptionActivity::FatalFailure(code),
                    ))) => LoopEvent::Lost(code),
                    Some(Ok(_)) => continue,
                };
                let end = matches!(ev, LoopEvent::Ended(_) | LoopEvent::Lost(_));
                if tx.send(ev).is_err() || end {
                    return;
                }
            }
        });
        Driver { task }
    }

    fn abort(self) {
        drop(self);
    }
}

impl Drop for Driver {
    /// The event loop owns the connection: a generation that ends in any
    /// way (including being dropped) ends its connection.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The subscription callback: hands every data change to the appender,
/// tracks which nodes currently report a bad status, and notices
/// notification messages the server sent but the client never got.
struct Notifications {
    source: String,
    feed: Feed,
    health: Arc<NodeHealth>,
    names_of: Arc<[String]>,
    status: Arc<SourceStatus>,
    /// Sequence number of the last data notification message (0: none yet;
    /// the server numbers them from 1).
    last_sequence: u32,
}

impl Notifications {
    /// A keep-alive carries the sequence number of the next data message, a
    /// data message its own: either one above `last_sequence + 1` means
    /// messages were lost (e.g. a response the server could not send).
    fn check_sequence(&mut self, sequence: u32, keep_alive: bool) {
        let expected = self.last_sequence.wrapping_add(1);
        if sequence > expected {
            let lost = sequence - expected;
            warn!(
                source = %self.source,
                lost_messages = lost,
                first_missing = expected,
                "OPC UA notification messages were lost between server and agent; the data changes in them are missing from the journal"
            );
            self.status.record_error(format!(
                "{lost} notification message(s) from sequence number {expected} never arrived; their data changes are missing"
            ));
        }
        // A lower number is a wrap-around (or a late message): follow it.
        self.last_sequence = if keep_alive {
            sequence.wrapping_sub(1)
        } else {
            sequence
        };
    }
}

impl OnSubscriptionNotificationCore for Notifications {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _monitored_items: MonitoredItemMap<'_>,
    ) {
        let Some(data) = notification.notification_data else {
            self.check_sequence(notification.sequence_number, true);
            return;
        };
        self.check_sequence(notification.sequence_number, false);
        for obj in data {
            let Some(change) = obj.into_inner_as::<DataChangeNotification>() else {
                continue;
            };
            for n in change.monitored_items.into_iter().flatten() {
                // Client handles are node index + 1 (see NodeSpec::request).
                let Some(index) = (n.client_handle as usize).checked_sub(1) else {
                    continue;
                };
                let code = n.value.status.unwrap_or(StatusCode::Good);
                if self.health.record(index, code) {
                    let node = self.names_of.get(index).map(String::as_str).unwrap_or("?");
                    if code.is_bad() {
                        warn!(source = %self.source, node, status = %code, "node reports a bad status; listed in bad_nodes until a good value arrives");
                    } else {
                        info!(source = %self.source, node, status = %code, "node reports good values again");
                    }
                }
                self.feed.changes([(index, n.value)], false);
            }
        }
    }
}

/// Appends data changes to the journal in arrival order.
struct Appender {
    name: String,
    journal: Journal,
    mapper: Mapper,
    nodes: Vec<NodeMeta>,
    names: Vec<String>,
    status: Arc<SourceStatus>,
}

impl Appender {
    async fn run(mut self, mut rx: queue::Receiver) -> Result<(), SourceError> {
        let mut items = Vec::with_capacity(256);
        let mut batch: Vec<(usize, DataValue, bool)> = Vec::with_capacity(BATCH_MAX);
        while rx.recv_many(&mut items, 256).await > 0 {
            for item in items.drain(..) {
                match item {
                    Item::Names(names) => {
                        // Names apply to what comes after them: store what
                        // came before first.
                        self.commit(&mut batch).await?;
                        for (i, name) in names {
                            if let Some(slot) = self.names.get_mut(i) {
                                *slot = name;
                            }
                        }
                    }
                    Item::Change {
                        index,
                        value,
                        resync,
                    } => batch.push((index, value, resync)),
                }
                if batch.len() >= BATCH_MAX {
                    self.commit(&mut batch).await?;
                }
            }
            self.commit(&mut batch).await?;
        }
        Ok(())
    }

    /// Maps and appends the batch (retrying until the journal takes it),
    /// counts, and empties it.
    async fn commit(
        &mut self,
        batch: &mut Vec<(usize, DataValue, bool)>,
    ) -> Result<(), SourceError> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        let mut attempt = 0u32;
        loop {
            let events: Vec<NewEvent> = batch
                .iter()
                .filter_map(|(index, value, resync)| {
                    let node = self.nodes.get(*index)?;
                    Some(self.mapper.map(node, &self.names[*index], value, *resync))
                })
                .collect();
            let mapped = events.len() as u64;
            match self.journal.append(events).await {
                Ok(outcomes) => {
                    let duplicates = outcomes
                        .iter()
                        .filter(|o| matches!(o, AppendOutcome::Duplicate { .. }))
                        .count() as u64;
                    self.status.record_events(mapped - duplicates, duplicates);
                    if attempt > 0 {
                        info!(source = %self.name, attempts = attempt + 1, "journal append succeeded again");
                    }
                    batch.clear();
                    return Ok(());
                }
                Err(JournalError::Closed) => {
                    return Err(SourceError::JournalClosed {
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    attempt += 1;
                    let message = e.to_string();
                    if attempt == 1 || attempt.is_multiple_of(50) {
                        warn!(source = %self.name, error = %message, events = n, attempt, "journal append failed; data changes are held in memory and the append is retried");
                    }
                    self.status.record_error(message);
                    tokio::time::sleep(super::append_retry_delay(&e, attempt)).await;
                }
            }
        }
    }
}

fn appender_result(
    name: &str,
    r: Result<Result<(), SourceError>, tokio::task::JoinError>,
) -> Result<(), SourceError> {
    match r {
        Ok(r) => r,
        Err(e) => Err(SourceError::Client {
            name: name.to_owned(),
            detail: format!("the appender task failed: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_sizes_follow_the_server_operation_limits() {
        let none = Batches::from_limits(None, None);
        assert_eq!((none.read_nodes, none.create_items), (CHUNK, CHUNK));
        let zero = Batches::from_limits(Some(0), Some(0));
        assert_eq!(zero, none, "0 means no limit");
        let small = Batches::from_limits(Some(150), Some(100));
        assert_eq!((small.read_nodes, small.create_items), (75, 100));
        let large = Batches::from_limits(Some(100_000), Some(100_000));
        assert_eq!(large, none);
    }
}
