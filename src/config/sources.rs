//! `[[sources.http]]`, `[[sources.mqtt]]` and `[[sources.opcua]]`: where events
//! come from, and the checks of their keys that the types alone cannot make.
//! The field docs are the user documentation. No I/O.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use url::Url;

use super::checks::{
    check_json_pointer, check_node_id, check_sha256_fingerprint, check_template, check_topic_filter,
};
use super::units;
use super::validate::{Issues, mqtt_tls_needs_mqtts};
use crate::event::Class;

/// `[[sources.http]]`: the local ingest API (`POST /v1/events`), typically fed
/// by the MES.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Unique source name (`[A-Za-z0-9][A-Za-z0-9._-]{0,62}`); part of every
    /// event's CloudEvents `source`. Required.
    pub name: String,
    /// Address to listen on, `IP:port` (e.g. `"127.0.0.1:8081"`). Required.
    #[serde(deserialize_with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Delivery class of events posted here: `"critical"` or `"telemetry"`.
    /// Default: `"critical"`.
    #[serde(default = "default_critical")]
    pub class: Class,
    /// File holding the bearer token clients must send. Default: none (no
    /// token required; bind to loopback then).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain to serve HTTPS with; requires `tls_key`. Default:
    /// none (plain HTTP).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`; requires `tls_cert`. Default: none.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Largest accepted request body (a size such as `"4MiB"`); larger requests
    /// get `413`. Default: `"4MiB"`.
    #[serde(default = "default_max_body", deserialize_with = "units::size")]
    pub max_body: u64,
    /// Connections this listener holds at once; at the cap it stops
    /// accepting until one closes. 1 to 65536. Default: `256`.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// Connections one client address (IPv6: one /64) may hold; more are
    /// closed at once. 1 to `max_connections`. Default: `64`.
    #[serde(default = "default_http_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Time for the TLS handshake, and for each request's headers, counted
    /// from when the connection is ready for it (so also the keep-alive idle
    /// timeout). 1s to 5m. Default: `"10s"`.
    #[serde(default = "default_10s", deserialize_with = "units::duration")]
    pub header_timeout: Duration,
    /// Time from the end of a request's headers until its answer is ready
    /// (body read and journal commit); past it the client gets `408`. 1s to
    /// 1h. Default: `"60s"`.
    #[serde(default = "default_60s", deserialize_with = "units::duration")]
    pub request_timeout: Duration,
    /// Most events one request may carry, 1 to 100000; a request with more
    /// gets `413` and nothing of it is stored. Default: `10000`.
    #[serde(default = "default_max_events_per_request")]
    pub max_events_per_request: usize,
    /// Most ingest requests handled at once, 1 to 64; a request that finds
    /// no free slot within 2 s gets `503` with `Retry-After`. Default: `4`.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Deepest nesting of arrays and objects in an event's `data`, 1 to 120;
    /// deeper events get `400`. Default: `32`.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// Most attributes (`id`, `type`, `data`, extensions, ...) one event may
    /// have, 16 to 1024; more get `400`. Default: `64`.
    #[serde(default = "default_max_attributes")]
    pub max_attributes: usize,
    /// Refuse (422) events whose CloudEvents `type` has no `[[schemas]]`
    /// entry. Default: `false` (such events are taken unchecked).
    #[serde(default)]
    pub require_schema: bool,
}

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
    #[serde(default = "default_telemetry")]
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

