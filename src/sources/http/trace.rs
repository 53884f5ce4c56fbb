//! The W3C Trace Context of an ingest request (`traceparent`,
//! `tracestate` headers), checked and kept ready to become attributes of
//! the events that carry no trace context of their own.
//!
//! It owns the header rules (one `traceparent`, lower-case hex, no all-zero
//! ids; `tracestate` bounded, visible ASCII). It must never pass on a
//! malformed header: the request is answered `400` naming the header, and
//! nothing of it is stored.

use axum::http::HeaderMap;
use serde_json::value::RawValue;

use super::answer::Reject;
use crate::text::escape_control;

/// W3C Trace Context of an ingest request (`traceparent`, `tracestate`),
/// checked and kept as JSON strings ready to become event attributes.
#[derive(Debug)]
pub(crate) struct TraceContext {
    pub(super) traceparent: Box<RawValue>,
    pub(super) tracestate: Option<Box<RawValue>>,
}

/// Longest `tracestate` accepted (W3C: 32 members of up to 256 bytes can
/// be cut to 512 by anyone passing them on).
const MAX_TRACESTATE: usize = 512;

impl TraceContext {
    /// The request's trace context; a malformed header is a `400` naming it.
    /// `tracestate` without `traceparent` means nothing and is ignored.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Option<TraceContext>, Reject> {
        let bad = |name: &str, why: String| {
            Reject::bad_request(format!("header {name}: {why}; nothing was stored"), None)
        };
        let mut parents = headers.get_all("traceparent").iter();
        let Some(parent) = parents.next() else {
            return Ok(None);
        };
        if parents.next().is_some() {
            return Err(bad("traceparent", "sent more than once".into()));
        }
        let parent = parent
            .to_str()
            .map_err(|_| bad("traceparent", "not ASCII".into()))?
            .trim();
        check_traceparent(parent).map_err(|why| bad("traceparent", why))?;
        let mut state = String::new();
        // Several tracestate headers are one list (W3C Trace Context §3.3).
        for v in headers.get_all("tracestate") {
            let v = v
                .to_str()
                .map_err(|_| bad("tracestate", "not ASCII".into()))?
                .trim();
            if v.is_empty() {
                continue;
            }
            if !state.is_empty() {
                state.push(',');
            }
            state.push_str(v);
        }
        if state.len() > MAX_TRACESTATE {
            return Err(bad(
                "tracestate",
                format!(
                    "{} bytes; at most {MAX_TRACESTATE} are accepted",
                    state.len()
                ),
            ));
        }
        if state.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(bad("tracestate", "holds a control character".into()));
        }
        let json = |v: &str| {
            // A string of visible ASCII always serialises, and is valid JSON.
            serde_json::to_string(v)
                .ok()
                .and_then(|t| RawValue::from_string(t).ok())
        };
        let Some(traceparent) = json(parent) else {
            return Err(bad("traceparent", "cannot be kept".into()));
        };
        Ok(Some(TraceContext {
            traceparent,
            tracestate: if state.is_empty() { None } else { json(&state) },
        }))
    }
}

/// W3C Trace Context `traceparent`: `version-traceid-parentid-flags`, lower-
/// case hex; version `ff` and all-zero ids are invalid. A later version may
/// append fields after the flags (§3.2.4).
fn check_traceparent(v: &str) -> Result<(), String> {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let expected = "expected version-traceid-parentid-flags \
                    (e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)";
    let quoted = escape_control(v, 80);
    let mut parts = v.splitn(5, '-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("\"{quoted}\" is malformed; {expected}"));
    };
    let rest = parts.next();
    if !hex(version, 2) || version == "ff" {
        return Err(format!("\"{quoted}\" has an invalid version; {expected}"));
    }
    if version == "00" && rest.is_some() {
        return Err(format!(
            "\"{quoted}\" has fields after the flags; {expected}"
        ));
    }
    if !hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
        return Err(format!("\"{quoted}\" has an invalid trace id; {expected}"));
    }
    if !hex(parent, 16) || parent.bytes().all(|b| b == b'0') {
        return Err(format!("\"{quoted}\" has an invalid parent id; {expected}"));
    }
    if !hex(flags, 2) {
        return Err(format!("\"{quoted}\" has invalid flags; {expected}"));
    }
    Ok(())
}
