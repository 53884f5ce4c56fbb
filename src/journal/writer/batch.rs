//! One batch of requests, one transaction: prepare (the dedup index, the
//! commit's durability, room for the events), begin, apply every request,
//! commit, then publish (statistics, signals, answers) or abort (the
//! in-memory state goes back with the transaction). No caller is answered
//! and nothing is signalled before COMMIT has returned: an append answered
//! with a seq is durable. A failed commit is answered as failed to every
//! caller in the batch, never as partly stored.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use hashbrown::HashMap;
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::cursors::CURSOR_WRITE_AFTER;
use super::{
    Fatal, INSERT_EVENT, Signals, Undo, WriterState, bind_event, meta_add, meta_set, take_seq,
};
use crate::event::NewEvent;
use crate::journal::Committed;
use crate::journal::dedup::{Verified, key_hash};
use crate::journal::schema::sqlite_err;
use crate::journal::{self, AppendOutcome, AppendReply, JournalError, Request};
use crate::units::unix_micros;

/// Per-row overhead on disk beyond the accounted event size (row header,
/// integer columns, B-tree cell).
const ROW_OVERHEAD: u64 = 64;

/// How often a clock still behind the last receive time is logged again.
const CLOCK_BEHIND_WARN_EVERY: Duration = Duration::from_secs(3600);

/// The `streams` table and `meta.last_seq` are written with an event commit
/// (`streams_due`), not with every commit: under a trickle they were two of
/// the three pages each commit wrote. Start-up reads the rows committed
/// since (see [`STREAM_HEADS`](crate::journal::schema::STREAM_HEADS)), so
/// the events between two flushes bound that scan. The same flush extends
/// `critical`, so it also bounds the rows a read of the critical lane looks
/// at one by one (those after it and after the lane's cursor).
///
/// A flush costs three pages (the counters, `meta`, `critical`): up to 12
/// KB with the fsync. Every second, that was 1.2 KB per event at 10
/// events/s and 0.1 KB at 100/s; so a flush waits for
/// [`STREAMS_FLUSH_MIN_EVENTS`] events (at 100/s, one every ~10 s), for
/// [`STREAMS_FLUSH_MAX_AGE`] under a trickle, and comes at once after
/// [`STREAMS_FLUSH_EVENTS`].
const STREAMS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const STREAMS_FLUSH_MIN_EVENTS: u64 = 1_024;
const STREAMS_FLUSH_MAX_AGE: Duration = Duration::from_secs(60);
const STREAMS_FLUSH_EVENTS: u64 = 16_384;

/// Whether the stream counters are due to be written with this commit,
/// `events` committed and `age` passed since they last were.
fn streams_due(events: u64, age: Duration) -> bool {
    events >= STREAMS_FLUSH_EVENTS
        || (events >= STREAMS_FLUSH_MIN_EVENTS && age >= STREAMS_FLUSH_INTERVAL)
        || age >= STREAMS_FLUSH_MAX_AGE
}

pub(super) enum Reply {
    Append(oneshot::Sender<AppendReply>, AppendReply),
    Unit(
        oneshot::Sender<Result<(), JournalError>>,
        Result<(), JournalError>,
    ),
    Advance(
        oneshot::Sender<Result<Option<u64>, JournalError>>,
        Result<Option<u64>, JournalError>,
    ),
    Seq(
        oneshot::Sender<Result<u64, JournalError>>,
        Result<u64, JournalError>,
    ),
    Id(
        oneshot::Sender<Result<i64, JournalError>>,
        Result<i64, JournalError>,
    ),
}

impl Reply {
    fn fail(self, e: &JournalError) -> Reply {
        match self {
            Reply::Append(tx, Ok(_)) => Reply::Append(tx, Err((e.clone(), Vec::new()))),
            Reply::Unit(tx, Ok(_)) => Reply::Unit(tx, Err(e.clone())),
            Reply::Advance(tx, Ok(_)) => Reply::Advance(tx, Err(e.clone())),
            Reply::Seq(tx, Ok(_)) => Reply::Seq(tx, Err(e.clone())),
            Reply::Id(tx, Ok(_)) => Reply::Id(tx, Err(e.clone())),
            other => other,
        }
    }

