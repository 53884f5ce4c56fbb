//! Reading a request body into events: the content type's format (one
//! CloudEvent, a batch, NDJSON, or `application/json` either way) and a
//! streaming parser that enforces the count limits while it reads.
//!
//! It owns the limits on what one body may make the agent build
//! (`max_events_per_request`, `max_attributes`; `max_depth` is checked in
//! [`super::mapping`]) and which event an error names. It must never build
//! more than the limits allow before it stops, and never return part of a
//! body: the first bad event rejects all of it.

use std::borrow::Cow;
use std::fmt;

use axum::http::{HeaderMap, StatusCode, header};
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::answer::{MAX_REASON, Reject};
use super::mapping::to_new_event;
use super::trace::TraceContext;
use super::{ACCEPTED_CONTENT_TYPES, Limits};
use crate::event::{Class, NewEvent};
use crate::text::{QUOTE_MAX, escape_control};

/// What the body holds, by content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One CloudEvent object.
    Single,
    /// A JSON array of CloudEvents.
    Batch,
    /// One CloudEvent per non-empty line.
    Ndjson,
    /// `application/json`: an object or an array.
    Json,
}

pub(crate) fn body_format(headers: &HeaderMap) -> Result<Format, Reject> {
    let unsupported = |given: &str| Reject {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        kind: "unsupported content type",
        message: format!(
            "unsupported content type {given}; send one of: {}",
            ACCEPTED_CONTENT_TYPES.join(", ")
        ),
        index: None,
        errors: None,
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("(none)"));
    };
    let Ok(text) = value.to_str() else {
        return Err(unsupported("(not ASCII)"));
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    let lower = essence.to_ascii_lowercase();
    match lower.as_str() {
        "application/cloudevents+json" => Ok(Format::Single),
        "application/cloudevents-batch+json" => Ok(Format::Batch),
        "application/x-ndjson" | "application/ndjson" => Ok(Format::Ndjson),
        "application/json" => Ok(Format::Json),
        _ => Err(unsupported(&format!(
            "\"{}\"",
            escape_control(essence, QUOTE_MAX)
        ))),
    }
}

/// One CloudEvent as sent: its attributes in order, values as raw JSON,
/// borrowed from the request body (a name is copied only when it holds an
/// escape sequence).
pub(super) struct RawEvent<'a>(pub(super) Vec<(Cow<'a, str>, &'a RawValue)>);

/// An attribute name, borrowed from the body when it can be.
struct AttrName<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for AttrName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AttrName<'de>, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = AttrName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attribute name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(AttrName(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(AttrName(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(AttrName(Cow::Owned(v)))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// Why the parser stopped before the end of the body: a count limit was
/// reached. Recorded beside the serde error it raises, which then becomes
/// the limit's own answer rather than "malformed JSON".
enum Stop {
    /// More than `max_events_per_request` events.
    Events,
    /// An event with more than `max_attributes` attributes; the first name
    /// past the limit.
    Attributes(String),
    /// An event of a batch broke a rule (see [`to_new_event`]).
    Invalid(String),
}

/// What the parser of one body shares: the limits, and why it stopped.
struct ParseState<'l> {
    limits: &'l Limits,
    trace: Option<&'l TraceContext>,
    source: &'l str,
    class: Class,
    /// The element of a batch being parsed, so that an error can name it.
    at: std::cell::Cell<Option<usize>>,
    stop: std::cell::Cell<Option<Stop>>,
}

impl ParseState<'_> {
    /// Turns a serde error into an answer: the limit that stopped the parser,
    /// or the syntax error (which may quote the body: escaped and bounded).
    fn reject(&self, e: &serde_json::Error, what: &str, index: Option<usize>) -> Reject {
        match self.stop.take() {
            Some(Stop::Events) => Reject::too_many_events(self.limits.max_events_per_request),
            Some(Stop::Invalid(message)) => Reject::bad_request(message, index),
            Some(Stop::Attributes(name)) => Reject::bad_request(
                format!(
                    "event has more than {} attributes (max_attributes); the first one past \
                     the limit is \"{}\"",
                    self.limits.max_attributes,
                    escape_control(&name, QUOTE_MAX)
                ),
                index,
            ),
            None => Reject::bad_request(
                format!("{what}: {}", escape_control(&e.to_string(), MAX_REASON / 2)),
                index,
            ),
        }
    }
}

