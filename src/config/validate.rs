//! Semantic validation of a deserialised [`Config`]: everything the types
//! alone cannot say (names, URL schemes, paired keys, ranges, node ids, topic
//! filters, templates, listener clashes). Every issue is collected, none stops
//! the others; positions are added later by the locator. No I/O here.
//!
//! This module holds the whole-config checks (agent, journal, health, names,
//! listeners, stream classes) and the helpers; each source and sink kind's
//! own checks live beside its config type (`sources.rs`, `sinks.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use url::Url;

use crate::event::Class;

use super::locate::RawIssue;
use super::sources::SecurityMode;
use super::{AgentConfig, Config, HealthConfig, JournalConfig};

/// Smallest accepted `journal.max_size`.
pub(crate) const MIN_JOURNAL_SIZE: u64 = 16 * 1024 * 1024;
/// Smallest accepted `journal.dedup_max_ids`.
const MIN_DEDUP_IDS: usize = 1000;
/// Largest accepted `journal.dedup_max_ids`: its index (12 bytes an id) is
/// allocated at start, and a stray digit should not ask for gigabytes.
const MAX_DEDUP_IDS: usize = 100_000_000;
/// Largest `max_connections` of a listener.
const MAX_LISTENER_CONNECTIONS: usize = 65_536;
/// Upper bound of `journal.commit_window`: every ack may wait this long.
const MAX_COMMIT_WINDOW: Duration = Duration::from_millis(100);
/// Upper bound of a sink's `batch_linger`: delivery may wait this long.
pub(super) const MAX_BATCH_LINGER: Duration = Duration::from_secs(10);
/// Placeholders a sink topic or subject template may use.
pub(super) const SINK_PLACEHOLDERS: &[&str] = &["agent", "source", "stream"];

/// Collects issues, each for a key path.
pub(super) struct Issues<'a> {
    out: &'a mut Vec<RawIssue>,
}

impl Issues<'_> {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(RawIssue::new(path, message));
    }

    /// Reports on whichever of two keys that must come together is set alone.
    pub(super) fn pair(&mut self, prefix: &str, a: (&str, bool), b: (&str, bool)) {
        let (set, unset) = match (a.1, b.1) {
            (true, false) => (a.0, b.0),
            (false, true) => (b.0, a.0),
            _ => return,
        };
        self.push(
            format!("{prefix}.{set}"),
            format!("`{set}` is set but `{unset}` is not: set both or neither"),
        );
    }

    /// Reports a key that is set although the key it depends on is not.
    pub(super) fn requires(&mut self, prefix: &str, key: (&str, bool), needed: (&str, bool)) {
        if key.1 && !needed.1 {
            self.push(
                format!("{prefix}.{}", key.0),
                format!("`{}` requires `{}` to be set", key.0, needed.0),
            );
        }
    }

    /// Checks a URL's scheme, host and that it carries no credentials.
    pub(super) fn url(&mut self, path: &str, url: &Url, schemes: &[&str], note: &str) {
        if !schemes.contains(&url.scheme()) {
            let expected: Vec<String> = schemes.iter().map(|s| format!("`{s}://`")).collect();
            self.push(
                path,
                format!(
                    "unsupported URL scheme `{}://`: expected {}{note}",
                    url.scheme(),
                    expected.join(" or ")
                ),
            );
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.push(path, format!("URL `{url}` has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.push(
                path,
                "credentials in URLs are not allowed: secrets are read from files \
                 (username with password_file, or token_file)",
            );
        }
    }

    pub(super) fn batch(&mut self, path: String, value: usize, max: usize) {
        if !(1..=max).contains(&value) {
            self.push(path, format!("must be between 1 and {max}, got {value}"));
        }
    }

    pub(super) fn retry(&mut self, prefix: &str, initial: Duration, max: Duration) {
        if max < initial {
            self.push(
                format!("{prefix}.retry_max"),
                format!(
                    "retry_max ({}) must be at least retry_initial ({})",
                    humantime::format_duration(max),
                    humantime::format_duration(initial)
                ),
            );
        }
    }

    pub(super) fn mqtt_keep_alive(&mut self, path: String, keep_alive: Duration) {
        if keep_alive < Duration::from_secs(1) || keep_alive > Duration::from_secs(65_535) {
            self.push(path, "must be between 1s and 65535s");
        }
    }

    /// The connection caps and timeouts every listener has (`crate::serve`).
    pub(super) fn listener_limits(
        &mut self,
        p: &str,
        max_connections: usize,
        per_ip: usize,
        header_timeout: Duration,
        request_timeout: Duration,
    ) {
        if !(1..=MAX_LISTENER_CONNECTIONS).contains(&max_connections) {
            self.push(
                format!("{p}.max_connections"),
                format!("must be between 1 and {MAX_LISTENER_CONNECTIONS} (got {max_connections})"),
            );
        }
        if per_ip == 0 || per_ip > max_connections.max(1) {
            self.push(
                format!("{p}.max_connections_per_ip"),
                format!(
                    "must be between 1 and max_connections ({max_connections}) (got {per_ip}); \
                     keep it below max_connections so that one host cannot fill the listener"
                ),
            );
        }
        let secs = |d: Duration| humantime::format_duration(d).to_string();
        if header_timeout < Duration::from_secs(1) || header_timeout > Duration::from_secs(300) {
            self.push(
                format!("{p}.header_timeout"),
                format!("must be between 1s and 5m (got {})", secs(header_timeout)),
            );
        }
        if request_timeout < Duration::from_secs(1) || request_timeout > Duration::from_secs(3600) {
            self.push(
                format!("{p}.request_timeout"),
                format!("must be between 1s and 1h (got {})", secs(request_timeout)),
            );
        }
    }

    pub(super) fn non_empty(&mut self, path: String, value: &str) {
        if value.trim().is_empty() {
            self.push(path, "must not be empty");
        }
    }
}

