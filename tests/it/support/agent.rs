//! An agent under test: a temp dir with certificates, an upstream receiver,
//! a config file written for them, and helpers to post MES events.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use plantrelay::config::Config;
use plantrelay::demo::receiver::{EphemeralPki, PkiPaths, Receiver, ReceiverOptions};
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
        format!(
            r#"
[agent]
id = "gw-test"
state_dir = "{state}"
shutdown_timeout = "5s"

[journal]
sync = "normal"

[[sources.http]]
name = "mes"
listen = "{listen}"

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
            state = self.state_dir().display(),
            ca = self.paths.ca.display(),
        )
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("plantrelay.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn config(&self, sink_extra: &str) -> Config {
        let text = self.config_text("127.0.0.1:0", &self.receiver.url(), sink_extra, "");
        Config::load(&self.write_config(&text)).unwrap()
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

/// Posts a batch; returns the status and the JSON body.
pub async fn post(client: &reqwest::Client, url: &str, events: &[Value]) -> (u16, Value) {
    let resp = client
        .post(url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events.to_vec()).to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = serde_json::from_str::<Value>(&resp.text().await.unwrap()).unwrap_or(Value::Null);
    (status, body)
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
