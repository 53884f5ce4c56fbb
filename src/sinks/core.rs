//! The forwarder's bookkeeping as a plain state machine: no I/O, no clock
//! of its own, no tasks. [`Core`] is told what was read, what the upstream
//! answered and what the journal did, and says what to do next
//! ([`Action`]); the driver in [`super::Forwarder::run`] does the I/O and
//! the waiting, the way an MQTT client's protocol state is driven by its
//! event loop.
//!
//! It owns the cursor as this forwarder last stored it, the batch in hand
//! (a [`Plan`]: what is left to send of it, after splits around poison
//! events), the backoff and the rate limiter. It must never decide that an
//! event is delivered without the upstream having acknowledged it (fully, or
//! as a prefix of a partial acknowledgement), never reorder a batch, and
//! never skip an event except through a dead letter or a gap event the
//! journal placed.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::event::StoredEvent;
use crate::journal::JournalError;

/// What the upstream said about one batch.
///
/// Sinks whose upstream acknowledges message by message (MQTT, JetStream)
/// report a partially delivered batch with `acked`: the first `acked`
/// events of the batch are safely upstream, the rest is not (a later event
/// acknowledged out of order counts for nothing: it is sent again, which
/// the upstream's deduplication by event id makes harmless).
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Every event of the batch is safely upstream.
    Ack,
    /// The events after the first `acked` were not taken; try them again
    /// later (`after`: the upstream's `Retry-After`).
    Retry {
        acked: usize,
        after: Option<Duration>,
        reason: String,
    },
    /// The upstream refused the batch for good after the first `acked`
    /// events. With `index` (into the batch as sent, at or after `acked`)
    /// it named the offending event; without, the rest is bisected.
    Reject {
        acked: usize,
        index: Option<usize>,
        reason: String,
    },
}

impl SendOutcome {
    /// Nothing of the batch was taken; try again later.
    pub fn retry(after: Option<Duration>, reason: impl Into<String>) -> SendOutcome {
        SendOutcome::Retry {
            acked: 0,
            after,
            reason: reason.into(),
        }
    }

    /// The batch was refused for good (`index`: the event the upstream named).
    pub fn reject(index: Option<usize>, reason: impl Into<String>) -> SendOutcome {
        SendOutcome::Reject {
            acked: 0,
            index,
            reason: reason.into(),
        }
    }
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

    /// Steps left, the front one included.
    pub fn remaining(&self) -> usize {
        self.pending.len()
    }

    /// Keeps only the first `n` events (the rate limiter let no more go).
    /// Before anything of the plan was sent.
    pub fn truncate(&mut self, n: usize) {
        if n < self.events.len() {
            self.events.truncate(n);
            self.pending.clear();
            if n > 0 {
                self.pending.push_back(Step::Send(0, n));
            }
        }
    }

