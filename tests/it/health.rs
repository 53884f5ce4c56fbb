//! The health server end to end: a real agent in-process (`agent::start`)
//! with its HTTPS health listener, the embedded upstream receiver, and real
//! HTTPS clients; `plantrelay status` and SIGHUP through the real binary.

use crate::support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use plantrelay::agent::{self, RunningAgent};
use plantrelay::config::Config;
use plantrelay::demo::receiver::EphemeralPki;
use plantrelay::tls::ClientTls;
use serde_json::{Value, json};
use support::agent::{Harness, http_client, mes_events, post, send};
use support::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "read-s3cret";
const ADMIN: &str = "admin-s3cret";

/// Which `[health]` keys a test sets.
#[derive(Default, Clone, Copy)]
struct Setup {
    token: bool,
    admin: bool,
    mtls: bool,
    open_probes: bool,
    allow_unauthenticated: bool,
    stall_after: Option<&'static str>,
}

const TOKEN_ONLY: Setup = Setup {
    token: true,
    admin: false,
    mtls: false,
    open_probes: false,
    allow_unauthenticated: false,
    stall_after: None,
};

fn token_file(h: &Harness) -> PathBuf {
    h.dir.path().join("health.token")
}

/// The `[health]` section for `s`, on `listen`; writes the token files.
fn health_toml(h: &Harness, s: Setup, listen: &str) -> String {
    let mut t = format!(
        "[health]\nlisten = \"{listen}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display()
    );
    if s.token {
        std::fs::write(token_file(h), format!("{TOKEN}\n")).unwrap();
        t += &format!("token_file = \"{}\"\n", token_file(h).display());
    }
    if s.admin {
        let p = h.dir.path().join("admin.token");
        std::fs::write(&p, format!("{ADMIN}\n")).unwrap();
        t += &format!("admin_token_file = \"{}\"\n", p.display());
    }
    if s.mtls {
        t += &format!("client_ca = \"{}\"\n", h.paths.ca.display());
    }
    if s.open_probes {
        t += "open_probes = true\n";
    }
    if s.allow_unauthenticated {
        t += "allow_unauthenticated = true\n";
    }
    if let Some(d) = s.stall_after {
        t += &format!("stall_after = \"{d}\"\n");
    }
    t
}

fn config_with(h: &Harness, s: Setup, sink_extra: &str) -> Config {
    let text = h.config_text(
        "127.0.0.1:0",
        &h.receiver.url(),
        sink_extra,
        &health_toml(h, s, "127.0.0.1:0"),
    );
    Config::load(&h.write_config(&text)).unwrap()
}

fn ingest_url(a: &RunningAgent) -> String {
    format!("http://{}/v1/events", a.http_addr("mes").unwrap())
}

