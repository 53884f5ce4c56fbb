//! The forwarder loop, written once for every sink, and the sinks.
//!
//! A forwarder reads the journal after its sink's durable cursor, in
//! batches, with **one batch in flight** so order holds, and moves the cursor
//! only past what the upstream acknowledged. Failures are retried with capped
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
//! The bookkeeping ([`Backoff`], [`RateLimiter`], [`Plan`]) is plain data
//! tested without I/O; [`Forwarder::run`] is the driver. A forwarder must
//! never write to the journal except through [`Journal::advance`] and
//! [`Journal::dead_letter`], and never skip an event without one of them.
//!
//! - [`https`]: CloudEvents batches over HTTPS.

pub mod https;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::event::StoredEvent;
use crate::journal::{Journal, JournalError, Reader, unix_micros};
use crate::status::SinkStatus;

/// What the upstream said about one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Every event of the batch is safely upstream.
    Ack,
    /// Nothing of the batch can be taken as delivered; try again later
    /// (`after`: the upstream's `Retry-After`).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The upstream refused the batch for good. With `index`, it named the
    /// offending event; without, the batch is bisected to find it.
    Reject {
        index: Option<usize>,
        reason: String,
    },
}

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
}

/// Retry timing of a forwarder.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

/// Capped exponential backoff with full jitter: the n-th consecutive failure
/// waits a uniform random time in [0, min(max, initial × 2^n)], but never
/// less than the upstream's `Retry-After` (itself capped at 10 × max).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Backoff {
        Backoff {
            policy,
            failures: 0,
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(30)).unwrap_or(u32::MAX);
        self.policy
            .initial
            .saturating_mul(factor)
            .min(self.policy.max)
    }

    /// Records a failure and returns how long to wait; `jitter` in [0, 1].
    pub fn fail(&mut self, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        match retry_after {
            Some(after) => jittered.max(after.min(self.policy.max.saturating_mul(10))),
            None => jittered,
        }
    }

    pub fn succeed(&mut self) {
        self.failures = 0;
    }
}

/// Token bucket for `max_events_per_sec` (0 = unlimited); one second of
/// burst.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(per_sec: u32, now: Instant) -> RateLimiter {
        RateLimiter {
            per_sec: per_sec as f64,
            tokens: per_sec as f64,
            last: now,
        }
    }

    /// How many of `want` events may go now (at least 1 once the bucket has
    /// a whole token), and how long to wait when none may.
    pub fn take(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        if self.per_sec <= 0.0 {
            return Ok(want);
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec.max(1.0));
        if self.tokens < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec));
        }
        let n = (self.tokens.floor() as usize).min(want).max(1);
        self.tokens -= n as f64;
        Ok(n)
    }
}

/// The work left of one batch read from the journal, in order. A
/// rejection replaces the front range by smaller ones (or by the poison
/// event alone), so the order of what is sent never changes.
#[derive(Debug)]
pub struct Plan {
    events: Vec<StoredEvent>,
    pending: VecDeque<Step>,
}

/// What the driver must do next for a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send `events[a..b]`.
    Send(usize, usize),
    /// Dead-letter `events[i]`, then continue.
    DeadLetter(usize),
    Done,
}

impl Plan {
    pub fn new(events: Vec<StoredEvent>) -> Plan {
        let mut pending = VecDeque::new();
        if !events.is_empty() {
            pending.push_back(Step::Send(0, events.len()));
        }
        Plan { events, pending }
    }

    pub fn events(&self) -> &[StoredEvent] {
        &self.events
    }

    pub fn next(&self) -> Step {
        self.pending.front().copied().unwrap_or(Step::Done)
    }

    /// The front step is done (range acknowledged, or event dead-lettered).
    pub fn done(&mut self) {
        self.pending.pop_front();
    }

