//! The TOML contract: parse a config file into a [`Config`], validate it, and
//! report every problem with file, line, column and key path
//! (`plantrelay.toml:12:7: sinks.https[0].url: ...`).
//!
//! This module owns the shape, the defaults and the validation rules of the
//! config file; the `///` docs on the fields are the user documentation and
//! `config/plantrelay.example.toml` shows every key. Pipeline:
//!
//! 1. parse the TOML into a spanned document (syntax errors stop here);
//! 2. deserialise it into [`Config`] through `serde_path_to_error`
//!    (unknown keys, missing keys, wrong types and malformed durations, sizes,
//!    addresses or URLs stop here, with the exact key path and position);
//! 3. resolve relative paths against the config file's directory;
//! 4. semantic validation (`validate.rs`), collecting *all* issues;
//! 5. filesystem checks, in [`Config::load`] only: every named file opens,
//!    and `state_dir`, if it exists, is a directory.
//!
//! It must never open sockets, the journal or the state directory, never
//! create anything, and never read a secret's contents except through
//! [`read_secret`], which the components call when they start.

mod checks;
mod error;
mod files;
mod locate;
mod node_id;
mod risk;
mod sinks;
mod sources;
mod streams;
pub mod units;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

pub use error::{ConfigError, ConfigIssue};
pub use files::{read_credentials, read_secret};
pub use node_id::{NodeRef, parse_node_id};
pub use risk::{RiskWarning, risky_settings};
pub use sinks::{
    ClientTlsKeys, Compression, DEFAULT_BATCH_LINGER, Forwarding, HttpsSinkConfig,
    JetStreamSinkConfig, MqttSinkConfig, MqttSinkFormat, OAuth2AuthMethod, OAuth2Config, Priority,
    SinkKeys, lanes,
};
pub use sources::{
    Deadband, HttpSourceConfig, MqttFormat, MqttProtocol, MqttSourceConfig, OnInvalid,
    OpcuaNodeConfig, OpcuaSourceConfig, SecurityMode, SecurityPolicy, TopicSubscription,
};

use locate::Locator;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`: who this agent is and where it keeps its state. Required.
    pub agent: AgentConfig,
    /// `[journal]`: the local SQLite journal. Optional; all keys have defaults.
    #[serde(default)]
    pub journal: JournalConfig,
    /// `[health]`: the HTTPS health, status and metrics server. Optional;
    /// absent means no health server.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// `[[sources.*]]`: where events come from; at least one.
    #[serde(default)]
    pub sources: SourcesConfig,
    /// `[[sinks.*]]`: where the journal is forwarded to; at least one.
    #[serde(default)]
    pub sinks: SinksConfig,
    /// `[[schemas]]`: JSON Schemas for the `data` of events of a CloudEvents
    /// type, checked before the event is acknowledged. Default: none.
    #[serde(default)]
    pub schemas: Vec<SchemaConfig>,
}

/// `[[schemas]]`: the JSON Schema (draft 7, 2019-09 or 2020-12) that the
/// `data` of every event of one CloudEvents type must match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// The CloudEvents `type` it governs, matched exactly (TOML key `type`),
    /// e.g. `"plantrelay.mes.production-confirmation.v1"`. Required.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The schema file (JSON). Its `$ref`s may name other local files,
    /// relative to it; nothing is fetched over a network. Required.
    pub file: PathBuf,
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent id, e.g. `"gw-hamburg-01"`: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
    /// Part of every event's CloudEvents `source` (`plantrelay://<id>/<source>`)
    /// and of upstream idempotency keys, so keep it stable. Required.
    pub id: String,
    /// Directory for `journal.db`; created at start if missing. Required.
    pub state_dir: PathBuf,
    /// How long a graceful shutdown may take before in-flight work is
    /// abandoned (it is safe in the journal). Default: `"10s"`.
    #[serde(
        default = "default_shutdown_timeout",
        deserialize_with = "units::duration_nonzero"
    )]
    pub shutdown_timeout: Duration,
    /// A sink's upstream failing at least this long is an outage: when it
    /// delivers again, the agent journals a `plantrelay.outage` event (and a
    /// `plantrelay.outage.drained` one once the backlog is gone), so the
    /// data itself tells the central platform. `"0s"` turns the reports off.
    /// Default: `"30s"`.
    #[serde(
        default = "default_outage_report_after",
        deserialize_with = "units::duration"
    )]
    pub outage_report_after: Duration,
}