/// `[[sources.opcua]]`: subscribe to nodes of an OPC UA server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaSourceConfig {
    /// Unique source name. Required.
    pub name: String,
    /// Server endpoint, `opc.tcp://host:port[/path]`. Required.
    #[serde(deserialize_with = "units::url")]
    pub endpoint: Url,
    /// Security policy: `"None"`, `"Basic256Sha256"`, `"Aes128_Sha256_RsaOaep"`
    /// or `"Aes256_Sha256_RsaPss"`. Default: `"Basic256Sha256"`.
    #[serde(default)]
    pub security_policy: SecurityPolicy,
    /// Security mode: `"None"`, `"Sign"` or `"SignAndEncrypt"`; `"None"` exactly
    /// when the policy is `"None"`. Default: `"SignAndEncrypt"`.
    #[serde(default)]
    pub security_mode: SecurityMode,
    /// User name for a user-name identity token. Default: none (anonymous,
    /// unless `user_cert` is set).
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password for `username`. Default: none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Certificate (PEM or DER, any file name) for an X.509 user identity
    /// token; requires `user_key`;
    /// excludes `username`. Default: none.
    #[serde(default)]
    pub user_cert: Option<PathBuf>,
    /// PEM private key for `user_cert`. Default: none.
    #[serde(default)]
    pub user_key: Option<PathBuf>,
    /// SHA-256 fingerprint of the server certificate to pin: 64 hex digits,
    /// colons allowed. Default: none.
    #[serde(default)]
    pub server_cert_sha256: Option<String>,
    /// Accept a server certificate that is neither pinned nor trusted (for
    /// commissioning only). Default: `false`.
    #[serde(default)]
    pub trust_unknown_server: bool,
    /// Subscription publishing interval. Default: `"1s"`.
    #[serde(default = "default_1s", deserialize_with = "units::duration_nonzero")]
    pub publishing_interval: Duration,
    /// Subscription keep-alive count (publishing intervals without data before
    /// the server sends a keep-alive), at least 1. Default: `10`.
    #[serde(default = "default_keep_alive_count")]
    pub keep_alive_count: u32,
    /// Subscription lifetime count, at least 3 × `keep_alive_count`. Default: `30`.
    /// The server must answer a publish request at least every
    /// `publishing_interval` × `keep_alive_count` (10 s by default) once it
    /// has no data; a server silent for two intervals and 0.5 s (or half that
    /// window) longer is treated as lost and reconnected.
    #[serde(default = "default_lifetime_count")]
    pub lifetime_count: u32,
    /// Timeout for connecting and activating the session. Default: `"10s"`.
    #[serde(default = "default_10s", deserialize_with = "units::duration_nonzero")]
    pub connect_timeout: Duration,
    /// Most data changes held in memory while the journal is slower than the
    /// server, 100 to 10,000,000; beyond it only the newest value per node is
    /// kept and the superseded ones are counted as dropped. Default: `100000`.
    #[serde(default = "default_max_queued_changes")]
    pub max_queued_changes: usize,
    /// Delivery class: `"critical"` or `"telemetry"`. Default: `"telemetry"`.
    #[serde(default = "default_telemetry")]
    pub class: Class,
    /// Monitored nodes (`[[sources.opcua.nodes]]`); at least one. Required.
    pub nodes: Vec<OpcuaNodeConfig>,
}

/// OPC UA security policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum SecurityPolicy {
    /// No security (`"None"`).
    None,
    /// `"Basic256Sha256"`.
    #[default]
    Basic256Sha256,
    /// `"Aes128_Sha256_RsaOaep"`.
    #[serde(rename = "Aes128_Sha256_RsaOaep")]
    Aes128Sha256RsaOaep,
    /// `"Aes256_Sha256_RsaPss"`.
    #[serde(rename = "Aes256_Sha256_RsaPss")]
    Aes256Sha256RsaPss,
}

impl SecurityPolicy {
    /// The spelling used in the config file (and in OPC UA policy URIs).
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::None => "None",
            SecurityPolicy::Basic256Sha256 => "Basic256Sha256",
            SecurityPolicy::Aes128Sha256RsaOaep => "Aes128_Sha256_RsaOaep",
            SecurityPolicy::Aes256Sha256RsaPss => "Aes256_Sha256_RsaPss",
        }
    }

    /// The policy URI, e.g. `http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256`.
    pub fn uri(self) -> String {
        format!(
            "http://opcfoundation.org/UA/SecurityPolicy#{}",
            self.as_str()
        )
    }
}

impl fmt::Display for SecurityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// OPC UA message security mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum SecurityMode {
    /// `"None"`.
    None,
    /// `"Sign"`.
    Sign,
    /// `"SignAndEncrypt"`.
    #[default]
    SignAndEncrypt,
}

impl SecurityMode {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityMode::None => "None",
            SecurityMode::Sign => "Sign",
            SecurityMode::SignAndEncrypt => "SignAndEncrypt",
        }
    }
}

