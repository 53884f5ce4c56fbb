//! `plantrelay status`: pulls `/api/v1/status` from an agent over HTTPS and
//! prints a compact summary for people, or the JSON for scripts.
//!
//! Exit status, for monitoring scripts: 0 healthy (ready, no sink stalled,
//! no warnings); 1 degraded (reachable, but not all of that); 2 the status
//! could not be had (bad usage, unreachable, TLS failure, unauthorised, not
//! a status answer).
//!
//! Every string from the answer is printed with its control characters
//! escaped ([`crate::text`]): an agent's status holds ids, names and errors
//! that came from its own clients and upstreams.
//!
//! It reads the JSON loosely (`serde_json::Value`): a field an older or newer
//! agent does not send is shown as `?`, never an error.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::cli::CliError;
use crate::config::read_secret;
use crate::tls::{self, ClientTls};
use crate::units::{fmt_bytes, short_duration, short_secs};

/// The path of the status endpoint under the agent's base URL.
pub const STATUS_PATH: &str = "/api/v1/status";

/// What `plantrelay status` was asked.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// `https://host:port` of the agent's health listener (a path ending in
    /// `/api/v1/status` is taken as is).
    pub url: String,
    pub token_file: Option<PathBuf>,
    /// Extra trust anchors for the agent's certificate.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub json: bool,
    pub timeout: Duration,
}

fn unreachable(message: impl Into<String>) -> CliError {
    CliError {
        code: 2,
        message: message.into(),
    }
}

/// The status URL for `--url`.
pub fn status_url(base: &str) -> Result<url::Url, CliError> {
    let mut url = url::Url::parse(base).map_err(|e| {
        CliError::usage(format!("--url {base:?}: {e} (expected https://HOST:PORT)"))
    })?;
    if url.scheme() != "https" {
        return Err(CliError::usage(format!(
            "--url {base:?}: the health listener speaks HTTPS only (expected https://HOST:PORT)"
        )));
    }
    if !url.path().ends_with(STATUS_PATH) {
        let path = format!("{}{STATUS_PATH}", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    Ok(url)
}

/// An error and its causes on one line ("... : connection refused").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Fetches the status JSON.
pub async fn fetch(opts: &StatusOptions) -> Result<Value, CliError> {
    let url = status_url(&opts.url)?;
    let token = match &opts.token_file {
        Some(p) => Some(read_secret(p).map_err(|e| CliError::usage(format!("--token-file: {e}")))?),
        None => None,
    };
    tls::install_crypto_provider();
    let tls_config = tls::client_config(&ClientTls {
        ca_file: opts.ca_file.clone(),
        ca_only: false,
        client_cert: opts.client_cert.clone(),
        client_key: opts.client_key.clone(),
    })
    .map_err(|e| CliError::usage(e.to_string()))?;
    let client = tls::reqwest_client_builder(tls_config)
        .timeout(opts.timeout)
        .build()
        .map_err(|e| CliError::usage(chain(&e)))?;
    let mut request = client.get(url.clone());
    if let Some(t) = &token {
        request = request.bearer_auth(t);
    }
    let response = request
        .send()
        .await
        .map_err(|e| unreachable(format!("cannot get {url}: {}", chain(&e))))?;
    let code = response.status();
    if code == reqwest::StatusCode::UNAUTHORIZED || code == reqwest::StatusCode::FORBIDDEN {
        return Err(unreachable(format!(
            "{url}: {code}: not authorised (check --token-file, --client-cert and --client-key)"
        )));
    }
    if !code.is_success() {
        return Err(unreachable(format!("{url}: {code}")));
    }
    let text = response
        .text()
        .await
        .map_err(|e| unreachable(format!("{url}: reading the answer: {}", chain(&e))))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| unreachable(format!("{url}: not a status answer: {e}")))?;
    if !value.is_object() || value.get("agent_id").is_none() {
        return Err(unreachable(format!("{url}: not a status answer")));
    }
    Ok(value)
}

/// Healthy: ready, no sink stalled, no warnings.
pub fn is_healthy(status: &Value) -> bool {
    let ready = status["ready"].as_bool() == Some(true);
    let stalled = status["sinks"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["state"] == "stalled"));
    let warnings = status["warnings"].as_array().is_some_and(|w| !w.is_empty());
    ready && !stalled && !warnings
}

