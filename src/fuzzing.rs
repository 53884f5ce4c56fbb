//! Entry points for the fuzz targets in `fuzz/`: thin wrappers that reach the
//! parsers the agent runs on untrusted input (config text, HTTP ingest
//! bodies, MQTT payloads and mappings, Sparkplug B payloads, admin API
//! inputs) without a listener, a broker or a journal.
//!
//! This module is not an API: it exists for the fuzz targets and the
//! regression tests of what they found, and may change with them. It owns no
//! logic of its own and must never be called by the daemon.

use std::path::Path;
use std::sync::OnceLock;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Uri};
use bytes::Bytes;

use crate::config::{Config, ConfigError};
use crate::event::{Class, NewEvent};
use crate::health::admin;
use crate::sources::http;
use crate::sources::mqtt::mapping::{Mapped, Mapper, Message, Properties};

/// [`Config::parse`] on `text`, named `plantrelay.toml` in messages.
pub fn config(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/plantrelay/plantrelay.toml"))
}

/// The HTTP ingest path for one request, short of the journal: the
/// `Content-Type` check, then parsing and validating the body with the
/// default limits of a `[[sources.http]]` table. `None` where the agent
/// answers 4xx.
pub fn http_body(content_type: &[u8], body: &[u8]) -> Option<Vec<NewEvent>> {
    static LIMITS: OnceLock<Option<http::Limits>> = OnceLock::new();
    let limits = LIMITS.get_or_init(|| {
        let text = "[agent]\nid = \"gw-1\"\nstate_dir = \"/var/lib/plantrelay\"\n\
                    [[sinks.https]]\nname = \"central\"\nurl = \"https://ingest.example.com/v1/events\"\n\
                    [[sources.http]]\nname = \"mes\"\nlisten = \"127.0.0.1:8081\"\n";
        config(text)
            .ok()
            .and_then(|c| c.sources.http.first().map(http::Limits::new))
    });
    let limits = limits.as_ref()?;
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    let format = http::body_format(&headers).ok()?;
    http::parse_events(body, format, "mes", Class::Critical, limits, None).ok()
}

/// A replay body (`POST /api/v1/sinks/{name}/replay`) as the audit line
/// describes it, or the 400 reason.
pub fn admin_replay(body: &[u8]) -> Result<String, String> {
    admin::parse_replay(body).map(admin::describe)
}

/// A replay `since` value as the audit line describes it, or the 400 reason.
pub fn admin_since(since: &str) -> Result<String, String> {
    admin::parse_since(since).map(|t| admin::describe(crate::journal::RewindTo::Since(t)))
}

/// Whether the query of `uri` is accepted by `GET /api/v1/dead-letters`.
pub fn admin_dead_letter_query(uri: &str) -> bool {
    let Ok(uri) = uri.parse::<Uri>() else {
        return false;
    };
    axum::extract::Query::<admin::DeadLetterQuery>::try_from_uri(&uri).is_ok()
}

/// The knobs of a `[[sources.mqtt]]` table that change how a message maps.
#[derive(Debug, Clone, Default)]
pub struct MqttOptions {
    /// `"json"`, `"raw"` or `"sparkplug_b"`.
    pub format: String,
    pub id_pointer: Option<String>,
    pub time_pointer: Option<String>,
    pub stream: Option<String>,
    /// `"journal"` or `"drop"`.
    pub on_invalid: String,
    pub max_payload: u64,
}

/// What became of one MQTT message.
#[derive(Debug)]
pub enum MqttOutcome {
    Event(NewEvent),
    Rejected(NewEvent, String),
    Dropped(String),
}

/// The MQTT source's mapper, built from a config that passed validation.
#[derive(Debug)]
pub struct MqttMapper {
    mapper: Mapper,
    max_payload: u64,
}

impl MqttMapper {
    /// Builds the mapper of an `[[sources.mqtt]]` table with `options`, as
    /// the agent would: through [`Config::parse`], so only validated
    /// settings reach it.
    pub fn new(options: &MqttOptions) -> Result<MqttMapper, ConfigError> {
        let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let mut text = String::from(
            "[agent]\nid = \"gw-1\"\nstate_dir = \"/var/lib/plantrelay\"\n\
             [[sinks.https]]\nname = \"central\"\nurl = \"https://ingest.example.com/v1/events\"\n\
             [[sources.mqtt]]\nname = \"line3\"\nurl = \"mqtt://127.0.0.1:1883\"\ntopics = [\"#\"]\n",
        );
        text.push_str(&format!("format = {}\n", quote(&options.format)));
        text.push_str(&format!("on_invalid = {}\n", quote(&options.on_invalid)));
        text.push_str(&format!("max_payload = {}\n", options.max_payload));
        for (key, value) in [
            ("id_pointer", &options.id_pointer),
            ("time_pointer", &options.time_pointer),
            ("stream", &options.stream),
        ] {
            if let Some(v) = value {
                text.push_str(&format!("{key} = {}\n", quote(v)));
            }
        }
        let config = config(&text)?;
        let Some(source) = config.sources.mqtt.first() else {
            return Err(ConfigError::single(
                "fuzz.toml".into(),
                "sources.mqtt",
                "no mqtt source".to_string(),
            ));
        };
        Ok(MqttMapper {
            mapper: Mapper::new(source),
            max_payload: source.max_payload,
        })
    }

    /// Maps one message as delivered by the broker (QoS 1, not retained
    /// unless `retain`), with the v5 content type and user properties when
    /// given.
    pub fn map(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        content_type: Option<String>,
        user_properties: Vec<(String, String)>,
    ) -> MqttOutcome {
        let properties =
            (content_type.is_some() || !user_properties.is_empty()).then(|| Properties {
                content_type,
                user_properties,
                ..Properties::default()
            });
        let m = Message::new(
            1,
            1,
            1,
            retain,
            topic.to_owned(),
            Bytes::copy_from_slice(payload),
            properties,
            self.max_payload,
        );
        match self.mapper.map(&m) {
            Mapped::Event(e) => MqttOutcome::Event(e),
            Mapped::Rejected(e, reason) => MqttOutcome::Rejected(e, reason),
            Mapped::Dropped(reason) => MqttOutcome::Dropped(reason),
        }
    }
}