    /// The first `k` events of the front range are delivered (a partial
    /// acknowledgement): the range starts after them.
    pub fn skip_front(&mut self, k: usize) {
        if let Some(Step::Send(a, b)) = self.pending.front().copied() {
            let a2 = (a + k).min(b);
            self.pending.pop_front();
            if a2 < b {
                self.pending.push_front(Step::Send(a2, b));
            }
        }
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
    /// One cursor each, in priority order: `[None]` for one lane over every
    /// class in journal order (see [`crate::config::lanes`]).
    pub lanes: Vec<Option<crate::event::Class>>,
    /// The streams it takes (`streams`).
    pub streams: crate::route::StreamFilter,
}

/// Most bytes of events read for one batch of a sink without
/// `batch_max_bytes` (one publish per event: MQTT, JetStream).
pub const PER_EVENT_BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;

impl ForwarderSettings {
    /// The settings of any sink's config (see [`crate::config::Forwarding`]).
    pub fn of(cfg: &impl crate::config::SinkKeys) -> ForwarderSettings {
        let f = cfg.forwarding();
        ForwarderSettings {
            name: f.name.to_owned(),
            batch_max_events: f.batch_max_events,
            batch_max_bytes: f.batch_max_bytes.map_or(PER_EVENT_BATCH_MAX_BYTES, |b| {
                usize::try_from(b).unwrap_or(usize::MAX)
            }),
            max_events_per_sec: f.max_events_per_sec,
            batch_linger: f.batch_linger,
            retry: RetryPolicy {
                initial: f.retry_initial,
                max: f.retry_max,
            },
            lanes: crate::config::lanes(f.classes, f.priority),
            streams: crate::route::StreamFilter::new(f.streams),
        }
    }
}

/// What the driver sees when it asks [`Core::next`].
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    /// µs since the Unix epoch (linger ages are measured on event receive
    /// times, which are wall-clock).
    pub unix_us: i64,
    /// The journal's eviction counter: a batch read before an eviction may
    /// hold rows since replaced by gap events, and is read again.
    pub evictions: u64,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read the next batch after `after` (the read-ahead batch, if it was
    /// read after exactly that seq), then [`Core::on_read`].
    Read { after: u64 },
    /// Nothing to send: wait for the next commit or replay, then
    /// [`Core::on_woken`].
    WaitForCommit,
    /// The batch in hand is small and young: wait up to `wait`, or until
    /// the journal's committed seq reaches `fill_at`, then
    /// [`Core::on_woken`] (it is read again, fuller). At shutdown,
    /// [`Core::flush`] sends it as it is.
    Linger { wait: Duration, fill_at: u64 },
    /// Wait (backoff, rate limit), then ask again.
    Sleep(Duration),
    /// Send `events()[range]`, then [`Core::on_sent`].
    Send { range: Range<usize> },
    /// Record `events()[index]` as a dead letter with `reason`, then
    /// [`Core::on_dead_lettered`].
    DeadLetter { index: usize, reason: String },
    /// Store the cursor: `Journal::advance_delivered(from, to,
    /// evictions_at_read)`, then [`Core::on_advanced`].
    Advance {
        from: u64,
        to: u64,
        evictions_at_read: u64,
    },
}

/// What an answer from the upstream led to (for logs and status).
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// All or part of it is delivered: an [`Action::Advance`] follows.
    Delivered { events: usize },
    /// `acked` events delivered (an advance follows if any), the rest is
    /// retried after `delay`; `attempt` consecutive failures so far.
    Retrying {
        acked: usize,
        delay: Duration,
        attempt: u32,
    },
    /// Refused after `acked` events: the rest is split or dead-lettered.
    Rejected { acked: usize },
    /// There was no send in progress (a driver bug; nothing changes).
    Unexpected,
}

/// What storing the cursor led to.
#[derive(Debug, Clone, PartialEq)]
pub enum Advanced {
    /// The cursor is at `cursor`; `delivered` events (0 for a dead letter)
    /// count as delivered.
    Moved {
        cursor: u64,
        delivered: u64,
        dead_letter: bool,
    },
    /// A replay moved the cursor meanwhile: reload it
    /// ([`Core::on_rewind`]) and read from there.
    Rewound,
    /// The journal refused; the batch is read and sent again after a pause.
    Failed,
}

/// Rows passed over (not for this sink) after which the cursor moves over
/// them on its own, without a delivery.
pub const SKIP_ADVANCE_ROWS: u64 = 10_000;

/// How often at most the cursor moves over passed-over rows on its own
/// when fewer than [`SKIP_ADVANCE_ROWS`] have gathered.
pub const SKIP_ADVANCE_EVERY: Duration = Duration::from_secs(5);

/// Pause after the journal refused a cursor move or a dead letter, so that
/// a journal in trouble (disk full) is not hammered, nor the upstream with
/// the batch sent again.
pub const JOURNAL_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Batch {
    plan: Plan,
    evictions_at_read: u64,
    /// The last seq the read looked at (see [`crate::journal::Reader::read_routed`]).
    through: u64,
    /// The linger rule was applied (or waived at shutdown).
    judged: bool,
    /// The rate limiter let it go.
    admitted: bool,
}

#[derive(Debug)]
enum Hand {
    Nothing,
    Empty { from_ahead: bool },
    Batch(Batch),
}

/// A cursor move the driver has been asked for and not yet reported.
#[derive(Debug, Clone, Copy)]
struct Pending {
    to: u64,
    events: usize,
    /// The front step of the plan is complete once the move is stored.
    pop: bool,
    dead_letter: bool,
    /// The upstream took the whole of what was sent (resets the backoff).
    success: bool,
    /// After the move: wait this long, then read again.
    then_pause: Option<Duration>,
}

