//! The writer thread: owns the only write connection, applies every queued
//! request in one transaction (group commit) and answers after the commit.
//! Between batches it does retention and WAL upkeep. It must never block on
//! anything but SQLite and its own queue.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

// foldhash, not SipHash: stream keys are looked up several times per event.
use hashbrown::{HashMap, HashSet};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::dedup::{DedupIndex, Verified, key_hash};
use super::reader::first_seq_at_or_after;
use super::reserve::Reserve;
use super::schema::{
    STARTUP_CACHE_KIB, STREAM_HEADS, WAL_SIZE_LIMIT, WRITER_CACHE_KIB, open_reader, sqlite_err,
};
use super::{
    AppendOutcome, AppendReply, JournalError, JournalOptions, Request, RewindTo, SharedStats,
    SyncMode, WhenFull, unix_micros,
};
use crate::event::{Class, GAP_EVENT_TYPE, NewEvent};

/// Most events taken into one transaction.
const MAX_BATCH_EVENTS: usize = 16_384;
/// Rows deleted per retention transaction.
const RETENTION_CHUNK: u64 = 4_096;
/// Rows examined per eviction round.
const EVICTION_CHUNK: i64 = 2_048;
/// Per-row overhead on disk beyond the accounted event size (row header,
/// integer columns, B-tree cell).
const ROW_OVERHEAD: u64 = 64;
/// The `streams` table and `meta.last_seq` are written with an event commit
/// once this long has passed since they last were (or after
/// [`STREAMS_FLUSH_EVENTS`] events), not with every commit: under a trickle
/// they were two of the three pages each commit wrote. Start-up reads the
/// rows committed since (see [`STREAM_HEADS`]), so this bounds that scan.
const STREAMS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const STREAMS_FLUSH_EVENTS: u64 = 65_536;
/// A commit window ends early once this many events are gathered: a
/// source with this many waiting is batching by itself, and holding its
/// acks longer would only cap its rate (a source with `max_inflight`
/// unacknowledged messages cannot send more until they are acked).
pub(crate) const WINDOW_ENOUGH_EVENTS: usize = 32;
/// ... or once the events gathered fill this many bytes (a few pages):
/// waiting longer no longer saves page writes.
const WINDOW_ENOUGH_BYTES: u64 = 16 * 1024;
/// The shortest quiet time that ends a commit window early (see
/// `CommitWindow::gather`).
const WINDOW_QUIET: Duration = Duration::from_millis(2);

pub(crate) struct WriterState {
    conn: Connection,
    path: PathBuf,
    opts: JournalOptions,
    next_seq: u64,
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
    /// The latest eviction rounds, oldest first.
    recent_evictions: VecDeque<EvictionRound>,
    /// The connection is at `synchronous = NORMAL` for a transaction that
    /// only moves cursors (see [`WriterState::relax_sync`]).
    relaxed_sync: bool,
    /// Cursor moves committed without an fsync since the last one.
    unsynced_cursors: bool,
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

/// The dedup index being rebuilt on its own thread and connection.
struct DedupLoad {
    rx: std::sync::mpsc::Receiver<Result<Option<DedupIndex>, JournalError>>,
    cancel: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    started: Instant,
}

impl DedupLoad {
    /// `None` when no thread can be started: the writer then reads the
    /// index itself at the first append.
    fn start(path: &Path, opts: &JournalOptions, head: u64) -> Option<DedupLoad> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let (path, opts, stop) = (path.to_path_buf(), opts.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("journal-dedup".into())
            .spawn(move || {
                let built = open_reader(&path).and_then(|conn| {
                    // The rows are read once; a large cache would only stay
                    // allocated until the connection closes.
                    conn.pragma_update(None, "cache_size", -STARTUP_CACHE_KIB)
                        .map_err(|e| sqlite_err(&path, e))?;
                    build_dedup(&conn, &path, &opts, head, Some(&stop))
                });
                let _ = tx.send(built);
            });
        match thread {
            Ok(thread) => Some(DedupLoad {
                rx,
                cancel,
                thread,
                started: Instant::now(),
            }),
            Err(e) => {
                warn!(error = %e, "cannot start a thread for the dedup index; the writer reads it at the first append");
                None
            }
        }
    }
}

/// Rows checked between looks at the cancel flag.
const DEDUP_CANCEL_CHECK: u64 = 65_536;

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

/// Inserts one event row with a statement prepared from [`INSERT_EVENT`].
fn bind_event(
    st: &mut rusqlite::Statement<'_>,
    seq: u64,
    ev: &NewEvent,
    stream_seq: u64,
    recv_us: i64,
    only_sink: Option<&str>,
) -> rusqlite::Result<()> {
    st.execute(params![
        seq as i64,
        ev.source,
        ev.id,
        ev.stream,
        stream_seq as i64,
        ev.class.as_i64(),
        ev.event_type,
        ev.source_time,
        recv_us,
        ev.data,
        ev.attrs,
        ev.size() as i64,
        only_sink,
    ])?;
    Ok(())
}

const INSERT_EVENT: &str =
    "INSERT INTO events (seq, source, event_id, stream, stream_seq, class, type,
                             source_time, recv_time, data, attrs, size, only_sink)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";

