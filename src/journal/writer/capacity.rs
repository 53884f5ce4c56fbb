//! Capacity: keeping the journal under `max_size` before a batch's events
//! go in (deleting delivered rows before `retain_acked`, then, with
//! `when_full = "drop_oldest"`, evicting undelivered ones behind gap
//! events), and the disk-full path of a failed commit. Every deletion is a
//! transaction of its own, run before the batch's (retention's chunks are
//! these too), that writes the stream counters first: the rows after
//! `streams_through` are their only record. An undelivered row never goes
//! without a gap event in its place.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use hashbrown::HashMap;
use rusqlite::{OptionalExtension, params};
use tracing::{debug, error, warn};

use super::{EvictionRound, RECENT_EVICTION_ROUNDS, WriterState, meta_add, meta_set};
use crate::event::{Class, GAP_EVENT_TYPE, NewEvent};
use crate::journal::schema::WRITER_CACHE_KIB;
use crate::journal::{self, JournalError, WhenFull};
use crate::units::{rfc3339_us, unix_micros};

/// Rows deleted per retention transaction.
const RETENTION_CHUNK: u64 = 4_096;
/// Rows examined per eviction round.
const EVICTION_CHUNK: i64 = 2_048;

/// A row chosen for eviction.
#[derive(Debug)]
struct Evicted {
    seq: u64,
    source: String,
    stream: String,
    stream_seq: u64,
    recv_us: i64,
}

/// A contiguous stream-sequence run of evicted rows of one
/// `(source, stream)`, with the seq of its first evicted row, where its gap
/// event will stand.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    source: String,
    stream: String,
    first: u64,
    last: u64,
    at_seq: u64,
    /// The receive time of the row at `at_seq`.
    at_recv_us: i64,
}

/// The runs of `victims` (in seq order), in the order of their first rows.
/// Only the next stream sequence of a stream extends its latest run: one
/// that skips, or goes back (a dead letter put back keeps its own), starts
/// a new run. Rows of other streams in between, or a jump in seq, do not
/// end a run: each gap event names one range of its own stream.
fn eviction_runs(victims: &[Evicted]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut open: HashMap<(String, String), usize> = HashMap::new();
    for v in victims {
        let key = (v.source.clone(), v.stream.clone());
        match open.get(&key).and_then(|&i| runs.get_mut(i)) {
            Some(run) if run.last + 1 == v.stream_seq => run.last = v.stream_seq,
            _ => {
                open.insert(key, runs.len());
                runs.push(Run {
                    source: v.source.clone(),
                    stream: v.stream.clone(),
                    first: v.stream_seq,
                    last: v.stream_seq,
                    at_seq: v.seq,
                    at_recv_us: v.recv_us,
                });
            }
        }
    }
    runs
}

impl WriterState {
    /// Frees space for `need` more bytes, by the capacity rules of the module
    /// doc. Runs its own transactions, before the batch's.
    pub(super) fn make_room(&mut self, need: u64) -> Result<(), JournalError> {
        let max = self.opts.max_size.min(self.disk_cap.unwrap_or(u64::MAX));
        let used = self.stats.used_bytes.load(Ordering::Relaxed);
        if used + need <= max {
            self.full_logged = false;
            return Ok(());
        }
        // Free a little more than needed so that a full journal does not
        // evict on every batch.
        let target = max.saturating_sub(max / 20).max(need).saturating_sub(need);
        let freed_acked = self.delete_acked_until(target).map_err(|e| self.err(e))?;
        if freed_acked > 0 {
            warn!(
                rows = freed_acked,
                "journal full: deleted delivered events kept for replay before their retain_acked time"
            );
        }
        let used = self.refresh_used().map_err(|e| self.err(e))?;
        if used + need <= max {
            return Ok(());
        }
        if self.opts.when_full == WhenFull::DropOldest {
            for class in [Class::Telemetry, Class::Critical] {
                // One warning per class and call, with the sums: a call can
                // take many rounds, each round as many runs as streams.
                let (mut rows, mut runs) = (0, 0);
                let result = (|| loop {
                    if self.refresh_used()? <= target {
                        return Ok(true);
                    }
                    match self.evict_round(class)? {
                        (0, _) => return Ok(false),
                        (n, r) => (rows, runs) = (rows + n, runs + r),
                    }
                })();
                if rows > 0 {
                    warn!(
                        journal = %self.path.display(),
                        class = %class,
                        evicted = rows,
                        runs,
                        "journal full: evicted the oldest undelivered events (when_full = \"drop_oldest\"); a plantrelay.gap event takes the place of each run, and the gaps table lists them"
                    );
                }
                if result.map_err(|e| self.err(e))? {
                    return Ok(());
                }
            }
            let used = self.refresh_used().map_err(|e| self.err(e))?;
            if used + need <= max {
                return Ok(());
            }
        }
        if self.disk_cap.is_some_and(|cap| cap < self.opts.max_size) {
            // The disk, not max_size, is what is full.
            return Err(JournalError::DiskFull {
                path: self.path.clone(),
            });
        }
        if !self.full_logged {
            warn!(
                journal = %self.path.display(),
                used = %crate::units::fmt_bytes(used),
                max = %crate::units::fmt_bytes(max),
                backlog_from_seq = self.min_cursor() + 1,
                "journal full: appends are refused until sinks deliver (when_full = \"block\")"
            );
            self.full_logged = true;
        }
        Err(JournalError::Full {
            path: self.path.clone(),
            used,
            max,
        })
    }