/// `[journal]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Commit durability: `"full"` (survives power loss) or `"normal"`
    /// (survives a process crash). Default: `"full"`.
    #[serde(default)]
    pub sync: SyncMode,
    /// Most disk the journal may use (a size, at least `"16MiB"`). Default: `"2GiB"`.
    #[serde(default = "default_max_size", deserialize_with = "units::size")]
    pub max_size: u64,
    /// What happens when the journal is full: `"block"` (sources wait up to
    /// `block_timeout`, then are refused) or `"drop_oldest"` (evict the oldest
    /// undelivered events, telemetry first, and announce the gap). Default: `"block"`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// How long delivered events are kept for replay. Default: `"24h"`.
    #[serde(default = "default_retain_acked", deserialize_with = "units::duration")]
    pub retain_acked: Duration,
    /// A redelivered `(source, id)` within this window is not stored again.
    /// Default: `"1h"`.
    #[serde(default = "default_dedup_window", deserialize_with = "units::duration")]
    pub dedup_window: Duration,
    /// Most event ids remembered for deduplication, 1000 to 100M; the index
    /// takes 12 bytes per id (1M ids ≈ 11.4 MiB), allocated at start. When
    /// more ids arrive within `dedup_window` than this, the oldest are
    /// forgotten first.
    /// Default: `1000000`.
    #[serde(default = "default_dedup_max_ids")]
    pub dedup_max_ids: usize,
    /// Under `when_full = "block"`, how long a source waits for space before
    /// its event is refused (HTTP 503, MQTT not acknowledged). Default: `"5s"`.
    #[serde(
        default = "default_block_timeout",
        deserialize_with = "units::duration"
    )]
    pub block_timeout: Duration,
    /// How long the journal waits for more events to share a commit (one
    /// fsync, one page write) after an event arrives under light traffic,
    /// 0 to 100ms; `"0s"` commits each arrival at once. Acks wait for the
    /// commit, so this is the most it adds to a source's ack; under load
    /// commits group by themselves and do not wait. Default: `"40ms"`.
    #[serde(
        default = "default_commit_window",
        deserialize_with = "units::duration"
    )]
    pub commit_window: Duration,
    /// SQLite's page size for a journal created from now on, a power of two
    /// from 1KiB to 64KiB; an existing journal keeps its own. Smaller pages
    /// write fewer bytes per commit under light traffic and cost time on
    /// every pass over the whole file (the start-up check, a large
    /// backlog). Default: `4096`.
    #[serde(default = "default_page_size", deserialize_with = "units::size")]
    pub page_size: u64,
}

impl Default for JournalConfig {
    fn default() -> JournalConfig {
        JournalConfig {
            sync: SyncMode::default(),
            max_size: default_max_size(),
            when_full: WhenFull::default(),
            retain_acked: default_retain_acked(),
            dedup_window: default_dedup_window(),
            dedup_max_ids: default_dedup_max_ids(),
            block_timeout: default_block_timeout(),
            commit_window: default_commit_window(),
            page_size: default_page_size(),
        }
    }
}

/// Journal commit durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit: survives power loss (`"full"`).
    #[default]
    Full,
    /// Survives a process crash, not necessarily power loss (`"normal"`).
    Normal,
}

/// Behaviour of a full journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse new events until space is freed (`"block"`).
    #[default]
    Block,
    /// Evict the oldest undelivered events, telemetry first (`"drop_oldest"`).
    DropOldest,
}

