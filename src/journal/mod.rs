//! The journal: a SQLite file (WAL mode) that holds every event between its
//! arrival and its delivery to every sink. It is the one place where state
//! lives, and this module is the only one that runs SQL.
//!
//! # Layout (`<state_dir>/journal.db`, schema version in `PRAGMA user_version`)
//!
//! - `events(seq PK, source, event_id, stream, stream_seq, class, type,
//!   source_time, recv_time, data, attrs, size, only_sink, crc)`: one row per
//!   stored event. `seq` is assigned by the writer: strictly increasing over
//!   the journal's whole life (the high-water mark is kept in `meta`, so it
//!   never restarts, not even after every row was deleted), and never given
//!   to two events, not even when the WAL loses its last commits: seqs are
//!   reserved in `journal.db.seq` first, and after a stop that was not
//!   clean they go on past the reservation (`seqmark.rs`; the range skipped
//!   is kept in `meta` as `skipped_seqs.<first>` so backlogs leave it out).
//!   Without those jumps, evictions, retention or dead-letter retries, seqs
//!   are gap-free.
//!   `stream_seq` counts per `(source, stream)` and is gap-free: an evicted
//!   range is replaced by a `plantrelay.gap` row that names it. `recv_time`
//!   (µs since the epoch) never decreases with `seq` (the writer clamps a
//!   clock that steps back), so time lookups are binary searches on `seq`.
//!   `only_sink` is set on a dead letter put back for one sink. `crc` is a
//!   checksum of the other columns (`rowcheck.rs`, schema 4): a row that
//!   fails it is skipped by every read, never delivered. `type`,
//!   `source_time` and `attrs` hold the values the sources repeat (the MQTT
//!   source's type, arrival time and attributes, times in UTC with six,
//!   three or no decimals) in short stored forms (`compact.rs`, schemas 5
//!   and 6), read back as the same text; the checksum is over the text.
//! - `texts(id, value)`: types and attributes that repeat without a fixed
//!   short form (an MES's event types, its `originsource`), each stored
//!   once; a row names its entry by id (schema 6). Entries are made on a
//!   value's second sighting, in the transaction of the row that first
//!   names them, and never change or go (at most 4,096 of ≤ 256 bytes).
//! - `streams(source, stream, last_seq)`: the per-stream counters, as of
//!   `meta.streams_through`. They are written with an event commit once
//!   1,024 events have come and a second has passed (or a minute, or 16,384
//!   events: `writer::batch::streams_due`), not with each one (under a
//!   trickle they were two of the three pages every commit wrote), and by
//!   every transaction that deletes rows, before it deletes them: the rows
//!   after `streams_through` hold the newer counters, and start-up takes the
//!   greater of both (`last_seq` in `meta` likewise, against the highest
//!   row).
//! - `critical(seq)`: the seqs of the critical rows, for the critical lane,
//!   through `meta.streams_through`, written with the stream counters (an
//!   index would cost a page in every commit of MES events); the critical
//!   rows after it are read from `events`. Deleting a row deletes its entry
//!   (a trigger).
//! - `cursors(sink, seq)`: per sink, the highest seq the upstream acknowledged.
//! - `dead_letters(id, sink, seq, reason, time, <a copy of the event>)`:
//!   events a sink rejected for good; a copy, so retention cannot take them.
//! - `gaps(...)`: every range evicted by `when_full = "drop_oldest"`.
//! - `meta(key, value)`: `last_seq`, counters that must survive restarts.
//!
//! There is no index on `(source, event_id)`: random keys in an on-disk
//! B-tree cost ~10× the insert rate. Deduplication is the in-memory
//! [`dedup::DedupIndex`] over `dedup_window`, a table of fixed size (12 bytes
//! per `dedup_max_ids`), rebuilt from the rows at start on a thread of its
//! own: forwarders start at once, the first append waits for the index.
//!
//! # The commit point
//!
//! One writer thread owns the only write connection. It takes whatever is
//! queued on a bounded channel (appends, cursor moves, dead letters, up to a
//! batch limit), applies it in one transaction and commits; only then does it
//! answer each caller. An append answered with a seq is durable: with
//! `sync = "full"` against power loss, with `"normal"` against a process
//! crash. A failed commit is answered as failed to every caller in it, and the
//! in-memory state (next seq, stream counters, dedup entries) is rolled back
//! with it; after a disk-full error the connection is reopened.
//!
//! Under a trickle, the writer holds a batch of appends for up to
//! `commit_window` so that appends arriving meanwhile share its commit (one
//! fsync and one page write for several events). The window ends early when
//! the batch already holds a few pages' worth of events (under load group
//! commit works as it always did), when anything but an append or a
//! delivered batch's cursor move is queued (nothing else waits; such a
//! move is answered at once), when the appenders that answer-then-send have
//! all come in, and at shutdown; it is shortened to what the current rate
//! needs to fill a batch (so a source with a bounded number of unacked
//! messages is never held below its rate), and skipped when batches come
//! more than two windows apart. Callers are answered after the commit as
//! always: the window only delays the ack, by at most its length.
//!
//! A delivered batch's cursor move ([`Journal::advance_delivered`]) is
//! answered at once and its row written later: with a commit of events once
//! it is a second old, alone after two seconds or 4,096 events, by any
//! transaction that deletes rows, rewinds or writes dead letters, and at
//! shutdown (`writer/cursors.rs`). A transaction of cursor moves alone
//! skips the fsync under `"full"`. Either way a move lost to a crash or a
//! power failure only sends acknowledged events again (the upstream drops
//! them by id), while a commit, let alone an fsync, per delivered batch
//! wears flash storage. The next event commit's fsync covers such a
//! commit, or else the writer's once-a-second tick.
//!
//! # The cursor rule
//!
//! A sink's cursor moves only forward, only past what its upstream
//! acknowledged, and only by the writer ([`Journal::advance`]). A replay
//! ([`Journal::rewind`]) moves it back, and refuses a point older than the
//! oldest retained row. A sink with no cursor row starts at the beginning.
//!
//! # Retention
//!
//! A row is deleted once every configured sink's cursor is past it and it is
//! older than `retain_acked`; the writer deletes in chunks of a few thousand
//! rows between batches, never in one large transaction. Readers use short
//! transactions so checkpoints can complete; the WAL is truncated to
//! [`schema::WAL_SIZE_LIMIT`] after checkpoints and force-checkpointed when it
//! grows past it.
//!
//! SQLite's page size is `journal.page_size` when the file is created and
//! stays what it was then (WAL mode cannot change it); see
//! [`DEFAULT_PAGE_SIZE`] for what it trades.
//!
//! # Capacity
//!
//! Used bytes are the file's live pages (page count less free pages). When an
//! append would pass `max_size`, delivered rows still kept for replay go
//! first. Then, with `when_full = "block"`, the append is refused as
//! [`JournalError::Full`] (the caller waits up to `block_timeout` for space,
//! and its source turns the refusal into back-pressure); with
//! `"drop_oldest"` the oldest undelivered telemetry is evicted, then critical
//! events, each evicted range counted, logged, kept in `gaps` and replaced in
//! place by a `plantrelay.gap` event so every sink that had not yet received
//! it learns of it in order.
//!
//! # Damage
//!
//! At open, `PRAGMA quick_check` runs. A file SQLite calls corrupt, or
//! whose counters, cursors or texts hold a value of a type no release
//! writes there (which quick_check does not look at), is renamed
//! to `journal.db.corrupt-<utc time>`, a fresh journal continues the seq
//! numbering where the old one can still be read (or from the clock), the
//! intact events and the cursors are copied into it (`salvage.rs`), and the
//! quarantine is reported in the status. The agent never crash-loops on a
//! damaged file. Rows damaged where SQLite cannot see it fail their checksum
//! (`rowcheck.rs`) and are skipped by every read.
//!
//! Kept as one file: past these docs it is the journal's public face (its
//! options, errors and stats, and the [`Journal`] handle whose methods each
//! hand one request to the writer) and the file-system steps of
//! [`Journal::open`]; the work itself is in `writer`, `reader` and `schema`.

