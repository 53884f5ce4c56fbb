//! The writer thread: owns the only write connection, applies every queued
//! request in one transaction (group commit) and answers after the commit;
//! a delivered batch's cursor move alone is answered at once, its row
//! written with a later commit (`cursors.rs`).
//! Between batches it does retention and WAL upkeep. It must never block on
//! anything but SQLite and its own queue.
//!
//! The state and what every part of the writer shares (the stream counters'
//! flush, `meta`, row inserts) live here; one batch's transaction, cursors,
//! dead letters, capacity, upkeep, the start-up load and the commit window
//! each have a file of their own.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

// foldhash, not SipHash: stream keys are looked up several times per event.
use hashbrown::{HashMap, HashSet};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::info;

use super::compact;
use super::dedup::DedupIndex;
use super::reserve::Reserve;
use super::schema::{CRITICAL_THROUGH, sqlite_err};
use super::{JournalError, JournalOptions, Request, SharedStats};
use crate::event::{Class, NewEvent};
use crate::units::unix_micros;

mod batch;
mod capacity;
mod cursors;
mod dead_letters;
mod load;
mod upkeep;
mod window;

use super::rowcheck::RowColumns;
use super::seqmark::SeqMark;
use load::DedupLoad;
pub(crate) use load::LoadError;
use window::CommitWindow;
pub(crate) use window::{WINDOW_ENOUGH_EVENTS, wakes_window};

/// Most events taken into one transaction.
const MAX_BATCH_EVENTS: usize = 16_384;

pub(crate) struct WriterState {
    conn: Connection,
    path: PathBuf,
    opts: JournalOptions,
    next_seq: u64,
    /// The highest seq given to each class (by [`Class::as_i64`]), for
    /// [`crate::journal::Committed`]; may run ahead of what is committed
    /// after a rollback, which the signal clamps.
    class_heads: [u64; 2],
    last_recv_us: i64,
    /// Last stream sequence per source, per stream.
    streams: HashMap<String, HashMap<String, u64>>,
    cursors: HashMap<String, u64>,
    /// Empty until `dedup_ready`: appends wait for it (`ensure_dedup`).
    dedup: DedupIndex,
    dedup_ready: bool,
    /// The rebuild running in the background at start-up.
    dedup_loading: Option<DedupLoad>,
    stats: Arc<SharedStats>,
    page_size: u64,
    /// Highest seq deleted by retention (not eviction): replays cannot start
    /// at or below it.
    retention_through: u64,
    retention_pending: bool,
    full_logged: bool,
    /// When the last "dedup index at its count limit" warning was logged.
    capped_warned_us: Option<i64>,
    /// When the last "system clock stepped back" warning was logged, while
    /// the clock is still behind.
    clock_behind_warned: Option<Instant>,
    /// Upkeep that fails is tried again every second: its warnings are
    /// limited to one a minute per kind.
    warnings: crate::warn_limit::WarnLimiter,
    /// The latest eviction rounds, oldest first.
    recent_evictions: VecDeque<EvictionRound>,
    /// The connection is at `synchronous = NORMAL` for a transaction that
    /// only moves cursors (see [`WriterState::relax_sync`]).
    relaxed_sync: bool,
    /// Cursor moves committed without an fsync since the last one.
    unsynced_cursors: bool,
    /// Lazy cursor moves whose rows are not written yet (see `cursors.rs`;
    /// the keys are in `stats.unwritten_cursors`): when the first was made,
    /// and the events they passed.
    unwritten_since: Option<Instant>,
    unwritten_events: u64,
    /// The open transaction writes the cursor rows: `unwritten_cursors`
    /// is cleared once it commits.
    writing_cursors: bool,
    /// Streams whose counters changed since the `streams` table was last
    /// written.
    dirty_streams: HashMap<String, HashSet<String>>,
    /// When the `streams` table was last written, and events stored since.
    streams_flushed_at: Instant,
    events_since_flush: u64,
    /// The current transaction writes the `streams` table: `dirty_streams`
    /// is cleared once it commits.
    flushing_streams: bool,
    /// The last answer of [`WriterState::effective_cursor`]'s probe per
    /// lane key. Retention asks after every cursor move; a lane whose class
    /// has no event after its cursor (the telemetry lane of an all-critical
    /// backlog) would otherwise scan the whole table each time, telemetry
    /// having no index.
    probes: RefCell<HashMap<String, Probe>>,
    /// Disk set aside for the moment the disk fills (see `reserve.rs`).
    reserve: Reserve,
    /// A commit found the disk full and the disk has not had room since:
    /// retention then deletes delivered events without waiting for
    /// `retain_acked`, so that delivering frees room for new events.
    disk_short: bool,
    /// The live size the journal had when a commit found the disk full:
    /// until the disk has room again the journal is kept under it as under
    /// `max_size` (see `capacity.rs`, `disk_full`).
    disk_cap: Option<u64>,
    /// The seqs handed out, reserved outside the WAL (see `seqmark.rs`).
    mark: SeqMark,
    /// Seqs the previous run may have handed out beyond the journal's head
    /// (`first..=last`): the first seq taken jumps over them, and the
    /// commit that holds it records the skipped range.
    jump: Option<(u64, u64)>,
    /// Repeated types and attributes stored once (`compact.rs`); only the
    /// batch's appends add to it.
    texts: compact::TextTable,
}