/// `[health]`: `/healthz`, `/readyz`, `/api/v1/status`, `/metrics` over HTTPS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Address to listen on, `IP:port`, e.g. `"0.0.0.0:8443"`. Required.
    #[serde(deserialize_with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// PEM certificate chain of the server. Required.
    pub tls_cert: PathBuf,
    /// PEM private key of the server. Required.
    pub tls_key: PathBuf,
    /// PEM CA certificate(s); when set, clients must present a certificate
    /// issued by it. Default: none.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// File holding the bearer token required for read access. Default: none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// File holding the bearer token required for admin actions (e.g. replay).
    /// Default: none (admin actions disabled over HTTP).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Serve `/healthz` and `/readyz` without authentication (for load
    /// balancers and systemd probes). Default: `false`.
    #[serde(default)]
    pub open_probes: bool,
    /// Allow running with neither `token_file` nor `client_ca`. Default: `false`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// `/readyz` fails when a started source or sink made no progress for this
    /// long while it had work. Default: `"60s"`.
    #[serde(
        default = "default_stall_after",
        deserialize_with = "units::duration_nonzero"
    )]
    pub stall_after: Duration,
    /// Connections the health listener holds at once; at the cap it stops
    /// accepting until one closes. 1 to 65536. Default: `64`.
    #[serde(default = "default_health_max_connections")]
    pub max_connections: usize,
    /// Connections one client address (IPv6: one /64) may hold; more are
    /// closed at once. 1 to `max_connections`. Default: `16`.
    #[serde(default = "default_health_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Time for the TLS handshake, and for each request's headers, counted
    /// from when the connection is ready for it (so also the keep-alive idle
    /// timeout). 1s to 5m. Default: `"10s"`.
    #[serde(
        default = "default_header_timeout",
        deserialize_with = "units::duration"
    )]
    pub header_timeout: Duration,
    /// Time from the end of a request's headers until its answer is ready;
    /// past it the client gets `408`. 1s to 1h. Default: `"30s"`.
    #[serde(
        default = "default_health_request_timeout",
        deserialize_with = "units::duration"
    )]
    pub request_timeout: Duration,
}

/// `[sources]`: arrays of tables, one per kind. All default to empty; at
/// least one source in total is required.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// `[[sources.http]]`: HTTP ingest endpoints. Default: none.
    #[serde(default)]
    pub http: Vec<HttpSourceConfig>,
    /// `[[sources.mqtt]]`: MQTT subscriptions. Default: none.
    #[serde(default)]
    pub mqtt: Vec<MqttSourceConfig>,
    /// `[[sources.opcua]]`: OPC UA subscriptions. Default: none.
    #[serde(default)]
    pub opcua: Vec<OpcuaSourceConfig>,
}

/// `[sinks]`: arrays of tables, one per kind. All default to empty; at least
/// one sink in total is required.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    /// `[[sinks.https]]`: HTTPS ingest APIs. Default: none.
    #[serde(default)]
    pub https: Vec<HttpsSinkConfig>,
    /// `[[sinks.mqtt]]`: upstream MQTT brokers. Default: none.
    #[serde(default)]
    pub mqtt: Vec<MqttSinkConfig>,
    /// `[[sinks.jetstream]]`: NATS JetStream. Default: none.
    #[serde(default)]
    pub jetstream: Vec<JetStreamSinkConfig>,
}

