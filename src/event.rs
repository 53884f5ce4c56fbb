//! The event envelope: what a source hands to the journal ([`NewEvent`]),
//! what the journal hands back to a forwarder ([`StoredEvent`]), and how a
//! stored event is written as a CloudEvents 1.0 JSON object upstream.
//!
//! This module owns the wire shape of an event. It must never touch I/O: it is
//! plain data and serialisation, shared by sources, the journal and sinks.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// CloudEvents `type` of the event announcing a range evicted from a full journal.
pub const GAP_EVENT_TYPE: &str = "plantrelay.gap";

/// Delivery class of an event. Under `when_full = "drop_oldest"` telemetry is
/// evicted before anything critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Business events (confirmations, consumptions, quality results).
    Critical,
    /// Machine states and measurements: the first to go when space runs out.
    Telemetry,
}

impl Class {
    /// The integer stored in the journal's `class` column.
    pub fn as_i64(self) -> i64 {
        match self {
            Class::Critical => 0,
            Class::Telemetry => 1,
        }
    }

    /// The inverse of [`Class::as_i64`]; unknown values read as critical so
    /// that nothing is evicted early by mistake.
    pub fn from_i64(v: i64) -> Class {
        if v == 1 {
            Class::Telemetry
        } else {
            Class::Critical
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::Telemetry => "telemetry",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CloudEvents extension attributes plantrelay assigns to every forwarded
/// event itself: dropped from incoming events, never taken from storage.
pub const RESERVED_ATTRIBUTES: [&str; 3] = ["sequence", "streamsequence", "deliveryclass"];

/// An event as a source hands it to the journal, before it has a `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The configured name of the source (`[[sources.*]] name`). Together with
    /// `id` it is the deduplication key.
    pub source: String,
    /// Source-given or derived event id, stable across redeliveries.
    pub id: String,
    /// The ordering key (CloudEvents `subject`).
    pub stream: String,
    pub class: Class,
    /// CloudEvents `type`.
    pub event_type: String,
    /// Source time as RFC 3339, when the source gave one.
    pub source_time: Option<String>,
    /// The event's `data` as JSON text (any JSON value).
    pub data: Vec<u8>,
    /// Further CloudEvents attributes and extensions to forward unchanged, as
    /// a JSON object text (e.g. `{"datacontenttype":"application/json"}`).
    pub attrs: Option<String>,
}

impl NewEvent {
    /// Bytes this event is accounted for in batch and capacity limits.
    pub fn size(&self) -> usize {
        self.source.len()
            + self.id.len()
            + self.stream.len()
            + self.event_type.len()
            + self.source_time.as_ref().map_or(0, String::len)
            + self.data.len()
            + self.attrs.as_ref().map_or(0, String::len)
    }
}

/// An event read back from the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Journal sequence: gap-free and monotonic over the journal's life.
    pub seq: u64,
    pub source: String,
    pub id: String,
    pub stream: String,
    /// Per `(source, stream)` sequence, gap-free.
    pub stream_seq: u64,
    pub class: Class,
    pub event_type: String,
    pub source_time: Option<String>,
    /// When the agent committed it, microseconds since the Unix epoch
    /// (monotonic over the journal's life).
    pub recv_time_us: i64,
    pub data: Vec<u8>,
    pub attrs: Option<String>,
}

impl StoredEvent {
    pub fn size(&self) -> usize {
        self.source.len()
            + self.id.len()
            + self.stream.len()
            + self.event_type.len()
            + self.source_time.as_ref().map_or(0, String::len)
            + self.data.len()
            + self.attrs.as_ref().map_or(0, String::len)
    }