/// What the probe found for a lane at `cursor`: the first event of its
/// class after it (`first`), looking at the rows up to `through`.
#[derive(Debug, Clone, Copy)]
struct Probe {
    cursor: u64,
    through: u64,
    first: Option<u64>,
}

/// One committed eviction round: the eviction count before and after it,
/// and the seqs where its gap events stand.
struct EvictionRound {
    before: u64,
    after: u64,
    class: Class,
    gap_seqs: Vec<u64>,
}

/// Eviction rounds remembered for [`WriterState::unsent_gap`]; a batch in
/// flight across more rounds than this is answered conservatively.
const RECENT_EVICTION_ROUNDS: usize = 64;

/// Inserts one event row with a statement prepared from [`INSERT_EVENT`];
/// `event_type` and `attrs` are the stored forms of the event's.
#[allow(clippy::too_many_arguments)]
fn bind_event(
    st: &mut rusqlite::Statement<'_>,
    seq: u64,
    ev: &NewEvent,
    stream_seq: u64,
    recv_us: i64,
    only_sink: Option<&str>,
    event_type: compact::Stored<'_>,
    attrs: compact::Stored<'_>,
) -> rusqlite::Result<()> {
    let crc = RowColumns {
        seq: seq as i64,
        source: &ev.source,
        id: &ev.id,
        stream: &ev.stream,
        stream_seq: stream_seq as i64,
        class: ev.class.as_i64(),
        event_type: &ev.event_type,
        source_time: ev.source_time.as_deref(),
        recv_us,
        data: &ev.data,
        attrs: ev.attrs.as_deref(),
        size: ev.size() as i64,
        only_sink,
    }
    .check();
    // The checksum is over the values; the row holds their stored forms.
    st.execute(params![
        seq as i64,
        ev.source,
        ev.id,
        ev.stream,
        stream_seq as i64,
        ev.class.as_i64(),
        event_type,
        compact::store_time(ev.source_time.as_deref()),
        recv_us,
        ev.data,
        attrs,
        ev.size() as i64,
        only_sink,
        crc,
    ])?;
    Ok(())
}

const INSERT_EVENT: &str =
    "INSERT INTO events (seq, source, event_id, stream, stream_seq, class, type,
                             source_time, recv_time, data, attrs, size, only_sink, crc)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

struct Undo {
    next_seq: u64,
    last_recv_us: i64,
    /// Streams this batch touched, with their value before it.
    streams: HashMap<String, HashMap<String, Option<u64>>>,
    cursors: Vec<(String, Option<u64>)>,
    retention_through: u64,
}

/// The `meta` key of a skipped seq range that starts at `first`; its value
/// is the range's last seq.
pub(crate) fn skip_key(first: u64) -> String {
    format!("{SKIP_KEY_PREFIX}{first:020}")
}

pub(crate) const SKIP_KEY_PREFIX: &str = "skipped_seqs.";
/// Above every skip key (`~` sorts after `.` and the digits).
pub(crate) const SKIP_KEY_END: &str = "skipped_seqs~";

/// Takes the next seq from `next`, jumping over `jump` when it starts there.
fn take_seq(next: &mut u64, jump: Option<(u64, u64)>) -> u64 {
    if let Some((first, last)) = jump
        && *next == first
    {
        *next = last + 1;
    }
    let seq = *next;
    *next += 1;
    seq
}

