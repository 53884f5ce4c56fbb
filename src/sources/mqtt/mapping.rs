//! From an MQTT message to a journal event: the stream template, the
//! formats (`json`, `raw`, `sparkplug_b`), event ids, source times, and the
//! rejected records that stand in for bad payloads.
//!
//! Pure functions and one stateful piece (the Sparkplug alias table, see
//! [`crate::sources::sparkplug`]); no I/O. The rules are the user contract
//! written in the module docs of [`super`].
//!
//! Kept as one file: the formats share the [`Mapper`]'s state and helpers
//! and read as one path from message to event; without its tests the file
//! is about 600 lines.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::{MqttFormat, MqttSourceConfig, OnInvalid};
use crate::event::{
    Class, DEFAULT_MAX_DEPTH, NewEvent, is_rfc3339, json_depth, json_lone_surrogate,
};
use crate::schema::{Schema, Schemas};
use crate::sources::sparkplug;

/// CloudEvents `type` of a message whose payload could not be used.
pub const REJECTED_EVENT_TYPE: &str = "plantrelay.rejected";

/// How much of a rejected payload is kept (before base64).
pub const REJECT_KEEP_BYTES: usize = 64 * 1024;

/// Longest event id taken from a payload (`id_pointer`), in bytes.
pub const MAX_ID_LEN: usize = 1024;

pub use crate::mqtt::link::Properties;

/// A message as received, tagged with the connection it came on.
#[derive(Debug, Clone)]
pub struct Message {
    /// Connection generation: an ack is only sent on the connection the
    /// message arrived on.
    pub epoch: u64,
    pub pkid: u16,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    /// The payload; for an over-`max_payload` message only its first
    /// [`REJECT_KEEP_BYTES`] (see `oversize`).
    pub payload: Bytes,
    pub properties: Option<Properties>,
    pub received: SystemTime,
    pub oversize: Option<Oversize>,
}

/// An over-`max_payload` message: its real size and its content id,
/// computed over the whole payload before it was cut.
#[derive(Debug, Clone)]
pub struct Oversize {
    pub size: usize,
    pub id: String,
}

impl Message {
    /// A received message; a payload over `max_payload` is cut to
    /// [`REJECT_KEEP_BYTES`] at once (copied, so the large buffer is freed).
    // Each argument is one field of the broker's delivery; a struct to carry
    // them would only repeat this one.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        epoch: u64,
        pkid: u16,
        qos: u8,
        retain: bool,
        topic: String,
        payload: Bytes,
        properties: Option<Properties>,
        max_payload: u64,
    ) -> Message {
        let (payload, oversize) = if payload.len() as u64 > max_payload {
            let id = content_id(&topic, &payload, properties.as_ref());
            let kept = Bytes::copy_from_slice(&payload[..payload.len().min(REJECT_KEEP_BYTES)]);
            (
                kept,
                Some(Oversize {
                    size: payload.len(),
                    id,
                }),
            )
        } else {
            (payload, None)
        };
        Message {
            epoch,
            pkid,
            qos,
            retain,
            topic,
            payload,
            properties,
            received: SystemTime::now(),
            oversize,
        }
    }
}

/// The event id of a message without a source-given id: `mqtt-` and the
/// first 128 bits (32 hex digits) of a SHA-256 over the topic, the payload
/// and the v5 [`Properties`], each field tagged and length-prefixed (the
/// exact layout is in the code; it is stable: changing it would break
/// deduplication across an upgrade). QoS, retain and dup flags, packet ids
/// and arrival time are **not** in it: a redelivery gets the same id.
pub fn content_id(topic: &str, payload: &[u8], props: Option<&Properties>) -> String {
    fn field(ctx: &mut ring::digest::Context, tag: u8, bytes: &[u8]) {
        ctx.update(&[tag]);
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"plantrelay.mqtt.id.v1\0");
    field(&mut ctx, b't', topic.as_bytes());
    field(&mut ctx, b'p', payload);
    if let Some(p) = props {
        if let Some(f) = p.payload_format_indicator {
            field(&mut ctx, b'f', &[f]);
        }
        if let Some(c) = &p.content_type {
            field(&mut ctx, b'c', c.as_bytes());
        }
        if let Some(r) = &p.response_topic {
            field(&mut ctx, b'r', r.as_bytes());
        }
        if let Some(d) = &p.correlation_data {
            field(&mut ctx, b'd', d);
        }
        for (k, v) in &p.user_properties {
            field(&mut ctx, b'k', k.as_bytes());
            field(&mut ctx, b'v', v.as_bytes());
        }
    }
    let digest = ctx.finish();
    let mut id = String::with_capacity(5 + 32);
    id.push_str("mqtt-");
    for b in &digest.as_ref()[..16] {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// One piece of a stream template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    Level(usize),
}

/// A parsed `stream` template (`{topic}`, `{N}`; validated by the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamTemplate {
    parts: Vec<Part>,
}

