//! The forwarder loop, written once for every sink, and the sinks.
//!
//! A forwarder reads the journal after its sink's cursor, in batches, with
//! **one batch in flight** so order holds, and moves the cursor only past
//! what the upstream acknowledged. Failures are retried with capped
//! exponential backoff and full jitter (honouring the upstream's
//! `Retry-After`); a batch the upstream rejects is split until the poison
//! event stands alone, and that event is dead-lettered with the upstream's
//! reason while the rest continue in order. It wakes on the journal's commit
//! signal, never by polling.
//!
//! Under light traffic a batch smaller than `batch_max_events` lingers: it
//! waits until its oldest event is `batch_linger` old, or until enough new
//! events are committed to fill it (see [`linger`]). A full batch, and an
//! event already that old (a backlog after an outage), never wait, so a
//! drain runs at full speed; cursor writes follow batches and fall with
//! them.
//!
//! The bookkeeping is a plain state machine, [`core::Core`], tested without
//! I/O; [`Forwarder::run`] is the thin loop that does what it says. A
//! forwarder must never write to the journal except through
//! [`Journal::advance_delivered`] and [`Journal::dead_letter`], and never
//! skip an event without one of them.
//!
//! Every sink implements [`Sink`] and passes the sink conformance suite
//! (`tests/it/conformance/`): acknowledgement, partial acknowledgement,
//! retries with and without `Retry-After`, rejections with and without the
//! event named, timeouts, slowness and a panicking sink.
//!
//! - [`https`]: CloudEvents batches over HTTPS.
//! - [`mqtt`]: one publish per event into an upstream MQTT broker.
//! - [`jetstream`]: one publish per event into NATS JetStream, deduplicated
//!   by the server on the event id.
//!
//! Kept as one file: besides the [`Sink`] trait it is the forwarder, one
//! loop (`run`, `schedule`, `run_lane`) over each lane's [`core::Core`] whose
//! steps share the read-ahead and encoding state; split, that one control
//! flow would have to be followed across files.

pub mod core;
pub mod https;
pub mod jetstream;
pub mod mqtt;
pub mod oauth2;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use self::core::{
    Action, Advanced, Core, DEFAULT_BATCH_LINGER, ForwarderSettings, Now,
    PER_EVENT_BATCH_MAX_BYTES, Plan, RateLimiter, RetryBackoff, RetryPolicy, SendOutcome, Sent,
    Step, linger,
};
use crate::event::{Class, StoredEvent};
use crate::journal::{Committed, Journal, JournalError, Reader};
use crate::status::SinkStatus;
use crate::units::unix_micros;

/// One upstream. Implementations do I/O only; the forwarder decides.
pub trait Sink: Send + Sync + 'static {
    /// A batch in its wire form.
    type Encoded: Send + 'static;

    /// Turns a batch into its wire form (serialise, compress): CPU work
    /// without I/O. The forwarder calls it on a blocking thread, for the
    /// next batch while the previous one is upstream.
    fn encode(&self, batch: &[StoredEvent]) -> Self::Encoded;

    /// Sends one batch (non-empty, in seq order, `encoded` from
    /// [`Sink::encode`] of exactly these events) and reports the outcome.
    /// Must not panic, and should bound its own time (a request timeout).
    fn send(
        &self,
        batch: &[StoredEvent],
        encoded: Self::Encoded,
    ) -> impl Future<Output = SendOutcome> + Send;

    /// Opens the connection to the upstream, once before the first send;
    /// retried with backoff while it fails (`Err`: why, for the status).
    /// Sinks that connect per request keep the default.
    fn connect(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// Closes the connection cleanly (an MQTT DISCONNECT, a drained
    /// publisher) when the forwarder stops; nothing is in flight then.
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Events the upstream acknowledged as already held since start
    /// (JetStream's `duplicate: true`): re-sends after a retry or a
    /// restart that the server's deduplication dropped. Upstreams that do
    /// not say keep the default.
    fn upstream_duplicates(&self) -> u64 {
        0
    }

    /// The state of the sink's OAuth2 token, for the status; sinks without
    /// one keep the default.
    fn token_state(&self) -> Option<oauth2::TokenState> {
        None
    }
}