/// The state machine of one forwarder (see the module doc).
#[derive(Debug)]
pub struct Core {
    settings: ForwarderSettings,
    cursor: u64,
    backoff: Backoff,
    limiter: RateLimiter,
    hand: Hand,
    pending: Option<Pending>,
    asked: Option<Pending>,
    pause: Option<Duration>,
    /// The upstream's last refusal, the reason a dead letter records.
    reason: String,
    /// Where the next read starts when it is past the cursor: the rows up
    /// to here were read and none is for this sink (stream filters).
    read_from: u64,
    /// When the cursor last moved over rows the sink does not take.
    last_skip: Option<Instant>,
}

impl Core {
    pub fn new(settings: ForwarderSettings, cursor: u64, now: Instant) -> Core {
        Core {
            backoff: Backoff::new(settings.retry),
            limiter: RateLimiter::new(settings.max_events_per_sec, now),
            settings,
            cursor,
            hand: Hand::Nothing,
            pending: None,
            asked: None,
            pause: None,
            reason: String::new(),
            read_from: cursor,
            last_skip: None,
        }
    }

    /// The seq the next read starts after.
    fn read_pos(&self) -> u64 {
        self.cursor.max(self.read_from)
    }

    /// Where the read after the batch in hand starts once it is all
    /// delivered (for reading ahead), if there is a batch in hand.
    pub fn after_batch(&self) -> Option<u64> {
        match &self.hand {
            Hand::Batch(b) => b.plan.events().last().map(|e| e.seq.max(b.through)),
            _ => None,
        }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }

    /// The events of the batch in hand (empty without one).
    pub fn events(&self) -> &[StoredEvent] {
        match &self.hand {
            Hand::Batch(b) => b.plan.events(),
            _ => &[],
        }
    }

    /// What to do next.
    pub fn next(&mut self, now: &Now) -> Action {
        if let Some(p) = self.pending.take() {
            let evictions_at_read = match &self.hand {
                Hand::Batch(b) => b.evictions_at_read,
                _ => now.evictions,
            };
            self.asked = Some(p);
            return Action::Advance {
                from: self.cursor,
                to: p.to,
                evictions_at_read,
            };
        }
        if let Some(d) = self.pause.take() {
            return Action::Sleep(d);
        }
        let batch = match &mut self.hand {
            Hand::Nothing => {
                return Action::Read {
                    after: self.read_pos(),
                };
            }
            Hand::Empty { from_ahead: true } => {
                // Read before commits the driver has since seen: read
                // again rather than wait for the next one.
                self.hand = Hand::Nothing;
                return Action::Read {
                    after: self.read_pos(),
                };
            }
            Hand::Empty { from_ahead: false } => return Action::WaitForCommit,
            Hand::Batch(b) => b,
        };
        if !batch.judged {
            batch.judged = true;
            let events = batch.plan.events();
            let oldest = events.iter().map(|e| e.recv_time_us).min().unwrap_or(0);
            let bytes = events.iter().map(StoredEvent::size).sum();
            if let Some(wait) = linger(events.len(), bytes, oldest, now.unix_us, &self.settings) {
                // Committed seqs are not all this sink's, so reaching this
                // one may still leave the batch short: it is read again and
                // waits out the rest of its linger.
                let last = events.last().map_or(self.cursor, |e| e.seq);
                let fill_at =
                    last.saturating_add((self.settings.batch_max_events - events.len()) as u64);
                return Action::Linger { wait, fill_at };
            }
        }
        if !batch.admitted {
            match self.limiter.take(batch.plan.events().len(), now.at) {
                Ok(n) => {
                    batch.admitted = true;
                    if n < batch.plan.events().len() {
                        batch.plan.truncate(n);
                        // What was cut off is this sink's: the cursor must
                        // not pass it with this batch.
                        batch.through = batch.plan.events().last().map_or(self.cursor, |e| e.seq);
                    }
                }
                Err(wait) => return Action::Sleep(wait),
            }
        }
        match batch.plan.next() {
            Step::Done => {
                self.hand = Hand::Nothing;
                Action::Read {
                    after: self.read_pos(),
                }
            }
            Step::DeadLetter(index) => Action::DeadLetter {
                index,
                reason: if self.reason.is_empty() {
                    "rejected by the upstream".to_string()
                } else {
                    self.reason.clone()
                },
            },
            Step::Send(a, b) => {
                if now.evictions != batch.evictions_at_read {
                    // Read again so the gap events go out in place of what
                    // was evicted meanwhile.
                    self.hand = Hand::Nothing;
                    return Action::Read {
                        after: self.read_pos(),
                    };
                }
                Action::Send { range: a..b }
            }
        }
    }