mod compact;
pub mod dedup;
mod files;
mod reader;
mod reserve;
mod rowcheck;
pub mod salvage;
mod schema;
mod seqmark;
mod writer;

pub use seqmark::{mark_path as seq_mark_path, read_mark as read_seq_mark};

/// Seqs of `skips` (ranges `first..=last`) after `after` and up to `through`.
pub(crate) fn skipped_between(skips: &[(u64, u64)], after: u64, through: u64) -> u64 {
    skips
        .iter()
        .map(|&(first, last)| {
            let lo = first.max(after.saturating_add(1));
            let hi = last.min(through);
            if hi >= lo { hi - lo + 1 } else { 0 }
        })
        .sum()
}

pub use files::{JOURNAL_FILE_MODE, STATE_DIR_MODE, is_locked};
use files::{create_private_file, create_state_dir, lock_file, restrict_journal_files};
pub use reserve::DEFAULT_DISK_RESERVE;
use writer::LoadError;
pub(crate) use writer::WINDOW_ENOUGH_EVENTS;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};

pub use reader::{
    ClassPosition, DeadLetter, GapRecord, JournalStats, Reader, Routed, SinkPosition,
};
pub use rowcheck::DAMAGED_ROWS;
pub use schema::SCHEMA_VERSION;

use crate::event::{Class, NewEvent, StoredEvent};
use crate::units::fmt_bytes;

