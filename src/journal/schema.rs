//! Opening the journal file: pragmas, schema migrations, the integrity check
//! and the quarantine of a damaged file. Nothing here runs after start-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use tracing::{error, warn};

use super::{JournalError, Quarantine, SyncMode};

/// Forward migrations; index `i` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY,
        source      TEXT    NOT NULL,
        event_id    TEXT    NOT NULL,
        stream      TEXT    NOT NULL,
        stream_seq  INTEGER NOT NULL,
        class       INTEGER NOT NULL,
        type        TEXT    NOT NULL,
        source_time TEXT,
        recv_time   INTEGER NOT NULL,
        data        BLOB    NOT NULL,
        attrs       TEXT,
        size        INTEGER NOT NULL,
        only_sink   TEXT
    );
    CREATE TABLE streams (
        source   TEXT    NOT NULL,
        stream   TEXT    NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (source, stream)
    ) WITHOUT ROWID;
    CREATE TABLE cursors (
        sink       TEXT PRIMARY KEY,
        seq        INTEGER NOT NULL,
        updated_us INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY,
        sink        TEXT    NOT NULL,
        seq         INTEGER NOT NULL,
        reason      TEXT    NOT NULL,
        time_us     INTEGER NOT NULL,
        source      TEXT    NOT NULL,
        event_id    TEXT    NOT NULL,
        stream      TEXT    NOT NULL,
        stream_seq  INTEGER NOT NULL,
        class       INTEGER NOT NULL,
        type        TEXT    NOT NULL,
        source_time TEXT,
        recv_time   INTEGER NOT NULL,
        data        BLOB    NOT NULL,
        attrs       TEXT
    );
    CREATE INDEX dead_letters_by_sink ON dead_letters (sink, id);
    CREATE TABLE gaps (
        id              INTEGER PRIMARY KEY,
        source          TEXT    NOT NULL,
        stream          TEXT    NOT NULL,
        first_stream_seq INTEGER NOT NULL,
        last_stream_seq INTEGER NOT NULL,
        count           INTEGER NOT NULL,
        class           INTEGER NOT NULL,
        reason          TEXT    NOT NULL,
        time_us         INTEGER NOT NULL
    );
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 2: `streams` and `meta.last_seq` are written about once a second, not
    // with every commit; `meta.streams_through` is the seq they were last
    // written at, and the rows after it hold the rest (see the writer's
    // `load`). Schema 1 wrote them with every commit, so its tables are
    // current through the head. A plantrelay that knows only schema 1
    // refuses the file rather than reuse stream sequences.
    r#"
    INSERT OR REPLACE INTO meta(key, value) VALUES ('streams_through', max(
        coalesce((SELECT max(seq) FROM events), 0),
        coalesce((SELECT value FROM meta WHERE key = 'last_seq'), 0)));
    "#,
    // 3: priority lanes. A sink that sends critical events first reads them
    // through this index, never row by row through a telemetry backlog. It
    // is partial: telemetry, most of a plant's traffic, never writes to it.
    // Cursors of lanes are rows `<sink>/critical` and `<sink>/telemetry` in
    // `cursors`; a lane without its row starts at the sink's own row, the
    // cursor an earlier release kept.
    r#"
    CREATE INDEX events_critical ON events (seq) WHERE class = 0;
    "#,
    // 4: a checksum per event row (`rowcheck.rs`): reads skip a row whose
    // columns no longer match it instead of delivering damaged data. Rows
    // from before have none and are read as they are.
    r#"
    ALTER TABLE events ADD COLUMN crc INTEGER;
    "#,
    // 5: the critical lane's seqs in a table of their own, written with the
    // stream counters (about once a second, `write_streams`) instead of an
    // index entry in every commit: under a trickle of MES events the index
    // leaf was one page more in each commit, a third of what it wrote.
    // `critical` holds every critical seq through `meta.streams_through`;
    // the rows after it are read from `events` (`reader::lane_select`).
    // A deleted row takes its entry with it (the trigger), so the table
    // never names a row that is gone. Rows from schema 5 on may hold the
    // short stored forms of `compact.rs` in `type`, `source_time` and
    // `attrs`, which a release of schema 4 would read as damaged rows.
    r#"
    CREATE TABLE critical (seq INTEGER PRIMARY KEY);
    INSERT INTO critical(seq) SELECT seq FROM events WHERE class = 0 AND seq <= coalesce(
        (SELECT value FROM meta WHERE key = 'streams_through'), 0);
    DROP INDEX events_critical;
    CREATE TRIGGER critical_row_deleted AFTER DELETE ON events WHEN old.class = 0
    BEGIN
        DELETE FROM critical WHERE seq = old.seq;
    END;
    "#,
    // 6: types and attributes that repeat, stored once (`compact.rs`,
    // `TextTable`): an MES's event types and its `originsource` were a
    // fifth of each of its rows. Rows from schema 6 on may name an entry
    // here, and hold times with three decimals or none in a short form,
    // which a release of schema 5 would read as damaged rows.
    r#"
    CREATE TABLE texts (id INTEGER PRIMARY KEY, value TEXT NOT NULL);
    "#,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The writer's page cache once open (KiB).
