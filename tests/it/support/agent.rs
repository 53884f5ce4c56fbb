//! An agent under test: a temp dir with certificates, an upstream receiver,
//! a config file written for them, and helpers to post MES events.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use plantrelay::agent::RunningAgent;
use plantrelay::config::{Config, HttpSourceConfig};
use plantrelay::demo::receiver::{EphemeralPki, PkiPaths, Receiver, ReceiverOptions};
use plantrelay::event::{Class, StoredEvent};
use plantrelay::journal::Reader;
use plantrelay::status::SourceStatus;
use serde_json::{Value, json};

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub pki: EphemeralPki,
    pub paths: PkiPaths,
    pub receiver: Receiver,
}

impl Harness {
    pub async fn new() -> Harness {
        Harness::with_mtls(false).await
    }

    pub async fn with_mtls(require_client_cert: bool) -> Harness {
        plantrelay::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = EphemeralPki::generate().unwrap();
        let pki_dir = dir.path().join("pki");
        std::fs::create_dir_all(&pki_dir).unwrap();
        let paths = pki.write_to(&pki_dir).unwrap();
        let mut opts = ReceiverOptions::new(&pki);
        opts.require_client_cert = require_client_cert;
        let receiver = Receiver::start(opts).await.unwrap();
        Harness {
            dir,
            pki,
            paths,
            receiver,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A config with one HTTP source `mes` on `listen` and one HTTPS sink
    /// `central` to `url`; `sink_extra` and `extra` are appended TOML lines
    /// (inside the sink table, and at the end).
    pub fn config_text(&self, listen: &str, url: &str, sink_extra: &str, extra: &str) -> String {
        self.config_text_with_source(listen, "", url, sink_extra, extra)
    }

    /// [`Harness::config_text`] with `source_extra` lines inside the HTTP
    /// source's table.
    pub fn config_text_with_source(
        &self,
        listen: &str,
        source_extra: &str,
        url: &str,
        sink_extra: &str,
        extra: &str,
    ) -> String {
        format!(
            r#"{head}{source_extra}

[[sinks.https]]
name = "central"
url = "{url}"
ca_file = "{ca}"
ca_only = true
retry_initial = "50ms"
retry_max = "500ms"
{sink_extra}
{extra}
"#,
            head = agent_toml("gw-test", &self.state_dir(), listen),
            ca = self.paths.ca.display(),
        )
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        write_config(self.dir.path(), text)
    }

    pub fn config(&self, sink_extra: &str) -> Config {
        let text = self.config_text("127.0.0.1:0", &self.receiver.url(), sink_extra, "");
        Config::load(&self.write_config(&text)).unwrap()
    }

    /// The config of [`Harness::config`] with `sources` (further source
    /// tables) appended.
    pub fn config_with_sources(&self, sources: &str) -> Config {
        let text = self.config_text("127.0.0.1:0", &self.receiver.url(), "", sources);
        Config::load(&self.write_config(&text)).unwrap()
    }

    /// Every event in the journal (none while it does not exist yet).
    pub fn journal_events(&self) -> Vec<StoredEvent> {
        let path = self.state_dir().join("journal.db");
        if !path.exists() {
            return Vec::new();
        }
        // While the agent creates it, the file may not be readable yet.
        Reader::open(&path)
            .and_then(|r| r.events_from(0, 10_000_000))
            .unwrap_or_default()
    }

    /// The journal's events from `source`.
    pub fn source_events(&self, source: &str) -> Vec<StoredEvent> {
        let mut events = self.journal_events();
        events.retain(|e| e.source == source);
        events
    }

    /// The journal's events from `source` (all with `None`), polled until
    /// `done` holds for them or `timeout` has passed; the caller asserts.
    pub async fn wait_journal(
        &self,
        source: Option<&str>,
        timeout: Duration,
        done: impl Fn(&[StoredEvent]) -> bool,
    ) -> Vec<StoredEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = match source {
                Some(source) => self.source_events(source),
                None => self.journal_events(),
            };
            if done(&events) || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `[agent]` and `[journal]` tables of a test agent `id` and one HTTP
/// source `mes` on `listen` (further lines of its table may follow).
pub fn agent_toml(id: &str, state: &Path, listen: &str) -> String {
    format!(
        r#"
[agent]
id = "{id}"
state_dir = "{state}"
shutdown_timeout = "5s"

[journal]
sync = "normal"

[[sources.http]]
name = "mes"
listen = "{listen}"
"#,
        state = state.display(),
    )
}

/// A config of agent `id` with one HTTP source `mes` on `listen` and the
/// `sinks` tables, everything else at its default.
pub fn minimal_config_text(id: &str, state: &Path, listen: &str, sinks: &str) -> String {
    format!(
        r#"
[agent]
id = "{id}"
state_dir = "{state}"

[[sources.http]]
name = "mes"
listen = "{listen}"
{sinks}"#,
        state = state.display(),
    )
}

/// Writes `text` as `plantrelay.toml` in `dir` and loads it.
pub fn load_config(dir: &Path, text: &str) -> Config {
    Config::load(&write_config(dir, text)).unwrap()
}

/// Writes `text` as `plantrelay.toml` in `dir`; returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("plantrelay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The status of the agent's source `name`.
pub fn source_status(a: &RunningAgent, name: &str) -> Arc<SourceStatus> {
    a.view
        .sources
        .iter()
        .find(|s| s.name == name)
        .cloned()
        .unwrap()
}

/// Waits until the source's `connected` is `want`, at most `timeout`;
/// returns how long that took (None: it did not happen in time). An MQTT
/// source that subscribes is connected once the broker acknowledged the
/// subscription: what is published after that reaches it.
pub async fn wait_connected(s: &SourceStatus, want: bool, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while s.connected.load(Ordering::Relaxed) != want {
        if t0.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Some(t0.elapsed())
}

/// An in-process HTTP ingest source `mes` (critical, no token, no TLS) on a
/// free loopback port; tests change the limits they probe.
pub fn http_source_config() -> HttpSourceConfig {
    HttpSourceConfig {
        name: "mes".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        class: Class::Critical,
        token_file: None,
        tls_cert: None,
        tls_key: None,
        max_body: 4 << 20,
        max_connections: 256,
        max_connections_per_ip: 64,
        header_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(60),
        max_events_per_request: 10_000,
        max_concurrent_requests: 4,
        max_depth: 32,
        max_attributes: 64,
        require_schema: false,
    }
}

/// `n` MES events spread over `streams` streams, ids `<prefix>-<i>`.
pub fn mes_events(prefix: &str, n: usize, streams: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "specversion": "1.0",
                "id": format!("{prefix}-{i}"),
                "source": "urn:mes:test",
                "type": "com.example.mes.confirmation",
                "subject": format!("line/{}", i % streams),
                "time": "2026-11-29T10:00:00Z",
                "data": {"n": i, "qty": i % 17},
            })
        })
        .collect()
}