    /// Deletes delivered rows (every sink past them), oldest first, until the
    /// live size is at most `target`. Returns the rows deleted.
    fn delete_acked_until(&mut self, target: u64) -> rusqlite::Result<u64> {
        let limit = self.min_cursor();
        let mut total = 0;
        loop {
            if self.refresh_used()? <= target {
                return Ok(total);
            }
            let n = self.delete_chunk(limit)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Deletes up to one chunk of rows at or below `limit`, oldest first.
    pub(super) fn delete_chunk(&mut self, limit: u64) -> rusqlite::Result<u64> {
        let oldest: Option<i64> = self
            .conn
            // Seqs start at 1: a row at 0 or below is damage, and from it
            // each chunk would stop short of the rows still to delete.
            .query_row(
                "SELECT seq FROM events WHERE seq > 0 ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let Some(oldest) = oldest else { return Ok(0) };
        let oldest = oldest as u64;
        if oldest > limit {
            return Ok(0);
        }
        let upto = limit.min(oldest + RETENTION_CHUNK - 1);
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| {
            self.write_streams()?;
            self.write_cursors()?;
            let n = self.conn.execute(
                "DELETE FROM events WHERE seq >= ?1 AND seq <= ?2",
                params![oldest as i64, upto as i64],
            )?;
            let through = self.retention_through.max(upto);
            meta_set(&self.conn, "retention_through", through as i64)?;
            Ok::<_, rusqlite::Error>((n, through))
        })();
        match result.and_then(|r| self.conn.execute_batch("COMMIT").map(|_| r)) {
            Ok((n, through)) => {
                self.streams_committed();
                self.cursors_committed(self.relaxed_sync);
                self.retention_through = through;
                self.stats
                    .retention_deleted
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n as u64)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.flushing_streams = false;
                self.writing_cursors = false;
                Err(e)
            }
        }
    }

    /// Evicts the oldest undelivered events of `class` (one chunk) and puts a
    /// gap event in place of every evicted range. Returns the rows evicted
    /// and the ranges (runs of one stream) they made.
    fn evict_round(&mut self, class: Class) -> rusqlite::Result<(u64, u64)> {
        let min_cursor = self.min_cursor_for(class);
        let victims: Vec<Evicted> = {
            let mut st = self.conn.prepare_cached(
                "SELECT seq, source, stream, stream_seq, recv_time FROM events
                 WHERE seq > ?1 AND class = ?2 AND type != ?3 ORDER BY seq LIMIT ?4",
            )?;
            st.query_map(
                params![
                    min_cursor as i64,
                    class.as_i64(),
                    GAP_EVENT_TYPE,
                    EVICTION_CHUNK
                ],
                |r| {
                    Ok(Evicted {
                        seq: r.get::<_, i64>(0)?.max(0) as u64,
                        source: r.get(1)?,
                        stream: r.get(2)?,
                        stream_seq: r.get::<_, i64>(3)?.max(0) as u64,
                        recv_us: r.get::<_, i64>(4)?,
                    })
                },
            )?
            .collect::<Result<_, _>>()?
        };
        if victims.is_empty() {
            return Ok((0, 0));
        }
        let runs = eviction_runs(&victims);
        let reason = "journal full (when_full = \"drop_oldest\")";
        let now_us = unix_micros(SystemTime::now());
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| {
            self.write_streams()?;
            self.write_cursors()?;
            {
                let mut del = self
                    .conn
                    .prepare_cached("DELETE FROM events WHERE seq = ?1")?;
                for v in &victims {
                    del.execute([v.seq as i64])?;
                }
            }
            for run in &runs {
                let count = run.last - run.first + 1;
                let data = serde_json::json!({
                    "first_streamsequence": run.first,
                    "last_streamsequence": run.last,
                    "count": count,
                    "class": class.as_str(),
                    "reason": reason,
                });
                let gap = NewEvent {
                    source: run.source.clone(),
                    id: format!("gap:{}:{}-{}", run.stream, run.first, run.last),
                    stream: run.stream.clone(),
                    // The class of what it stands for: it goes out in that
                    // lane, in its stream's order, and only to the sinks
                    // that take that class.
                    class,
                    event_type: GAP_EVENT_TYPE.to_string(),
                    source_time: Some(rfc3339_us(unix_micros(SystemTime::now()))),
                    data: data.to_string().into_bytes(),
                    attrs: None,
                };
                // The gap takes the place (seq) of the first evicted row and
                // the stream sequence of the first evicted event, so a sink
                // that had not received the range learns of it in order. It
                // keeps that row's receive time too: receive times stay in
                // seq order, which replays by time and the dedup window
                // search rely on, and the backlog's age stays that of the
                // oldest event it stands for. Its `time` is the eviction's.
                self.insert_row(run.at_seq, &gap, run.first, run.at_recv_us, None)?;
                self.conn
                    .prepare_cached(
                        "INSERT INTO gaps (source, stream, first_stream_seq, last_stream_seq, count,
                                           class, reason, time_us)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?
                    .execute(params![
                        run.source,
                        run.stream,
                        run.first as i64,
                        run.last as i64,
                        count as i64,
                        class.as_i64(),
                        reason,
                        now_us
                    ])?;
            }
            let key = match class {
                Class::Telemetry => "evicted_telemetry",
                Class::Critical => "evicted_critical",
            };
            meta_add(&self.conn, key, victims.len() as i64)?;
            Ok::<_, rusqlite::Error>(())
        })();
        match result.and_then(|_| self.conn.execute_batch("COMMIT")) {
            Ok(()) => {
                self.streams_committed();
                self.cursors_committed(self.relaxed_sync);
                let n = victims.len() as u64;
                let before = self.stats.evictions();
                if self.recent_evictions.len() == RECENT_EVICTION_ROUNDS {
                    self.recent_evictions.pop_front();
                }
                self.probes.borrow_mut().clear();
                self.recent_evictions.push_back(EvictionRound {
                    before,
                    after: before + n,
                    class,
                    gap_seqs: runs.iter().map(|r| r.at_seq).collect(),
                });
                match class {
                    Class::Telemetry => {
                        self.stats.evicted_telemetry.fetch_add(n, Ordering::Relaxed)
                    }
                    Class::Critical => self.stats.evicted_critical.fetch_add(n, Ordering::Relaxed),
                };
                for run in &runs {
                    debug!(
                        source = %run.source,
                        stream = %run.stream,
                        class = %class,
                        first_stream_seq = run.first,
                        last_stream_seq = run.last,
                        count = run.last - run.first + 1,
                        "journal full: evicted undelivered events (when_full = \"drop_oldest\"); a plantrelay.gap event takes their place"
                    );
                }
                Ok((n, runs.len() as u64))
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.flushing_streams = false;
                self.writing_cursors = false;
                Err(e)
            }
        }
    }

