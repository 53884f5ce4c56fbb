//! Settings that are valid but expose something on the plant network
//! ([`RiskWarning`]): open ingest listeners, unauthenticated status pages,
//! passwords in clear text, schemas a raw source never applies, stream
//! filters that match nothing. It only warns; it must never refuse a
//! config, since each of these has a legitimate use somewhere.

use super::Config;
use super::sources::SecurityMode;

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
    out.extend(super::streams::unmatched_filters(config));
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