impl StreamTemplate {
    pub fn parse(template: &str) -> StreamTemplate {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}').map(|c| open + c) else {
                break;
            };
            let name = &rest[open + 1..close];
            let part = if name == "topic" {
                Some(Part::Topic)
            } else {
                name.parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(Part::Level)
            };
            match part {
                Some(p) => {
                    if open > 0 {
                        parts.push(Part::Literal(rest[..open].to_owned()));
                    }
                    parts.push(p);
                }
                None => parts.push(Part::Literal(rest[..=close].to_owned())),
            }
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        StreamTemplate { parts }
    }

    /// `true` for the default template `{topic}`.
    pub fn is_whole_topic(&self) -> bool {
        self.parts == [Part::Topic]
    }

    /// The stream of a message on `topic`. A level the topic does not have
    /// expands to nothing; an empty result falls back to the topic.
    pub fn render(&self, topic: &str) -> String {
        let mut out = String::with_capacity(topic.len() + 8);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Topic => out.push_str(topic),
                Part::Level(n) => {
                    if let Some(level) = topic.split('/').nth(n - 1) {
                        out.push_str(level);
                    }
                }
            }
        }
        if out.is_empty() {
            topic.to_owned()
        } else {
            out
        }
    }
}

/// What became of one message.
#[derive(Debug)]
pub enum Mapped {
    /// A normal event.
    Event(NewEvent),
    /// A `plantrelay.rejected` record (with the reason).
    Rejected(NewEvent, String),
    /// Dropped (`on_invalid = "drop"`), with the reason.
    Dropped(String),
}

/// Turns messages into events, in arrival order.
#[derive(Debug, Clone)]
pub struct Mapper {
    source: String,
    class: Class,
    event_type: String,
    format: MqttFormat,
    id_pointer: Option<String>,
    time_pointer: Option<String>,
    stream: StreamTemplate,
    max_payload: u64,
    on_invalid: OnInvalid,
    sparkplug: sparkplug::Decoder,
    /// The schema of `event_type`, if it has one (JSON and Sparkplug data).
    schema: Option<Arc<Schema>>,
    /// Messages whose data failed `schema`, since start.
    schema_refusals: u64,
}

impl Mapper {
    pub fn new(cfg: &MqttSourceConfig) -> Mapper {
        Mapper {
            source: cfg.name.clone(),
            class: cfg.class,
            event_type: cfg.event_type.clone(),
            format: cfg.format,
            id_pointer: cfg.id_pointer.clone(),
            time_pointer: cfg.time_pointer.clone(),
            stream: StreamTemplate::parse(&cfg.stream),
            max_payload: cfg.max_payload,
            on_invalid: cfg.on_invalid,
            sparkplug: sparkplug::Decoder::with_limits(cfg.sparkplug_limits()),
            schema: None,
            schema_refusals: 0,
        }
    }

    /// Checks the data of this source's events against `schemas` (the one of
    /// its type, if any); a failing message is invalid (`on_invalid`).
    pub fn with_schemas(mut self, schemas: &Schemas) -> Mapper {
        self.schema = schemas.get_shared(&self.event_type);
        self
    }

    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// Messages refused by the schema since start (retried mappings of the
    /// same batch count again: callers take differences around one pass).
    pub fn schema_refusals(&self) -> u64 {
        self.schema_refusals
    }