/// Validates everything that needs no filesystem access.
pub(crate) fn validate(config: &Config, out: &mut Vec<RawIssue>) {
    let mut issues = Issues { out };
    agent(&mut issues, &config.agent);
    journal(&mut issues, &config.journal);
    if let Some(health_config) = &config.health {
        health(&mut issues, health_config);
    }

    let sources = &config.sources;
    for (i, s) in sources.http.iter().enumerate() {
        super::sources::check_http(&mut issues, &format!("sources.http[{i}]"), s);
    }
    for (i, s) in sources.mqtt.iter().enumerate() {
        super::sources::check_mqtt(&mut issues, &format!("sources.mqtt[{i}]"), s);
    }
    for (i, s) in sources.opcua.iter().enumerate() {
        super::sources::check_opcua(&mut issues, &format!("sources.opcua[{i}]"), s);
    }
    let sinks = &config.sinks;
    for (i, s) in sinks.https.iter().enumerate() {
        super::sinks::check_https(&mut issues, &format!("sinks.https[{i}]"), s);
    }
    for (i, s) in sinks.mqtt.iter().enumerate() {
        super::sinks::check_mqtt(&mut issues, &format!("sinks.mqtt[{i}]"), s);
    }
    for (i, s) in sinks.jetstream.iter().enumerate() {
        super::sinks::check_jetstream(&mut issues, &format!("sinks.jetstream[{i}]"), s);
    }

    let source_names: Vec<(String, &str)> = (sources.http.iter().enumerate())
        .map(|(i, s)| (format!("sources.http[{i}].name"), s.name.as_str()))
        .chain(
            (sources.mqtt.iter().enumerate())
                .map(|(i, s)| (format!("sources.mqtt[{i}].name"), s.name.as_str())),
        )
        .chain(
            (sources.opcua.iter().enumerate())
                .map(|(i, s)| (format!("sources.opcua[{i}].name"), s.name.as_str())),
        )
        .collect();
    let sink_names: Vec<(String, &str)> = (sinks.https.iter().enumerate())
        .map(|(i, s)| (format!("sinks.https[{i}].name"), s.name.as_str()))
        .chain(
            (sinks.mqtt.iter().enumerate())
                .map(|(i, s)| (format!("sinks.mqtt[{i}].name"), s.name.as_str())),
        )
        .chain(
            (sinks.jetstream.iter().enumerate())
                .map(|(i, s)| (format!("sinks.jetstream[{i}].name"), s.name.as_str())),
        )
        .collect();
    if source_names.is_empty() {
        issues.push(
            "sources",
            "at least one source is required ([[sources.http]], [[sources.mqtt]] or [[sources.opcua]])",
        );
    }
    if sink_names.is_empty() {
        issues.push(
            "sinks",
            "at least one sink is required ([[sinks.https]], [[sinks.mqtt]] or [[sinks.jetstream]])",
        );
    }
    schemas(&mut issues, config);
    names(&mut issues, "source", &source_names);
    names(&mut issues, "sink", &sink_names);
    stream_classes(&mut issues, sources);

    let mut listeners: Vec<(String, SocketAddr)> = Vec::new();
    if let Some(h) = &config.health {
        listeners.push(("health.listen".to_owned(), h.listen));
    }
    for (i, s) in sources.http.iter().enumerate() {
        listeners.push((format!("sources.http[{i}].listen"), s.listen));
    }
    for (i, (path, addr)) in listeners.iter().enumerate() {
        if let Some((other, other_addr)) = listeners[..i]
            .iter()
            .find(|(_, earlier)| listen_overlap(*earlier, *addr))
        {
            issues.push(
                path.clone(),
                format!("listen address {addr} clashes with {other} ({other_addr})"),
            );
        }
    }
}

