//! Read connections: forwarders read batches after their cursor, the status
//! endpoint and the CLI read positions and statistics. Every call is its own
//! short read transaction so that checkpoints can complete. A reader must
//! never write.
//!
//! Kept as one file (a little over 900 lines): every query that reads
//! events is here, so that their index use, their bounds and the rule for
//! damaged rows (`rowcheck.rs`) can be checked side by side.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::compact;
use super::rowcheck::checked_event;
use super::schema::{CRITICAL_THROUGH, STREAM_HEADS, open_reader, sqlite_err};
use super::{JournalError, SCHEMA_VERSION};
use crate::event::{Class, StoredEvent};

/// The first seq whose `recv_time` is at or after `t_us`, by binary search
/// on seq (receive times never decrease with seq).
/// The skipped seq ranges kept in `meta` (`first..=last`), for the writer
/// at start and for [`Reader::skipped_seqs`].
pub(crate) fn skipped_seqs(conn: &Connection) -> rusqlite::Result<Vec<(u64, u64)>> {
    use super::writer::{SKIP_KEY_END, SKIP_KEY_PREFIX};
    let mut st = conn.prepare_cached("SELECT key, value FROM meta WHERE key > ?1 AND key < ?2")?;
    let rows = st.query_map(params![SKIP_KEY_PREFIX, SKIP_KEY_END], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (key, last) = row?;
        if let Some(first) = key
            .strip_prefix(SKIP_KEY_PREFIX)
            .and_then(|f| f.parse().ok())
        {
            out.push((first, last.max(0) as u64));
        }
    }
    Ok(out)
}

pub(crate) fn first_seq_at_or_after(conn: &Connection, t_us: i64) -> rusqlite::Result<Option<u64>> {
    let bounds: Option<(i64, i64)> =
        // Two index probes: `min(seq), max(seq)` in one query is a full scan.
        // Seqs start at 1; a row at 0 or below is damage (a flipped sign
        // bit in the first row's key passes quick_check), and a bound near
        // i64::MIN would make `hi - lo` overflow and the search never end.
        conn.query_row(
            "SELECT (SELECT seq FROM events WHERE seq > 0 ORDER BY seq LIMIT 1),
                    (SELECT seq FROM events WHERE seq > 0 ORDER BY seq DESC LIMIT 1)",
            [],
            |r| {
            Ok(
                match (r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?) {
                    (Some(a), Some(b)) => Some((a, b)),
                    _ => None,
                },
            )
            },
        )?;
    let Some((mut lo, mut hi)) = bounds else {
        return Ok(None);
    };
    let mut probe = conn
        .prepare_cached("SELECT seq, recv_time FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1")?;
    let mut at = |s: i64| -> rusqlite::Result<Option<(i64, i64)>> {
        probe
            .query_row([s], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };
    // Invariant: every row below `lo` is older than t; `hi` is a seq bound.
    match at(hi)? {
        Some((_, t)) if t < t_us => return Ok(None),
        _ => {}
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at(mid)? {
            Some((seq, t)) if t < t_us => lo = seq.saturating_add(1),
            Some((seq, _)) => hi = seq.min(hi),
            None => hi = mid,
        }
        if let Some((seq, t)) = at(lo)?
            && t >= t_us
        {
            return Ok(Some(seq as u64));
        }
    }
    Ok(at(lo)?.filter(|&(_, t)| t >= t_us).map(|(s, _)| s as u64))
}

/// The first seq of `class` after `after`: where a lane of that class
/// stands for retention and status. A critical seq in `critical` comes
/// before any after [`CRITICAL_THROUGH`].
pub(crate) fn first_of_class_after(
    conn: &Connection,
    class: Class,
    after: u64,
) -> rusqlite::Result<Option<u64>> {
    let sql = match class {
        Class::Critical => format!(
            "SELECT coalesce(
                 (SELECT seq FROM critical WHERE seq > ?1 ORDER BY seq LIMIT 1),
                 (SELECT seq FROM events WHERE class = 0 AND seq > max(?1, {CRITICAL_THROUGH})
                  ORDER BY seq LIMIT 1))"
        ),
        Class::Telemetry => {
            "SELECT seq FROM events WHERE class = 1 AND seq > ?1 ORDER BY seq LIMIT 1".to_string()
        }
    };
    conn.prepare_cached(&sql)?
        .query_row([after as i64], |r| r.get::<_, Option<i64>>(0))
        .optional()
        .map(|s| s.flatten().map(|s| s.max(0) as u64))
}

