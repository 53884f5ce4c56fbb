//! From an OPC UA data value to a journal event: typed JSON values, the
//! `state_map` name, timestamps as RFC 3339, and the deterministic event id.
//!
//! Pure functions; no I/O. The rules are the user contract written in the
//! module docs of [`super`].

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use opcua::types::{DataValue, DateTime, StatusCode, Variant};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::config::{OpcuaNodeConfig, OpcuaSourceConfig};
use crate::event::{Class, NewEvent};
use crate::units::rfc3339_us;

/// CloudEvents `type` of every event of this source.
pub const DATA_CHANGE_EVENT_TYPE: &str = "plantrelay.opcua.data_change";

/// 100 ns ticks between 1601-01-01 (the OPC UA epoch) and 1970-01-01.
const TICKS_TO_UNIX: i64 = 116_444_736_000_000_000;

/// What the mapper needs of one configured node.
#[derive(Debug, Clone)]
pub struct NodeMeta {
    /// The node id as configured (`nsu=` kept: it is stable, an index is not).
    pub node_id: String,
    pub stream: String,
    pub state_map: Option<std::collections::BTreeMap<i64, String>>,
}

impl NodeMeta {
    pub fn new(cfg: &OpcuaNodeConfig) -> NodeMeta {
        NodeMeta {
            node_id: cfg.node_id.clone(),
            stream: cfg.stream.clone(),
            state_map: cfg.state_map.clone(),
        }
    }
}

/// Maps data values of one source's nodes to events.
#[derive(Debug, Clone)]
pub struct Mapper {
    source: String,
    class: Class,
}

impl Mapper {
    pub fn new(cfg: &OpcuaSourceConfig) -> Mapper {
        Mapper {
            source: cfg.name.clone(),
            class: cfg.class,
        }
    }

    /// The event for one data value of `node`. `display_name` is the node's
    /// DisplayName as read from the server (the node id when unknown);
    /// `resync` marks values read for the snapshot after a (re)connect.
    pub fn map(
        &self,
        node: &NodeMeta,
        display_name: &str,
        dv: &DataValue,
        resync: bool,
    ) -> NewEvent {
        let value = dv.value.as_ref().map_or(Value::Null, variant_json);
        // Serialised once: the same text goes into the id and into `data`.
        let value = match serde_json::value::to_raw_value(&value) {
            Ok(raw) => raw,
            // A `Value` always serialises (its map keys are strings); keep
            // the event rather than drop it should that ever change.
            Err(_) => RawValue::NULL.to_owned(),
        };
        let status = dv.status.unwrap_or(StatusCode::Good);
        let source_ts = dv.source_timestamp.as_ref().and_then(rfc3339);
        let server_ts = dv.server_timestamp.as_ref().and_then(rfc3339);
        let status_code = status_name(status);
        // Field order is alphabetical, as the JSON object of earlier versions
        // had it, so `data` of the same change is byte-for-byte the same.
        let data = Data {
            display_name,
            node_id: &node.node_id,
            resync,
            server_timestamp: server_ts.as_deref(),
            source_timestamp: source_ts.as_deref(),
            state: state_name(node, dv.value.as_ref()),
            status_code: &status_code,
            value: &value,
        };
        let data = match serde_json::to_vec(&data) {
            Ok(bytes) => bytes,
            // Strings, a bool and an already valid JSON text: cannot fail.
            Err(_) => b"null".to_vec(),
        };
        // The id stands for the change itself: the same value at the same
        // source time is the same event, whether it came as a notification,
        // a republished notification, or the resync read of it.
        let stamp = source_ts.as_deref().or(server_ts.as_deref()).unwrap_or("");
        let id = id_of_json(
            &self.source,
            &node.node_id,
            stamp,
            value.get().as_bytes(),
            status,
        );
        NewEvent {
            source: self.source.clone(),
            id,
            stream: node.stream.clone(),
            class: self.class,
            event_type: DATA_CHANGE_EVENT_TYPE.to_owned(),
            source_time: source_ts.or(server_ts),
            data,
            attrs: None,
        }
    }
}

/// The `data` of a data-change event, written without an intermediate map.
#[derive(Serialize)]
struct Data<'a> {
    display_name: &'a str,
    node_id: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    resync: bool,
    server_timestamp: Option<&'a str>,
    source_timestamp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    status_code: &'a str,
    value: &'a RawValue,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `opcua-` and the hex SHA-256 (first 16 bytes) of source, node, source