pub fn http_client() -> reqwest::Client {
    plantrelay::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Posts a batch as `application/cloudevents-batch+json`.
pub async fn try_post(
    client: &reqwest::Client,
    url: &str,
    events: &[Value],
) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events.to_vec()).to_string())
        .send()
        .await
}

/// Posts a batch; returns the status and the JSON body.
pub async fn post(client: &reqwest::Client, url: &str, events: &[Value]) -> (u16, Value) {
    let resp = try_post(client, url, events).await.unwrap();
    let status = resp.status().as_u16();
    let body = serde_json::from_str::<Value>(&resp.text().await.unwrap()).unwrap_or(Value::Null);
    (status, body)
}

/// Cancels an in-process source's `serve` task and checks that it returned
/// `Ok` within 10 s.
pub async fn stop_source(
    stop: &tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), plantrelay::sources::http::HttpSourceError>>,
) {
    stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve did not return after cancellation")
        .expect("serve task panicked");
    assert!(result.is_ok(), "serve failed: {result:?}");
}

/// An HTTP request with an optional bearer token and JSON body; returns the
/// status and the body text.
pub async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> reqwest::Result<(u16, String)> {
    let mut r = client.request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// Waits until something accepts TCP connections on loopback `port`, at
/// most 30 s.
pub async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "agent did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed (and reaped) when the test ends, passed or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real binary, `plantrelay run -c <config>`, logging warnings only to
/// nowhere: for the tests that kill it.
pub fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(config)
        .env("PLANTRELAY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
