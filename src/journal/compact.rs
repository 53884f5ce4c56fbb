//! The stored form of three text columns of an event row (schema 5 and
//! 6): `type`, `source_time` and `attrs` hold values that the sources write
//! again and again (the MQTT source's type, its arrival time, its
//! attributes that repeat the topic; an MES's few event types and its
//! `originsource`), and every byte a row saves is flash not written: a
//! table leaf holds more rows, so fewer commits grow the table by a page
//! (BENCHMARKS.md, plant rates). Such a value is stored as a short BLOB and
//! read back as the very same text; anything else is stored as text, as
//! before.
//!
//! A form is chosen only when it decodes to the identical string (each
//! encoder checks that), so a value off the pattern in any way (another
//! escaping, another precision, a time zone) stays text. A BLOB in these
//! columns is always one of the forms below: nothing else binds a BLOB to
//! them. A tag this release does not know reads as a damaged row.
//!
//! Types and attributes that repeat and have no fixed form get an id in
//! table `texts` (schema 6, [`TextTable`]): the row holds the id. The
//! writer gives ids only inside the transaction that first uses them, so
//! a row never names an id that is not committed with it, and never
//! changes or deletes an entry. Readers look ids up once per connection
//! ([`TextCache`]).
//!
//! Must never: change what a tag or a `texts` id means (rows are read by
//! every later release), or encode a type that SQL compares as text (the
//! gap type, see `writer::cursors` and `writer::load`).

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hashbrown::{HashMap, HashSet};
use rusqlite::types::{FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, ToSql};
use tracing::info;

use crate::event::GAP_EVENT_TYPE;
use crate::units::if_formattable;

/// Tag of a known type: the next byte indexes [`KNOWN_TYPES`].
const TAG_TYPE: u8 = 1;
/// Tag of a time: 8 bytes, big-endian microseconds since the epoch, read
/// as RFC 3339 in UTC with six decimals (`2026-12-06T14:11:00.123456Z`).
const TAG_TIME_US: u8 = 2;
/// Tag of the MQTT source's attributes of a message on a topic equal to
/// the row's stream, without `mqttretained` and with JSON data:
/// `{"mqtttopic":<stream>,"datacontenttype":"application/json"}`.
const TAG_MQTT_ATTRS: u8 = 3;
/// Tag of a text stored once in table `texts` (schema 6): the bytes after
/// it are its id, big-endian, 1 to 4 of them.
const TAG_TEXT: u8 = 4;
/// Tag of a time with three decimals (`2026-11-29T10:00:00.123Z`, the
/// precision most MES and JavaScript clocks give): milliseconds since the
/// epoch, big-endian, 1 to 8 bytes.
const TAG_TIME_MS: u8 = 5;
/// Tag of a time in whole seconds (`2026-11-29T10:00:00Z`): seconds since
/// the epoch, big-endian, 1 to 8 bytes.
const TAG_TIME_S: u8 = 6;

/// The types with a short form. Append only: an index, once written,
/// means its type for good.
const KNOWN_TYPES: [&str; 4] = [
    "plantrelay.mqtt.message",
    "plantrelay.opcua.data_change",
    "plantrelay.http.event",
    "plantrelay.rejected",
];

/// A column value as it is bound: the text, or its short form.
pub(crate) enum Stored<'a> {
    Null,
    Text(&'a str),
    Static(&'static [u8]),
    /// A tag and up to 8 bytes after it: the first `.1` bytes.
    Short([u8; 9], usize),
}

impl ToSql for Stored<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Stored::Null => ValueRef::Null,
            Stored::Text(s) => ValueRef::Text(s.as_bytes()),
            Stored::Static(b) => ValueRef::Blob(b),
            Stored::Short(b, n) => ValueRef::Blob(&b[..*n]),
        }))
    }
}

/// `tag` and `v` in as few big-endian bytes as hold it (at least one).
fn tagged(tag: u8, v: u64) -> Stored<'static> {
    let bytes = v.to_be_bytes();
    let skip = ((v.leading_zeros() / 8) as usize).min(7);
    let mut b = [0u8; 9];
    b[0] = tag;
    let n = 8 - skip;
    b[1..=n].copy_from_slice(&bytes[skip..]);
    Stored::Short(b, n + 1)
}