/// timestamp, value and status, each field length-prefixed.
pub fn event_id(
    source: &str,
    node_id: &str,
    stamp: &str,
    value: &Value,
    status: StatusCode,
) -> String {
    id_of_json(source, node_id, stamp, value.to_string().as_bytes(), status)
}

/// [`event_id`] of a value already serialised as compact JSON.
fn id_of_json(
    source: &str,
    node_id: &str,
    stamp: &str,
    value: &[u8],
    status: StatusCode,
) -> String {
    fn field(ctx: &mut ring::digest::Context, tag: u8, bytes: &[u8]) {
        ctx.update(&[tag]);
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"plantrelay.opcua.id.v1\0");
    field(&mut ctx, b's', source.as_bytes());
    field(&mut ctx, b'n', node_id.as_bytes());
    field(&mut ctx, b't', stamp.as_bytes());
    field(&mut ctx, b'v', value);
    field(&mut ctx, b'c', &status.bits().to_be_bytes());
    let digest = ctx.finish();
    let mut out = String::with_capacity(6 + 32);
    out.push_str("opcua-");
    for &b in &digest.as_ref()[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// The status code's symbolic name (`Good`, `BadNodeIdUnknown`, …).
pub fn status_name(status: StatusCode) -> Cow<'static, str> {
    // Nearly every value is Good; spare it the formatter.
    if status == StatusCode::Good {
        Cow::Borrowed("Good")
    } else {
        Cow::Owned(status.to_string())
    }
}

/// The `state_map` name of an integer value, if the node has a map and the
/// value is in it.
fn state_name<'a>(node: &'a NodeMeta, value: Option<&Variant>) -> Option<&'a str> {
    let map = node.state_map.as_ref()?;
    let key = match value? {
        Variant::SByte(v) => i64::from(*v),
        Variant::Byte(v) => i64::from(*v),
        Variant::Int16(v) => i64::from(*v),
        Variant::UInt16(v) => i64::from(*v),
        Variant::Int32(v) => i64::from(*v),
        Variant::UInt32(v) => i64::from(*v),
        Variant::Int64(v) => *v,
        Variant::UInt64(v) => i64::try_from(*v).ok()?,
        Variant::Boolean(v) => i64::from(*v),
        _ => return None,
    };
    map.get(&key).map(String::as_str)
}

/// RFC 3339 with microseconds, UTC; `None` for the null (min) time.
pub fn rfc3339(t: &DateTime) -> Option<String> {
    let ticks = t.ticks();
    if ticks <= 0 {
        return None;
    }
    Some(rfc3339_us((ticks - TICKS_TO_UNIX) / 10))
}