    /// The front range was rejected; `index` (relative to the range) is the
    /// event the upstream named, if it named one.
    pub fn rejected(&mut self, index: Option<usize>) {
        let Some(Step::Send(a, b)) = self.pending.front().copied() else {
            return;
        };
        self.pending.pop_front();
        let mut replace = Vec::with_capacity(3);
        match index {
            Some(i) if a + i < b => {
                let at = a + i;
                if a < at {
                    replace.push(Step::Send(a, at));
                }
                replace.push(Step::DeadLetter(at));
                if at + 1 < b {
                    replace.push(Step::Send(at + 1, b));
                }
            }
            _ if b - a == 1 => replace.push(Step::DeadLetter(a)),
            _ => {
                let mid = a + (b - a) / 2;
                replace.push(Step::Send(a, mid));
                replace.push(Step::Send(mid, b));
            }
        }
        for step in replace.into_iter().rev() {
            self.pending.push_front(step);
        }
    }
}

/// Default `batch_linger`: at most 4 requests (and 4 cursor writes) a
/// second per sink below saturation instead of one per commit, for at most
/// a quarter of a second of delivery delay, which MES workflows do not
/// notice (peers default to 0.5–10 s).
pub const DEFAULT_BATCH_LINGER: Duration = Duration::from_millis(250);

/// How long a batch just read should wait for more events before it goes
/// out; `None`: send it now. `len` events of `bytes` bytes, the oldest
/// received at `oldest_recv_us`. A batch at `max_events`, or at half of
/// `max_bytes` or more (waiting could not double it), never waits, nor does
/// one whose oldest event is already `linger` old. The wait ends when the
/// oldest event is `linger` old, so a clock that steps back cannot stretch
/// it beyond `linger`.
pub fn linger(
    len: usize,
    bytes: usize,
    oldest_recv_us: i64,
    now_us: i64,
    settings: &ForwarderSettings,
) -> Option<Duration> {
    if settings.batch_linger.is_zero()
        || len >= settings.batch_max_events
        || bytes.saturating_mul(2) >= settings.batch_max_bytes
    {
        return None;
    }
    let age = Duration::from_micros(now_us.saturating_sub(oldest_recv_us).max(0) as u64);
    settings
        .batch_linger
        .checked_sub(age)
        .filter(|d| !d.is_zero())
}

/// Settings every forwarder has.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    pub name: String,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub max_events_per_sec: u32,
    /// See [`linger`]; zero sends every batch at once.
    pub batch_linger: Duration,
    pub retry: RetryPolicy,
}

/// Drives one sink.
pub struct Forwarder<S: Sink> {
    settings: ForwarderSettings,
    sink: Arc<S>,
    journal: Journal,
    status: Arc<SinkStatus>,
}

enum Wait {
    Work,
    Shutdown,
}

/// A batch read from the journal, with its wire form when it is not empty.
struct Prepared<E> {
    events: Vec<StoredEvent>,
    encoded: Option<E>,
}

type ReadTask<E> = tokio::task::JoinHandle<Result<Prepared<E>, JournalError>>;