/// An HTTPS client of the health listener that trusts the test CA.
struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn new(h: &Harness, a: &RunningAgent, with_cert: bool) -> Api {
        Api::at(&h.paths.client_tls(with_cert), a.health_addr.unwrap())
    }

    fn at(tls: &ClientTls, addr: SocketAddr) -> Api {
        plantrelay::tls::install_crypto_provider();
        let cfg = plantrelay::tls::client_config(tls).unwrap();
        let client = plantrelay::tls::reqwest_client_builder(cfg)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Api {
            base: format!("https://localhost:{}", addr.port()),
            client,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> reqwest::Result<(u16, String)> {
        send(
            &self.client,
            method,
            &format!("{}{path}", self.base),
            token,
            body,
        )
        .await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Result<(u16, String)> {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    async fn code(&self, path: &str, token: Option<&str>) -> u16 {
        self.get(path, token).await.unwrap().0
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let (code, text) = self
            .send(reqwest::Method::POST, path, token, Some(body))
            .await
            .unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let (code, text) = self
            .send(reqwest::Method::DELETE, path, token, None)
            .await
            .unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn json(&self, path: &str, token: Option<&str>) -> Value {
        let (code, text) = self.get(path, token).await.unwrap();
        assert_eq!(code, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn status(&self, token: Option<&str>) -> Value {
        self.json("/api/v1/status", token).await
    }

    /// Polls the status until `done` holds; panics with the last one.
    async fn status_until(&self, token: Option<&str>, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = self.status(token).await;
            if done(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached; last status: {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn sink(s: &Value) -> &Value {
    &s["sinks"][0]
}

fn age(s: &Value) -> f64 {
    sink(s)["oldest_undelivered_age_seconds"].as_f64().unwrap()
}

// ---------------------------------------------------------------------------
// Status, readiness, stall

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_outage_shows_a_growing_backlog_then_a_stalled_sink_and_clears_when_it_is_back()
{
    let h = Harness::new().await;
    h.receiver.stop().await;
    let setup = Setup {
        stall_after: Some("2s"),
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    let t = Some(TOKEN);
    assert_eq!(api.code("/readyz", t).await, 200);

    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("o", 20, 2))
            .await
            .0,
        202
    );
    let first = api
        .status_until(t, |s| {
            sink(s)["state"] == "retrying" && sink(s)["backlog_events"] == 20
        })
        .await;
    assert!(age(&first) > 0.0, "{first:#}");
    assert!(
        sink(&first)["last_error"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{first:#}"
    );
    assert!(sink(&first)["last_error_time"].is_string());
    assert!(sink(&first)["last_success_time"].is_null());
    assert_eq!(first["ready"], true);

    // The oldest event's age must grow: let time pass.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("p", 20, 2))
            .await
            .0,
        202
    );
    let second = api
        .status_until(t, |s| sink(s)["backlog_events"] == 40)
        .await;
    assert!(
        age(&second) > age(&first),
        "the oldest event only gets older"
    );
    assert!(sink(&second)["attempts"].as_u64().unwrap() >= 2);

    let stalled = api.status_until(t, |s| sink(s)["state"] == "stalled").await;
    assert_eq!(stalled["ready"], false);
    assert!(age(&stalled) >= 2.0, "{stalled:#}");
    let warning = &stalled["warnings"][0];
    assert_eq!(warning["kind"], "sink_stalled");
    assert!(warning["message"].as_str().unwrap().contains("central"));
    let (code, body) = api.get("/readyz", t).await.unwrap();
    assert_eq!(code, 503);
    let body: Value = serde_json::from_str(&body).unwrap();
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("sink 'central' stalled"), "{body}");

    h.receiver.restart().await.unwrap();
    let back = api
        .status_until(t, |s| {
            sink(s)["backlog_events"] == 0 && sink(s)["state"] == "ok" && s["ready"] == true
        })
        .await;
    assert_eq!(sink(&back)["delivered"], 40);
    assert!(sink(&back)["oldest_undelivered_age_seconds"].is_null());
    assert!(sink(&back)["last_success_time"].is_string());
    assert_eq!(back["warnings"], json!([]));
    assert_eq!(api.code("/readyz", t).await, 200);
    assert_eq!(h.receiver.stats().unique_ids, 40);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_task_that_panics_makes_the_agent_not_ready_and_withholds_the_watchdog() {
    let h = Harness::new().await;
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    let t = Some(TOKEN);
    assert_eq!(api.code("/readyz", t).await, 200);
    assert!(plantrelay::service::liveness(&a.view).is_ok());

    // A task of the agent's own kind, supervised the same way as its
    // sources, forwarders and listeners.
    a.view
        .supervisor
        .spawn("forwarder of sink 'central'".into(), async {
            panic!("index out of bounds")
        })
        .join()
        .await;
    let (code, body) = api.get("/readyz", t).await.unwrap();
    assert_eq!(code, 503);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["reasons"]
            .to_string()
            .contains("forwarder of sink 'central' has stopped (panicked: index out of bounds)"),
        "{body}"
    );
    let live = plantrelay::service::liveness(&a.view).unwrap_err();
    assert!(live.contains("forwarder of sink 'central'"), "{live}");
    let status = api.status(t).await;
    assert_eq!(status["ready"], false);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_names_the_agent_its_journal_disk_and_every_source_and_sink() {
    let h = Harness::new().await;
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("s", 5, 1))
            .await
            .0,
        202
    );
    let s = api
        .status_until(Some(TOKEN), |s| sink(s)["delivered"] == 5)
        .await;
    assert_eq!(s["agent_id"], "gw-test");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].is_u64());
    let j = &s["journal"];
    assert_eq!(j["head_seq"], 5);
    assert_eq!(j["events_stored"], 5);
    assert!(j["used_bytes"].as_u64().unwrap() > 0);
    assert!(j["capacity_ratio"].as_f64().unwrap() > 0.0);
    assert!(j["disk_free_bytes"].as_u64().unwrap() > 0);
    assert!(j["disk_total_bytes"].as_u64().unwrap() >= j["disk_free_bytes"].as_u64().unwrap());
    assert_eq!(j["evicted_telemetry"], 0);
    assert_eq!(j["evicted_critical"], 0);
    assert!(j["quarantined"].is_null());
    let src = &s["sources"][0];
    assert_eq!(src["name"], "mes");
    assert_eq!(src["kind"], "http");
    assert_eq!(src["connected"], true);
    assert_eq!(src["events"], 5);
    assert!(src["last_event_time"].is_string());
    let k = sink(&s);
    assert_eq!(k["name"], "central");
    assert_eq!(k["kind"], "https");
    assert_eq!(k["cursor"], 5);
    assert_eq!(k["dead_letters"], 0);
    a.shutdown().await;
}

// ---------------------------------------------------------------------------
// Metrics

/// The value of one sample, by name and an optional label.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: unexpected {other:?}"),
    }
}

fn is_counter(scrape: &prometheus_parse::Scrape, name: &str) -> bool {
    scrape
        .samples
        .iter()
        .any(|s| s.metric == name && matches!(s.value, prometheus_parse::Value::Counter(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_agree_with_the_status_json() {
    let h = Harness::new().await;
    h.receiver.reject_ids(["m-3"]);
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    let t = Some(TOKEN);
    let client = http_client();
    let events = mes_events("m", 30, 3);
    assert_eq!(post(&client, &ingest_url(&a), &events).await.0, 202);
    api.status_until(t, |s| {
        sink(s)["cursor"] == 30 && sink(s)["dead_letters"] == 1
    })
    .await;
    // Five posted again: acked as duplicates, not stored.
    assert_eq!(post(&client, &ingest_url(&a), &events[..5]).await.0, 202);
    // Upstream down: a stable backlog of 10.
    h.receiver.stop().await;
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("n", 10, 2))
            .await
            .0,
        202
    );
    let status = api
        .status_until(t, |s| {
            sink(s)["backlog_events"] == 10 && sink(s)["state"] == "retrying"
        })
        .await;

    let resp = api
        .client
        .get(format!("{}/metrics", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = resp.text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();

    let central = Some(("sink", "central"));
    let mes = Some(("source", "mes"));
    let k = sink(&status);
    let j = &status["journal"];
    let src = &status["sources"][0];
    let num = |v: &Value| v.as_f64().unwrap();
    assert_eq!(
        sample(&scrape, "plantrelay_sink_backlog_events", central),
        10.0
    );
    assert_eq!(
        sample(&scrape, "plantrelay_sink_backlog_events", central),
        num(&k["backlog_events"])
    );
    assert_eq!(
        sample(&scrape, "plantrelay_events_ingested_total", mes),
        num(&src["events"])
    );
    assert_eq!(
        sample(&scrape, "plantrelay_events_ingested_total", mes),
        40.0
    );
    assert_eq!(
        sample(&scrape, "plantrelay_duplicates_total", mes),
        num(&src["duplicates"])
    );
    assert_eq!(sample(&scrape, "plantrelay_duplicates_total", mes), 5.0);
    assert_eq!(
        sample(&scrape, "plantrelay_dead_letters", central),
        num(&k["dead_letters"])
    );
    assert_eq!(sample(&scrape, "plantrelay_dead_letters", central), 1.0);
    assert_eq!(
        sample(&scrape, "plantrelay_journal_bytes", None),
        num(&j["used_bytes"])
    );
    assert!(
        (sample(&scrape, "plantrelay_journal_capacity_ratio", None) - num(&j["capacity_ratio"]))
            .abs()
            < 1e-9
    );
    assert_eq!(
        sample(&scrape, "plantrelay_sink_delivered_events_total", central),
        num(&k["delivered"])
    );
    assert_eq!(
        sample(&scrape, "plantrelay_sink_delivered_events_total", central),
        29.0
    );
    assert_eq!(
        sample(&scrape, "plantrelay_sink_cursor", central),
        num(&k["cursor"])
    );
    assert!(sample(&scrape, "plantrelay_sink_attempts_total", central) >= num(&k["attempts"]));
    let oldest = sample(
        &scrape,
        "plantrelay_sink_oldest_undelivered_age_seconds",
        central,
    );
    assert!(
        oldest >= age(&status) && oldest > 0.0,
        "{oldest} vs {status:#}"
    );
    let last_success = humantime::parse_rfc3339(k["last_success_time"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (sample(
            &scrape,
            "plantrelay_sink_last_success_timestamp_seconds",
            central
        ) - last_success)
            .abs()
            < 1e-3
    );
    assert_eq!(sample(&scrape, "plantrelay_source_connected", mes), 1.0);
    assert_eq!(
        sample(&scrape, "plantrelay_source_requests_in_flight", mes),
        0.0,
        "every request answered"
    );
    assert_eq!(
        sample(
            &scrape,
            "plantrelay_evicted_events_total",
            Some(("class", "telemetry"))
        ),
        0.0
    );
    assert_eq!(
        sample(
            &scrape,
            "plantrelay_evicted_events_total",
            Some(("class", "critical"))
        ),
        0.0
    );
    assert!(sample(&scrape, "plantrelay_journal_disk_free_bytes", None) > 0.0);
    assert_eq!(
        sample(
            &scrape,
            "plantrelay_build_info",
            Some(("version", env!("CARGO_PKG_VERSION")))
        ),
        1.0
    );
    assert!(sample(&scrape, "plantrelay_uptime_seconds", None) >= num(&status["uptime_seconds"]));
    let state = |s: &str| {
        scrape
            .samples
            .iter()
            .find(|x| {
                x.metric == "plantrelay_sink_state"
                    && x.labels.get("sink") == Some("central")
                    && x.labels.get("state") == Some(s)
            })
            .map(|x| matches!(x.value, prometheus_parse::Value::Gauge(v) if v == 1.0))
            .unwrap()
    };
    assert!(state("retrying") && !state("ok") && !state("stalled"));
    for counter in [
        "plantrelay_events_ingested_total",
        "plantrelay_duplicates_total",
        "plantrelay_evicted_events_total",
        "plantrelay_sink_delivered_events_total",
        "plantrelay_sink_attempts_total",
        "plantrelay_sink_upstream_duplicate_events_total",
    ] {
        assert!(is_counter(&scrape, counter), "{counter} is not a counter");
    }
    a.shutdown().await;
}

/// The metrics of the agent behind `api`.
async fn scrape(api: &Api) -> prometheus_parse::Scrape {
    let text = api.get("/metrics", Some(TOKEN)).await.unwrap().1;
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_replaced_at_start_up_because_it_was_damaged_is_a_warning() {
    let h = Harness::new().await;
    std::fs::create_dir_all(h.state_dir()).unwrap();
    std::fs::write(h.state_dir().join("journal.db"), vec![0x42u8; 10_000]).unwrap();
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    let s = api.status(Some(TOKEN)).await;
    let q = &s["journal"]["quarantined"];
    assert!(
        q["moved_to"]
            .as_str()
            .unwrap()
            .contains("journal.db.corrupt-"),
        "{s:#}"
    );
    // Garbage holds no events to salvage.
    assert_eq!(q["salvaged_events"], json!(0), "{s:#}");
    let kinds: Vec<&Value> = s["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| &w["kind"])
        .collect();
    assert_eq!(kinds, [&json!("journal_quarantined")]);
    // Still ready: the fresh journal works.
    assert_eq!(s["ready"], true);
    let m = scrape(&api).await;
    assert_eq!(sample(&m, "plantrelay_journal_quarantined", None), 1.0);
    assert_eq!(
        sample(
            &m,
            "plantrelay_warnings",
            Some(("kind", "journal_quarantined"))
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "plantrelay_warnings", Some(("kind", "sink_stalled"))),
        0.0
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_from_a_full_journal_are_a_warning_and_counted_by_class() {
    let h = Harness::new().await;
    h.receiver.stop().await;
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "",
            &health_toml(&h, TOKEN_ONLY, "127.0.0.1:0"),
        )
        .replace(
            "sync = \"normal\"",
            "sync = \"normal\"\nmax_size = \"16MiB\"\nwhen_full = \"drop_oldest\"",
        )
        .replace(
            "name = \"mes\"\nlisten = \"127.0.0.1:0\"",
            "name = \"mes\"\nlisten = \"127.0.0.1:0\"\nclass = \"telemetry\"",
        );
    let a = agent::start(&Config::load(&h.write_config(&text)).unwrap())
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    let client = http_client();
    let payload = "x".repeat(900);
    for round in 0..60 {
        let mut events = mes_events(&format!("big{round}"), 500, 4);
        for e in &mut events {
            e["data"] = Value::String(payload.clone());
        }
        assert_eq!(post(&client, &ingest_url(&a), &events).await.0, 202);
        let s = api.status(Some(TOKEN)).await;
        if s["journal"]["evicted_telemetry"].as_u64().unwrap() > 0 {
            break;
        }
    }
    let s = api.status(Some(TOKEN)).await;
    let evicted = s["journal"]["evicted_telemetry"].as_u64().unwrap();
    assert!(evicted > 0, "the journal had to evict: {s:#}");
    assert_eq!(s["journal"]["evicted_critical"], 0);
    let warning = s["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["kind"] == "events_evicted")
        .unwrap_or_else(|| panic!("no eviction warning: {s:#}"));
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{evicted} telemetry")),
        "{warning}"
    );
    let m = scrape(&api).await;
    let telemetry = Some(("class", "telemetry"));
    assert_eq!(
        sample(&m, "plantrelay_evicted_events_total", telemetry),
        evicted as f64
    );
    assert_eq!(
        sample(
            &m,
            "plantrelay_evicted_events_total",
            Some(("class", "critical"))
        ),
        0.0
    );
    assert_eq!(
        sample(&m, "plantrelay_warnings", Some(("kind", "events_evicted"))),
        1.0
    );
    assert!(sample(&m, "plantrelay_journal_capacity_ratio", None) > 0.5);
    a.shutdown().await;
}

// ---------------------------------------------------------------------------
// Authentication

const READ_PATHS: [&str; 4] = ["/healthz", "/readyz", "/api/v1/status", "/metrics"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_endpoint_wants_it_and_a_wrong_one_gets_a_bare_401() {
    let h = Harness::new().await;
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    for path in READ_PATHS.iter().chain(&["/nope"]) {
        for token in [None, Some("wrong"), Some(""), Some("read-s3cre")] {
            let (code, body) = api.get(path, token).await.unwrap();
            assert_eq!(code, 401, "{path} {token:?}");
            assert_eq!(body, "unauthorized\n", "no details for {path}");
        }
    }
    for path in READ_PATHS {
        assert_eq!(api.code(path, Some(TOKEN)).await, 200, "{path}");
    }
    assert_eq!(api.code("/nope", Some(TOKEN)).await, 404);
    assert_eq!(api.code("/api/v1/statusx", Some(TOKEN)).await, 404);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_certificates_a_client_without_one_fails_the_handshake() {
    let h = Harness::new().await;
    let setup = Setup {
        mtls: true,
        ..Setup::default()
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let anonymous = Api::new(&h, &a, false);
    for path in READ_PATHS {
        let e = anonymous.get(path, None).await.unwrap_err();
        assert!(e.is_connect() || e.is_request(), "{path}: {e:?}");
    }
    let with_cert = Api::new(&h, &a, true);
    for path in READ_PATHS {
        assert_eq!(with_cert.code(path, None).await, 200, "{path}");
    }
    assert_eq!(with_cert.code("/nope", None).await, 404);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_and_client_certificates_a_client_needs_both() {
    let h = Harness::new().await;
    let setup = Setup {
        mtls: true,
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let anonymous = Api::new(&h, &a, false);
    assert!(anonymous.get("/api/v1/status", Some(TOKEN)).await.is_err());
    let with_cert = Api::new(&h, &a, true);
    for path in READ_PATHS {
        assert_eq!(with_cert.code(path, None).await, 401, "{path}");
        assert_eq!(with_cert.code(path, Some("wrong")).await, 401, "{path}");
        assert_eq!(with_cert.code(path, Some(TOKEN)).await, 200, "{path}");
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_probes_exempts_only_healthz_and_readyz() {
    let h = Harness::new().await;
    let setup = Setup {
        open_probes: true,
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    assert_eq!(api.code("/healthz", None).await, 200);
    assert_eq!(api.code("/readyz", None).await, 200);
    assert_eq!(api.code("/api/v1/status", None).await, 401);
    assert_eq!(api.code("/metrics", None).await, 401);
    assert_eq!(api.code("/nope", None).await, 401);
    assert_eq!(api.code("/api/v1/status", Some(TOKEN)).await, 200);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_probes_with_client_certificates_admits_certificate_less_probes_only() {
    let h = Harness::new().await;
    let setup = Setup {
        mtls: true,
        open_probes: true,
        ..Setup::default()
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let anonymous = Api::new(&h, &a, false);
    assert_eq!(anonymous.code("/healthz", None).await, 200);
    assert_eq!(anonymous.code("/readyz", None).await, 200);
    assert_eq!(anonymous.code("/api/v1/status", None).await, 401);
    assert_eq!(anonymous.code("/metrics", None).await, 401);
    let with_cert = Api::new(&h, &a, true);
    assert_eq!(with_cert.code("/api/v1/status", None).await, 200);
    assert_eq!(with_cert.code("/metrics", None).await, 200);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_authentication_is_refused_unless_allow_unauthenticated_is_set() {
    let h = Harness::new().await;
    let text = h.config_text(
        "127.0.0.1:0",
        &h.receiver.url(),
        "",
        &health_toml(&h, Setup::default(), "127.0.0.1:0"),
    );
    let e = Config::load(&h.write_config(&text))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("health.token_file") && e.contains("no authentication configured"),
        "{e}"
    );
    // An admin token alone does not count as read authentication.
    let setup = Setup {
        admin: true,
        ..Setup::default()
    };
    let text = h.config_text(
        "127.0.0.1:0",
        &h.receiver.url(),
        "",
        &health_toml(&h, setup, "127.0.0.1:0"),
    );
    assert!(Config::load(&h.write_config(&text)).is_err());

    let setup = Setup {
        allow_unauthenticated: true,
        ..Setup::default()
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    for path in READ_PATHS {
        assert_eq!(api.code(path, None).await, 200, "{path}");
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_request_to_the_health_port_gets_no_http_answer() {
    let h = Harness::new().await;
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let mut tcp = tokio::net::TcpStream::connect(a.health_addr.unwrap())
        .await
        .unwrap();
    tcp.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer read-s3cret\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("HTTP/1."),
        "plain HTTP got an HTTP answer: {text:?}"
    );
    // What came back, if anything, is a TLS alert record (content type 21).
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
    // The listener still serves HTTPS.
    assert_eq!(
        Api::new(&h, &a, false).code("/healthz", Some(TOKEN)).await,
        200
    );
    a.shutdown().await;
}

// ---------------------------------------------------------------------------
// Admin endpoints

/// The audit lines of `action` logged so far (by any test of the binary).
fn audit_lines(action: &str) -> Vec<String> {
    support::logs::text()
        .lines()
        .filter(|l| l.contains("plantrelay::audit") && l.contains(&format!("action=\"{action}\"")))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_admin_endpoints_are_off() {
    let h = Harness::new().await;
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    let (code, body) = api
        .post(
            "/api/v1/sinks/central/replay",
            Some(TOKEN),
            r#"{"from_seq": 1}"#,
        )
        .await;
    assert_eq!(code, 403);
    assert!(
        body["error"].as_str().unwrap().contains("admin API is off"),
        "{body}"
    );
    assert_eq!(api.code("/api/v1/dead-letters", Some(TOKEN)).await, 403);
    assert_eq!(
        api.delete("/api/v1/dead-letters/1", Some(TOKEN)).await.0,
        403
    );
    // Without the read token: the bare 401 first.
    let (code, body) = api
        .post("/api/v1/sinks/central/replay", None, r#"{"from_seq": 1}"#)
        .await;
    assert_eq!((code, body), (401, Value::String("unauthorized\n".into())));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_the_api_may_name_one_class() {
    let h = Harness::new().await;
    let setup = Setup {
        admin: true,
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("cl", 40, 2))
            .await
            .0,
        202
    );
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 40).await);
    api.status_until(Some(ADMIN), |s| sink(s)["cursor"] == 40)
        .await;
    let replay = |body: &'static str| api.post("/api/v1/sinks/central/replay", Some(ADMIN), body);
    // The MES events are critical: replaying telemetry moves nothing.
    let (code, body) = replay(r#"{"from_seq": 1, "class": "telemetry"}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cursor"], 40);
    let (code, body) = replay(r#"{"from_seq": 31, "class": "critical"}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cursor"], 30);
    assert!(
        h.receiver.wait_until(WAIT, |s| s.duplicates >= 10).await,
        "{:?}",
        h.receiver.stats()
    );
    let (code, body) = replay(r#"{"from_seq": 1, "class": "urgent"}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("urgent"), "{body}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_the_api_redelivers_the_range_in_order_with_the_same_ids() {
    support::logs::start();
    let h = Harness::new().await;
    let setup = Setup {
        admin: true,
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("rp", 40, 2))
            .await
            .0,
        202
    );
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 40).await);
    api.status_until(Some(ADMIN), |s| sink(s)["cursor"] == 40)
        .await;

    // The read token is not enough.
    let (code, _) = api
        .post(
            "/api/v1/sinks/central/replay",
            Some(TOKEN),
            r#"{"from_seq": 31}"#,
        )
        .await;
    assert_eq!(code, 401);
    let (code, body) = api
        .post(
            "/api/v1/sinks/central/replay",
            Some(ADMIN),
            r#"{"from_seq": 31}"#,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cursor"], 30);
    assert_eq!(body["from_seq"], 31);
    assert_eq!(body["backlog_events"], 10);
    if !h
        .receiver
        .wait_until(WAIT, |s| s.events_received >= 50)
        .await
    {
        panic!("LOGS:\n{}", support::logs::text());
    }
    // A quiet spell: nothing beyond the range may follow.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let events = h.receiver.events();
    assert_eq!(events.len(), 50, "exactly the range again");
    let first_time: Vec<(u64, String)> = events[..40]
        .iter()
        .map(|e| (e.sequence.unwrap(), e.id.clone()))
        .collect();
    let again: Vec<(u64, String)> = events[40..]
        .iter()
        .map(|e| (e.sequence.unwrap(), e.id.clone()))
        .collect();
    assert_eq!(
        again,
        first_time[30..].to_vec(),
        "seqs 31..=40, in order, same ids"
    );
    assert!(events[40..].iter().all(|e| e.duplicate));
    assert!(events[..40].iter().all(|e| !e.duplicate));

    let lines = audit_lines("replay");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("who=\"admin-token@127.0.0.1\"")
                && l.contains("sink central from_seq 31")
                && l.contains("ok: cursor 30")
                && l.contains(" at=")
                && l.contains("peer=127.0.0.1:")),
        "{lines:#?}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_requests_get_a_400_with_the_reason_and_unknown_sinks_a_404() {
    let h = Harness::new().await;
    let setup = Setup {
        admin: true,
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    let replay = "/api/v1/sinks/central/replay";
    for (body, reason) in [
        ("", "empty body"),
        ("{", "invalid body"),
        ("[1]", "invalid body"),
        (r#"{"from_seq": "ten"}"#, "invalid body"),
        (r#"{"from_seq": -3}"#, "invalid body"),
        (r#"{"seq": 3}"#, "unknown field `seq`"),
        ("{}", "give from_seq or since"),
        (r#"{"from_seq": 1, "since": "1h"}"#, "not both"),
        (r#"{"from_seq": 0}"#, "at least 1"),
        (r#"{"since": "last tuesday"}"#, "RFC 3339"),
    ] {
        let (code, answer) = api.post(replay, Some(ADMIN), body).await;
        assert_eq!(code, 400, "{body:?} → {answer}");
        let e = answer["error"].as_str().unwrap();
        assert!(e.contains(reason), "{body:?} → {e}");
    }
    let (code, answer) = api
        .post(
            "/api/v1/sinks/nowhere/replay",
            Some(ADMIN),
            r#"{"from_seq": 1}"#,
        )
        .await;
    assert_eq!(code, 404);
    assert!(
        answer["error"].as_str().unwrap().contains("nowhere"),
        "{answer}"
    );
    // A good "since" is accepted.
    let (code, answer) = api.post(replay, Some(ADMIN), r#"{"since": "2h"}"#).await;
    assert_eq!(code, 200, "{answer}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_a_range_retention_deleted_is_a_409_with_the_journals_reason() {
    let h = Harness::new().await;
    let setup = Setup {
        admin: true,
        ..TOKEN_ONLY
    };
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "",
            &health_toml(&h, setup, "127.0.0.1:0"),
        )
        .replace("[journal]\n", "[journal]\nretain_acked = \"0s\"\n");
    let a = agent::start(&Config::load(&h.write_config(&text)).unwrap())
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("rt", 10, 1))
            .await
            .0,
        202
    );
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 10).await);
    // Retention runs on the journal's once-a-second tick.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, answer) = api
            .post(
                "/api/v1/sinks/central/replay",
                Some(ADMIN),
                r#"{"from_seq": 1}"#,
            )
            .await;
        if code == 409 {
            let e = answer["error"].as_str().unwrap();
            assert!(
                e.contains("retention already deleted everything before seq"),
                "{e}"
            );
            break;
        }
        assert_eq!(code, 200, "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retried_over_the_api_is_delivered_and_cleared_and_one_deleted_is_gone() {
    support::logs::start();
    let h = Harness::new().await;
    h.receiver.reject_ids(["dl-3", "dl-7"]);
    let setup = Setup {
        admin: true,
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    let t = Some(ADMIN);
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("dl", 10, 1))
            .await
            .0,
        202
    );
    api.status_until(t, |s| {
        sink(s)["cursor"] == 10 && sink(s)["dead_letters"] == 2
    })
    .await;

    assert_eq!(api.code("/api/v1/dead-letters", Some(TOKEN)).await, 401);
    let list = api.json("/api/v1/dead-letters?sink=central", t).await;
    let dead = list["dead_letters"].as_array().unwrap();
    let ids: Vec<&str> = dead
        .iter()
        .map(|d| d["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dl-3", "dl-7"]);
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("422"),
        "{list}"
    );
    assert_eq!(dead[0]["sink"], "central");
    assert!(dead[0]["time"].is_string());
    let (id3, id7) = (
        dead[0]["id"].as_i64().unwrap(),
        dead[1]["id"].as_i64().unwrap(),
    );
    assert_eq!(api.code("/api/v1/dead-letters?sink=nowhere", t).await, 404);

    h.receiver.clear_faults();
    let (code, body) = api
        .post(&format!("/api/v1/dead-letters/{id3}/retry"), t, "")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["seq"], 11);
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 9).await);
    assert!(h.receiver.ids().iter().any(|(_, id)| id == "dl-3"));
    let s = api
        .status_until(t, |s| {
            sink(s)["backlog_events"] == 0 && sink(s)["dead_letters"] == 1
        })
        .await;
    assert_eq!(sink(&s)["state"], "ok");
    let list = api.json("/api/v1/dead-letters", t).await;
    assert_eq!(list["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(list["dead_letters"][0]["event_id"], "dl-7");

    let (code, body) = api.delete(&format!("/api/v1/dead-letters/{id7}"), t).await;
    assert_eq!((code, &body["deleted"]), (200, &json!(true)), "{body}");
    assert_eq!(
        api.json("/api/v1/dead-letters", t).await["dead_letters"],
        json!([])
    );
    assert!(!h.receiver.ids().iter().any(|(_, id)| id == "dl-7"));
    let (code, body) = api.delete(&format!("/api/v1/dead-letters/{id7}"), t).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        api.post("/api/v1/dead-letters/999/retry", t, "").await.0,
        404
    );
    let (code, body) = api.post("/api/v1/dead-letters/abc/retry", t, "").await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("not an integer"));
    api.status_until(t, |s| sink(s)["dead_letters"] == 0).await;

    assert!(!audit_lines("dead_letter_retry").is_empty());
    let deletes = audit_lines("dead_letter_delete");
    assert!(
        deletes.iter().any(
            |l| l.contains(&format!("dead letter {id7} of sink central"))
                && l.contains("outcome=\"ok\"")
        ),
        "{deletes:#?}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_certificates_the_audit_line_names_the_certificate_subject() {
    support::logs::start();
    let h = Harness::new().await;
    let setup = Setup {
        mtls: true,
        admin: true,
        ..Setup::default()
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, true);
    // The certificate alone reads, but does not administer.
    assert_eq!(api.code("/api/v1/status", None).await, 200);
    let replay = "/api/v1/sinks/central/replay";
    assert_eq!(api.post(replay, None, r#"{"from_seq": 1}"#).await.0, 401);
    let (code, body) = api.post(replay, Some(ADMIN), r#"{"from_seq": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    let lines = audit_lines("replay");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("client_cert=\"CN=plantrelay demo agent\"")
                && l.contains("who=\"CN=plantrelay demo agent (admin-token)\"")),
        "{lines:#?}"
    );
    a.shutdown().await;
}

// ---------------------------------------------------------------------------
// Certificate reload

/// The leaf certificate the server at `addr` presents in a new handshake,
/// trusting the CAs in `ca_bundle`.
fn presented_cert(addr: SocketAddr, ca_bundle: &Path) -> std::io::Result<Vec<u8>> {
    let cfg = plantrelay::tls::client_config(&ClientTls {
        ca_file: Some(ca_bundle.to_path_buf()),
        ca_only: true,
        ..ClientTls::default()
    })
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(conn.peer_certificates().unwrap()[0].to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    plantrelay::tls::certs_from_pem(pem.as_bytes(), "test").unwrap()[0].to_vec()
}

/// Certificate files of the health listener only, and a CA bundle that
/// trusts both the old and the new PKI.
struct Rotation {
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
    next: EphemeralPki,
}

impl Rotation {
    fn new(h: &Harness) -> Rotation {
        let dir = h.dir.path().join("health-tls");
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("health.crt");
        let key = dir.join("health.key");
        std::fs::copy(&h.paths.server_cert, &cert).unwrap();
        std::fs::copy(&h.paths.server_key, &key).unwrap();
        let next = EphemeralPki::generate().unwrap();
        let bundle = dir.join("bundle.crt");
        std::fs::write(&bundle, format!("{}{}", h.pki.ca_pem(), next.ca_pem())).unwrap();
        Rotation {
            cert,
            key,
            bundle,
            next,
        }
    }

    fn health_toml(&self, listen: &str) -> String {
        format!(
            "[health]\nlisten = \"{listen}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nallow_unauthenticated = true\n",
            self.cert.display(),
            self.key.display()
        )
    }

    /// Overwrites the files with the next PKI's server certificate.
    fn rotate(&self) {
        std::fs::write(&self.cert, self.next.server_cert_pem()).unwrap();
        std::fs::write(&self.key, self.next.server_key_pem()).unwrap();
    }
}

async fn presented(addr: SocketAddr, bundle: &Path) -> std::io::Result<Vec<u8>> {
    let bundle = bundle.to_path_buf();
    tokio::task::spawn_blocking(move || presented_cert(addr, &bundle))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_new_certificate_to_new_handshakes_and_a_bad_one_keeps_the_old() {
    let h = Harness::new().await;
    let rot = Rotation::new(&h);
    let text = h.config_text(
        "127.0.0.1:0",
        &h.receiver.url(),
        "",
        &rot.health_toml("127.0.0.1:0"),
    );
    let a = agent::start(&Config::load(&h.write_config(&text)).unwrap())
        .await
        .unwrap();
    let addr = a.health_addr.unwrap();
    let old = der(h.pki.server_cert_pem());
    let new = der(rot.next.server_cert_pem());
    assert_ne!(old, new);
    assert_eq!(presented(addr, &rot.bundle).await.unwrap(), old);

    rot.rotate();
    // Nothing changes before the reload.
    assert_eq!(presented(addr, &rot.bundle).await.unwrap(), old);
    a.tls_reloader().unwrap().reload().unwrap();
    assert_eq!(presented(addr, &rot.bundle).await.unwrap(), new);

    // A broken file: the reload fails and the certificate in use stays.
    std::fs::write(&rot.cert, "not a certificate\n").unwrap();
    let e = a.tls_reloader().unwrap().reload().unwrap_err().to_string();
    assert!(e.contains("health.crt"), "{e}");
    assert_eq!(presented(addr, &rot.bundle).await.unwrap(), new);
    let api = Api::at(
        &ClientTls {
            ca_file: Some(rot.bundle.clone()),
            ca_only: true,
            ..ClientTls::default()
        },
        addr,
    );
    assert_eq!(api.code("/healthz", None).await, 200);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_a_running_agent_reloads_the_certificate_and_keeps_it_running() {
    let h = Harness::new().await;
    let rot = Rotation::new(&h);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = h.config_text(
        "127.0.0.1:0",
        &h.receiver.url(),
        "",
        &rot.health_toml(&addr.to_string()),
    );
    let config = h.write_config(&text);
    let log = std::fs::File::create(h.dir.path().join("agent.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let old = der(h.pki.server_cert_pem());
    let new = der(rot.next.server_cert_pem());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match presented(addr, &rot.bundle).await {
            Ok(cert) => {
                assert_eq!(cert, old);
                break;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the agent never listened on {addr}: {e}"
                );
                assert!(child.try_wait().unwrap().is_none(), "the agent exited");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    rot.rotate();
    support::signal(child.id(), "HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    while presented(addr, &rot.bundle).await.unwrap() != new {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not end the agent"
    );
    support::signal(child.id(), "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(h.dir.path().join("agent.log")).unwrap();
    assert!(log.contains("health TLS certificates reloaded"), "{log}");
}

// ---------------------------------------------------------------------------
// plantrelay status

/// Runs `plantrelay status` with `args`; returns (exit code, stdout, stderr).
async fn status_cli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_plantrelay"))
            .arg("status")
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn cli_args(url: &str, token: Option<&Path>, ca: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--url".to_string(), url.to_string()];
    if let Some(t) = token {
        v.push("--token-file".into());
        v.push(t.display().to_string());
    }
    v.push("--ca-file".into());
    v.push(ca.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plantrelay_status_exits_0_when_healthy_1_when_a_sink_stalls_and_2_when_refused() {
    let h = Harness::new().await;
    let setup = Setup {
        stall_after: Some("1s"),
        ..TOKEN_ONLY
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let api = Api::new(&h, &a, false);
    let url = format!("https://localhost:{}", a.health_addr.unwrap().port());
    let token = token_file(&h);
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("c", 10, 2))
            .await
            .0,
        202
    );
    api.status_until(Some(TOKEN), |s| sink(s)["delivered"] == 10)
        .await;

    let (code, out, err) = status_cli(cli_args(&url, Some(&token), &h.paths.ca, &[])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("agent gw-test (plantrelay "), "{out}");
    assert!(out.contains(": HEALTHY"), "{out}");
    assert!(out.contains("mes") && out.contains("events 10"), "{out}");
    assert!(
        out.contains("central") && out.contains(" ok ") && out.contains("backlog 0"),
        "{out}"
    );
    assert!(out.contains("warnings: none"), "{out}");
    println!("healthy:\n{out}");

    let (code, out, _) = status_cli(cli_args(&url, Some(&token), &h.paths.ca, &["--json"])).await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["agent_id"], "gw-test");
    assert_eq!(json["sinks"][0]["backlog_events"], 0);

    // Wrong token, no token, wrong CA: unauthorised or untrusted, exit 2.
    let wrong = h.dir.path().join("wrong.token");
    std::fs::write(&wrong, "nope\n").unwrap();
    let (code, _, err) = status_cli(cli_args(&url, Some(&wrong), &h.paths.ca, &[])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = status_cli(cli_args(&url, None, &h.paths.ca, &[])).await;
    assert_eq!(code, 2, "{err}");
    let other = EphemeralPki::generate().unwrap();
    let other_ca = h.dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, other.ca_pem()).unwrap();
    let (code, _, err) = status_cli(cli_args(&url, Some(&token), &other_ca, &[])).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = status_cli(cli_args(
        &url.replace("https", "http"),
        Some(&token),
        &h.paths.ca,
        &[],
    ))
    .await;
    assert_eq!(code, 2, "{err}");

    // Upstream down: stalled after a second, exit 1.
    h.receiver.stop().await;
    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("d", 5, 1))
            .await
            .0,
        202
    );
    api.status_until(Some(TOKEN), |s| sink(s)["state"] == "stalled")
        .await;
    let (code, out, err) = status_cli(cli_args(&url, Some(&token), &h.paths.ca, &[])).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(": DEGRADED"), "{out}");
    assert!(
        out.contains("stalled") && out.contains("backlog 5"),
        "{out}"
    );
    assert!(
        out.contains("last error") && out.contains("refused"),
        "{out}"
    );
    assert!(
        out.contains("not ready\n  - sink 'central' stalled"),
        "{out}"
    );
    println!("stalled:\n{out}");

    a.shutdown().await;
    // The port is closed now.
    let (code, _, err) = status_cli(cli_args(&url, Some(&token), &h.paths.ca, &[])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot get"), "{err}");
    let _ = std::io::stdout().flush();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plantrelay_status_presents_the_client_certificate_it_is_given() {
    let h = Harness::new().await;
    let setup = Setup {
        mtls: true,
        ..Setup::default()
    };
    let a = agent::start(&config_with(&h, setup, "")).await.unwrap();
    let url = format!("https://localhost:{}", a.health_addr.unwrap().port());
    let cert = h.paths.client_cert.display().to_string();
    let key = h.paths.client_key.display().to_string();
    let (code, out, err) = status_cli(cli_args(
        &url,
        None,
        &h.paths.ca,
        &["--client-cert", &cert, "--client-key", &key],
    ))
    .await;
    assert!(code == 0 || code == 1, "{out}{err}");
    assert!(out.contains("agent gw-test"), "{out}");
    let (code, _, err) = status_cli(cli_args(&url, None, &h.paths.ca, &[])).await;
    assert_eq!(
        code, 2,
        "without the certificate the handshake fails: {err}"
    );
    // Half a client identity is a usage error.
    let (code, _, err) =
        status_cli(cli_args(&url, None, &h.paths.ca, &["--client-cert", &cert])).await;
    assert_eq!(code, 2, "{err}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_one_authenticated_html_page_of_the_status() {
    let h = Harness::new().await;
    let a = agent::start(&config_with(&h, TOKEN_ONLY, ""))
        .await
        .unwrap();
    let api = Api::new(&h, &a, false);
    assert_eq!(
        api.code("/", None).await,
        401,
        "the status API's authentication"
    );
    // An upstream error that holds markup is shown as text.
    h.receiver
        .script([plantrelay::demo::receiver::Scripted::Status {
            status: 503,
            retry_after: None,
        }]);
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let (code, _) = post(&http_client(), &url, &mes_events("page", 5, 1)).await;
    assert_eq!(code, 202);
    assert!(h.receiver.wait_for(5, Duration::from_secs(30)).await);
    let (code, page) = api.get("/", Some(TOKEN)).await.unwrap();
    assert_eq!(code, 200);
    assert!(page.starts_with("<!doctype html>"), "{page}");
    for text in [
        "plantrelay gw-test",
        "<td>mes</td>",
        "<td>central</td>",
        "critical",
        "503",
        "/api/v1/status",
        "name=viewport",
    ] {
        assert!(page.contains(text), "{text} not on the page:\n{page}");
    }
    assert!(!page.contains("<script"), "no scripts");
    assert!(!page.contains(TOKEN), "no secrets");
    a.shutdown().await;
}