/// A sink's position in the journal.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SinkPosition {
    pub sink: String,
    pub cursor: u64,
    /// Events after the cursor (head seq minus cursor; gaps left by
    /// evictions make it an upper bound).
    pub backlog: u64,
    /// Receive time (µs) of the oldest event not yet delivered.
    pub oldest_undelivered_us: Option<i64>,
    /// Per lane of a sink that sends critical events first (one entry per
    /// class it takes); empty for a sink in journal order over both.
    pub classes: Vec<ClassPosition>,
}

/// What [`Reader::read_routed`] found.
#[derive(Debug, Clone, Default)]
pub struct Routed {
    pub events: Vec<StoredEvent>,
    pub through: u64,
    pub more: bool,
}

/// A sink's position in one class.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassPosition {
    pub class: Class,
    pub cursor: u64,
    /// Events of this class after the cursor (gaps left by evictions make
    /// it an upper bound).
    pub backlog: u64,
    pub oldest_undelivered_us: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub sink: String,
    pub seq: u64,
    pub reason: String,
    pub time_us: i64,
    pub source: String,
    pub event_id: String,
    pub stream: String,
    pub stream_seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GapRecord {
    pub source: String,
    pub stream: String,
    pub first_stream_seq: u64,
    pub last_stream_seq: u64,
    pub count: u64,
    pub class: Class,
    pub reason: String,
    pub time_us: i64,
}

/// A snapshot of the journal for `plantrelay journal stats`.
#[derive(Debug, Clone, Serialize)]
pub struct JournalStats {
    pub path: PathBuf,
    pub schema_version: i64,
    pub file_bytes: u64,
    pub wal_bytes: u64,
    /// Live bytes: pages in use × page size.
    pub used_bytes: u64,
    /// SQLite's page size of this journal (set when it was created).
    pub page_size: u64,
    pub events: u64,
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub streams: u64,
    pub duplicates: u64,
    pub evicted_telemetry: u64,
    pub evicted_critical: u64,
    pub gaps: u64,
    pub dead_letters: u64,
    pub retention_through: u64,
    pub quarantined_at_us: Option<i64>,
    pub cursors: Vec<(String, u64)>,
}

pub struct Reader {
    conn: Connection,
    path: PathBuf,
    /// Damaged rows this reader has logged (see [`checked_event`]).
    damaged: RefCell<HashSet<i64>>,
    /// The entries of table `texts` its rows named (`compact.rs`).
    texts: compact::TextCache,
    /// The running journal's cursor moves not written yet
    /// ([`super::SharedStats::unwritten_cursors`]); `None` for a reader of
    /// a file no agent runs.
    live: Option<Arc<super::SharedStats>>,
}

const EVENT_COLUMNS: &str = "seq, source, event_id, stream, stream_seq, class, type, source_time, recv_time, data, attrs, size, only_sink, crc";

/// The condition that keeps rows meant only for another sink out of a
/// read (`?2` is the sink). Not `only_sink IS NULL OR only_sink = ?2`:
/// a statement with a parameter inside an `OR` is planned against that
/// parameter's value, so SQLite discards its plan whenever the bindings are
/// cleared, which the statement cache does after every use, and compiled
/// the statement again on every read (a tenth of the agent's CPU at 1,000
/// events/s). For the same reason read sizes are literals in the SQL, not
/// parameters of `LIMIT`: one cached statement per sink and lane.
const FOR_SINK: &str = "coalesce(only_sink, ?2) = ?2";

/// [`EVENT_COLUMNS`] of `events e` in a join.
const EVENT_COLUMNS_E: &str = "e.seq, e.source, e.event_id, e.stream, e.stream_seq, e.class, e.type, e.source_time, e.recv_time, e.data, e.attrs, e.size, e.only_sink, e.crc";