/// The number after a tag written by [`tagged`] (at most `max` bytes).
fn untagged(rest: &[u8], max: usize) -> Option<u64> {
    if rest.is_empty() || rest.len() > max {
        return None;
    }
    Some(rest.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
}

const TYPE_FORMS: [[u8; 2]; 4] = [[TAG_TYPE, 0], [TAG_TYPE, 1], [TAG_TYPE, 2], [TAG_TYPE, 3]];

/// The fixed short form of a type, if it has one.
fn known_type(t: &str) -> Option<Stored<'static>> {
    KNOWN_TYPES
        .iter()
        .position(|k| *k == t)
        .map(|i| Stored::Static(&TYPE_FORMS[i]))
}

pub(crate) fn store_type(t: &str) -> Stored<'_> {
    known_type(t).unwrap_or(Stored::Text(t))
}

/// The precisions a time may be stored in: tag, length of the text,
/// units per second.
const TIME_FORMS: [(u8, usize, u64); 3] = [
    (TAG_TIME_US, 27, 1_000_000),
    (TAG_TIME_MS, 24, 1_000),
    (TAG_TIME_S, 20, 1),
];

pub(crate) fn store_time(t: Option<&str>) -> Stored<'_> {
    let Some(t) = t else { return Stored::Null };
    // The shapes of the formats before the parse and the format that decide.
    let Some(&(tag, _, per_s)) = TIME_FORMS
        .iter()
        .find(|(_, len, _)| t.len() == *len && t.ends_with('Z'))
    else {
        return Stored::Text(t);
    };
    let Ok(at) = humantime::parse_rfc3339(t) else {
        return Stored::Text(t);
    };
    let Ok(since) = at.duration_since(UNIX_EPOCH) else {
        return Stored::Text(t);
    };
    let units = since.as_micros() / u128::from(1_000_000 / per_s);
    let Ok(units) = u64::try_from(units) else {
        return Stored::Text(t);
    };
    if format_time(tag, at).as_deref() != Some(t) {
        return Stored::Text(t);
    }
    if tag == TAG_TIME_US {
        // Fixed at 8 bytes, as schema 5 wrote it.
        let mut b = [0u8; 9];
        b[0] = TAG_TIME_US;
        b[1..].copy_from_slice(&units.to_be_bytes());
        return Stored::Short(b, 9);
    }
    tagged(tag, units)
}

/// The MQTT attributes that [`TAG_MQTT_ATTRS`] stands for, on `stream`.
fn mqtt_attrs(stream: &str) -> String {
    // Serialising a string cannot fail.
    let topic = serde_json::to_string(stream).unwrap_or_default();
    format!("{{\"mqtttopic\":{topic},\"datacontenttype\":\"application/json\"}}")
}

/// The fixed short form of attributes, if they have one.
fn known_attrs(a: &str, stream: &str) -> Option<Stored<'static>> {
    const HEAD: &str = "{\"mqtttopic\":";
    const TAIL: &str = ",\"datacontenttype\":\"application/json\"}";
    // Cheap refusals first; the comparison with the full form decides.
    (a.starts_with(HEAD)
        && a.ends_with(TAIL)
        && a.len() >= stream.len() + HEAD.len() + TAIL.len() + 2
        && a == mqtt_attrs(stream))
    .then_some(Stored::Static(&[TAG_MQTT_ATTRS]))
}

pub(crate) fn store_attrs<'a>(attrs: Option<&'a str>, stream: &str) -> Stored<'a> {
    let Some(a) = attrs else { return Stored::Null };
    known_attrs(a, stream).unwrap_or(Stored::Text(a))
}

/// Most entries of table `texts`: past it, values are stored in full.
/// With [`TEXT_MAX_LEN`] it bounds the writer's map and every reader's
/// cache (about 1 MiB at worst).
pub(crate) const MAX_TEXTS: usize = 4096;
/// Values shorter than this save too little for an entry.
const TEXT_MIN_LEN: usize = 8;
/// Values longer than this are stored in full: type and attributes that
/// long are rarely the same twice.
const TEXT_MAX_LEN: usize = 256;
/// Values seen once, remembered until the second sighting gives them an
/// entry; forgotten all at once when full, so that values that never
/// repeat (an order number in the attributes) cannot take the table.
const MAX_SEEN: usize = 1024;

/// The writer's side of table `texts`: which values have an id. Entries
/// are made inside the batch's transaction ([`TextTable::begin`] and
/// [`TextTable::rollback`] follow it), so memory and file always agree.
pub(crate) struct TextTable {
    ids: HashMap<String, u32>,
    seen: HashSet<String>,
    /// Values given an id in the open transaction.
    added: Vec<String>,
    full_logged: bool,
}

