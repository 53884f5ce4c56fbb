//! How one CloudEvent becomes a [`NewEvent`]: the rules of the module
//! docs of [`super`] (`id`, `specversion`, `subject`, `type`, `time`,
//! `data`/`data_base64`, `source`/`originsource`, dropped and forwarded
//! attributes) and the request's trace context for events without one.
//!
//! It owns those rules and their reasons. It must never forward an
//! attribute it has not checked (scalars only outside `data`, each name
//! once, no lone surrogate), never keep the `sequence`/`streamsequence`
//! a sender set, and never quote a request's text into a reason unescaped
//! or unbounded.

use std::borrow::Cow;
use std::collections::HashSet;

use serde_json::value::RawValue;

use super::parse::RawEvent;
use super::trace::TraceContext;
use super::{DEFAULT_EVENT_TYPE, Limits, MAX_KEY_LEN, RESERVED_ATTRIBUTES};
use crate::event::{Class, NewEvent, is_rfc3339, json_depth, json_lone_surrogate};
use crate::text::{QUOTE_MAX, escape_control};

/// Why an event whose `data` holds a lone surrogate escape is refused.
const LONE_SURROGATE_DATA: &str = "attribute \"data\" holds a \\u escape of half a surrogate \
     pair (e.g. \\ud800 alone), which is no Unicode text; upstream JSON readers would \
     refuse it";

/// An optional string attribute: `null` counts as absent.
fn opt_string(name: &str, raw: &RawValue) -> Result<Option<String>, String> {
    if raw.get() == "null" {
        return Ok(None);
    }
    json_string(raw)
        .map(Some)
        .ok_or_else(|| format!("{name} must be a string"))
}

/// The string a raw JSON value holds, `None` when it is not a string. Most
/// strings hold no escape sequence: their text is the raw value's inside.
fn json_string(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(inner.to_owned()),
        _ => serde_json::from_str::<String>(text).ok(),
    }
}

fn check_len(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{name} must not be empty"));
    }
    if value.len() > MAX_KEY_LEN {
        return Err(format!(
            "{name} is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            value.len()
        ));
    }
    Ok(())
}

/// Attributes up to which `repeated_name` compares every pair rather than
/// hash: a CloudEvent has a handful, and hashing each cost more than the
/// comparisons.
pub(super) const PAIRWISE_NAMES: usize = 16;

