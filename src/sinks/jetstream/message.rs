//! An event as a NATS message: the subject (the `subject` template, every
//! token made valid) and the CloudEvents binary binding (`ce-*` headers,
//! `Nats-Msg-Id`, the content type, the data as the body). Pure functions;
//! they must never fail on an event (what no header can carry is dropped,
//! what no subject token can hold is replaced).

use std::fmt::Write as _;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, HeaderName, Subject};
use bytes::Bytes;

use crate::event::StoredEvent;

/// One part of a parsed subject template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Literal text, `{agent}` already in it.
    Lit(String),
    Source,
    Stream,
}

/// The `subject` template with `{agent}` filled in, rendered per event.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

impl SubjectTemplate {
    /// Parses a template validated by the config (`{agent}`, `{source}`,
    /// `{stream}`, no wildcards, no empty tokens). An unknown or unclosed
    /// placeholder is kept as literal text rather than failing.
    pub fn new(template: &str, agent_id: &str) -> SubjectTemplate {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                lit.push_str(&rest[open..]);
                rest = "";
                break;
            };
            match &after[..close] {
                "agent" => push_token(&mut lit, agent_id),
                "source" | "stream" => {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(if &after[..close] == "source" {
                        Part::Source
                    } else {
                        Part::Stream
                    });
                }
                _ => lit.push_str(&rest[open..open + close + 2]),
            }
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        SubjectTemplate { parts }
    }

    /// The subject of an event from `source` on `stream`: `{source}` is one
    /// token, `{stream}` one token per `/`-separated level.
    pub fn render(&self, source: &str, stream: &str) -> String {
        let mut out = String::with_capacity(64 + source.len() + stream.len());
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Source => push_token(&mut out, source),
                Part::Stream => {
                    for (i, level) in stream.split('/').enumerate() {
                        if i > 0 {
                            out.push('.');
                        }
                        push_token(&mut out, level);
                    }
                }
            }
        }
        out
    }

    /// The subjects a stream created for this sink captures: the template
    /// itself without `{source}` and `{stream}`, else its complete literal
    /// tokens before the first of them followed by `>`
    /// (`plantrelay.gw-01.{stream}` → `plantrelay.gw-01.>`). None when the
    /// first token is already variable (it would capture everything).
    pub fn capture(&self) -> Option<String> {
        let mut prefix = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => prefix.push_str(s),
                Part::Source | Part::Stream => {
                    let dot = prefix.rfind('.')?;
                    prefix.truncate(dot + 1);
                    prefix.push('>');
                    return Some(prefix);
                }
            }
        }
        Some(prefix)
    }
}

/// Appends `text` as (part of) one subject token: characters a token cannot
/// hold (spaces and other control characters, `.`, `*`, `>`) become `_`,
/// and an empty value becomes `_` so that no token is empty.
fn push_token(out: &mut String, text: &str) {
    if text.is_empty() {
        out.push('_');
        return;
    }
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>') {
            out.push('_');
        } else {
            out.push(c);
        }
    }
}

/// NATS subject matching: `*` matches one token, a final `>` one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A header value in the CloudEvents NATS binding: characters outside
/// printable ASCII, space, `"` and `%` percent-encoded (UTF-8 bytes).
pub(super) fn header_value(v: String) -> String {
    let safe = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if v.bytes().all(safe) {
        return v;
    }
    let mut out = String::with_capacity(v.len() + 16);
    for b in v.bytes() {
        if safe(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const CE_ID: HeaderName = HeaderName::from_static("ce-id");
const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
const CE_SUBJECT: HeaderName = HeaderName::from_static("ce-subject");
const CE_TIME: HeaderName = HeaderName::from_static("ce-time");
const CE_SEQUENCE: HeaderName = HeaderName::from_static("ce-sequence");
const CE_STREAMSEQUENCE: HeaderName = HeaderName::from_static("ce-streamsequence");
const CE_DELIVERYCLASS: HeaderName = HeaderName::from_static("ce-deliveryclass");
const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");

/// One event in its wire form, built by [`Sink::encode`](crate::sinks::Sink::encode).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub(super) subject: Subject,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

impl Outgoing {
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Subject, headers and body, to publish it yourself (benchmarks).
    pub fn into_parts(self) -> (Subject, HeaderMap, Bytes) {
        (self.subject, self.headers, self.payload)
    }
}

/// Builds the message of one event (see the module docs).
pub fn outgoing(template: &SubjectTemplate, agent_id: &str, e: &StoredEvent) -> Outgoing {
    let (attrs, payload) = e.binary_mode(agent_id);
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, e.id.as_str());
    let mut content_type = None;
    for (name, value) in attrs {
        let header = match name.as_str() {
            "specversion" => CE_SPECVERSION,
            "id" => CE_ID,
            "source" => CE_SOURCE,
            "type" => CE_TYPE,
            "subject" => CE_SUBJECT,
            "time" => CE_TIME,
            "sequence" => CE_SEQUENCE,
            "streamsequence" => CE_STREAMSEQUENCE,
            "deliveryclass" => CE_DELIVERYCLASS,
            // The binding's content type is the message's, not a `ce-`
            // attribute.
            "datacontenttype" => {
                content_type = Some(value);
                continue;
            }
            other => match format!("ce-{other}").parse::<HeaderName>() {
                Ok(h) => h,
                // A name no header can carry (`:`, non-ASCII): dropped
                // rather than failing the event.
                Err(_) => continue,
            },
        };
        headers.insert(header, header_value(value));
    }
    // Binary data (`data_base64`) has no type unless the source gave one.
    let binary = e
        .attrs
        .as_deref()
        .is_some_and(|a| a.contains("\"data_base64\""));
    match content_type {
        Some(ct) => headers.insert(CONTENT_TYPE, ct),
        None if !binary => headers.insert(CONTENT_TYPE, "application/json"),
        None => {}
    }
    Outgoing {
        subject: Subject::from(template.render(&e.source, &e.stream)),
        headers,
        payload: Bytes::from(payload),
    }
}
