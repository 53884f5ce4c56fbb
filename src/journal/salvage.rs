//! Salvage after a quarantine: the event rows of the damaged file that
//! still read and still match their checksum are copied into the fresh
//! journal, under their own seqs, with the sinks' cursors, so that what the
//! damage spared is still delivered (once; what a cursor had passed is not
//! sent again).
//!
//! Best effort and bounded by the file: a read that fails goes on after the
//! failing row in growing steps, so a damaged stretch is stepped over, not
//! read row by row. It must never fail the start: whatever goes wrong ends
//! the salvage with what it has.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, params};
use tracing::{info, warn};

use super::compact;
use super::rowcheck::RowColumns;

/// Rows read per query.
const CHUNK: i64 = 1024;

/// One stored row, its columns as they are in the file (the short forms
/// of `compact.rs` read as their text).
struct Row {
    seq: i64,
    source: String,
    id: String,
    stream: String,
    stream_seq: i64,
    class: i64,
    event_type: String,
    source_time: Option<String>,
    recv_us: i64,
    data: Vec<u8>,
    attrs: Option<String>,
    size: i64,
    only_sink: Option<String>,
    crc: Option<i64>,
}

impl Row {
    fn read(r: &rusqlite::Row<'_>, texts: compact::Texts<'_>) -> rusqlite::Result<Row> {
        let stream: String = r.get(3)?;
        Ok(Row {
            seq: r.get(0)?,
            source: r.get(1)?,
            id: r.get(2)?,
            stream_seq: r.get(4)?,
            class: r.get(5)?,
            event_type: compact::column(r, 6, |v| compact::read_type(v, texts))?,
            source_time: compact::column(r, 7, compact::read_time)?,
            recv_us: r.get(8)?,
            data: r.get(9)?,
            attrs: compact::column(r, 10, |v| compact::read_attrs(v, &stream, texts))?,
            stream,
            size: r.get(11)?,
            only_sink: r.get(12)?,
            crc: r.get(13)?,
        })
    }

    /// Whether the row still matches its checksum (rows written before
    /// checksums are taken as they are).
    fn intact(&self) -> bool {
        self.crc.is_none_or(|crc| {
            RowColumns {
                seq: self.seq,
                source: &self.source,
                id: &self.id,
                stream: &self.stream,
                stream_seq: self.stream_seq,
                class: self.class,
                event_type: &self.event_type,
                source_time: self.source_time.as_deref(),
                recv_us: self.recv_us,
                data: &self.data,
                attrs: self.attrs.as_deref(),
                size: self.size,
                only_sink: self.only_sink.as_deref(),
            }
            .check()
                == crc
        })
    }
}

/// What a salvage copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Salvaged {
    pub events: u64,
    /// Rows read but failing their checksum or their types.
    pub damaged: u64,
    pub cursors: u64,
}

/// Copies what can be read of `damaged` (the quarantined file, its WAL
/// beside it) into `fresh`, through seq `last_seq` at most.
pub(crate) fn salvage_events(fresh: &Connection, damaged: &Path, last_seq: u64) -> Salvaged {
    let mut out = Salvaged::default();
    let Ok(old) = Connection::open_with_flags(damaged, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return out;
    };
    // A file from before checksums has no `crc` column.
    let select = |crc: &str| {
        format!(
            "SELECT seq, source, event_id, stream, stream_seq, class, type, source_time,
                    recv_time, data, attrs, size, only_sink, {crc}
             FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        )
    };
    let mut st = match old
        .prepare(&select("crc"))
        .or_else(|_| old.prepare(&select("NULL")))
    {
        Ok(st) => st,
        Err(e) => {
            warn!(file = %damaged.display(), error = %e, "salvage: the damaged journal's events cannot be read at all");
            return out;
        }
    };
    // The damaged file's own `texts` entries; a row naming one that cannot
    // be read counts as damaged.
    let cache = compact::TextCache::default();
    let texts = compact::Texts {
        conn: &old,
        cache: &cache,
    };
    let last_seq = i64::try_from(last_seq).unwrap_or(i64::MAX);
    let mut after = 0i64;
    let mut step = 1i64;
    while after < last_seq {
        let mut rows = Vec::new();
        let mut failed = false;
        let from = after;
        match st.query(params![from, CHUNK]) {
            Ok(mut q) => loop {
                match q.next() {
                    Ok(Some(r)) => match Row::read(r, texts) {
                        Ok(row) => rows.push(row),
                        Err(_) => {
                            out.damaged += 1;
                            if let Ok(seq) = r.get::<_, i64>(0) {
                                after = after.max(seq);
                            }
                        }
                    },
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            },
            Err(_) => failed = true,
        }
        if let Some(last) = rows.last() {
            after = after.max(last.seq);
        }
        if let Err(e) = copy(fresh, rows, &mut out) {
            warn!(error = %e, "salvage: cannot write into the fresh journal; stopping");
            return out;
        }
        if failed {
            // Past the damage, in growing steps.
            after = after.saturating_add(step);
            step = step.saturating_mul(2);
        } else if after == from {
            // The end of what the file holds.
            break;
        } else {
            step = 1;
        }
    }
    out.cursors = copy_cursors(&old, fresh);
    info!(
        file = %damaged.display(),
        events = out.events,
        damaged_rows = out.damaged,
        cursors = out.cursors,
        "salvaged the damaged journal's intact events into the fresh one"
    );
    out
}

fn copy(fresh: &Connection, rows: Vec<Row>, out: &mut Salvaged) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let tx = fresh.unchecked_transaction()?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO events (seq, source, event_id, stream, stream_seq, class,
                 type, source_time, recv_time, data, attrs, size, only_sink, crc)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        for row in rows {
            if !row.intact() {
                out.damaged += 1;
                continue;
            }
            out.events += ins.execute(params![
                row.seq,
                row.source,
                row.id,
                row.stream,
                row.stream_seq,
                row.class,
                compact::store_type(&row.event_type),
                compact::store_time(row.source_time.as_deref()),
                row.recv_us,
                row.data,
                compact::store_attrs(row.attrs.as_deref(), &row.stream),
                row.size,
                row.only_sink,
                row.crc,
            ])? as u64;
        }
    }
    tx.commit()
}

/// The sinks' cursors, so that what was delivered is not sent again.
fn copy_cursors(old: &Connection, fresh: &Connection) -> u64 {
    // A row that cannot be read costs its own sink's cursor, not the others'.
    let rows: Vec<(String, i64, i64)> = match old
        .prepare("SELECT sink, seq, updated_us FROM cursors")
        .and_then(|mut st| {
            Ok(st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .filter_map(Result::ok)
                .collect())
        }) {
        Ok(rows) => rows,
        Err(_) => return 0,
    };
    let mut n = 0;
    for (sink, seq, updated) in rows {
        if fresh
            .execute(
                "INSERT OR REPLACE INTO cursors(sink, seq, updated_us) VALUES (?1, ?2, ?3)",
                params![sink, seq.max(0), updated],
            )
            .is_ok()
        {
            n += 1;
        }
    }
    n
}