    pub(super) fn send(self) {
        // A caller that gave up waiting dropped its receiver; nothing to do.
        match self {
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Unit(tx, r) => drop(tx.send(r)),
            Reply::Advance(tx, r) => drop(tx.send(r)),
            Reply::Seq(tx, r) => drop(tx.send(r)),
            Reply::Id(tx, r) => drop(tx.send(r)),
        }
    }
}

/// What [`WriterState::prepare`] leaves for the transaction.
struct Prepared {
    /// The requests still to apply: without the dedup index, appends are
    /// answered before the transaction and the rest goes on.
    batch: Vec<Request>,
    /// The transaction commits without an fsync (cursor moves alone, see
    /// [`WriterState::relax_sync`]): full durability is restored after it.
    relaxed: bool,
    /// An error refuses every append of the batch; the other requests
    /// still apply.
    room: Result<(), JournalError>,
}

/// What [`WriterState::apply`] did in the open transaction: the answers
/// held back until the commit, what a failed commit undoes, and what a
/// committed one reports.
struct Applied {
    undo: Undo,
    /// Appends and lazy cursor moves alone: the lazy moves' rows wait
    /// until due (`cursors.rs`); any other request writes them now.
    plain: bool,
    replies: Vec<Reply>,
    advanced: bool,
    rewound: bool,
    appended: u64,
    duplicates: u64,
}

/// The next stream sequence of `(source, stream)`, remembering in `undo`
/// the value before the batch touched it.
fn bump_stream(
    streams: &mut HashMap<String, HashMap<String, u64>>,
    source: &str,
    stream: &str,
    undo: &mut Undo,
) -> u64 {
    // Lookups by &str first: allocation only for a stream's first event
    // in a batch.
    let per_source = match streams.get_mut(source) {
        Some(m) => m,
        None => streams.entry(source.to_string()).or_default(),
    };
    let (prev, next) = match per_source.get_mut(stream) {
        Some(v) => {
            let prev = *v;
            *v += 1;
            (Some(prev), *v)
        }
        None => {
            per_source.insert(stream.to_string(), 1);
            (None, 1)
        }
    };
    let touched = match undo.streams.get_mut(source) {
        Some(m) => m,
        None => undo.streams.entry(source.to_string()).or_default(),
    };
    if !touched.contains_key(stream) {
        touched.insert(stream.to_string(), prev);
    }
    next
}

impl WriterState {
    /// Applies one batch of requests: one transaction, then the answers.
    /// The phases run in this order and no other: the answers and signals
    /// wait for COMMIT (an ack means durable).
    pub(super) fn process(&mut self, batch: Vec<Request>, signals: &Signals) {
        let Some(Prepared {
            batch,
            relaxed,
            room,
        }) = self.prepare(batch)
        else {
            return;
        };
        let (undo, recv_us) = match self.begin() {
            Ok(begun) => begun,
            Err(e) => {
                error!(error = %e, "journal: cannot begin a transaction");
                for r in batch {
                    fail_request(r, &e);
                }
                return;
            }
        };
        let (applied, failed) = self.apply(batch, &room, recv_us, undo);
        match self.commit(&applied, failed, relaxed) {
            Ok(()) => self.publish(applied, relaxed, signals),
            Err(e) => self.abort(applied, e),
        }
    }

