//! `[[sources.mqtt]]`: the plant broker subscription's keys (connection,
//! topics, payload format, Sparkplug B limits), their defaults and their
//! checks. No I/O; it must never accept a topic filter or a template the
//! source could not use.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use url::Url;

use crate::config::checks::{check_json_pointer, check_template, check_topic_filter};
use crate::config::units;
use crate::config::validate::{Issues, mqtt_tls_needs_mqtts};
use crate::event::Class;

/// `[[sources.mqtt]]`: subscribe to topics on a plant MQTT broker. Messages
/// are acknowledged to the broker only after the journal commit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Unique source name. Required.
    pub name: String,
    /// Broker URL: `mqtt://host[:port]` (default port 1883) or
    /// `mqtts://host[:port]` for TLS (default port 8883). Required.
    #[serde(deserialize_with = "units::url")]
    pub url: Url,
    /// MQTT client id. Default: `plantrelay-<agent id>-<source name>`. Keep it
    /// stable: the broker keeps the session (and unacknowledged messages) under it.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Start with a clean session, dropping what the broker queued while the
    /// agent was away. Default: `false`.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT keep-alive interval, 1s to 65535s. Default: `"30s"`.
    #[serde(default = "default_30s", deserialize_with = "units::duration_nonzero")]
    pub keep_alive: Duration,
    /// User name for the broker. Default: none.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password for `username`. Default: none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify the broker with (`mqtts://` only).
    /// Default: none (the system trust store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; requires `client_key`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Protocol version: `"v311"` or `"v5"`. Default: `"v311"`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Topic filters to subscribe to; at least one. Each entry is a filter
    /// string (QoS 1) or a table `{ filter = "...", qos = 0 | 1 | 2 }`. Required.
    pub topics: Vec<TopicSubscription>,
    /// Payload format: `"json"`, `"raw"` (bytes, forwarded base64) or
    /// `"sparkplug_b"`. Default: `"json"`.
    #[serde(default)]
    pub format: MqttFormat,
    /// JSON pointer (e.g. `"/eventId"`) to the event id inside a JSON payload
    /// (`format = "json"` only). Default: none (the id is derived by hashing).
    #[serde(default)]
    pub id_pointer: Option<String>,
    /// JSON pointer to the source timestamp (RFC 3339) inside a JSON payload
    /// (`format = "json"` only). Default: none (arrival time).
    #[serde(default)]
    pub time_pointer: Option<String>,
    /// Stream (ordering key) of each message: a template where `{topic}` is the
    /// whole topic and `{N}` its N-th level, counted from 1. Default: `"{topic}"`.
    #[serde(default = "default_stream_template")]
    pub stream: String,
    /// Delivery class: `"critical"` or `"telemetry"`. Default: `"telemetry"`.
    #[serde(default = "super::default_telemetry")]
    pub class: Class,
    /// CloudEvents `type` of the events (TOML key `type`). Default:
    /// `"plantrelay.mqtt.message"`.
    #[serde(rename = "type", default = "default_mqtt_event_type")]
    pub event_type: String,
    /// Most unacknowledged messages the broker may have in flight to us,
    /// 1 to 65535. Default: `100`.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Largest accepted payload (a size). Default: `"1MiB"`.
    #[serde(default = "default_max_payload", deserialize_with = "units::size")]
    pub max_payload: u64,
    /// `format = "sparkplug_b"`: most metrics in one message, counting nested
    /// values (template members, data set cells, properties), 1 to 1,000,000;
    /// a larger message is refused before it is decoded. Default: `10000`.
    #[serde(default)]
    pub sparkplug_max_metrics: Option<u64>,
    /// `format = "sparkplug_b"`: largest JSON document one message may become
    /// (a size, 1KiB to 256MiB). Default: `"4MiB"`.
    #[serde(default, deserialize_with = "units::opt_size")]
    pub sparkplug_max_event_size: Option<u64>,
    /// `format = "sparkplug_b"`: most edge nodes whose alias tables are
    /// remembered, 1 to 1,000,000; the least recently used is forgotten
    /// first. Default: `1000`.
    #[serde(default)]
    pub sparkplug_max_nodes: Option<u64>,
    /// `format = "sparkplug_b"`: most aliases remembered per edge node (node
    /// and devices together), 1 to 10,000,000. Default: `10000`.
    #[serde(default)]
    pub sparkplug_max_aliases: Option<u64>,
    /// `format = "sparkplug_b"`: memory all alias tables together may take
    /// (approximate; a size, 1MiB to 16GiB). Default: `"64MiB"`.
    #[serde(default, deserialize_with = "units::opt_size")]
    pub sparkplug_alias_memory: Option<u64>,
    /// What to do with a payload that does not parse as `format`: `"journal"`
    /// (store it as a rejected event, visible upstream) or `"drop"` (count and
    /// log it). Default: `"journal"`.
    #[serde(default)]
    pub on_invalid: OnInvalid,
}

