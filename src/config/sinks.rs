//! `[[sinks.https]]`, `[[sinks.mqtt]]` and `[[sinks.jetstream]]`: where the
//! journal is forwarded to, and the checks of their keys that the types
//! alone cannot make. The field docs are the user documentation. No I/O.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::checks::{check_subject_literal, check_template};
use super::sources::MqttProtocol;
use super::units;
use super::validate::{
    Issues, MAX_BATCH_LINGER, SINK_PLACEHOLDERS, at_most, classes, mqtt_tls_needs_mqtts,
    stream_filters,
};
use crate::event::Class;

/// The order a sink delivers in (`priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Critical events ahead of any telemetry backlog (`"critical_first"`).
    #[default]
    CriticalFirst,
    /// Every event in journal (arrival) order (`"journal_order"`).
    JournalOrder,
}

/// The lanes of a sink: one cursor each, `None` for one lane over every
/// class in journal order. A sink taking one class has that class's lane
/// whatever its priority, so changing the priority keeps its cursor.
pub fn lanes(classes: &[Class], priority: Priority) -> Vec<Option<Class>> {
    let takes = |c| classes.contains(&c);
    match (takes(Class::Critical), takes(Class::Telemetry), priority) {
        (true, true, Priority::CriticalFirst) => {
            vec![Some(Class::Critical), Some(Class::Telemetry)]
        }
        (true, true, Priority::JournalOrder) => vec![None],
        (true, false, _) => vec![Some(Class::Critical)],
        (false, true, _) => vec![Some(Class::Telemetry)],
        (false, false, _) => Vec::new(),
    }
}

/// The keys every sink kind shares: what it takes (routing, lanes) and
/// how it forwards (batching, pacing, retries). They are written out in
/// each kind's table rather than `#[serde(flatten)]`ed in, because a
/// flattened table loses the line of a wrong value and the "did you mean"
/// of a mistyped key; they are read through this one view instead, for one
/// validation and one conversion into forwarder settings.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    pub name: &'a str,
    pub batch_max_events: usize,
    /// The kind's largest `batch_max_events`.
    pub batch_max_events_limit: usize,
    /// `batch_max_bytes`, for the kinds that have it.
    pub batch_max_bytes: Option<u64>,
    pub max_events_per_sec: u32,
    pub batch_linger: Duration,
    pub classes: &'a [Class],
    pub streams: &'a [String],
    pub priority: Priority,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// The client TLS keys of a sink kind.
#[derive(Debug, Clone, Copy)]
pub struct ClientTlsKeys<'a> {
    pub ca_file: Option<&'a PathBuf>,
    pub client_cert: Option<&'a PathBuf>,
    pub client_key: Option<&'a PathBuf>,
}

/// What every sink config offers, whatever its kind.
pub trait SinkKeys {
    /// `"https"`, `"mqtt"` or `"jetstream"`.
    const KIND: &'static str;
    fn forwarding(&self) -> Forwarding<'_>;
    fn tls(&self) -> ClientTlsKeys<'_>;
}

/// Largest batch of an HTTPS or JetStream sink.
pub const MAX_BATCH_EVENTS: usize = 100_000;
/// Largest in-flight window of an MQTT sink (packet ids are 16 bits).
pub const MAX_MQTT_INFLIGHT: usize = 65_535;

macro_rules! sink_keys {
    ($ty:ty, $kind:literal, $limit:expr, |$s:ident| $bytes:expr) => {
        impl SinkKeys for $ty {
            const KIND: &'static str = $kind;

            fn forwarding(&self) -> Forwarding<'_> {
                let $s = self;
                Forwarding {
                    name: &self.name,
                    batch_max_events: self.batch_max_events,
                    batch_max_events_limit: $limit,
                    batch_max_bytes: $bytes,
                    max_events_per_sec: self.max_events_per_sec,
                    batch_linger: self.batch_linger,
                    classes: &self.classes,
                    streams: &self.streams,
                    priority: self.priority,
                    retry_initial: self.retry_initial,
                    retry_max: self.retry_max,
                }
            }

            fn tls(&self) -> ClientTlsKeys<'_> {
                ClientTlsKeys {
                    ca_file: self.ca_file.as_ref(),
                    client_cert: self.client_cert.as_ref(),
                    client_key: self.client_key.as_ref(),
                }
            }
        }
    };
}

