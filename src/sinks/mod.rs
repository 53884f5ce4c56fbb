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
//! The bookkeeping is a plain state machine, [`core::Core`], tested without
//! I/O; [`Forwarder::run`] is the thin loop that does what it says. A
//! forwarder must never write to the journal except through
//! [`Journal::advance_delivered`] and [`Journal::dead_letter`], and never
//! skip an event without one of them.
//!
//! Every sink implements [`Sink`] and passes the sink conformance suite
//! (`tests/conformance/`): acknowledgement, partial acknowledgement,
//! retries with and without `Retry-After`, rejections with and without the
//! event named, timeouts, slowness and a panicking sink.
//!
//! - [`https`]: CloudEvents batches over HTTPS.

pub mod core;
pub mod https;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use self::core::{
    Action, Advanced, Backoff, Core, DEFAULT_BATCH_LINGER, ForwarderSettings, Now, Plan,
    RateLimiter, RetryPolicy, SendOutcome, Sent, Step, linger,
};
use crate::event::StoredEvent;
use crate::journal::{Journal, JournalError, Reader, unix_micros};
use crate::status::SinkStatus;

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
}

/// Drives one sink: the thin I/O loop around [`Core`].
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
    fn spawn_read(&self, reader: &Arc<Mutex<Reader>>, cursor: u64) -> ReadTask<S::Encoded> {
        let reader = reader.clone();
        let sink = self.sink.clone();
        let (name, max_events, max_bytes) = (
            self.settings.name.clone(),
            self.settings.batch_max_events,
            self.settings.batch_max_bytes,
        );
        let poisoned = self.lock_failed();
        tokio::task::spawn_blocking(move || {
            let events = {
                let reader = reader.lock().map_err(|_| poisoned)?;
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

    /// Encodes a part of a batch on a blocking thread.
    async fn encode_part(&self, part: Vec<StoredEvent>) -> Option<S::Encoded> {
        let sink = self.sink.clone();
        tokio::task::spawn_blocking(move || sink.encode(&part))
            .await
            .ok()
    }

    fn cursor(&self, reader: &Arc<Mutex<Reader>>) -> Result<u64, JournalError> {
        match reader.lock() {
            Ok(r) => r.cursor(&self.settings.name),
            Err(_) => Err(self.lock_failed()),
        }
    }

    fn record_error(&self, message: String) {
        self.status
            .update(|p| p.last_error = Some((now_us(), message)));
    }

    /// Connects the sink, retrying with backoff; false at shutdown.
    async fn connect(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(self.settings.retry);
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
        // The rewind counter last acted on: waits mark a rewind as seen when
        // they wake for it, so the loop compares counters instead of asking
        // the watch whether it changed.
        let mut rewinds_seen = *rewinds.borrow_and_update();
        let cursor = match self.cursor(&reader) {
            Ok(c) => c,
            Err(e) => {
                error!(sink = %name, error = %e, "forwarder cannot read its cursor; not forwarding");
                self.record_error(e.to_string());
                return;
            }
        };
        self.status.update(|p| {
            p.cursor = cursor;
            p.running = true;
        });
        info!(sink = %name, cursor, "forwarder started");
        if self.connect(&shutdown).await {
            self.drive(
                cursor,
                &reader,
                &mut committed,
                &mut rewinds,
                &mut rewinds_seen,
                &shutdown,
            )
            .await;
        }
        self.sink.close().await;
        let cursor = self.status.progress().cursor;
        self.status.update(|p| p.running = false);
        info!(sink = %name, cursor, "forwarder stopped");
    }

    async fn drive(
        &self,
        cursor: u64,
        reader: &Arc<Mutex<Reader>>,
        committed: &mut tokio::sync::watch::Receiver<u64>,
        rewinds: &mut tokio::sync::watch::Receiver<u64>,
        rewinds_seen: &mut u64,
        shutdown: &CancellationToken,
    ) {
        let name = &self.settings.name;
        let mut core = Core::new(self.settings.clone(), cursor, Instant::now());
        let mut ahead: Option<Ahead<S::Encoded>> = None;
        let mut encoded: Option<Encoded<S::Encoded>> = None;
        // At shutdown only the bookkeeping of what is already upstream is
        // finished, plus one send of a batch that was lingering.
        let mut stopping = false;
        let mut flush = false;
        loop {
            stopping |= shutdown.is_cancelled();
            let action = core.next(&Now {
                at: Instant::now(),
                unix_us: now_us(),
                evictions: self.journal.evictions(),
            });
            if stopping {
                let allowed = match action {
                    Action::Advance { .. } | Action::DeadLetter { .. } => true,
                    Action::Send { .. } => std::mem::take(&mut flush),
                    _ => false,
                };
                if !allowed {
                    break;
                }
            }
            match action {
                Action::Read { after } => {
                    // Mark what we have seen before reading, so a commit
                    // that lands during the read wakes us again.
                    committed.borrow_and_update();
                    let rewinds_now = *rewinds.borrow_and_update();
                    if rewinds_now != *rewinds_seen {
                        *rewinds_seen = rewinds_now;
                        match self.cursor(reader) {
                            Ok(c) => {
                                info!(sink = %name, from = after, to = c, "cursor moved by a replay");
                                core.on_rewind(c);
                                self.status.update(|p| p.cursor = c);
                                ahead = None;
                                continue;
                            }
                            Err(e) => warn!(sink = %name, error = %e, "cannot reload cursor"),
                        }
                    }
                    let (evictions_at_read, read, from_ahead) = match ahead.take() {
                        Some(a) if a.after == after => {
                            (a.evictions_at_read, self.join_read(a.task).await, true)
                        }
                        _ => {
                            let e = self.journal.evictions();
                            let task = self.spawn_read(reader, after);
                            (e, self.join_read(task).await, false)
                        }
                    };
                    match read {
                        Ok(Prepared { events, encoded: e }) => {
                            encoded = match (events.first(), events.last(), e) {
                                (Some(f), Some(l), Some(body)) => Some(Encoded {
                                    first: f.seq,
                                    last: l.seq,
                                    len: events.len(),
                                    body,
                                }),
                                _ => None,
                            };
                            core.on_read(events, evictions_at_read, from_ahead);
                        }
                        Err(e) => {
                            let delay = core.on_read_failed(rand::rng().random());
                            warn!(sink = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "journal read failed; retrying");
                            self.record_error(e.to_string());
                        }
                    }
                }
                Action::WaitForCommit => match wait_for_work(committed, rewinds, shutdown).await {
                    Wait::Work => core.on_woken(),
                    Wait::Shutdown => stopping = true,
                },
                Action::Linger { wait, fill_at } => {
                    match linger_wait(committed, rewinds, fill_at, wait, shutdown).await {
                        Wait::Work => {
                            core.on_woken();
                            ahead = None;
                        }
                        Wait::Shutdown => {
                            core.flush();
                            stopping = true;
                            flush = true;
                        }
                    }
                }
                Action::Sleep(d) => {
                    if let Wait::Shutdown = sleep_or_shutdown(d, shutdown).await {
                        stopping = true;
                    }
                }
                Action::Send { range } => {
                    let outcome = {
                        let slice = &core.events()[range.clone()];
                        let (first, last) = (slice[0].seq, slice[slice.len() - 1].seq);
                        let whole = encoded.take_if(|e| {
                            e.first == first && e.last == last && e.len == slice.len()
                        });
                        let body = match whole {
                            Some(e) => {
                                // Read and encode the next batch while this
                                // one is upstream; it is used once the
                                // cursor is at `last`, that is after an
                                // acknowledgement.
                                ahead = Some(Ahead {
                                    after: last,
                                    evictions_at_read: self.journal.evictions(),
                                    task: self.spawn_read(reader, last),
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
                            break;
                        };
                        self.status.update(|p| p.attempts += 1);
                        let outcome = self.sink.send(slice, body).await;
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
                                warn!(sink = %name, first, last, acked, index = ?index, reason = %reason, "upstream rejected the batch");
                                self.record_error(reason.clone());
                            }
                        }
                        (outcome, first, last)
                    };
                    let (outcome, first, last) = outcome;
                    let reason = match &outcome {
                        SendOutcome::Retry { reason, .. } => reason.clone(),
                        _ => String::new(),
                    };
                    if let Sent::Retrying {
                        acked,
                        delay,
                        attempt,
                    } = core.on_sent(outcome, rand::rng().random())
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
                    let Some(ev) = core.events().get(index).cloned() else {
                        break;
                    };
                    let (seq, id) = (ev.seq, ev.id.clone());
                    match self.journal.dead_letter(name, ev, &reason).await {
                        Ok(dl) => {
                            error!(sink = %name, seq, id = %id, dead_letter = dl, reason = %reason, "event dead-lettered: the upstream rejects it for good");
                            core.on_dead_lettered(true);
                        }
                        Err(e) => {
                            error!(sink = %name, seq, error = %e, "cannot record the dead letter; the batch will be sent again");
                            self.record_error(e.to_string());
                            core.on_dead_lettered(false);
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
                        .advance_delivered(name, from, to, evictions_at_read)
                        .await;
                    if let Err(e) = &result {
                        error!(sink = %name, error = %e, "cannot store the cursor; the batch will be sent again");
                        self.record_error(e.to_string());
                    }
                    match core.on_advanced(result.as_ref().map(|c| *c)) {
                        Advanced::Moved {
                            cursor,
                            delivered,
                            dead_letter,
                        } => self.status.update(|p| {
                            p.cursor = cursor;
                            if dead_letter {
                                p.dead_letters += 1;
                            } else {
                                p.delivered += delivered;
                                p.batches += 1;
                                if core.failures() == 0 {
                                    p.consecutive_failures = 0;
                                }
                                p.last_success_us = Some(now_us());
                            }
                        }),
                        Advanced::Rewound => {
                            // A replay moved the cursor while the batch was
                            // upstream: start again from the new cursor.
                            let c = self.cursor(reader).unwrap_or(core.cursor());
                            core.on_rewind(c);
                            self.status.update(|p| p.cursor = c);
                            ahead = None;
                        }
                        Advanced::Failed => {}
                    }
                }
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
