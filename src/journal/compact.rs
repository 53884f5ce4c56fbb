//! The stored form of three text columns of an event row (schema 5):
//! `type`, `source_time` and `attrs` hold values that the sources write
//! again and again (the MQTT source's type, its arrival time, its
//! attributes that repeat the topic), and every byte a row saves is flash
//! not written: a table leaf holds more rows, so fewer commits grow the
//! table by a page (BENCHMARKS.md, plant rates). Such a value is stored as
//! a short BLOB and read back as the very same text; anything else is
//! stored as text, as before.
//!
//! A form is chosen only when it decodes to the identical string (each
//! encoder checks that), so a value off the pattern in any way (another
//! escaping, another precision, a time zone) stays text. A BLOB in these
//! columns is always one of the forms below: nothing else binds a BLOB to
//! them. A tag this release does not know reads as a damaged row.
//!
//! Must never: change what a tag means (rows are read by every later
//! release), or encode a type that SQL compares as text (the gap type, see
//! `writer::cursors` and `writer::load`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::ToSql;
use rusqlite::types::{FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};

/// Tag of a known type: the next byte indexes [`KNOWN_TYPES`].
const TAG_TYPE: u8 = 1;
/// Tag of a time: 8 bytes, big-endian microseconds since the epoch, read
/// as RFC 3339 in UTC with six decimals (`2026-12-06T14:11:00.123456Z`).
const TAG_TIME_US: u8 = 2;
/// Tag of the MQTT source's attributes of a message on a topic equal to
/// the row's stream, without `mqttretained` and with JSON data:
/// `{"mqtttopic":<stream>,"datacontenttype":"application/json"}`.
const TAG_MQTT_ATTRS: u8 = 3;

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
    Time([u8; 9]),
}

impl ToSql for Stored<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Stored::Null => ValueRef::Null,
            Stored::Text(s) => ValueRef::Text(s.as_bytes()),
            Stored::Static(b) => ValueRef::Blob(b),
            Stored::Time(b) => ValueRef::Blob(b),
        }))
    }
}

const TYPE_FORMS: [[u8; 2]; 4] = [[TAG_TYPE, 0], [TAG_TYPE, 1], [TAG_TYPE, 2], [TAG_TYPE, 3]];

pub(crate) fn store_type(t: &str) -> Stored<'_> {
    match KNOWN_TYPES.iter().position(|k| *k == t) {
        Some(i) => Stored::Static(&TYPE_FORMS[i]),
        None => Stored::Text(t),
    }
}

pub(crate) fn store_time(t: Option<&str>) -> Stored<'_> {
    let Some(t) = t else { return Stored::Null };
    // The shape of format_rfc3339_micros before the parse and the format
    // that decide.
    if t.len() != 27 || !t.ends_with('Z') {
        return Stored::Text(t);
    }
    let Ok(at) = humantime::parse_rfc3339(t) else {
        return Stored::Text(t);
    };
    let Ok(since) = at.duration_since(UNIX_EPOCH) else {
        return Stored::Text(t);
    };
    let Ok(us) = u64::try_from(since.as_micros()) else {
        return Stored::Text(t);
    };
    if format_time(at) != t {
        return Stored::Text(t);
    }
    let mut b = [0u8; 9];
    b[0] = TAG_TIME_US;
    b[1..].copy_from_slice(&us.to_be_bytes());
    Stored::Time(b)
}

/// The MQTT attributes that [`TAG_MQTT_ATTRS`] stands for, on `stream`.
fn mqtt_attrs(stream: &str) -> String {
    // Serialising a string cannot fail.
    let topic = serde_json::to_string(stream).unwrap_or_default();
    format!("{{\"mqtttopic\":{topic},\"datacontenttype\":\"application/json\"}}")
}