sink_keys!(HttpsSinkConfig, "https", MAX_BATCH_EVENTS, |s| Some(
    s.batch_max_bytes
));
sink_keys!(MqttSinkConfig, "mqtt", MAX_MQTT_INFLIGHT, |_s| None);
sink_keys!(JetStreamSinkConfig, "jetstream", MAX_BATCH_EVENTS, |_s| {
    None
});

/// `[[sinks.https]]`: POST CloudEvents batches
/// (`application/cloudevents-batch+json`) to an HTTPS ingest API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsSinkConfig {
    /// Unique sink name (`[A-Za-z0-9][A-Za-z0-9._-]{0,62}`); names its cursor
    /// in the journal. Required.
    pub name: String,
    /// Ingest URL, `https://...` (`http://` only with `allow_plain_http`). Required.
    #[serde(deserialize_with = "units::url")]
    pub url: Url,
    /// PEM CA certificate(s) trusted for the upstream, in addition to the
    /// system trust store (see `ca_only`). Default: none.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Trust only `ca_file`, not the system trust store; requires `ca_file`.
    /// Default: `false`.
    #[serde(default)]
    pub ca_only: bool,
    /// PEM client certificate for mutual TLS; requires `client_key`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// File holding a bearer token sent as `Authorization: Bearer`. Default: none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Timeout of one batch request. Default: `"30s"`.
    #[serde(default = "default_30s", deserialize_with = "units::duration_nonzero")]
    pub timeout: Duration,
    /// Request body compression: `"gzip"`, `"zstd"` or `"none"`. Default: `"gzip"`.
    #[serde(default)]
    pub compression: Compression,
    /// Most events per batch, 1 to 100000. Default: `1000`.
    #[serde(default = "default_1000")]
    pub batch_max_events: usize,
    /// Largest uncompressed batch body (a size). Default: `"4MiB"`.
    #[serde(default = "default_4mib", deserialize_with = "units::size")]
    pub batch_max_bytes: u64,
    /// Cap on events sent per second, to drain a backlog gently after an
    /// outage; `0` = unlimited. Default: `0`.
    #[serde(default)]
    pub max_events_per_sec: u32,
    /// How long a batch smaller than `batch_max_events` waits for more
    /// events, counted from its oldest event's arrival, 0 to 10s; `"0s"`
    /// sends whatever is there at once. A full batch, and an event already
    /// this old (a backlog after an outage), never wait. Fewer, larger
    /// requests and cursor writes under light traffic, for at most this
    /// much delivery delay. Default: `"250ms"`.
    #[serde(default = "default_batch_linger", deserialize_with = "units::duration")]
    pub batch_linger: Duration,
    /// Classes of events this sink takes: `["critical"]`, `["telemetry"]`
    /// or both. It also receives the `plantrelay.gap` events of the classes
    /// it takes. Default: both.
    #[serde(default = "all_classes")]
    pub classes: Vec<Class>,
    /// Streams this sink takes: MQTT-style filters over the stream name
    /// (`+` one level, `#` the rest), e.g. `["mes/#", "line3/+"]`; with
    /// `classes`, a sink takes the events that match both. Default: every
    /// stream.
    #[serde(default)]
    pub streams: Vec<String>,
    /// `"critical_first"`: critical events go ahead of any telemetry
    /// backlog (one cursor per class; per stream, order always holds);
    /// `"journal_order"`: everything in arrival order. Default:
    /// `"critical_first"`.
    #[serde(default)]
    pub priority: Priority,
    /// First retry delay after a failed batch (doubles, with jitter, up to
    /// `retry_max`). Default: `"500ms"`.
    #[serde(
        default = "default_500ms",
        deserialize_with = "units::duration_nonzero"
    )]
    pub retry_initial: Duration,
    /// Longest retry delay, at least `retry_initial`. Default: `"60s"`.
    #[serde(default = "default_60s", deserialize_with = "units::duration_nonzero")]
    pub retry_max: Duration,
    /// Allow a plain `http://` URL (tests and local relays only). Default: `false`.
    #[serde(default)]
    pub allow_plain_http: bool,
    /// `[sinks.https.oauth2]`: fetch bearer tokens with the OAuth2 client
    /// credentials grant instead of reading `token_file`. Default: none.
    #[serde(default)]
    pub oauth2: Option<OAuth2Config>,
}