    /// Before the transaction: the dedup index for appends, the commit's
    /// durability, and room for the events (in transactions of its own).
    /// Every request it refuses is answered here; `None` when none is left.
    fn prepare(&mut self, mut batch: Vec<Request>) -> Option<Prepared> {
        let is_append = |r: &Request| matches!(r, Request::Append { .. });
        if batch.iter().any(is_append)
            && let Err(e) = self.ensure_dedup()
        {
            // Storing without the index could store a redelivered event
            // twice; the sources retry and the next append tries again.
            error!(error = %e, "journal: cannot read the dedup index; appends are refused until it can be read");
            let (appends, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(is_append);
            for r in appends {
                fail_request(r, &e);
            }
            batch = rest;
            if batch.is_empty() {
                return None;
            }
        }
        let cursors_only = batch.iter().all(|r| matches!(r, Request::Advance { .. }));
        if let Err(e) = self.relax_sync(cursors_only) {
            // Never commit events without the configured durability.
            error!(error = %e, "journal: cannot set the commit durability");
            for r in batch {
                fail_request(r, &e);
            }
            return None;
        }
        let relaxed = self.relaxed_sync;
        let incoming: u64 = batch
            .iter()
            .map(|r| match r {
                Request::Append { events, .. } => {
                    events.iter().map(|e| e.size() as u64 + ROW_OVERHEAD).sum()
                }
                _ => 0,
            })
            .sum();
        let room = if incoming > 0 {
            self.make_room(incoming)
        } else {
            Ok(())
        };
        Some(Prepared {
            batch,
            relaxed,
            room,
        })
    }

    /// Opens the batch's transaction: what a failed commit must undo, and
    /// the receive time every event of the batch gets.
    fn begin(&mut self) -> Result<(Undo, i64), JournalError> {
        let undo = Undo {
            next_seq: self.next_seq,
            last_recv_us: self.last_recv_us,
            streams: HashMap::new(),
            cursors: Vec::new(),
            retention_through: self.retention_through,
        };
        self.dedup.begin();
        self.texts.begin();
        self.exec("BEGIN IMMEDIATE").map_err(|e| self.err(e))?;
        Ok((undo, self.recv_now()))
    }

    /// Applies every request in the open transaction. Nothing is answered
    /// here: the replies wait for the commit. The error is the request that
    /// lost the transaction; every later one is answered as failed.
    fn apply(
        &mut self,
        batch: Vec<Request>,
        room: &Result<(), JournalError>,
        recv_us: i64,
        mut undo: Undo,
    ) -> (Applied, Option<JournalError>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut advanced = false;
        let mut rewound = false;
        let mut appended = 0u64;
        let mut duplicates = 0u64;
        let mut failed: Option<JournalError> = None;
        let plain = batch.iter().all(|r| {
            matches!(
                r,
                Request::Append { .. } | Request::Advance { lazy: true, .. }
            )
        });
        for req in batch {
            if failed.is_some() {
                // The transaction is already lost; answer the rest as failed.
                if let Some(reply) = reply_slot(req) {
                    replies.push(reply);
                }
                continue;
            }
            match req {
                Request::Append { events, reply, .. } => {
                    if let Err(e) = room {
                        replies.push(Reply::Append(reply, Err((e.clone(), events))));
                        continue;
                    }
                    match self.append(&events, recv_us, &mut undo) {
                        Ok(out) => {
                            for o in &out {
                                match o {
                                    AppendOutcome::Stored { .. } => appended += 1,
                                    AppendOutcome::Duplicate { .. } => duplicates += 1,
                                }
                            }
                            replies.push(Reply::Append(reply, Ok((out, events))));
                        }
                        Err(e) => {
                            failed = Some(e);
                            replies.push(Reply::Append(reply, Ok((Vec::new(), Vec::new()))));
                        }
                    }
                }
                Request::Advance {
                    sink,
                    from,
                    to,
                    read_at_evictions,
                    lazy,
                    reply,
                } => match self.advance(
                    &sink,
                    from,
                    to,
                    read_at_evictions,
                    (!lazy).then_some(&mut undo),
                ) {
                    Ok(moved) => {
                        advanced |= moved.is_some();
                        replies.push(Reply::Advance(reply, Ok(moved)));
                    }
                    Err(Fatal(e)) => {
                        failed = Some(e);
                        replies.push(Reply::Advance(reply, Ok(None)));
                    }
                },
                Request::Rewind {
                    sink,
                    class,
                    to,
                    reply,
                } => match self.rewind(&sink, class, to, &mut undo) {
                    Ok(r) => {
                        rewound |= r.is_ok();
                        replies.push(Reply::Seq(reply, r));
                    }
                    Err(Fatal(e)) => {
                        failed = Some(e);
                        replies.push(Reply::Seq(reply, Ok(0)));
                    }
                },
                Request::DeadLetter {
                    sink,
                    event,
                    reason,
                    reply,
                } => match self.dead_letter(&sink, &event, &reason) {
                    Ok(id) => replies.push(Reply::Id(reply, Ok(id))),
                    Err(e) => {
                        failed = Some(e);
                        replies.push(Reply::Id(reply, Ok(0)));
                    }
                },
                Request::RetryDeadLetter { id, reply } => {
                    match self.retry_dead_letter(id, recv_us) {
                        Ok(r) => replies.push(Reply::Seq(reply, r)),
                        Err(Fatal(e)) => {
                            failed = Some(e);
                            replies.push(Reply::Seq(reply, Ok(0)));
                        }
                    }
                }
                Request::DropDeadLetter { id, reply } => match self.drop_dead_letter(id) {
                    Ok(r) => replies.push(Reply::Unit(reply, r)),
                    Err(Fatal(e)) => {
                        failed = Some(e);
                        replies.push(Reply::Unit(reply, Ok(())));
                    }
                },
                Request::Maintain | Request::Shutdown { .. } => {}
            }
        }
        (
            Applied {
                undo,
                plain,
                replies,
                advanced,
                rewound,
                appended,
                duplicates,
            },
            failed,
        )
    }

    /// Ends the transaction: the batch's own writes (stream counters,
    /// `meta`), then COMMIT, unless a request already lost it. The
    /// durability a cursor-only transaction relaxed is restored either way.
    fn commit(
        &mut self,
        applied: &Applied,
        mut failed: Option<JournalError>,
        relaxed: bool,
    ) -> Result<(), JournalError> {
        if failed.is_none()
            && let Err(e) = self.finish_batch(&applied.undo, applied.duplicates)
        {
            failed = Some(e);
        }
        if failed.is_none()
            && (!applied.plain || self.cursors_due(CURSOR_WRITE_AFTER))
            && let Err(e) = self.write_cursors()
        {
            failed = Some(self.err(e));
        }
        // The seqs this commit makes visible must be reserved outside the
        // WAL first (see `seqmark.rs`).
        let top = self.next_seq - 1;
        if failed.is_none()
            && !self.mark.covers(top)
            && let Err(e) = self.mark.reserve(top)
        {
            failed = Some(e);
        }
        // The journal's size as this commit leaves it, read in its own
        // transaction: outside one, each of the two pragmas opened a read
        // transaction of its own, with its WAL locks (2 % of the agent's CPU
        // at 1,000 MQTT messages/s).
        if failed.is_none()
            && let Err(e) = self.refresh_used()
        {
            debug!(error = %e, "cannot read page counts");
        }
        let outcome = match failed {
            None => self.exec("COMMIT").map_err(|e| self.err(e)),
            Some(e) => Err(e),
        };
        if relaxed && let Err(e) = self.relax_sync(false) {
            // The next batch with events tries again and fails rather than
            // commit them without an fsync.
            error!(error = %e, "journal: cannot restore full commit durability");
        }
        outcome
    }

    /// After the commit: statistics, then the signals and answers.
    fn publish(&mut self, applied: Applied, relaxed: bool, signals: &Signals) {
        let Applied {
            undo,
            replies,
            advanced,
            rewound,
            appended,
            duplicates,
            ..
        } = applied;
        self.stats
            .events_stored
            .fetch_add(appended, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(duplicates, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .head_seq
            .store(self.next_seq - 1, Ordering::Relaxed);
        self.stats
            .dedup_ids
            .store(self.dedup.len() as u64, Ordering::Relaxed);
        if relaxed {
            self.unsynced_cursors |= advanced;
        } else if appended > 0 {
            // This commit's fsync covered every WAL frame before it.
            self.unsynced_cursors = false;
        }
        self.streams_committed();
        self.cursors_committed(relaxed);
        if let Some((first, last)) = self.jump
            && self.next_seq > last
        {
            self.jump = None;
            if let Ok(mut skips) = self.stats.skipped_seqs.lock() {
                skips.push((first, last));
            }
        }
        if self.next_seq != undo.next_seq {
            signals
                .committed
                .send_replace(Committed::new(self.next_seq - 1, self.class_heads));
        }
        if rewound {
            signals.rewinds.send_modify(|n| *n += 1);
        }
        for r in replies {
            r.send();
        }
        if advanced {
            self.cursors_moved(signals);
        }
    }

    /// After a failed commit (or a transaction a request lost): nothing of
    /// the batch was stored, in the journal or in memory.
    fn abort(&mut self, applied: Applied, e: JournalError) {
        let Applied { undo, replies, .. } = applied;
        let _ = self.conn.execute_batch("ROLLBACK");
        self.flushing_streams = false;
        self.writing_cursors = false;
        // The size read before the failed COMMIT counted its pages.
        let _ = self.refresh_used();
        error!(error = %e, "journal commit failed: nothing of this batch was stored");
        journal::stats_set_error(&self.stats, &e);
        self.rollback(undo);
        for r in replies {
            r.fail(&e).send();
        }
        if matches!(e, JournalError::DiskFull { .. }) {
            self.disk_full();
            self.reopen();
        }
    }

    fn recv_now(&mut self) -> i64 {
        let now = unix_micros(SystemTime::now());
        if now < self.last_recv_us {
            // Once when it happens and then hourly: a gateway without a
            // clock battery or NTP can stay behind for months, and this
            // runs for every transaction.
            if self.last_recv_us - now > 1_000_000
                && self
                    .clock_behind_warned
                    .is_none_or(|at| at.elapsed() >= CLOCK_BEHIND_WARN_EVERY)
            {
                self.clock_behind_warned = Some(Instant::now());
                warn!(
                    journal = %self.path.display(),
                    behind_ms = (self.last_recv_us - now) / 1000,
                    "system clock stepped back: receive times hold at the last value until it catches up (logged again hourly while it is behind)"
                );
            }
            self.last_recv_us
        } else {
            if self.clock_behind_warned.take().is_some() {
                info!(journal = %self.path.display(), "system clock caught up with the last receive time");
            }
            self.last_recv_us = now;
            now
        }
    }

    fn append(
        &mut self,
        events: &[NewEvent],
        recv_us: i64,
        undo: &mut Undo,
    ) -> Result<Vec<AppendOutcome>, JournalError> {
        let mut out = Vec::with_capacity(events.len());
        let conn = &self.conn;
        let path = &self.path;
        // One statement for the whole request, not a cache look-up per row.
        let mut st = conn
            .prepare_cached(INSERT_EVENT)
            .map_err(|e| sqlite_err(path, e))?;
        for ev in events {
            let hash = key_hash(&ev.source, &ev.id);
            let found = self
                .dedup
                .find(hash, |seq| verify(conn, seq, &ev.source, &ev.id));
            if let Some(seq) = found {
                out.push(AppendOutcome::Duplicate { seq });
                continue;
            }
            let seq = take_seq(&mut self.next_seq, self.jump);
            self.class_heads[ev.class.as_i64() as usize] = seq;
            let stream_seq = bump_stream(&mut self.streams, &ev.source, &ev.stream, undo);
            let stored = self.texts.store_type(conn, &ev.event_type).and_then(|t| {
                let a = self
                    .texts
                    .store_attrs(conn, ev.attrs.as_deref(), &ev.stream)?;
                bind_event(&mut st, seq, ev, stream_seq, recv_us, None, t, a)
            });
            if let Err(e) = stored {
                return Err(sqlite_err(path, e));
            }
            self.dedup.insert(hash, seq, recv_us);
            out.push(AppendOutcome::Stored { seq, stream_seq });
        }
        Ok(out)
    }

    fn finish_batch(&mut self, undo: &Undo, duplicates: u64) -> Result<(), JournalError> {
        for (source, touched) in &undo.streams {
            let dirty = match self.dirty_streams.get_mut(source) {
                Some(d) => d,
                None => self.dirty_streams.entry(source.clone()).or_default(),
            };
            for stream in touched.keys() {
                if !dirty.contains(stream) {
                    dirty.insert(stream.clone());
                }
            }
        }
        self.events_since_flush += self.next_seq - undo.next_seq;
        self.flushing_streams = false;
        if !self.dirty_streams.is_empty()
            && streams_due(self.events_since_flush, self.streams_flushed_at.elapsed())
        {
            self.write_streams().map_err(|e| self.err(e))?;
        }
        if duplicates > 0 {
            meta_add(&self.conn, "duplicates", duplicates as i64).map_err(|e| self.err(e))?;
        }
        if let Some((first, last)) = self.jump
            && self.next_seq > last
        {
            // This batch jumped: the range it skipped is kept so that a
            // backlog counts events, not seqs (`journal::skipped_between`).
            meta_set(&self.conn, &super::skip_key(first), last as i64).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn rollback(&mut self, undo: Undo) {
        self.probes.borrow_mut().clear();
        self.next_seq = undo.next_seq;
        self.last_recv_us = undo.last_recv_us;
        for (source, touched) in undo.streams {
            let per_source = self.streams.entry(source).or_default();
            for (stream, v) in touched {
                match v {
                    Some(v) => per_source.insert(stream, v),
                    None => per_source.remove(&stream),
                };
            }
        }
        for (k, v) in undo.cursors.into_iter().rev() {
            match v {
                Some(v) => self.cursors.insert(k, v),
                None => self.cursors.remove(&k),
            };
        }
        self.dedup.rollback();
        self.texts.rollback();
        self.retention_through = undo.retention_through;
    }
}

fn verify(conn: &Connection, seq: u64, source: &str, id: &str) -> Verified {
    let row: rusqlite::Result<Option<(String, String)>> = conn
        .prepare_cached("SELECT source, event_id FROM events WHERE seq = ?1")
        .and_then(|mut st| {
            st.query_row([seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        });
    match row {
        Ok(Some((s, i))) if s == source && i == id => Verified::Same,
        Ok(Some(_)) => Verified::Different,
        // Gone, or unreadable: trust the hash bits the index keeps (43 at
        // the default dedup_max_ids) rather than store twice.
        Ok(None) | Err(_) => Verified::Gone,
    }
}

fn reply_slot(req: Request) -> Option<Reply> {
    match req {
        Request::Append { reply, .. } => Some(Reply::Append(reply, Ok((Vec::new(), Vec::new())))),
        Request::Advance { reply, .. } => Some(Reply::Advance(reply, Ok(None))),
        Request::Rewind { reply, .. } => Some(Reply::Seq(reply, Ok(0))),
        Request::DeadLetter { reply, .. } => Some(Reply::Id(reply, Ok(0))),
        Request::RetryDeadLetter { reply, .. } => Some(Reply::Seq(reply, Ok(0))),
        Request::DropDeadLetter { reply, .. } => Some(Reply::Unit(reply, Ok(()))),
        Request::Maintain | Request::Shutdown { .. } => None,
    }
}

fn fail_request(req: Request, e: &JournalError) {
    if let Some(r) = reply_slot(req) {
        r.fail(e).send();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_counters_wait_for_events_under_a_trickle_and_for_time_under_load() {
        let s = Duration::from_secs;
        // 100 events/s: not every second, but once 1,024 events are in.
        assert!(!streams_due(100, s(1)));
        assert!(!streams_due(1_023, s(10)));
        assert!(streams_due(1_024, s(10)));
        // A trickle: once a minute.
        assert!(!streams_due(10, s(59)));
        assert!(streams_due(1, s(60)));
        // Under load: once a second, or at once after 16,384 events.
        assert!(!streams_due(5_000, Duration::from_millis(999)));
        assert!(streams_due(5_000, s(1)));
        assert!(streams_due(16_384, Duration::ZERO));
    }
}