/// The batch after the one upstream, read and encoded while it is there.
struct Ahead<E> {
    /// The seq it was read after: it is used only if the cursor got there.
    after: u64,
    evictions_at_read: u64,
    task: ReadTask<E>,
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
        }
    }

    /// Reads and encodes the next batch after `cursor` on a blocking thread
    /// (SQLite reads and compression do not belong on the async workers).
    fn spawn_read(&self, reader: &Arc<Mutex<Reader>>, cursor: u64) -> ReadTask<S::Encoded> {
        let reader = reader.clone();
        let sink = self.sink.clone();
        let (name, max_events, max_bytes) = (
            self.settings.name.clone(),
            self.settings.batch_max_events,
            self.settings.batch_max_bytes,
        );
        let path = self.journal.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let events = {
                let reader = reader.lock().map_err(|_| JournalError::Sqlite {
                    path: path.clone(),
                    detail: "reader lock poisoned".into(),
                })?;
                reader.read_after(cursor, &name, max_events, max_bytes)?
            };
            let encoded = (!events.is_empty()).then(|| sink.encode(&events));
            Ok(Prepared { events, encoded })
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

    fn cursor(&self, reader: &Arc<Mutex<Reader>>) -> Result<u64, JournalError> {
        match reader.lock() {
            Ok(r) => r.cursor(&self.settings.name),
            Err(_) => Err(JournalError::Sqlite {
                path: self.journal.path().to_path_buf(),
                detail: "reader lock poisoned".into(),
            }),
        }
    }

    /// Runs until `shutdown` is cancelled. A batch in flight at shutdown is
    /// given until `drain_deadline` (set when shutdown starts) to finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.settings.name.clone();
        let reader = match self.journal.reader() {
            Ok(r) => Arc::new(Mutex::new(r)),
            Err(e) => {
                error!(sink = %name, error = %e, "forwarder cannot open a journal reader; not forwarding");
                self.status
                    .update(|p| p.last_error = Some((now_us(), e.to_string())));
                return;
            }
        };
        let mut committed = self.journal.committed();
        let mut rewinds = self.journal.rewinds();
        // The rewind counter last acted on: `wait_for_work` marks a rewind
        // as seen when it wakes for it, so the loop compares counters
        // instead of asking the watch whether it changed.
        let mut rewinds_seen = *rewinds.borrow_and_update();
        let mut cursor = match self.cursor(&reader) {
            Ok(c) => c,
            Err(e) => {
                error!(sink = %name, error = %e, "forwarder cannot read its cursor; not forwarding");
                return;
            }
        };
        let mut backoff = Backoff::new(self.settings.retry);
        let mut limiter = RateLimiter::new(self.settings.max_events_per_sec, Instant::now());
        let mut ahead: Option<Ahead<S::Encoded>> = None;
        self.status.update(|p| {
            p.cursor = cursor;
            p.running = true;
        });
        info!(sink = %name, cursor, "forwarder started");

        'outer: loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Mark what we have seen before reading, so a commit that lands
            // during the read wakes us again.
            committed.borrow_and_update();
            let rewinds_now = *rewinds.borrow_and_update();
            if rewinds_now != rewinds_seen {
                rewinds_seen = rewinds_now;
                match self.cursor(&reader) {
                    Ok(c) => {
                        info!(sink = %name, from = cursor, to = c, "cursor moved by a replay");
                        cursor = c;
                    }
                    Err(e) => warn!(sink = %name, error = %e, "cannot reload cursor"),
                }
            }
            // Evictions so far, taken before the read: a batch read before an
            // eviction may hold rows the journal has since replaced by gap
            // events.
            let (evictions_at_read, read, read_ahead) = match ahead.take() {
                Some(a) if a.after == cursor => {
                    (a.evictions_at_read, self.join_read(a.task).await, true)
                }
                _ => {
                    let e = self.journal.evictions();
                    let task = self.spawn_read(&reader, cursor);
                    (e, self.join_read(task).await, false)
                }
            };
            let prepared = match read {
                Ok(p) => p,
                Err(e) => {
                    warn!(sink = %name, error = %e, "journal read failed; retrying");
                    self.status
                        .update(|p| p.last_error = Some((now_us(), e.to_string())));
                    let d = backoff.fail(None, rand::rng().random());
                    if let Wait::Shutdown = sleep_or_shutdown(d, &shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let Prepared {
                events: mut batch,
                encoded: mut whole,
            } = prepared;
            if batch.is_empty() {
                if read_ahead {
                    // Read before commits this loop has marked as seen:
                    // read again rather than wait for the next one.
                    continue;
                }
                match wait_for_work(&mut committed, &mut rewinds, &shutdown).await {
                    Wait::Work => continue,
                    Wait::Shutdown => break,
                }
            }
            let oldest = batch.iter().map(|e| e.recv_time_us).min().unwrap_or(0);
            let bytes = batch.iter().map(StoredEvent::size).sum();
            if let Some(wait) = linger(batch.len(), bytes, oldest, now_us(), &self.settings) {
                // Committed seqs are not all this sink's, so reaching this
                // one may still leave the batch short: it is read again and
                // waits out the rest of its linger.
                let fill_at = batch[batch.len() - 1]
                    .seq
                    .saturating_add((self.settings.batch_max_events - batch.len()) as u64);
                if let Wait::Work =
                    linger_wait(&mut committed, &mut rewinds, fill_at, wait, &shutdown).await
                {
                    continue;
                }
                // Shutdown: what lingers goes out now, like a batch in flight.
            }
            // Rate limit: may shorten the batch (and its encoding is then
            // made again for what is left).
            loop {
                match limiter.take(batch.len(), Instant::now()) {
                    Ok(n) => {
                        if n < batch.len() {
                            batch.truncate(n);
                            whole = None;
                        }
                        break;
                    }
                    Err(wait) => {
                        if let Wait::Shutdown = sleep_or_shutdown(wait, &shutdown).await {
                            break 'outer;
                        }
                    }
                }
            }
            let mut plan = Plan::new(batch);
            loop {
                match plan.next() {
                    Step::Done => break,
                    Step::DeadLetter(i) => {
                        let reason = self.last_reason();
                        if !self
                            .dead_letter(&plan, i, &reason, &mut cursor, evictions_at_read)
                            .await
                        {
                            continue 'outer;
                        }
                        plan.done();
                    }
                    Step::Send(a, b) => {
                        if self.journal.evictions() != evictions_at_read {
                            // Read again so the gap events go out in place of
                            // what was evicted meanwhile.
                            continue 'outer;
                        }
                        let slice = &plan.events()[a..b];
                        let (first, last) = (slice[0].seq, slice[slice.len() - 1].seq);
                        let whole_batch = a == 0 && b == plan.events().len();
                        let encoded = match whole.take() {
                            Some(e) if whole_batch => e,
                            // A part of a bisected or rate-limited batch.
                            _ => self.sink.encode(slice),
                        };
                        if whole_batch {
                            // Read and encode the next batch while this one
                            // is upstream; it is used once the cursor is at
                            // `last`, that is after an acknowledgement.
                            ahead = Some(Ahead {
                                after: last,
                                evictions_at_read: self.journal.evictions(),
                                task: self.spawn_read(&reader, last),
                            });
                        }
                        self.status.update(|p| p.attempts += 1);
                        match self.sink.send(slice, encoded).await {
                            SendOutcome::Ack => {
                                let n = (b - a) as u64;
                                match self
                                    .journal
                                    .advance_delivered(&name, cursor, last, evictions_at_read)
                                    .await
                                {
                                    Ok(Some(moved)) => {
                                        cursor = moved;
                                        backoff.succeed();
                                        plan.done();
                                        self.status.update(|p| {
                                            p.cursor = moved;
                                            p.delivered += n;
                                            p.batches += 1;
                                            p.consecutive_failures = 0;
                                            p.last_success_us = Some(now_us());
                                        });
                                        debug!(sink = %name, first, last, events = n, "batch delivered");
                                        if moved < last {
                                            // Gap events now stand in the delivered
                                            // range: read again from before them.
                                            continue 'outer;
                                        }
                                    }
                                    Ok(None) => {
                                        // A replay moved the cursor while the batch was
                                        // upstream: start again from the new cursor.
                                        cursor = self.cursor(&reader).unwrap_or(cursor);
                                        continue 'outer;
                                    }
                                    Err(e) => {
                                        error!(sink = %name, error = %e, "cannot store the cursor; the batch will be sent again");
                                        self.status.update(|p| {
                                            p.last_error = Some((now_us(), e.to_string()))
                                        });
                                        if let Wait::Shutdown =
                                            sleep_or_shutdown(Duration::from_secs(1), &shutdown)
                                                .await
                                        {
                                            break 'outer;
                                        }
                                        continue 'outer;
                                    }
                                }
                            }
                            SendOutcome::Retry { after, reason } => {
                                let delay = backoff.fail(after, rand::rng().random());
                                warn!(
                                    sink = %name,
                                    first,
                                    last,
                                    attempt = backoff.failures(),
                                    retry_in_ms = delay.as_millis() as u64,
                                    reason = %reason,
                                    "upstream did not take the batch; retrying"
                                );
                                self.status.update(|p| {
                                    p.consecutive_failures += 1;
                                    p.last_error = Some((now_us(), reason));
                                });
                                if let Wait::Shutdown = sleep_or_shutdown(delay, &shutdown).await {
                                    break 'outer;
                                }
                                // Read the batch again: while we waited the journal
                                // may have evicted some of it (a gap event now
                                // stands in its place) or a replay moved the cursor.
                                continue 'outer;
                            }
                            SendOutcome::Reject { index, reason } => {
                                warn!(sink = %name, first, last, index = ?index, reason = %reason, "upstream rejected the batch");
                                self.status
                                    .update(|p| p.last_error = Some((now_us(), reason)));
                                plan.rejected(index);
                            }
                        }
                    }
                }
                if shutdown.is_cancelled() {
                    break 'outer;
                }
            }
        }
        self.status.update(|p| p.running = false);
        info!(sink = %name, cursor, "forwarder stopped");
    }

    fn last_reason(&self) -> String {
        self.status
            .progress()
            .last_error
            .map(|(_, r)| r)
            .unwrap_or_else(|| "rejected by the upstream".to_string())
    }

    /// Records `plan.events()[i]` as a dead letter and moves the cursor past
    /// it. Returns false when the journal refused (the batch starts over).
    async fn dead_letter(
        &self,
        plan: &Plan,
        i: usize,
        reason: &str,
        cursor: &mut u64,
        evictions_at_read: u64,
    ) -> bool {
        let name = &self.settings.name;
        let ev = plan.events()[i].clone();
        let (seq, id) = (ev.seq, ev.id.clone());
        match self.journal.dead_letter(name, ev, reason).await {
            Ok(dl) => {
                error!(sink = %name, seq, id = %id, dead_letter = dl, reason, "event dead-lettered: the upstream rejects it for good");
                match self
                    .journal
                    .advance_delivered(name, *cursor, seq, evictions_at_read)
                    .await
                {
                    Ok(Some(moved)) => {
                        *cursor = moved;
                        self.status.update(|p| {
                            p.dead_letters += 1;
                            p.cursor = moved;
                        });
                        // Short of it: a gap event now stands before it and
                        // goes out first, so the batch is read again.
                        moved == seq
                    }
                    Ok(None) => false,
                    Err(e) => {
                        error!(sink = %name, error = %e, "cannot store the cursor after a dead letter");
                        false
                    }
                }
            }
            Err(e) => {
                error!(sink = %name, seq, error = %e, "cannot record the dead letter; the batch will be sent again");
                false
            }
        }
    }
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

/// Waits up to `wait`, or until the committed seq reaches `fill_at`, or a
/// replay moves the cursor (`Work`: read again), or shutdown.
async fn linger_wait(
    committed: &mut tokio::sync::watch::Receiver<u64>,
    rewinds: &mut tokio::sync::watch::Receiver<u64>,
    fill_at: u64,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Wait {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if *committed.borrow_and_update() >= fill_at {
            return Wait::Work;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Wait::Work,
            r = committed.changed() => if r.is_err() { return Wait::Shutdown },
            r = rewinds.changed() => return if r.is_ok() { Wait::Work } else { Wait::Shutdown },
            _ = shutdown.cancelled() => return Wait::Shutdown,
        }
    }
}

async fn wait_for_work(
    committed: &mut tokio::sync::watch::Receiver<u64>,
    rewinds: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> Wait {
    tokio::select! {
        r = committed.changed() => if r.is_ok() { Wait::Work } else { Wait::Shutdown },
        r = rewinds.changed() => if r.is_ok() { Wait::Work } else { Wait::Shutdown },
        _ = shutdown.cancelled() => Wait::Shutdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Class;

    fn ev(seq: u64) -> StoredEvent {
        StoredEvent {
            seq,
            source: "mes".into(),
            id: format!("e{seq}"),
            stream: "s".into(),
            stream_seq: seq,
            class: Class::Critical,
            event_type: "t".into(),
            source_time: None,
            recv_time_us: 0,
            data: b"null".to_vec(),
            attrs: None,
        }
    }

    /// Drives a plan against a fake upstream that rejects `poison` seqs,
    /// naming them or not. Returns (sent-and-acked seqs in order, dead seqs).
    fn drive(n: u64, poison: &[u64], names_it: bool) -> (Vec<u64>, Vec<u64>, usize) {
        let mut plan = Plan::new((1..=n).map(ev).collect());
        let (mut acked, mut dead, mut requests) = (Vec::new(), Vec::new(), 0);
        loop {
            match plan.next() {
                Step::Done => break,
                Step::DeadLetter(i) => {
                    dead.push(plan.events()[i].seq);
                    plan.done();
                }
                Step::Send(a, b) => {
                    requests += 1;
                    let slice = &plan.events()[a..b];
                    match slice.iter().position(|e| poison.contains(&e.seq)) {
                        None => {
                            acked.extend(slice.iter().map(|e| e.seq));
                            plan.done();
                        }
                        Some(i) => plan.rejected(names_it.then_some(i)),
                    }
                }
            }
        }
        (acked, dead, requests)
    }

    #[test]
    fn bisection_isolates_every_poison_event_and_keeps_the_rest_in_order() {
        let (acked, dead, requests) = drive(1000, &[17, 500, 999], false);
        assert_eq!(dead, vec![17, 500, 999]);
        let expected: Vec<u64> = (1..=1000).filter(|s| ![17, 500, 999].contains(s)).collect();
        assert_eq!(acked, expected);
        assert!(
            requests < 100,
            "bisection, not one request per event: {requests}"
        );
    }

    #[test]
    fn a_named_poison_event_is_dead_lettered_without_bisection() {
        let (acked, dead, requests) = drive(100, &[40], true);
        assert_eq!(dead, vec![40]);
        assert_eq!(acked.len(), 99);
        assert!(acked.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(requests, 3, "whole batch, the part before, the part after");
    }

    #[test]
    fn a_named_index_out_of_range_falls_back_to_bisection() {
        let mut plan = Plan::new((1..=4).map(ev).collect());
        plan.rejected(Some(99));
        assert_eq!(plan.next(), Step::Send(0, 2));
    }

    #[test]
    fn backoff_grows_exponentially_to_its_cap_with_jitter() {
        let mut b = Backoff::new(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        });
        assert_eq!(b.fail(None, 1.0), Duration::from_millis(100));
        assert_eq!(b.fail(None, 1.0), Duration::from_millis(200));
        assert_eq!(b.fail(None, 0.5), Duration::from_millis(200));
        for _ in 0..40 {
            assert!(b.fail(None, 1.0) <= Duration::from_secs(2));
        }
        assert_eq!(
            b.fail(None, 0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        b.succeed();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_honours_retry_after_within_reason() {
        let mut b = Backoff::new(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        assert_eq!(
            b.fail(Some(Duration::from_secs(3)), 0.1),
            Duration::from_secs(3)
        );
        assert_eq!(
            b.fail(Some(Duration::from_secs(3600)), 0.1),
            Duration::from_secs(10),
            "a silly Retry-After is capped at 10 × retry_max"
        );
    }

    fn lingering(linger_ms: u64) -> ForwarderSettings {
        ForwarderSettings {
            name: "central".into(),
            batch_max_events: 1000,
            batch_max_bytes: 4 << 20,
            max_events_per_sec: 0,
            batch_linger: Duration::from_millis(linger_ms),
            retry: RetryPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
        }
    }

    #[test]
    fn a_small_young_batch_waits_until_its_oldest_event_is_linger_old() {
        let s = lingering(250);
        let now = 10_000_000;
        assert_eq!(
            linger(10, 2_000, now - 50_000, now, &s),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            linger(1, 200, now, now, &s),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn a_full_batch_or_one_already_late_goes_out_at_once() {
        let s = lingering(250);
        let now = 10_000_000;
        assert_eq!(linger(1000, 200_000, now, now, &s), None, "full by count");
        assert_eq!(
            linger(10, 2 << 20, now, now, &s),
            None,
            "half of batch_max_bytes"
        );
        assert_eq!(
            linger(10, 2_000, now - 250_000, now, &s),
            None,
            "oldest is linger old"
        );
        assert_eq!(
            linger(10, 2_000, now - 3_600_000_000, now, &s),
            None,
            "a backlog after an outage"
        );
        assert_eq!(
            linger(1, 200, now, now, &lingering(0)),
            None,
            "batch_linger = 0"
        );
    }

    #[test]
    fn a_clock_stepping_back_never_stretches_the_linger() {
        let s = lingering(250);
        let now = 10_000_000;
        assert_eq!(
            linger(1, 200, now + 60_000_000, now, &s),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn rate_limiter_caps_events_per_second() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100, t0);
        assert_eq!(r.take(1000, t0), Ok(100), "one second of burst");
        let wait = r.take(10, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(10));
        assert_eq!(r.take(1000, t0 + Duration::from_millis(500)), Ok(50));
        let mut unlimited = RateLimiter::new(0, t0);
        assert_eq!(unlimited.take(5000, t0), Ok(5000));
    }
}