/// `plantrelay status`: prints, and returns the exit status (0 or 1).
pub async fn run(opts: &StatusOptions, out: &mut impl Write) -> Result<u8, CliError> {
    let status = fetch(opts).await?;
    if opts.json {
        let text =
            serde_json::to_string_pretty(&status).map_err(|e| CliError::runtime(e.to_string()))?;
        let _ = writeln!(out, "{}", crate::text::json_safe(&text));
    } else {
        let _ = out.write_all(render(&status).as_bytes());
    }
    Ok(if is_healthy(&status) { 0 } else { 1 })
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => crate::text::escape(s).into_owned(),
        Value::Null => "?".into(),
        other => other.to_string(),
    }
}

fn bytes(v: &Value) -> String {
    v.as_u64().map_or("?".into(), fmt_bytes)
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or("?".into(), |r| format!("{:.1}%", 100.0 * r))
}

/// "12s ago" for an RFC 3339 time, relative to the report's own time (so a
/// clock difference between the agent and this host does not matter).
fn ago(time: &Value, now: Option<SystemTime>) -> String {
    let Some(t) = time.as_str() else {
        return "never".into();
    };
    let (Ok(t), Some(now)) = (humantime::parse_rfc3339_weak(t), now) else {
        return crate::text::escape(t).into_owned();
    };
    match now.duration_since(t) {
        Ok(d) => format!("{} ago", short_duration(d)),
        Err(_) => "just now".into(),
    }
}

/// Rows with aligned columns, indented by two spaces, one line each.
pub(crate) fn rows(rows: &[Vec<String>]) -> Vec<String> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; n];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                .collect();
            format!("  {}\n", cells.join("  ").trim_end())
        })
        .collect()
}

/// Whole seconds as people read an uptime: `42s`, `3m12s`, `5h07m`.
fn uptime(secs: u64) -> String {
    if secs < 60 {
        format!("{secs}s")
    } else {
        short_duration(Duration::from_secs(secs))
    }
}