pub(crate) const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// The page cache of a connection that reads the whole file once (KiB): the
/// writer's while it opens the journal, the dedup index rebuild's.
pub(crate) const STARTUP_CACHE_KIB: i64 = 1024;

/// How long a connection waits for a lock another holds.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// WAL frames beyond this are truncated after a checkpoint.
pub const WAL_SIZE_LIMIT: i64 = 64 << 20;

pub(crate) fn sqlite_err(path: &Path, e: rusqlite::Error) -> JournalError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == ErrorCode::DiskFull
    {
        return JournalError::DiskFull {
            path: path.to_path_buf(),
        };
    }
    JournalError::Sqlite {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// Whether reading the writer's state failed on damage: what SQLite calls
/// corrupt, or a stored value of a type no release writes there (a text
/// where a counter is kept: one flipped bit in a record's header, which
/// quick_check does not look at).
pub(crate) fn is_damage(e: &rusqlite::Error) -> bool {
    is_corruption(e)
        || matches!(
            e,
            rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::Utf8Error(..)
        )
}

/// Opens (creating if needed) the journal for writing: WAL, the sync mode,
/// the schema at its newest version. A file that SQLite calls corrupt, or
/// that fails `quick_check`, is renamed aside and replaced by a fresh one.
pub fn open_writer(
    path: &Path,
    sync: SyncMode,
    page_size: u32,
) -> Result<(Connection, Option<Quarantine>), JournalError> {
    match try_open(path, sync, true, Some(page_size)) {
        Ok(conn) => Ok((conn, None)),
        Err(OpenFailure::Corrupt(reason)) => {
            let (conn, q) = replace_damaged(path, sync, page_size, &reason)?;
            Ok((conn, Some(q)))
        }
        Err(OpenFailure::Other(e)) => Err(e),
    }
}

/// Moves a damaged journal aside and opens a fresh one in its place, which
/// continues the seq numbering and holds what could be salvaged. The
/// caller has closed every connection to the damaged file.
pub(crate) fn replace_damaged(
    path: &Path,
    sync: SyncMode,
    page_size: u32,
    reason: &str,
) -> Result<(Connection, Quarantine), JournalError> {
    let mut q = quarantine(path, reason)?;
    let conn = try_open(path, sync, false, Some(page_size)).map_err(|f| match f {
        OpenFailure::Corrupt(r) | OpenFailure::Other(JournalError::Sqlite { detail: r, .. }) => {
            JournalError::Sqlite {
                path: path.to_path_buf(),
                detail: format!("fresh journal after quarantine failed: {r}"),
            }
        }
        OpenFailure::Other(e) => e,
    })?;
    seed_after_quarantine(&conn, path, &q)?;
    q.salvaged =
        super::salvage::salvage_events(&conn, &q.moved_to, q.salvaged_last_seq.unwrap_or(u64::MAX));
    Ok((conn, q))
}

/// Reopens the journal after a failed commit, without the integrity check:
/// the file was healthy a moment ago, and a full check of a large journal
/// would stall the writer (and must never move the live file aside).
pub fn reopen_writer(path: &Path, sync: SyncMode) -> Result<Connection, JournalError> {
    try_open(path, sync, false, None).map_err(|f| match f {
        OpenFailure::Corrupt(detail) => JournalError::Sqlite {
            path: path.to_path_buf(),
            detail,
        },
        OpenFailure::Other(e) => e,
    })
}

enum OpenFailure {
    Corrupt(String),
    Other(JournalError),
}

fn classify(path: &Path, e: rusqlite::Error) -> OpenFailure {
    if is_corruption(&e) {
        OpenFailure::Corrupt(e.to_string())
    } else {
        OpenFailure::Other(sqlite_err(path, e))
    }
}

/// `page_size` is the page size a new file gets (`None`: SQLite's).
fn try_open(
    path: &Path,
    sync: SyncMode,
    check: bool,
    page_size: Option<u32>,
) -> Result<Connection, OpenFailure> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| classify(path, e))?;
    if let Some(size) = page_size {
        // Takes effect only while the file is empty, so before WAL mode
        // (which writes the header); an existing journal keeps its own.
        conn.pragma_update(None, "page_size", size)
            .map_err(|e| classify(path, e))?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenFailure::Other(JournalError::Sqlite {
            path: path.to_path_buf(),
            detail: format!(
                "cannot switch to WAL mode (got {mode}); is the file on a network share?"
            ),
        }));
    }
    let sync_value = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    for (name, value) in [
        ("synchronous", sync_value.to_string()),
        ("journal_size_limit", WAL_SIZE_LIMIT.to_string()),
        ("wal_autocheckpoint", "1000".to_string()),
        // Small while opening: the integrity check reads the whole file
        // once, and a full cache would stay resident. The writer sets
        // WRITER_CACHE_KIB when it is ready.
        ("cache_size", format!("-{STARTUP_CACHE_KIB}")),
        ("temp_store", "MEMORY".to_string()),
    ] {
        conn.pragma_update(None, name, &value)
            .map_err(|e| classify(path, e))?;
    }
    if check {
        let result: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(|e| classify(path, e))?;
        if result != "ok" {
            return Err(OpenFailure::Corrupt(format!("quick_check: {result}")));
        }
    }
    migrate(&conn, path)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), OpenFailure> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(OpenFailure::Other(JournalError::Sqlite {
            path: path.to_path_buf(),
            detail: format!(
                "written by a newer plantrelay (schema {version}; this version knows up to {SCHEMA_VERSION}): upgrade plantrelay or move the file aside"
            ),
        }));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let to = i + 1;
        let batch = format!("BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {to}; COMMIT;");
        if let Err(e) = conn.execute_batch(&batch) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(classify(path, e));
        }
    }
    Ok(())
}