impl TextTable {
    /// The table as the file holds it (its first [`MAX_TEXTS`] entries:
    /// rows that name later ones, which only another release could have
    /// made, are still read, by the readers).
    pub(crate) fn load(conn: &Connection) -> rusqlite::Result<TextTable> {
        let mut ids = HashMap::new();
        let mut st = conn.prepare(&format!(
            "SELECT id, value FROM texts ORDER BY id LIMIT {MAX_TEXTS}"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (id, value): (i64, String) = (r.get(0)?, r.get(1)?);
            if let Ok(id) = u32::try_from(id) {
                ids.entry(value).or_insert(id);
            }
        }
        Ok(TextTable {
            ids,
            seen: HashSet::new(),
            added: Vec::new(),
            full_logged: false,
        })
    }

    /// A transaction begins: what it adds is undone by [`TextTable::rollback`].
    pub(crate) fn begin(&mut self) {
        self.added.clear();
    }

    /// The transaction rolled back: its entries are gone from the file.
    pub(crate) fn rollback(&mut self) {
        for v in self.added.drain(..) {
            self.ids.remove(&v);
        }
    }

    /// The stored form of `value`: its id if it has one or gets one now
    /// (on its second sighting, in the open transaction), else the text.
    fn store<'a>(&mut self, conn: &Connection, value: &'a str) -> rusqlite::Result<Stored<'a>> {
        if let Some(&id) = self.ids.get(value) {
            return Ok(tagged(TAG_TEXT, u64::from(id)));
        }
        if value.len() < TEXT_MIN_LEN || value.len() > TEXT_MAX_LEN {
            return Ok(Stored::Text(value));
        }
        if self.ids.len() >= MAX_TEXTS {
            if !self.full_logged {
                self.full_logged = true;
                info!(
                    entries = MAX_TEXTS,
                    "the journal's table of repeated types and attributes is full: new ones are stored in full with every event"
                );
            }
            return Ok(Stored::Text(value));
        }
        if !self.seen.contains(value) {
            if self.seen.len() >= MAX_SEEN {
                self.seen.clear();
            }
            self.seen.insert(value.to_owned());
            return Ok(Stored::Text(value));
        }
        // The id SQLite gives (the highest plus one), not one counted here:
        // an entry a failed commit may have left in the file keeps its id.
        let id: i64 = conn
            .prepare_cached("INSERT INTO texts(value) VALUES (?1) RETURNING id")?
            .query_row([value], |r| r.get(0))?;
        let Ok(id) = u32::try_from(id) else {
            // Only a file written by something else gets here.
            return Ok(Stored::Text(value));
        };
        self.seen.remove(value);
        self.ids.insert(value.to_owned(), id);
        self.added.push(value.to_owned());
        Ok(tagged(TAG_TEXT, u64::from(id)))
    }

    pub(crate) fn store_type<'a>(
        &mut self,
        conn: &Connection,
        t: &'a str,
    ) -> rusqlite::Result<Stored<'a>> {
        if let Some(s) = known_type(t) {
            return Ok(s);
        }
        if t == GAP_EVENT_TYPE {
            return Ok(Stored::Text(t));
        }
        self.store(conn, t)
    }

    pub(crate) fn store_attrs<'a>(
        &mut self,
        conn: &Connection,
        attrs: Option<&'a str>,
        stream: &str,
    ) -> rusqlite::Result<Stored<'a>> {
        let Some(a) = attrs else {
            return Ok(Stored::Null);
        };
        if let Some(s) = known_attrs(a, stream) {
            return Ok(s);
        }
        self.store(conn, a)
    }
}

/// A reader's side of table `texts`: the entries its rows named so far.
/// Entries never change, so nothing here goes stale.
#[derive(Default)]
pub(crate) struct TextCache {
    known: RefCell<HashMap<u32, String>>,
}