/// `[[schemas]]`: one per type, and a `require_schema` source has some.
fn schemas(issues: &mut Issues<'_>, config: &Config) {
    for (i, s) in config.schemas.iter().enumerate() {
        let p = format!("schemas[{i}].type");
        if s.event_type.is_empty() {
            issues.push(
                p,
                "must not be empty (the CloudEvents type the schema governs)",
            );
        } else if let Some(j) = config.schemas[..i]
            .iter()
            .position(|o| o.event_type == s.event_type)
        {
            issues.push(
                p,
                format!(
                    "type \"{}\" already has a schema (schemas[{j}]); one schema per type",
                    s.event_type
                ),
            );
        }
    }
    if config.schemas.is_empty() {
        for (i, s) in config.sources.http.iter().enumerate() {
            if s.require_schema {
                issues.push(
                    format!("sources.http[{i}].require_schema"),
                    "is true but there is no [[schemas]] entry: every event would be refused",
                );
            }
        }
    }
}

fn agent(issues: &mut Issues<'_>, agent: &AgentConfig) {
    if let Err(message) = check_agent_id(&agent.id) {
        issues.push("agent.id", message);
    }
}

fn journal(issues: &mut Issues<'_>, journal: &JournalConfig) {
    if journal.max_size < MIN_JOURNAL_SIZE {
        issues.push(
            "journal.max_size",
            format!(
                "must be at least 16MiB ({MIN_JOURNAL_SIZE} bytes), got {} bytes",
                journal.max_size
            ),
        );
    }
    if journal.dedup_max_ids < MIN_DEDUP_IDS {
        issues.push(
            "journal.dedup_max_ids",
            format!(
                "must be at least {MIN_DEDUP_IDS}, got {}",
                journal.dedup_max_ids
            ),
        );
    } else if journal.dedup_max_ids > MAX_DEDUP_IDS {
        issues.push(
            "journal.dedup_max_ids",
            format!(
                "must be at most {MAX_DEDUP_IDS} (its index takes 12 bytes per id, allocated at start), got {}",
                journal.dedup_max_ids
            ),
        );
    }
    at_most(
        issues,
        "journal.commit_window".into(),
        journal.commit_window,
        MAX_COMMIT_WINDOW,
        "every source ack may wait this long",
    );
}

/// A duration key that must not pass `max` (the message names both).
pub(super) fn at_most(
    issues: &mut Issues<'_>,
    path: String,
    value: Duration,
    max: Duration,
    why: &str,
) {
    if value > max {
        issues.push(
            path,
            format!(
                "must be between 0s and {} ({why}), got {}",
                humantime::format_duration(max),
                humantime::format_duration(value)
            ),
        );
    }
}

fn health(issues: &mut Issues<'_>, health: &HealthConfig) {
    if health.token_file.is_none() && health.client_ca.is_none() && !health.allow_unauthenticated {
        issues.push(
            "health.token_file",
            "no authentication configured: set token_file and/or client_ca, or allow_unauthenticated = true",
        );
    }
    issues.listener_limits(
        "health",
        health.max_connections,
        health.max_connections_per_ip,
        health.header_timeout,
        health.request_timeout,
    );
}

/// `streams` holds valid MQTT-style filters.
pub(super) fn stream_filters(issues: &mut Issues<'_>, p: &str, streams: &[String]) {
    for f in streams {
        if let Err(e) = crate::route::check_filter(f) {
            issues.push(format!("{p}.streams"), e);
        }
    }
}

/// `classes` names each class at most once, and at least one.
pub(super) fn classes(issues: &mut Issues<'_>, p: &str, classes: &[crate::event::Class]) {
    if classes.is_empty() {
        issues.push(
            format!("{p}.classes"),
            "must name at least one class (\"critical\", \"telemetry\")",
        );
    }
    for (i, c) in classes.iter().enumerate() {
        if classes[..i].contains(c) {
            issues.push(format!("{p}.classes"), format!("names \"{c}\" twice"));
        }
    }
}

/// TLS settings on a plain `mqtt://` URL would silently not be used.
pub(super) fn mqtt_tls_needs_mqtts(
    issues: &mut Issues<'_>,
    p: &str,
    url: &Url,
    keys: &[(&str, bool)],
) {
    if url.scheme() != "mqtt" {
        return;
    }
    for (key, set) in keys {
        if *set {
            issues.push(
                format!("{p}.{key}"),
                format!("`{key}` needs TLS: use an `mqtts://` URL"),
            );
        }
    }
}