    /// A commit found the disk full: give the reserve back, so that the
    /// next cursor moves, checkpoint and retention fit, and let retention
    /// delete what is delivered at once. The journal is also held at its
    /// live size until the disk has room, as if that were `max_size`: new
    /// events go only into pages that deliveries (or, with `when_full =
    /// "drop_oldest"`, evictions) free inside the file. Were they let grow
    /// the files, they would take the reserve's room too, and once the
    /// WAL could neither grow nor be checkpointed into a file that cannot
    /// grow, no commit, not even a cursor move or a deletion, would fit.
    pub(super) fn disk_full(&mut self) {
        if !self.disk_short {
            self.disk_short = true;
            self.retention_pending = true;
            warn!(journal = %self.path.display(), "disk full: delivered events are deleted at once (not after retain_acked) until the disk has room again");
        }
        if self.disk_cap.is_none() {
            let used = self
                .refresh_used()
                .unwrap_or_else(|_| self.stats.used_bytes.load(Ordering::Relaxed));
            self.disk_cap = Some(used);
            let then = match self.opts.when_full {
                WhenFull::Block => "new events are taken as deliveries free room inside it",
                WhenFull::DropOldest => {
                    "the oldest undelivered events make way for new ones, a plantrelay.gap event in their place"
                }
            };
            warn!(
                journal = %self.path.display(),
                cap = %crate::units::fmt_bytes(used),
                "disk full: the journal is held at its present size until the disk has room; {then}"
            );
        }
        if self.reserve.release() {
            warn!(
                journal = %self.path.display(),
                bytes = self.opts.disk_reserve,
                "disk full: gave back the disk reserve so that deliveries can move their cursors and free the journal; it is set aside again once the disk has room"
            );
        }
    }