impl TextCache {
    fn get(&self, conn: &Connection, b: &[u8], what: &str) -> FromSqlResult<String> {
        let id = untagged(&b[1..], 4)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| unknown(what, b))?;
        if let Some(v) = self.known.borrow().get(&id) {
            return Ok(v.clone());
        }
        let found: Option<String> = conn
            .prepare_cached("SELECT value FROM texts WHERE id = ?1")
            .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
            .map_err(|e| {
                FromSqlError::Other(format!("{what}: reading text id {id}: {e}").into())
            })?;
        let v = found.ok_or_else(|| {
            FromSqlError::Other(
                format!("{what}: text id {id} is not in the journal's table of texts").into(),
            )
        })?;
        let mut known = self.known.borrow_mut();
        if known.len() >= 2 * MAX_TEXTS {
            // Only a damaged or foreign file names that many.
            known.clear();
        }
        known.insert(id, v.clone());
        Ok(v)
    }
}

/// What the readers below need to turn a `texts` id into its value.
#[derive(Clone, Copy)]
pub(crate) struct Texts<'a> {
    pub conn: &'a Connection,
    pub cache: &'a TextCache,
}

/// Column `i` of `r`, in its stored form, read by `read` (one of the
/// `read_*` below).
pub(crate) fn column<T>(
    r: &rusqlite::Row<'_>,
    i: usize,
    read: impl FnOnce(ValueRef<'_>) -> FromSqlResult<T>,
) -> rusqlite::Result<T> {
    let v = r.get_ref(i)?;
    let kind = v.data_type();
    read(v).map_err(|e| match e {
        FromSqlError::InvalidType => rusqlite::Error::InvalidColumnType(
            i,
            r.as_ref().column_name(i).unwrap_or("?").to_string(),
            kind,
        ),
        e => rusqlite::Error::FromSqlConversionFailure(i, kind, Box::new(e)),
    })
}

fn unknown(what: &str, b: &[u8]) -> FromSqlError {
    FromSqlError::Other(
        format!(
            "{what}: a stored form this plantrelay does not know (tag {:?}, {} bytes)",
            b.first(),
            b.len()
        )
        .into(),
    )
}

fn text(v: ValueRef<'_>) -> FromSqlResult<String> {
    v.as_str().map(str::to_owned)
}

pub(crate) fn read_type(v: ValueRef<'_>, texts: Texts<'_>) -> FromSqlResult<String> {
    match v {
        ValueRef::Blob(b) => match b {
            [TAG_TYPE, i] => KNOWN_TYPES
                .get(usize::from(*i))
                .map(|t| (*t).to_owned())
                .ok_or_else(|| unknown("type", b)),
            [TAG_TEXT, ..] => texts.cache.get(texts.conn, b, "type"),
            _ => Err(unknown("type", b)),
        },
        v => text(v),
    }
}

pub(crate) fn read_time(v: ValueRef<'_>) -> FromSqlResult<Option<String>> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Blob(b) => {
            let (tag, rest) = b.split_first().ok_or_else(|| unknown("source_time", b))?;
            let Some(&(_, _, per_s)) = TIME_FORMS.iter().find(|(t, _, _)| t == tag) else {
                return Err(unknown("source_time", b));
            };
            // Microseconds as schema 5 wrote them: always 8 bytes.
            let units = if *tag == TAG_TIME_US && rest.len() != 8 {
                None
            } else {
                untagged(rest, 8)
            };
            let at = units
                .and_then(|u| u.checked_mul(1_000_000 / per_s))
                .and_then(|us| UNIX_EPOCH.checked_add(Duration::from_micros(us)))
                .ok_or_else(|| unknown("source_time", b))?;
            // The writer stores only times it parsed, none past 9999; a
            // later one is a damaged row, as an unknown tag is.
            let time = format_time(*tag, at).ok_or_else(|| {
                FromSqlError::Other(
                    format!(
                        "source_time: a stored time past the year 9999 ({} bytes), which no release writes",
                        b.len()
                    )
                    .into(),
                )
            })?;
            Ok(Some(time))
        }
        v => text(v).map(Some),
    }
}

/// `at` in RFC 3339 at the precision of `tag`; `None` outside 1970..=9999,
/// where humantime's formatter fails (past 9999) or panics (before 1970),
/// and `to_string` would turn the failure into a panic too.
fn format_time(tag: u8, at: SystemTime) -> Option<String> {
    let at = if_formattable(at)?;
    Some(match tag {
        TAG_TIME_S => humantime::format_rfc3339_seconds(at).to_string(),
        TAG_TIME_MS => humantime::format_rfc3339_millis(at).to_string(),
        _ => humantime::format_rfc3339_micros(at).to_string(),
    })
}

