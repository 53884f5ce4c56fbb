//! The writer's start-up: counters, cursors and statistics read from the
//! journal, and the dedup index, rebuilt on a thread and connection of its
//! own so that forwarders are served at once and only the first append
//! waits for it. Nothing here writes a row, and no append may run before
//! `ensure_dedup` has succeeded: storing without the index could store a
//! redelivered event twice.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use hashbrown::{HashMap, HashSet};
use rusqlite::{Connection, OptionalExtension, params};
use tracing::{debug, error, info, warn};

use super::{SKIP_KEY_END, SKIP_KEY_PREFIX, WriterState, meta_get};
use crate::event::GAP_EVENT_TYPE;
use crate::journal::compact;
use crate::journal::dedup::{DedupIndex, key_hash};
use crate::journal::reader::{first_seq_at_or_after, skipped_seqs};
use crate::journal::reserve::Reserve;
use crate::journal::schema::{
    STARTUP_CACHE_KIB, STREAM_HEADS, WRITER_CACHE_KIB, is_damage, open_reader, sqlite_err,
};
use crate::journal::seqmark::SeqMark;
use crate::journal::{JournalError, JournalOptions, SharedStats};
use crate::units::unix_micros;

/// The dedup index being rebuilt on its own thread and connection.
pub(super) struct DedupLoad {
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