/// One CloudEvent, parsed with the attribute limit: it stops at the first
/// attribute past `max_attributes`, before storing it.
struct EventSeed<'s, 'l> {
    state: &'s ParseState<'l>,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_> {
    type Value = RawEvent<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawEvent<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, '_> {
    type Value = RawEvent<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvent (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEvent<'de>, A::Error> {
        let max = self.state.limits.max_attributes;
        let mut attrs = Vec::with_capacity(8);
        while let Some(AttrName(key)) = map.next_key::<AttrName<'de>>()? {
            if attrs.len() == max {
                self.state
                    .stop
                    .set(Some(Stop::Attributes(key.into_owned())));
                return Err(serde::de::Error::custom("too many attributes"));
            }
            let value: &'de RawValue = map.next_value()?;
            attrs.push((key, value));
        }
        Ok(RawEvent(attrs))
    }
}

/// A JSON array of CloudEvents, mapped one by one as they are parsed (so
/// that only one event's attribute list exists at a time). Records which
/// element it is parsing, so that an error can name the event, and stops at
/// the first event past `max_events_per_request`, before mapping it.
struct BatchSeed<'s, 'l> {
    state: &'s ParseState<'l>,
}

impl<'de> DeserializeSeed<'de> for BatchSeed<'_, '_> {
    type Value = Vec<NewEvent>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<NewEvent>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_, '_> {
    type Value = Vec<NewEvent>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of CloudEvents")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<NewEvent>, A::Error> {
        let state = self.state;
        let max = state.limits.max_events_per_request;
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        loop {
            state.at.set(Some(events.len()));
            match seq.next_element_seed(EventSeed { state })? {
                Some(_) if events.len() == max => {
                    state.stop.set(Some(Stop::Events));
                    return Err(serde::de::Error::custom("too many events"));
                }
                Some(raw) => {
                    match to_new_event(raw, state.source, state.class, state.limits, state.trace) {
                        Ok(event) => events.push(event),
                        Err(message) => {
                            state.stop.set(Some(Stop::Invalid(message)));
                            return Err(serde::de::Error::custom("invalid event"));
                        }
                    }
                }
                None => break,
            }
        }
        state.at.set(None);
        Ok(events)
    }
}

fn no_events() -> Reject {
    Reject::bad_request("no events", None)
}

/// Parses and validates a whole body; the first problem rejects all of it.
///
/// The count limits are enforced while parsing (the parser stops at the
/// first event or attribute past them, so a body of a million tiny events
/// costs no more than one at the limit), the depth limit on each value's
/// raw text before anything of it is built.
pub(crate) fn parse_events(
    body: &[u8],
    format: Format,
    source: &str,
    class: Class,
    limits: &Limits,
    trace: Option<&TraceContext>,
) -> Result<Vec<NewEvent>, Reject> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let trimmed = body.trim_ascii_start();
    if trimmed.is_empty() {
        return Err(no_events());
    }
    let format = match format {
        Format::Json if trimmed.first() == Some(&b'[') => Format::Batch,
        Format::Json => Format::Single,
        other => other,
    };
    let state = ParseState {
        limits,
        trace,
        source,
        class,
        at: std::cell::Cell::new(None),
        stop: std::cell::Cell::new(None),
    };
    let mut events = Vec::new();
    match format {
        Format::Single | Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let raw = EventSeed { state: &state }
                .deserialize(&mut de)
                .and_then(|raw| de.end().map(|()| raw))
                .map_err(|e| state.reject(&e, "malformed JSON", Some(0)))?;
            events.push(
                to_new_event(raw, source, class, limits, trace)
                    .map_err(|m| Reject::bad_request(m, Some(0)))?,
            );
        }
        Format::Batch => {
            let mut de = serde_json::Deserializer::from_slice(body);
            events = BatchSeed { state: &state }
                .deserialize(&mut de)
                .and_then(|events| de.end().map(|()| events))
                .map_err(|e| {
                    let at = state.at.get();
                    state.reject(&e, "malformed JSON", at)
                })?;
            if events.is_empty() {
                return Err(no_events());
            }
        }
        Format::Ndjson => {
            for (i, line) in body.split(|b| *b == b'\n').enumerate() {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                if events.len() == limits.max_events_per_request {
                    return Err(Reject::too_many_events(limits.max_events_per_request));
                }
                let mut de = serde_json::Deserializer::from_slice(line);
                let raw = EventSeed { state: &state }
                    .deserialize(&mut de)
                    .and_then(|raw| de.end().map(|()| raw))
                    .map_err(|e| {
                        state.reject(&e, &format!("malformed JSON on line {}", i + 1), Some(i))
                    })?;
                events.push(
                    to_new_event(raw, source, class, limits, trace)
                        .map_err(|m| Reject::bad_request(m, Some(i)))?,
                );
            }
            if events.is_empty() {
                return Err(no_events());
            }
        }
    }
    Ok(events)
}