pub(crate) fn read_attrs(
    v: ValueRef<'_>,
    stream: &str,
    texts: Texts<'_>,
) -> FromSqlResult<Option<String>> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Blob([TAG_MQTT_ATTRS]) => Ok(Some(mqtt_attrs(stream))),
        ValueRef::Blob(b @ [TAG_TEXT, ..]) => texts.cache.get(texts.conn, b, "attrs").map(Some),
        ValueRef::Blob(b) => Err(unknown("attrs", b)),
        v => text(v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::types::Value;

    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE texts (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
            .unwrap();
        c
    }

    /// What `s` binds, as SQLite would hand it back.
    fn value(s: &Stored<'_>) -> Value {
        let ToSqlOutput::Borrowed(v) = s.to_sql().unwrap() else {
            unreachable!()
        };
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Text(t) => Value::Text(String::from_utf8(t.to_vec()).unwrap()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
            _ => unreachable!("the stored forms are text, blobs or null"),
        }
    }

    fn round_type(t: &str) -> (bool, String) {
        let c = conn();
        let cache = TextCache::default();
        let s = store_type(t);
        let short = !matches!(s, Stored::Text(_));
        let texts = Texts {
            conn: &c,
            cache: &cache,
        };
        (short, read_type((&value(&s)).into(), texts).unwrap())
    }

    fn round_time(t: &str) -> (Option<usize>, String) {
        let s = store_time(Some(t));
        let short = match s {
            Stored::Short(_, n) => Some(n),
            _ => None,
        };
        (short, read_time((&value(&s)).into()).unwrap().unwrap())
    }

    fn round_attrs(a: &str, stream: &str) -> (bool, String) {
        let c = conn();
        let cache = TextCache::default();
        let s = store_attrs(Some(a), stream);
        let short = matches!(s, Stored::Static(_));
        let texts = Texts {
            conn: &c,
            cache: &cache,
        };
        (
            short,
            read_attrs((&value(&s)).into(), stream, texts)
                .unwrap()
                .unwrap(),
        )
    }

    #[test]
    fn known_types_are_short_and_read_back_the_same() {
        for t in KNOWN_TYPES {
            assert_eq!(round_type(t), (true, t.to_string()));
        }
        for t in ["plantrelay.gap", "com.example.mes.confirmation", ""] {
            assert_eq!(round_type(t), (false, t.to_string()), "{t}");
        }
    }

    #[test]
    fn only_times_in_an_exact_utc_form_are_short() {
        for (t, len) in [
            ("2026-12-06T14:11:00.123456Z", 9),
            ("1970-01-01T00:00:00.000000Z", 9),
            ("2099-12-31T23:59:59.999999Z", 9),
            ("2026-11-29T10:00:00.123Z", 7),
            ("1970-01-01T00:00:00.000Z", 2),
            ("2026-11-29T10:00:00Z", 5),
            ("2262-04-11T23:47:16Z", 6),
        ] {
            assert_eq!(round_time(t), (Some(len), t.to_string()), "{t}");
        }
        for t in [
            "2026-12-06T14:11:00.1234Z",
            "2026-12-06T14:11:00.12Z",
            "2026-12-06T14:11:00.123456+01:00",
            "2026-12-06T14:11:00+01:00",
            "2026-12-06t14:11:00.123456Z",
            "2026-12-06t14:11:00.123Z",
            "2026-12-06T14:11:00.1234567Z",
            "1969-12-31T23:59:59.999999Z",
            "1969-12-31T23:59:59.999Z",
            "not a time at all, 27 bytesZ",
            "not a time, 24 bytes...Z",
            "twenty bytes, not aZ",
        ] {
            assert_eq!(round_time(t), (None, t.to_string()), "{t}");
        }
    }

    #[test]
    fn mqtt_attributes_on_the_stream_are_short_and_anything_else_is_text() {
        let topic = "plant/line1/press\"07\"/state";
        let full = mqtt_attrs(topic);
        assert_eq!(round_attrs(&full, topic), (true, full.clone()));
        assert!(full.contains(r#""mqtttopic":"plant/line1/press\"07\"/state""#));
        for (a, stream) in [
            // Another stream than the topic (a stream template).
            (full.as_str(), "press07"),
            (
                r#"{"mqtttopic":"a/b","mqttretained":true,"datacontenttype":"application/json"}"#,
                "a/b",
            ),
            (
                r#"{"mqtttopic":"a/b","datacontenttype":"application/octet-stream"}"#,
                "a/b",
            ),
            (
                r#"{"mqtttopic": "a/b","datacontenttype":"application/json"}"#,
                "a/b",
            ),
            (r#"{"originsource":"urn:mes"}"#, "a/b"),
        ] {
            assert_eq!(round_attrs(a, stream), (false, a.to_string()), "{a}");
        }
    }

    /// `v` stored through `table` in a transaction of its own that
    /// commits: its form, and what a reader makes of it.
    fn through(c: &Connection, table: &mut TextTable, v: &str) -> (bool, String) {
        table.begin();
        c.execute_batch("BEGIN").unwrap();
        let s = table.store_type(c, v).unwrap();
        c.execute_batch("COMMIT").unwrap();
        let short = matches!(s, Stored::Short(..));
        let cache = TextCache::default();
        let texts = Texts {
            conn: c,
            cache: &cache,
        };
        (short, read_type((&value(&s)).into(), texts).unwrap())
    }

    #[test]
    fn a_value_gets_an_entry_on_its_second_sighting_and_keeps_it() {
        let c = conn();
        let mut table = TextTable::load(&c).unwrap();
        let t = "com.example.mes.confirmation";
        assert_eq!(through(&c, &mut table, t), (false, t.to_string()));
        assert_eq!(through(&c, &mut table, t), (true, t.to_string()));
        assert_eq!(through(&c, &mut table, t), (true, t.to_string()));
        // Too short, too long, the gap type: never.
        for v in ["seven!!", &"x".repeat(TEXT_MAX_LEN + 1), GAP_EVENT_TYPE] {
            assert_eq!(through(&c, &mut table, v), (false, v.to_string()));
            assert_eq!(through(&c, &mut table, v), (false, v.to_string()));
        }
        // What another writer finds in the file: the same entry.
        let mut again = TextTable::load(&c).unwrap();
        assert_eq!(through(&c, &mut again, t), (true, t.to_string()));
        let n: i64 = c
            .query_row("SELECT count(*) FROM texts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_rolled_back_entry_is_forgotten_and_made_again() {
        let c = conn();
        let mut table = TextTable::load(&c).unwrap();
        let t = "com.example.mes.started";
        through(&c, &mut table, t);
        table.begin();
        c.execute_batch("BEGIN").unwrap();
        let s = table.store_type(&c, t).unwrap();
        assert!(matches!(s, Stored::Short(..)));
        c.execute_batch("ROLLBACK").unwrap();
        table.rollback();
        let n: i64 = c
            .query_row("SELECT count(*) FROM texts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        // Counted from the start again: text once, then the entry anew,
        // which a reader finds.
        assert_eq!(through(&c, &mut table, t), (false, t.to_string()));
        assert_eq!(through(&c, &mut table, t), (true, t.to_string()));
    }

    #[test]
    fn the_table_stops_at_its_limit_and_values_that_never_repeat_take_no_entry() {
        let c = conn();
        let mut table = TextTable::load(&c).unwrap();
        c.execute_batch("BEGIN").unwrap();
        for i in 0..3 * MAX_SEEN {
            // An order number in the attributes: never twice.
            let v = format!(r#"{{"order":"{i:08}"}}"#);
            assert!(matches!(table.store(&c, &v).unwrap(), Stored::Text(_)));
        }
        assert!(table.seen.len() <= MAX_SEEN);
        for i in 0..MAX_TEXTS + 10 {
            let v = format!("com.example.type.{i:05}");
            table.store(&c, &v).unwrap();
            let s = table.store(&c, &v).unwrap();
            assert_eq!(matches!(s, Stored::Short(..)), i < MAX_TEXTS, "{i}");
        }
        c.execute_batch("COMMIT").unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM texts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, MAX_TEXTS as i64);
        // Ids past one byte read back too.
        let cache = TextCache::default();
        let texts = Texts {
            conn: &c,
            cache: &cache,
        };
        let last = table.store(&c, "com.example.type.04095").unwrap();
        assert_eq!(
            read_type((&value(&last)).into(), texts).unwrap(),
            "com.example.type.04095"
        );
    }

    #[test]
    fn an_unknown_form_is_an_error_not_a_value() {
        let c = conn();
        let cache = TextCache::default();
        let texts = Texts {
            conn: &c,
            cache: &cache,
        };
        assert!(read_type(ValueRef::Blob(&[TAG_TYPE, 200]), texts).is_err());
        assert!(read_type(ValueRef::Blob(&[9]), texts).is_err());
        assert!(read_type(ValueRef::Blob(&[TAG_TEXT]), texts).is_err());
        assert!(read_type(ValueRef::Blob(&[TAG_TEXT, 1]), texts).is_err());
        assert!(read_type(ValueRef::Blob(&[TAG_TEXT, 1, 2, 3, 4, 5]), texts).is_err());
        assert!(read_time(ValueRef::Blob(&[TAG_TIME_US, 1, 2])).is_err());
        assert!(read_time(ValueRef::Blob(&[TAG_TIME_MS])).is_err());
        assert!(read_time(ValueRef::Blob(&[TAG_TIME_S, 1, 2, 3, 4, 5, 6, 7, 8, 9])).is_err());
        assert!(
            read_time(ValueRef::Blob(&[
                TAG_TIME_S, 255, 255, 255, 255, 255, 255, 255, 255
            ]))
            .is_err()
        );
        assert!(read_time(ValueRef::Blob(&[])).is_err());
        assert!(read_attrs(ValueRef::Blob(&[TAG_MQTT_ATTRS, 0]), "s", texts).is_err());
        assert!(read_attrs(ValueRef::Blob(&[TAG_TEXT, 7]), "s", texts).is_err());
    }

    /// Every blob a damaged page can hand the readers, by tag and length
    /// (the forms are at most 9 bytes; longer ones reach every length
    /// check): each reads as a value or an error, never a panic, and a
    /// time that reads is one the writer could have stored.
    #[test]
    fn no_blob_in_these_columns_makes_a_reader_panic() {
        use rand::{Rng, SeedableRng};
        let c = conn();
        c.execute("INSERT INTO texts (id, value) VALUES (1, 'kept')", [])
            .unwrap();
        let cache = TextCache::default();
        let texts = Texts {
            conn: &c,
            cache: &cache,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut read = 0;
        for tag in 0..=u8::MAX {
            for len in 0..=12 {
                let mut patterns = vec![vec![0x00; len], vec![0xff; len], vec![0x7f; len]];
                patterns.extend((0..16).map(|_| (0..len).map(|_| rng.random()).collect()));
                for mut rest in patterns {
                    rest.insert(0, tag);
                    let b = ValueRef::Blob(&rest);
                    let _ = read_type(b, texts);
                    let _ = read_attrs(b, "line1", texts);
                    if let Ok(Some(t)) = read_time(b) {
                        assert!(humantime::parse_rfc3339(&t).is_ok(), "{rest:?} read as {t}");
                        read += 1;
                    }
                }
            }
        }
        assert!(read > 0, "some times read");
    }

    /// A damaged byte can make a stored time one that RFC 3339 cannot
    /// write: it must read as a damaged value, not end the process.
    #[test]
    fn a_stored_time_past_the_year_9999_is_an_error_not_a_panic() {
        let last_s = 253_402_300_799_u64;
        let last_ms = last_s * 1_000 + 999;
        let last_us = last_ms * 1_000 + 999;
        let read = |b: Stored<'_>| read_time((&value(&b)).into());
        let us = |v: u64| {
            let mut b = [0u8; 9];
            b[0] = TAG_TIME_US;
            b[1..].copy_from_slice(&v.to_be_bytes());
            Stored::Short(b, 9)
        };
        assert_eq!(
            read(us(last_us)).unwrap().as_deref(),
            Some("9999-12-31T23:59:59.999999Z")
        );
        assert_eq!(
            read(tagged(TAG_TIME_MS, last_ms)).unwrap().as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(
            read(tagged(TAG_TIME_S, last_s)).unwrap().as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
        for (b, what) in [
            (us(last_us + 1), "µs"),
            (us(u64::MAX >> 1), "µs, far"),
            (tagged(TAG_TIME_MS, last_ms + 1), "ms"),
            (tagged(TAG_TIME_MS, u64::MAX / 1_000), "ms, far"),
            (tagged(TAG_TIME_S, last_s + 1), "s"),
        ] {
            let e = read(b).expect_err(what).to_string();
            assert!(e.contains("past the year 9999"), "{what}: {e}");
        }
        // The latest time the writer stores short reads back the same.
        let latest = "9999-12-31T23:59:59.999999Z";
        assert_eq!(round_time(latest), (Some(9), latest.to_string()));
    }
}