/// `[sinks.https.oauth2]`: OAuth2 client credentials (RFC 6749 §4.4) for an
/// upstream behind API management. The token is cached and renewed before
/// it expires; the token endpoint is reached with the sink's TLS settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The token endpoint, `https://...` (`http://` only with the sink's
    /// `allow_plain_http`). Required.
    #[serde(deserialize_with = "units::url")]
    pub token_url: Url,
    /// The client id. Required.
    pub client_id: String,
    /// File holding the client secret. Required.
    pub client_secret_file: PathBuf,
    /// Scopes to ask for (space-free tokens). Default: none (the server's
    /// default scope).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// How the client authenticates: `"basic"` (HTTP Basic, RFC 6749
    /// §2.3.1) or `"post"` (client id and secret in the form body).
    /// Default: `"basic"`.
    #[serde(default)]
    pub auth_method: OAuth2AuthMethod,
}

/// How an OAuth2 client sends its credentials to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OAuth2AuthMethod {
    /// `Authorization: Basic` (`"basic"`, `client_secret_basic`).
    #[default]
    Basic,
    /// In the form body (`"post"`, `client_secret_post`).
    Post,
}

/// Request body compression of an HTTPS sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `Content-Encoding: gzip` (`"gzip"`).
    #[default]
    Gzip,
    /// `Content-Encoding: zstd` (`"zstd"`).
    Zstd,
    /// Uncompressed (`"none"`).
    None,
}

/// `[[sinks.mqtt]]`: publish each event to an upstream MQTT broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Unique sink name. Required.
    pub name: String,
    /// Broker URL: `mqtt://host[:port]` or `mqtts://host[:port]`. Required.
    #[serde(deserialize_with = "units::url")]
    pub url: Url,
    /// Topic template; placeholders `{agent}`, `{source}` and `{stream}`; no
    /// wildcards. Default: `"plantrelay/{agent}/{stream}"`.
    #[serde(default = "default_mqtt_topic")]
    pub topic: String,
    /// Publish QoS: 1 or 2 (0 cannot be acknowledged). Default: `1`.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT client id. Default: `plantrelay-<agent id>-<sink name>`.
    #[serde(default)]
    pub client_id: Option<String>,
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
    /// Payload of each publish: `"cloudevents_json"` (a structured
    /// CloudEvent: attributes and `data` in one JSON object) or `"data"`
    /// (the event's `data` alone; with `protocol = "v5"` the CloudEvents
    /// attributes travel as user properties). Default: `"cloudevents_json"`.
    #[serde(default)]
    pub format: MqttSinkFormat,
    /// Publish with the retain flag. Default: `false`.
    #[serde(default)]
    pub retain: bool,
    /// Most publishes in flight (unacknowledged) at once, 1 to 65535. Default: `100`.
    #[serde(default = "default_100")]
    pub batch_max_events: usize,
    /// Cap on events sent per second; `0` = unlimited. Default: `0`.
    #[serde(default)]
    pub max_events_per_sec: u32,
    /// How long a batch smaller than `batch_max_events` waits for more
    /// events (see `[[sinks.https]]`), 0 to 10s. Default: `"100ms"`.
    #[serde(default = "default_100ms", deserialize_with = "units::duration")]
    pub batch_linger: Duration,
    /// Timeout for connecting and for the acknowledgements of a batch.
    /// Default: `"10s"`.
    #[serde(default = "default_10s", deserialize_with = "units::duration_nonzero")]
    pub timeout: Duration,
    /// Classes of events this sink takes: `["critical"]`, `["telemetry"]`
    /// or both. It also receives the `plantrelay.gap` events of the classes
    /// it takes. Default: both.
    #[serde(default = "all_classes")]
    pub classes: Vec<Class>,
    /// Streams this sink takes: MQTT-style filters over the stream name
    /// (`+` one level, `#` the rest), e.g. `["mes/#", "line3/+"]`; with
    /// `classes`, a sink takes the events that match both. Default: every
    /// stream.
    #[serde(default)]
    pub streams: Vec<String>,
    /// `"critical_first"`: critical events go ahead of any telemetry
    /// backlog (one cursor per class; per stream, order always holds);
    /// `"journal_order"`: everything in arrival order. Default:
    /// `"critical_first"`.
    #[serde(default)]
    pub priority: Priority,
    /// First retry delay after a failure. Default: `"500ms"`.
    #[serde(
        default = "default_500ms",
        deserialize_with = "units::duration_nonzero"
    )]
    pub retry_initial: Duration,
    /// Longest retry delay, at least `retry_initial`. Default: `"60s"`.
    #[serde(default = "default_60s", deserialize_with = "units::duration_nonzero")]
    pub retry_max: Duration,
}