/// The human summary of a status answer.
pub fn render(s: &Value) -> String {
    let now = s["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    let warnings = s["warnings"].as_array().cloned().unwrap_or_default();
    let reasons = s["not_ready_reasons"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let verdict = if is_healthy(s) { "HEALTHY" } else { "DEGRADED" };
    let uptime = s["uptime_seconds"].as_u64().map_or("?".into(), uptime);
    let mut out = format!(
        "agent {} (plantrelay {}), up {uptime}: {verdict}\n",
        text(&s["agent_id"]),
        text(&s["version"])
    );

    let j = &s["journal"];
    let disk = if j["disk_free_bytes"].is_u64() {
        format!(
            ", disk {} free ({})",
            bytes(&j["disk_free_bytes"]),
            percent(&j["disk_free_ratio"])
        )
    } else {
        String::new()
    };
    out.push_str(&format!(
        "journal {} of {} ({}){disk}, head seq {}, evicted {} telemetry / {} critical{}\n",
        bytes(&j["used_bytes"]),
        bytes(&j["max_bytes"]),
        percent(&j["capacity_ratio"]),
        text(&j["head_seq"]),
        text(&j["evicted_telemetry"]),
        text(&j["evicted_critical"]),
        if j["quarantined"].is_object() {
            ", QUARANTINED at start-up"
        } else {
            ""
        }
    ));

    let sources = s["sources"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("sources ({})\n", sources.len()));
    let source_rows: Vec<Vec<String>> = sources
        .iter()
        .map(|src| {
            vec![
                text(&src["name"]),
                text(&src["kind"]),
                match (src["started"].as_bool(), src["connected"].as_bool()) {
                    (Some(false), _) => "not started".into(),
                    (_, Some(true)) => "connected".into(),
                    (_, Some(false)) => "disconnected".into(),
                    _ => "?".into(),
                },
                format!("events {}", text(&src["events"])),
                format!("duplicates {}", text(&src["duplicates"])),
                format!("rejects {}", text(&src["rejects"])),
                format!("last event {}", ago(&src["last_event_time"], now)),
            ]
        })
        .collect();
    out.extend(rows(&source_rows));

    let sinks = s["sinks"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("sinks ({})\n", sinks.len()));
    let mut sink_rows = Vec::new();
    let mut errors = Vec::new();
    for k in &sinks {
        let oldest = k["oldest_undelivered_age_seconds"]
            .as_f64()
            .map_or("-".into(), short_secs);
        sink_rows.push(vec![
            text(&k["name"]),
            text(&k["kind"]),
            text(&k["state"]),
            format!("backlog {}", text(&k["backlog_events"])),
            format!("oldest {oldest}"),
            format!("dead letters {}", text(&k["dead_letters"])),
            format!("last success {}", ago(&k["last_success_time"], now)),
        ]);
        let classes: Vec<String> = k["classes"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        let oldest = c["oldest_undelivered_age_seconds"]
                            .as_f64()
                            .map_or("-".into(), short_secs);
                        format!(
                            "{} backlog {} oldest {oldest}",
                            text(&c["class"]),
                            text(&c["backlog_events"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut extra = String::new();
        if !classes.is_empty() {
            extra.push_str(&format!("      {}\n", classes.join("; ")));
        }
        if k["oauth2"].is_object() {
            let o = &k["oauth2"];
            let valid = o["valid_until"].as_str().unwrap_or("-");
            let mut line = format!(
                "      oauth2 token valid until {valid}, {} fetches",
                text(&o["fetches"])
            );
            if let Some(e) = o["last_error"].as_str() {
                line.push_str(&format!(
                    "; last token error {}: {}",
                    ago(&o["last_error_time"], now),
                    crate::text::escape_control(e, crate::text::MAX_ERROR_LEN)
                ));
            }
            extra.push_str(&line);
            extra.push('\n');
        }
        if let Some(e) = k["last_error"].as_str() {
            extra.push_str(&format!(
                "      last error {}: {}\n",
                ago(&k["last_error_time"], now),
                crate::text::escape_control(e, crate::text::MAX_ERROR_LEN)
            ));
        }
        errors.push((!extra.is_empty()).then_some(extra));
    }
    for (line, error) in rows(&sink_rows).into_iter().zip(errors) {
        out.push_str(&line);
        out.extend(error);
    }

    if !reasons.is_empty() {
        out.push_str("not ready\n");
        for r in &reasons {
            out.push_str(&format!("  - {}\n", text(r)));
        }
    }
    if warnings.is_empty() {
        out.push_str("warnings: none\n");
    } else {
        out.push_str(&format!("warnings ({})\n", warnings.len()));
        for w in &warnings {
            out.push_str(&format!("  - {}\n", text(&w["message"])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "agent_id": "gw-hamburg-01", "version": "0.1.0", "uptime_seconds": 192,
            "time": "2026-11-29T10:00:00Z", "ready": false,
            "not_ready_reasons": ["sink 'central' stalled: no delivery for 75s with 50 events waiting"],
            "journal": {"used_bytes": 1048576, "max_bytes": 2147483648u64, "capacity_ratio": 0.0005,
                        "disk_free_bytes": 44023414784u64, "disk_free_ratio": 0.63, "head_seq": 1234,
                        "evicted_telemetry": 0, "evicted_critical": 0, "quarantined": null},
            "sources": [{"name": "mes", "kind": "http", "started": true, "connected": true,
                         "events": 1234, "duplicates": 2, "rejects": 1,
                         "last_event_time": "2026-11-29T09:59:58Z"}],
            "sinks": [{"name": "central", "kind": "https", "state": "stalled", "backlog_events": 50,
                       "oldest_undelivered_age_seconds": 75.2, "dead_letters": 0,
                       "classes": [{"class": "critical", "cursor": 10, "backlog_events": 2,
                                    "oldest_undelivered_age_seconds": 75.2},
                                   {"class": "telemetry", "cursor": 3, "backlog_events": 48,
                                    "oldest_undelivered_age_seconds": 80.0}],
                       "last_success_time": null, "last_error": "connection refused",
                       "last_error_time": "2026-11-29T09:59:55Z",
                       "oauth2": {"token_url": "https://login.example.com/token",
                                  "valid_until": "2026-11-29T10:30:00Z", "fetches": 3,
                                  "last_error": "OAuth2 token endpoint https://login.example.com/token: answered 503",
                                  "last_error_time": "2026-11-29T09:59:50Z"}}],
            "warnings": [{"kind": "sink_stalled",
                          "message": "sink 'central' stalled: no delivery for 75s with 50 events waiting"}]
        })
    }

    #[test]
    fn the_summary_names_every_source_sink_and_warning() {
        let text = render(&sample());
        assert!(
            text.starts_with("agent gw-hamburg-01 (plantrelay 0.1.0), up 3m12s: DEGRADED"),
            "{text}"
        );
        assert!(text.contains("journal 1.0 MiB of 2.0 GiB (0.1%)"), "{text}");
        assert!(text.contains("mes  http  connected  events 1234"), "{text}");
        assert!(text.contains("last event 2.0s ago"), "{text}");
        assert!(
            text.contains("central  https  stalled  backlog 50  oldest 1m15s"),
            "{text}"
        );
        assert!(
            text.contains("last success never\n      critical backlog 2 oldest 1m15s; telemetry backlog 48 oldest 1m20s\n      oauth2 token valid until 2026-11-29T10:30:00Z, 3 fetches; last token error 10.0s ago: OAuth2 token endpoint https://login.example.com/token: answered 503\n      last error 5.0s ago: connection refused\n"),
            "{text}"
        );
        assert!(
            text.contains("warnings (1)\n  - sink 'central' stalled"),
            "{text}"
        );
    }

    #[test]
    fn an_age_no_duration_holds_reads_as_the_longest() {
        let mut s = sample();
        s["sinks"][0]["oldest_undelivered_age_seconds"] = json!(1e300);
        s["sinks"][0]["classes"][1]["oldest_undelivered_age_seconds"] = json!(-1.0);
        let text = render(&s);
        let longest = short_duration(Duration::MAX);
        assert!(
            text.contains(&format!("backlog 50  oldest {longest}")),
            "{text}"
        );
        assert!(text.contains("telemetry backlog 48 oldest 0.0s"), "{text}");
    }

    #[test]
    fn control_characters_in_the_answer_reach_the_terminal_escaped() {
        let mut s = sample();
        s["agent_id"] = json!("gw\u{1b}]0;owned\u{7}");
        s["sources"][0]["name"] = json!("mes\nagent fake: HEALTHY");
        s["sinks"][0]["last_error"] = json!(format!("502: \u{1b}[2J{}", "z".repeat(5000)));
        s["warnings"][0]["message"] = json!("\u{9b}31mred");
        let text = render(&s);
        assert!(!text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\u{9b}'));
        assert!(text.contains("mes\\nagent fake"), "{text}");
        assert!(text.lines().all(|l| l.len() < 1000), "{text}");
    }

    #[test]
    fn healthy_means_ready_no_stalled_sink_and_no_warning() {
        let mut s = sample();
        assert!(!is_healthy(&s));
        s["ready"] = json!(true);
        s["not_ready_reasons"] = json!([]);
        assert!(!is_healthy(&s));
        s["warnings"] = json!([]);
        assert!(!is_healthy(&s), "a stalled sink alone is degraded");
        s["sinks"][0]["state"] = json!("retrying");
        assert!(is_healthy(&s));
        assert!(render(&s).contains(": HEALTHY\n"));
    }

    #[test]
    fn the_url_gets_the_status_path_and_must_be_https() {
        assert_eq!(
            status_url("https://gw:8443").unwrap().as_str(),
            "https://gw:8443/api/v1/status"
        );
        assert_eq!(
            status_url("https://gw:8443/prefix/").unwrap().as_str(),
            "https://gw:8443/prefix/api/v1/status"
        );
        assert_eq!(
            status_url("https://gw:8443/api/v1/status")
                .unwrap()
                .as_str(),
            "https://gw:8443/api/v1/status"
        );
        let e = status_url("http://gw:8443").unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("HTTPS only"), "{}", e.message);
        assert_eq!(status_url("gw:8443").unwrap_err().code, 2);
    }
}