/// Reports duplicate and malformed names of one kind (sources or sinks).
fn names(issues: &mut Issues<'_>, kind: &str, names: &[(String, &str)]) {
    let mut first_use: HashMap<&str, &str> = HashMap::new();
    for (path, name) in names {
        if let Err(message) = check_name(name) {
            issues.push(path.clone(), message);
        } else if let Some(first) = first_use.get(name) {
            issues.push(
                path.clone(),
                format!("duplicate {kind} name `{name}` (first used at {first})"),
            );
        } else {
            first_use.insert(name, path);
        }
    }
}

/// Whether two listeners would fight over the same port.
fn listen_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    // An unspecified IPv6 address also takes IPv4 (dual stack); IPv4 only IPv4.
    let covers =
        |x: IpAddr, y: IpAddr| x == y || (x.is_unspecified() && (x.is_ipv6() || y.is_ipv4()));
    covers(a.ip(), b.ip()) || covers(b.ip(), a.ip())
}

/// Agent id: non-empty, `[A-Za-z0-9._-]`, at most 64 characters.
pub(crate) fn check_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if id.len() > 64 {
        return Err(format!("must be at most 64 characters, got {}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "invalid character {c:?} in agent id `{id}`: use only A-Z, a-z, 0-9, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// Source and sink names: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let Some(first) = name.chars().next() else {
        return Err("name must not be empty".to_owned());
    };
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "invalid name `{name}`: must start with a letter or digit"
        ));
    }
    if name.len() > 63 {
        return Err(format!(
            "invalid name `{name}`: at most 63 characters, got {}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "invalid character {c:?} in name `{name}`: use only A-Z, a-z, 0-9, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// MQTT topic filter: non-empty; `#` only as the whole last level; `+` only
/// as a whole level.
pub(crate) fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("topic filter must not be empty".to_owned());
    }
    if filter.contains('\0') {
        return Err(format!("invalid topic filter {filter:?}: contains NUL"));
    }
    if filter.len() > 65_535 {
        return Err("topic filter is longer than 65535 bytes".to_owned());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') {
            if *level != "#" {
                return Err(format!(
                    "invalid topic filter `{filter}`: `#` must be alone in its level"
                ));
            }
            if i + 1 != levels.len() {
                return Err(format!(
                    "invalid topic filter `{filter}`: `#` must be the last level"
                ));
            }
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "invalid topic filter `{filter}`: `+` must be alone in its level"
            ));
        }
    }
    Ok(())
}

/// JSON pointer (RFC 6901): empty, or `/`-prefixed with `~` only in `~0`/`~1`.
pub(crate) fn check_json_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "invalid JSON pointer `{pointer}`: must be empty or start with `/` (e.g. \"/eventId\")"
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "invalid JSON pointer `{pointer}`: `~` must be followed by 0 or 1"
            ));
        }
    }
    Ok(())
}

/// A template with `{name}` placeholders; `allowed` decides which names exist.
pub(crate) fn check_template(
    template: &str,
    allowed: &dyn Fn(&str) -> bool,
    allowed_text: &str,
) -> Result<(), String> {
    if template.is_empty() {
        return Err("template must not be empty".to_owned());
    }
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        if rest[i..].starts_with('}') {
            return Err(format!("invalid template `{template}`: unmatched `}}`"));
        }
        let after = &rest[i + 1..];
        let Some(end) = after.find('}') else {
            return Err(format!("invalid template `{template}`: unclosed `{{`"));
        };
        let name = &after[..end];
        if name.contains('{') {
            return Err(format!("invalid template `{template}`: nested `{{`"));
        }
        if !allowed(name) {
            return Err(format!(
                "invalid template `{template}`: unknown placeholder `{{{name}}}`, expected {allowed_text}"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// The literal parts of a NATS subject template: no spaces or wildcards, no
/// empty tokens.
pub(super) fn check_subject_literal(subject: &str) -> Result<(), String> {
    if subject.contains(|c: char| c.is_whitespace() || c == '*' || c == '>') {
        return Err(format!(
            "invalid subject `{subject}`: must not contain spaces or the wildcards `*` and `>`"
        ));
    }
    if subject.starts_with('.') || subject.ends_with('.') || subject.contains("..") {
        return Err(format!(
            "invalid subject `{subject}`: tokens between `.` must not be empty"
        ));
    }
    Ok(())
}

/// OPC UA node id in standard notation.
pub(crate) fn check_node_id(node_id: &str) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "invalid node id `{node_id}`: {why} (e.g. \"ns=2;s=Press07.State\", \"i=2258\")"
        ))
    };
    let identifier = if let Some(rest) = node_id.strip_prefix("ns=") {
        let Some((ns, rest)) = rest.split_once(';') else {
            return fail("expected `;` after the namespace index");
        };
        if ns.parse::<u16>().is_err() {
            return fail("the namespace index must be a number from 0 to 65535");
        }
        rest
    } else if let Some(rest) = node_id.strip_prefix("nsu=") {
        match rest.split_once(';') {
            Some((uri, rest)) if !uri.is_empty() => rest,
            _ => return fail("expected a namespace URI and `;` after `nsu=`"),
        }
    } else {
        node_id
    };
    match identifier.split_once('=') {
        Some(("i", v)) if v.parse::<u32>().is_ok() => Ok(()),
        Some(("i", _)) => fail("a numeric identifier `i=` must be a number from 0 to 4294967295"),
        Some(("s", v)) if !v.is_empty() => Ok(()),
        Some(("s", _)) => fail("a string identifier `s=` must not be empty"),
        Some(("g", v)) if is_guid(v) => Ok(()),
        Some(("g", _)) => {
            fail("a GUID identifier `g=` must look like 09087e75-8e5e-499b-954f-f2a9603db28a")
        }
        Some(("b", v)) if is_base64(v) => Ok(()),
        Some(("b", _)) => fail("an opaque identifier `b=` must be non-empty base64"),
        _ => fail("expected an identifier `i=`, `s=`, `g=` or `b=`"),
    }
}