/// Payload of an MQTT sink's publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttSinkFormat {
    /// A structured CloudEvent in JSON (`"cloudevents_json"`).
    #[default]
    CloudeventsJson,
    /// The event's `data` alone (`"data"`).
    Data,
}

/// `[[sinks.jetstream]]`: publish each event to NATS JetStream with
/// `Nats-Msg-Id` set to the event id (server-side dedup).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamSinkConfig {
    /// Unique sink name. Required.
    pub name: String,
    /// Server URL, `nats://host[:port]` or `tls://host[:port]`, or a list
    /// of them (the servers of one cluster, tried in turn). Required.
    #[serde(deserialize_with = "units::urls")]
    pub url: Vec<Url>,
    /// Subject template; placeholders `{agent}`, `{source}` and `{stream}`; no
    /// wildcards or spaces. Default: `"plantrelay.{agent}.{stream}"`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// JetStream stream that must exist and capture the subjects; checked at
    /// start. Default: none (any stream that captures them).
    #[serde(default)]
    pub stream: Option<String>,
    /// Create `stream` (file storage, capturing the subjects of this
    /// agent) when it does not exist; requires `stream`. Default: `false`.
    #[serde(default)]
    pub create_stream: bool,
    /// The server's deduplication window for a stream this sink creates;
    /// at least `retry_max` + `timeout`, so that a batch resent after a
    /// failure or a restart is recognised. Default: `"10m"`.
    #[serde(default = "default_10m", deserialize_with = "units::duration_nonzero")]
    pub duplicate_window: Duration,
    /// File holding a NATS token; excludes `credentials_file`. Default: none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// NATS `.creds` file (JWT and NKey seed). Default: none.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify the server with. Default: none (the
    /// system trust store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; requires `client_key`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Most publishes awaiting their JetStream ack at once, 1 to 100000.
    /// Default: `256`.
    #[serde(default = "default_256")]
    pub batch_max_events: usize,
    /// Cap on events sent per second; `0` = unlimited. Default: `0`.
    #[serde(default)]
    pub max_events_per_sec: u32,
    /// How long a batch smaller than `batch_max_events` waits for more
    /// events (see `[[sinks.https]]`), 0 to 10s. Default: `"100ms"`.
    #[serde(default = "default_100ms", deserialize_with = "units::duration")]
    pub batch_linger: Duration,
    /// Classes of events this sink takes: `["critical"]`, `["telemetry"]`
    /// or both. It also receives the `plantrelay.gap` events of the classes
    /// it takes. Default: both.
    #[serde(default = "all_classes")]
    pub classes: Vec<Class>,
    /// Streams this sink takes: MQTT-style filters over the stream name
    /// (`+` one level, `#` the rest), e.g. `["mes/#", "line3/+"]`; with
    /// `classes`, a sink takes the events that match both. Default: every
    /// stream.
    #[serde(default)]
    pub streams: Vec<String>,
    /// `"critical_first"`: critical events go ahead of any telemetry
    /// backlog (one cursor per class; per stream, order always holds);
    /// `"journal_order"`: everything in arrival order. Default:
    /// `"critical_first"`.
    #[serde(default)]
    pub priority: Priority,
    /// First retry delay after a failure. Default: `"500ms"`.
    #[serde(
        default = "default_500ms",
        deserialize_with = "units::duration_nonzero"
    )]
    pub retry_initial: Duration,
    /// Longest retry delay, at least `retry_initial`. Default: `"60s"`.
    #[serde(default = "default_60s", deserialize_with = "units::duration_nonzero")]
    pub retry_max: Duration,
    /// Timeout for connecting and for each publish acknowledgement. Default: `"10s"`.
    #[serde(default = "default_10s", deserialize_with = "units::duration_nonzero")]
    pub timeout: Duration,
}