fn utc_stamp(t: SystemTime) -> String {
    // RFC 3339 without separators that are awkward in file names.
    humantime::format_rfc3339_seconds(crate::units::formattable(t))
        .to_string()
        .replace([':', '-'], "")
}

/// Renames a damaged journal (and its WAL and shared-memory files) aside.
fn quarantine(path: &Path, reason: &str) -> Result<Quarantine, JournalError> {
    let salvage = salvage(path);
    let now = SystemTime::now();
    let mut moved_to: PathBuf = path.to_path_buf();
    moved_to.set_file_name(format!(
        "{}.corrupt-{}",
        path.file_name()
            .map_or("journal.db".into(), |n| n.to_string_lossy()),
        utc_stamp(now)
    ));
    error!(
        journal = %path.display(),
        quarantined_to = %moved_to.display(),
        reason,
        "journal is damaged: moving it aside and starting a fresh one"
    );
    std::fs::rename(path, &moved_to).map_err(|e| JournalError::Io {
        path: path.to_path_buf(),
        what: format!("cannot move the damaged journal to {}", moved_to.display()),
        detail: e.to_string(),
    })?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            let mut dest = moved_to.as_os_str().to_owned();
            dest.push(suffix);
            if let Err(e) = std::fs::rename(&side, PathBuf::from(dest)) {
                warn!(file = %side.display(), error = %e, "cannot move journal side file; removing it");
                let _ = std::fs::remove_file(&side);
            }
        }
    }
    Ok(Quarantine {
        moved_to,
        reason: reason.to_string(),
        time: now,
        salvaged_last_seq: salvage.as_ref().map(|s| s.last_seq),
        salvaged_streams: salvage.map(|s| s.streams).unwrap_or_default(),
        salvaged: Default::default(),
    })
}