    /// The schema check of a mapped event's data.
    fn check_schema(&mut self, data: &[u8]) -> Result<(), String> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        schema.check(data).map_err(|violations| {
            self.schema_refusals += 1;
            let listed: Vec<String> = violations
                .iter()
                .take(3)
                .map(|v| {
                    if v.pointer.is_empty() {
                        v.message.clone()
                    } else {
                        format!("{}: {}", v.pointer, v.message)
                    }
                })
                .collect();
            format!(
                "data fails the schema of type \"{}\": {}",
                self.event_type,
                listed.join("; ")
            )
        })
    }

    /// The state that mapping changes (the Sparkplug alias table), to be
    /// restored before a batch is mapped again.
    pub fn checkpoint(&self) -> Option<sparkplug::Decoder> {
        (self.format == MqttFormat::SparkplugB).then(|| self.sparkplug.clone())
    }

    pub fn restore(&mut self, checkpoint: Option<sparkplug::Decoder>) {
        if let Some(d) = checkpoint {
            self.sparkplug = d;
        }
    }

    pub fn map(&mut self, m: &Message) -> Mapped {
        if let Some(over) = &m.oversize {
            let reason = format!(
                "payload of {} bytes exceeds max_payload ({} bytes)",
                over.size, self.max_payload
            );
            return self.reject(m, over.id.clone(), over.size, reason);
        }
        let result = match self.format {
            MqttFormat::Json => self.map_json(m),
            MqttFormat::Raw => Ok(self.map_raw(m)),
            MqttFormat::SparkplugB => self.map_sparkplug(m),
        };
        let result = match result {
            Ok(e) if self.format != MqttFormat::Raw => self.check_schema(&e.data).map(|()| e),
            other => other,
        };
        match result {
            Ok(e) => Mapped::Event(e),
            Err(reason) => {
                let id = content_id(&m.topic, &m.payload, m.properties.as_ref());
                self.reject(m, id, m.payload.len(), reason)
            }
        }
    }

    fn map_json(&self, m: &Message) -> Result<NewEvent, String> {
        let body = m
            .payload
            .strip_prefix(b"\xef\xbb\xbf")
            .unwrap_or(&m.payload[..]);
        // Checked on the raw text before any parse: a payload nested deeper
        // than upstream parsers accept would pass here and come back hours
        // later as a dead letter.
        let depth = json_depth(body);
        if depth > DEFAULT_MAX_DEPTH {
            return Err(format!(
                "payload nests arrays and objects {depth} levels deep; \
                 at most {DEFAULT_MAX_DEPTH} are accepted"
            ));
        }
        let mut id = None;
        let mut time = None;
        if self.id_pointer.is_none() && self.time_pointer.is_none() {
            serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .map_err(|e| format!("payload is not valid JSON: {e}"))?;
        } else {
            let doc: Value = serde_json::from_slice(body)
                .map_err(|e| format!("payload is not valid JSON: {e}"))?;
            if let Some(ptr) = &self.id_pointer {
                id = Some(id_at(&doc, ptr)?);
            }
            if let Some(ptr) = &self.time_pointer {
                time = time_at(&doc, ptr)?;
            }
        }
        // Checked once the parse above has shown it is JSON: a lone
        // surrogate escape passes a parse that skips strings, but not the
        // strict readers upstream.
        if json_lone_surrogate(body) {
            return Err(
                "payload holds a \\u escape of half a surrogate pair (e.g. \\ud800 \
                        alone), which is no Unicode text"
                    .to_string(),
            );
        }
        let id = id.unwrap_or_else(|| content_id(&m.topic, &m.payload, m.properties.as_ref()));
        Ok(NewEvent {
            source: self.source.clone(),
            id,
            stream: self.stream.render(&m.topic),
            class: self.class,
            event_type: self.event_type.clone(),
            source_time: Some(time.unwrap_or_else(|| arrival(m))),
            data: body.to_vec(),
            attrs: Some(attrs_json(m, &[("datacontenttype", "application/json")])),
        })
    }

    fn map_raw(&self, m: &Message) -> NewEvent {
        let content_type = m
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_deref())
            .unwrap_or("application/octet-stream");
        let data_base64 = BASE64.encode(&m.payload);
        let attrs = attrs_json(
            m,
            &[
                ("datacontenttype", content_type),
                ("data_base64", &data_base64),
            ],
        );
        NewEvent {
            source: self.source.clone(),
            id: content_id(&m.topic, &m.payload, m.properties.as_ref()),
            stream: self.stream.render(&m.topic),
            class: self.class,
            event_type: self.event_type.clone(),
            source_time: Some(arrival(m)),
            data: b"null".to_vec(),
            attrs: Some(attrs),
        }
    }

    fn map_sparkplug(&mut self, m: &Message) -> Result<NewEvent, String> {
        let decoded = self.sparkplug.decode(&m.topic, &m.payload)?;
        let stream = if self.stream.is_whole_topic() {
            decoded.stream
        } else {
            self.stream.render(&m.topic)
        };
        let id = decoded
            .id
            .unwrap_or_else(|| content_id(&m.topic, &m.payload, m.properties.as_ref()));
        let time = decoded
            .timestamp_ms
            .map(|ms| {
                humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string()
            })
            .unwrap_or_else(|| arrival(m));
        let data = decoded.data.to_string().into_bytes();
        // The same bound as a JSON payload's (`map_json`): a host's STATE is
        // JSON as published, and a template nested in a template adds more
        // than one level of JSON per level of protobuf, so either can pass
        // the decoder's own limits and still come back from upstream as a
        // dead letter.
        let depth = json_depth(&data);
        if depth > DEFAULT_MAX_DEPTH {
            return Err(format!(
                "the message would become JSON nested {depth} levels deep; \
                 at most {DEFAULT_MAX_DEPTH} are accepted"
            ));
        }
        Ok(NewEvent {
            source: self.source.clone(),
            id,
            stream,
            class: self.class,
            event_type: self.event_type.clone(),
            source_time: Some(time),
            data,
            attrs: Some(attrs_json(m, &[("datacontenttype", "application/json")])),
        })
    }

    /// The stream a rejected message is recorded on: where it would have
    /// gone had it been valid (so per-stream order keeps its place).
    fn reject_stream(&self, topic: &str) -> String {
        if self.format == MqttFormat::SparkplugB
            && self.stream.is_whole_topic()
            && let Ok(sparkplug::Topic::Edge {
                group,
                node,
                device,
                ..
            }) = sparkplug::Topic::parse(topic)
        {
            return match device {
                Some(d) => format!("{group}/{node}/{d}"),
                None => format!("{group}/{node}"),
            };
        }
        self.stream.render(topic)
    }

    fn reject(&self, m: &Message, id: String, size: usize, reason: String) -> Mapped {
        if self.on_invalid == OnInvalid::Drop {
            return Mapped::Dropped(reason);
        }
        let kept = &m.payload[..m.payload.len().min(REJECT_KEEP_BYTES)];
        let data = json!({
            "topic": m.topic,
            "reason": reason,
            "size": size,
            "payload_base64": BASE64.encode(kept),
            "truncated": size > kept.len(),
            "qos": m.qos,
        });
        Mapped::Rejected(
            NewEvent {
                source: self.source.clone(),
                id,
                stream: self.reject_stream(&m.topic),
                class: self.class,
                event_type: REJECTED_EVENT_TYPE.to_owned(),
                source_time: Some(arrival(m)),
                data: data.to_string().into_bytes(),
                attrs: Some(attrs_json(m, &[])),
            },
            reason,
        )
    }
}