    /// Stops the rebuild (at its next look at the cancel flag) and waits
    /// for its thread.
    pub(super) fn stop(self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Rows checked between looks at the cancel flag.
const DEDUP_CANCEL_CHECK: u64 = 65_536;

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
        // A row whose columns do not decode is damaged: reads skip it and
        // it was never delivered, so it has no id to remember.
        if let Ok((seq, source, id, recv)) = dedup_row(row) {
            dedup.insert(key_hash(source, id), seq as u64, recv);
        }
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

/// Why the writer's state could not be read.
pub(crate) enum LoadError {
    /// The file is damaged where the writer keeps its state (see
    /// [`is_damage`]): the caller moves it aside, as a file that fails
    /// quick_check, rather than fail at every start.
    Damaged(String),
    Other(JournalError),
}

impl From<JournalError> for LoadError {
    fn from(e: JournalError) -> LoadError {
        LoadError::Other(e)
    }
}

impl WriterState {
    pub(crate) fn load(
        conn: Connection,
        opts: &JournalOptions,
        stats: Arc<SharedStats>,
    ) -> Result<WriterState, LoadError> {
        let path = opts.path.clone();
        let e = |e: rusqlite::Error| {
            if is_damage(&e) {
                LoadError::Damaged(format!(
                    "a stored counter, cursor or text of the wrong type: {e}"
                ))
            } else {
                LoadError::Other(sqlite_err(&path, e))
            }
        };
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
        // The rows the counters trail by count toward their next flush, so
        // that restarts do not stretch the start-up scan it bounds.
        let streams_through = meta_get(&conn, "streams_through")
            .map_err(e)?
            .unwrap_or(0)
            .max(0) as u64;
        let unflushed = head.saturating_sub(streams_through);
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
        if page_size != i64::from(opts.page_size) {
            // Not an error: the setting waits for the next new journal.
            warn!(
                journal = %path.display(),
                page_size,
                configured = opts.page_size,
                "the journal keeps the page size it was created with ({page_size} bytes): journal.page_size = {} applies to a journal created anew, e.g. after this one is moved aside once its events are delivered",
                opts.page_size
            );
        }
        let texts = compact::TextTable::load(&conn).map_err(e)?;
        let (mark, jump) = open_seq_mark(&path, head)?;
        let mark = mark.fit_dedup(opts.dedup_max_ids);

        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(e)?;
        let retention_through = meta_get(&conn, "retention_through")
            .map_err(e)?
            .unwrap_or(0)
            .max(0) as u64;
        let evicted_telemetry = meta_get(&conn, "evicted_telemetry")
            .map_err(e)?
            .unwrap_or(0) as u64;
        let evicted_critical = meta_get(&conn, "evicted_critical").map_err(e)?.unwrap_or(0) as u64;
        // The dedup index of a large journal takes seconds to read (about
        // 1 s per million ids). Forwarders need none of it: it is read on
        // its own connection while the writer already serves them, and only
        // the first append waits for it. Started after every read that can
        // fail on damage: a file that fails here is moved aside, and a
        // connection still open on it would, when it closes, delete the
        // `-wal` of the fresh file by name.
        let dedup_loading = DedupLoad::start(&path, opts, head);
        stats.head_seq.store(head, Ordering::Relaxed);
        stats
            .evicted_telemetry
            .store(evicted_telemetry, Ordering::Relaxed);
        stats
            .evicted_critical
            .store(evicted_critical, Ordering::Relaxed);
        stats.writer_alive.store(true, Ordering::Relaxed);
        let mut state = WriterState {
            conn,
            path: path.clone(),
            opts: opts.clone(),
            next_seq: head + 1,
            class_heads: [head; 2],
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
            clock_behind_warned: None,
            warnings: Default::default(),
            recent_evictions: VecDeque::new(),
            probes: RefCell::new(HashMap::new()),
            relaxed_sync: false,
            unsynced_cursors: false,
            unwritten_since: None,
            unwritten_events: 0,
            writing_cursors: false,
            dirty_streams,
            streams_flushed_at: Instant::now(),
            events_since_flush: unflushed,
            flushing_streams: false,
            reserve: Reserve::open(&path, opts.disk_reserve),
            disk_short: false,
            disk_cap: None,
            mark,
            jump,
            texts,
        };
        if let Err(err) = state.refresh_used() {
            if let Some(load) = state.dedup_loading.take() {
                load.stop();
            }
            return Err(e(err));
        }
        state.load_skipped_seqs();
        Ok(state)
    }

    /// Reads the seq ranges earlier runs skipped into the shared stats, and
    /// forgets those every sink has passed.
    fn load_skipped_seqs(&mut self) {
        let floor = self.min_cursor();
        let r = self
            .conn
            .execute(
                "DELETE FROM meta WHERE key > ?1 AND key < ?2 AND value <= ?3",
                params![SKIP_KEY_PREFIX, SKIP_KEY_END, floor as i64],
            )
            .and_then(|_| skipped_seqs(&self.conn));
        match r {
            Ok(skips) => {
                if let Ok(mut s) = self.stats.skipped_seqs.lock() {
                    *s = skips;
                }
            }
            // Only backlog figures depend on it.
            Err(e) => {
                warn!(journal = %self.path.display(), error = %e, "cannot read the skipped seq ranges; backlogs may count them")
            }
        }
    }

    /// Makes sure the dedup index is loaded: waits for the start-up rebuild,
    /// or reads the index here when that failed.
    pub(super) fn ensure_dedup(&mut self) -> Result<(), JournalError> {
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
}

/// Opens the seq mark and decides where seqs go on: past the journal's
/// `head`, and past every seq the previous run may have handed out.
fn open_seq_mark(path: &Path, head: u64) -> Result<(SeqMark, Option<(u64, u64)>), JournalError> {
    let (mark, record) = SeqMark::open(path)?;
    let jump = match record {
        Some(r) if r.through > head && r.clean => {
            error!(
                journal = %path.display(),
                head_seq = head,
                stopped_at_seq = r.through,
                "the journal has lost its last commits: it ends at seq {head} but the agent stopped at seq {}; \
                 the events after {head} are gone (a damaged or cut WAL, or an older copy of the file). \
                 New events start at seq {}, so no seq names two events",
                r.through,
                r.through + 1
            );
            Some((head + 1, r.through))
        }
        Some(r) if r.through > head => {
            info!(
                journal = %path.display(),
                head_seq = head,
                next_seq = r.through + 1,
                "the previous run did not stop cleanly: new events start past every seq it may have handed out, \
                 so that none that a lost commit had is used again"
            );
            Some((head + 1, r.through))
        }
        _ => None,
    };
    Ok((mark, jump))
}