fn is_guid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_base64(v: &str) -> bool {
    let body = v.trim_end_matches('=');
    let padding = v.len() - body.len();
    !v.is_empty()
        && v.len().is_multiple_of(4)
        && padding <= 2
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
}

/// SHA-256 fingerprint: 64 hex digits, colons allowed between them.
pub(crate) fn check_sha256_fingerprint(fingerprint: &str) -> Result<(), String> {
    let hex: String = fingerprint.chars().filter(|c| *c != ':').collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!(
            "invalid SHA-256 fingerprint `{fingerprint}`: expected 64 hex digits (colons allowed)"
        ))
    }
}

/// One level of a stream name a source can produce.
#[derive(Debug, Clone, PartialEq)]
enum Level {
    Exact(String),
    /// Any one level.
    Any,
    /// Any number of levels (at least none).
    Rest,
}

/// The stream names a source can produce, as MQTT-style patterns: OPC UA
/// node streams exactly, MQTT stream templates over their topic filters.
/// HTTP ingest and Sparkplug B take streams from the data: nothing to
/// foresee.
fn foreseeable_streams(sources: &super::SourcesConfig) -> Vec<(String, Class, Vec<Level>)> {
    let mut out = Vec::new();
    for (i, s) in sources.opcua.iter().enumerate() {
        for (j, n) in s.nodes.iter().enumerate() {
            let levels = n
                .stream
                .split('/')
                .map(|l| Level::Exact(l.to_string()))
                .collect();
            out.push((
                format!("sources.opcua[{i}].nodes[{j}].stream"),
                s.class,
                levels,
            ));
        }
    }
    for (i, s) in sources.mqtt.iter().enumerate() {
        if s.format == super::sources::MqttFormat::SparkplugB {
            continue;
        }
        for t in &s.topics {
            let filter: Vec<&str> = t.filter.split('/').collect();
            let mut levels = Vec::new();
            for part in s.stream.split('/') {
                if part == "{topic}" {
                    levels.extend(filter.iter().map(|l| match *l {
                        "+" => Level::Any,
                        "#" => Level::Rest,
                        l => Level::Exact(l.to_string()),
                    }));
                } else if part.contains("{topic}") {
                    levels.push(Level::Rest);
                } else if let Some(n) = part
                    .strip_prefix('{')
                    .and_then(|p| p.strip_suffix('}'))
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    levels.push(match filter.get(n.wrapping_sub(1)) {
                        Some(l) if *l != "+" && *l != "#" => Level::Exact(l.to_string()),
                        _ => Level::Any,
                    });
                } else if part.contains('{') {
                    levels.push(Level::Any);
                } else {
                    levels.push(Level::Exact(part.to_string()));
                }
            }
            out.push((format!("sources.mqtt[{i}].stream"), s.class, levels));
        }
    }
    out
}

/// Whether some stream name matches both patterns.
fn overlap(a: &[Level], b: &[Level]) -> bool {
    match (a.first(), b.first()) {
        (Some(Level::Rest), _) | (_, Some(Level::Rest)) => true,
        (None, None) => true,
        (None, _) | (_, None) => false,
        (Some(x), Some(y)) => {
            let same = match (x, y) {
                (Level::Exact(p), Level::Exact(q)) => p == q,
                _ => true,
            };
            same && overlap(&a[1..], &b[1..])
        }
    }
}

