//! Central monitoring end to end: `plantrelay status --fleet` through the
//! real binary against real agents in-process (healthy, upstream down, not
//! running, wrong token, wrong CA) and a gateway that accepts TCP and never
//! answers; and the shipped Prometheus rules against a live agent's
//! `/metrics`.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use plantrelay::agent::{self, RunningAgent};
use plantrelay::cli::fleet::{FleetOptions, State};
use plantrelay::config::Config;
use serde_json::Value;
use support::agent::{Harness, http_client, mes_events, post};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "fleet-read-s3cret";

/// The `[health]` section with a read token; `stall_after` makes a sink
/// with a dead upstream count as stalled soon.
fn health_toml(h: &Harness, stall_after: &str) -> String {
    let token = token_file(h);
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    format!(
        "[health]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\nstall_after = \"{stall_after}\"\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display(),
        token.display(),
    )
}

fn token_file(h: &Harness) -> PathBuf {
    h.dir.path().join("health.token")
}

async fn start_agent(h: &Harness) -> RunningAgent {
    let text = h.config_text("127.0.0.1:0", &h.receiver.url(), "", &health_toml(h, "1s"));
    let config = Config::load(&h.write_config(&text)).unwrap();
    agent::start(&config).await.unwrap()
}

fn health_url(a: &RunningAgent) -> String {
    format!("https://localhost:{}", a.health_addr.unwrap().port())
}

fn ingest_url(a: &RunningAgent) -> String {
    format!("http://{}/v1/events", a.http_addr("mes").unwrap())
}

/// Runs `plantrelay status --fleet FILE ARGS`: (exit code, stdout, stderr, time taken).
async fn fleet_cli(file: &Path, args: &[&str]) -> (i32, String, String, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plantrelay"));
    cmd.arg("status").arg("--fleet").arg(file).args(args);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    })
    .await
    .unwrap()
}

