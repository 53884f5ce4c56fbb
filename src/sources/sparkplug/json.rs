//! From decoded protobuf to the JSON document (see the module docs of
//! [`super`]): metric names and datatypes resolved through the births,
//! signed types sign-corrected, bytes as base64, data sets, templates,
//! metadata and property sets. Pure functions; they must never fail (a
//! value they cannot map is `null`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use super::Decoded;
use super::aliases::NodeDefs;
use super::proto;
use super::proto::payload::{DataSet, MetaData, Metric, PropertySet, PropertyValue, Template};

/// Sparkplug B data type names, indexed by their number.
const DATATYPES: [&str; 22] = [
    "Unknown",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Float",
    "Double",
    "Boolean",
    "String",
    "DateTime",
    "Text",
    "UUID",
    "DataSet",
    "Bytes",
    "File",
    "Template",
    "PropertySet",
    "PropertySetList",
];

const INT8: u32 = 1;
pub(super) const INT16: u32 = 2;
pub(super) const INT32: u32 = 3;
const INT64: u32 = 4;
/// A host application's STATE message: JSON in Sparkplug 3.0, the plain
/// text `ONLINE`/`OFFLINE` before it.
pub(super) fn decode_state(host: &str, payload: &[u8]) -> Decoded {
    let state = serde_json::from_slice::<Value>(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
    Decoded {
        stream: format!("STATE/{host}"),
        id: None,
        timestamp_ms: None,
        data: json!({"host_id": host, "state": state}),
    }
}

fn datatype_name(dt: u32) -> Value {
    DATATYPES
        .get(dt as usize)
        .map_or_else(|| json!(dt), |name| json!(name))
}

fn float_json(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// A 32-bit value as its Sparkplug datatype says: sign-corrected for the
/// signed types.
fn int_json(v: u32, dt: Option<u32>) -> Value {
    match dt {
        Some(INT8) => json!(v as i8),
        Some(INT16) => json!(v as i16),
        Some(INT32) => json!(v as i32),
        _ => json!(v),
    }
}

fn long_json(v: u64, dt: Option<u32>) -> Value {
    match dt {
        Some(INT64) => json!(v as i64),
        _ => json!(v),
    }
}

pub(super) fn metric_json(m: &Metric, defs: Option<&NodeDefs>) -> Value {
    let by_alias = m.alias.and_then(|a| defs.and_then(|d| d.by_alias.get(&a)));
    let name = m
        .name
        .clone()
        .or_else(|| by_alias.map(|d| d.name.to_string()));
    let datatype = m
        .datatype
        .or_else(|| by_alias.and_then(|d| d.datatype))
        .or_else(|| {
            name.as_ref()
                .and_then(|n| defs.and_then(|d| d.datatype_by_name.get(n.as_str()).copied()))
        });

    let mut out = Map::new();
    out.insert("name".into(), name.map_or(Value::Null, Value::String));
    if let Some(alias) = m.alias {
        out.insert("alias".into(), json!(alias));
    }
    if let Some(ts) = m.timestamp {
        out.insert("timestamp".into(), json!(ts));
    }
    if let Some(dt) = datatype {
        out.insert("datatype".into(), datatype_name(dt));
    }
    let value = if m.is_null == Some(true) {
        Value::Null
    } else {
        metric_value(m.value.as_ref(), datatype)
    };
    out.insert("value".into(), value);
    if m.is_historical == Some(true) {
        out.insert("is_historical".into(), Value::Bool(true));
    }
    if m.is_transient == Some(true) {
        out.insert("is_transient".into(), Value::Bool(true));
    }
    if let Some(md) = &m.metadata {
        out.insert("metadata".into(), metadata_json(md));
    }
    if let Some(ps) = &m.properties {
        out.insert("properties".into(), property_set_json(ps));
    }
    Value::Object(out)
}

fn metric_value(v: Option<&proto::payload::metric::Value>, dt: Option<u32>) -> Value {
    use proto::payload::metric::Value as V;
    match v {
        None | Some(V::ExtensionValue(_)) => Value::Null,
        Some(V::IntValue(i)) => int_json(*i, dt),
        Some(V::LongValue(l)) => long_json(*l, dt),
        Some(V::FloatValue(f)) => float_json(f64::from(*f)),
        Some(V::DoubleValue(d)) => float_json(*d),
        Some(V::BooleanValue(b)) => Value::Bool(*b),
        Some(V::StringValue(s)) => Value::String(s.clone()),
        Some(V::BytesValue(b)) => Value::String(BASE64.encode(b)),
        Some(V::DatasetValue(ds)) => dataset_json(ds),
        Some(V::TemplateValue(t)) => template_json(t),
    }
}

fn dataset_json(ds: &DataSet) -> Value {
    use proto::payload::data_set::data_set_value::Value as V;
    let rows: Vec<Value> = ds
        .rows
        .iter()
        .map(|row| {
            Value::Array(
                row.elements
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let dt = ds.types.get(i).copied();
                        match &e.value {
                            None | Some(V::ExtensionValue(_)) => Value::Null,
                            Some(V::IntValue(v)) => int_json(*v, dt),
                            Some(V::LongValue(v)) => long_json(*v, dt),
                            Some(V::FloatValue(v)) => float_json(f64::from(*v)),
                            Some(V::DoubleValue(v)) => float_json(*v),
                            Some(V::BooleanValue(v)) => Value::Bool(*v),
                            Some(V::StringValue(v)) => Value::String(v.clone()),
                        }
                    })
                    .collect(),
            )
        })
        .collect();
    json!({
        "columns": ds.columns,
        "types": ds.types.iter().map(|t| datatype_name(*t)).collect::<Vec<_>>(),
        "rows": rows,
    })
}