impl fmt::Display for SecurityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[sources.opcua.nodes]]`: one monitored item.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaNodeConfig {
    /// Node id in standard notation: optional `ns=<index>;` or `nsu=<uri>;`,
    /// then `i=<number>`, `s=<string>`, `g=<guid>` or `b=<base64>`
    /// (e.g. `"ns=2;s=Press07.State"`). Required.
    pub node_id: String,
    /// Stream (ordering key) the node's data changes go to, e.g.
    /// `"line3/press07"`. Required.
    pub stream: String,
    /// Sampling interval requested from the server; `"0s"` asks for the
    /// fastest rate the server supports. Default: `"500ms"`.
    #[serde(default = "default_500ms", deserialize_with = "units::duration")]
    pub sampling_interval: Duration,
    /// Server-side queue size for the item, at least 1. Default: `10`.
    #[serde(default = "default_queue_size")]
    pub queue_size: u32,
    /// Data-change deadband: `{ absolute = <f64> }` or `{ percent = <0..100> }`.
    /// Default: none (every change is reported).
    #[serde(default)]
    pub deadband: Option<Deadband>,
    /// Map from integer values to names (TOML keys are the integers as
    /// strings, e.g. `{ "0" = "STOPPED", "1" = "RUNNING" }`); a mapped value
    /// is forwarded with its name in `data.state` beside `data.value`.
    /// Default: none.
    #[serde(default, deserialize_with = "state_map")]
    pub state_map: Option<BTreeMap<i64, String>>,
}

/// A data-change deadband. In TOML a table with exactly one of `absolute` or
/// `percent`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deadband {
    /// Report a change only when it exceeds this absolute amount (≥ 0).
    Absolute(f64),
    /// Report a change only when it exceeds this percentage (0 to 100) of the
    /// node's EU range.
    Percent(f64),
}

fn default_critical() -> Class {
    Class::Critical
}
fn default_telemetry() -> Class {
    Class::Telemetry
}
fn default_max_body() -> u64 {
    4 * 1024 * 1024
}
fn default_http_max_connections() -> usize {
    256
}
fn default_http_max_connections_per_ip() -> usize {
    64
}
fn default_60s() -> Duration {
    Duration::from_secs(60)
}
fn default_max_events_per_request() -> usize {
    10_000
}
fn default_max_concurrent_requests() -> usize {
    4
}
fn default_max_depth() -> usize {
    crate::event::DEFAULT_MAX_DEPTH
}
fn default_max_attributes() -> usize {
    64
}
fn default_30s() -> Duration {
    Duration::from_secs(30)
}
fn default_10s() -> Duration {
    Duration::from_secs(10)
}
fn default_1s() -> Duration {
    Duration::from_secs(1)
}
fn default_500ms() -> Duration {
    Duration::from_millis(500)
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
fn default_keep_alive_count() -> u32 {
    10
}
fn default_lifetime_count() -> u32 {
    30
}
fn default_max_queued_changes() -> usize {
    100_000
}
fn default_queue_size() -> u32 {
    10
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

/// The keys of a deadband table.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum DeadbandField {
    Absolute,
    Percent,
}

impl<'de> Deserialize<'de> for Deadband {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Deadband, D::Error> {
        d.deserialize_map(DeadbandVisitor)
    }
}

struct DeadbandVisitor;

impl<'de> Visitor<'de> for DeadbandVisitor {
    type Value = Deadband;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table with exactly one of `absolute` or `percent`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Deadband, A::Error> {
        let mut found = Vec::new();
        while let Some(field) = map.next_key::<DeadbandField>()? {
            let value = map.next_value::<f64>()?;
            found.push(match field {
                DeadbandField::Absolute => Deadband::Absolute(value),
                DeadbandField::Percent => Deadband::Percent(value),
            });
        }
        match found.as_slice() {
            [one] => Ok(*one),
            _ => Err(de::Error::custom(
                "deadband needs exactly one of `absolute` or `percent`",
            )),
        }
    }
}

/// Deserialises `state_map`: string keys that must be integers.
fn state_map<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<i64, String>>, D::Error> {
    d.deserialize_map(StateMapVisitor).map(Some)
}

struct StateMapVisitor;

impl<'de> Visitor<'de> for StateMapVisitor {
    type Value = BTreeMap<i64, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            r#"a table of integer values to names, e.g. { "0" = "stopped", "1" = "running" }"#,
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let name = map.next_value::<String>()?;
            let value = key.trim().parse::<i64>().map_err(|_| {
                de::Error::custom(format!("state_map key `{key}` is not an integer"))
            })?;
            if out.insert(value, name).is_some() {
                return Err(de::Error::custom(format!(
                    "state_map has value {value} more than once"
                )));
            }
        }
        Ok(out)
    }
}

// Validation: what the types alone cannot say about a source's keys.

/// Bounds of `sources.http.max_events_per_request`: the upper one keeps one
/// request's parsed events within tens of megabytes.
const HTTP_MAX_EVENTS_PER_REQUEST: (usize, usize) = (1, 100_000);
/// Bounds of `sources.http.max_concurrent_requests`: each request in flight
/// may hold up to about `max_body` times a small factor in memory.
const HTTP_MAX_CONCURRENT_REQUESTS: (usize, usize) = (1, 64);
/// Bounds of `sources.http.max_depth`: see [`crate::event::MAX_DEPTH_LIMIT`].
const HTTP_MAX_DEPTH: (usize, usize) = (1, crate::event::MAX_DEPTH_LIMIT);
/// Bounds of `sources.http.max_attributes`: the CloudEvents core attributes
/// alone are ten.
const HTTP_MAX_ATTRIBUTES: (usize, usize) = (16, 1024);

pub(super) fn check_http(issues: &mut Issues<'_>, p: &str, s: &HttpSourceConfig) {
    issues.pair(
        p,
        ("tls_cert", s.tls_cert.is_some()),
        ("tls_key", s.tls_key.is_some()),
    );
    if s.max_body == 0 {
        issues.push(format!("{p}.max_body"), "must be greater than zero");
    }
    issues.listener_limits(
        p,
        s.max_connections,
        s.max_connections_per_ip,
        s.header_timeout,
        s.request_timeout,
    );
    for (key, value, (min, max)) in [
        (
            "max_events_per_request",
            s.max_events_per_request,
            HTTP_MAX_EVENTS_PER_REQUEST,
        ),
        (
            "max_concurrent_requests",
            s.max_concurrent_requests,
            HTTP_MAX_CONCURRENT_REQUESTS,
        ),
        ("max_depth", s.max_depth, HTTP_MAX_DEPTH),
        ("max_attributes", s.max_attributes, HTTP_MAX_ATTRIBUTES),
    ] {
        if !(min..=max).contains(&value) {
            issues.push(
                format!("{p}.{key}"),
                format!("must be between {min} and {max}; got {value}"),
            );
        }
    }
}

pub(super) fn check_mqtt(issues: &mut Issues<'_>, p: &str, s: &MqttSourceConfig) {
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

pub(super) fn check_opcua(issues: &mut Issues<'_>, p: &str, s: &OpcuaSourceConfig) {
    issues.url(&format!("{p}.endpoint"), &s.endpoint, &["opc.tcp"], "");
    let policy_none = s.security_policy == SecurityPolicy::None;
    let mode_none = s.security_mode == SecurityMode::None;
    if policy_none != mode_none {
        issues.push(
            format!("{p}.security_mode"),
            format!(
                "security_mode \"{}\" does not fit security_policy \"{}\": \
                 use \"None\" for both, or a signing mode with a real policy",
                s.security_mode, s.security_policy
            ),
        );
    }
    issues.requires(
        p,
        ("password_file", s.password_file.is_some()),
        ("username", s.username.is_some()),
    );
    issues.pair(
        p,
        ("user_cert", s.user_cert.is_some()),
        ("user_key", s.user_key.is_some()),
    );
    if s.username.is_some() && s.user_cert.is_some() {
        issues.push(
            format!("{p}.user_cert"),
            "set either username or user_cert (one user identity), not both",
        );
    }
    if let Some(fingerprint) = &s.server_cert_sha256
        && let Err(message) = check_sha256_fingerprint(fingerprint)
    {
        issues.push(format!("{p}.server_cert_sha256"), message);
    }
    if s.keep_alive_count == 0 {
        issues.push(format!("{p}.keep_alive_count"), "must be at least 1");
    }
    if !(100..=10_000_000).contains(&s.max_queued_changes) {
        issues.push(
            format!("{p}.max_queued_changes"),
            format!(
                "must be between 100 and 10000000, got {}",
                s.max_queued_changes
            ),
        );
    }
    if u64::from(s.lifetime_count) < 3 * u64::from(s.keep_alive_count) {
        issues.push(
            format!("{p}.lifetime_count"),
            format!(
                "must be at least 3 × keep_alive_count ({}), got {}",
                3 * u64::from(s.keep_alive_count),
                s.lifetime_count
            ),
        );
    }
    if s.nodes.is_empty() {
        issues.push(
            format!("{p}.nodes"),
            "at least one node is required ([[sources.opcua.nodes]])",
        );
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, node) in s.nodes.iter().enumerate() {
        let np = format!("{p}.nodes[{i}]");
        opcua_node(issues, &np, node);
        if let Some(first) = seen.insert(node.node_id.as_str(), i) {
            issues.push(
                format!("{np}.node_id"),
                format!(
                    "node `{}` is already monitored by nodes[{first}]",
                    node.node_id
                ),
            );
        }
    }
}

fn opcua_node(issues: &mut Issues<'_>, p: &str, node: &OpcuaNodeConfig) {
    // The syntax check, then the parser the source itself uses: what passes
    // here is what the source can subscribe to.
    if let Err(message) =
        check_node_id(&node.node_id).and_then(|()| super::parse_node_id(&node.node_id).map(|_| ()))
    {
        issues.push(format!("{p}.node_id"), message);
    }
    issues.non_empty(format!("{p}.stream"), &node.stream);
    if node.queue_size == 0 {
        issues.push(format!("{p}.queue_size"), "must be at least 1");
    }
    match node.deadband {
        Some(Deadband::Absolute(v)) if !(v.is_finite() && v >= 0.0) => {
            issues.push(
                format!("{p}.deadband.absolute"),
                format!("must be a finite number ≥ 0, got {v}"),
            );
        }
        Some(Deadband::Percent(v)) if !(0.0..=100.0).contains(&v) => {
            issues.push(
                format!("{p}.deadband.percent"),
                format!("must be between 0 and 100, got {v}"),
            );
        }
        _ => {}
    }
}