fn show(levels: &[Level]) -> String {
    levels
        .iter()
        .map(|l| match l {
            Level::Exact(s) => s.as_str(),
            Level::Any => "+",
            Level::Rest => "#",
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A stream has one class: sources of different classes that can produce
/// the same stream name are refused, so that priority lanes never reorder
/// a stream a receiver orders by name alone.
fn stream_classes(issues: &mut Issues<'_>, sources: &super::SourcesConfig) {
    let streams = foreseeable_streams(sources);
    for (k, (path, class, levels)) in streams.iter().enumerate() {
        let source = |p: &str| {
            p.split(".stream")
                .next()
                .unwrap_or(p)
                .split(".nodes")
                .next()
                .unwrap_or(p)
                .to_string()
        };
        if let Some((other, other_class, other_levels)) = streams[..k]
            .iter()
            .find(|(p, c, l)| c != class && source(p) != source(path) && overlap(l, levels))
        {
            issues.push(
                path.clone(),
                format!(
                    "streams \"{}\" ({class}) and \"{}\" of {} ({other_class}) can be the same stream: a stream has one class, or priority lanes may reorder it; give the sources the same class or streams of their own",
                    show(levels),
                    show(other_levels),
                    source(other),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_in_every_standard_form_are_accepted() {
        for ok in [
            "i=2258",
            "ns=2;s=Press07.State",
            "ns=65535;i=4294967295",
            "nsu=http://example.com/UA/;s=Line3;Press=7",
            "ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a",
            "ns=1;b=M/RbKBsRVkePCePcx24oRA==",
        ] {
            assert_eq!(check_node_id(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn malformed_node_ids_are_rejected_with_the_reason() {
        for (bad, why) in [
            ("ns=2;x=1", "expected an identifier"),
            ("ns=70000;i=1", "namespace index"),
            ("ns=2s=Press", "expected `;`"),
            ("i=abc", "numeric identifier"),
            ("ns=2;s=", "must not be empty"),
            ("g=1234", "GUID"),
            ("b=abc", "base64"),
            ("nsu=;i=1", "namespace URI"),
            ("Press07.State", "expected an identifier"),
        ] {
            let err = check_node_id(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn topic_filters_follow_mqtt_wildcard_rules() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "+", "+/+", "$share/g/a/#", "/a"] {
            assert_eq!(check_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/c", "a#", "a/b+", "a/+b/c", "#/a"] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_reject_unknown_unclosed_and_stray_braces() {
        let sink = |n: &str| SINK_PLACEHOLDERS.contains(&n);
        assert_eq!(
            check_template("plantrelay/{agent}/{stream}", &sink, ""),
            Ok(())
        );
        assert!(
            check_template("a/{nope}", &sink, "")
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(
            check_template("a/{agent", &sink, "")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            check_template("a/agent}", &sink, "")
                .unwrap_err()
                .contains("unmatched")
        );
        assert!(check_template("", &sink, "").is_err());
    }

    #[test]
    fn json_pointers_must_start_with_a_slash_and_escape_tildes() {
        assert_eq!(check_json_pointer(""), Ok(()));
        assert_eq!(check_json_pointer("/a~1b/~0"), Ok(()));
        assert!(check_json_pointer("eventId").is_err());
        assert!(check_json_pointer("/a~2").is_err());
    }

    #[test]
    fn names_and_agent_ids_follow_their_character_rules() {
        assert_eq!(check_name("press-line-3"), Ok(()));
        assert!(check_name("-press").is_err());
        assert!(check_name("press line").is_err());
        assert!(check_name(&"a".repeat(64)).is_err());
        assert_eq!(check_agent_id(&"a".repeat(64)), Ok(()));
        assert!(check_agent_id(&"a".repeat(65)).is_err());
        assert!(check_agent_id("gw/1").is_err());
    }

    #[test]
    fn listeners_clash_on_the_same_port_when_addresses_overlap() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listen_overlap(addr("127.0.0.1:80"), addr("127.0.0.1:80")));
        assert!(listen_overlap(addr("0.0.0.0:80"), addr("127.0.0.1:80")));
        assert!(listen_overlap(addr("[::1]:80"), addr("[::]:80")));
        assert!(!listen_overlap(addr("0.0.0.0:80"), addr("[::1]:80")));
        assert!(!listen_overlap(addr("127.0.0.1:80"), addr("127.0.0.1:81")));
        assert!(!listen_overlap(addr("127.0.0.1:0"), addr("127.0.0.1:0")));
    }

    #[test]
    fn fingerprints_need_64_hex_digits_with_optional_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(check_sha256_fingerprint(&hex), Ok(()));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(check_sha256_fingerprint(&colons), Ok(()));
        assert!(check_sha256_fingerprint(&hex[2..]).is_err());
        assert!(check_sha256_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn http_ingest_limits_default_sanely_and_out_of_range_values_name_key_and_bounds() {
        let base = "[agent]\nid = \"gw-1\"\nstate_dir = \"/var/lib/plantrelay\"\n\
                    [[sinks.https]]\nname = \"central\"\nurl = \"https://up.example.com/v1\"\n\
                    [[sources.http]]\nname = \"mes\"\nlisten = \"127.0.0.1:8081\"\n";
        let parse = |extra: &str| {
            crate::config::Config::parse(
                &format!("{base}{extra}"),
                std::path::Path::new("plantrelay.toml"),
            )
        };
        let c = parse("").unwrap();
        let http = &c.sources.http[0];
        assert_eq!(
            (
                http.max_events_per_request,
                http.max_concurrent_requests,
                http.max_depth,
                http.max_attributes
            ),
            (10_000, 4, 32, 64)
        );
        for (line, key, bounds) in [
            (
                "max_events_per_request = 0",
                "max_events_per_request",
                "between 1 and 100000",
            ),
            (
                "max_concurrent_requests = 65",
                "max_concurrent_requests",
                "between 1 and 64",
            ),
            ("max_depth = 121", "max_depth", "between 1 and 120"),
            (
                "max_attributes = 8",
                "max_attributes",
                "between 16 and 1024",
            ),
        ] {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.contains(&format!("sources.http[0].{key}")), "{e}");
            assert!(e.contains(bounds), "{e}");
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

/// A setting that is valid but exposes something on the plant network: the
/// key path it is about and what to do. `check-config` prints these and
/// `plantrelay run` logs them at warn; neither refuses, because each has a
/// legitimate use on an isolated network or behind a firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskWarning {
    pub key_path: String,
    pub message: String,
}

fn is_local_host(host: Option<url::Host<&str>>) -> bool {
    match host {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Every risky combination in `config` (see [`RiskWarning`]).
pub fn risky_settings(config: &Config) -> Vec<RiskWarning> {
    let mut out = Vec::new();
    let mut warn = |key_path: String, message: String| out.push(RiskWarning { key_path, message });
    for (i, s) in config.sources.http.iter().enumerate() {
        let p = format!("sources.http[{i}]");
        if s.listen.ip().is_loopback() {
            continue;
        }
        let tls = s.tls_cert.is_some();
        match (s.token_file.is_some(), tls) {
            (false, false) => warn(
                format!("{p}.listen"),
                format!(
                    "ingest listens on {} without token_file and without TLS: anyone on the network can post events, in clear text; set {p}.token_file and {p}.tls_cert/tls_key, or listen on 127.0.0.1",
                    s.listen
                ),
            ),
            (false, true) => warn(
                format!("{p}.token_file"),
                format!(
                    "ingest listens on {} without token_file: anyone who can reach it can post events; set {p}.token_file, or listen on 127.0.0.1",
                    s.listen
                ),
            ),
            (true, false) => warn(
                format!("{p}.tls_cert"),
                format!(
                    "ingest listens on {} with a token but without TLS: the token and the events cross the network in clear text; set {p}.tls_cert and {p}.tls_key",
                    s.listen
                ),
            ),
            (true, true) => {}
        }
    }
    for (i, s) in config.sources.mqtt.iter().enumerate() {
        if s.format == super::MqttFormat::Raw
            && config.schemas.iter().any(|c| c.event_type == s.event_type)
        {
            warn(
                format!("sources.mqtt[{i}].type"),
                format!(
                    "type \"{}\" has a schema, but format = \"raw\" keeps payloads as bytes: \
                     the schema is not applied to this source's events",
                    s.event_type
                ),
            );
        }
    }
    for (i, s) in config.sinks.mqtt.iter().enumerate() {
        if s.format == super::MqttSinkFormat::Data && s.protocol == super::MqttProtocol::V311 {
            warn(
                format!("sinks.mqtt[{i}].format"),
                "format = \"data\" over MQTT 3.1.1 publishes the payload alone: the event id does not travel, so receivers cannot drop the re-sends that follow a reconnect or a restart; use protocol = \"v5\" (the attributes travel as user properties) or format = \"cloudevents_json\"".into(),
            );
        }
    }
    if let Some(h) = &config.health {
        let open = h.token_file.is_none() && h.client_ca.is_none() && h.allow_unauthenticated;
        if open && h.admin_token_file.is_some() {
            warn(
                "health.allow_unauthenticated".into(),
                "the admin API is on (admin_token_file) on a listener that authenticates nothing else: status and metrics are open to anyone, and the admin token is the only guard of replay and dead letters; set health.token_file or health.client_ca".into(),
            );
        } else if open && !h.listen.ip().is_loopback() {
            warn(
                "health.allow_unauthenticated".into(),
                format!(
                    "status and metrics on {} are open to anyone who can reach it; set health.token_file or health.client_ca, or listen on 127.0.0.1",
                    h.listen
                ),
            );
        }
    }
    for (i, s) in config.sources.mqtt.iter().enumerate() {
        if s.url.scheme() == "mqtt" && s.password_file.is_some() && !is_local_host(s.url.host()) {
            warn(
                format!("sources.mqtt[{i}].url"),
                "the broker password is sent in clear text over mqtt://; use mqtts://".into(),
            );
        }
    }
    for (i, s) in config.sources.opcua.iter().enumerate() {
        if s.security_mode == SecurityMode::None
            && s.password_file.is_some()
            && !is_local_host(s.endpoint.host())
        {
            warn(
                format!("sources.opcua[{i}].security_mode"),
                "a user name and password over a channel with security_mode = \"None\" can be read on the network; use Sign or SignAndEncrypt".into(),
            );
        }
    }
    // Stream filters that match nothing the sources can produce, when
    // every source's streams can be foreseen (HTTP ingest and Sparkplug B
    // take them from the data).
    let foreseeable = config.sources.http.is_empty()
        && config
            .sources
            .mqtt
            .iter()
            .all(|s| s.format != super::sources::MqttFormat::SparkplugB);
    if foreseeable {
        let streams = foreseeable_streams(&config.sources);
        let sinks = &config.sinks;
        let routes = (sinks.https.iter().enumerate())
            .map(|(i, s)| (format!("sinks.https[{i}].streams"), &s.streams))
            .chain(
                (sinks.mqtt.iter().enumerate())
                    .map(|(i, s)| (format!("sinks.mqtt[{i}].streams"), &s.streams)),
            )
            .chain(
                (sinks.jetstream.iter().enumerate())
                    .map(|(i, s)| (format!("sinks.jetstream[{i}].streams"), &s.streams)),
            );
        for (path, filters) in routes {
            for f in filters {
                let levels: Vec<Level> = f
                    .split('/')
                    .map(|l| match l {
                        "+" => Level::Any,
                        "#" => Level::Rest,
                        l => Level::Exact(l.to_string()),
                    })
                    .collect();
                if !streams.iter().any(|(_, _, s)| overlap(s, &levels)) {
                    warn(
                        path.clone(),
                        format!(
                            "\"{f}\" matches none of the streams the sources can produce ({}): nothing reaches this sink through it",
                            streams
                                .iter()
                                .map(|(_, _, s)| show(s))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod risky_tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[agent]
id = "gw"
state_dir = "/tmp/x"
[[sinks.https]]
name = "central"
url = "https://ingest.example.com/v1/events"
{extra}
"#
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    fn keys(c: &Config) -> Vec<String> {
        risky_settings(c).into_iter().map(|w| w.key_path).collect()
    }

    #[test]
    fn ingest_on_the_network_without_token_or_tls_is_named() {
        let c = config("[[sources.http]]\nname = \"mes\"\nlisten = \"0.0.0.0:8081\"\n");
        let w = risky_settings(&c);
        assert_eq!(keys(&c), ["sources.http[0].listen"]);
        assert!(w[0].message.contains("without token_file and without TLS"));
        assert!(w[0].message.contains("sources.http[0].token_file"));
        let local = config("[[sources.http]]\nname = \"mes\"\nlisten = \"127.0.0.1:8081\"\n");
        assert!(keys(&local).is_empty());
    }

    #[test]
    fn an_open_health_listener_with_an_admin_token_is_named() {
        let c = config(
            "[[sources.http]]\nname = \"mes\"\nlisten = \"127.0.0.1:8081\"\n[health]\nlisten = \"127.0.0.1:8443\"\ntls_cert = \"c\"\ntls_key = \"k\"\nallow_unauthenticated = true\nadmin_token_file = \"a\"\n",
        );
        assert_eq!(keys(&c), ["health.allow_unauthenticated"]);
    }

    #[test]
    fn a_stream_filter_matching_no_foreseeable_stream_is_named() {
        let opcua = "[[sources.opcua]]\nname = \"p\"\nendpoint = \"opc.tcp://h:4840\"\n[[sources.opcua.nodes]]\nnode_id = \"ns=2;i=1\"\nstream = \"line3/press07\"\n";
        let c = config(&format!("streams = [\"line9/#\", \"line3/+\"]\n{opcua}"));
        let w = risky_settings(&c);
        assert_eq!(keys(&c), ["sinks.https[0].streams"]);
        assert!(
            w[0].message.contains("\"line9/#\" matches none"),
            "{}",
            w[0].message
        );
        assert!(w[0].message.contains("line3/press07"), "{}", w[0].message);
        // With HTTP ingest, streams come from the data: nothing to say.
        let c = config(&format!(
            "streams = [\"line9/#\"]\n{opcua}[[sources.http]]\nname = \"mes\"\nlisten = \"127.0.0.1:8081\"\n"
        ));
        assert!(keys(&c).is_empty());
    }
}