pub(crate) fn store_attrs<'a>(attrs: Option<&'a str>, stream: &str) -> Stored<'a> {
    const HEAD: &str = "{\"mqtttopic\":";
    const TAIL: &str = ",\"datacontenttype\":\"application/json\"}";
    let Some(a) = attrs else { return Stored::Null };
    // Cheap refusals first; the comparison with the full form decides.
    if a.starts_with(HEAD)
        && a.ends_with(TAIL)
        && a.len() >= stream.len() + HEAD.len() + TAIL.len() + 2
        && a == mqtt_attrs(stream)
    {
        return Stored::Static(&[TAG_MQTT_ATTRS]);
    }
    Stored::Text(a)
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

pub(crate) fn read_type(v: ValueRef<'_>) -> FromSqlResult<String> {
    match v {
        ValueRef::Blob(b) => match b {
            [TAG_TYPE, i] => KNOWN_TYPES
                .get(usize::from(*i))
                .map(|t| (*t).to_owned())
                .ok_or_else(|| unknown("type", b)),
            _ => Err(unknown("type", b)),
        },
        v => text(v),
    }
}

pub(crate) fn read_time(v: ValueRef<'_>) -> FromSqlResult<Option<String>> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Blob(b) => match b {
            [TAG_TIME_US, rest @ ..] => {
                let us: [u8; 8] = rest.try_into().map_err(|_| unknown("source_time", b))?;
                let at = UNIX_EPOCH
                    .checked_add(Duration::from_micros(u64::from_be_bytes(us)))
                    .ok_or_else(|| unknown("source_time", b))?;
                Ok(Some(format_time(at)))
            }
            _ => Err(unknown("source_time", b)),
        },
        v => text(v).map(Some),
    }
}

fn format_time(at: SystemTime) -> String {
    humantime::format_rfc3339_micros(at).to_string()
}

pub(crate) fn read_attrs(v: ValueRef<'_>, stream: &str) -> FromSqlResult<Option<String>> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Blob([TAG_MQTT_ATTRS]) => Ok(Some(mqtt_attrs(stream))),
        ValueRef::Blob(b) => Err(unknown("attrs", b)),
        v => text(v).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_type(t: &str) -> (bool, String) {
        let s = store_type(t);
        let short = !matches!(s, Stored::Text(_));
        let out = s.to_sql().unwrap();
        let ToSqlOutput::Borrowed(v) = out else {
            unreachable!()
        };
        (short, read_type(v).unwrap())
    }

    fn round_time(t: &str) -> (bool, String) {
        let s = store_time(Some(t));
        let short = matches!(s, Stored::Time(_));
        let out = s.to_sql().unwrap();
        let ToSqlOutput::Borrowed(v) = out else {
            unreachable!()
        };
        (short, read_time(v).unwrap().unwrap())
    }

    fn round_attrs(a: &str, stream: &str) -> (bool, String) {
        let s = store_attrs(Some(a), stream);
        let short = matches!(s, Stored::Static(_));
        let out = s.to_sql().unwrap();
        let ToSqlOutput::Borrowed(v) = out else {
            unreachable!()
        };
        (short, read_attrs(v, stream).unwrap().unwrap())
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
    fn only_times_in_the_exact_micros_form_are_short() {
        for t in [
            "2026-12-06T14:11:00.123456Z",
            "1970-01-01T00:00:00.000000Z",
            "2099-12-31T23:59:59.999999Z",
        ] {
            assert_eq!(round_time(t), (true, t.to_string()), "{t}");
        }
        for t in [
            "2026-12-06T14:11:00.123Z",
            "2026-12-06T14:11:00.123456+01:00",
            "2026-12-06t14:11:00.123456Z",
            "2026-12-06T14:11:00.1234567Z",
            "1969-12-31T23:59:59.999999Z",
            "not a time at all, 27 bytesZ",
        ] {
            assert_eq!(round_time(t), (false, t.to_string()), "{t}");
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

    #[test]
    fn an_unknown_form_is_an_error_not_a_value() {
        assert!(read_type(ValueRef::Blob(&[TAG_TYPE, 200])).is_err());
        assert!(read_type(ValueRef::Blob(&[9])).is_err());
        assert!(read_time(ValueRef::Blob(&[TAG_TIME_US, 1, 2])).is_err());
        assert!(read_attrs(ValueRef::Blob(&[TAG_MQTT_ATTRS, 0]), "s").is_err());
    }
}