// Validation: what the types alone cannot say about a sink's keys.

/// The keys every sink kind shares (see [`Forwarding`]).
fn check_forwarding(issues: &mut Issues<'_>, p: &str, f: &Forwarding<'_>) {
    classes(issues, p, f.classes);
    stream_filters(issues, p, f.streams);
    issues.batch(
        format!("{p}.batch_max_events"),
        f.batch_max_events,
        f.batch_max_events_limit,
    );
    if f.batch_max_bytes == Some(0) {
        issues.push(format!("{p}.batch_max_bytes"), "must be greater than zero");
    }
    at_most(
        issues,
        format!("{p}.batch_linger"),
        f.batch_linger,
        MAX_BATCH_LINGER,
        "delivery may wait this long",
    );
    issues.retry(p, f.retry_initial, f.retry_max);
}

/// A client certificate needs its key, and the other way round.
fn check_client_tls(issues: &mut Issues<'_>, p: &str, t: &ClientTlsKeys<'_>) {
    issues.pair(
        p,
        ("client_cert", t.client_cert.is_some()),
        ("client_key", t.client_key.is_some()),
    );
}

pub(super) fn check_https(issues: &mut Issues<'_>, p: &str, s: &HttpsSinkConfig) {
    check_forwarding(issues, p, &s.forwarding());
    check_client_tls(issues, p, &s.tls());
    let schemes: &[&str] = if s.allow_plain_http {
        &["https", "http"]
    } else {
        &["https"]
    };
    let note = if s.allow_plain_http || s.url.scheme() != "http" {
        ""
    } else {
        " (plain `http://` needs allow_plain_http = true)"
    };
    issues.url(&format!("{p}.url"), &s.url, schemes, note);
    issues.requires(p, ("ca_only", s.ca_only), ("ca_file", s.ca_file.is_some()));
    if let Some(o) = &s.oauth2 {
        let q = format!("{p}.oauth2");
        if s.token_file.is_some() {
            issues.push(
                format!("{p}.token_file"),
                "token_file and [sinks.https.oauth2] exclude each other: the bearer token \
                 comes from one or the other",
            );
        }
        issues.url(&format!("{q}.token_url"), &o.token_url, schemes, note);
        issues.non_empty(format!("{q}.client_id"), &o.client_id);
        for (i, scope) in o.scopes.iter().enumerate() {
            // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
            let valid = !scope.is_empty()
                && scope
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
            if !valid {
                issues.push(
                    format!("{q}.scopes[{i}]"),
                    format!(
                        "{scope:?} is not a scope token (printable ASCII without spaces, \
                         quotes or backslashes; list several scopes as separate strings)"
                    ),
                );
            }
        }
    }
}