    /// This event in a CloudEvents binary-mode binding (MQTT 5 user
    /// properties, NATS headers): the attributes as `(name, value)` text
    /// pairs (the context attributes, then the extensions of `attrs`, whose
    /// strings lose their quotes and other values keep their JSON text),
    /// and the payload (`data`, or the bytes of `data_base64`).
    pub fn binary_mode(&self, agent_id: &str) -> (Vec<(String, String)>, Vec<u8>) {
        let mut out = vec![
            ("specversion".to_owned(), "1.0".to_owned()),
            ("id".to_owned(), self.id.clone()),
            (
                "source".to_owned(),
                format!("plantrelay://{agent_id}/{}", self.source),
            ),
            ("type".to_owned(), self.event_type.clone()),
            ("subject".to_owned(), self.stream.clone()),
        ];
        if let Some(t) = &self.source_time {
            out.push(("time".to_owned(), t.clone()));
        }
        out.push(("sequence".to_owned(), self.seq.to_string()));
        out.push(("streamsequence".to_owned(), self.stream_seq.to_string()));
        out.push(("deliveryclass".to_owned(), self.class.as_str().to_owned()));
        let mut payload = None;
        let extra: BTreeMap<String, serde_json::Value> = self
            .attrs
            .as_deref()
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_default();
        let fixed = [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "data",
        ];
        for (name, value) in extra {
            if name == "data_base64" {
                use base64::Engine;
                payload = value
                    .as_str()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
                continue;
            }
            if RESERVED_ATTRIBUTES.contains(&name.as_str()) || fixed.contains(&name.as_str()) {
                continue;
            }
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            out.push((name, text));
        }
        (out, payload.unwrap_or_else(|| self.data.clone()))
    }

    /// Writes this event as one CloudEvents 1.0 JSON object.
    ///
    /// `data` and `attrs` were validated as JSON when the event was
    /// journaled; should a row still hold invalid JSON (a damaged file), the
    /// data is forwarded as a JSON string rather than producing invalid JSON.
    pub fn write_cloudevent(&self, agent_id: &str, out: &mut Vec<u8>) {
        // Borrowed where the stored text is valid JSON (as sources store
        // it), so that the hot path copies nothing but the output.
        let owned_data: Box<RawValue>;
        let data: &RawValue = match serde_json::from_slice::<&RawValue>(&self.data) {
            Ok(raw) => raw,
            Err(_) => {
                let text = String::from_utf8_lossy(&self.data);
                // Serialising a string into a RawValue cannot fail.
                owned_data = serde_json::value::to_raw_value(&text).unwrap_or_default();
                &owned_data
            }
        };
        let owned_extra: Option<BTreeMap<String, Box<RawValue>>>;
        let extra: Option<BTreeMap<&str, &RawValue>> = match self.attrs.as_deref() {
            None => None,
            Some(a) => match serde_json::from_str::<BTreeMap<&str, &RawValue>>(a) {
                Ok(m) => Some(m),
                Err(_) => {
                    // Names with escapes cannot be borrowed.
                    owned_extra = serde_json::from_str(a).ok();
                    owned_extra
                        .as_ref()
                        .map(|m| m.iter().map(|(k, v)| (k.as_str(), &**v)).collect())
                }
            },
        };
        // What plantrelay assigns itself is never taken from stored
        // attributes (a journal written before a name was reserved may hold
        // it): a JSON object with a key twice is read differently upstream.
        let extra = extra.map(|mut m| {
            for name in RESERVED_ATTRIBUTES {
                m.remove(name);
            }
            m
        });
        // Binary data arrives as `data_base64` (kept in attrs) and leaves the
        // same way: CloudEvents allows only one of `data` and `data_base64`.
        let binary = extra
            .as_ref()
            .is_some_and(|m| m.contains_key("data_base64"));
        let ce = CloudEventOut {
            specversion: "1.0",
            id: &self.id,
            source: format!("plantrelay://{agent_id}/{}", self.source),
            event_type: &self.event_type,
            subject: &self.stream,
            time: self.source_time.as_deref(),
            sequence: self.seq,
            streamsequence: self.stream_seq,
            deliveryclass: self.class.as_str(),
            data: (!binary).then_some(data),
            extra,
        };
        // Writing plain strings, numbers and already-valid JSON into a Vec
        // cannot fail.
        let _ = serde_json::to_writer(out, &ce);
    }
}

#[derive(Serialize)]
struct CloudEventOut<'a> {
    specversion: &'static str,
    id: &'a str,
    source: String,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    sequence: u64,
    streamsequence: u64,
    deliveryclass: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    extra: Option<BTreeMap<&'a str, &'a RawValue>>,
}