/// The dedup index of the rows up to `head` inside the dedup window; `None`
/// when cancelled.
fn build_dedup(
    conn: &Connection,
    path: &Path,
    opts: &JournalOptions,
    head: u64,
    cancel: Option<&AtomicBool>,
) -> Result<Option<DedupIndex>, JournalError> {
    let mut dedup =
        DedupIndex::new(opts.dedup_window, opts.dedup_max_ids).map_err(|e| JournalError::Io {
            path: path.to_path_buf(),
            what: "dedup index".into(),
            detail: e.to_string(),
        })?;
    let e = |e| sqlite_err(path, e);
    let now_us = unix_micros(SystemTime::now());
    let window_us = i64::try_from(opts.dedup_window.as_micros()).unwrap_or(i64::MAX);
    let Some(from) = first_seq_at_or_after(conn, now_us.saturating_sub(window_us)).map_err(e)?
    else {
        return Ok(Some(dedup));
    };
    // The index keeps the newest `dedup_max_ids` ids at most: rows before
    // those would be inserted only to be dropped again. (Gap rows in the
    // range make it hold slightly fewer; they are rare.)
    let from = from.max(head.saturating_sub(opts.dedup_max_ids as u64) + 1);
    let mut st = conn
        .prepare(
            "SELECT seq, source, event_id, recv_time FROM events
         WHERE seq >= ?1 AND seq <= ?2 AND only_sink IS NULL AND type != ?3 ORDER BY seq",
        )
        .map_err(e)?;
    let mut rows = st
        .query(params![from as i64, head as i64, GAP_EVENT_TYPE])
        .map_err(e)?;
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(e)? {
        n += 1;
        if n.is_multiple_of(DEDUP_CANCEL_CHECK) && cancel.is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Ok(None);
        }
        let (seq, source, id, recv) = dedup_row(row).map_err(e)?;
        dedup.insert(key_hash(source, id), seq as u64, recv);
    }
    Ok(Some(dedup))
}

/// `(seq, source, event_id, recv_time)` of a row of `build_dedup`'s query.
fn dedup_row<'r>(row: &'r rusqlite::Row<'_>) -> rusqlite::Result<(i64, &'r str, &'r str, i64)> {
    Ok((
        row.get(0)?,
        row.get_ref(1)?.as_str()?,
        row.get_ref(2)?.as_str()?,
        row.get(3)?,
    ))
}

struct Undo {
    next_seq: u64,
    last_recv_us: i64,
    /// Streams this batch touched, with their value before it.
    streams: HashMap<String, HashMap<String, Option<u64>>>,
    cursors: Vec<(String, Option<u64>)>,
    retention_through: u64,
}

enum Reply {
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