/// The key of a sink's cursor in the `cursors` table: the sink's name for a
/// sink that sends in journal order, `<sink>/critical` and
/// `<sink>/telemetry` for the lanes of one that sends critical events
/// first. Sink names cannot hold a `/`, so the keys never collide.
pub fn cursor_key(sink: &str, lane: Option<crate::event::Class>) -> String {
    match lane {
        None => sink.to_string(),
        Some(c) => format!("{sink}/{}", c.as_str()),
    }
}

/// The sink and class of a lane's cursor key; `None` for a sink's own key.
pub fn lane_of_key(key: &str) -> Option<(&str, crate::event::Class)> {
    let (sink, class) = key.split_once('/')?;
    match class {
        "critical" => Some((sink, crate::event::Class::Critical)),
        "telemetry" => Some((sink, crate::event::Class::Telemetry)),
        _ => None,
    }
}

/// `PRAGMA synchronous` for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every commit is on disk before it is acknowledged: survives power loss.
    Full,
    /// Commits survive a process crash; the last ones may be lost on power loss.
    Normal,
}

/// What an append does when the journal is at `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    Block,
    DropOldest,
}

/// Everything the journal needs to open; built from `[journal]` by the agent.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    pub path: PathBuf,
    pub sync: SyncMode,
    pub max_size: u64,
    pub when_full: WhenFull,
    pub retain_acked: Duration,
    pub dedup_window: Duration,
    pub dedup_max_ids: usize,
    pub block_timeout: Duration,
    /// How long the writer waits for more appends to share a commit (see
    /// "The commit point"); zero commits each batch at once.
    pub commit_window: Duration,
    /// SQLite's page size for a journal created now (bytes, a power of two
    /// from 1 KiB to 64 KiB); an existing journal keeps its own.
    pub page_size: u32,
    /// The configured sinks: retention waits for every one of them.
    pub sinks: Vec<String>,
    /// Bytes of disk set aside beside the journal, given back when a
    /// commit finds the disk full (see `reserve.rs`); 0 keeps none.
    pub disk_reserve: u64,
}

impl JournalOptions {
    /// Defaults of the config contract, for the journal at `path`.
    pub fn new(path: impl Into<PathBuf>) -> JournalOptions {
        JournalOptions {
            path: path.into(),
            sync: SyncMode::Full,
            max_size: 2 << 30,
            when_full: WhenFull::Block,
            retain_acked: Duration::from_secs(24 * 3600),
            dedup_window: Duration::from_secs(3600),
            dedup_max_ids: 1_000_000,
            block_timeout: Duration::from_secs(5),
            commit_window: DEFAULT_COMMIT_WINDOW,
            page_size: DEFAULT_PAGE_SIZE,
            sinks: Vec::new(),
            disk_reserve: DEFAULT_DISK_RESERVE,
        }
    }
}

/// The answer to one appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Committed under this seq and per-stream seq.
    Stored { seq: u64, stream_seq: u64 },
    /// Not stored again: `(source, id)` was already journaled as `seq`.
    Duplicate { seq: u64 },
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindTo {
    /// Deliver again from this seq on (inclusive).
    Seq(u64),
    /// Deliver again every event received at or after this time.
    Since(SystemTime),
}