impl MqttSourceConfig {
    /// The Sparkplug B limits, defaults filled in.
    pub fn sparkplug_limits(&self) -> crate::sources::sparkplug::Limits {
        let d = crate::sources::sparkplug::Limits::default();
        let get = |v: Option<u64>, default: usize| {
            v.map_or(default, |v| usize::try_from(v).unwrap_or(usize::MAX))
        };
        crate::sources::sparkplug::Limits {
            max_metrics: get(self.sparkplug_max_metrics, d.max_metrics),
            max_event_size: get(self.sparkplug_max_event_size, d.max_event_size),
            max_nodes: get(self.sparkplug_max_nodes, d.max_nodes),
            max_aliases: get(self.sparkplug_max_aliases, d.max_aliases),
            alias_memory: get(self.sparkplug_alias_memory, d.alias_memory),
        }
    }
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 3.1.1 (`"v311"`).
    #[default]
    V311,
    /// MQTT 5 (`"v5"`).
    V5,
}

/// Payload format of an MQTT source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttFormat {
    /// A JSON document per message (`"json"`).
    #[default]
    Json,
    /// Opaque bytes (`"raw"`).
    Raw,
    /// Eclipse Sparkplug B protobuf (`"sparkplug_b"`).
    SparkplugB,
}

/// What an MQTT source does with a payload that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// Journal it as a rejected event (`"journal"`).
    #[default]
    Journal,
    /// Count, log and drop it (`"drop"`).
    Drop,
}

/// One subscription of an MQTT source. In TOML either a filter string
/// (subscribed with QoS 1) or a table `{ filter = "...", qos = 0 | 1 | 2 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSubscription {
    /// MQTT topic filter (`+` and `#` wildcards allowed).
    pub filter: String,
    /// Subscription QoS: 0, 1 or 2. Default: 1.
    pub qos: u8,
}
fn default_30s() -> Duration {
    Duration::from_secs(30)
}
fn default_stream_template() -> String {
    "{topic}".to_owned()
}
fn default_mqtt_event_type() -> String {
    "plantrelay.mqtt.message".to_owned()
}
fn default_max_inflight() -> u16 {
    100
}
fn default_max_payload() -> u64 {
    1024 * 1024
}

/// The keys of a topic table.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum TopicField {
    Filter,
    Qos,
}

/// A QoS level 0, 1 or 2, validated where it is written.
struct Qos(u8);

impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Qos, D::Error> {
        let qos = u8::deserialize(d)?;
        if qos > 2 {
            return Err(de::Error::custom(format!(
                "invalid qos {qos}: expected 0, 1 or 2"
            )));
        }
        Ok(Qos(qos))
    }
}

impl<'de> Deserialize<'de> for TopicSubscription {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TopicSubscription, D::Error> {
        d.deserialize_any(TopicVisitor)
    }
}

struct TopicVisitor;

