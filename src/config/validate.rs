//! Semantic validation of a deserialised [`Config`]: everything the types
//! alone cannot say (names, URL schemes, paired keys, ranges, node ids, topic
//! filters, templates, listener clashes). Every issue is collected, none stops
//! the others; positions are added later by the locator. No I/O here.
//!
//! This module holds the whole-config checks (agent, journal, health, names,
//! listeners) and the [`Issues`] collector with its shared helpers; the
//! checks of one value each are in `checks.rs`, the stream-class analysis in
//! `streams.rs`, and each source and sink kind's own checks live beside its
//! config type (`sources/`, `sinks.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use url::Url;

use super::checks::{check_agent_id, check_name};
use super::locate::RawIssue;
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
    super::streams::stream_classes(&mut issues, sources);

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
    if !(1024..=65536).contains(&journal.page_size) || !journal.page_size.is_power_of_two() {
        issues.push(
            "journal.page_size",
            format!(
                "must be a power of two from 1024 to 65536 bytes (SQLite's page size), got {}",
                journal.page_size
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
