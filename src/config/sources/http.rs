//! `[[sources.http]]`: the local ingest API's keys, their defaults and
//! their checks (listener limits, request bounds). No I/O; it must never
//! accept a bound the ingest could not hold in memory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::units;
use crate::config::validate::Issues;
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
    #[serde(default = "super::default_10s", deserialize_with = "units::duration")]
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
    /// Most ingest requests read and parsed at once, 1 to 64; a request
    /// that finds no free slot within 2 s gets `503` with `Retry-After`.
    /// Parsed requests wait for their commit without a slot. Default: `4`.
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
fn default_critical() -> Class {
    Class::Critical
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

pub(in crate::config) fn check_http(issues: &mut Issues<'_>, p: &str, s: &HttpSourceConfig) {
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

#[cfg(test)]
mod tests {
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