    /// A read after the cursor returned `events` (`from_ahead`: it was the
    /// read-ahead batch), read when the eviction counter was
    /// `evictions_at_read`.
    pub fn on_read(&mut self, events: Vec<StoredEvent>, evictions_at_read: u64, from_ahead: bool) {
        let through = events.last().map_or(self.read_pos(), |e| e.seq);
        self.on_read_routed(
            events,
            through,
            false,
            evictions_at_read,
            from_ahead,
            Instant::now(),
        );
    }

    /// [`Core::on_read`] for a read through stream filters: it looked at
    /// the rows up to `through` (those not in `events` are not for this
    /// sink), and `more` rows may follow at once. Rows passed over move the
    /// cursor with the next delivery, or on their own once
    /// [`SKIP_ADVANCE_ROWS`] have gathered or [`SKIP_ADVANCE_EVERY`] has
    /// passed (a cursor write is flash wear: not one per read).
    pub fn on_read_routed(
        &mut self,
        events: Vec<StoredEvent>,
        through: u64,
        more: bool,
        evictions_at_read: u64,
        from_ahead: bool,
        now: Instant,
    ) {
        let through = through.max(self.read_pos());
        if !events.is_empty() {
            self.hand = Hand::Batch(Batch {
                plan: Plan::new(events),
                evictions_at_read,
                through,
                judged: false,
                admitted: false,
            });
            return;
        }
        self.read_from = through;
        self.hand = if more {
            Hand::Nothing
        } else {
            Hand::Empty { from_ahead }
        };
        let behind = self.read_from.saturating_sub(self.cursor);
        let due = self
            .last_skip
            .is_none_or(|t| now.saturating_duration_since(t) >= SKIP_ADVANCE_EVERY);
        if behind > 0 && (behind >= SKIP_ADVANCE_ROWS || due) {
            self.last_skip = Some(now);
            self.pending = Some(Pending {
                to: self.read_from,
                events: 0,
                pop: false,
                dead_letter: false,
                success: false,
                then_pause: None,
            });
        }
    }

    /// The read failed: try again after a backoff.
    pub fn on_read_failed(&mut self, jitter: f64) -> Duration {
        self.hand = Hand::Nothing;
        let d = self.backoff.fail(None, jitter);
        self.pause = Some(d);
        d
    }

    /// A wait ([`Action::WaitForCommit`], [`Action::Linger`]) ended: read
    /// again.
    pub fn on_woken(&mut self) {
        self.hand = Hand::Nothing;
    }

    /// Shutdown during a linger: what lingers goes out now, as it is.
    pub fn flush(&mut self) {
        if let Hand::Batch(b) = &mut self.hand {
            b.judged = true;
        }
    }

    /// A replay moved the cursor: drop what is in hand and read from there.
    pub fn on_rewind(&mut self, cursor: u64) {
        self.cursor = cursor;
        self.read_from = cursor;
        self.hand = Hand::Nothing;
        self.pending = None;
        self.asked = None;
    }

