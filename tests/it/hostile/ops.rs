//! Hostile input: ops. What reaches an operator (logs, the CLI, the status
//! page, the audit trail, file modes, the trust command) when a client on the
//! plant network sends text made to forge or hide: one event stays one log
//! line, control characters reach no terminal raw, stored errors stay small,
//! every refusal leaves a bounded trace naming the caller, and no request can
//! crash the health listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use plantrelay::config::Config;
use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::Journal;
use serde_json::Value;

use crate::support::agent::{Harness, send};
use crate::support::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_plantrelay");
const WAIT: Duration = Duration::from_secs(30);
const READ_TOKEN: &str = "read-0ps-s3cret";
const ADMIN_TOKEN: &str = "admin-0ps-s3cret";

/// A `[health]` section on `listen` with a read token and an admin token.
fn health_toml(h: &Harness, listen: SocketAddr) -> String {
    let read = h.dir.path().join("health.token");
    let admin = h.dir.path().join("admin.token");
    std::fs::write(&read, format!("{READ_TOKEN}\n")).unwrap();
    std::fs::write(&admin, format!("{ADMIN_TOKEN}\n")).unwrap();
    format!(
        "[health]\nlisten = \"{listen}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\nadmin_token_file = \"{}\"\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display(),
        read.display(),
        admin.display()
    )
}

/// The real binary running an agent with an HTTP source and a health
/// listener; its standard error goes to a file the test reads.
struct Agent {
    child: Child,
    log: PathBuf,
    ingest: SocketAddr,
    health: SocketAddr,
    api: reqwest::Client,
}