/// The first attribute name that appears twice. Hashed (with a keyed hash)
/// past `PAIRWISE_NAMES`, so an event with thousands of attributes costs
/// linear time, not quadratic.
fn repeated_name<'r>(attrs: &'r [(Cow<'_, str>, &RawValue)]) -> Option<&'r str> {
    if attrs.len() <= PAIRWISE_NAMES {
        return attrs.iter().enumerate().find_map(|(i, (name, _))| {
            attrs[..i]
                .iter()
                .any(|(n, _)| n == name)
                .then_some(name.as_ref())
        });
    }
    let mut seen = HashSet::with_capacity(attrs.len());
    attrs
        .iter()
        .map(|(name, _)| name.as_ref())
        .find(|name| !seen.insert(*name))
}

/// Maps one CloudEvent onto a [`NewEvent`] (see the module docs of [`super`]
/// for the rules).
pub(super) fn to_new_event(
    raw: RawEvent<'_>,
    source: &str,
    class: Class,
    limits: &Limits,
    trace: Option<&TraceContext>,
) -> Result<NewEvent, String> {
    if let Some(name) = repeated_name(&raw.0) {
        return Err(format!(
            "attribute \"{}\" appears more than once",
            escape_control(name, QUOTE_MAX)
        ));
    }

    let mut id = None;
    let mut stream = None;
    let mut event_type = None;
    let mut time = None;
    let mut data: Option<&RawValue> = None;
    let mut data_base64 = false;
    let mut origin: Option<&RawValue> = None;
    let mut has_originsource = false;
    let (mut has_traceparent, mut has_tracestate) = (false, false);
    let mut attrs: Vec<(Cow<'_, str>, &RawValue)> = Vec::new();

    for (name, value) in raw.0 {
        match name.as_ref() {
            "id" => {
                if value.get() == "null" {
                    continue;
                }
                let v = json_string(value).ok_or_else(|| "id must be a string".to_string())?;
                check_len("id", &v)?;
                id = Some(v);
            }
            "specversion" => {
                if json_string(value).as_deref() != Some("1.0") {
                    return Err(format!(
                        "unsupported specversion {}; only \"1.0\" is accepted",
                        escape_control(value.get(), QUOTE_MAX)
                    ));
                }
            }
            "subject" => {
                if let Some(v) = opt_string("subject", value)? {
                    check_len("subject", &v)?;
                    stream = Some(v);
                }
            }
            "type" => {
                if let Some(v) = opt_string("type", value)? {
                    check_len("type", &v)?;
                    event_type = Some(v);
                }
            }
            "time" => {
                if let Some(v) = opt_string("time", value)? {
                    if !is_rfc3339(&v) {
                        return Err(format!(
                            "time \"{}\" is not an RFC 3339 timestamp \
                             (e.g. 2026-11-29T10:00:00Z or 2026-11-29T11:00:00.123+01:00)",
                            escape_control(&v, QUOTE_MAX)
                        ));
                    }
                    time = Some(v);
                }
            }
            "data" => {
                let depth = json_depth(value.get().as_bytes());
                if depth > limits.max_depth {
                    return Err(format!(
                        "attribute \"data\" nests arrays and objects {depth} levels deep; \
                         at most {} are allowed (max_depth)",
                        limits.max_depth
                    ));
                }
                if json_lone_surrogate(value.get().as_bytes()) {
                    return Err(LONE_SURROGATE_DATA.to_string());
                }
                data = Some(value);
            }
            "data_base64" => {
                let v =
                    json_string(value).ok_or_else(|| "data_base64 must be a string".to_string())?;
                if !is_base64(&v) {
                    return Err("data_base64 is not valid base64".into());
                }
                data_base64 = true;
                attrs.push((name, value));
            }
            "source" => {
                if value.get() != "null" {
                    check_scalar(&name, value)?;
                    origin = Some(value);
                }
            }
            "originsource" => {
                has_originsource = true;
                check_scalar(&name, value)?;
                attrs.push((name, value));
            }
            n if RESERVED_ATTRIBUTES.contains(&n) => {}
            "traceparent" | "tracestate" if value.get() != "null" => {
                has_traceparent |= name == "traceparent";
                has_tracestate |= name == "tracestate";
                check_scalar(&name, value)?;
                attrs.push((name, value));
            }
            // An absent extension and a null one mean the same.
            _ if value.get() == "null" => {}
            _ => {
                check_scalar(&name, value)?;
                attrs.push((name, value));
            }
        }
    }

    let id = id.ok_or_else(|| "id is required (a non-empty string)".to_string())?;
    if data.is_some() && data_base64 {
        return Err("data and data_base64 are mutually exclusive".into());
    }
    if let Some(origin) = origin {
        if has_originsource {
            return Err(
                "source and originsource are both present; plantrelay keeps the event's own \
                 source as the extension originsource"
                    .into(),
            );
        }
        attrs.push(("originsource".into(), origin));
    }
    // The request's trace context goes to the events that carry none of
    // their own; an event's own is kept whole (its tracestate belongs to its
    // traceparent).
    if let Some(t) = trace
        && !has_traceparent
    {
        attrs.push(("traceparent".into(), &t.traceparent));
        if let (Some(state), false) = (&t.tracestate, has_tracestate) {
            attrs.push(("tracestate".into(), state));
        }
    }
    let data = match data {
        Some(raw) => raw.get().as_bytes().to_vec(),
        None => b"null".to_vec(),
    };
    let attrs = (!attrs.is_empty()).then(|| attrs_json(&attrs));
    Ok(NewEvent {
        source: source.to_string(),
        id,
        stream: stream.unwrap_or_else(|| source.to_string()),
        class,
        event_type: event_type.unwrap_or_else(|| DEFAULT_EVENT_TYPE.to_string()),
        source_time: time,
        data,
        attrs,
    })
}

/// CloudEvents attributes other than `data` are scalars (string, number,
/// boolean): an object or an array there would travel upstream unchecked
/// (and, nested deep enough, fail there as a dead letter hours later).
fn check_scalar(name: &str, value: &RawValue) -> Result<(), String> {
    let kind = match value.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        _ if json_lone_surrogate(value.get().as_bytes()) => {
            return Err(format!(
                "attribute \"{}\" holds a \\u escape of half a surrogate pair, \
                 which is no Unicode text; upstream JSON readers would refuse it",
                escape_control(name, QUOTE_MAX)
            ));
        }
        _ => return Ok(()),
    };
    Err(format!(
        "attribute \"{}\" is {kind}; CloudEvents attributes other than data must be a string, \
         number or boolean",
        escape_control(name, QUOTE_MAX)
    ))
}

/// `{"name":<raw value>,...}` in the given order.
fn attrs_json(attrs: &[(Cow<'_, str>, &RawValue)]) -> String {
    let mut out = String::with_capacity(
        2 + attrs
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>(),
    );
    out.push('{');
    for (i, (name, value)) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Serialising a string cannot fail; fall back to an escaped debug
        // form that is still valid JSON for plain names.
        match serde_json::to_string(name) {
            Ok(key) => out.push_str(&key),
            Err(_) => out.push_str("\"\""),
        }
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    out
}

/// Standard base64 (RFC 4648 §4) with padding; the empty string is valid.
fn is_base64(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return false;
    }
    let body = b
        .strip_suffix(b"==")
        .or_else(|| b.strip_suffix(b"="))
        .unwrap_or(b);
    body.iter()
        .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_check() {
        assert!(is_base64(""));
        assert!(is_base64("aGVsbG8="));
        assert!(is_base64("aGk="));
        assert!(is_base64("aGVs"));
        assert!(!is_base64("aGVsbG8"));
        assert!(!is_base64("a=Vs"));
        assert!(!is_base64("aGV$"));
    }
}
