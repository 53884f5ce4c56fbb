//! Sink cursors: where each sink and lane stands, moved forward after an
//! upstream ack (`advance`) and back for a replay (`rewind`), when their
//! rows are written, and the relaxed durability of transactions that only
//! move cursors. A cursor must never move past a gap event its sink did
//! not send, nor forward by a replay.
//!
//! A delivered batch's move is lazy: answered at once from memory, its row
//! written with a later commit, once [`CURSOR_WRITE_AFTER`] has passed or
//! [`CURSOR_WRITE_EVENTS`] were delivered, and by every transaction that
//! deletes rows, rewinds or writes dead letters, and at shutdown. Under a
//! trickle, a commit of its own per delivered batch was 14 % of the bytes
//! written at 10 events/s (a page, and the file page the commit before had
//! already synced), and each one ended a commit window early. A crash
//! before the row is written sends those events again with the same ids,
//! which the upstream drops (invariant 3), as a power cut after a relaxed
//! cursor commit always did. Any other move (a replay, an admin's) is
//! written in its transaction and recorded in the batch's `Undo`.

use std::time::{Duration, Instant, SystemTime};

use rusqlite::params;
use tracing::{debug, error, info};

use super::batch::Reply;
use super::{Fatal, Probe, Signals, Undo, WriterState, meta_set};
use crate::event::{Class, GAP_EVENT_TYPE};
use crate::journal::reader::first_seq_at_or_after;
use crate::journal::{self, JournalError, Request, RewindTo, SyncMode};
use crate::units::unix_micros;

/// A lazy cursor move's row goes with the first commit of events after it
/// is this old ...
pub(super) const CURSOR_WRITE_AFTER: Duration = Duration::from_secs(1);
/// ... and in a transaction of its own once it is this old (no events
/// came: the tick writes it) ...
pub(super) const CURSOR_WRITE_ALONE_AFTER: Duration = Duration::from_secs(2);
/// ... or at once when the lazy moves not yet written passed this many
/// events (a drain: what a crash would send again).
pub(super) const CURSOR_WRITE_EVENTS: u64 = 4_096;

impl WriterState {
    /// The cursor stored under `key`; a lane without a row of its own
    /// stands at its sink's row (see [`journal::cursor_key`]).
    fn cursor_of(&self, key: &str) -> Option<u64> {
        self.cursors.get(key).copied().or_else(|| {
            journal::lane_of_key(key).and_then(|(sink, _)| self.cursors.get(sink).copied())
        })
    }