    /// After a disk-full error SQLite's state for this connection is
    /// suspect (an fsync that failed cannot be retried safely): reopen.
    pub(super) fn reopen(&mut self) {
        match journal::schema::reopen_writer(&self.path, self.opts.sync) {
            Ok(conn) => {
                if let Err(e) = conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB) {
                    debug!(error = %e, "cannot size the page cache of the reopened journal");
                }
                self.conn = conn;
                self.relaxed_sync = false;
                warn!(journal = %self.path.display(), "journal reopened after a failed commit");
            }
            Err(e) => error!(error = %e, "cannot reopen the journal; keeping the old connection"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, source: &str, stream: &str, stream_seq: u64) -> Evicted {
        Evicted {
            seq,
            source: source.into(),
            stream: stream.into(),
            stream_seq,
            recv_us: seq as i64 * 1_000,
        }
    }

    fn run(source: &str, stream: &str, first: u64, last: u64, at_seq: u64) -> Run {
        Run {
            source: source.into(),
            stream: stream.into(),
            first,
            last,
            at_seq,
            at_recv_us: at_seq as i64 * 1_000,
        }
    }

    #[test]
    fn no_rows_no_runs() {
        assert_eq!(eviction_runs(&[]), Vec::new());
    }

    #[test]
    fn a_single_row_is_a_run_of_one() {
        assert_eq!(
            eviction_runs(&[row(7, "m", "a", 3)]),
            vec![run("m", "a", 3, 3, 7)]
        );
    }

    #[test]
    fn contiguous_stream_sequences_are_one_run_at_the_first_row() {
        let rows = [
            row(10, "m", "a", 4),
            row(11, "m", "a", 5),
            row(12, "m", "a", 6),
        ];
        assert_eq!(eviction_runs(&rows), vec![run("m", "a", 4, 6, 10)]);
    }

    #[test]
    fn a_skipped_stream_sequence_starts_a_new_run() {
        let rows = [
            row(10, "m", "a", 4),
            row(11, "m", "a", 5),
            row(12, "m", "a", 8),
            row(13, "m", "a", 9),
        ];
        assert_eq!(
            eviction_runs(&rows),
            vec![run("m", "a", 4, 5, 10), run("m", "a", 8, 9, 12)]
        );
    }

    #[test]
    fn a_jump_in_seq_alone_does_not_end_a_run() {
        // Rows of the other class, or deleted ones, lie between.
        let rows = [
            row(10, "m", "a", 4),
            row(40, "m", "a", 5),
            row(90, "m", "a", 6),
        ];
        assert_eq!(eviction_runs(&rows), vec![run("m", "a", 4, 6, 10)]);
    }

    #[test]
    fn interleaved_streams_have_a_run_each_in_order_of_their_first_rows() {
        let rows = [
            row(1, "m", "a", 1),
            row(2, "m", "b", 7),
            row(3, "n", "a", 2),
            row(4, "m", "a", 2),
            row(5, "m", "b", 8),
            row(6, "n", "a", 3),
            row(7, "m", "a", 3),
        ];
        assert_eq!(
            eviction_runs(&rows),
            vec![
                run("m", "a", 1, 3, 1),
                run("m", "b", 7, 8, 2),
                run("n", "a", 2, 3, 3),
            ]
        );
    }

    #[test]
    fn a_stream_sequence_that_goes_back_starts_a_run_that_stays_latest() {
        // A dead letter put back keeps its stream sequence: 3 and 4 come
        // after 6. Only the latest run of a stream can grow, so 7 does not
        // join 5..=6.
        let rows = [
            row(20, "m", "a", 5),
            row(21, "m", "a", 6),
            row(22, "m", "a", 3),
            row(23, "m", "a", 4),
            row(24, "m", "a", 7),
        ];
        assert_eq!(
            eviction_runs(&rows),
            vec![
                run("m", "a", 5, 6, 20),
                run("m", "a", 3, 4, 22),
                run("m", "a", 7, 7, 24),
            ]
        );
    }

    #[test]
    fn a_repeated_stream_sequence_starts_a_new_run() {
        let rows = [row(1, "m", "a", 5), row(2, "m", "a", 5)];
        assert_eq!(
            eviction_runs(&rows),
            vec![run("m", "a", 5, 5, 1), run("m", "a", 5, 5, 2)]
        );
    }
}
