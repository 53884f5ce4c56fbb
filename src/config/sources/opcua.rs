//! `[[sources.opcua]]` and its `[[sources.opcua.nodes]]`: the OPC UA
//! server, security and subscription keys, their defaults and their checks.
//! No I/O; it must never accept a node id the source's own parser would
//! refuse.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use url::Url;

use crate::config::checks::{check_node_id, check_sha256_fingerprint};
use crate::config::units;
use crate::config::validate::Issues;
use crate::event::Class;

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
    #[serde(
        default = "super::default_10s",
        deserialize_with = "units::duration_nonzero"
    )]
    pub connect_timeout: Duration,
    /// Most data changes held in memory while the journal is slower than the
    /// server, 100 to 10,000,000; beyond it only the newest value per node is
    /// kept and the superseded ones are counted as dropped. Default: `100000`.
    #[serde(default = "default_max_queued_changes")]
    pub max_queued_changes: usize,
    /// Delivery class: `"critical"` or `"telemetry"`. Default: `"telemetry"`.
    #[serde(default = "super::default_telemetry")]
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
fn default_1s() -> Duration {
    Duration::from_secs(1)
}
fn default_500ms() -> Duration {
    Duration::from_millis(500)
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

pub(in crate::config) fn check_opcua(issues: &mut Issues<'_>, p: &str, s: &OpcuaSourceConfig) {
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
    if let Err(message) = check_node_id(&node.node_id)
        .and_then(|()| crate::config::parse_node_id(&node.node_id).map(|_| ()))
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