/// A sink built from its config, not yet running: what `agent::start`
/// holds for every configured sink, whatever its kind.
pub struct Component {
    pub settings: ForwarderSettings,
    /// `"https"`, `"mqtt"` or `"jetstream"` (status and metrics).
    pub kind: &'static str,
    start: Box<dyn FnOnce(Journal, Arc<SinkStatus>) -> Forwarding + Send>,
}

/// A forwarder waiting to be run until its shutdown token is cancelled.
type Forwarding =
    Box<dyn FnOnce(CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

impl Component {
    pub fn new<S: Sink>(kind: &'static str, settings: ForwarderSettings, sink: S) -> Component {
        let s = settings.clone();
        Component {
            settings,
            kind,
            start: Box::new(move |journal, status| {
                let fwd = Forwarder::new(s, sink, journal, status);
                Box::new(move |stop| Box::pin(fwd.run(stop)))
            }),
        }
    }

    /// The forwarder of this sink, to be run until `stop` is cancelled.
    pub fn run(
        self,
        journal: Journal,
        status: Arc<SinkStatus>,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        (self.start)(journal, status)(stop)
    }
}

/// Builds every configured sink, in the order of `Config::sink_names`
/// (HTTPS, then MQTT, then JetStream sinks). An error names the sink.
pub fn build(config: &crate::config::Config) -> Result<Vec<Component>, String> {
    use crate::config::SinkKeys;
    fn component<C: SinkKeys, S: Sink, E: std::fmt::Display>(
        cfg: &C,
        sink: Result<S, E>,
    ) -> Result<Component, String> {
        let sink = sink.map_err(|e| e.to_string())?;
        Ok(Component::new(C::KIND, ForwarderSettings::of(cfg), sink))
    }
    let agent = &config.agent.id;
    let sinks = &config.sinks;
    (sinks.https.iter())
        .map(|c| component(c, https::HttpsSink::new(c, agent)))
        .chain((sinks.mqtt.iter()).map(|c| component(c, mqtt::MqttSink::new(c, agent))))
        .chain(
            (sinks.jetstream.iter()).map(|c| component(c, jetstream::JetStreamSink::new(c, agent))),
        )
        .collect()
}

/// Drives one sink: the thin I/O loop around [`Core`].
pub struct Forwarder<S: Sink> {
    settings: ForwarderSettings,
    sink: Arc<S>,
    journal: Journal,
    status: Arc<SinkStatus>,
    /// An upstream that refuses everything (a changed API, a proxy that
    /// answers 400) rejects and dead-letters at network speed: its lines
    /// are limited to one a minute per kind; the dead letters table and
    /// the status keep every one.
    warnings: crate::warn_limit::WarnLimiter,
}

enum Wait {
    Work,
    Shutdown,
}

/// A batch read from the journal, with its wire form when it is not empty.
struct Prepared<E> {
    events: Vec<StoredEvent>,
    encoded: Option<E>,
    /// See [`crate::journal::Routed`].
    through: u64,
    more: bool,
}

type ReadTask<E> = tokio::task::JoinHandle<Result<Prepared<E>, JournalError>>;

/// The batch after the one upstream, read and encoded while it is there.
struct Ahead<E> {
    /// The seq it was read after: it is used only if the cursor got there.
    after: u64,
    evictions_at_read: u64,
    task: ReadTask<E>,
}

/// The wire form of the batch read last, for the seqs it holds: a part of
/// it (bisected, rate-limited, after a partial acknowledgement) is encoded
/// anew.
struct Encoded<E> {
    first: u64,
    last: u64,
    len: usize,
    body: E,
}

impl<S: Sink> Forwarder<S> {
    pub fn new(
        settings: ForwarderSettings,
        sink: S,
        journal: Journal,
        status: Arc<SinkStatus>,
    ) -> Forwarder<S> {
        Forwarder {
            settings,
            sink: Arc::new(sink),
            journal,
            status,
            warnings: Default::default(),
        }
    }

    fn lock_failed(&self) -> JournalError {
        JournalError::Sqlite {
            path: self.journal.path().to_path_buf(),
            detail: "reader lock poisoned".into(),
        }
    }

    /// Reads and encodes the next batch after `cursor` on a blocking thread
    /// (SQLite reads and compression do not belong on the async workers).
    fn spawn_read(
        &self,
        reader: &Arc<Mutex<Reader>>,
        cursor: u64,
        lane: Option<Class>,
    ) -> ReadTask<S::Encoded> {
        let reader = reader.clone();
        let sink = self.sink.clone();
        let (name, max_events, max_bytes) = (
            self.settings.name.clone(),
            self.settings.batch_max_events,
            self.settings.batch_max_bytes,
        );
        let filter = self.settings.streams.clone();
        // Enough rows for a full batch of a sink that takes 1 % of them,
        // within a read that stays short.
        let scan_limit = max_events.saturating_mul(100).clamp(10_000, 200_000);
        let poisoned = self.lock_failed();
        tokio::task::spawn_blocking(move || {
            let routed = {
                let reader = reader.lock().map_err(|_| poisoned)?;
                reader.read_routed(
                    cursor, &name, lane, &filter, max_events, max_bytes, scan_limit,
                )?
            };
            let events = routed.events;
            let encoded = (!events.is_empty()).then(|| sink.encode(&events));
            Ok(Prepared {
                events,
                encoded,
                through: routed.through,
                more: routed.more,
            })
        })
    }

    async fn join_read(
        &self,
        task: ReadTask<S::Encoded>,
    ) -> Result<Prepared<S::Encoded>, JournalError> {
        task.await.unwrap_or_else(|e| {
            Err(JournalError::Sqlite {
                path: self.journal.path().to_path_buf(),
                detail: format!("read task failed: {e}"),
            })
        })
    }

    /// Encodes a part of a batch on a blocking thread.
    async fn encode_part(&self, part: Vec<StoredEvent>) -> Option<S::Encoded> {
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || sink.encode(&part))
            .await
            .ok()
    }

    fn cursor(&self, reader: &Arc<Mutex<Reader>>, key: &str) -> Result<u64, JournalError> {
        match reader.lock() {
            Ok(r) => r.lane_cursor(key),
            Err(_) => Err(self.lock_failed()),
        }
    }

    fn record_error(&self, message: String) {
        self.status
            .update(|p| p.last_error = Some((now_us(), message)));
    }

    /// Connects the sink, retrying with backoff; false at shutdown.
    async fn connect(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = RetryBackoff::new(self.settings.retry);
        loop {
            let attempt = tokio::select! {
                r = self.sink.connect() => r,
                _ = shutdown.cancelled() => return false,
            };
            match attempt {
                Ok(()) => return true,
                Err(reason) => {
                    let delay = backoff.fail(None, rand::rng().random());
                    warn!(sink = %self.settings.name, reason = %reason, retry_in_ms = delay.as_millis() as u64, "cannot connect to the upstream; retrying");
                    self.status.update(|p| {
                        p.consecutive_failures += 1;
                        p.last_error = Some((now_us(), reason));
                    });
                    if let Wait::Shutdown = sleep_or_shutdown(delay, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Runs until `shutdown` is cancelled. A batch in flight at shutdown is
    /// finished (its acknowledgement stored), and a batch lingering is sent
    /// as it is; the caller bounds how long that may take.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.settings.name.clone();
        let reader = match self.journal.reader() {
            Ok(r) => Arc::new(Mutex::new(r)),
            Err(e) => {
                error!(sink = %name, error = %e, "forwarder cannot open a journal reader; not forwarding");
                self.record_error(e.to_string());
                return;
            }
        };
        let mut committed = self.journal.committed();
        let mut rewinds = self.journal.rewinds();
        // The rewind counter last acted on: reads compare counters instead
        // of asking the watch whether it changed.
        let mut rewinds_seen = *rewinds.borrow_and_update();
        let mut lanes = Vec::new();
        for &lane in &self.settings.lanes {
            let key = crate::journal::cursor_key(&name, lane);
            match self.cursor(&reader, &key) {
                Ok(c) => lanes.push(LaneState::new(lane, key, &self.settings, c)),
                Err(e) => {
                    error!(sink = %name, error = %e, "forwarder cannot read its cursor; not forwarding");
                    self.record_error(e.to_string());
                    return;
                }
            }
        }
        let cursor = lanes.iter().map(|l| l.core.cursor()).min().unwrap_or(0);
        self.status.update(|p| {
            p.cursor = cursor;
            p.running = true;
        });
        let lane_names: Vec<&str> = self
            .settings
            .lanes
            .iter()
            .map(|l| l.map_or("all", Class::as_str))
            .collect();
        info!(sink = %name, cursor, lanes = ?lane_names, "forwarder started");
        if self.connect(&shutdown).await {
            let mut io = Io {
                reader: &reader,
                committed: &mut committed,
                rewinds: &mut rewinds,
                rewinds_seen: &mut rewinds_seen,
                shutdown: &shutdown,
                stopping: false,
            };
            self.schedule(&mut lanes, &mut io).await;
        }
        self.sink.close().await;
        let cursor = self.status.progress().cursor;
        self.status.update(|p| p.running = false);
        info!(sink = %name, cursor, "forwarder stopped");
    }

    /// Strict priority between lanes (the first has it), except that after
    /// [`TELEMETRY_EVERY`] batches of the first lane in a row while the next
    /// one has work, the next one sends one batch: a steady critical flow
    /// slows a telemetry backlog down but never stops it.
    async fn schedule(&self, lanes: &mut [LaneState<S::Encoded>], io: &mut Io<'_>) {
        let mut streak = 0u32;
        loop {
            io.stopping |= io.shutdown.is_cancelled();
            let committed_now = *io.committed.borrow();
            let now = tokio::time::Instant::now();
            for l in lanes.iter_mut() {
                if let Some((until, fill_at)) = l.linger
                    && (now >= until || committed_now.of(l.lane) >= fill_at)
                {
                    l.linger = None;
                    l.core.on_woken();
                    l.ahead = None;
                }
            }
            if io.stopping {
                // What lingers goes out now, like a batch in flight; then stop.
                for l in lanes.iter_mut().filter(|l| l.linger.is_some()) {
                    l.linger = None;
                    l.core.flush();
                    l.flush = true;
                    let _ = self.run_lane(l, io).await;
                }
                break;
            }
            let mut order: Vec<usize> = (0..lanes.len()).collect();
            if streak >= TELEMETRY_EVERY && lanes.len() > 1 {
                order.rotate_left(1);
            }
            let mut progressed = false;
            let mut rewound = false;
            for i in order {
                if lanes[i].linger.is_some() || lanes[i].idle {
                    continue;
                }
                let run = self.run_lane(&mut lanes[i], io).await;
                self.publish_cursor(lanes, *io.committed.borrow());
                match run {
                    LaneRun::Progress => {
                        progressed = true;
                        streak = if i == 0 { streak + 1 } else { 0 };
                        break;
                    }
                    LaneRun::Idle => {
                        if i == 0 {
                            streak = 0;
                        }
                    }
                    LaneRun::Rewound => {
                        rewound = true;
                        break;
                    }
                    LaneRun::Stop => {
                        io.stopping = true;
                        break;
                    }
                }
            }
            if rewound {
                self.reload(lanes, io);
                continue;
            }
            if progressed || io.stopping {
                continue;
            }
            // Every lane waits: for a commit of its class it has not seen,
            // a replay, the end of a linger, or shutdown. A lane is not
            // read again for commits of the other class: at plant rates
            // that would be a read (and its wake-ups) per commit for a
            // lane with nothing to send.
            let committed_now = *io.committed.borrow_and_update();
            let rewound = *io.rewinds.borrow() != *io.rewinds_seen;
            let mut woke = false;
            for l in lanes
                .iter_mut()
                .filter(|l| l.idle && (rewound || l.seen < committed_now.of(l.lane)))
            {
                l.idle = false;
                l.core.on_woken();
                woke = true;
            }
            if woke {
                continue;
            }
            let deadline = lanes.iter().filter_map(|l| l.linger.map(|(u, _)| u)).min();
            let linger_end = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = io.committed.changed() => if r.is_err() { io.stopping = true },
                r = io.rewinds.changed() => if r.is_err() { io.stopping = true },
                _ = linger_end => {}
                _ = io.shutdown.cancelled() => io.stopping = true,
            }
        }
    }

    /// The sink's cursor in its status: the lowest of its lanes', where a
    /// lane that found nothing to send counts as caught up with what was
    /// committed when it looked, or with all that is committed when none
    /// of its class came since (it is not read again until some does).
    fn publish_cursor(&self, lanes: &[LaneState<S::Encoded>], committed: Committed) {
        let cursor = lanes
            .iter()
            .map(|l| {
                if !l.idle {
                    l.core.cursor()
                } else if committed.of(l.lane) <= l.seen {
                    // Nothing of its class since it looked: caught up with
                    // everything committed.
                    l.core.cursor().max(committed.head)
                } else {
                    l.core.cursor().max(l.seen)
                }
            })
            .min()
            .unwrap_or(0);
        self.status.update(|p| p.cursor = cursor);
    }

    /// A replay moved cursors: every lane starts again from its own.
    fn reload(&self, lanes: &mut [LaneState<S::Encoded>], io: &mut Io<'_>) {
        for l in lanes.iter_mut() {
            match self.cursor(io.reader, &l.key) {
                Ok(c) => {
                    if c != l.core.cursor() {
                        info!(sink = %self.settings.name, lane = %l.key, from = l.core.cursor(), to = c, "cursor moved by a replay");
                    }
                    l.core.on_rewind(c);
                }
                Err(e) => {
                    warn!(sink = %self.settings.name, lane = %l.key, error = %e, "cannot reload cursor");
                    l.core.on_rewind(l.core.cursor());
                }
            }
            l.ahead = None;
            l.idle = false;
            l.linger = None;
        }
        let cursor = lanes.iter().map(|l| l.core.cursor()).min().unwrap_or(0);
        self.status.update(|p| p.cursor = cursor);
    }

    /// Runs one lane's actions until it has delivered (or dead-lettered) a
    /// batch or part of one, or has nothing to send.
    async fn run_lane(&self, lane: &mut LaneState<S::Encoded>, io: &mut Io<'_>) -> LaneRun {
        let name = &self.settings.name;
        loop {
            io.stopping |= io.shutdown.is_cancelled();
            let action = lane.core.next(&Now {
                at: Instant::now(),
                unix_us: now_us(),
                evictions: self.journal.evictions(),
            });
            if io.stopping {
                // At shutdown only the bookkeeping of what is already
                // upstream is finished, plus one send of what was lingering.
                let allowed = match action {
                    Action::Advance { .. } | Action::DeadLetter { .. } => true,
                    Action::Send { .. } => std::mem::take(&mut lane.flush),
                    _ => false,
                };
                if !allowed {
                    return LaneRun::Stop;
                }
            }
            match action {
                Action::Read { after } => {
                    let rewinds_now = *io.rewinds.borrow_and_update();
                    if rewinds_now != *io.rewinds_seen {
                        *io.rewinds_seen = rewinds_now;
                        return LaneRun::Rewound;
                    }
                    // What was committed before the read is in it.
                    lane.seen = io.committed.borrow().head;
                    let (evictions_at_read, read, from_ahead) = match lane.ahead.take() {
                        Some(a) if a.after == after => {
                            (a.evictions_at_read, self.join_read(a.task).await, true)
                        }
                        _ => {
                            let e = self.journal.evictions();
                            let task = self.spawn_read(io.reader, after, lane.lane);
                            (e, self.join_read(task).await, false)
                        }
                    };
                    match read {
                        Ok(Prepared {
                            events,
                            encoded: e,
                            through,
                            more,
                        }) => {
                            lane.encoded = match (events.first(), events.last(), e) {
                                (Some(f), Some(l), Some(body)) => Some(Encoded {
                                    first: f.seq,
                                    last: l.seq,
                                    len: events.len(),
                                    body,
                                }),
                                _ => None,
                            };
                            lane.core.on_read_routed(
                                events,
                                through,
                                more,
                                evictions_at_read,
                                from_ahead,
                                Instant::now(),
                            );
                        }
                        Err(e) => {
                            let delay = lane.core.on_read_failed(rand::rng().random());
                            warn!(sink = %name, lane = %lane.key, error = %e, retry_in_ms = delay.as_millis() as u64, "journal read failed; retrying");
                            self.record_error(e.to_string());
                        }
                    }
                }
                Action::WaitForCommit => {
                    lane.idle = true;
                    return LaneRun::Idle;
                }
                Action::Linger { wait, fill_at } => {
                    lane.linger = Some((tokio::time::Instant::now() + wait, fill_at));
                    return LaneRun::Idle;
                }
                Action::Sleep(d) => {
                    if let Wait::Shutdown = sleep_or_shutdown(d, io.shutdown).await {
                        io.stopping = true;
                    }
                }
                Action::Send { range } => {
                    let (outcome, first, last) = {
                        let slice = &lane.core.events()[range.clone()];
                        let (first, last) = (slice[0].seq, slice[slice.len() - 1].seq);
                        let whole = lane.encoded.take_if(|e| {
                            e.first == first && e.last == last && e.len == slice.len()
                        });
                        let body = match whole {
                            Some(e) => {
                                // Read and encode the next batch while this
                                // one is upstream; it is used once the
                                // cursor is at `last`, that is after an
                                // acknowledgement.
                                let after = lane.core.after_batch().unwrap_or(last);
                                lane.ahead = Some(Ahead {
                                    after,
                                    evictions_at_read: self.journal.evictions(),
                                    task: self.spawn_read(io.reader, after, lane.lane),
                                });
                                Some(e.body)
                            }
                            None => self.encode_part(slice.to_vec()).await,
                        };
                        let Some(body) = body else {
                            // The encoding task died (a bug in the sink's
                            // encoder): fail this forwarder loudly rather
                            // than skip anything.
                            error!(sink = %name, first, last, "encoding the batch failed; the forwarder stops");
                            self.record_error("encoding a batch failed".into());
                            return LaneRun::Stop;
                        };
                        self.status.update(|p| p.attempts += 1);
                        let outcome = self.sink.send(slice, body).await;
                        let duplicates = self.sink.upstream_duplicates();
                        if duplicates > 0 {
                            self.status.update(|p| p.upstream_duplicates = duplicates);
                        }
                        if let Some(token) = self.sink.token_state() {
                            self.status.update(|p| p.oauth2 = Some(token));
                        }
                        match &outcome {
                            SendOutcome::Ack => {
                                debug!(sink = %name, first, last, events = slice.len(), "batch delivered")
                            }
                            SendOutcome::Retry { reason, acked, .. } => {
                                self.status.update(|p| {
                                    p.consecutive_failures += 1;
                                    p.last_error = Some((now_us(), reason.clone()));
                                });
                                debug!(sink = %name, first, last, acked, "upstream did not take all of the batch");
                            }
                            SendOutcome::Reject {
                                index,
                                reason,
                                acked,
                            } => {
                                match self.warnings.check("reject") {
                                    Some(suppressed) => {
                                        warn!(sink = %name, first, last, acked, index = ?index, reason = %reason, suppressed_since_last_warning = suppressed, "upstream rejected the batch (further rejections are logged at debug for a minute)")
                                    }
                                    None => {
                                        debug!(sink = %name, first, last, acked, index = ?index, reason = %reason, "upstream rejected the batch")
                                    }
                                }
                                self.record_error(reason.clone());
                            }
                        }
                        (outcome, first, last)
                    };
                    let reason = match &outcome {
                        SendOutcome::Retry { reason, .. } => reason.clone(),
                        _ => String::new(),
                    };
                    if let Sent::Retrying {
                        acked,
                        delay,
                        attempt,
                    } = lane.core.on_sent(outcome, rand::rng().random())
                    {
                        warn!(
                            sink = %name,
                            first,
                            last,
                            acked,
                            attempt,
                            retry_in_ms = delay.as_millis() as u64,
                            reason = %reason,
                            "upstream did not take the batch; retrying"
                        );
                    }
                }
                Action::DeadLetter { index, reason } => {
                    let Some(ev) = lane.core.events().get(index).cloned() else {
                        return LaneRun::Stop;
                    };
                    let (seq, id) = (ev.seq, ev.id.clone());
                    match self.journal.dead_letter(name, ev, &reason).await {
                        Ok(dl) => {
                            match self.warnings.check("dead_letter") {
                                Some(suppressed) => {
                                    error!(sink = %name, seq, id = %id, dead_letter = dl, reason = %reason, suppressed_since_last_line = suppressed, "event dead-lettered: the upstream rejects it for good (further dead letters are logged at debug for a minute; plantrelay journal dead-letters lists them all)")
                                }
                                None => {
                                    debug!(sink = %name, seq, id = %id, dead_letter = dl, reason = %reason, "event dead-lettered")
                                }
                            }
                            lane.core.on_dead_lettered(true);
                        }
                        Err(e) => {
                            error!(sink = %name, seq, error = %e, "cannot record the dead letter; the batch will be sent again");
                            self.record_error(e.to_string());
                            lane.core.on_dead_lettered(false);
                        }
                    }
                }
                Action::Advance {
                    from,
                    to,
                    evictions_at_read,
                } => {
                    let result = self
                        .journal
                        .advance_delivered(&lane.key, from, to, evictions_at_read)
                        .await;
                    if let Err(e) = &result {
                        error!(sink = %name, lane = %lane.key, error = %e, "cannot store the cursor; the batch will be sent again");
                        self.record_error(e.to_string());
                    }
                    match lane.core.on_advanced(result.as_ref().map(|c| *c)) {
                        Advanced::Moved {
                            cursor: _,
                            delivered,
                            dead_letter,
                        } => {
                            let failures = lane.core.failures();
                            self.status.update(|p| {
                                if dead_letter {
                                    p.dead_letters += 1;
                                } else if delivered > 0 {
                                    p.delivered += delivered;
                                    p.batches += 1;
                                    if failures == 0 {
                                        p.consecutive_failures = 0;
                                    }
                                    p.last_success_us = Some(now_us());
                                }
                            });
                            return LaneRun::Progress;
                        }
                        // A replay moved the cursor while the batch was
                        // upstream: every lane starts again from its cursor.
                        Advanced::Rewound => return LaneRun::Rewound,
                        Advanced::Failed => return LaneRun::Progress,
                    }
                }
            }
        }
    }
}

/// See [`Forwarder::schedule`]: the first lane's batches in a row after
/// which the next lane, if it has work, sends one.
pub const TELEMETRY_EVERY: u32 = 10;

/// One lane of a forwarder: its cursor's state machine and what the driver
/// holds for it.
struct LaneState<E> {
    lane: Option<Class>,
    key: String,
    core: Core,
    ahead: Option<Ahead<E>>,
    encoded: Option<Encoded<E>>,
    /// Lingering until this instant, or until the committed seq reaches
    /// the second value.
    linger: Option<(tokio::time::Instant, u64)>,
    /// Nothing to send until the next commit.
    idle: bool,
    /// The committed seq when it last read.
    seen: u64,
    /// Shutdown came while it lingered: one send is allowed.
    flush: bool,
}

impl<E> LaneState<E> {
    fn new(lane: Option<Class>, key: String, settings: &ForwarderSettings, cursor: u64) -> Self {
        LaneState {
            lane,
            key,
            core: Core::new(settings.clone(), cursor, Instant::now()),
            ahead: None,
            encoded: None,
            linger: None,
            idle: false,
            seen: 0,
            flush: false,
        }
    }
}

enum LaneRun {
    Progress,
    Idle,
    Rewound,
    Stop,
}

/// The forwarder's handles on the journal's signals and the shutdown.
struct Io<'a> {
    reader: &'a Arc<Mutex<Reader>>,
    committed: &'a mut tokio::sync::watch::Receiver<crate::journal::Committed>,
    rewinds: &'a mut tokio::sync::watch::Receiver<u64>,
    rewinds_seen: &'a mut u64,
    shutdown: &'a CancellationToken,
    stopping: bool,
}

fn now_us() -> i64 {
    unix_micros(SystemTime::now())
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> Wait {
    tokio::select! {
        _ = tokio::time::sleep(d) => Wait::Work,
        _ = shutdown.cancelled() => Wait::Shutdown,
    }
}