impl Agent {
    async fn start(h: &Harness, extra_args: &[&str]) -> Agent {
        let ingest: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = h.config_text(
            &ingest.to_string(),
            &h.receiver.url(),
            "",
            &health_toml(h, health),
        );
        let config = h.write_config(&text);
        let log = h.dir.path().join("agent.log");
        let child = Command::new(BIN)
            .args(extra_args)
            .args(["run", "-c"])
            .arg(&config)
            .env("PLANTRELAY_LOG", "info")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        plantrelay::tls::install_crypto_provider();
        let tls = plantrelay::tls::client_config(&h.paths.client_tls(false)).unwrap();
        let api = plantrelay::tls::reqwest_client_builder(tls)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut agent = Agent {
            child,
            log,
            ingest,
            health,
            api,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ready = agent.get("/healthz", Some(READ_TOKEN)).await.ok();
            if ready.is_some_and(|(code, _)| code == 200)
                && tokio::net::TcpStream::connect(agent.ingest).await.is_ok()
            {
                break;
            }
            assert!(
                agent.child.try_wait().unwrap().is_none(),
                "the agent exited: {}",
                agent.log_text()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent never became ready: {}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        agent
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.health.port())
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Result<(u16, String)> {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> reqwest::Result<(u16, String)> {
        send(&self.api, method, &self.url(path), token, body).await
    }

    async fn post_ingest(&self, body: String) -> u16 {
        reqwest::Client::new()
            .post(format!("http://{}/v1/events", self.ingest))
            .header("content-type", "application/cloudevents+json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    fn child_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`; returns the log.
    async fn wait_log(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} in the log: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An event whose one attribute name appears twice: the ingest refuses it
/// and names the attribute in its warning.
fn repeated_attribute(name: &str) -> String {
    let name = serde_json::to_string(name).unwrap();
    format!(r#"{{"id":"e1","type":"t","subject":"s",{name}:1,{name}:2}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newline_in_an_attribute_name_cannot_forge_a_log_line() {
    let h = Harness::new().await;
    let agent = Agent::start(&h, &[]).await;
    let forged = "x\n2026-12-01T00:00:00Z  INFO admin action who=\"root\"\x1b]0;owned\x07";
    assert_eq!(agent.post_ingest(repeated_attribute(forged)).await, 400);
    let log = agent.wait_log("appears more than once").await;
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-01T00:00:00Z  INFO admin action")),
        "a forged line: {log}"
    );
    assert!(
        log.contains("x\\n2026-12-01T00:00:00Z  INFO admin action"),
        "{log}"
    );
    assert!(!log.contains('\x1b') && !log.contains('\x07'), "{log}");
    assert!(log.contains("\\x1b]0;owned\\x07"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_keep_one_parseable_object_per_line_whatever_the_input() {
    let h = Harness::new().await;
    let agent = Agent::start(&h, &["--log-format", "json"]).await;
    let forged = "x\n{\"level\":\"INFO\",\"fields\":{\"message\":\"admin action\"}}\u{9b}2J\u{7f}";
    assert_eq!(agent.post_ingest(repeated_attribute(forged)).await, 400);
    let log = agent.wait_log("appears more than once").await;
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.is_object(), "{line}");
        assert!(!line.chars().any(char::is_control), "raw control: {line:?}");
    }
    let rejected = log
        .lines()
        .find(|l| l.contains("appears more than once"))
        .unwrap();
    let v: Value = serde_json::from_str(rejected).unwrap();
    // The ingest reason quotes the name escaped; inside the JSON string it
    // reads back as that escaped text, whole.
    let quoted = plantrelay::text::escape(forged);
    assert!(
        v["reason"].as_str().unwrap().contains(quoted.as_ref()),
        "the reason survives, escaped, inside the JSON string: {rejected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_mebibyte_request_refused_by_ingest_leaves_a_short_escaped_last_error_in_status() {
    let h = Harness::new().await;
    let agent = Agent::start(&h, &[]).await;
    let name = format!("{}\n\x1b[2J", "A".repeat(1900 << 10));
    assert_eq!(agent.post_ingest(repeated_attribute(&name)).await, 400);
    let (code, body) = agent.get("/api/v1/status", Some(READ_TOKEN)).await.unwrap();
    assert_eq!(code, 200);
    assert!(body.len() < 64 * 1024, "status is {} bytes", body.len());
    let status: Value = serde_json::from_str(&body).unwrap();
    let error = status["sources"][0]["last_error"].as_str().unwrap();
    assert!(error.len() <= 512, "last_error is {} bytes", error.len());
    assert!(error.starts_with("rejected a request (400)"), "{error}");
    assert!(error.contains("…[truncated]"), "{error}");
    assert!(!error.chars().any(char::is_control), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_since_before_1970_answers_400_with_the_range_and_the_listener_stays_up() {
    let h = Harness::new().await;
    let mut agent = Agent::start(&h, &[]).await;
    let replay = reqwest::Method::POST;
    let path = "/api/v1/sinks/central/replay";
    for since in [
        "57y",
        "1969-12-31T23:59:59Z",
        "10000-01-01T00:00:00Z",
        "2h\\u0007",
        "5000y",
    ] {
        let body = format!(r#"{{"since": "{since}"}}"#);
        let (code, text) = agent
            .send(replay.clone(), path, Some(ADMIN_TOKEN), Some(&body))
            .await
            .unwrap_or_else(|e| panic!("since {since}: the connection failed: {e}"));
        assert_eq!(code, 400, "since {since}: {text}");
        assert!(
            text.contains("since") && text.contains("1970-01-01T00:00:00Z"),
            "since {since}: {text}"
        );
    }
    let (code, text) = agent
        .send(
            replay.clone(),
            path,
            Some(ADMIN_TOKEN),
            Some(r#"{"since": "2h"}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{text}");
    // A time after every event is no error: nothing is delivered again.
    let (code, text) = agent
        .send(
            replay,
            path,
            Some(ADMIN_TOKEN),
            Some(r#"{"since": "9999-12-31T23:59:59Z"}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        agent.get("/healthz", Some(READ_TOKEN)).await.unwrap().0,
        200
    );
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(agent.child_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_health_requests_are_audited_with_the_caller_and_never_the_token() {
    let h = Harness::new().await;
    let agent = Agent::start(&h, &[]).await;
    let post = reqwest::Method::POST;
    // 401 on a read endpoint, with a wrong token.
    let (code, _) = agent
        .get("/api/v1/status", Some("guess-s3cret"))
        .await
        .unwrap();
    assert_eq!(code, 401);
    // 401 on an admin endpoint with the read token.
    let replay = "/api/v1/sinks/central/replay";
    let (code, _) = agent
        .send(
            post.clone(),
            replay,
            Some(READ_TOKEN),
            Some(r#"{"from_seq":1}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 401);
    // 404 and 400 from the admin handlers, and 405.
    let (code, _) = agent
        .send(
            post.clone(),
            "/api/v1/sinks/nope/replay",
            Some(ADMIN_TOKEN),
            Some(r#"{"from_seq":1}"#),
        )
        .await
        .unwrap();
    assert_eq!(code, 404);
    let (code, _) = agent
        .send(post.clone(), replay, Some(ADMIN_TOKEN), Some("{"))
        .await
        .unwrap();
    assert_eq!(code, 400);
    let (code, _) = agent.get(replay, Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(code, 405);
    // One accepted write.
    let (code, _) = agent
        .send(post, replay, Some(ADMIN_TOKEN), Some(r#"{"from_seq":1}"#))
        .await
        .unwrap();
    assert_eq!(code, 200);

    let log = agent.wait_log("action=\"replay\"").await;
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("health request refused"))
        .collect();
    let find = |status: &str, needle: &str| {
        refused
            .iter()
            .find(|l| l.contains(&format!("status={status}")) && l.contains(needle))
            .unwrap_or_else(|| panic!("no {status} line with {needle}: {log}"))
    };
    let line = find("401", "path=\"/api/v1/status\"");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("wrong bearer token"), "{line}");
    let line = find("401", "not the admin token");
    assert!(line.contains(replay), "{line}");
    let line = find("404", "no sink named 'nope'");
    assert!(line.contains("token=\"admin-token\""), "{line}");
    find("400", "invalid body");
    find("405", replay);
    assert!(
        log.lines()
            .any(|l| l.contains("admin action") && l.contains("who=\"admin-token@127.0.0.1\"")),
        "{log}"
    );
    for secret in [READ_TOKEN, ADMIN_TOKEN, "guess-s3cret"] {
        assert!(!log.contains(secret), "the log holds a token: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthorised_requests_logs_a_bounded_number_of_lines() {
    let h = Harness::new().await;
    let agent = Agent::start(&h, &[]).await;
    for _ in 0..200 {
        let (code, _) = agent.get("/metrics", Some("wrong")).await.unwrap();
        assert_eq!(code, 401);
    }
    // The last request of the flood is answered; its line, if logged, is
    // written before the answer.
    let log = agent.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("health request refused") && l.contains("status=401"))
        .count();
    assert_eq!(lines, 20, "{log}");
}

/// A config with the HTTP source `mes` on `listen` and `health` appended.
fn write_config(h: &Harness, listen: &str, health: &str) -> PathBuf {
    let text = h.config_text(listen, &h.receiver.url(), "", health);
    h.write_config(&text)
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_warns_about_ingest_open_to_the_network_and_an_open_health_listener_with_an_admin_token()
 {
    let h = Harness::new().await;
    let admin = h.dir.path().join("admin.token");
    std::fs::write(&admin, "a\n").unwrap();
    let health = format!(
        "[health]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nallow_unauthenticated = true\nadmin_token_file = \"{}\"\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display(),
        admin.display()
    );
    let config = write_config(&h, "0.0.0.0:8081", &health);
    let (code, stdout, stderr) = run(&["check-config", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(
        stderr.contains("warning: sources.http[0].listen: ingest listens on 0.0.0.0:8081 without token_file and without TLS"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: health.allow_unauthenticated: the admin API is on"),
        "{stderr}"
    );
    let quiet = write_config(&h, "127.0.0.1:8081", "");
    let (code, _, stderr) = run(&["check-config", "-c", quiet.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(!stderr.contains("warning"), "{stderr}");
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_dir_and_journal_files_are_private_whatever_the_umask() {
    let h = Harness::new().await;
    let config = write_config(&h, "127.0.0.1:0", "");
    // `replay` opens (and so creates) the journal, writes and exits.
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" replay -c \"$1\" --sink central --from-seq 1")
        .arg(BIN)
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = h.state_dir();
    assert_eq!(mode(&state), 0o750);
    let db = state.join("journal.db");
    assert_eq!(mode(&db), 0o640);
    let mut checked = 1;
    for side in ["journal.db-wal", "journal.db-shm", "journal.db.lock"] {
        let p = state.join(side);
        if p.exists() {
            assert_eq!(mode(&p), 0o640, "{side}");
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the lock file or the WAL beside the db"
    );

    // A file an older release left world-readable is tightened at open.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = run(&[
        "replay",
        "-c",
        config.to_str().unwrap(),
        "--sink",
        "central",
        "--from-seq",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(mode(&db), 0o640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_tail_prints_hostile_ids_streams_and_types_escaped() {
    let h = Harness::new().await;
    let text = h.config_text("127.0.0.1:0", &h.receiver.url(), "", "");
    let path = h.write_config(&text);
    let config = Config::load(&path).unwrap();
    let journal = Journal::open(config.journal_options()).unwrap();
    journal
        .append(vec![NewEvent {
            source: "mes".into(),
            id: "id\x1b]0;owned\x07".into(),
            stream: "line\n3\u{9b}2J".into(),
            class: Class::Critical,
            event_type: "t\rype".into(),
            source_time: None,
            data: br#"{"a":"\u001b[2J"}"#.to_vec(),
            attrs: None,
        }])
        .await
        .unwrap();
    journal.close().await;
    let (code, stdout, stderr) = run(&["journal", "tail", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains('\x1b') && !stdout.contains('\x07') && !stdout.contains('\r'),
        "{stdout:?}"
    );
    assert!(!stdout.contains('\u{9b}'), "{stdout:?}");
    assert!(stdout.contains("id\\x1b]0;owned\\x07"), "{stdout}");
    assert!(stdout.contains("line\\n3\\u{9b}2J"), "{stdout}");
    assert_eq!(stdout.lines().count(), 2, "header and one row: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_trust_refuses_a_fingerprint_prefix_and_trusts_nothing() {
    use plantrelay::sources::opcua::pki::{colon_hex, sha256_hex};
    let h = Harness::new().await;
    let opcua = "[[sources.opcua]]\nname = \"press\"\nendpoint = \"opc.tcp://127.0.0.1:4840\"\n[[sources.opcua.nodes]]\nnode_id = \"ns=2;s=Press.State\"\nstream = \"press/state\"\n";
    let config = write_config(&h, "127.0.0.1:0", opcua);
    let rejected = h.state_dir().join("pki/press/rejected");
    std::fs::create_dir_all(&rejected).unwrap();
    let cert = rejected.join("a [1].der");
    std::fs::write(&cert, b"server a").unwrap();
    std::fs::write(rejected.join("b [2].der"), b"server b").unwrap();
    let full = colon_hex(&sha256_hex(b"server a"));
    let c = config.to_str().unwrap();
    for prefix in [&full[..11], &full[..47]] {
        let (code, _, stderr) = run(&[
            "opcua",
            "trust",
            "-c",
            c,
            "--source",
            "press",
            "--fingerprint",
            prefix,
        ]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("prefix is not accepted"), "{stderr}");
        assert!(stderr.contains("64 hex digits"), "{stderr}");
        assert!(cert.exists(), "a prefix trusted a certificate");
    }
    let spaced = full.replace(':', " ");
    let (code, stdout, stderr) = run(&[
        "opcua",
        "trust",
        "-c",
        c,
        "--source",
        "press",
        "--fingerprint",
        &spaced,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&full), "{stdout}");
    assert!(!cert.exists());
    assert!(rejected.join("b [2].der").exists(), "only the named one");
}