fn default_outage_report_after() -> Duration {
    Duration::from_secs(30)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_size() -> u64 {
    2 * 1024 * 1024 * 1024
}
fn default_retain_acked() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}
fn default_dedup_window() -> Duration {
    Duration::from_secs(60 * 60)
}
fn default_dedup_max_ids() -> usize {
    1_000_000
}
fn default_block_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_commit_window() -> Duration {
    crate::journal::DEFAULT_COMMIT_WINDOW
}
fn default_page_size() -> u64 {
    u64::from(crate::journal::DEFAULT_PAGE_SIZE)
}
fn default_stall_after() -> Duration {
    Duration::from_secs(60)
}
fn default_health_max_connections() -> usize {
    64
}
fn default_health_max_connections_per_ip() -> usize {
    16
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_health_request_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// The journal's options from `[agent]` and `[journal]`.
    pub fn journal_options(&self) -> crate::journal::JournalOptions {
        let j = &self.journal;
        crate::journal::JournalOptions {
            path: self.agent.state_dir.join("journal.db"),
            sync: match j.sync {
                SyncMode::Full => crate::journal::SyncMode::Full,
                SyncMode::Normal => crate::journal::SyncMode::Normal,
            },
            max_size: j.max_size,
            when_full: match j.when_full {
                WhenFull::Block => crate::journal::WhenFull::Block,
                WhenFull::DropOldest => crate::journal::WhenFull::DropOldest,
            },
            retain_acked: j.retain_acked,
            dedup_window: j.dedup_window,
            dedup_max_ids: j.dedup_max_ids,
            block_timeout: j.block_timeout,
            commit_window: j.commit_window,
            // Validated to 1 KiB..=64 KiB.
            page_size: u32::try_from(j.page_size).unwrap_or(crate::journal::DEFAULT_PAGE_SIZE),
            sinks: self.cursor_keys(),
            disk_reserve: crate::journal::DEFAULT_DISK_RESERVE,
        }
    }

    /// Reads, parses and validates the config file at `path`, and checks that
    /// every file it names can be opened. Relative paths in the file are
    /// resolved against the file's directory and stored absolute.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(
                path.to_path_buf(),
                "",
                format!("cannot read config file: {e}"),
            )
        })?;
        let absolute = std::path::absolute(path).map_err(|e| {
            ConfigError::single(
                path.to_path_buf(),
                "",
                format!("cannot resolve config path: {e}"),
            )
        })?;
        build(&text, path, absolute.parent(), true)
    }

    /// Parses and validates config text without touching the filesystem.
    /// `origin` names the file in messages; relative paths are resolved
    /// against its directory when it has one.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let base = origin.parent().filter(|p| !p.as_os_str().is_empty());
        build(text, origin, base, false)
    }

    /// All source names: http, then mqtt, then opcua sources, each kind in
    /// file order.
    pub fn source_names(&self) -> Vec<&str> {
        let s = &self.sources;
        (s.http.iter().map(|x| x.name.as_str()))
            .chain(s.mqtt.iter().map(|x| x.name.as_str()))
            .chain(s.opcua.iter().map(|x| x.name.as_str()))
            .collect()
    }

    /// All sink names: https, then mqtt, then jetstream sinks, each kind in
    /// file order.
    /// The cursor key of every lane of every sink (see
    /// [`crate::journal::cursor_key`]): what retention waits for.
    pub fn cursor_keys(&self) -> Vec<String> {
        let s = &self.sinks;
        let routes = (s.https.iter().map(|x| (&x.name, &x.classes, x.priority)))
            .chain(s.mqtt.iter().map(|x| (&x.name, &x.classes, x.priority)))
            .chain(
                s.jetstream
                    .iter()
                    .map(|x| (&x.name, &x.classes, x.priority)),
            );
        routes
            .flat_map(|(name, classes, priority)| {
                sinks::lanes(classes, priority)
                    .into_iter()
                    .map(move |lane| crate::journal::cursor_key(name, lane))
            })
            .collect()
    }

    pub fn sink_names(&self) -> Vec<&str> {
        let s = &self.sinks;
        (s.https.iter().map(|x| x.name.as_str()))
            .chain(s.mqtt.iter().map(|x| x.name.as_str()))
            .chain(s.jetstream.iter().map(|x| x.name.as_str()))
            .collect()
    }
}

/// The pipeline behind [`Config::load`] and [`Config::parse`].
fn build(
    text: &str,
    origin: &Path,
    base: Option<&Path>,
    check_files: bool,
) -> Result<Config, ConfigError> {
    let fail = |issues| ConfigError {
        file: origin.to_path_buf(),
        issues,
    };
    let document = DeTable::parse(text).map_err(|e| fail(vec![locate::syntax_issue(text, &e)]))?;
    let locator = Locator::new(text, document.get_ref());
    let deserializer = toml::de::Deserializer::from(document.clone());
    let mut config: Config = serde_path_to_error::deserialize(deserializer)
        .map_err(|e| fail(vec![locate::de_issue(&locator, e)]))?;

    let mut raw = Vec::new();
    files::resolve_paths(&mut config, base, &mut raw);
    validate::validate(&config, &mut raw);
    if check_files {
        files::check_files(&mut config, &mut raw);
    }
    if raw.is_empty() {
        return Ok(config);
    }
    let mut issues: Vec<ConfigIssue> = raw.into_iter().map(|r| locator.issue(r)).collect();
    issues.sort_by_key(|i| (i.line.is_none(), i.line, i.column));
    Err(fail(issues))
}

/// Sections of the contract that parse but are not built yet: none in
/// this release (kept so that a later section can be refused clearly).
pub fn unsupported(_config: &Config) -> Vec<ConfigIssue> {
    Vec::new()
}
#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[agent]
id = "gw-1"
state_dir = "/var/lib/plantrelay"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:8081"