/// A request-level failure that aborts the whole transaction.
struct Fatal(JournalError);

fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn meta_set(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

fn meta_add(conn: &Connection, key: &str, delta: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(params![key, delta])?;
    Ok(())
}

impl WriterState {
    pub(crate) fn head_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The seq for the next stored row, past any seqs a crashed run may
    /// have handed out.
    fn take_seq(&mut self) -> u64 {
        take_seq(&mut self.next_seq, self.jump)
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        sqlite_err(&self.path, e)
    }

    fn refresh_used(&mut self) -> rusqlite::Result<u64> {
        let pages: i64 = self
            .conn
            .prepare_cached("PRAGMA page_count")?
            .query_row([], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .prepare_cached("PRAGMA freelist_count")?
            .query_row([], |r| r.get(0))?;
        let used = (pages - free).max(0) as u64 * self.page_size;
        self.stats.used_bytes.store(used, Ordering::Relaxed);
        Ok(used)
    }

    /// Runs a statement without rows (`BEGIN IMMEDIATE`, `COMMIT`) from the
    /// statement cache: on the commit path, compiling it anew every time is
    /// CPU for nothing. Never a pragma that sets something (`synchronous`):
    /// SQLite applies those while compiling, so a cached one would do
    /// nothing the second time.
    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    fn insert_row(
        &self,
        seq: u64,
        ev: &NewEvent,
        stream_seq: u64,
        recv_us: i64,
        only_sink: Option<&str>,
    ) -> rusqlite::Result<()> {
        let mut st = self.conn.prepare_cached(INSERT_EVENT)?;
        // Not through `texts`: only the batch's appends, whose transaction
        // undoes its entries on a rollback, add to it.
        bind_event(
            &mut st,
            seq,
            ev,
            stream_seq,
            recv_us,
            only_sink,
            compact::store_type(&ev.event_type),
            compact::store_attrs(ev.attrs.as_deref(), &ev.stream),
        )?;
        if ev.class == Class::Critical {
            // A row below `streams_through` (a gap row in the place of an
            // evicted one) is past the flush that would have listed it.
            self.conn
                .prepare_cached(&format!(
                    "INSERT OR IGNORE INTO critical(seq) SELECT ?1 WHERE ?1 <= {CRITICAL_THROUGH}"
                ))?
                .execute([seq as i64])?;
        }
        Ok(())
    }

    /// Writes the changed stream counters, `last_seq` and `last_recv_us`
    /// in the open transaction, and where they are current
    /// (`streams_through`). Every transaction that deletes rows calls it
    /// first: the rows after `streams_through` are the only record of the
    /// newest counters, so they must never go before the table has them.
    fn write_streams(&mut self) -> rusqlite::Result<()> {
        let conn = &self.conn;
        {
            let mut st = conn.prepare_cached(
                "INSERT INTO streams(source, stream, last_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT(source, stream) DO UPDATE SET last_seq = excluded.last_seq",
            )?;
            for (source, touched) in &self.dirty_streams {
                let Some(heads) = self.streams.get(source) else {
                    continue;
                };
                for stream in touched {
                    // A stream rolled back to before its first event has no
                    // counter and no row to write.
                    if let Some(last) = heads.get(stream) {
                        st.execute(params![source, stream, *last as i64])?;
                    }
                }
            }
        }
        // The critical lane's seqs committed since the last flush (schema
        // 5): `critical` must hold every one through `streams_through`.
        conn.prepare_cached(&format!(
            "INSERT OR IGNORE INTO critical(seq) SELECT seq FROM events
             WHERE class = 0 AND seq > {CRITICAL_THROUGH}"
        ))?
        .execute([])?;
        let head = (self.next_seq - 1) as i64;
        meta_set(conn, "last_seq", head)?;
        meta_set(conn, "last_recv_us", self.last_recv_us)?;
        meta_set(conn, "streams_through", head)?;
        self.flushing_streams = true;
        Ok(())
    }

    /// After a commit: what the transaction wrote of the stream counters
    /// is on disk.
    fn streams_committed(&mut self) {
        if self.flushing_streams {
            self.flushing_streams = false;
            self.dirty_streams.clear();
            self.events_since_flush = 0;
            self.streams_flushed_at = Instant::now();
        }
    }
}

/// How many event bytes may be appended between two looks at the WAL's
/// size (see `run`): its limit is then overshot by a few MB at most.
const WAL_CHECK_BYTES: u64 = 4 << 20;
/// How long such a look between commits waits for readers: appends wait
/// with it, and one long reader must not stall them every 4 MiB.
const WAL_CHECK_PATIENCE: Duration = Duration::from_millis(200);

fn event_bytes(r: &Request) -> u64 {
    match r {
        Request::Append { events, .. } => events.iter().map(|e| e.size() as u64).sum(),
        _ => 0,
    }
}

/// A delivered batch's cursor move, answered without a transaction.
fn is_lazy_advance(r: &Request) -> bool {
    matches!(r, Request::Advance { lazy: true, .. })
}

fn event_count(r: &Request) -> usize {
    match r {
        Request::Append { events, .. } => events.len(),
        _ => 1,
    }
}

/// How the writer tells the rest of the agent what it committed.
pub(crate) struct Signals {
    /// What is committed.
    pub committed: watch::Sender<crate::journal::Committed>,
    /// Bumped after each committed rewind.
    pub rewinds: watch::Sender<u64>,
    /// Woken when cursors move (space may be freed for blocked appends).
    pub space: Arc<Notify>,
    /// The other way: notified by the senders of requests a commit window
    /// must not wait for ([`wakes_window`]), so that the window, which does
    /// not wait on the queue, sees them at once.
    pub urgent: Arc<Notify>,
}

pub(crate) fn run(mut state: WriterState, mut rx: mpsc::Receiver<Request>, signals: Signals) {
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    let mut window = CommitWindow::new(state.opts.commit_window, signals.urgent.clone());
    // Event bytes appended since the WAL's size was last looked at.
    let mut since_wal_check = 0u64;
    loop {
        state
            .stats
            .writer_heartbeat_us
            .store(unix_micros(SystemTime::now()), Ordering::Relaxed);
        let first = if state.retention_pending {
            match rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::error::TryRecvError::Empty) => {
                    state.retention_step();
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.blocking_recv() {
                Some(r) => r,
                None => break,
            }
        };
        let mut batch = Vec::new();
        let mut n = 0;
        let mut maintain = false;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Maintain => maintain = true,
                Request::Shutdown { reply } => {
                    shutdown = Some(reply);
                    break;
                }
                other => {
                    n += event_count(&other);
                    batch.push(other);
                }
            }
            if n < MAX_BATCH_EVENTS {
                next = rx.try_recv().ok();
            }
        }
        // Lazy cursor moves among appends need no transaction: answered
        // now, their rows go with a later commit. Beside anything else
        // (a replay, dead letters) they keep their place in the batch.
        if batch.iter().any(is_lazy_advance)
            && batch
                .iter()
                .all(|r| is_lazy_advance(r) || matches!(r, Request::Append { .. }))
        {
            let (lazy, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(is_lazy_advance);
            for r in lazy {
                state.advance_at_once(r, &signals);
            }
            batch = rest;
        }
        if shutdown.is_none()
            && let Some(window) = &mut window
        {
            window.gather(
                &mut rx,
                &mut batch,
                &mut maintain,
                &mut shutdown,
                &mut |r| state.advance_at_once(r, &signals),
            );
        }
        if !batch.is_empty() {
            since_wal_check += batch.iter().map(event_bytes).sum::<u64>();
            state.process(batch, &signals);
        }
        // No commit carried them (no events came, as in a drain): the
        // cursor rows get a transaction of their own once due (the tick's
        // upkeep writes them with an fsync).
        if !maintain && state.cursors_due(cursors::CURSOR_WRITE_ALONE_AFTER) {
            state.write_cursors_alone();
        }
        if maintain {
            since_wal_check = 0;
            state.maintain();
        } else if since_wal_check >= WAL_CHECK_BYTES {
            // Not only at upkeep: under a fast append stream with readers
            // that read back to back (a sink draining a backlog), SQLite
            // rarely finds the moment to start the WAL over, and a second
            // of appends can add tens of MB to it.
            since_wal_check = 0;
            state.check_wal(WAL_CHECK_PATIENCE);
        }
        if shutdown.is_some() {
            break;
        }
    }
    state.shutdown();
    state.stats.writer_alive.store(false, Ordering::Relaxed);
    info!(journal = %state.path.display(), head_seq = state.next_seq - 1, "journal writer stopped");
    drop(rx);
    if let Some(reply) = shutdown {
        let _ = reply.send(());
    }
}
