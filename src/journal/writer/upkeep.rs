//! Upkeep between batches: retention in chunks, dedup expiry, writing and
//! syncing cursor moves, the WAL's size, the disk reserve, and the orderly
//! stop. It runs only while no batch is open, and must never hold queued
//! requests for long: retention deletes one chunk per turn of the loop.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use super::WriterState;
use crate::journal::reader::first_seq_at_or_after;
use crate::journal::schema::{BUSY_TIMEOUT, WAL_SIZE_LIMIT};
use crate::units::unix_micros;

impl WriterState {
    /// Writes the stream counters in a transaction of their own (at
    /// shutdown, so the next start has no rows to read for them).
    fn flush_streams(&mut self) {
        if self.dirty_streams.is_empty() {
            return;
        }
        let r = self
            .relax_sync(false)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.conn
                    .execute_batch("BEGIN IMMEDIATE")
                    .and_then(|()| self.write_streams())
                    .and_then(|()| self.conn.execute_batch("COMMIT"))
                    .map_err(|e| {
                        let _ = self.conn.execute_batch("ROLLBACK");
                        self.flushing_streams = false;
                        self.err(e).to_string()
                    })
            });
        match r {
            Ok(()) => self.streams_committed(),
            // Nothing is lost: the next start reads the counters from the rows.
            Err(e) => debug!(error = %e, "cannot write the stream counters at shutdown"),
        }
    }

    /// One step of idle-time upkeep: retention, dedup expiry, WAL size.
    pub(super) fn maintain(&mut self) {
        let now_us = unix_micros(SystemTime::now());
        self.dedup.expire(now_us);
        let (capped, oldest_us) = self.dedup.take_capped();
        // Once an hour at most: the effective dedup window is shorter than
        // the configured one while ids arrive faster than the index holds.
        if capped > 0
            && self
                .capped_warned_us
                .is_none_or(|t| now_us - t >= 3_600_000_000)
        {
            self.capped_warned_us = Some(now_us);
            let remembered_s = oldest_us.map_or(0, |t| (now_us - t).max(0) / 1_000_000);
            warn!(
                journal = %self.path.display(),
                dedup_max_ids = self.opts.dedup_max_ids,
                remembered_s,
                dedup_window_s = self.opts.dedup_window.as_secs(),
                "the dedup index is at journal.dedup_max_ids: ids are remembered for {remembered_s} s, not the whole dedup_window; raise dedup_max_ids (12 bytes per id, allocated at start) if sources redeliver later than that"
            );
        }
        self.stats
            .dedup_ids
            .store(self.dedup.len() as u64, Ordering::Relaxed);
        self.sync_cursors(false);
        self.check_wal(BUSY_TIMEOUT);
        if self.disk_short && self.reserve.restore() {
            self.disk_short = false;
            info!(journal = %self.path.display(), "the disk has room again: delivered events are kept for retain_acked again");
            if self.disk_cap.take().is_some() {
                info!(journal = %self.path.display(), max_size = %crate::units::fmt_bytes(self.opts.max_size), "the disk has room again: the journal may grow to max_size again");
            }
        }
        self.retention_pending = true;
    }

    pub(super) fn retention_step(&mut self) {
        let now_us = unix_micros(SystemTime::now());
        let retain_us = i64::try_from(self.opts.retain_acked.as_micros()).unwrap_or(i64::MAX);
        let cutoff = now_us.saturating_sub(retain_us);
        let result = first_seq_at_or_after(&self.conn, cutoff).and_then(|young| {
            let old_until = match young {
                // A short disk does not wait for retain_acked.
                Some(s) if !self.disk_short => s.saturating_sub(1),
                _ => self.next_seq - 1,
            };
            let limit = old_until.min(self.min_cursor());
            if self.opts.sinks.is_empty() {
                return Ok(0);
            }
            self.delete_chunk(limit)
        });
        match result {
            Ok(0) => self.retention_pending = false,
            Ok(n) => {
                debug!(
                    rows = n,
                    "retention: deleted delivered events past retain_acked"
                );
                let _ = self.refresh_used();
            }
            Err(e) => {
                let error = self.err(e);
                match self.warnings.check("retention") {
                    Some(suppressed) => {
                        warn!(%error, suppressed_since_last_warning = suppressed, "retention step failed; will retry (further failures are logged at debug for a minute)")
                    }
                    None => debug!(%error, "retention step failed; will retry"),
                }
                self.retention_pending = false;
            }
        }
    }

    /// Checkpoints and truncates the WAL once it is over its limit,
    /// waiting at most `patience` for readers to leave old snapshots (the
    /// writer answers nobody meanwhile: between commits the wait is kept
    /// short, and a WAL that stays over its limit is tried again).
    pub(super) fn check_wal(&mut self, patience: Duration) {
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        let size = std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len());
        if size as i64 > WAL_SIZE_LIMIT {
            let _ = self.conn.busy_timeout(patience);
            let r: rusqlite::Result<(i64, i64, i64)> =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    });
            let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
            match r {
                Ok((busy, log, done)) => debug!(
                    wal_bytes = size,
                    busy, log, done, "WAL over its limit: checkpointed"
                ),
                Err(e) => match self.warnings.check("checkpoint") {
                    Some(suppressed) => {
                        warn!(error = %e, wal_bytes = size, suppressed_since_last_warning = suppressed, "WAL checkpoint failed; will retry (further failures are logged at debug for a minute)")
                    }
                    None => debug!(error = %e, wal_bytes = size, "WAL checkpoint failed"),
                },
            }
        }
    }

    pub(super) fn shutdown(&mut self) {
        self.flush_streams();
        self.sync_cursors(true);
        if let Some(load) = self.dedup_loading.take() {
            load.stop();
        }
        let r: rusqlite::Result<i64> =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0));
        if let Err(e) = r {
            debug!(error = %e, "final checkpoint failed");
        }
        // A jump still to be taken keeps the reservation that called for it:
        // the next run must still step over those seqs.
        if self.jump.is_none()
            && let Err(e) = self.mark.close(self.next_seq - 1)
        {
            warn!(error = %e, "cannot record the clean stop in the seq mark; the next start skips the seqs reserved");
        }
    }
}