/// A journal that was found damaged at open and moved aside.
#[derive(Debug, Clone)]
pub struct Quarantine {
    pub moved_to: PathBuf,
    pub reason: String,
    pub time: SystemTime,
    pub salvaged_last_seq: Option<u64>,
    pub salvaged_streams: Vec<(String, String, u64)>,
    /// The damaged file's intact events copied into the fresh journal.
    pub salvaged: salvage::Salvaged,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum JournalError {
    #[error("journal at {}: {detail}", path.display())]
    Sqlite { path: PathBuf, detail: String },
    #[error("journal at {}: disk full (the filesystem has no space left; the last commit was not stored)", path.display())]
    DiskFull { path: PathBuf },
    #[error("journal at {}: full ({} of {} limit reached, when_full = \"block\")", path.display(), fmt_bytes(*used), fmt_bytes(*max))]
    Full { path: PathBuf, used: u64, max: u64 },
    #[error("journal at {}: {what}: {detail}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        detail: String,
    },
    #[error("journal at {}: in use by another plantrelay process (lock file {})", path.display(), lock.display())]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("journal at {}: cannot replay from seq {requested}: retention already deleted everything before seq {oldest}", path.display())]
    BeyondRetention {
        path: PathBuf,
        requested: u64,
        oldest: u64,
    },
    #[error("journal at {}: {what}", path.display())]
    NotFound { path: PathBuf, what: String },
    #[error("journal writer has stopped")]
    Closed,
}

/// What the writer has committed, as forwarders wait on it: the highest
/// seq, and the highest seq of each class. A lane that found its class
/// drained waits for its own class to move, not for every commit: an MES
/// lane is not read again for each commit of telemetry, nor the other way
/// round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub head: u64,
    /// Indexed by [`Class::as_i64`]; never above `head`.
    classes: [u64; 2],
}

impl Committed {
    /// Nothing known per class yet: every class counts as at `head`.
    pub fn at(head: u64) -> Committed {
        Committed {
            head,
            classes: [head; 2],
        }
    }

    /// `classes` are the highest seqs the writer gave each class; a value
    /// above `head` (seqs taken by a batch that rolled back) counts as
    /// `head`, so a reader that saw `head` never waits on it in vain.
    pub(crate) fn new(head: u64, classes: [u64; 2]) -> Committed {
        Committed {
            head,
            classes: classes.map(|c| c.min(head)),
        }
    }

    /// The highest committed seq of `class`, or of any class.
    pub fn of(&self, class: Option<Class>) -> u64 {
        match class {
            Some(c) => self.classes[c.as_i64() as usize],
            None => self.head,
        }
    }
}

/// Counters the writer keeps current for status and metrics; lock-free reads.
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Highest committed seq.
    pub head_seq: AtomicU64,
    /// Live bytes of the file (pages in use × page size).
    pub used_bytes: AtomicU64,
    pub events_stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub evicted_telemetry: AtomicU64,
    pub evicted_critical: AtomicU64,
    pub retention_deleted: AtomicU64,
    pub commits: AtomicU64,
    pub dedup_ids: AtomicU64,
    /// Wall-clock µs of the writer's last loop turn (a liveness beacon).
    pub writer_heartbeat_us: AtomicI64,
    pub writer_alive: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Seq ranges a crashed run may have handed out and this journal
    /// jumped over (`first..=last`, see `seqmark.rs`): no event has them.
    pub skipped_seqs: Mutex<Vec<(u64, u64)>>,
    /// Cursors moved and answered whose rows are not written yet (lazy
    /// moves, see [`Journal::advance_delivered`]), by cursor key: a reader
    /// of the running journal takes them over the rows.
    pub unwritten_cursors: Mutex<std::collections::HashMap<String, u64>>,
}

impl SharedStats {
    /// Events between `cursor` (exclusive) and `head` (inclusive), for a
    /// cursor that moves over every event: seqs less the ranges skipped.
    pub fn backlog(&self, head: u64, cursor: u64) -> u64 {
        let skipped = self
            .skipped_seqs
            .lock()
            .map(|s| skipped_between(&s, cursor, head))
            .unwrap_or(0);
        head.saturating_sub(cursor).saturating_sub(skipped)
    }

    /// Events evicted so far under `drop_oldest`, both classes: it changes
    /// exactly when eviction has put gap events in the journal.
    pub fn evictions(&self) -> u64 {
        self.evicted_telemetry
            .load(Ordering::Relaxed)
            .wrapping_add(self.evicted_critical.load(Ordering::Relaxed))
    }
}

/// The writer's answer to an append. The events come back either way: on
/// refusal (when it did not consume them) so a blocked appender can offer
/// them again without having kept a copy, on success so that they are freed
/// by the appender, not on the writer thread every other append waits for.
pub(crate) type AppendReply =
    Result<(Vec<AppendOutcome>, Vec<NewEvent>), (JournalError, Vec<NewEvent>)>;