/// A variant as typed JSON: numbers as numbers (64-bit integers exactly),
/// strings, booleans, arrays, DateTime as RFC 3339; byte strings as base64;
/// structured values by their text form.
pub fn variant_json(v: &Variant) -> Value {
    match v {
        Variant::Empty => Value::Null,
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(n) => json!(n),
        Variant::Byte(n) => json!(n),
        Variant::Int16(n) => json!(n),
        Variant::UInt16(n) => json!(n),
        Variant::Int32(n) => json!(n),
        Variant::UInt32(n) => json!(n),
        Variant::Int64(n) => json!(n),
        Variant::UInt64(n) => json!(n),
        // NaN and infinities have no JSON number: they become null.
        Variant::Float(f) => json!(f64::from(*f)),
        Variant::Double(f) => json!(f),
        Variant::String(s) => s.value().as_ref().map_or(Value::Null, |s| json!(s)),
        Variant::DateTime(t) => rfc3339(t).map_or(Value::Null, Value::String),
        Variant::Guid(g) => Value::String(g.to_string()),
        Variant::StatusCode(s) => Value::String(status_name(*s).into_owned()),
        Variant::ByteString(b) => b
            .value
            .as_ref()
            .map_or(Value::Null, |b| Value::String(BASE64.encode(b))),
        Variant::LocalizedText(t) => Value::String(t.text.to_string()),
        Variant::QualifiedName(q) => Value::String(q.name.to_string()),
        Variant::NodeId(n) => Value::String(n.to_string()),
        Variant::ExpandedNodeId(n) => Value::String(n.to_string()),
        Variant::Variant(inner) => variant_json(inner),
        Variant::DataValue(dv) => dv.value.as_ref().map_or(Value::Null, variant_json),
        Variant::Array(a) => Value::Array(a.values.iter().map(variant_json).collect()),
        other => Value::String(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::UAString;

    fn node(map: Option<&[(i64, &str)]>) -> NodeMeta {
        NodeMeta {
            node_id: "nsu=urn:press;s=State".into(),
            stream: "line/press".into(),
            state_map: map.map(|m| m.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()),
        }
    }

    fn mapper() -> Mapper {
        Mapper {
            source: "press".into(),
            class: Class::Telemetry,
        }
    }

    fn dv(v: Variant, ts: DateTime) -> DataValue {
        DataValue {
            value: Some(v),
            status: Some(StatusCode::Good),
            source_timestamp: Some(ts),
            server_timestamp: Some(ts),
            ..Default::default()
        }
    }

    #[test]
    fn values_keep_their_json_types_and_states_are_named() {
        let ts = DateTime::now();
        let m = mapper();
        let n = node(Some(&[(0, "STOPPED"), (1, "RUNNING")]));
        let e = m.map(&n, "State", &dv(Variant::Int32(1), ts), false);
        let data: Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(data["value"], json!(1));
        assert_eq!(data["state"], json!("RUNNING"));
        assert_eq!(data["status_code"], json!("Good"));
        assert!(data.get("resync").is_none());
        assert_eq!(e.event_type, DATA_CHANGE_EVENT_TYPE);
        let e = m.map(&n, "State", &dv(Variant::Int32(7), ts), true);
        let data: Value = serde_json::from_slice(&e.data).unwrap();
        assert!(data.get("state").is_none());
        assert_eq!(data["resync"], json!(true));
        // The exact text, keys in order: a stored change reads the same
        // whatever version of the agent journaled it.
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z").unwrap();
        let e = m.map(&n, "Temp \"A\"", &dv(Variant::Double(21.5), t), true);
        assert_eq!(
            String::from_utf8(e.data).unwrap(),
            concat!(
                r#"{"display_name":"Temp \"A\"","node_id":"nsu=urn:press;s=State","resync":true,"#,
                r#""server_timestamp":"2026-01-02T03:04:05.123456Z","#,
                r#""source_timestamp":"2026-01-02T03:04:05.123456Z","#,
                r#""status_code":"Good","value":21.5}"#
            )
        );
        assert_eq!(
            e.id,
            event_id(
                "press",
                "nsu=urn:press;s=State",
                "2026-01-02T03:04:05.123456Z",
                &json!(21.5),
                StatusCode::Good
            )
        );
        assert_eq!(variant_json(&Variant::UInt64(u64::MAX)), json!(u64::MAX));
        assert_eq!(variant_json(&Variant::Double(21.5)), json!(21.5));
        assert_eq!(variant_json(&Variant::Boolean(true)), json!(true));
        assert_eq!(
            variant_json(&Variant::String(UAString::from("x"))),
            json!("x")
        );
        let arr = Variant::from(vec![1i32, 2, 3]);
        assert_eq!(variant_json(&arr), json!([1, 2, 3]));
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z").unwrap();
        assert_eq!(
            variant_json(&Variant::DateTime(Box::new(t))),
            json!("2026-01-02T03:04:05.123456Z")
        );
    }

    #[test]
    fn ids_are_the_same_for_the_same_change_and_differ_otherwise() {
        let ts = DateTime::now();
        let m = mapper();
        let n = node(None);
        let a = m.map(&n, "State", &dv(Variant::Int32(1), ts), false);
        let b = m.map(&n, "other name", &dv(Variant::Int32(1), ts), true);
        assert_eq!(
            a.id, b.id,
            "a resync read of the same change is a duplicate"
        );
        let c = m.map(&n, "State", &dv(Variant::Int32(2), ts), false);
        assert_ne!(a.id, c.id);
        let later = DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").unwrap();
        let d = m.map(&n, "State", &dv(Variant::Int32(1), later), false);
        assert_ne!(a.id, d.id);
        assert!(a.id.starts_with("opcua-") && a.id.len() == 38, "{}", a.id);
    }
}