impl<'de> Visitor<'de> for TopicVisitor {
    type Value = TopicSubscription;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a topic filter string or a table { filter = "...", qos = 1 }"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<TopicSubscription, E> {
        Ok(TopicSubscription {
            filter: v.to_owned(),
            qos: 1,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopicSubscription, A::Error> {
        let mut filter = None;
        let mut qos = 1;
        while let Some(field) = map.next_key::<TopicField>()? {
            match field {
                TopicField::Filter => filter = Some(map.next_value::<String>()?),
                TopicField::Qos => qos = map.next_value::<Qos>()?.0,
            }
        }
        let filter = filter.ok_or_else(|| de::Error::missing_field("filter"))?;
        Ok(TopicSubscription { filter, qos })
    }
}

// Validation: what the types alone cannot say about a source's keys.

pub(in crate::config) fn check_mqtt(issues: &mut Issues<'_>, p: &str, s: &MqttSourceConfig) {
    issues.url(&format!("{p}.url"), &s.url, &["mqtt", "mqtts"], "");
    mqtt_tls_needs_mqtts(
        issues,
        p,
        &s.url,
        &[
            ("ca_file", s.ca_file.is_some()),
            ("client_cert", s.client_cert.is_some()),
        ],
    );
    if let Some(id) = &s.client_id {
        issues.non_empty(format!("{p}.client_id"), id);
    }
    issues.mqtt_keep_alive(format!("{p}.keep_alive"), s.keep_alive);
    issues.requires(
        p,
        ("password_file", s.password_file.is_some()),
        ("username", s.username.is_some()),
    );
    issues.pair(
        p,
        ("client_cert", s.client_cert.is_some()),
        ("client_key", s.client_key.is_some()),
    );

    if s.topics.is_empty() {
        issues.push(
            format!("{p}.topics"),
            "at least one topic filter is required",
        );
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, topic) in s.topics.iter().enumerate() {
        let path = format!("{p}.topics[{i}]");
        if let Err(message) = check_topic_filter(&topic.filter) {
            issues.push(path, message);
        } else if let Some(first) = seen.insert(topic.filter.as_str(), i) {
            issues.push(
                path,
                format!(
                    "topic filter `{}` is already subscribed by topics[{first}]",
                    topic.filter
                ),
            );
        }
    }

    for (key, pointer) in [
        ("id_pointer", &s.id_pointer),
        ("time_pointer", &s.time_pointer),
    ] {
        let Some(pointer) = pointer else { continue };
        if let Err(message) = check_json_pointer(pointer) {
            issues.push(format!("{p}.{key}"), message);
        } else if s.format != MqttFormat::Json {
            issues.push(
                format!("{p}.{key}"),
                format!("`{key}` only applies to format = \"json\""),
            );
        }
    }
    let stream_placeholder =
        |name: &str| name == "topic" || name.parse::<usize>().is_ok_and(|n| n >= 1);
    if let Err(message) =
        check_template(&s.stream, &stream_placeholder, "`{topic}` or `{N}` (N ≥ 1)")
    {
        issues.push(format!("{p}.stream"), message);
    }
    issues.non_empty(format!("{p}.type"), &s.event_type);
    if s.max_inflight == 0 {
        issues.push(
            format!("{p}.max_inflight"),
            "must be between 1 and 65535, got 0",
        );
    }
    if s.max_payload == 0 {
        issues.push(format!("{p}.max_payload"), "must be greater than zero");
    }
    sparkplug_limits(issues, p, s);
}

fn sparkplug_limits(issues: &mut Issues<'_>, p: &str, s: &MqttSourceConfig) {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    for (key, value, min, max, bounds) in [
        (
            "sparkplug_max_metrics",
            s.sparkplug_max_metrics,
            1,
            1_000_000,
            "between 1 and 1000000",
        ),
        (
            "sparkplug_max_event_size",
            s.sparkplug_max_event_size,
            KIB,
            256 * MIB,
            "between 1KiB and 256MiB",
        ),
        (
            "sparkplug_max_nodes",
            s.sparkplug_max_nodes,
            1,
            1_000_000,
            "between 1 and 1000000",
        ),
        (
            "sparkplug_max_aliases",
            s.sparkplug_max_aliases,
            1,
            10_000_000,
            "between 1 and 10000000",
        ),
        (
            "sparkplug_alias_memory",
            s.sparkplug_alias_memory,
            MIB,
            16 * 1024 * MIB,
            "between 1MiB and 16GiB",
        ),
    ] {
        let Some(value) = value else { continue };
        if s.format != MqttFormat::SparkplugB {
            issues.push(
                format!("{p}.{key}"),
                format!("`{key}` only applies to format = \"sparkplug_b\""),
            );
        } else if !(min..=max).contains(&value) {
            issues.push(
                format!("{p}.{key}"),
                format!("must be {bounds}, got {value}"),
            );
        }
    }
}

#[cfg(test)]
mod sparkplug_limit_tests {
    use std::path::Path;

    use crate::config::Config;

    fn mqtt(format: &str, extra: &str) -> String {
        format!(
            "[agent]\nid = \"gw-1\"\nstate_dir = \"/tmp/x\"\n\
             [[sources.mqtt]]\nname = \"line3\"\nurl = \"mqtt://broker:1883\"\n\
             topics = [\"spBv1.0/#\"]\nformat = \"{format}\"\n{extra}\n\
             [[sinks.https]]\nname = \"central\"\nurl = \"https://ingest.example.com/v1/events\"\n"
        )
    }

    fn messages(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new("p.toml")) {
            Ok(_) => vec![],
            Err(e) => e
                .issues
                .iter()
                .map(|i| format!("{}: {}", i.key_path, i.message))
                .collect(),
        }
    }

    #[test]
    fn sparkplug_limits_are_checked_against_their_bounds_and_format() {
        assert!(
            messages(&mqtt(
                "sparkplug_b",
                "sparkplug_max_metrics = 500\nsparkplug_alias_memory = \"8MiB\""
            ))
            .is_empty()
        );
        let c = Config::parse(
            &mqtt("sparkplug_b", "sparkplug_max_nodes = 20"),
            Path::new("p.toml"),
        )
        .unwrap();
        let limits = c.sources.mqtt[0].sparkplug_limits();
        assert_eq!(limits.max_nodes, 20);
        assert_eq!(limits.max_metrics, 10_000, "the default");

        let m = messages(&mqtt("sparkplug_b", "sparkplug_max_metrics = 0"));
        assert!(
            m.iter().any(|m| m.contains("sparkplug_max_metrics")
                && m.contains("between 1 and 1000000, got 0")),
            "{m:?}"
        );
        let m = messages(&mqtt("sparkplug_b", "sparkplug_max_event_size = \"100B\""));
        assert!(
            m.iter()
                .any(|m| m.contains("sparkplug_max_event_size")
                    && m.contains("between 1KiB and 256MiB")),
            "{m:?}"
        );
        let m = messages(&mqtt("json", "sparkplug_max_aliases = 10"));
        assert!(
            m.iter().any(|m| m.contains("sparkplug_max_aliases")
                && m.contains("only applies to format = \"sparkplug_b\"")),
            "{m:?}"
        );
    }
}