/// Default for the deepest nesting of arrays and objects accepted in an
/// event's `data` (`max_depth` of an HTTP source; fixed for MQTT JSON).
///
/// Well below serde_json's recursion limit of 128, so that what is accepted
/// can always be parsed again upstream even inside the two levels a
/// CloudEvents batch adds (the array and the event object), and below what
/// recursive parsers elsewhere (Python's `json`, most JSON libraries) accept.
pub const DEFAULT_MAX_DEPTH: usize = 32;

/// Largest `max_depth` an operator may configure: with the two levels of a
/// CloudEvents batch around it, still within serde_json's limit of 128.
pub const MAX_DEPTH_LIMIT: usize = 120;

/// How deeply arrays and objects nest in `json`, the text of one JSON value
/// (already known to be valid JSON): `0` for a scalar, `1` for `[]` or
/// `{"a":1}`, `2` for `[[1]]`.
///
/// One pass over the bytes, without recursion and without building
/// anything, so that a value nested 100,000 deep costs no more than its
/// length and cannot exhaust the stack. Brackets inside strings do not count.
pub fn json_depth(json: &[u8]) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Whether JSON text (already known to be valid JSON) holds a `\uD800`-style
/// escape that is not half of a surrogate pair: a high surrogate not
/// followed by `\uDC00`..`\uDFFF`, or a low one standing alone. serde_json
/// passes such text through a `RawValue` untouched, but it decodes to no
/// Unicode string: strict readers upstream (serde_json into a `String`,
/// among others) refuse the whole batch that carries it, so it must be
/// refused at ingest, before the ack.
///
/// A backslash can only occur inside a string in valid JSON, so every
/// backslash starts an escape and no string tracking is needed.
pub fn json_lone_surrogate(json: &[u8]) -> bool {
    let hex4 = |at: usize| -> Option<u32> {
        let digits = json.get(at..at + 4)?;
        let text = std::str::from_utf8(digits).ok()?;
        u32::from_str_radix(text, 16).ok()
    };
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        if json.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let Some(unit) = hex4(i + 2) else {
            return true;
        };
        i += 6;
        match unit {
            0xD800..=0xDBFF => {
                let low = (json.get(i) == Some(&b'\\') && json.get(i + 1) == Some(&b'u'))
                    .then(|| hex4(i + 2))
                    .flatten();
                match low {
                    Some(0xDC00..=0xDFFF) => i += 6,
                    _ => return true,
                }
            }
            0xDC00..=0xDFFF => return true,
            _ => {}
        }
    }
    false
}

/// RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, with a
/// real calendar date (`T` and `Z` in either case, a leap second allowed).
/// The one check of source-given event times, for every source.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let (Some(year), Some(month), Some(day)) = (num(0, 4), num(5, 2), num(8, 2)) else {
        return false;
    };
    let (Some(hour), Some(minute), Some(second)) = (num(11, 2), num(14, 2), num(17, 2)) else {
        return false;
    };
    if !(at(4, b'-')
        && at(7, b'-')
        && (at(10, b'T') || at(10, b't'))
        && at(13, b':')
        && at(16, b':'))
    {
        return false;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len()
                && at(i + 3, b':')
                && num(i + 1, 2).is_some_and(|h| h <= 23)
                && num(i + 4, 2).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_surrogate_escapes_are_found_and_pairs_are_not() {
        assert!(!json_lone_surrogate(br#"{"a":"plain","b":[1,2]}"#));
        assert!(!json_lone_surrogate(br#""\ud83d\ude00""#));
        assert!(
            !json_lone_surrogate(br#""\\ud800""#),
            "an escaped backslash, then text"
        );
        assert!(!json_lone_surrogate(br#""\u00e9\n\"""#));
        assert!(json_lone_surrogate(br#"{"qt\ud800y":5}"#));
        assert!(json_lone_surrogate(br#""\ud800""#));
        assert!(json_lone_surrogate(br#""\ud800\u0041""#));
        assert!(json_lone_surrogate(br#""\udc00\ud800""#));
        assert!(json_lone_surrogate(br#""x\uDFFF""#));
        assert!(json_lone_surrogate(br#""\ud800\"#), "cut short");
    }

    #[test]
    fn json_depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(b"\"[[{\""), 0);
        assert_eq!(json_depth(b"[]"), 1);
        assert_eq!(json_depth(br#"{"a":[1,{"b":"]]"}],"c":{}}"#), 3);
        assert_eq!(json_depth(br#"["\\",[["\"["]]]"#), 3);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(json_depth(deep.as_bytes()), 100_000);
        // What we accept at the bound parses again, inside a batch.
        let at_bound = format!(
            "[{{\"data\":{}1{}}}]",
            "[".repeat(MAX_DEPTH_LIMIT),
            "]".repeat(MAX_DEPTH_LIMIT)
        );
        assert!(serde_json::from_str::<serde_json::Value>(&at_bound).is_ok());
    }

    #[test]
    fn rfc3339_accepts_offsets_and_fractions_and_rejects_the_rest() {
        for ok in [
            "2026-11-29T10:00:00Z",
            "2026-11-29t10:00:00z",
            "2026-11-29T10:00:00.123456789Z",
            "2026-11-29T11:00:00+01:00",
            "2024-02-29T23:59:60-05:30",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
        for bad in [
            "",
            "yesterday",
            "2026-11-29",
            "2026-11-29 10:00:00Z",
            "2026-11-29T10:00:00",
            "2026-11-29T10:00Z",
            "2025-02-29T10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-11-31T10:00:00Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29T10:00:00.Z",
            "2026-11-29T10:00:00+0100",
            "2026-11-29T10:00:00+01:00x",
            "2026-11-29T10:00:00Zx",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    fn stored() -> StoredEvent {
        StoredEvent {
            seq: 7,
            source: "mes".into(),
            id: "e-1".into(),
            stream: "line3/press07".into(),
            stream_seq: 3,
            class: Class::Critical,
            event_type: "com.example.confirmation".into(),
            source_time: Some("2026-11-29T10:00:00Z".into()),
            recv_time_us: 1,
            data: br#"{"qty":5}"#.to_vec(),
            attrs: Some(r#"{"datacontenttype":"application/json"}"#.into()),
        }
    }

    #[test]
    fn cloudevent_carries_sequence_streamsequence_and_source_uri() {
        let mut out = Vec::new();
        stored().write_cloudevent("gw-1", &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "e-1");
        assert_eq!(v["source"], "plantrelay://gw-1/mes");
        assert_eq!(v["type"], "com.example.confirmation");
        assert_eq!(v["subject"], "line3/press07");
        assert_eq!(v["time"], "2026-11-29T10:00:00Z");
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["streamsequence"], 3);
        assert_eq!(v["deliveryclass"], "critical");
        assert_eq!(v["data"]["qty"], 5);
        assert_eq!(v["datacontenttype"], "application/json");
    }

    #[test]
    fn reserved_attributes_in_storage_never_reach_the_wire_twice() {
        let mut e = stored();
        e.class = Class::Telemetry;
        e.attrs = Some(r#"{"deliveryclass":"critical","sequence":1,"zz":"kept"}"#.into());
        let mut out = Vec::new();
        e.write_cloudevent("gw-1", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("\"deliveryclass\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"sequence\"").count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["deliveryclass"], "telemetry");
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["zz"], "kept");
    }

    #[test]
    fn binary_data_leaves_as_data_base64_without_data() {
        let mut e = stored();
        e.data = b"null".to_vec();
        e.attrs = Some(r#"{"data_base64":"AAEC"}"#.into());
        let mut out = Vec::new();
        e.write_cloudevent("gw-1", &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data_base64"], "AAEC");
        assert!(v.get("data").is_none());
    }

    #[test]
    fn attributes_with_escaped_names_and_spaced_data_are_kept() {
        let mut e = stored();
        e.data = b" {\"qty\": 5} ".to_vec();
        e.attrs = Some(r#"{"x\u0061":"b","dataschema":"urn:s"}"#.into());
        let mut out = Vec::new();
        e.write_cloudevent("gw-1", &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"]["qty"], 5);
        assert_eq!(v["xa"], "b");
        assert_eq!(v["dataschema"], "urn:s");
    }

    #[test]
    fn damaged_data_is_forwarded_as_a_string_not_as_invalid_json() {
        let mut e = stored();
        e.data = b"{not json".to_vec();
        let mut out = Vec::new();
        e.write_cloudevent("gw-1", &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"], "{not json");
    }
}