pub(super) fn check_mqtt(issues: &mut Issues<'_>, p: &str, s: &MqttSinkConfig) {
    check_forwarding(issues, p, &s.forwarding());
    check_client_tls(issues, p, &s.tls());
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
    let placeholder = |name: &str| SINK_PLACEHOLDERS.contains(&name);
    let allowed = "`{agent}`, `{source}` or `{stream}`";
    match check_template(&s.topic, &placeholder, allowed) {
        Err(message) => issues.push(format!("{p}.topic"), message),
        Ok(()) if s.topic.contains(['+', '#']) => issues.push(
            format!("{p}.topic"),
            "a publish topic must not contain the wildcards `+` or `#`",
        ),
        Ok(()) => {}
    }
    if !(1..=2).contains(&s.qos) {
        issues.push(format!("{p}.qos"), format!("must be 1 or 2, got {}", s.qos));
    }
    if let Some(id) = &s.client_id {
        issues.non_empty(format!("{p}.client_id"), id);
    }
    issues.mqtt_keep_alive(format!("{p}.keep_alive"), s.keep_alive);
    issues.requires(
        p,
        ("password_file", s.password_file.is_some()),
        ("username", s.username.is_some()),
    );
}

pub(super) fn check_jetstream(issues: &mut Issues<'_>, p: &str, s: &JetStreamSinkConfig) {
    check_forwarding(issues, p, &s.forwarding());
    check_client_tls(issues, p, &s.tls());
    for url in &s.url {
        issues.url(&format!("{p}.url"), url, &["nats", "tls"], "");
    }
    let placeholder = |name: &str| SINK_PLACEHOLDERS.contains(&name);
    let allowed = "`{agent}`, `{source}` or `{stream}`";
    match check_template(&s.subject, &placeholder, allowed) {
        Err(message) => issues.push(format!("{p}.subject"), message),
        Ok(()) => {
            if let Err(message) = check_subject_literal(&s.subject) {
                issues.push(format!("{p}.subject"), message);
            }
        }
    }
    if let Some(stream) = &s.stream
        && (stream.is_empty()
            || stream.contains(|c: char| c.is_whitespace() || ".*>/\\".contains(c)))
    {
        issues.push(
            format!("{p}.stream"),
            format!(
                "invalid JetStream stream name `{stream}`: must be non-empty without spaces, `.`, `*`, `>`, `/` or `\\`"
            ),
        );
    }
    issues.requires(
        p,
        ("create_stream", s.create_stream),
        ("stream", s.stream.is_some()),
    );
    let horizon = s.retry_max + s.timeout;
    if s.duplicate_window < horizon {
        issues.push(
            format!("{p}.duplicate_window"),
            format!(
                "must be at least retry_max + timeout ({}), so that a batch resent after a failure is recognised as a duplicate",
                humantime::format_duration(horizon)
            ),
        );
    }
    if s.token_file.is_some() && s.credentials_file.is_some() {
        issues.push(
            format!("{p}.credentials_file"),
            "set either token_file or credentials_file, not both",
        );
    }
}

fn all_classes() -> Vec<Class> {
    vec![Class::Critical, Class::Telemetry]
}
fn default_30s() -> Duration {
    Duration::from_secs(30)
}
fn default_10s() -> Duration {
    Duration::from_secs(10)
}
fn default_10m() -> Duration {
    Duration::from_secs(600)
}
fn default_100ms() -> Duration {
    Duration::from_millis(100)
}
fn default_60s() -> Duration {
    Duration::from_secs(60)
}
/// Default `batch_linger`: at most 4 requests (and 4 cursor writes) a
/// second per sink below saturation instead of one per commit, for at most
/// a quarter of a second of delivery delay, which MES workflows do not
/// notice (peers default to 0.5–10 s).
pub const DEFAULT_BATCH_LINGER: Duration = Duration::from_millis(250);

fn default_batch_linger() -> Duration {
    DEFAULT_BATCH_LINGER
}
fn default_500ms() -> Duration {
    Duration::from_millis(500)
}
fn default_1000() -> usize {
    1000
}
fn default_100() -> usize {
    100
}
fn default_256() -> usize {
    256
}
fn default_4mib() -> u64 {
    4 * 1024 * 1024
}
fn default_qos() -> u8 {
    1
}
fn default_mqtt_topic() -> String {
    "plantrelay/{agent}/{stream}".to_owned()
}
fn default_subject() -> String {
    "plantrelay.{agent}.{stream}".to_owned()
}