    fn send(self) {
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
    pub(crate) fn load(
        conn: Connection,
        opts: &JournalOptions,
        stats: Arc<SharedStats>,
    ) -> Result<WriterState, JournalError> {
        let path = opts.path.clone();
        let e = |e| sqlite_err(&path, e);
        let meta_last = meta_get(&conn, "last_seq").map_err(e)?.unwrap_or(0).max(0) as u64;
        let (max_seq, last_recv): (Option<i64>, Option<i64>) = conn
            .query_row(
                "SELECT seq, recv_time FROM events ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(e)?
            .unwrap_or((None, None));
        let head = meta_last.max(max_seq.unwrap_or(0).max(0) as u64);
        let last_recv_us = last_recv
            .unwrap_or(0)
            .max(meta_get(&conn, "last_recv_us").map_err(e)?.unwrap_or(0));

        let mut streams: HashMap<String, HashMap<String, u64>> = HashMap::new();
        {
            let mut st = conn.prepare(STREAM_HEADS).map_err(e)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?.max(0) as u64,
                    ))
                })
                .map_err(e)?;
            for row in rows {
                let (source, stream, v) = row.map_err(e)?;
                streams.entry(source).or_default().insert(stream, v);
            }
        }
        // Counters the table does not hold yet (only the rows after
        // `streams_through` do) are written with the next flush: it moves
        // `streams_through` past those rows.
        let mut dirty_streams: HashMap<String, HashSet<String>> = HashMap::new();
        {
            let mut st = conn
                .prepare("SELECT source, stream, last_seq FROM streams")
                .map_err(e)?;
            let mut in_table: HashMap<(String, String), u64> = HashMap::new();
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?.max(0) as u64,
                    ))
                })
                .map_err(e)?;
            for row in rows {
                let (source, stream, v) = row.map_err(e)?;
                in_table.insert((source, stream), v);
            }
            for (source, heads) in &streams {
                for (stream, v) in heads {
                    if in_table.get(&(source.clone(), stream.clone())) != Some(v) {
                        dirty_streams
                            .entry(source.clone())
                            .or_default()
                            .insert(stream.clone());
                    }
                }
            }
        }
        let mut cursors = HashMap::new();
        {
            let mut st = conn.prepare("SELECT sink, seq FROM cursors").map_err(e)?;
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
                })
                .map_err(e)?;
            for row in rows {
                let (k, v) = row.map_err(e)?;
                cursors.insert(k, v);
            }
        }
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(e)?;

        // The dedup index of a large journal takes seconds to read (about
        // 1 s per million ids). Forwarders need none of it: it is read on
        // its own connection while the writer already serves them, and only
        // the first append waits for it.
        let dedup_loading = DedupLoad::start(&path, opts, head);
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(e)?;
        let retention_through = meta_get(&conn, "retention_through")
            .map_err(e)?
            .unwrap_or(0)
            .max(0) as u64;
        stats.head_seq.store(head, Ordering::Relaxed);
        stats.evicted_telemetry.store(
            meta_get(&conn, "evicted_telemetry")
                .map_err(e)?
                .unwrap_or(0) as u64,
            Ordering::Relaxed,
        );
        stats.evicted_critical.store(
            meta_get(&conn, "evicted_critical").map_err(e)?.unwrap_or(0) as u64,
            Ordering::Relaxed,
        );
        stats.writer_alive.store(true, Ordering::Relaxed);
        let mut state = WriterState {
            conn,
            path: path.clone(),
            opts: opts.clone(),
            next_seq: head + 1,
            last_recv_us,
            streams,
            cursors,
            dedup: DedupIndex::unloaded(opts.dedup_window, opts.dedup_max_ids),
            dedup_ready: false,
            dedup_loading,
            stats,
            page_size: page_size.max(512) as u64,
            retention_through,
            retention_pending: true,
            full_logged: false,
            capped_warned_us: None,
            recent_evictions: VecDeque::new(),
            probes: RefCell::new(HashMap::new()),
            relaxed_sync: false,
            unsynced_cursors: false,
            dirty_streams,
            streams_flushed_at: Instant::now(),
            events_since_flush: 0,
            flushing_streams: false,
            reserve: Reserve::open(&path, opts.disk_reserve),
            disk_short: false,
        };
        state.refresh_used().map_err(e)?;
        Ok(state)
    }

    pub(crate) fn head_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        sqlite_err(&self.path, e)
    }

    fn refresh_used(&mut self) -> rusqlite::Result<u64> {
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let used = (pages - free).max(0) as u64 * self.page_size;
        self.stats.used_bytes.store(used, Ordering::Relaxed);
        Ok(used)
    }

    /// The cursor stored under `key`; a lane without a row of its own
    /// stands at its sink's row (see [`super::cursor_key`]).
    fn cursor_of(&self, key: &str) -> Option<u64> {
        self.cursors.get(key).copied().or_else(|| {
            super::lane_of_key(key).and_then(|(sink, _)| self.cursors.get(sink).copied())
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
        let Some((_, class)) = super::lane_of_key(key) else {
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
                super::reader::first_of_class_after(&self.conn, class, cursor.max(p.through))
            }
            _ => super::reader::first_of_class_after(&self.conn, class, cursor),
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
    fn min_cursor(&self) -> u64 {
        self.opts
            .sinks
            .iter()
            .map(|k| self.effective_cursor(k))
            .min()
            .unwrap_or(0)
    }

    /// The lowest cursor of the sinks and lanes that take `class`: events of
    /// that class past it are undelivered to someone.
    fn min_cursor_for(&self, class: Class) -> u64 {
        self.opts
            .sinks
            .iter()
            .filter(|k| super::lane_of_key(k).is_none_or(|(_, c)| c == class))
            .map(|k| self.cursor_of(k).unwrap_or(0))
            .min()
            .unwrap_or_else(|| self.min_cursor())
    }

    fn recv_now(&mut self) -> i64 {
        let now = unix_micros(SystemTime::now());
        if now < self.last_recv_us {
            if self.last_recv_us - now > 1_000_000 {
                warn!(
                    behind_ms = (self.last_recv_us - now) / 1000,
                    "system clock stepped back: receive times hold at the last value until it catches up"
                );
            }
            self.last_recv_us
        } else {
            self.last_recv_us = now;
            now
        }
    }

    /// Applies one batch of requests: one transaction, then the answers.
    fn process(&mut self, mut batch: Vec<Request>, signals: &Signals) {
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
                return;
            }
        }
        let cursors_only = batch.iter().all(|r| matches!(r, Request::Advance { .. }));
        if let Err(e) = self.relax_sync(cursors_only) {
            // Never commit events without the configured durability.
            error!(error = %e, "journal: cannot set the commit durability");
            for r in batch {
                fail_request(r, &e);
            }
            return;
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

        let undo = Undo {
            next_seq: self.next_seq,
            last_recv_us: self.last_recv_us,
            streams: HashMap::new(),
            cursors: Vec::new(),
            retention_through: self.retention_through,
        };
        self.dedup.begin();
        let mut undo = undo;
        let mut replies = Vec::with_capacity(batch.len());
        let mut advanced = false;
        let mut rewound = false;
        let mut appended = 0u64;
        let mut duplicates = 0u64;

        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let e = self.err(e);
            error!(error = %e, "journal: cannot begin a transaction");
            for r in batch {
                fail_request(r, &e);
            }
            return;
        }
        let recv_us = self.recv_now();
        let mut failed: Option<JournalError> = None;
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
                    if let Err(e) = &room {
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
                    reply,
                } => match self.advance(&sink, from, to, read_at_evictions, &mut undo) {
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

        if failed.is_none()
            && let Err(e) = self.finish_batch(&undo, duplicates)
        {
            failed = Some(e);
        }
        let outcome = match failed {
            None => self.conn.execute_batch("COMMIT").map_err(|e| self.err(e)),
            Some(e) => Err(e),
        };
        if relaxed && let Err(e) = self.relax_sync(false) {
            // The next batch with events tries again and fails rather than
            // commit them without an fsync.
            error!(error = %e, "journal: cannot restore full commit durability");
        }
        match outcome {
            Ok(()) => {
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
                if let Err(e) = self.refresh_used() {
                    debug!(error = %e, "cannot read page counts");
                }
                if relaxed {
                    self.unsynced_cursors |= advanced;
                } else if appended > 0 {
                    // This commit's fsync covered every WAL frame before it.
                    self.unsynced_cursors = false;
                }
                self.streams_committed();
                if self.next_seq != undo.next_seq {
                    signals.committed.send_replace(self.next_seq - 1);
                }
                if rewound {
                    signals.rewinds.send_modify(|n| *n += 1);
                }
                for r in replies {
                    r.send();
                }
                if advanced {
                    self.retention_pending = true;
                    signals.space.notify_waiters();
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.flushing_streams = false;
                error!(error = %e, "journal commit failed: nothing of this batch was stored");
                super::stats_set_error(&self.stats, &e);
                self.rollback(undo);
                for r in replies {
                    r.fail(&e).send();
                }
                if matches!(e, JournalError::DiskFull { .. }) {
                    self.disk_full();
                    self.reopen();
                }
            }
        }
    }

    /// A commit found the disk full: give the reserve back, so that the
    /// next cursor moves, checkpoint and retention fit, and let retention
    /// delete what is delivered at once.
    fn disk_full(&mut self) {
        if !self.disk_short {
            self.disk_short = true;
            self.retention_pending = true;
            warn!(journal = %self.path.display(), "disk full: delivered events are deleted at once (not after retain_acked) until the disk has room again");
        }
        if self.reserve.release() {
            warn!(
                journal = %self.path.display(),
                bytes = self.opts.disk_reserve,
                "disk full: gave back the disk reserve so that deliveries can move their cursors and free the journal; it is set aside again once the disk has room"
            );
        }
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
        self.retention_through = undo.retention_through;
    }

    /// After a disk-full error SQLite's state for this connection is
    /// suspect (an fsync that failed cannot be retried safely): reopen.
    fn reopen(&mut self) {
        match super::schema::reopen_writer(&self.path, self.opts.sync) {
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

    /// Under `sync = "full"`, a transaction that only moves cursors commits
    /// without an fsync (`synchronous = NORMAL`). A cursor move lost to a
    /// power failure only sends acknowledged events again, which the
    /// upstream drops by id (invariant 3); one fsync per delivered batch
    /// cost the drain about 5 % of its rate (BENCHMARKS.md) and wore flash
    /// storage. The next event commit makes such moves durable (its fsync
    /// covers the whole WAL before it), or else the once-a-second tick.
    fn relax_sync(&mut self, relaxed: bool) -> Result<(), JournalError> {
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

    /// Makes relaxed cursor moves durable when no event commit has.
    fn sync_cursors(&mut self) {
        if !self.unsynced_cursors {
            return;
        }
        let synced = self.relax_sync(false).and_then(|()| {
            let now_us = unix_micros(SystemTime::now());
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .and_then(|()| meta_set(&self.conn, "cursors_synced_us", now_us))
                .and_then(|()| self.conn.execute_batch("COMMIT"))
                .map_err(|e| {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.err(e)
                })
        });
        match synced {
            Ok(()) => self.unsynced_cursors = false,
            Err(e) => debug!(error = %e, "cannot sync the cursor moves; trying again in a second"),
        }
    }

    /// Makes sure the dedup index is loaded: waits for the start-up rebuild,
    /// or reads the index here when that failed.
    fn ensure_dedup(&mut self) -> Result<(), JournalError> {
        if self.dedup_ready {
            return Ok(());
        }
        let started = Instant::now();
        let mut index = None;
        let mut since_open = None;
        if let Some(load) = self.dedup_loading.take() {
            since_open = Some(load.started);
            match load.rx.recv() {
                Ok(Ok(built)) => index = built,
                Ok(Err(e)) => {
                    warn!(error = %e, "reading the dedup index in the background failed; the writer reads it now");
                }
                Err(_) => warn!("the dedup index thread stopped; the writer reads the index now"),
            }
            let _ = load.thread.join();
            debug!(
                waited_ms = started.elapsed().as_millis() as u64,
                "first append waited for the dedup index"
            );
        }
        let index = match index {
            Some(index) => index,
            None => match build_dedup(&self.conn, &self.path, &self.opts, self.head_seq(), None)? {
                Some(index) => index,
                // Only a cancel flag ends a rebuild early, and none was
                // given; appends must never run without the index.
                None => {
                    return Err(JournalError::Io {
                        path: self.path.clone(),
                        what: "dedup index".into(),
                        detail: "reading it stopped early".into(),
                    });
                }
            },
        };
        if !index.is_empty() {
            info!(
                ids = index.len(),
                elapsed_ms = since_open.unwrap_or(started).elapsed().as_millis() as u64,
                "dedup index rebuilt from the journal"
            );
        }
        self.dedup = index;
        self.dedup_ready = true;
        self.stats
            .dedup_ids
            .store(self.dedup.len() as u64, Ordering::Relaxed);
        Ok(())
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
            let seq = self.next_seq;
            let stream_seq = bump_stream(&mut self.streams, &ev.source, &ev.stream, undo);
            bind_event(&mut st, seq, ev, stream_seq, recv_us, None)
                .map_err(|e| sqlite_err(path, e))?;
            self.next_seq += 1;
            self.dedup.insert(hash, seq, recv_us);
            out.push(AppendOutcome::Stored { seq, stream_seq });
        }
        Ok(out)
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
        bind_event(&mut st, seq, ev, stream_seq, recv_us, only_sink)
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
            && (self.events_since_flush >= STREAMS_FLUSH_EVENTS
                || self.streams_flushed_at.elapsed() >= STREAMS_FLUSH_INTERVAL)
        {
            self.write_streams().map_err(|e| self.err(e))?;
        }
        if duplicates > 0 {
            meta_add(&self.conn, "duplicates", duplicates as i64).map_err(|e| self.err(e))?;
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

    /// Moves `sink`'s cursor to `to`, or short of it (see
    /// [`WriterState::unsent_gap`]); returns where it now stands, or `None`
    /// when it did not move.
    fn advance(
        &mut self,
        sink: &str,
        from: Option<u64>,
        to: u64,
        read_at_evictions: Option<u64>,
        undo: &mut Undo,
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
            let lane = super::lane_of_key(sink).map(|(_, c)| c);
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
        self.store_cursor(sink, to)
            .map_err(|e| Fatal(self.err(e)))?;
        undo.cursors.push((sink.to_string(), current));
        self.cursors.insert(sink.to_string(), to);
        Ok(Some(to))
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

    fn rewind(
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
            let of_sink = k == sink || super::lane_of_key(k).is_some_and(|(s, _)| s == sink);
            if of_sink && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        if let Some(class) = class {
            let lane = super::cursor_key(sink, Some(class));
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

    fn dead_letter(
        &mut self,
        sink: &str,
        ev: &crate::event::StoredEvent,
        reason: &str,
    ) -> Result<i64, JournalError> {
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (sink, seq, reason, time_us, source, event_id, stream,
                    stream_seq, class, type, source_time, recv_time, data, attrs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    sink,
                    ev.seq as i64,
                    reason,
                    unix_micros(SystemTime::now()),
                    ev.source,
                    ev.id,
                    ev.stream,
                    ev.stream_seq as i64,
                    ev.class.as_i64(),
                    ev.event_type,
                    ev.source_time,
                    ev.recv_time_us,
                    ev.data,
                    ev.attrs,
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    fn retry_dead_letter(
        &mut self,
        id: i64,
        recv_us: i64,
    ) -> Result<Result<u64, JournalError>, Fatal> {
        let row = self
            .conn
            .query_row(
                "SELECT sink, source, event_id, stream, stream_seq, class, type, source_time, data, attrs
                 FROM dead_letters WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        NewEvent {
                            source: r.get(1)?,
                            id: r.get(2)?,
                            stream: r.get(3)?,
                            class: Class::from_i64(r.get(5)?),
                            event_type: r.get(6)?,
                            source_time: r.get(7)?,
                            data: r.get(8)?,
                            attrs: r.get(9)?,
                        },
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| Fatal(self.err(e)))?;
        let Some((sink, ev, stream_seq)) = row else {
            return Ok(Err(JournalError::NotFound {
                path: self.path.clone(),
                what: format!("no dead letter with id {id}"),
            }));
        };
        let seq = self.next_seq;
        // The event keeps its stream sequence: it is the same event, late.
        self.insert_row(seq, &ev, stream_seq.max(0) as u64, recv_us, Some(&sink))
            .and_then(|_| {
                self.conn
                    .execute("DELETE FROM dead_letters WHERE id = ?1", [id])
                    .map(|_| ())
            })
            .map_err(|e| Fatal(self.err(e)))?;
        self.next_seq += 1;
        meta_set(&self.conn, "last_seq", seq as i64).map_err(|e| Fatal(self.err(e)))?;
        info!(
            dead_letter = id,
            sink, seq, "dead letter put back for delivery"
        );
        Ok(Ok(seq))
    }

    fn drop_dead_letter(&mut self, id: i64) -> Result<Result<(), JournalError>, Fatal> {
        let n = self
            .conn
            .execute("DELETE FROM dead_letters WHERE id = ?1", [id])
            .map_err(|e| Fatal(self.err(e)))?;
        if n == 0 {
            return Ok(Err(JournalError::NotFound {
                path: self.path.clone(),
                what: format!("no dead letter with id {id}"),
            }));
        }
        info!(dead_letter = id, "dead letter dropped");
        Ok(Ok(()))
    }

    /// Frees space for `need` more bytes, by the capacity rules of the module
    /// doc. Runs its own transactions, before the batch's.
    fn make_room(&mut self, need: u64) -> Result<(), JournalError> {
        let max = self.opts.max_size;
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
                loop {
                    let used = self.refresh_used().map_err(|e| self.err(e))?;
                    if used <= target {
                        return Ok(());
                    }
                    if self.evict_round(class).map_err(|e| self.err(e))? == 0 {
                        break;
                    }
                }
            }
            let used = self.refresh_used().map_err(|e| self.err(e))?;
            if used + need <= max {
                return Ok(());
            }
        }
        if !self.full_logged {
            warn!(
                journal = %self.path.display(),
                used = %super::fmt_bytes(used),
                max = %super::fmt_bytes(max),
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
    fn delete_chunk(&mut self, limit: u64) -> rusqlite::Result<u64> {
        let oldest: Option<i64> = self
            .conn
            .query_row("SELECT seq FROM events ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(oldest) = oldest else { return Ok(0) };
        let oldest = oldest.max(0) as u64;
        if oldest > limit {
            return Ok(0);
        }
        let upto = limit.min(oldest + RETENTION_CHUNK - 1);
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| {
            self.write_streams()?;
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
                self.retention_through = through;
                self.stats
                    .retention_deleted
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n as u64)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.flushing_streams = false;
                Err(e)
            }
        }
    }

    /// Evicts the oldest undelivered events of `class` (one chunk) and puts a
    /// gap event in place of every evicted range. Returns the rows evicted.
    fn evict_round(&mut self, class: Class) -> rusqlite::Result<u64> {
        let min_cursor = self.min_cursor_for(class);
        let victims: Vec<(u64, String, String, u64, i64)> = {
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
                    Ok((
                        r.get::<_, i64>(0)?.max(0) as u64,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, i64>(3)?.max(0) as u64,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )?
            .collect::<Result<_, _>>()?
        };
        if victims.is_empty() {
            return Ok(0);
        }
        // Contiguous stream-sequence runs per (source, stream), each with the
        // seq of its first evicted row, where its gap event will stand.
        struct Run {
            source: String,
            stream: String,
            first: u64,
            last: u64,
            at_seq: u64,
            /// The receive time of the row at `at_seq`.
            at_recv_us: i64,
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut open: HashMap<(String, String), usize> = HashMap::new();
        for (seq, source, stream, sseq, recv_us) in &victims {
            let key = (source.clone(), stream.clone());
            match open.get(&key).map(|&i| &mut runs[i]) {
                Some(run) if run.last + 1 == *sseq => run.last = *sseq,
                _ => {
                    open.insert(key, runs.len());
                    runs.push(Run {
                        source: source.clone(),
                        stream: stream.clone(),
                        first: *sseq,
                        last: *sseq,
                        at_seq: *seq,
                        at_recv_us: *recv_us,
                    });
                }
            }
        }
        let reason = "journal full (when_full = \"drop_oldest\")";
        let now_us = unix_micros(SystemTime::now());
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| {
            self.write_streams()?;
            {
                let mut del = self
                    .conn
                    .prepare_cached("DELETE FROM events WHERE seq = ?1")?;
                for (seq, ..) in &victims {
                    del.execute([*seq as i64])?;
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
                    source_time: Some(
                        humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
                    ),
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
                    warn!(
                        source = %run.source,
                        stream = %run.stream,
                        class = %class,
                        first_stream_seq = run.first,
                        last_stream_seq = run.last,
                        count = run.last - run.first + 1,
                        "journal full: evicted undelivered events (when_full = \"drop_oldest\"); a plantrelay.gap event takes their place"
                    );
                }
                Ok(n)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.flushing_streams = false;
                Err(e)
            }
        }
    }

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
    fn maintain(&mut self) {
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
        self.sync_cursors();
        self.check_wal();
        if self.disk_short && self.reserve.restore() {
            self.disk_short = false;
            info!(journal = %self.path.display(), "the disk has room again: delivered events are kept for retain_acked again");
        }
        self.retention_pending = true;
    }

    fn retention_step(&mut self) {
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
                warn!(error = %self.err(e), "retention step failed; will retry");
                self.retention_pending = false;
            }
        }
    }

    fn check_wal(&mut self) {
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        let size = std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len());
        if size as i64 > WAL_SIZE_LIMIT {
            let r: rusqlite::Result<(i64, i64, i64)> =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    });
            match r {
                Ok((busy, log, done)) => debug!(
                    wal_bytes = size,
                    busy, log, done, "WAL over its limit: checkpointed"
                ),
                Err(e) => warn!(error = %e, wal_bytes = size, "WAL checkpoint failed"),
            }
        }
    }

    fn shutdown(&mut self) {
        self.flush_streams();
        self.sync_cursors();
        if let Some(load) = self.dedup_loading.take() {
            load.cancel.store(true, Ordering::Relaxed);
            let _ = load.thread.join();
        }
        let r: rusqlite::Result<i64> =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0));
        if let Err(e) = r {
            debug!(error = %e, "final checkpoint failed");
        }
    }
}

/// A request-level failure that aborts the whole transaction.
struct Fatal(JournalError);

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

fn event_count(r: &Request) -> usize {
    match r {
        Request::Append { events, .. } => events.len(),
        _ => 1,
    }
}

/// `commit_window`: under a trickle, the appends that arrive shortly after
/// a first one share its commit (one fsync and one page write for several
/// events instead of one each). Every caller is still answered only after
/// the commit, so the wait adds at most the window to an ack.
struct CommitWindow {
    len: Duration,
    /// Drives the timed receive; the writer thread is no runtime worker.
    rt: tokio::runtime::Runtime,
    /// When the last batch of appends began, and the mean time between
    /// such beginnings (a moving average).
    last_start: Option<tokio::time::Instant>,
    spacing: Option<Duration>,
    /// Events per committed batch of appends (a moving average).
    events: Option<f64>,
}

impl CommitWindow {
    /// `None` when the window is 0, or when no timer can be made (then
    /// every batch commits at once, as with a window of 0).
    fn new(len: Duration) -> Option<CommitWindow> {
        if len.is_zero() {
            return None;
        }
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => Some(CommitWindow {
                len,
                rt,
                last_start: None,
                spacing: None,
                events: None,
            }),
            Err(e) => {
                warn!(error = %e, "cannot set up the commit window's timer; committing every batch at once (as with commit_window = \"0s\")");
                None
            }
        }
    }

    /// Waits up to the window for more appends to join `batch`. Ends at
    /// once when the batch is not appends alone (a cursor move or an admin
    /// request must not wait: a forwarder has one batch in flight, and its
    /// drain rate is one batch per commit), when it already holds enough
    /// events to fill a few pages (under load: group commit as before),
    /// and at shutdown. Once two or more requests are in, it also ends
    /// when none arrives for four times their mean spacing (at least
    /// [`WINDOW_QUIET`]): appenders that each wait for their answer before
    /// sending more (a source's batch loop) have all arrived by then, and
    /// waiting longer would only delay them. Nor does a batch wait when
    /// batches of appends begin more than two windows apart (or when there
    /// is no history yet, just after start): under so thin a trickle the
    /// window would rarely gather a second request. And it never waits
    /// longer than, at the rate appends arrive, it takes to gather
    /// [`WINDOW_ENOUGH_EVENTS`]: a source with a bounded number of
    /// unacknowledged messages (MQTT `max_inflight`) could otherwise send no
    /// faster than that number per window.
    fn gather(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        batch: &mut Vec<Request>,
        maintain: &mut bool,
        shutdown: &mut Option<oneshot::Sender<()>>,
    ) {
        if batch.is_empty() || !batch.iter().all(|r| matches!(r, Request::Append { .. })) {
            return;
        }
        let start = tokio::time::Instant::now();
        let spacing = self.last_start.map(|t| start - t);
        self.last_start = Some(start);
        self.spacing = match (self.spacing, spacing) {
            (Some(avg), Some(s)) => Some((avg * 3 + s.min(self.len * 100)) / 4),
            (None, s) => s,
            (avg, None) => avg,
        };
        let Some(spacing) = self
            .spacing
            .filter(|s| *s <= self.len * 2 && window_applies(batch))
        else {
            self.count(batch);
            return;
        };
        let len = match self.events {
            Some(per_batch) if per_batch > 0.0 => self
                .len
                .min(spacing.mul_f64(WINDOW_ENOUGH_EVENTS as f64 / per_batch)),
            _ => self.len,
        };
        let deadline = start + len;
        let mut last = start;
        loop {
            if !window_applies(batch) {
                break;
            }
            let until = match u32::try_from(batch.len()) {
                Ok(n) if n >= 2 => {
                    let spacing = (last - start) / (n - 1);
                    deadline.min(last + (spacing * 4).max(WINDOW_QUIET))
                }
                _ => deadline,
            };
            let next = self
                .rt
                .block_on(async { tokio::time::timeout_at(until, rx.recv()).await });
            last = tokio::time::Instant::now();
            match next {
                Ok(Some(Request::Maintain)) => *maintain = true,
                Ok(Some(Request::Shutdown { reply })) => {
                    *shutdown = Some(reply);
                    break;
                }
                Ok(Some(other)) => batch.push(other),
                // Closed (the journal is going away) or the window passed.
                Ok(None) | Err(_) => break,
            }
        }
        self.count(batch);
    }

    /// Keeps the moving average of events per batch.
    fn count(&mut self, batch: &[Request]) {
        let n = batch.iter().map(event_count).sum::<usize>() as f64;
        self.events = Some(self.events.map_or(n, |avg| (avg * 3.0 + n) / 4.0));
    }
}

/// True while a batch is appends alone that no caller gathered already
/// ([`super::Journal::append_gathered`]), and small: fewer than
/// [`WINDOW_ENOUGH_EVENTS`] events in fewer than [`WINDOW_ENOUGH_BYTES`].
fn window_applies(batch: &[Request]) -> bool {
    let (mut events, mut bytes) = (0usize, 0u64);
    for r in batch {
        let Request::Append {
            events: evs,
            gathered: false,
            ..
        } = r
        else {
            return false;
        };
        events += evs.len();
        bytes += evs.iter().map(|e| e.size() as u64).sum::<u64>();
    }
    !batch.is_empty() && events < WINDOW_ENOUGH_EVENTS && bytes < WINDOW_ENOUGH_BYTES
}

/// How the writer tells the rest of the agent what it committed.
pub(crate) struct Signals {
    /// Highest committed seq.
    pub committed: watch::Sender<u64>,
    /// Bumped after each committed rewind.
    pub rewinds: watch::Sender<u64>,
    /// Woken when cursors move (space may be freed for blocked appends).
    pub space: Arc<Notify>,
}

pub(crate) fn run(mut state: WriterState, mut rx: mpsc::Receiver<Request>, signals: Signals) {
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    let mut window = CommitWindow::new(state.opts.commit_window);
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
        if shutdown.is_none()
            && let Some(window) = &mut window
        {
            window.gather(&mut rx, &mut batch, &mut maintain, &mut shutdown);
        }
        if !batch.is_empty() {
            state.process(batch, &signals);
        }
        if maintain {
            state.maintain();
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