/// A port that refuses connections: bound, then closed.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A listener that accepts every connection and never says a word (nor
/// closes), like a gateway whose process hangs.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name}: {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shows_a_row_per_gateway_worst_first_with_the_exit_status_of_the_worst() {
    let healthy = Harness::new().await;
    let degraded = Harness::new().await;
    let a = start_agent(&healthy).await;
    let b = start_agent(&degraded).await;
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("h", 10, 2))
            .await
            .0,
        202
    );

    // The healthy agent's CA and token are the file's defaults; the
    // degraded one overrides both.
    let dir = tempfile::tempdir().unwrap();
    let wrong_token = dir.path().join("wrong.token");
    std::fs::write(&wrong_token, "nope\n").unwrap();
    let healthy_only = dir.path().join("healthy.toml");
    std::fs::write(
        &healthy_only,
        format!(
            "token_file = \"{}\"\nca_file = \"{}\"\n[[gateway]]\nname = \"hamburg-01\"\nurl = \"{}\"\n",
            token_file(&healthy).display(),
            healthy.paths.ca.display(),
            health_url(&a),
        ),
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, out, err, _) = fleet_cli(&healthy_only, &[]).await;
        // Healthy at once; the backlog drains within the sink's batch_linger.
        if code == 0 && out.contains("hamburg-01  healthy  0") {
            assert!(
                out.ends_with("1 gateways: 1 healthy, 0 degraded, 0 unreachable, 0 unauthorized\n"),
                "{out}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never healthy: {out}{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Upstream down with events waiting: stalled after a second, degraded.
    degraded.receiver.stop().await;
    assert_eq!(
        post(&client, &ingest_url(&b), &mes_events("d", 5, 1))
            .await
            .0,
        202
    );
    let fleet = dir.path().join("fleet.toml");
    let refused = closed_port();
    std::fs::write(
        &fleet,
        format!(
            r#"token_file = "{token}"
ca_file = "{ca}"

[[gateway]]
name = "hamburg-01"
url = "{a}"

[[gateway]]
name = "bremen-02"
url = "{b}"
token_file = "{b_token}"
ca_file = "{b_ca}"

[[gateway]]
name = "kiel-03"
url = "https://localhost:{refused}"

[[gateway]]
name = "hamburg-01-wrong-token"
url = "{a}"
token_file = "{wrong}"

[[gateway]]
name = "hamburg-01-wrong-ca"
url = "{a}"
ca_file = "{b_ca}"
"#,
            token = token_file(&healthy).display(),
            ca = healthy.paths.ca.display(),
            a = health_url(&a),
            b = health_url(&b),
            b_token = token_file(&degraded).display(),
            b_ca = degraded.paths.ca.display(),
            wrong = wrong_token.display(),
        ),
    )
    .unwrap();
    let opts = FleetOptions {
        file: fleet.clone(),
        json: false,
        timeout: Duration::from_secs(10),
        concurrency: 4,
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = plantrelay::cli::fleet::pull_all(&opts).await.unwrap();
        if rows
            .iter()
            .any(|r| r.name == "bremen-02" && r.state == State::Degraded)
        {
            break;
        }
        assert!(Instant::now() < deadline, "never degraded: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (code, out, err, _) = fleet_cli(&fleet, &[]).await;
    assert_eq!(code, 2, "{out}{err}");
    println!("fleet table:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("GATEWAY"), "{out}");
    assert!(
        lines[0].contains("STATE") && lines[0].contains("ERROR"),
        "{out}"
    );
    let order: Vec<&str> = lines[1..6]
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "unreachable",
            "unreachable",
            "unauthorized",
            "degraded",
            "healthy"
        ],
        "{out}"
    );
    assert!(lines[5].starts_with("hamburg-01 "), "{out}");
    assert!(
        out.ends_with("5 gateways: 1 healthy, 1 degraded, 2 unreachable, 1 unauthorized\n"),
        "{out}"
    );

    let (code, out, err, _) = fleet_cli(&fleet, &["--output", "json"]).await;
    assert_eq!(code, 2, "{out}{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "name",
                "state",
                "backlog",
                "oldest_undelivered_age_s",
                "dead_letters",
                "sources_down",
                "error"
            ]),
            "{r}"
        );
    }
    let h = row(&rows, "hamburg-01");
    assert_eq!(h["state"], "healthy");
    assert_eq!(h["backlog"], 0);
    assert_eq!(h["dead_letters"], 0);
    assert_eq!(h["sources_down"], 0);
    assert_eq!(h["error"], Value::Null);
    let d = row(&rows, "bremen-02");
    assert_eq!(d["state"], "degraded");
    assert_eq!(d["backlog"], 5);
    assert!(
        d["oldest_undelivered_age_s"].as_f64().unwrap() >= 1.0,
        "{d}"
    );
    let e = d["error"].as_str().unwrap();
    assert!(e.contains("sink 'central' stalled"), "{e}");
    assert!(e.contains("refused"), "{e}");
    let k = row(&rows, "kiel-03");
    assert_eq!(k["state"], "unreachable");
    assert_eq!(k["backlog"], Value::Null);
    assert!(
        k["error"]
            .as_str()
            .unwrap()
            .starts_with("connection refused: "),
        "{k}"
    );
    let t = row(&rows, "hamburg-01-wrong-token");
    assert_eq!(t["state"], "unauthorized");
    assert!(t["error"].as_str().unwrap().starts_with("401 "), "{t}");
    let c = row(&rows, "hamburg-01-wrong-ca");
    assert_eq!(c["state"], "unreachable");
    let c_err = c["error"].as_str().unwrap();
    assert!(c_err.starts_with("TLS: "), "{c_err}");
    assert!(c_err.contains("certificate"), "{c_err}");

    // Without the dead and refused ones: degraded, exit 1.
    let text = std::fs::read_to_string(&fleet).unwrap();
    let two = dir.path().join("two.toml");
    std::fs::write(
        &two,
        text.split("\n[[gateway]]\nname = \"kiel-03\"")
            .next()
            .unwrap(),
    )
    .unwrap();
    let (code, out, err, _) = fleet_cli(&two, &["--json"]).await;
    assert_eq!(code, 1, "{out}{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["name"], "bremen-02");
    assert_eq!(rows[1]["name"], "hamburg-01");

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_that_accept_tcp_and_never_answer_cost_one_timeout_not_one_each() {
    let h = Harness::new().await;
    let a = start_agent(&h).await;
    let (hole, hole_task) = black_hole().await;
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.toml");
    let mut text = format!(
        "token_file = \"{}\"\nca_file = \"{}\"\n[[gateway]]\nname = \"hamburg-01\"\nurl = \"{}\"\n",
        token_file(&h).display(),
        h.paths.ca.display(),
        health_url(&a),
    );
    // Eight hung gateways: pulled one after the other they would take
    // eight timeouts.
    for i in 0..8 {
        text += &format!("[[gateway]]\nname = \"hung-{i}\"\nurl = \"https://localhost:{hole}\"\n");
    }
    std::fs::write(&fleet, text).unwrap();

    let timeout = Duration::from_secs(2);
    let (code, out, err, took) = fleet_cli(&fleet, &["--timeout", "2s", "--json"]).await;
    assert_eq!(code, 2, "{out}{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 9);
    for i in 0..8 {
        let r = row(&rows, &format!("hung-{i}"));
        assert_eq!(r["state"], "unreachable", "{r}");
        assert!(r["error"].as_str().unwrap().starts_with("timeout"), "{r}");
    }
    assert_eq!(row(&rows, "hamburg-01")["state"], "healthy");
    assert_eq!(rows[8]["name"], "hamburg-01", "worst first");
    assert!(took >= timeout, "answered before the timeout: {took:?}");
    assert!(
        took < timeout * 2,
        "hung gateways held the others up: {took:?} for a {timeout:?} timeout"
    );

    // The same within the library: the healthy row is not delayed past
    // one timeout either way, even with fewer slots than hung gateways.
    let started = Instant::now();
    let rows = plantrelay::cli::fleet::pull_all(&FleetOptions {
        file: fleet.clone(),
        json: true,
        timeout,
        concurrency: 4,
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(rows.len(), 9);
    assert!(
        took < timeout * 3 + Duration::from_secs(1),
        "8 hung gateways over 4 slots should take two rounds: {took:?}"
    );

    hole_task.abort();
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_fleet_file_exits_2_naming_the_file_the_gateway_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        "[[gateway]]\nname = \"a\"\nurl = \"https://a:8443\"\n[[gateway]]\nname = \"a\"\nurl = \"https://b:8443\"\n",
    )
    .unwrap();
    let (code, out, err, _) = fleet_cli(&fleet, &[]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&fleet.display().to_string()), "{err}");
    assert!(err.contains("gateway[1] (\"a\").name"), "{err}");
    let (code, _, err, _) = fleet_cli(&fleet, &["--url", "https://a:8443"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err, _) = fleet_cli(&fleet, &["--concurrency", "0"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--concurrency"), "{err}");
}

// ---------------------------------------------------------------------------
// Prometheus rules

/// Every `plantrelay_*` metric name in the `expr` fields of the shipped rules.
fn rule_metric_names() -> BTreeSet<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus/plantrelay-alerts.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            // A block scalar: the lines indented deeper than `expr:`.
            let indent = line.len() - trimmed.len();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                exprs.push(next.to_string());
                lines.next();
            }
        } else {
            exprs.push(rest.to_string());
        }
    }
    assert!(
        exprs.len() >= 10,
        "too few expressions in {path:?}: {exprs:?}"
    );
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(at) = rest.find("plantrelay_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// Every `plantrelay_*` metric name in the queries of the shipped Grafana
/// dashboard (panel targets and template variables).
fn dashboard_metric_names() -> BTreeSet<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana/plantrelay-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    walk(&dashboard, &mut queries);
    assert!(queries.len() >= 15, "too few queries in {path:?}");
    // Every panel but the rows has a query.
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {} has no query",
                p["title"]
            );
        }
    }
    let mut names = BTreeSet::new();
    for q in queries {
        let mut rest = q.as_str();
        while let Some(at) = rest.find("plantrelay_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_and_the_dashboard_use_is_exported_by_a_live_agent() {
    let mut names = rule_metric_names();
    names.extend(dashboard_metric_names());
    let h = Harness::new().await;
    let a = start_agent(&h).await;
    plantrelay::tls::install_crypto_provider();
    let tls = plantrelay::tls::client_config(&h.paths.client_tls(false)).unwrap();
    let client = plantrelay::tls::reqwest_client_builder(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let metrics = client
        .get(format!("{}/metrics", health_url(&a)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the rules or the dashboard use metrics the agent does not export: {missing:?}\nexported: {exported:?}"
    );
    // The certificates the agent loaded are there with their expiry.
    let expiry = metrics
        .lines()
        .find(|l| {
            l.starts_with("plantrelay_certificate_expiry_timestamp_seconds{")
                && l.contains("use=\"health\"")
        })
        .unwrap_or_else(|| panic!("no health certificate expiry in\n{metrics}"));
    let value: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(value > now, "{expiry}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_certificate_expiry_follows_a_sighup_reload() {
    let h = Harness::new().await;
    let a = start_agent(&h).await;
    let health = |a: &RunningAgent| {
        a.view
            .status()
            .certificates
            .into_iter()
            .find(|c| c.key == "health.tls_cert")
            .unwrap()
    };
    let before = health(&a);
    assert_eq!(before.usage, "health");
    assert_eq!(before.path, h.paths.server_cert.display().to_string());
    // The upstream CA of the sink is there too.
    assert!(
        a.view
            .status()
            .certificates
            .iter()
            .any(|c| c.key == "sinks.https[0].ca_file" && c.usage == "sink_ca"),
        "{:?}",
        a.view.status().certificates
    );

    // A renewed certificate with another expiry: 2035-06-01T00:00:00Z.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2035, 6, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(&h.paths.server_cert, cert.pem()).unwrap();
    std::fs::write(&h.paths.server_key, key.serialize_pem()).unwrap();
    assert_eq!(
        health(&a),
        before,
        "the file changed, the certificate in use did not"
    );
    a.tls_reloader().unwrap().reload().unwrap();
    assert_eq!(health(&a).not_after, 2_064_268_800);
    let metrics = plantrelay::health::metrics::render(&a.view.status());
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "plantrelay_certificate_expiry_timestamp_seconds{use=\"health\",key=\"health.tls_cert\""
        ) && l.ends_with(" 2064268800")),
        "{metrics}"
    );
    a.shutdown().await;
}

#[test]
fn every_runbook_link_in_the_alert_rules_names_a_readme_heading() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules =
        std::fs::read_to_string(root.join("packaging/prometheus/plantrelay-alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    // GitHub's anchors: lower case, punctuation dropped, spaces to hyphens.
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert!(links.len() >= 10, "{links:?}");
    for link in links {
        let link = link.trim_matches('"');
        assert!(
            link.starts_with("file:///usr/share/doc/plantrelay/README.md#"),
            "{link}"
        );
        let anchor = link.rsplit('#').next().unwrap();
        assert!(anchors.contains(anchor), "no README heading for {link}");
    }
}