/// The CloudEvents extensions of an MQTT event, as JSON object text:
/// `mqtttopic`, `mqttretained` (only when set), then `extra`.
fn attrs_json(m: &Message, extra: &[(&str, &str)]) -> String {
    fn push_str(out: &mut String, s: &str) {
        // Serialising a string cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
    let mut out = String::with_capacity(
        32 + m.topic.len()
            + extra
                .iter()
                .map(|(k, v)| k.len() + v.len() + 6)
                .sum::<usize>(),
    );
    out.push_str("{\"mqtttopic\":");
    push_str(&mut out, &m.topic);
    if m.retain {
        out.push_str(",\"mqttretained\":true");
    }
    for (k, v) in extra {
        out.push(',');
        push_str(&mut out, k);
        out.push(':');
        push_str(&mut out, v);
    }
    out.push('}');
    out
}

fn arrival(m: &Message) -> String {
    humantime::format_rfc3339_micros(crate::units::formattable(m.received)).to_string()
}

/// The event id at `ptr`: a non-empty string (at most [`MAX_ID_LEN`] bytes)
/// or an integer.
fn id_at(doc: &Value, ptr: &str) -> Result<String, String> {
    match doc.pointer(ptr) {
        None | Some(Value::Null) => Err(format!("no event id at id_pointer {ptr}")),
        Some(Value::String(s)) if s.is_empty() => {
            Err(format!("the event id at id_pointer {ptr} is empty"))
        }
        Some(Value::String(s)) if s.len() > MAX_ID_LEN => Err(format!(
            "the event id at id_pointer {ptr} is {} bytes long; at most {MAX_ID_LEN} are allowed",
            s.len()
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(_) => Err(format!(
            "the event id at id_pointer {ptr} is neither a string nor an integer"
        )),
    }
}

/// The source time at `ptr`: an RFC 3339 string (kept as sent) or epoch
/// milliseconds; absent means "use the arrival time".
fn time_at(doc: &Value, ptr: &str) -> Result<Option<String>, String> {
    const MAX_MS: u64 = 253_402_300_799_999;
    match doc.pointer(ptr) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if is_rfc3339(s) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|ms| ms <= MAX_MS) => {
            let ms = n.as_u64().unwrap_or(0);
            Ok(Some(
                humantime::format_rfc3339_millis(
                    SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
                )
                .to_string(),
            ))
        }
        Some(v) => Err(format!(
            "the time at time_pointer {ptr} ({}) is neither an RFC 3339 timestamp nor epoch milliseconds",
            truncate(&v.to_string(), 64)
        )),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MqttProtocol;

    fn cfg(format: MqttFormat) -> MqttSourceConfig {
        MqttSourceConfig {
            name: "line3".into(),
            url: "mqtt://127.0.0.1:1883".parse().unwrap(),
            client_id: None,
            clean_session: false,
            keep_alive: Duration::from_secs(30),
            username: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            protocol: MqttProtocol::V311,
            topics: vec![],
            format,
            id_pointer: None,
            time_pointer: None,
            stream: "{topic}".into(),
            class: Class::Telemetry,
            event_type: "plantrelay.mqtt.message".into(),
            sparkplug_max_metrics: None,
            sparkplug_max_event_size: None,
            sparkplug_max_nodes: None,
            sparkplug_max_aliases: None,
            sparkplug_alias_memory: None,
            max_inflight: 100,
            max_payload: 1024,
            on_invalid: OnInvalid::Journal,
        }
    }

    fn msg(topic: &str, payload: &[u8]) -> Message {
        Message::new(
            1,
            7,
            1,
            false,
            topic.into(),
            Bytes::copy_from_slice(payload),
            None,
            1024,
        )
    }

    fn event(m: Mapped) -> NewEvent {
        match m {
            Mapped::Event(e) => e,
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn data_failing_the_schema_of_the_type_is_invalid_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        std::fs::write(
            &file,
            r#"{"type":"object","required":["state"],
                "properties":{"state":{"enum":["running","stopped"]}}}"#,
        )
        .unwrap();
        let schemas = Schemas::load(&[crate::config::SchemaConfig {
            event_type: "plantrelay.mqtt.message".into(),
            file,
        }])
        .unwrap();
        let mut mapper = Mapper::new(&cfg(MqttFormat::Json)).with_schemas(&schemas);
        event(mapper.map(&msg("m/p/state", br#"{"state":"running"}"#)));
        let Mapped::Rejected(e, reason) = mapper.map(&msg("m/p/state", br#"{"state":"exploded"}"#))
        else {
            panic!("not rejected")
        };
        assert_eq!(e.event_type, REJECTED_EVENT_TYPE);
        assert!(
            reason
                .starts_with("data fails the schema of type \"plantrelay.mqtt.message\": /state:"),
            "{reason}"
        );
        assert_eq!(mapper.schema_refusals(), 1);

        let mut c = cfg(MqttFormat::Json);
        c.on_invalid = OnInvalid::Drop;
        let mut mapper = Mapper::new(&c).with_schemas(&schemas);
        assert!(
            matches!(mapper.map(&msg("a", b"{}")), Mapped::Dropped(r) if r.contains("required"))
        );
        assert_eq!(mapper.schema_refusals(), 1);
        // Another type: no schema applies.
        let mut c = cfg(MqttFormat::Json);
        c.event_type = "other".into();
        let mut mapper = Mapper::new(&c).with_schemas(&schemas);
        event(mapper.map(&msg("a", b"{}")));
        assert_eq!(mapper.schema_refusals(), 0);
    }

    #[test]
    fn stream_templates_take_topic_levels() {
        let t = StreamTemplate::parse("line/{2}/{1}-x");
        assert_eq!(
            t.render("machines/press07/state"),
            "line/press07/machines-x"
        );
        assert_eq!(StreamTemplate::parse("{topic}").render("a/b"), "a/b");
        assert!(StreamTemplate::parse("{topic}").is_whole_topic());
        assert_eq!(StreamTemplate::parse("{5}").render("a/b"), "a/b");
        assert_eq!(StreamTemplate::parse("{2}/{3}").render("a/b"), "b/");
    }

    #[test]
    fn content_ids_ignore_delivery_details_but_not_content() {
        let a = content_id("t/1", b"{}", None);
        assert_eq!(a, content_id("t/1", b"{}", None));
        assert!(a.starts_with("mqtt-") && a.len() == 37, "{a}");
        assert_ne!(a, content_id("t/2", b"{}", None));
        assert_ne!(a, content_id("t/1", b"{ }", None));
        // Field boundaries are unambiguous.
        assert_ne!(content_id("ab", b"c", None), content_id("a", b"bc", None));
        let props = Properties {
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        assert_ne!(a, content_id("t/1", b"{}", Some(&props)));
        assert_eq!(a, content_id("t/1", b"{}", Some(&Properties::default())));
        let m1 = msg("t/1", b"{}");
        let mut m2 = msg("t/1", b"{}");
        m2.pkid = 99;
        m2.retain = true;
        let mut mapper = Mapper::new(&cfg(MqttFormat::Json));
        assert_eq!(event(mapper.map(&m1)).id, event(mapper.map(&m2)).id);
    }

    #[test]
    fn json_keeps_the_payload_verbatim_and_reads_pointers() {
        let mut c = cfg(MqttFormat::Json);
        c.id_pointer = Some("/eventId".into());
        c.time_pointer = Some("/ts".into());
        c.stream = "{2}".into();
        let mut mapper = Mapper::new(&c);
        let body = br#"{"eventId":"e-1", "ts":"2026-11-29T10:00:00+01:00","v":1}"#;
        let e = event(mapper.map(&msg("machines/press07/state", body)));
        assert_eq!(e.id, "e-1");
        assert_eq!(e.stream, "press07");
        assert_eq!(e.data, body.to_vec());
        assert_eq!(e.source_time.as_deref(), Some("2026-11-29T10:00:00+01:00"));
        let attrs: Value = serde_json::from_str(e.attrs.as_deref().unwrap()).unwrap();
        assert_eq!(attrs["mqtttopic"], "machines/press07/state");

        let e = event(mapper.map(&msg("m/p/s", br#"{"eventId":42,"ts":1764409200000}"#)));
        assert_eq!(e.id, "42");
        assert_eq!(e.source_time.as_deref(), Some("2025-11-29T09:40:00.000Z"));
    }

    #[test]
    fn bad_payloads_become_rejected_records_or_are_dropped() {
        let mut mapper = Mapper::new(&cfg(MqttFormat::Json));
        let Mapped::Rejected(e, reason) = mapper.map(&msg("m/p/s", b"{not json")) else {
            panic!("not rejected");
        };
        assert!(reason.contains("not valid JSON"), "{reason}");
        assert_eq!(e.event_type, REJECTED_EVENT_TYPE);
        assert_eq!(e.stream, "m/p/s");
        let data: Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(data["payload_base64"], BASE64.encode(b"{not json"));
        assert_eq!(data["truncated"], false);

        let big = vec![b' '; 5000];
        let m = msg("m/p/s", &big);
        assert_eq!(m.oversize.as_ref().unwrap().size, 5000);
        let Mapped::Rejected(e, reason) = mapper.map(&m) else {
            panic!("not rejected");
        };
        assert!(reason.contains("exceeds max_payload"), "{reason}");
        assert_eq!(e.id, content_id("m/p/s", &big, None));

        let mut c = cfg(MqttFormat::Json);
        c.on_invalid = OnInvalid::Drop;
        c.id_pointer = Some("/id".into());
        let mut mapper = Mapper::new(&c);
        assert!(
            matches!(mapper.map(&msg("a", b"{}")), Mapped::Dropped(r) if r.contains("no event id"))
        );
    }

    #[test]
    fn json_nested_past_the_depth_limit_becomes_a_rejected_record() {
        let mut mapper = Mapper::new(&cfg(MqttFormat::Json));
        let nested = |n: usize| {
            let text = format!("{}1{}", "[".repeat(n), "]".repeat(n));
            let payload = Bytes::from(text.into_bytes());
            Message::new(1, 7, 1, false, "m/p/s".into(), payload, None, 1 << 20)
        };
        assert!(matches!(
            mapper.map(&nested(DEFAULT_MAX_DEPTH)),
            Mapped::Event(_)
        ));
        // 127 deep passes serde_json's own limit here but not upstream,
        // inside a batch; 10,000 deep must not reach a recursive parser.
        for n in [DEFAULT_MAX_DEPTH + 1, 127, 10_000] {
            let Mapped::Rejected(e, reason) = mapper.map(&nested(n)) else {
                panic!("{n} deep not rejected");
            };
            assert!(reason.contains(&format!("{n} levels deep")), "{reason}");
            assert_eq!(e.event_type, REJECTED_EVENT_TYPE);
        }
    }

    #[test]
    fn sparkplug_nested_past_the_depth_limit_becomes_a_rejected_record() {
        let mut mapper = Mapper::new(&cfg(MqttFormat::SparkplugB));
        // A host's STATE, `{"a": [[…1…]]}` with n brackets: the event's
        // data, `{"host_id", "state": …}`, nests n + 2 deep.
        let state = |n: usize| {
            let text = format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
            let payload = Bytes::from(text.into_bytes());
            Message::new(
                1,
                7,
                1,
                false,
                "spBv1.0/STATE/scada".into(),
                payload,
                None,
                1 << 20,
            )
        };
        let e = event(mapper.map(&state(DEFAULT_MAX_DEPTH - 2)));
        assert_eq!(json_depth(&e.data), DEFAULT_MAX_DEPTH);
        // 126 deep still parses (serde_json's limit is 128) but would not
        // upstream, inside a batch.
        for n in [DEFAULT_MAX_DEPTH - 1, 126] {
            let Mapped::Rejected(e, reason) = mapper.map(&state(n)) else {
                panic!("a STATE nested {n} deep was not rejected");
            };
            assert!(
                reason.contains(&format!("nested {} levels deep", n + 2)),
                "{reason}"
            );
            assert_eq!(e.event_type, REJECTED_EVENT_TYPE);
        }
    }

    #[test]
    fn json_with_a_lone_surrogate_escape_becomes_a_rejected_record() {
        let mut mapper = Mapper::new(&cfg(MqttFormat::Json));
        let message = |text: &str| {
            let payload = Bytes::from(text.as_bytes().to_vec());
            Message::new(1, 7, 1, false, "m/p/s".into(), payload, None, 1 << 20)
        };
        let Mapped::Rejected(e, reason) = mapper.map(&message(r#"{"qt\ud800y":5}"#)) else {
            panic!("a lone surrogate was not rejected");
        };
        assert!(reason.contains("half a surrogate pair"), "{reason}");
        assert_eq!(e.event_type, REJECTED_EVENT_TYPE);
        assert!(matches!(
            mapper.map(&message(r#"{"smile":"\ud83d\ude00"}"#)),
            Mapped::Event(_)
        ));
    }

    #[test]
    fn raw_payloads_travel_as_base64() {
        let mut mapper = Mapper::new(&cfg(MqttFormat::Raw));
        let e = event(mapper.map(&msg("bin/x", &[0, 1, 2])));
        assert_eq!(e.data, b"null".to_vec());
        let attrs: Value = serde_json::from_str(e.attrs.as_deref().unwrap()).unwrap();
        assert_eq!(attrs["data_base64"], "AAEC");
        assert_eq!(attrs["datacontenttype"], "application/octet-stream");
    }
}