struct Salvage {
    last_seq: u64,
    streams: Vec<(String, String, u64)>,
}

/// Best effort: the highest seq and the stream heads of a damaged file, so
/// that the fresh journal continues the numbering instead of reusing seqs
/// (which would collide with the upstream's idempotency keys).
fn salvage(path: &Path) -> Option<Salvage> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let from_meta: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
            r.get(0)
        })
        .optional()
        .ok()
        .flatten();
    let from_rows: Option<i64> = conn
        .query_row("SELECT max(seq) FROM events", [], |r| r.get(0))
        .ok()
        .flatten();
    let last_seq = from_meta.into_iter().chain(from_rows).max()?;
    let heads = |sql: &str| {
        conn.prepare(sql).and_then(|mut st| {
            st.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()
        })
    };
    // The table is written now and then (`streams_due`); the rows after
    // `streams_through` hold the newer heads. When those cannot be read,
    // the table alone is better than nothing.
    let streams = heads(STREAM_HEADS)
        .or_else(|_| heads("SELECT source, stream, last_seq FROM streams"))
        .unwrap_or_default();
    Some(Salvage {
        last_seq: last_seq.max(0) as u64,
        streams,
    })
}

fn seed_after_quarantine(
    conn: &Connection,
    path: &Path,
    q: &Quarantine,
) -> Result<(), JournalError> {
    // Without a salvaged seq, start above any seq the old file can have held:
    // the current time in microseconds exceeds the count of events any
    // gateway has ever journaled.
    let now_us = crate::units::unix_micros(SystemTime::now()) as u64;
    let seed = q.salvaged_last_seq.unwrap_or(now_us);
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| sqlite_err(path, e))?;
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('last_seq', ?1)
         ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
        [seed as i64],
    )
    .map_err(|e| sqlite_err(path, e))?;
    for (source, stream, last) in &q.salvaged_streams {
        tx.execute(
            "INSERT OR REPLACE INTO streams(source, stream, last_seq) VALUES (?1, ?2, ?3)",
            rusqlite::params![source, stream, *last as i64],
        )
        .map_err(|e| sqlite_err(path, e))?;
    }
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('quarantined_at_us', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [crate::units::unix_micros(q.time)],
    )
    .map_err(|e| sqlite_err(path, e))?;
    tx.commit().map_err(|e| sqlite_err(path, e))
}

/// The seq through which `critical` lists every critical row (schema 5),
/// as an SQL expression: `meta.streams_through`, which the writer moves
/// when it adds the rows after it (`write_streams`). Critical rows after it
/// are read from `events` itself (`reader::lane_select`).
pub(crate) const CRITICAL_THROUGH: &str =
    "coalesce((SELECT value FROM meta WHERE key = 'streams_through'), 0)";

/// Every stream's last stream sequence: the `streams` table, raised by the
/// rows committed after it was last written (`meta.streams_through`).
/// Gap rows and retried dead letters carry stream sequences at or below
/// their stream's head, so they never raise it.
pub(crate) const STREAM_HEADS: &str = "SELECT source, stream, max(last_seq) FROM (
        SELECT source, stream, last_seq FROM streams
        UNION ALL
        SELECT source, stream, max(stream_seq) FROM events
        WHERE seq > coalesce((SELECT value FROM meta WHERE key = 'streams_through'), 0)
        GROUP BY source, stream
    ) GROUP BY source, stream";

/// Opens a connection for reading only (forwarders, status, CLI).
pub fn open_reader(path: &Path) -> Result<Connection, JournalError> {
    if !path.exists() {
        return Err(JournalError::Io {
            path: path.to_path_buf(),
            what: "no journal here".into(),
            detail: "the file does not exist (has the agent run with this state_dir?)".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sqlite_err(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| sqlite_err(path, e))?;
    conn.pragma_update(None, "query_only", "ON")
        .map_err(|e| sqlite_err(path, e))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| sqlite_err(path, e))?;
    if version != SCHEMA_VERSION {
        return Err(JournalError::Sqlite {
            path: path.to_path_buf(),
            detail: format!(
                "schema version {version}, this plantrelay reads {SCHEMA_VERSION}: start the agent once to migrate it"
            ),
        });
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}