    /// The upstream answered the [`Action::Send`] just made.
    pub fn on_sent(&mut self, outcome: SendOutcome, jitter: f64) -> Sent {
        let Hand::Batch(batch) = &mut self.hand else {
            return Sent::Unexpected;
        };
        let Step::Send(a, b) = batch.plan.next() else {
            return Sent::Unexpected;
        };
        let len = b - a;
        let seq_at = |i: usize| batch.plan.events()[i].seq;
        let (acked, failure) = match outcome {
            SendOutcome::Ack => (len, None),
            SendOutcome::Retry {
                acked,
                after,
                reason,
            } => (acked.min(len), Some((Some(after), None, reason))),
            SendOutcome::Reject {
                acked,
                index,
                reason,
            } => (acked.min(len), Some((None, index, reason))),
        };
        let Some((retry, index, reason)) = failure.filter(|_| acked < len) else {
            // The last part of the batch: the rows the read passed over
            // after it are not this sink's, and the cursor moves past them.
            let last_part = batch.plan.remaining() == 1 && b == batch.plan.events().len();
            let to = if last_part {
                seq_at(b - 1).max(batch.through)
            } else {
                seq_at(b - 1)
            };
            self.pending = Some(Pending {
                to,
                events: len,
                pop: true,
                dead_letter: false,
                success: true,
                then_pause: None,
            });
            return Sent::Delivered { events: len };
        };
        self.reason = reason;
        let prefix = (acked > 0).then(|| seq_at(a + acked - 1));
        match retry {
            Some(after) => {
                if acked > 0 {
                    // Progress: the upstream is there, only slow to take
                    // everything; the backoff starts over.
                    self.backoff.succeed();
                }
                let delay = self.backoff.fail(after, jitter);
                let attempt = self.backoff.failures();
                match prefix {
                    Some(to) => {
                        self.pending = Some(Pending {
                            to,
                            events: acked,
                            pop: false,
                            dead_letter: false,
                            success: false,
                            then_pause: Some(delay),
                        })
                    }
                    None => {
                        // Read the batch again after the pause: meanwhile
                        // the journal may evict some of it (a gap event then
                        // stands in its place) or a replay move the cursor.
                        self.hand = Hand::Nothing;
                        self.pause = Some(delay);
                    }
                }
                Sent::Retrying {
                    acked,
                    delay,
                    attempt,
                }
            }
            None => {
                batch.plan.skip_front(acked);
                let index = index.and_then(|i| i.checked_sub(acked));
                batch.plan.rejected(index);
                if let Some(to) = prefix {
                    self.pending = Some(Pending {
                        to,
                        events: acked,
                        pop: false,
                        dead_letter: false,
                        success: false,
                        then_pause: None,
                    });
                }
                Sent::Rejected { acked }
            }
        }
    }

    /// The journal answered the [`Action::DeadLetter`] just asked for.
    pub fn on_dead_lettered(&mut self, stored: bool) {
        let seq = match &self.hand {
            Hand::Batch(b) => match b.plan.next() {
                Step::DeadLetter(i) => b.plan.events()[i].seq,
                _ => return,
            },
            _ => return,
        };
        if stored {
            self.pending = Some(Pending {
                to: seq,
                events: 1,
                pop: true,
                dead_letter: true,
                success: false,
                then_pause: None,
            });
        } else {
            self.hand = Hand::Nothing;
            self.pause = Some(JOURNAL_RETRY);
        }
    }