[[sinks.https]]
name = "central"
url = "https://ingest.example.com/v1/events"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("plantrelay.toml"))
    }

    #[test]
    fn a_minimal_config_gets_every_documented_default() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.agent.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.journal, JournalConfig::default());
        assert_eq!(c.journal.max_size, 2 << 30);
        assert_eq!(c.journal.sync, SyncMode::Full);
        assert_eq!(c.journal.when_full, WhenFull::Block);
        assert_eq!(c.journal.retain_acked, Duration::from_secs(86_400));
        assert_eq!(c.journal.dedup_window, Duration::from_secs(3_600));
        assert_eq!(c.journal.dedup_max_ids, 1_000_000);
        assert_eq!(c.journal.block_timeout, Duration::from_secs(5));
        assert!(c.health.is_none());
        let http = &c.sources.http[0];
        assert_eq!(http.class, crate::event::Class::Critical);
        assert_eq!(http.max_body, 4 << 20);
        let sink = &c.sinks.https[0];
        assert_eq!(sink.timeout, Duration::from_secs(30));
        assert_eq!(sink.compression, Compression::Gzip);
        assert_eq!(sink.batch_max_events, 1000);
        assert_eq!(sink.batch_max_bytes, 4 << 20);
        assert_eq!(sink.max_events_per_sec, 0);
        assert_eq!(sink.retry_initial, Duration::from_millis(500));
        assert_eq!(sink.retry_max, Duration::from_secs(60));
        assert!(!sink.allow_plain_http && !sink.ca_only);
    }

    #[test]
    fn mqtt_and_opcua_sources_get_their_defaults() {
        let text = format!(
            "{MINIMAL}\n[[sources.mqtt]]\nname = \"line3\"\nurl = \"mqtt://broker:1883\"\n\
             topics = [\"a/+\", {{ filter = \"b/#\", qos = 2 }}]\n\
             [[sources.opcua]]\nname = \"press\"\nendpoint = \"opc.tcp://10.0.3.10:4840\"\n\
             [[sources.opcua.nodes]]\nnode_id = \"ns=2;s=P.State\"\nstream = \"line3/p\"\n\
             deadband = {{ percent = 5 }}\nstate_map = {{ \"0\" = \"stopped\", \"-1\" = \"fault\" }}\n"
        );
        let c = parse(&text).unwrap();
        let m = &c.sources.mqtt[0];
        assert_eq!(
            m.topics,
            vec![
                TopicSubscription {
                    filter: "a/+".into(),
                    qos: 1
                },
                TopicSubscription {
                    filter: "b/#".into(),
                    qos: 2
                },
            ]
        );
        assert_eq!(m.stream, "{topic}");
        assert_eq!(m.event_type, "plantrelay.mqtt.message");
        assert_eq!(m.class, crate::event::Class::Telemetry);
        assert_eq!((m.max_inflight, m.max_payload), (100, 1 << 20));
        assert_eq!(
            (m.protocol, m.format, m.on_invalid),
            (MqttProtocol::V311, MqttFormat::Json, OnInvalid::Journal)
        );
        assert_eq!(m.keep_alive, Duration::from_secs(30));
        let o = &c.sources.opcua[0];
        assert_eq!(
            (o.security_policy, o.security_mode),
            (SecurityPolicy::Basic256Sha256, SecurityMode::SignAndEncrypt)
        );
        assert_eq!((o.keep_alive_count, o.lifetime_count), (10, 30));
        assert_eq!(o.publishing_interval, Duration::from_secs(1));
        assert_eq!(o.connect_timeout, Duration::from_secs(10));
        let n = &o.nodes[0];
        assert_eq!(n.sampling_interval, Duration::from_millis(500));
        assert_eq!(n.queue_size, 10);
        assert_eq!(n.deadband, Some(Deadband::Percent(5.0)));
        let states = n.state_map.as_ref().unwrap();
        assert_eq!(states.get(&-1).map(String::as_str), Some("fault"));
        assert_eq!(c.source_names(), vec!["mes", "line3", "press"]);
    }

    #[test]
    fn enum_spellings_match_their_as_str() {
        for p in [
            SecurityPolicy::None,
            SecurityPolicy::Basic256Sha256,
            SecurityPolicy::Aes128Sha256RsaOaep,
            SecurityPolicy::Aes256Sha256RsaPss,
        ] {
            let text = MINIMAL.replace(
                "[[sinks.https]]",
                &format!(
                    "[[sources.opcua]]\nname = \"o\"\nendpoint = \"opc.tcp://h:4840\"\n\
                     security_policy = \"{p}\"\nsecurity_mode = \"{}\"\n\
                     [[sources.opcua.nodes]]\nnode_id = \"i=1\"\nstream = \"s\"\n[[sinks.https]]",
                    if p == SecurityPolicy::None {
                        "None"
                    } else {
                        "Sign"
                    }
                ),
            );
            let c = parse(&text).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(c.sources.opcua[0].security_policy, p);
        }
    }
}