/// The rows of `lane` (both classes for `None`) after seq `?1` and at or
/// below `?3`, for sink `?2` (see [`FOR_SINK`]), in seq order, at most
/// `limit`, as [`EVENT_COLUMNS`]. The critical lane looks its seqs up in
/// `critical` and reads only the rows after [`CRITICAL_THROUGH`] one by
/// one: never row by row through a telemetry backlog. Both parts are one
/// statement, so one snapshot: a flush of `critical` between two
/// statements would hide the rows it moved. Every seq of the first part
/// is at or below [`CRITICAL_THROUGH`] and every one of the second above
/// it, so `UNION ALL`, which SQLite runs part after part, keeps seq order
/// without an `ORDER BY` over both (that one sorted up to twice the limit
/// of rows, payloads and all, in a temporary B-tree on every read).
fn lane_select(lane: Option<Class>, limit: usize) -> String {
    let limit = limit.max(1);
    match lane {
        Some(Class::Critical) => format!(
            "SELECT * FROM (SELECT {EVENT_COLUMNS_E} FROM critical c CROSS JOIN events e ON e.seq = c.seq
                 WHERE c.seq > ?1 AND c.seq <= ?3 AND coalesce(e.only_sink, ?2) = ?2
                 ORDER BY c.seq LIMIT {limit})
             UNION ALL
             SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events
                 WHERE class = 0 AND seq > max(?1, {CRITICAL_THROUGH}) AND seq <= ?3 AND {FOR_SINK}
                 ORDER BY seq LIMIT {limit})
             LIMIT {limit}"
        ),
        Some(Class::Telemetry) => format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE class = 1 AND seq > ?1 AND seq <= ?3 AND {FOR_SINK}
             ORDER BY seq LIMIT {limit}"
        ),
        None => format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE seq > ?1 AND seq <= ?3 AND {FOR_SINK}
             ORDER BY seq LIMIT {limit}"
        ),
    }
}