    /// The journal answered the [`Action::Advance`] just asked for:
    /// `Ok(Some(c))` the cursor is at `c`, `Ok(None)` a replay moved it.
    pub fn on_advanced(&mut self, result: Result<Option<u64>, &JournalError>) -> Advanced {
        let Some(p) = self.asked.take() else {
            return Advanced::Failed;
        };
        match result {
            Ok(Some(moved)) => {
                self.cursor = moved;
                if p.success {
                    self.backoff.succeed();
                }
                if let Hand::Batch(b) = &mut self.hand
                    && p.pop
                {
                    b.plan.done();
                }
                if moved < p.to {
                    // Gap events now stand in the range just delivered: read
                    // again from before them.
                    self.hand = Hand::Nothing;
                }
                if let Some(d) = p.then_pause {
                    self.hand = Hand::Nothing;
                    self.pause = Some(d);
                }
                Advanced::Moved {
                    cursor: moved,
                    delivered: if p.dead_letter { 0 } else { p.events as u64 },
                    dead_letter: p.dead_letter,
                }
            }
            Ok(None) => {
                self.hand = Hand::Nothing;
                Advanced::Rewound
            }
            Err(_) => {
                self.hand = Hand::Nothing;
                self.pause = Some(JOURNAL_RETRY);
                Advanced::Failed
            }
        }
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
            lanes: vec![None],
            streams: crate::route::StreamFilter::all(),
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

    /// A journal of `n` events (seqs 1..=n) and an upstream answering from
    /// a script, driven through [`Core`] the way the forwarder drives it.
    /// Returns what the upstream kept, in order, the dead-lettered seqs and
    /// the number of sends.
    struct Sim {
        events: Vec<StoredEvent>,
        core: Core,
        upstream: Vec<u64>,
        dead: Vec<u64>,
        sends: usize,
        sleeps: Vec<Duration>,
    }

    fn settings(max: usize) -> ForwarderSettings {
        ForwarderSettings {
            batch_linger: Duration::ZERO,
            batch_max_events: max,
            ..lingering(0)
        }
    }

    impl Sim {
        fn new(n: u64, max: usize) -> Sim {
            Sim {
                events: (1..=n).map(ev).collect(),
                core: Core::new(settings(max), 0, Instant::now()),
                upstream: Vec::new(),
                dead: Vec::new(),
                sends: 0,
                sleeps: Vec::new(),
            }
        }

        fn now(&self) -> Now {
            Now {
                at: Instant::now(),
                unix_us: 0,
                evictions: 0,
            }
        }

        /// Runs until the core waits for commits; `answer` maps the batch
        /// sent to the upstream's answer (and records what it kept).
        fn run(&mut self, mut answer: impl FnMut(&[StoredEvent]) -> SendOutcome) {
            for _ in 0..100_000 {
                let now = self.now();
                match self.core.next(&now) {
                    Action::Read { after } => {
                        let max = self.core.settings.batch_max_events;
                        let batch: Vec<StoredEvent> = self
                            .events
                            .iter()
                            .filter(|e| e.seq > after)
                            .take(max)
                            .cloned()
                            .collect();
                        self.core.on_read(batch, 0, false);
                    }
                    Action::WaitForCommit => return,
                    Action::Linger { .. } => self.core.flush(),
                    Action::Sleep(d) => self.sleeps.push(d),
                    Action::Send { range } => {
                        self.sends += 1;
                        let slice = self.core.events()[range].to_vec();
                        let outcome = answer(&slice);
                        let kept = match &outcome {
                            SendOutcome::Ack => slice.len(),
                            SendOutcome::Retry { acked, .. }
                            | SendOutcome::Reject { acked, .. } => *acked,
                        };
                        self.upstream.extend(slice.iter().take(kept).map(|e| e.seq));
                        self.core.on_sent(outcome, 1.0);
                    }
                    Action::DeadLetter { index, .. } => {
                        self.dead.push(self.core.events()[index].seq);
                        self.core.on_dead_lettered(true);
                    }
                    Action::Advance { from, to, .. } => {
                        assert_eq!(from, self.core.cursor());
                        assert!(to > from, "a cursor only moves forward: {from} -> {to}");
                        self.core.on_advanced(Ok(Some(to)));
                    }
                }
            }
            panic!("the core did not settle");
        }
    }

    #[test]
    fn acked_batches_move_the_cursor_batch_by_batch() {
        let mut sim = Sim::new(250, 100);
        sim.run(|_| SendOutcome::Ack);
        assert_eq!(sim.upstream, (1..=250).collect::<Vec<_>>());
        assert_eq!(sim.sends, 3);
        assert_eq!(sim.core.cursor(), 250);
    }

    #[test]
    fn a_partial_ack_keeps_the_prefix_and_resends_only_the_rest_after_a_pause() {
        let mut sim = Sim::new(100, 100);
        let mut first = true;
        sim.run(|batch| {
            if std::mem::take(&mut first) {
                assert_eq!(batch.len(), 100);
                SendOutcome::Retry {
                    acked: 40,
                    after: Some(Duration::from_secs(2)),
                    reason: "publish timed out".into(),
                }
            } else {
                assert_eq!(batch[0].seq, 41, "resent from the first unacknowledged");
                SendOutcome::Ack
            }
        });
        assert_eq!(sim.upstream, (1..=100).collect::<Vec<_>>());
        assert_eq!(sim.sleeps, vec![Duration::from_secs(2)]);
        assert_eq!(sim.core.cursor(), 100);
        assert_eq!(sim.core.failures(), 0, "success resets the backoff");
    }

    #[test]
    fn a_partial_ack_then_a_named_rejection_dead_letters_only_that_event() {
        let mut sim = Sim::new(50, 50);
        sim.run(|batch| match batch.iter().position(|e| e.seq == 30) {
            Some(i) => SendOutcome::Reject {
                acked: i,
                index: Some(i),
                reason: "bad quantity".into(),
            },
            None => SendOutcome::Ack,
        });
        assert_eq!(sim.dead, vec![30]);
        let expected: Vec<u64> = (1..=50).filter(|s| *s != 30).collect();
        assert_eq!(sim.upstream, expected);
        assert_eq!(
            sim.sends, 2,
            "the batch, then what followed the poison event"
        );
    }

    #[test]
    fn a_partial_ack_then_an_unnamed_rejection_bisects_the_rest() {
        let mut sim = Sim::new(64, 64);
        sim.run(|batch| {
            if let Some(i) = batch.iter().position(|e| e.seq == 60) {
                // Everything before the poison event goes through.
                SendOutcome::Reject {
                    acked: i.min(8),
                    index: None,
                    reason: "refused".into(),
                }
            } else {
                SendOutcome::Ack
            }
        });
        assert_eq!(sim.dead, vec![60]);
        let expected: Vec<u64> = (1..=64).filter(|s| *s != 60).collect();
        assert_eq!(sim.upstream, expected);
    }

    #[test]
    fn an_acked_count_beyond_the_batch_or_a_rejection_of_nothing_left_is_an_ack() {
        let mut sim = Sim::new(10, 10);
        sim.run(|b| SendOutcome::Retry {
            acked: b.len() + 5,
            after: None,
            reason: "odd".into(),
        });
        assert_eq!(sim.upstream, (1..=10).collect::<Vec<_>>());
        assert!(sim.sleeps.is_empty());
    }

    #[test]
    fn a_plain_retry_keeps_the_cursor_and_reads_the_batch_again() {
        let mut sim = Sim::new(10, 10);
        let mut n = 0;
        sim.run(|_| {
            n += 1;
            if n < 4 {
                SendOutcome::retry(None, "503")
            } else {
                SendOutcome::Ack
            }
        });
        assert_eq!(sim.upstream, (1..=10).collect::<Vec<_>>());
        assert_eq!(sim.sleeps.len(), 3);
        assert!(
            sim.sleeps.windows(2).all(|w| w[0] < w[1]),
            "backoff grows: {:?}",
            sim.sleeps
        );
    }

    #[test]
    fn an_eviction_after_the_read_sends_nothing_of_the_stale_batch() {
        let mut core = Core::new(settings(10), 0, Instant::now());
        let now = |evictions| Now {
            at: Instant::now(),
            unix_us: 0,
            evictions,
        };
        assert_eq!(core.next(&now(0)), Action::Read { after: 0 });
        core.on_read((1..=5).map(ev).collect(), 0, false);
        assert_eq!(core.next(&now(1)), Action::Read { after: 0 });
    }

    #[test]
    fn a_cursor_short_of_the_batch_end_after_an_ack_reads_again() {
        // The journal placed gap events in the range: it moved the cursor
        // only to before them.
        let mut core = Core::new(settings(10), 0, Instant::now());
        let now = Now {
            at: Instant::now(),
            unix_us: 0,
            evictions: 0,
        };
        core.next(&now);
        core.on_read((1..=5).map(ev).collect(), 0, false);
        assert_eq!(core.next(&now), Action::Send { range: 0..5 });
        core.on_sent(SendOutcome::Ack, 0.5);
        assert_eq!(
            core.next(&now),
            Action::Advance {
                from: 0,
                to: 5,
                evictions_at_read: 0
            }
        );
        core.on_advanced(Ok(Some(3)));
        assert_eq!(core.next(&now), Action::Read { after: 3 });
    }

    #[test]
    fn a_journal_that_cannot_store_the_cursor_pauses_and_resends() {
        let mut core = Core::new(settings(10), 0, Instant::now());
        let now = Now {
            at: Instant::now(),
            unix_us: 0,
            evictions: 0,
        };
        core.next(&now);
        core.on_read((1..=5).map(ev).collect(), 0, false);
        core.next(&now);
        core.on_sent(SendOutcome::Ack, 0.5);
        core.next(&now);
        let err = JournalError::Sqlite {
            path: "/tmp/j.db".into(),
            detail: "disk full".into(),
        };
        assert_eq!(core.on_advanced(Err(&err)), Advanced::Failed);
        assert_eq!(core.next(&now), Action::Sleep(JOURNAL_RETRY));
        assert_eq!(core.next(&now), Action::Read { after: 0 });
    }

    #[test]
    fn a_small_young_batch_lingers_and_a_rewind_drops_what_is_in_hand() {
        let mut core = Core::new(lingering(250), 0, Instant::now());
        let now = Now {
            at: Instant::now(),
            unix_us: 1_000_000,
            evictions: 0,
        };
        core.next(&now);
        let mut events: Vec<StoredEvent> = (1..=3).map(ev).collect();
        for e in &mut events {
            e.recv_time_us = 1_000_000;
        }
        core.on_read(events, 0, false);
        assert_eq!(
            core.next(&now),
            Action::Linger {
                wait: Duration::from_millis(250),
                fill_at: 3 + 997
            }
        );
        core.on_rewind(0);
        assert_eq!(core.next(&now), Action::Read { after: 0 });
    }

    #[test]
    fn an_empty_read_waits_for_a_commit_unless_it_was_read_ahead() {
        let mut core = Core::new(settings(10), 7, Instant::now());
        let now = Now {
            at: Instant::now(),
            unix_us: 0,
            evictions: 0,
        };
        core.next(&now);
        core.on_read(Vec::new(), 0, true);
        assert_eq!(core.next(&now), Action::Read { after: 7 });
        core.on_read(Vec::new(), 0, false);
        assert_eq!(core.next(&now), Action::WaitForCommit);
        core.on_woken();
        assert_eq!(core.next(&now), Action::Read { after: 7 });
    }

    #[test]
    fn the_rate_limiter_shortens_a_batch_before_it_is_sent() {
        let mut s = settings(100);
        s.max_events_per_sec = 10;
        let mut core = Core::new(s, 0, Instant::now());
        let now = Now {
            at: Instant::now(),
            unix_us: 0,
            evictions: 0,
        };
        core.next(&now);
        core.on_read((1..=100).map(ev).collect(), 0, false);
        assert_eq!(core.next(&now), Action::Send { range: 0..10 });
        core.on_sent(SendOutcome::Ack, 0.5);
        assert!(matches!(core.next(&now), Action::Advance { to: 10, .. }));
        core.on_advanced(Ok(Some(10)));
        assert_eq!(core.next(&now), Action::Read { after: 10 });
        core.on_read((11..=100).map(ev).collect(), 0, false);
        assert!(matches!(core.next(&now), Action::Sleep(_)), "bucket empty");
    }

    #[test]
    fn rows_passed_over_move_the_cursor_only_in_bulk_or_now_and_then() {
        let t0 = Instant::now();
        let mut core = Core::new(settings(100), 0, t0);
        let now = Now {
            at: t0,
            unix_us: 0,
            evictions: 0,
        };
        assert_eq!(core.next(&now), Action::Read { after: 0 });
        // A read that passed over 20,000 rows of other streams.
        core.on_read_routed(Vec::new(), 20_000, true, 0, false, t0);
        assert_eq!(
            core.next(&now),
            Action::Advance {
                from: 0,
                to: 20_000,
                evictions_at_read: 0
            }
        );
        core.on_advanced(Ok(Some(20_000)));
        assert_eq!(core.next(&now), Action::Read { after: 20_000 });
        // A few more, just after: no cursor write, but the next read starts
        // after them.
        core.on_read_routed(Vec::new(), 20_100, false, 0, false, t0);
        assert_eq!(core.next(&now), Action::WaitForCommit);
        core.on_woken();
        assert_eq!(core.next(&now), Action::Read { after: 20_100 });
        // Later, the few move it too.
        let later = t0 + SKIP_ADVANCE_EVERY;
        core.on_read_routed(Vec::new(), 20_200, false, 0, false, later);
        assert!(matches!(
            core.next(&now),
            Action::Advance { to: 20_200, .. }
        ));
    }

    #[test]
    fn a_delivered_batch_moves_the_cursor_over_the_rows_its_read_passed_over() {
        let t0 = Instant::now();
        let mut core = Core::new(settings(100), 0, t0);
        let now = Now {
            at: t0,
            unix_us: 0,
            evictions: 0,
        };
        core.next(&now);
        core.on_read_routed(vec![ev(7), ev(9)], 500, false, 0, false, t0);
        assert_eq!(core.after_batch(), Some(500));
        assert_eq!(core.next(&now), Action::Send { range: 0..2 });
        core.on_sent(SendOutcome::Ack, 0.5);
        assert!(matches!(core.next(&now), Action::Advance { to: 500, .. }));
    }
}