pub(crate) enum Request {
    Append {
        events: Vec<NewEvent>,
        /// The caller already waited the commit window for these events
        /// ([`Journal::append_gathered`]): the writer commits at once.
        gathered: bool,
        reply: oneshot::Sender<AppendReply>,
    },
    Advance {
        sink: String,
        from: Option<u64>,
        to: u64,
        /// The eviction count when the delivered events were read, when gap
        /// events put in their range since must stop the cursor.
        read_at_evictions: Option<u64>,
        /// The move is answered at once and its row written later, with
        /// other writes (see `writer::cursors`): a delivered batch's move,
        /// which a crash before the row is written only sends again.
        lazy: bool,
        reply: oneshot::Sender<Result<Option<u64>, JournalError>>,
    },
    Rewind {
        sink: String,
        class: Option<crate::event::Class>,
        to: RewindTo,
        reply: oneshot::Sender<Result<u64, JournalError>>,
    },
    DeadLetter {
        sink: String,
        event: Box<StoredEvent>,
        reason: String,
        reply: oneshot::Sender<Result<i64, JournalError>>,
    },
    RetryDeadLetter {
        id: i64,
        reply: oneshot::Sender<Result<u64, JournalError>>,
    },
    DropDeadLetter {
        id: i64,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
    Maintain,
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct Inner {
    opts: JournalOptions,
    tx: mpsc::Sender<Request>,
    committed: watch::Receiver<Committed>,
    rewinds: watch::Receiver<u64>,
    space: Arc<Notify>,
    /// See [`writer::Signals::urgent`].
    urgent: Arc<Notify>,
    stats: Arc<SharedStats>,
    quarantine: Option<Quarantine>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    // Held for the journal's life: a second agent on the same state_dir is
    // refused at open.
    _lock: std::fs::File,
}

/// A handle on the open journal; clones share the one writer.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

/// Default of `journal.commit_window`. At 100 events/s a window of 40 ms
/// puts four to five events in a commit instead of one, and writes a
/// quarter of the bytes per event (20 ms: two to three, half the bytes);
/// an ack waits at most 40 ms more, which keeps its p99 within 50 ms on
/// storage that syncs in a few milliseconds.
pub const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(40);

/// Default of `journal.page_size`: SQLite's own. A commit under `sync =
/// "full"` writes at least one WAL frame (a page and a 24-byte header), and
/// its fsync makes the next commit dirty the same file pages again, so
/// under a trickle a commit's bytes follow the page size, not its events:
/// 2 KiB pages write ~25 % less per event at 10 events/s and 6–15 % less
/// at 100. But every whole-file pass costs about twice the time (the
/// integrity check at start, a full scan; it is per page, not per row),
/// which delays the first critical events of a 2M-event backlog by ~0.8 s
/// (BENCHMARKS.md, the page-size entries). So 4 KiB stays the default, and
/// 2 KiB is for gateways that live on light traffic and small backlogs.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

/// Capacity of the writer's request queue: appenders beyond it wait, which
/// is the back-pressure sources see.
const QUEUE_DEPTH: usize = 1024;

impl Journal {
    /// Opens or creates the journal, starts the writer thread and the
    /// background rebuild of the dedup index. Must be called within a Tokio
    /// runtime only for the async methods; opening itself is blocking work
    /// (call it from `spawn_blocking` in async code if start-up latency
    /// matters).
    pub fn open(opts: JournalOptions) -> Result<Journal, JournalError> {
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_state_dir(dir).map_err(|e| JournalError::Io {
                path: opts.path.clone(),
                what: format!("cannot create directory {}", dir.display()),
                detail: e.to_string(),
            })?;
        }
        let lock = lock_file(&opts.path)?;
        create_private_file(&opts.path)?;
        let (conn, mut quarantine) = schema::open_writer(&opts.path, opts.sync, opts.page_size)?;
        restrict_journal_files(&opts.path)?;
        let mut stats = Arc::new(SharedStats::default());
        let state = match writer::WriterState::load(conn, &opts, stats.clone()) {
            Err(LoadError::Damaged(reason)) if quarantine.is_none() => {
                // `load` has closed its connection: the file can move.
                let (conn, q) =
                    schema::replace_damaged(&opts.path, opts.sync, opts.page_size, &reason)?;
                restrict_journal_files(&opts.path)?;
                quarantine = Some(q);
                stats = Arc::new(SharedStats::default());
                writer::WriterState::load(conn, &opts, stats.clone())
            }
            loaded => loaded,
        }
        .map_err(|e| match e {
            // Only a fresh journal is left to fail this way.
            LoadError::Damaged(detail) => JournalError::Sqlite {
                path: opts.path.clone(),
                detail: format!("fresh journal after quarantine: {detail}"),
            },
            LoadError::Other(e) => e,
        })?;
        let (committed_tx, committed) = watch::channel(Committed::at(state.head_seq()));
        let (rewinds_tx, rewinds) = watch::channel(0);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let space = Arc::new(Notify::new());
        let urgent = Arc::new(Notify::new());
        let writer = {
            let space = space.clone();
            let signals = writer::Signals {
                committed: committed_tx,
                rewinds: rewinds_tx,
                space,
                urgent: urgent.clone(),
            };
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || writer::run(state, rx, signals))
                .map_err(|e| JournalError::Io {
                    path: opts.path.clone(),
                    what: "cannot start the writer thread".into(),
                    detail: e.to_string(),
                })?
        };
        spawn_ticker(tx.clone());
        Ok(Journal {
            inner: Arc::new(Inner {
                opts,
                tx,
                committed,
                rewinds,
                space,
                urgent,
                stats,
                quarantine,
                writer: Mutex::new(Some(writer)),
                _lock: lock,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.opts.path
    }

    pub fn options(&self) -> &JournalOptions {
        &self.inner.opts
    }

    pub fn stats(&self) -> &SharedStats {
        &self.inner.stats
    }

    /// The damaged file this open moved aside, if any.
    pub fn quarantine(&self) -> Option<&Quarantine> {
        self.inner.quarantine.as_ref()
    }

    /// A watch of what is committed: forwarders wait on it for work.
    pub fn committed(&self) -> watch::Receiver<Committed> {
        self.inner.committed.clone()
    }

    /// A counter bumped after every committed rewind: a forwarder waiting
    /// for work reloads its cursor when it changes.
    pub fn rewinds(&self) -> watch::Receiver<u64> {
        self.inner.rewinds.clone()
    }

    /// A new read connection (forwarders, status). Blocking; keep each call short.
    pub fn reader(&self) -> Result<Reader, JournalError> {
        Ok(Reader::open(&self.inner.opts.path)?.with_live(self.inner.stats.clone()))
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Request,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Queues a request for the writer; one the commit window must not
    /// wait for also wakes the window (it looks at the queue only from time
    /// to time).
    async fn send(&self, request: Request) -> Result<(), JournalError> {
        let urgent = writer::wakes_window(&request);
        self.inner
            .tx
            .send(request)
            .await
            .map_err(|_| JournalError::Closed)?;
        if urgent {
            self.inner.urgent.notify_one();
        }
        Ok(())
    }

    /// Appends events and returns once they are committed (or found to be
    /// duplicates). Under `when_full = "block"` a full journal is retried
    /// until `block_timeout`, then reported as [`JournalError::Full`].
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<AppendOutcome>, JournalError> {
        self.append_with(events, false).await
    }

    /// [`Journal::append`] for a caller that gathered its events for the
    /// commit window itself (a source holding messages it has received, see
    /// [`Journal::commit_window`]): the commit does not wait a second window.
    pub async fn append_gathered(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<Vec<AppendOutcome>, JournalError> {
        self.append_with(events, true).await
    }

    /// `journal.commit_window`.
    pub fn commit_window(&self) -> Duration {
        self.inner.opts.commit_window
    }

    async fn append_with(
        &self,
        events: Vec<NewEvent>,
        gathered: bool,
    ) -> Result<Vec<AppendOutcome>, JournalError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + self.inner.opts.block_timeout;
        let mut events = events;
        loop {
            let (reply, rx) = oneshot::channel();
            self.send(Request::Append {
                events,
                gathered,
                reply,
            })
            .await?;
            match rx.await.map_err(|_| JournalError::Closed)? {
                Ok((out, _stored)) => return Ok(out),
                Err((JournalError::Full { .. }, back))
                    if !back.is_empty()
                        && self.inner.opts.when_full == WhenFull::Block
                        && Instant::now() < deadline =>
                {
                    events = back;
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(200));
                    let _ = tokio::time::timeout(wait, self.inner.space.notified()).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Moves `sink`'s cursor forward to `to`, if it still stands at `from`
    /// (`None`: wherever it stands). Returns false when it did not move: the
    /// cursor was already there or beyond, or a replay moved it meanwhile (the
    /// caller then reloads it). Never moves a cursor backwards: that is
    /// [`Journal::rewind`].
    pub async fn advance(
        &self,
        sink: &str,
        from: Option<u64>,
        to: u64,
    ) -> Result<bool, JournalError> {
        let sink = sink.to_string();
        let moved = self
            .request(|reply| Request::Advance {
                sink,
                from,
                to,
                read_at_evictions: None,
                lazy: false,
                reply,
            })
            .await?;
        Ok(moved.is_some())
    }

    /// Moves `sink`'s cursor past events it delivered: like
    /// [`Journal::advance`], but `read_at_evictions` is
    /// [`Journal::evictions`] as it was before the events were read. Events
    /// evicted while they were upstream have a gap event in their place, and
    /// that gap may also announce later evictions the delivered batch did not
    /// carry: the cursor then stops just before it, so it goes out next.
    /// Returns where the cursor now stands (`None`: it did not move, as for
    /// [`Journal::advance`]).
    ///
    /// The move is answered without a commit of its own: the cursor's row
    /// is written with a later commit, within about a second or a few
    /// thousand events (`writer::cursors`). A crash before then sends
    /// those events again, with the same ids (invariant 3).
    pub async fn advance_delivered(
        &self,
        sink: &str,
        from: u64,
        to: u64,
        read_at_evictions: u64,
    ) -> Result<Option<u64>, JournalError> {
        let sink = sink.to_string();
        self.request(|reply| Request::Advance {
            sink,
            from: Some(from),
            to,
            read_at_evictions: Some(read_at_evictions),
            lazy: true,
            reply,
        })
        .await
    }

    /// See [`SharedStats::evictions`].
    pub fn evictions(&self) -> u64 {
        self.stats().evictions()
    }

    /// Moves `sink`'s cursor back for a replay; returns the new cursor.
    pub async fn rewind(&self, sink: &str, to: RewindTo) -> Result<u64, JournalError> {
        let sink = sink.to_string();
        self.request(|reply| Request::Rewind {
            sink,
            class: None,
            to,
            reply,
        })
        .await
    }

    /// Moves back only the cursor of `sink`'s lane of `class` (a sink that
    /// sends critical events first, or takes only that class); returns
    /// where the sink now stands.
    pub async fn rewind_class(
        &self,
        sink: &str,
        class: crate::event::Class,
        to: RewindTo,
    ) -> Result<u64, JournalError> {
        let sink = sink.to_string();
        self.request(|reply| Request::Rewind {
            sink,
            class: Some(class),
            to,
            reply,
        })
        .await
    }

    /// Records that `sink`'s upstream rejected `event` for good; returns the
    /// dead letter's id.
    pub async fn dead_letter(
        &self,
        sink: &str,
        event: StoredEvent,
        reason: &str,
    ) -> Result<i64, JournalError> {
        let sink = sink.to_string();
        let reason = reason.to_string();
        self.request(|reply| Request::DeadLetter {
            sink,
            event: Box::new(event),
            reason,
            reply,
        })
        .await
    }

    /// Puts a dead letter back for delivery to its sink (as a new row at the
    /// end of the journal, so retries go out in the order they were asked
    /// for); returns the new seq.
    pub async fn retry_dead_letter(&self, id: i64) -> Result<u64, JournalError> {
        self.request(|reply| Request::RetryDeadLetter { id, reply })
            .await
    }

    pub async fn drop_dead_letter(&self, id: i64) -> Result<(), JournalError> {
        self.request(|reply| Request::DropDeadLetter { id, reply })
            .await
    }

    /// Lets the writer commit what is queued, checkpoints, and stops it.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Request::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Wakes the writer once a second for retention, dedup expiry and WAL
/// checks. Ends when the writer's queue closes.
fn spawn_ticker(tx: mpsc::Sender<Request>) {
    let spawned = std::thread::Builder::new()
        .name("journal-ticker".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                match tx.try_send(Request::Maintain) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the journal maintenance ticker; retention runs only between appends");
    }
}

pub(crate) fn stats_set_error(stats: &SharedStats, e: &JournalError) {
    if let Ok(mut last) = stats.last_error.lock() {
        *last = Some(e.to_string());
    }
}