pub(super) fn event_from_row(
    r: &rusqlite::Row<'_>,
    texts: compact::Texts<'_>,
) -> rusqlite::Result<StoredEvent> {
    let stream: String = r.get(3)?;
    Ok(StoredEvent {
        seq: r.get::<_, i64>(0)?.max(0) as u64,
        source: r.get(1)?,
        id: r.get(2)?,
        stream_seq: r.get::<_, i64>(4)?.max(0) as u64,
        class: Class::from_i64(r.get(5)?),
        event_type: compact::column(r, 6, |v| compact::read_type(v, texts))?,
        source_time: compact::column(r, 7, compact::read_time)?,
        recv_time_us: r.get(8)?,
        data: r.get(9)?,
        attrs: compact::column(r, 10, |v| compact::read_attrs(v, &stream, texts))?,
        stream,
    })
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, JournalError> {
        Ok(Reader {
            conn: open_reader(path)?,
            path: path.to_path_buf(),
            damaged: RefCell::new(HashSet::new()),
            texts: compact::TextCache::default(),
            live: None,
        })
    }

    /// This reader for the journal `stats` belongs to: cursors come from
    /// its moves not written yet, then from the rows.
    pub(crate) fn with_live(mut self, stats: Arc<super::SharedStats>) -> Reader {
        self.live = Some(stats);
        self
    }

    fn err(&self, e: rusqlite::Error) -> JournalError {
        sqlite_err(&self.path, e)
    }

    fn texts(&self) -> compact::Texts<'_> {
        compact::Texts {
            conn: &self.conn,
            cache: &self.texts,
        }
    }

    /// Events after `after` in seq order, for `sink` (rows put back for
    /// another sink are skipped), of `lane`'s class if given: at most
    /// `max_events`, and no more than `max_bytes` unless a single event is
    /// larger (it then comes alone).
    ///
    /// The critical lane reads through the table `critical` (see
    /// [`lane_select`]), never row by row through a telemetry backlog; the
    /// telemetry lane steps over the few critical rows in its range.
    pub fn read_after(
        &self,
        after: u64,
        sink: &str,
        lane: Option<Class>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, JournalError> {
        self.read_range(after, None, sink, lane, max_events, max_bytes)
            .map(|(events, _)| events)
    }

    /// [`Reader::read_after`] up to seq `until` if given; the flag says
    /// whether the read stopped at `max_events` or `max_bytes` (rather than
    /// at the end of what it may read).
    fn read_range(
        &self,
        after: u64,
        until: Option<u64>,
        sink: &str,
        lane: Option<Class>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(Vec<StoredEvent>, bool), JournalError> {
        let sql = lane_select(lane, max_events);
        let until = until.map_or(i64::MAX, |u| i64::try_from(u).unwrap_or(i64::MAX));
        let mut st = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let mut after = after as i64;
        loop {
            let mut rows = st
                .query(params![after, sink, until])
                .map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            // Rows, damaged ones among them: the query's LIMIT counts those.
            let mut scanned = 0usize;
            while let Some(row) = rows.next().map_err(|e| self.err(e))? {
                scanned += 1;
                after = row.get(0).map_err(|e| self.err(e))?;
                let Some(ev) = checked_event(row, self.texts(), &self.damaged) else {
                    continue;
                };
                bytes += ev.size();
                if bytes > max_bytes && !out.is_empty() {
                    return Ok((out, true));
                }
                out.push(ev);
            }
            let full = scanned >= max_events.max(1);
            // A read of damaged rows alone must not pass for the end of
            // the journal: read on past them.
            if out.is_empty() && full {
                continue;
            }
            return Ok((out, full));
        }
    }

    /// [`Reader::read_after`] for one lane, bounded by the last row present
    /// when the read began: when the read stops short of its limits it has
    /// seen every row up to there, so `through` is that row and the lane's
    /// next read starts after it. Without the bound an idle lane beside a
    /// steady flow of the other class (telemetry beside MES events posted
    /// one by one) would step over the same rows again after every commit,
    /// from its cursor to the head. Rows are committed in seq order, so
    /// none can appear at or below a seq already seen.
    fn read_lane(
        &self,
        after: u64,
        sink: &str,
        lane: Option<Class>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(Vec<StoredEvent>, u64), JournalError> {
        let last_row: Option<i64> = self
            .conn
            .prepare_cached("SELECT max(seq) FROM events")
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        let Some(bound) = last_row.map(|s| s.max(0) as u64).filter(|s| *s > after) else {
            return Ok((Vec::new(), after));
        };
        let (events, full) =
            self.read_range(after, Some(bound), sink, lane, max_events, max_bytes)?;
        let through = match events.last() {
            Some(last) if full => last.seq,
            _ => bound,
        };
        Ok((events, through))
    }

    /// [`Reader::read_after`] for a sink with stream filters: the events
    /// after `after` that `filter` takes, looking at no more than
    /// `scan_limit` rows (a sink that wants 1 % of a backlog must not be
    /// held up for the other 99 % in one read). `through` is the last seq
    /// looked at: every row in `(after, through]` not returned is one the
    /// sink does not take. `more`: the scan stopped at its limit, not at
    /// the end of the journal.
    #[allow(clippy::too_many_arguments)]
    pub fn read_routed(
        &self,
        after: u64,
        sink: &str,
        lane: Option<Class>,
        filter: &crate::route::StreamFilter,
        max_events: usize,
        max_bytes: usize,
        scan_limit: usize,
    ) -> Result<Routed, JournalError> {
        if filter.is_all() {
            let (events, through) = match lane {
                None => {
                    let events = self.read_after(after, sink, None, max_events, max_bytes)?;
                    let through = events.last().map_or(after, |e| e.seq);
                    (events, through)
                }
                Some(_) => self.read_lane(after, sink, lane, max_events, max_bytes)?,
            };
            return Ok(Routed {
                events,
                through,
                more: false,
            });
        }
        let sql = lane_select(lane, scan_limit);
        let mut st = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let mut rows = st
            .query(params![after as i64, sink, i64::MAX])
            .map_err(|e| self.err(e))?;
        let (mut events, mut bytes, mut through, mut scanned) = (Vec::new(), 0usize, after, 0usize);
        while let Some(row) = rows.next().map_err(|e| self.err(e))? {
            scanned += 1;
            let seq = row.get::<_, i64>(0).map_err(|e| self.err(e))?.max(0) as u64;
            // A row whose stream does not decode is damaged: looked at (so
            // `through` passes it), never delivered.
            let taken = row
                .get_ref(3)
                .ok()
                .and_then(|v| v.as_str().ok())
                .is_none_or(|stream| filter.matches(stream));
            if taken && let Some(ev) = checked_event(row, self.texts(), &self.damaged) {
                bytes += ev.size();
                if bytes > max_bytes && !events.is_empty() {
                    return Ok(Routed {
                        events,
                        through,
                        more: true,
                    });
                }
                events.push(ev);
            }
            through = seq;
            if events.len() >= max_events {
                return Ok(Routed {
                    events,
                    through,
                    more: true,
                });
            }
        }
        Ok(Routed {
            events,
            through,
            more: scanned >= scan_limit.max(1),
        })
    }

    fn cursor_rows(&self, sink: &str) -> Result<Vec<(String, u64)>, JournalError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT sink, seq FROM cursors
                 WHERE sink = ?1 OR sink = ?1 || '/critical' OR sink = ?1 || '/telemetry'",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([sink], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })
            .map_err(|e| self.err(e))?;
        let mut rows = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        if let Some(stats) = &self.live {
            let unwritten = stats
                .unwritten_cursors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for key in [
                sink.to_string(),
                super::cursor_key(sink, Some(Class::Critical)),
                super::cursor_key(sink, Some(Class::Telemetry)),
            ] {
                if let Some(&seq) = unwritten.get(&key) {
                    match rows.iter_mut().find(|(k, _)| *k == key) {
                        Some(row) => row.1 = seq,
                        None => rows.push((key, seq)),
                    }
                }
            }
        }
        Ok(rows)
    }

    /// The cursor of `sink` (0 when it has none yet): every event at or
    /// before it is delivered. A reader of the running journal
    /// ([`super::Journal::reader`]) sees it as acknowledged, one of a file
    /// alone as stored (up to a second behind, see
    /// [`super::Journal::advance_delivered`]). For a sink with lanes, the lowest of
    /// its lanes', a lane counting as far as the event before the first one
    /// of its class it has not delivered (the head, if none): a critical
    /// lane is never "behind" telemetry it does not carry.
    pub fn cursor(&self, sink: &str) -> Result<u64, JournalError> {
        let rows = self.cursor_rows(sink)?;
        let row = |k: &str| rows.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        let base = row(sink);
        let lane_rows: Vec<(Class, Option<u64>)> = [Class::Critical, Class::Telemetry]
            .iter()
            .map(|c| (*c, row(&super::cursor_key(sink, Some(*c)))))
            .collect();
        if lane_rows.iter().all(|(_, r)| r.is_none()) {
            return Ok(base.unwrap_or(0));
        }
        let head = self.head_seq()?;
        let mut lowest = head;
        for (class, r) in lane_rows {
            // A lane without a row of its own stands at the sink's row.
            let Some(c) = r.or(base) else { continue };
            let through = match self.first_of_class_after(class, c)? {
                Some(first) => first.saturating_sub(1).max(c),
                None => head.max(c),
            };
            lowest = lowest.min(through);
        }
        Ok(lowest)
    }

    /// The first seq of `class` after `after`. Telemetry has no index: when
    /// every row after `after` is critical (counted through the critical
    /// index), the answer is known without reading the table, which a
    /// telemetry lane over an all-critical backlog would otherwise do on
    /// every status answer.
    fn first_of_class_after(&self, class: Class, after: u64) -> Result<Option<u64>, JournalError> {
        if class == Class::Telemetry && self.telemetry_after_at_most(after)? == 0 {
            return Ok(None);
        }
        first_of_class_after(&self.conn, class, after).map_err(|e| self.err(e))
    }

    /// At most this many telemetry rows after `after`: the seqs after it
    /// less the critical rows (counted through their index). Exact but for
    /// the holes evictions leave; zero means none.
    fn telemetry_after_at_most(&self, after: u64) -> Result<u64, JournalError> {
        Ok(self
            .head_seq()?
            .saturating_sub(after)
            .saturating_sub(self.critical_after(after)?))
    }

    /// The cursor under `key` (see [`super::cursor_key`], and
    /// [`Reader::cursor`] for what a reader sees); a lane without a row of
    /// its own stands at its sink's row.
    pub fn lane_cursor(&self, key: &str) -> Result<u64, JournalError> {
        let sink = super::lane_of_key(key).map_or(key, |(s, _)| s);
        let rows = self.cursor_rows(sink)?;
        let row = |k: &str| rows.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        Ok(row(key).or_else(|| row(sink)).unwrap_or(0))
    }

    /// The highest seq ever assigned.
    pub fn head_seq(&self) -> Result<u64, JournalError> {
        let meta: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let rows: Option<i64> = self
            .conn
            .query_row("SELECT max(seq) FROM events", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(meta.unwrap_or(0).max(rows.unwrap_or(0)).max(0) as u64)
    }

    /// The seq ranges a restart jumped over (see `seqmark.rs`): no event
    /// has them, so backlogs leave them out.
    pub fn skipped_seqs(&self) -> Result<Vec<(u64, u64)>, JournalError> {
        skipped_seqs(&self.conn).map_err(|e| self.err(e))
    }

    /// Where `sink` stands, over its `lanes` (see
    /// [`crate::config::lanes`]).
    pub fn position(
        &self,
        sink: &str,
        lanes: &[Option<Class>],
        head_seq: u64,
    ) -> Result<SinkPosition, JournalError> {
        let skips = self.skipped_seqs()?;
        let seqs_after = |cursor: u64| {
            head_seq
                .saturating_sub(cursor)
                .saturating_sub(super::skipped_between(&skips, cursor, head_seq))
        };
        if lanes.iter().all(Option::is_none) {
            let cursor = self.cursor(sink)?;
            let oldest = self.oldest_after(sink, cursor, None)?;
            return Ok(SinkPosition {
                sink: sink.to_string(),
                cursor,
                backlog: seqs_after(cursor),
                oldest_undelivered_us: oldest,
                classes: Vec::new(),
            });
        }
        let mut classes = Vec::new();
        for class in lanes.iter().flatten() {
            let cursor = self.lane_cursor(&super::cursor_key(sink, Some(*class)))?;
            let critical_after = self.critical_after(cursor)?;
            let backlog = match class {
                Class::Critical => critical_after,
                Class::Telemetry => seqs_after(cursor).saturating_sub(critical_after),
            };
            // Nothing of the class waiting: no need to look for its oldest
            // event (for telemetry, a read of every row after the cursor).
            let waiting = match class {
                Class::Critical => critical_after > 0,
                Class::Telemetry => backlog > 0,
            };
            let oldest_undelivered_us = if waiting {
                self.oldest_after(sink, cursor, Some(*class))?
            } else {
                None
            };
            classes.push(ClassPosition {
                class: *class,
                cursor,
                backlog,
                oldest_undelivered_us,
            });
        }
        // Every event at or before the lowest of these is delivered; a lane
        // with nothing waiting is caught up with the head.
        let cursor = classes
            .iter()
            .map(|c| {
                if c.backlog == 0 {
                    head_seq.max(c.cursor)
                } else {
                    c.cursor
                }
            })
            .min()
            .unwrap_or(0);
        Ok(SinkPosition {
            sink: sink.to_string(),
            cursor,
            backlog: classes.iter().map(|c| c.backlog).sum(),
            oldest_undelivered_us: classes.iter().filter_map(|c| c.oldest_undelivered_us).min(),
            classes,
        })
    }

    /// Critical events after `after`: `critical`, and the rows after what
    /// it lists.
    fn critical_after(&self, after: u64) -> Result<u64, JournalError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT (SELECT count(*) FROM critical WHERE seq > ?1)
                      + (SELECT count(*) FROM events
                         WHERE class = 0 AND seq > max(?1, {CRITICAL_THROUGH}))"
            ))
            .and_then(|mut st| st.query_row([after as i64], |r| r.get::<_, i64>(0)))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.err(e))
    }

    /// Receive time of the first event after `after` for `sink` (of `class`).
    fn oldest_after(
        &self,
        sink: &str,
        after: u64,
        class: Option<Class>,
    ) -> Result<Option<i64>, JournalError> {
        let sql = format!("SELECT recv_time FROM ({})", lane_select(class, 1));
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_row(params![after as i64, sink, i64::MAX], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// The last `n` events (optionally of one stream), in seq order.
    pub fn tail(&self, n: usize, stream: Option<&str>) -> Result<Vec<StoredEvent>, JournalError> {
        let sql = format!(
            "SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events
               WHERE (?1 IS NULL OR stream = ?1) ORDER BY seq DESC LIMIT ?2)
             ORDER BY seq"
        );
        let mut st = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query(params![stream, n as i64])
            .map_err(|e| self.err(e))?;
        self.checked_events(rows)
    }

    fn checked_events(
        &self,
        mut rows: rusqlite::Rows<'_>,
    ) -> Result<Vec<StoredEvent>, JournalError> {
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.err(e))? {
            out.extend(checked_event(row, self.texts(), &self.damaged));
        }
        Ok(out)
    }

    /// Every stored event from `from_seq` on, in order (tests, tools).
    pub fn events_from(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, JournalError> {
        let sql =
            format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq >= ?1 ORDER BY seq LIMIT ?2");
        let mut st = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query(params![from_seq as i64, limit as i64])
            .map_err(|e| self.err(e))?;
        self.checked_events(rows)
    }

    pub fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<DeadLetter>, JournalError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, sink, seq, reason, time_us, source, event_id, stream, stream_seq, type
                 FROM dead_letters WHERE (?1 IS NULL OR sink = ?1) ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([sink], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    sink: r.get(1)?,
                    seq: r.get::<_, i64>(2)?.max(0) as u64,
                    reason: r.get(3)?,
                    time_us: r.get(4)?,
                    source: r.get(5)?,
                    event_id: r.get(6)?,
                    stream: r.get(7)?,
                    stream_seq: r.get::<_, i64>(8)?.max(0) as u64,
                    event_type: r.get(9)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    pub fn dead_letter_count(&self, sink: &str) -> Result<u64, JournalError> {
        self.conn
            .prepare_cached("SELECT count(*) FROM dead_letters WHERE sink = ?1")
            .and_then(|mut st| st.query_row([sink], |r| r.get::<_, i64>(0)))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.err(e))
    }

    pub fn gaps(&self) -> Result<Vec<GapRecord>, JournalError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT source, stream, first_stream_seq, last_stream_seq, count, class, reason, time_us
                 FROM gaps ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(GapRecord {
                    source: r.get(0)?,
                    stream: r.get(1)?,
                    first_stream_seq: r.get::<_, i64>(2)?.max(0) as u64,
                    last_stream_seq: r.get::<_, i64>(3)?.max(0) as u64,
                    count: r.get::<_, i64>(4)?.max(0) as u64,
                    class: Class::from_i64(r.get(5)?),
                    reason: r.get(6)?,
                    time_us: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    fn meta(&self, key: &str) -> Result<Option<i64>, JournalError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Full statistics; counts rows, so it costs a scan: for the CLI, not
    /// for a hot path.
    pub fn stats(&self) -> Result<JournalStats, JournalError> {
        let e = |e| sqlite_err(&self.path, e);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        let count = |sql: &str| -> Result<u64, JournalError> {
            tx.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(e)
        };
        let events = count("SELECT count(*) FROM events")?;
        // The table trails the rows by up to a minute (`streams_due`): the
        // streams only the newer rows have count too.
        let streams = count(&format!("SELECT count(*) FROM ({STREAM_HEADS})"))?;
        let gaps = count("SELECT count(*) FROM gaps")?;
        let dead_letters = count("SELECT count(*) FROM dead_letters")?;
        let first_seq: Option<i64> = tx
            .query_row("SELECT min(seq) FROM events", [], |r| r.get(0))
            .map_err(e)?;
        let pages: i64 = tx
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(e)?;
        let free: i64 = tx
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .map_err(e)?;
        let page_size: i64 = tx
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(e)?;
        let cursors = {
            let mut st = tx
                .prepare("SELECT sink, seq FROM cursors ORDER BY sink")
                .map_err(e)?;
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
                })
                .map_err(e)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(e)?
        };
        drop(tx);
        // Each sink's own cursor first (for a sink with lanes, the lower of
        // theirs), then the lanes' rows as they are.
        let mut sinks: Vec<&str> = Vec::new();
        for (k, _) in &cursors {
            let sink = super::lane_of_key(k).map_or(k.as_str(), |(s, _)| s);
            if !sinks.contains(&sink) {
                sinks.push(sink);
            }
        }
        let mut listed = Vec::new();
        for sink in sinks {
            listed.push((sink.to_string(), self.cursor(sink)?));
            listed.extend(
                cursors
                    .iter()
                    .filter(|(k, _)| super::lane_of_key(k).is_some_and(|(s, _)| s == sink))
                    .cloned(),
            );
        }
        let cursors = listed;
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(JournalStats {
            path: self.path.clone(),
            schema_version: SCHEMA_VERSION,
            file_bytes: std::fs::metadata(&self.path).map_or(0, |m| m.len()),
            wal_bytes: std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len()),
            used_bytes: ((pages - free).max(0) * page_size) as u64,
            page_size: page_size.max(0) as u64,
            events,
            first_seq: first_seq.map(|s| s.max(0) as u64),
            last_seq: self.head_seq()?,
            streams,
            duplicates: self.meta("duplicates")?.unwrap_or(0).max(0) as u64,
            evicted_telemetry: self.meta("evicted_telemetry")?.unwrap_or(0).max(0) as u64,
            evicted_critical: self.meta("evicted_critical")?.unwrap_or(0).max(0) as u64,
            gaps,
            dead_letters,
            retention_through: self.meta("retention_through")?.unwrap_or(0).max(0) as u64,
            quarantined_at_us: self.meta("quarantined_at_us")?,
            cursors,
        })
    }
}