    /// Writes the cursor row of `key` (in the open transaction).
    fn store_cursor(&self, key: &str, seq: u64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO cursors(sink, seq, updated_us) VALUES (?1, ?2, ?3)
                 ON CONFLICT(sink) DO UPDATE SET seq = excluded.seq, updated_us = excluded.updated_us",
            )?
            .execute(params![key, seq as i64, unix_micros(SystemTime::now())])
            .map(|_| ())
    }

    /// Where `key` stands for retention: a lane has delivered everything
    /// before the first event of its class after its cursor (a critical
    /// lane of a journal that holds only telemetry is at the head, though
    /// its cursor never moved). On a failed query, its cursor.
    fn effective_cursor(&self, key: &str) -> u64 {
        let cursor = self.cursor_of(key).unwrap_or(0);
        let Some((_, class)) = journal::lane_of_key(key) else {
            return cursor;
        };
        let head = self.next_seq.saturating_sub(1);
        let cached = self.probes.borrow().get(key).copied();
        // Rows are only appended after `through` (a rollback, an eviction
        // or a rewind clears the cache): an earlier answer still holds for a
        // cursor that did not move past it, and a search that found nothing
        // goes on from where it stopped.
        let first = match cached {
            Some(p) if cursor >= p.cursor && p.first.is_some_and(|f| cursor < f) => Ok(p.first),
            Some(p) if cursor >= p.cursor && p.first.is_none() => {
                journal::reader::first_of_class_after(&self.conn, class, cursor.max(p.through))
            }
            _ => journal::reader::first_of_class_after(&self.conn, class, cursor),
        };
        if let Ok(found) = first {
            self.probes.borrow_mut().insert(
                key.to_owned(),
                Probe {
                    cursor,
                    through: head,
                    first: found,
                },
            );
        }
        match first {
            Ok(Some(f)) => f.saturating_sub(1).max(cursor),
            Ok(None) => self.next_seq.saturating_sub(1).max(cursor),
            Err(_) => cursor,
        }
    }

    /// The lowest position of every configured sink and lane: what
    /// retention may delete.
    pub(super) fn min_cursor(&self) -> u64 {
        self.opts
            .sinks
            .iter()
            .map(|k| self.effective_cursor(k))
            .min()
            .unwrap_or(0)
    }

    /// The lowest cursor of the sinks and lanes that take `class`: events of
    /// that class past it are undelivered to someone.
    pub(super) fn min_cursor_for(&self, class: Class) -> u64 {
        self.opts
            .sinks
            .iter()
            .filter(|k| journal::lane_of_key(k).is_none_or(|(_, c)| c == class))
            .map(|k| self.cursor_of(k).unwrap_or(0))
            .min()
            .unwrap_or_else(|| self.min_cursor())
    }

    /// Moves `sink`'s cursor to `to`, or short of it (see
    /// [`WriterState::unsent_gap`]); returns where it now stands, or `None`
    /// when it did not move. With an open transaction's `undo`, the row is
    /// written in it and the move recorded there; without (a lazy move),
    /// the row is left to a later commit.
    pub(super) fn advance(
        &mut self,
        sink: &str,
        from: Option<u64>,
        to: u64,
        read_at_evictions: Option<u64>,
        undo: Option<&mut Undo>,
    ) -> Result<Option<u64>, Fatal> {
        let current = self.cursor_of(sink);
        if let Some(from) = from
            && current.unwrap_or(0) != from
        {
            // A replay moved the cursor while this batch was in flight.
            return Ok(None);
        }
        let mut to = to.min(self.next_seq - 1);
        if let Some(read_at) = read_at_evictions {
            let base = current.unwrap_or(0);
            let lane = journal::lane_of_key(sink).map(|(_, c)| c);
            if let Some(gap) = self
                .unsent_gap(read_at, base, to, lane)
                .map_err(|e| Fatal(self.err(e)))?
            {
                debug!(
                    sink,
                    gap_seq = gap,
                    delivered_through = to,
                    "events were evicted while the batch was upstream: the cursor stops before their gap event"
                );
                to = gap - 1;
            }
        }
        if to <= current.unwrap_or(0) && current.is_some() {
            return Ok(None);
        }
        match undo {
            Some(undo) => {
                self.store_cursor(sink, to)
                    .map_err(|e| Fatal(self.err(e)))?;
                undo.cursors.push((sink.to_string(), current));
            }
            None => {
                self.unwritten_events += to - current.unwrap_or(0);
                self.unwritten_since.get_or_insert_with(Instant::now);
                self.unwritten().insert(sink.to_string(), to);
            }
        }
        self.cursors.insert(sink.to_string(), to);
        Ok(Some(to))
    }

    /// Answers a lazy cursor move (`Request::Advance` with `lazy`) at once,
    /// outside any transaction: its row is written later.
    pub(super) fn advance_at_once(&mut self, request: Request, signals: &Signals) {
        let Request::Advance {
            sink,
            from,
            to,
            read_at_evictions,
            reply,
            ..
        } = request
        else {
            return;
        };
        let moved = self
            .advance(&sink, from, to, read_at_evictions, None)
            .map_err(|Fatal(e)| e);
        if matches!(moved, Ok(Some(_))) {
            self.cursors_moved(signals);
        }
        Reply::Advance(reply, moved).send();
    }

    /// After a cursor moved forward (committed, or answered from memory):
    /// retention may delete what it passed, and appends blocked on a full
    /// journal may find room.
    pub(super) fn cursors_moved(&mut self, signals: &Signals) {
        self.retention_pending = true;
        signals.space.notify_waiters();
    }

    /// True when the lazy moves not yet written are due to be: the first
    /// is `after` old ([`CURSOR_WRITE_AFTER`] with a commit of events,
    /// [`CURSOR_WRITE_ALONE_AFTER`] alone), or they passed
    /// [`CURSOR_WRITE_EVENTS`] events.
    pub(super) fn cursors_due(&self, after: Duration) -> bool {
        self.unwritten_since
            .is_some_and(|t| self.unwritten_events >= CURSOR_WRITE_EVENTS || t.elapsed() >= after)
    }

    /// The lazy moves not written yet, shared with the journal's readers.
    fn unwritten(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        // Only this thread writes the map, and no code holding the lock
        // can panic: a poisoned lock still holds a whole map.
        self.stats
            .unwritten_cursors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the rows of the lazy moves in the open transaction. Every
    /// transaction that deletes rows calls it: retention must never leave a
    /// stored cursor behind events it deleted.
    pub(super) fn write_cursors(&mut self) -> rusqlite::Result<()> {
        if self.unwritten_since.is_none() {
            return Ok(());
        }
        let keys: Vec<String> = self.unwritten().keys().cloned().collect();
        for key in &keys {
            // What the cursor is now, not what the lazy move made it: a
            // replay in this transaction may have moved it back. A key a
            // rolled-back transaction created has no cursor left.
            if let Some(&seq) = self.cursors.get(key) {
                self.store_cursor(key, seq)?;
            }
        }
        self.writing_cursors = true;
        Ok(())
    }

    /// After a commit (`relaxed`: without an fsync): what the transaction
    /// wrote of the lazy moves is stored.
    pub(super) fn cursors_committed(&mut self, relaxed: bool) {
        if self.writing_cursors {
            self.writing_cursors = false;
            self.unwritten().clear();
            self.unwritten_events = 0;
            self.unwritten_since = None;
            if relaxed {
                self.unsynced_cursors = true;
            }
        }
    }

    /// Writes the rows of the lazy moves in a transaction of their own,
    /// without an fsync (under `sync = "full"`, as any commit that only
    /// moves cursors): no events came to carry them, as in a drain.
    pub(super) fn write_cursors_alone(&mut self) {
        if self.unwritten_since.is_none() {
            return;
        }
        if let Err(e) = self.commit_cursors(true, true) {
            // The moves stay in memory; not every turn of the writer's
            // loop tries again (a full disk), but the next commit of
            // events, the tick, or this after two seconds or 4,096 more
            // events. A crash meanwhile sends their events again.
            self.unwritten_since = Some(Instant::now());
            self.unwritten_events = 0;
            debug!(error = %e, "cannot write the cursor rows; trying again with the next commit or in two seconds");
        }
    }

    /// A transaction of cursors alone: the lazy moves' rows when `rows`;
    /// without an fsync when `relaxed`, else with one, which also makes
    /// every relaxed cursor commit before it durable (recorded as
    /// `cursors_synced_us`).
    fn commit_cursors(&mut self, rows: bool, relaxed: bool) -> Result<(), JournalError> {
        self.relax_sync(relaxed)?;
        let now_us = unix_micros(SystemTime::now());
        let done = self
            .exec("BEGIN IMMEDIATE")
            .and_then(|()| if rows { self.write_cursors() } else { Ok(()) })
            .and_then(|()| {
                if relaxed {
                    Ok(())
                } else {
                    meta_set(&self.conn, "cursors_synced_us", now_us)
                }
            })
            .and_then(|()| self.exec("COMMIT"))
            .map_err(|e| {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.writing_cursors = false;
                self.err(e)
            });
        let without_fsync = self.relaxed_sync;
        if let Err(e) = self.relax_sync(false) {
            error!(error = %e, "journal: cannot restore full commit durability");
        }
        done?;
        if !relaxed {
            self.unsynced_cursors = false;
        }
        self.cursors_committed(without_fsync);
        Ok(())
    }

    /// The lowest seq in `(base, to]` where a gap event was put after the
    /// sink read its batch (when the eviction count was `read_at`). Such a
    /// gap stands in place of events the batch carried, and may announce
    /// the eviction of later events the batch did not carry: a cursor moved
    /// past it would skip that announcement, so it must stop just before.
    /// A lane (`lane`: its class) only stops at the gaps of its class.
    fn unsent_gap(
        &self,
        read_at: u64,
        base: u64,
        to: u64,
        lane: Option<Class>,
    ) -> rusqlite::Result<Option<u64>> {
        if read_at >= self.stats.evictions() {
            return Ok(None);
        }
        let remembered = self
            .recent_evictions
            .front()
            .is_some_and(|r| r.before <= read_at);
        if remembered {
            return Ok(self
                .recent_evictions
                .iter()
                .filter(|r| r.after > read_at && lane.is_none_or(|c| c == r.class))
                .flat_map(|r| r.gap_seqs.iter().copied())
                .filter(|&s| s > base && s <= to)
                .min());
        }
        // Further back than the rounds remembered: any gap in the range may
        // be new. Stopping at an old one only sends it and what follows again.
        self.conn
            .prepare_cached(
                "SELECT min(seq) FROM events WHERE seq > ?1 AND seq <= ?2 AND type = ?3
                 AND (?4 IS NULL OR class = ?4)",
            )?
            .query_row(
                params![
                    base as i64,
                    to as i64,
                    GAP_EVENT_TYPE,
                    lane.map(Class::as_i64)
                ],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|s| s.map(|s| s.max(0) as u64))
    }

    pub(super) fn rewind(
        &mut self,
        sink: &str,
        class: Option<Class>,
        to: RewindTo,
        undo: &mut Undo,
    ) -> Result<Result<u64, JournalError>, Fatal> {
        self.probes.borrow_mut().clear();
        let from_seq = match to {
            RewindTo::Seq(s) => s.max(1),
            RewindTo::Since(t) => {
                let t_us = unix_micros(t);
                match first_seq_at_or_after(&self.conn, t_us).map_err(|e| Fatal(self.err(e)))? {
                    Some(s) => s,
                    None => self.next_seq,
                }
            }
        };
        if from_seq <= self.retention_through {
            return Ok(Err(JournalError::BeyondRetention {
                path: self.path.clone(),
                requested: from_seq,
                oldest: self.retention_through + 1,
            }));
        }
        // The sink's own row and every lane of it (configured, or with a row
        // from an earlier configuration): a replay rewinds them all. A key
        // without a cursor row has delivered nothing: its cursor is 0.
        let mut keys: Vec<String> = Vec::new();
        for k in self.opts.sinks.iter().chain(self.cursors.keys()) {
            let of_sink = k == sink || journal::lane_of_key(k).is_some_and(|(s, _)| s == sink);
            if of_sink && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        if let Some(class) = class {
            let lane = journal::cursor_key(sink, Some(class));
            keys.retain(|k| *k == lane);
            if keys.is_empty() {
                keys.push(lane);
            }
        }
        if keys.is_empty() {
            keys.push(sink.to_string());
        }
        let target = from_seq - 1;
        let mut moved = false;
        for key in &keys {
            let current = self.cursor_of(key);
            if current.unwrap_or(0) <= target {
                // Nothing delivered at or after that point yet: nothing to
                // do. A replay never moves a cursor forward.
                continue;
            }
            self.store_cursor(key, target)
                .map_err(|e| Fatal(self.err(e)))?;
            undo.cursors
                .push((key.clone(), self.cursors.get(key).copied()));
            self.cursors.insert(key.clone(), target);
            moved = true;
        }
        // Where the sink now stands: the lowest of its keys, a lane with
        // nothing of its class waiting counting as caught up.
        let lowest = keys
            .iter()
            .map(|k| self.effective_cursor(k))
            .min()
            .unwrap_or(0);
        if !moved {
            return Ok(Ok(lowest));
        }
        info!(sink, from_seq, "replay: cursor rewound");
        Ok(Ok(lowest))
    }

    /// Under `sync = "full"`, a transaction that only moves cursors commits
    /// without an fsync (`synchronous = NORMAL`). A cursor move lost to a
    /// power failure only sends acknowledged events again, which the
    /// upstream drops by id (invariant 3); one fsync per delivered batch
    /// cost the drain about 5 % of its rate (BENCHMARKS.md) and wore flash
    /// storage. The next event commit makes such moves durable (its fsync
    /// covers the whole WAL before it), or else the once-a-second tick.
    pub(super) fn relax_sync(&mut self, relaxed: bool) -> Result<(), JournalError> {
        if self.opts.sync != SyncMode::Full || relaxed == self.relaxed_sync {
            return Ok(());
        }
        let value = if relaxed { "NORMAL" } else { "FULL" };
        self.conn
            .pragma_update(None, "synchronous", value)
            .map_err(|e| self.err(e))?;
        self.relaxed_sync = relaxed;
        Ok(())
    }

    /// The tick's (and, with `all`, shutdown's) look at the cursors: writes
    /// the lazy moves no commit has carried once [`CURSOR_WRITE_ALONE_AFTER`]
    /// old (every one with `all`), and makes relaxed cursor commits durable
    /// when no event commit has.
    pub(super) fn sync_cursors(&mut self, all: bool) {
        let rows = if all {
            self.unwritten_since.is_some()
        } else {
            self.cursors_due(CURSOR_WRITE_ALONE_AFTER)
        };
        if !self.unsynced_cursors && !rows {
            return;
        }
        if let Err(e) = self.commit_cursors(rows, false) {
            debug!(error = %e, "cannot sync the cursor moves; trying again in a second");
        }
    }
}