fn template_json(t: &Template) -> Value {
    use proto::payload::template::parameter::Value as V;
    let parameters: Vec<Value> = t
        .parameters
        .iter()
        .map(|p| {
            let dt = p.r#type;
            let value = match &p.value {
                None | Some(V::ExtensionValue(_)) => Value::Null,
                Some(V::IntValue(v)) => int_json(*v, dt),
                Some(V::LongValue(v)) => long_json(*v, dt),
                Some(V::FloatValue(v)) => float_json(f64::from(*v)),
                Some(V::DoubleValue(v)) => float_json(*v),
                Some(V::BooleanValue(v)) => Value::Bool(*v),
                Some(V::StringValue(v)) => Value::String(v.clone()),
            };
            json!({
                "name": p.name,
                "type": dt.map(datatype_name),
                "value": value,
            })
        })
        .collect();
    // Template members are named in full; they have no alias table.
    let metrics: Vec<Value> = t.metrics.iter().map(|m| metric_json(m, None)).collect();
    json!({
        "template_ref": t.template_ref,
        "version": t.version,
        "is_definition": t.is_definition.unwrap_or(false),
        "parameters": parameters,
        "metrics": metrics,
    })
}

fn metadata_json(md: &MetaData) -> Value {
    let mut out = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(k.into(), v);
        }
    };
    put("is_multi_part", md.is_multi_part.map(Value::Bool));
    put("content_type", md.content_type.clone().map(Value::String));
    put("size", md.size.map(|v| json!(v)));
    put("seq", md.seq.map(|v| json!(v)));
    put("file_name", md.file_name.clone().map(Value::String));
    put("file_type", md.file_type.clone().map(Value::String));
    put("md5", md.md5.clone().map(Value::String));
    put("description", md.description.clone().map(Value::String));
    Value::Object(out)
}

fn property_set_json(ps: &PropertySet) -> Value {
    let mut out = Map::new();
    for (k, v) in ps.keys.iter().zip(&ps.values) {
        out.insert(k.clone(), property_value_json(v));
    }
    Value::Object(out)
}

fn property_value_json(v: &PropertyValue) -> Value {
    use proto::payload::property_value::Value as V;
    if v.is_null == Some(true) {
        return Value::Null;
    }
    let dt = v.r#type;
    match &v.value {
        None | Some(V::ExtensionValue(_)) => Value::Null,
        Some(V::IntValue(i)) => int_json(*i, dt),
        Some(V::LongValue(l)) => long_json(*l, dt),
        Some(V::FloatValue(f)) => float_json(f64::from(*f)),
        Some(V::DoubleValue(d)) => float_json(*d),
        Some(V::BooleanValue(b)) => Value::Bool(*b),
        Some(V::StringValue(s)) => Value::String(s.clone()),
        Some(V::PropertysetValue(ps)) => property_set_json(ps),
        Some(V::PropertysetsValue(list)) => {
            Value::Array(list.propertyset.iter().map(property_set_json).collect())
        }
    }
}
