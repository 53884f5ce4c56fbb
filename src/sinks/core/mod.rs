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

mod batching;
mod plan;
mod rate;
mod retry;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::event::StoredEvent;
use crate::journal::JournalError;

pub use batching::{DEFAULT_BATCH_LINGER, ForwarderSettings, PER_EVENT_BATCH_MAX_BYTES, linger};
pub use plan::{Plan, Step};
pub use rate::RateLimiter;
pub use retry::{RetryBackoff, RetryPolicy};

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
    backoff: RetryBackoff,
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
            backoff: RetryBackoff::new(settings.retry),
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
        // Only rows of other streams are worth a cursor move of their own:
        // what a sink with stream filters passes over would otherwise pin
        // retention. A lane of an unfiltered sink passes over the other
        // class's rows, which retention already counts as behind it, so its
        // cursor stays at its own last event (what `status` shows for it)
        // and only the next read starts further on.
        let filtered = !self.settings.streams.is_all();
        if !events.is_empty() {
            let through = match events.last() {
                Some(last) if !filtered => last.seq.max(self.read_pos()),
                _ => through,
            };
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
        if filtered && behind > 0 && (behind >= SKIP_ADVANCE_ROWS || due) {
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
