//! The command line as a plant IT engineer uses it: the real `plantrelay`
//! binary, started with `std::process::Command`, against config files, state
//! directories and an embedded HTTPS upstream written for each test. Every
//! test checks the exit status and the text a person (or a script) reads.

use crate::support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::{Harness, http_client, mes_events, post};
use support::free_port;
use support::upstream::until;

const BIN: &str = env!("CARGO_BIN_EXE_plantrelay");

// ------------------------------------------------------------- helpers ---

/// What one finished `plantrelay` invocation left behind.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    #[track_caller]
    fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "exit status\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A `plantrelay` command with a clean log environment.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("RUST_LOG")
        .env_remove("PLANTRELAY_LOG")
        .stdin(Stdio::null());
    cmd
}

/// How long a one-shot command may take before the test gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `plantrelay args…` to completion; kills it and fails the test if it
/// does not exit within [`COMMAND_TIMEOUT`] (a `run` that was expected to be
/// refused but started would otherwise hang the suite).
fn plantrelay(args: &[&str]) -> Outcome {
    use std::io::Read;

    let mut child = command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start plantrelay");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Outcome {
        code: status.and_then(|s| s.code()),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        status.is_some(),
        "`plantrelay {}` still running after {COMMAND_TIMEOUT:?}; killed it\n--- stdout:\n{}\n--- stderr:\n{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out
}

/// [`plantrelay`] off the async worker threads (the receiver lives there).
async fn plantrelay_async(args: &[&str]) -> Outcome {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        plantrelay(&refs)
    })
    .await
    .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `plantrelay run` in the background; its stderr goes to a file. Dropping
/// it kills the process if it is still running, so a failed test leaves
/// nothing behind.
struct Agent {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Agent {
    fn spawn(config: &Path, port: u16, log: PathBuf, extra: &[&str]) -> Agent {
        let stderr = std::fs::File::create(&log).unwrap();
        let child = command()
            .args(["run", "-c", s(config)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start plantrelay run");
        Agent { child, log, port }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn events_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/events", self.port)
    }

    /// Waits until the HTTP source accepts connections; fails at once, with
    /// the agent's log, if the process exits instead.
    async fn wait_accepting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "agent exited before it listened ({status}):\n{}",
                    self.stderr()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not listen on {} within 30s:\n{}",
                self.port,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One SIGTERM, as systemd sends it (kill(1) rather than a libc binding).
    fn sigterm(&self) {
        support::signal(self.pid(), "TERM");
    }

    /// Waits for the process to exit; fails after `timeout`.
    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running {timeout:?} after it was asked to stop:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then expects exit status 0 within 10 s; returns the log.
    async fn stop(mut self) -> String {
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(10)).await;
        let log = self.stderr();
        assert_eq!(status.code(), Some(0), "graceful stop: {status}\n{log}");
        log
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes the harness config (source `mes` on `port`, sink `central` to the
/// receiver) and returns its path.
fn write_agent_config(h: &Harness, port: u16) -> PathBuf {
    let text = h.config_text(
        &format!("127.0.0.1:{port}"),
        &h.receiver.url(),
        "batch_max_events = 100",
        "",
    );
    h.write_config(&text)
}

/// A started agent on a fresh port with the harness config.
async fn start_agent(h: &Harness, config: &Path, name: &str) -> Agent {
    let port = free_port();
    // The port is part of the config: rewrite it for this run.
    let text = std::fs::read_to_string(config).unwrap();
    let text = rewrite_listen(&text, port);
    std::fs::write(config, text).unwrap();
    let mut agent = Agent::spawn(config, port, h.dir.path().join(format!("{name}.log")), &[]);
    agent.wait_accepting().await;
    agent
}

fn rewrite_listen(text: &str, port: u16) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("listen = \"127.0.0.1:") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Posts `events` and expects 202.
async fn post_ok(agent: &Agent, events: &[Value]) -> Value {
    let (status, body) = post(&http_client(), &agent.events_url(), events).await;
    assert_eq!(status, 202, "ingest answer: {body}\n{}", agent.stderr());
    body
}

/// `journal stats --json`, parsed.
async fn stats_json(config: &Path) -> Value {
    let out = plantrelay_async(&["journal", "stats", "-c", s(config), "--json"]).await;
    out.expect_code(0);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stats --json is not JSON ({e}):\n{}", out.stdout))
}

fn cursor_of(stats: &Value, sink: &str) -> Option<u64> {
    stats["cursors"]
        .as_array()?
        .iter()
        .find(|c| c[0] == sink)
        .and_then(|c| c[1].as_u64())
}

/// Polls `journal stats --json` beside the running agent until `sink`'s
/// cursor reaches `at_least`.
async fn wait_cursor(config: &Path, sink: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = stats_json(config).await;
        if cursor_of(&stats, sink).is_some_and(|c| c >= at_least) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cursor of {sink} never reached {at_least}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value column of a `journal stats` table row (`events  5`).
fn table_value<'a>(table: &'a str, row: &str) -> Option<&'a str> {
    table.lines().find_map(|l| {
        let rest = l.strip_prefix(row)?;
        rest.starts_with("  ").then(|| rest.trim())
    })
}

/// The first column of each data row of a table (header skipped).
fn first_column(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

// -------------------------------------------------------- check-config ---

/// A config with a token file and a CA file that exist, written into `dir`.
fn valid_config(dir: &Path) -> PathBuf {
    plantrelay::tls::install_crypto_provider();
    let pki = plantrelay::demo::receiver::EphemeralPki::generate().unwrap();
    let paths = pki.write_to(dir).unwrap();
    std::fs::write(dir.join("mes.token"), "s3cret-token\n").unwrap();
    let text = format!(
        r#"[agent]
id = "gw-hamburg-01"
state_dir = "state"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:8081"
token_file = "mes.token"

[[sinks.https]]
name = "central"
url = "https://ingest.example.com/v1/events"
ca_file = "{ca}"
"#,
        ca = paths.ca.display()
    );
    let path = dir.join("plantrelay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_accepts_a_valid_file_and_prints_ok_with_the_agent_id() {
    let dir = tempfile::tempdir().unwrap();
    let config = valid_config(dir.path());
    let out = plantrelay(&["check-config", "-c", s(&config)]);
    out.expect_code(0);
    assert!(out.stdout.contains("ok"), "{}", out.stdout);
    assert!(out.stdout.contains("gw-hamburg-01"), "{}", out.stdout);
    assert!(out.stdout.contains("mes"), "source named: {}", out.stdout);
    assert!(out.stdout.contains("central"), "sink named: {}", out.stdout);
    // The relative state_dir is resolved against the config's directory.
    let journal = dir.path().join("state").join("journal.db");
    assert!(
        out.stdout.contains(s(&journal)),
        "journal path {}: {}",
        journal.display(),
        out.stdout
    );
    assert!(
        !dir.path().join("state").exists(),
        "check-config must not create the state dir"
    );
}

#[test]
fn check_config_accepts_the_shipped_minimal_config() {
    let minimal = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/plantrelay.minimal.toml");
    let out = plantrelay(&["check-config", "-c", s(&minimal)]);
    out.expect_code(0);
    assert!(
        out.stdout.contains("ok") && out.stdout.contains("gw-hamburg-01"),
        "{}",
        out.stdout
    );
}

/// The Debian package installs this file as /etc/plantrelay/plantrelay.toml:
/// it must validate as shipped (its upstream is a placeholder).
#[test]
fn check_config_accepts_the_config_the_package_installs() {
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/plantrelay.packaged.toml");
    let out = plantrelay(&["check-config", "-c", s(&packaged)]);
    out.expect_code(0);
    assert!(
        out.stdout.contains(": ok (agent gw-change-me-01")
            && out.stdout.contains("/var/lib/plantrelay/journal.db"),
        "{}",
        out.stdout
    );
}

/// `plantrelay man` (hidden) writes plantrelay(1): one page with every
/// visible command, its synopsis and every one of its options.
#[test]
fn man_writes_one_roff_page_with_every_command_and_option() {
    let out = plantrelay(&["man"]);
    out.expect_code(0);
    let page = &out.stdout;
    assert!(
        page.lines().any(|l| l.starts_with(".TH PLANTRELAY 1 ")),
        "no .TH line: {}",
        &page[..page.len().min(300)]
    );
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "COMMANDS",
        "FILES",
        "EXIT STATUS",
    ] {
        // roff quotes a heading with a space in it.
        let heading = if section.contains(' ') {
            format!(".SH \"{section}\"\n")
        } else {
            format!(".SH {section}\n")
        };
        assert!(page.contains(&heading), "no {heading:?}");
    }
    let commands: &[(&str, &[&str])] = &[
        ("plantrelay run", &["config"]),
        ("plantrelay check-config", &["config"]),
        (
            "plantrelay status",
            &[
                "url",
                "token\\-file",
                "ca\\-file",
                "client\\-cert",
                "client\\-key",
                "json",
                "timeout",
            ],
        ),
        ("plantrelay journal", &[]),
        ("plantrelay journal stats", &["config", "json"]),
        (
            "plantrelay journal tail",
            &["config", "lines", "stream", "json"],
        ),
        (
            "plantrelay journal dead\\-letters",
            &["config", "sink", "json"],
        ),
        (
            "plantrelay replay",
            &["config", "sink", "from\\-seq", "since"],
        ),
        ("plantrelay demo", &["duration", "keep"]),
    ];
    let headings: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix(".SS "))
        .collect();
    for (command, options) in commands {
        let heading = format!("\"{}\"", command.replace("\\-", "-"));
        let Some(at) = page.find(&format!(".SS {heading}\n")) else {
            panic!("no section for {command}; sections: {headings:?}");
        };
        let body = &page[at + 4..];
        let body = &body[..body.find("\n.SS ").unwrap_or(body.len())];
        for option in *options {
            assert!(
                body.contains(&format!("\\-\\-{option}")),
                "{command}: option --{option} missing from its section:\n{body}"
            );
        }
        assert!(
            !body.contains("log\\-format"),
            "{command}: the global --log-format belongs to the top-level OPTIONS only"
        );
    }
    assert!(
        !headings
            .iter()
            .any(|h| h.contains(" man") || h.contains(" help")),
        "hidden and help commands are not documented: {headings:?}"
    );
}

#[test]
fn the_man_command_is_hidden_from_help() {
    let out = plantrelay(&["--help"]);
    out.expect_code(0);
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("man ")),
        "{}",
        out.stdout
    );
}

#[test]
fn check_config_names_file_line_column_and_key_path_of_an_unknown_nested_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = valid_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    // Misspell `url` inside [[sinks.https]].
    let text = text.replace("url = \"https://", "urll = \"https://");
    let line = text
        .lines()
        .position(|l| l.starts_with("urll"))
        .expect("urll line")
        + 1;
    std::fs::write(&config, &text).unwrap();

    let out = plantrelay(&["check-config", "-c", s(&config)]);
    out.expect_code(2);
    let want = format!("{}:{line}:1: sinks.https[0].urll", config.display());
    assert!(
        out.stderr.contains(&want),
        "stderr lacks {want:?}:\n{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.stdout);
}

#[test]
fn check_config_reports_malformed_toml_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plantrelay.toml");
    std::fs::write(
        &config,
        "[agent]\nid = \"gw-1\"\nstate_dir = \"/var/lib/plantrelay\n\n[[sources.http]]\n",
    )
    .unwrap();
    let out = plantrelay(&["check-config", "-c", s(&config)]);
    out.expect_code(2);
    let want = format!("{}:3:", config.display());
    assert!(
        out.stderr.contains(&want),
        "stderr lacks {want:?}:\n{}",
        out.stderr
    );
}

#[test]
fn check_config_names_a_config_file_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("plantrelay.toml");
    let out = plantrelay(&["check-config", "-c", s(&missing)]);
    out.expect_code(2);
    assert!(out.stderr.contains(s(&missing)), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot read config file"),
        "{}",
        out.stderr
    );
}

/// Every sink kind of the contract is built: MQTT and JetStream sinks are
/// no longer refused as "not yet supported".
const EVERY_SINK_KIND: &str = r#"
[[sinks.mqtt]]
name = "uns"
url = "mqtt://127.0.0.1:1883"

[[sinks.jetstream]]
name = "hub"
url = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
stream = "PLANTRELAY"
"#;

#[test]
fn check_config_accepts_mqtt_and_jetstream_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let config = valid_config(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(EVERY_SINK_KIND);
    std::fs::write(&config, text).unwrap();
    let out = plantrelay(&["check-config", "-c", s(&config)]);
    out.expect_code(0);
    assert!(!out.stderr.contains("not yet supported"), "{}", out.stderr);
}

// ----------------------------------------------------------------- usage ---

#[test]
fn replay_without_a_sink_is_a_usage_error() {
    let out = plantrelay(&["replay", "-c", "x", "--from-seq", "1"]);
    out.expect_code(2);
    assert!(out.stderr.contains("--sink"), "{}", out.stderr);
}

#[test]
fn replay_without_from_seq_or_since_is_a_usage_error() {
    let out = plantrelay(&["replay", "-c", "x", "--sink", "central"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("--from-seq") || out.stderr.contains("--since"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_unknown_subcommand_is_a_usage_error() {
    let out = plantrelay(&["frobnicate"]);
    out.expect_code(2);
    assert!(out.stderr.contains("frobnicate"), "{}", out.stderr);
}

#[test]
fn no_subcommand_at_all_is_a_usage_error() {
    let out = plantrelay(&[]);
    out.expect_code(2);
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
}

#[test]
fn help_for_the_program_and_every_subcommand_exits_0_and_names_its_options() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &[
                "run",
                "check-config",
                "journal",
                "replay",
                "demo",
                "--log-format",
                "Exit status",
            ],
        ),
        (&["run", "--help"], &["--config", "-c", "SIGTERM"]),
        (&["check-config", "--help"], &["--config", "-c"]),
        (&["journal", "--help"], &["stats", "tail", "dead-letters"]),
        (&["journal", "stats", "--help"], &["--config", "--json"]),
        (
            &["journal", "tail", "--help"],
            &["--config", "--lines", "-n", "--stream", "--json"],
        ),
        (
            &["journal", "dead-letters", "--help"],
            &["--config", "--sink", "--json"],
        ),
        (
            &["replay", "--help"],
            &["--config", "--sink", "--from-seq", "--since"],
        ),
        (&["demo", "--help"], &["--duration", "--keep"]),
    ];
    for (args, wants) in cases {
        let out = plantrelay(args);
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        for want in *wants {
            assert!(
                out.stdout.contains(want),
                "`plantrelay {}` does not mention {want}:\n{}",
                args.join(" "),
                out.stdout
            );
        }
    }
}

#[test]
fn version_exits_0_and_prints_the_package_version() {
    let out = plantrelay(&["--version"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{}",
        out.stdout
    );
}

// ------------------------------------------------------------------ run ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_accepts_events_forwards_them_and_stops_with_exit_0_on_sigterm() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "run").await;

    let body = post_ok(&agent, &mes_events("ev", 5, 2)).await;
    assert_eq!(body["accepted"], 5, "{body}");
    assert!(
        h.receiver.wait_for(5, Duration::from_secs(20)).await,
        "receiver got {:?}",
        h.receiver.stats()
    );

    let started = Instant::now();
    let log = agent.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "graceful stop took {:?}",
        started.elapsed()
    );
    assert!(log.contains("plantrelay started"), "{log}");
    assert!(log.contains("plantrelay stopped"), "{log}");
    assert!(log.contains("SIGTERM"), "the log names the signal: {log}");
    let v = h.receiver.verdict();
    assert_eq!(
        (v.unique_ids, v.out_of_order, v.missing),
        (5, 0, 0),
        "{v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_log_format_json_writes_one_json_object_per_line_on_stderr() {
    let h = Harness::new().await;
    let port = free_port();
    let config = write_agent_config(&h, port);
    let mut agent = Agent::spawn(
        &config,
        port,
        h.dir.path().join("json.log"),
        &["--log-format", "json"],
    );
    agent.wait_accepting().await;
    post_ok(&agent, &mes_events("j", 2, 1)).await;
    assert!(h.receiver.wait_for(2, Duration::from_secs(20)).await);
    let log = agent.stop().await;

    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "plantrelay started")
        .unwrap_or_else(|| panic!("no \"plantrelay started\" object in {log}"));
    assert_eq!(started["level"], "INFO", "{started}");
    assert_eq!(started["agent"], "gw-test", "{started}");
    assert!(started["timestamp"].is_string(), "{started}");
    assert!(
        lines.iter().any(|l| l["message"] == "plantrelay stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_a_slow_shutdown_exits_at_once_with_1() {
    let h = Harness::new().await;
    // The upstream answers only after 20 s: the batch stays in flight, and
    // a graceful stop would wait up to shutdown_timeout (5 s) for it.
    h.receiver.set_latency(Duration::from_secs(20));
    let config = write_agent_config(&h, 0);
    let mut agent = start_agent(&h, &config, "twice").await;
    post_ok(&agent, &mes_events("slow", 3, 1)).await;
    until("the batch in flight upstream", || {
        h.receiver.stats().requests >= 1
    })
    .await;

    agent.sigterm();
    // A quiet spell: the first SIGTERM must not end the agent yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the batch in flight:\n{}",
        agent.stderr()
    );
    let second = Instant::now();
    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(1), "{status}\n{}", agent.stderr());
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
    let log = agent.stderr();
    assert!(log.contains("second signal"), "{log}");
    assert!(!log.contains("plantrelay stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_1_naming_the_address_when_the_listen_port_is_taken() {
    let h = Harness::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = write_agent_config(&h, port);
    let out = plantrelay_async(&["run", "-c", s(&config)]).await;
    out.expect_code(1);
    let addr = format!("127.0.0.1:{port}");
    assert!(out.stderr.contains(&addr), "{}", out.stderr);
    assert!(!out.stderr.contains("plantrelay started"), "{}", out.stderr);
    drop(taken);

    // Nothing is left locked: the port is free now and it starts.
    let mut agent = Agent::spawn(&config, port, h.dir.path().join("retry.log"), &[]);
    agent.wait_accepting().await;
    agent.stop().await;
}

/// Under systemd stderr goes to journald, not a terminal: colour codes
/// there end up as `\x1b[2m…` noise in `journalctl` and in log shippers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn text_logs_on_a_stderr_that_is_not_a_terminal_carry_no_ansi_escape_codes() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "ansi").await;
    let log = agent.stop().await;
    assert!(log.contains("plantrelay started"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "escape codes in a log written to a file:\n{}",
        log.escape_debug()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_state_dir_exits_1_because_the_journal_is_in_use() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let first = start_agent(&h, &config, "first").await;

    // Same state_dir, another port, so only the journal lock can refuse it.
    let second_config = h.dir.path().join("second.toml");
    std::fs::write(
        &second_config,
        rewrite_listen(&std::fs::read_to_string(&config).unwrap(), free_port()),
    )
    .unwrap();
    let out = plantrelay_async(&["run", "-c", s(&second_config)]).await;
    out.expect_code(1);
    assert!(
        out.stderr.contains("in use by another plantrelay process"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(s(&h.state_dir().join("journal.db"))),
        "names the journal: {}",
        out.stderr
    );

    // The first one is not disturbed by the attempt.
    post_ok(&first, &mes_events("still", 1, 1)).await;
    first.stop().await;
}

// -------------------------------------------------------------- journal ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_stats_shows_events_and_the_sink_cursor_beside_a_running_agent_and_after_it_stopped()
 {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "stats").await;
    post_ok(&agent, &mes_events("st", 5, 2)).await;
    assert!(h.receiver.wait_for(5, Duration::from_secs(20)).await);
    wait_cursor(&config, "central", 5).await;

    // Beside the running agent.
    let out = plantrelay_async(&["journal", "stats", "-c", s(&config)]).await;
    out.expect_code(0);
    assert_eq!(
        table_value(&out.stdout, "events"),
        Some("5"),
        "{}",
        out.stdout
    );
    let sink_row: Vec<&str> = out
        .stdout
        .lines()
        .find(|l| l.starts_with("central"))
        .unwrap_or_else(|| panic!("no sink row:\n{}", out.stdout))
        .split_whitespace()
        .collect();
    assert_eq!(sink_row, ["central", "5", "0"], "{}", out.stdout);
    assert!(
        table_value(&out.stdout, "size").is_some_and(|v| v.ends_with("pages of 4096 bytes")),
        "{}",
        out.stdout
    );

    agent.stop().await;

    // After it stopped.
    let out = plantrelay_async(&["journal", "stats", "-c", s(&config)]).await;
    out.expect_code(0);
    assert_eq!(
        table_value(&out.stdout, "events"),
        Some("5"),
        "{}",
        out.stdout
    );
    assert_eq!(
        table_value(&out.stdout, "seq range"),
        Some("1 … 5"),
        "{}",
        out.stdout
    );
    assert_eq!(
        table_value(&out.stdout, "quarantine"),
        Some("none"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["central", "5", "0"]),
        "{}",
        out.stdout
    );

    let json = stats_json(&config).await;
    assert_eq!(json["events"], 5, "{json}");
    assert_eq!(json["last_seq"], 5, "{json}");
    assert_eq!(cursor_of(&json, "central"), Some(5), "{json}");
    assert_eq!(json["dead_letters"], 0, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_stats_on_a_state_dir_without_a_journal_exits_1_and_says_so() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, free_port());
    let out = plantrelay_async(&["journal", "stats", "-c", s(&config)]).await;
    out.expect_code(1);
    assert!(out.stderr.contains("no journal here"), "{}", out.stderr);
    assert!(
        out.stderr.contains(s(&h.state_dir().join("journal.db"))),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_tail_shows_the_last_events_filters_by_stream_and_prints_cloudevents_as_json() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "tail").await;
    // ev-0..ev-5 over two streams: line/0 gets seqs 1, 3, 5; line/1 2, 4, 6.
    post_ok(&agent, &mes_events("tl", 6, 2)).await;
    agent.stop().await;

    let out = plantrelay_async(&["journal", "tail", "-c", s(&config), "-n", "3"]).await;
    out.expect_code(0);
    assert!(out.stdout.starts_with("seq"), "header: {}", out.stdout);
    assert_eq!(first_column(&out.stdout), ["4", "5", "6"], "{}", out.stdout);
    assert!(out.stdout.contains("tl-5"), "{}", out.stdout);

    let out = plantrelay_async(&["journal", "tail", "-c", s(&config), "--stream", "line/1"]).await;
    out.expect_code(0);
    assert_eq!(first_column(&out.stdout), ["2", "4", "6"], "{}", out.stdout);
    assert!(!out.stdout.contains("line/0"), "{}", out.stdout);

    let out = plantrelay_async(&["journal", "tail", "-c", s(&config), "-n", "2", "--json"]).await;
    out.expect_code(0);
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(events.len(), 2, "{}", out.stdout);
    assert_eq!(events[0]["sequence"], 5, "{}", events[0]);
    assert_eq!(events[1]["sequence"], 6, "{}", events[1]);
    assert_eq!(events[1]["streamsequence"], 3, "{}", events[1]);
    assert_eq!(events[1]["id"], "tl-5", "{}", events[1]);
    assert_eq!(events[1]["subject"], "line/1", "{}", events[1]);
    assert_eq!(events[1]["specversion"], "1.0", "{}", events[1]);
    assert_eq!(
        events[1]["source"], "plantrelay://gw-test/mes",
        "{}",
        events[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_dead_letters_says_none_and_then_lists_an_event_the_upstream_rejected_with_422() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "dl").await;
    post_ok(&agent, &mes_events("ok", 2, 1)).await;
    assert!(h.receiver.wait_for(2, Duration::from_secs(20)).await);

    let out = plantrelay_async(&["journal", "dead-letters", "-c", s(&config)]).await;
    out.expect_code(0);
    assert_eq!(out.stdout.trim(), "no dead letters");

    h.receiver.reject_ids(["dl-2"]);
    post_ok(&agent, &mes_events("dl", 5, 1)).await;
    // The four others arrive; dl-2 is isolated and dead-lettered.
    assert!(
        h.receiver.wait_for(6, Duration::from_secs(20)).await,
        "{:?}",
        h.receiver.stats()
    );
    wait_cursor(&config, "central", 7).await;
    agent.stop().await;

    let out = plantrelay_async(&["journal", "dead-letters", "-c", s(&config)]).await;
    out.expect_code(0);
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("dl-2"))
        .unwrap_or_else(|| panic!("dl-2 not listed:\n{}", out.stdout));
    assert!(row.contains("central"), "{row}");
    assert!(row.contains("422"), "reason names the status: {row}");
    assert_eq!(
        out.stdout.lines().count(),
        2,
        "header + one row:\n{}",
        out.stdout
    );

    let out = plantrelay_async(&["journal", "dead-letters", "-c", s(&config), "--json"]).await;
    out.expect_code(0);
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["event_id"], "dl-2");
    assert_eq!(list[0]["sink"], "central");
    assert_eq!(list[0]["seq"], 5);
    assert!(
        list[0]["reason"].as_str().unwrap().contains("422"),
        "{}",
        list[0]
    );

    let out = plantrelay_async(&[
        "journal",
        "dead-letters",
        "-c",
        s(&config),
        "--sink",
        "other",
    ])
    .await;
    out.expect_code(0);
    assert_eq!(out.stdout.trim(), "no dead letters");
    let stats = stats_json(&config).await;
    assert_eq!(stats["dead_letters"], 1, "{stats}");
}

// --------------------------------------------------------------- replay ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_seq_on_a_stopped_agent_sets_the_cursor_and_the_next_run_delivers_from_there_again()
 {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "rp1").await;
    post_ok(&agent, &mes_events("rp", 5, 2)).await;
    assert!(h.receiver.wait_for(5, Duration::from_secs(20)).await);
    wait_cursor(&config, "central", 5).await;
    agent.stop().await;

    let out = plantrelay_async(&[
        "replay",
        "-c",
        s(&config),
        "--sink",
        "central",
        "--from-seq",
        "2",
    ])
    .await;
    out.expect_code(0);
    assert!(
        out.stdout.contains("sink central: cursor set to 1"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("from seq 2"), "{}", out.stdout);
    assert_eq!(cursor_of(&stats_json(&config).await, "central"), Some(1));

    let agent = start_agent(&h, &config, "rp2").await;
    assert!(
        h.receiver
            .wait_until(Duration::from_secs(20), |s| s.events_received >= 9)
            .await,
        "{:?}",
        h.receiver.stats()
    );
    wait_cursor(&config, "central", 5).await;
    agent.stop().await;

    let mut per_seq: HashMap<u64, usize> = HashMap::new();
    for e in h.receiver.events() {
        *per_seq.entry(e.sequence.unwrap()).or_default() += 1;
    }
    let mut counts: Vec<(u64, usize)> = per_seq.into_iter().collect();
    counts.sort();
    assert_eq!(
        counts,
        [(1, 1), (2, 2), (3, 2), (4, 2), (5, 2)],
        "seq 1 once, seqs 2..=5 twice"
    );
    let v = h.receiver.verdict();
    assert_eq!(
        (v.unique_ids, v.duplicates, v.out_of_order),
        (5, 4, 0),
        "{v:?}"
    );
}

/// A sink that never delivered anything has no cursor row: a replay must not
/// move its cursor *forward* past events the upstream never acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn replay_on_a_sink_that_never_delivered_anything_skips_nothing() {
    let h = Harness::new().await;
    // The WAN has been down since the agent was installed.
    h.receiver.set_fail(503, Some(1), 1.0);
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "nd1").await;
    post_ok(&agent, &mes_events("nd", 5, 1)).await;
    agent.stop().await;
    assert_eq!(cursor_of(&stats_json(&config).await, "central"), None);

    for args in [["--from-seq", "4"], ["--since", "2999-01-01T00:00:00Z"]] {
        let out = plantrelay_async(&[
            "replay",
            "-c",
            s(&config),
            "--sink",
            "central",
            args[0],
            args[1],
        ])
        .await;
        out.expect_code(0);
        assert!(
            out.stdout.contains("cursor set to 0"),
            "{args:?}: nothing was delivered, so nothing may be skipped: {}",
            out.stdout
        );
    }

    h.receiver.clear_faults();
    let agent = start_agent(&h, &config, "nd2").await;
    let all = h.receiver.wait_for(5, Duration::from_secs(10)).await;
    agent.stop().await;
    assert!(
        all,
        "undelivered events were skipped: {:?}",
        h.receiver.ids()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_the_agent_runs_exits_1_and_points_to_the_admin_api() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "rprun").await;
    post_ok(&agent, &mes_events("x", 2, 1)).await;

    let out = plantrelay_async(&[
        "replay",
        "-c",
        s(&config),
        "--sink",
        "central",
        "--from-seq",
        "1",
    ])
    .await;
    out.expect_code(1);
    assert!(out.stderr.contains("admin API"), "{}", out.stderr);
    assert!(out.stderr.contains("running"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_an_unknown_sink_exits_2_and_lists_the_configured_sinks() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, free_port());
    let out = plantrelay_async(&[
        "replay",
        "-c",
        s(&config),
        "--sink",
        "nosuch",
        "--from-seq",
        "1",
    ])
    .await;
    out.expect_code(2);
    assert!(out.stderr.contains("nosuch"), "{}", out.stderr);
    assert!(out.stderr.contains("sinks: central"), "{}", out.stderr);
    assert!(
        !h.state_dir().join("journal.db").exists(),
        "a refused replay creates no journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_since_an_age_or_a_time_rewinds_and_since_garbage_is_a_usage_error() {
    let h = Harness::new().await;
    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "since").await;
    post_ok(&agent, &mes_events("sn", 3, 1)).await;
    assert!(h.receiver.wait_for(3, Duration::from_secs(20)).await);
    wait_cursor(&config, "central", 3).await;
    agent.stop().await;

    let since = |arg: &'static str| {
        let config = config.clone();
        async move {
            plantrelay_async(&[
                "replay",
                "-c",
                s(&config),
                "--sink",
                "central",
                "--since",
                arg,
            ])
            .await
        }
    };

    // A time after every event: nothing to deliver again, the cursor stays.
    let out = since("2999-01-01T00:00:00Z").await;
    out.expect_code(0);
    assert!(out.stdout.contains("cursor set to 3"), "{}", out.stdout);

    // Everything was received within the last hour: back to the start.
    let out = since("1h").await;
    out.expect_code(0);
    assert!(out.stdout.contains("cursor set to 0"), "{}", out.stdout);
    assert_eq!(cursor_of(&stats_json(&config).await, "central"), Some(0));

    // An RFC 3339 time before everything: the same.
    let out = since("2020-01-01T00:00:00Z").await;
    out.expect_code(0);
    assert!(out.stdout.contains("cursor set to 0"), "{}", out.stdout);

    let out = since("garbage").await;
    out.expect_code(2);
    assert!(out.stderr.contains("--since"), "{}", out.stderr);
    assert!(out.stderr.contains("garbage"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

// ---------------------------------------------------------- bad state ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_journal_file_is_quarantined_and_the_agent_starts_anyway() {
    use rand::RngCore;

    let h = Harness::new().await;
    std::fs::create_dir_all(h.state_dir()).unwrap();
    let mut garbage = vec![0u8; 64 * 1024];
    rand::rng().fill_bytes(&mut garbage);
    std::fs::write(h.state_dir().join("journal.db"), &garbage).unwrap();

    let config = write_agent_config(&h, 0);
    let agent = start_agent(&h, &config, "garbage").await;
    let body = post_ok(&agent, &mes_events("after", 3, 1)).await;
    assert_eq!(body["accepted"], 3, "{body}");
    assert!(h.receiver.wait_for(3, Duration::from_secs(20)).await);
    let log = agent.stop().await;

    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("damaged")),
        "no quarantine warning in the log:\n{log}"
    );
    let corrupt: Vec<String> = std::fs::read_dir(h.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal.db.corrupt-"))
        .collect();
    assert_eq!(corrupt.len(), 1, "quarantined files: {corrupt:?}");
    assert_eq!(
        std::fs::read(h.state_dir().join(&corrupt[0])).unwrap(),
        garbage,
        "the damaged file is kept as it was"
    );
    assert!(
        log.contains(&corrupt[0]),
        "the log names where it went:\n{log}"
    );

    let out = plantrelay_async(&["journal", "stats", "-c", s(&config)]).await;
    out.expect_code(0);
    assert!(
        table_value(&out.stdout, "quarantine")
            .is_some_and(|q| q.starts_with("a damaged journal was replaced")),
        "{}",
        out.stdout
    );
    assert_eq!(
        table_value(&out.stdout, "events"),
        Some("3"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_that_is_a_regular_file_is_refused_as_bad_config_naming_the_path() {
    let h = Harness::new().await;
    std::fs::write(h.state_dir(), "not a directory").unwrap();
    let config = write_agent_config(&h, free_port());

    // Caught by the config's filesystem checks: exit 2, as for check-config.
    let out = plantrelay_async(&["run", "-c", s(&config)]).await;
    out.expect_code(2);
    assert!(out.stderr.contains("agent.state_dir"), "{}", out.stderr);
    assert!(out.stderr.contains(s(&h.state_dir())), "{}", out.stderr);
    let out = plantrelay_async(&["check-config", "-c", s(&config)]).await;
    out.expect_code(2);
    assert!(out.stderr.contains("agent.state_dir"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_below_a_regular_file_is_refused_as_bad_config_naming_the_path() {
    let h = Harness::new().await;
    let blocker = h.dir.path().join("blocker");
    std::fs::write(&blocker, "a file where a directory should be").unwrap();
    let state = blocker.join("state");
    let text = h
        .config_text(
            &format!("127.0.0.1:{}", free_port()),
            &h.receiver.url(),
            "",
            "",
        )
        .replace(s(&h.state_dir()), s(&state));
    let config = h.write_config(&text);

    for cmd in ["check-config", "run"] {
        let out = plantrelay_async(&[cmd, "-c", s(&config)]).await;
        out.expect_code(2);
        assert!(
            out.stderr.contains("agent.state_dir"),
            "{cmd}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(s(&state)), "{cmd}: {}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_path_that_is_a_directory_passes_the_config_check_but_run_exits_1_naming_it() {
    let h = Harness::new().await;
    let journal = h.state_dir().join("journal.db");
    std::fs::create_dir_all(journal.join("oops")).unwrap();
    let config = write_agent_config(&h, free_port());

    plantrelay_async(&["check-config", "-c", s(&config)])
        .await
        .expect_code(0);
    let out = plantrelay_async(&["run", "-c", s(&config)]).await;
    out.expect_code(1);
    assert!(out.stderr.contains(s(&journal)), "{}", out.stderr);
    assert!(
        !out.stderr.contains("plantrelay started"),
        "it must not claim to have started: {}",
        out.stderr
    );
    assert!(journal.is_dir(), "the directory is left alone");
}

// ----------------------------------------------------------- opcua trust ---

const PRESS_SOURCE: &str = r#"
[[sources.opcua]]
name = "press"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"

[[sources.opcua.nodes]]
node_id = "nsu=urn:press;s=State"
stream = "line1/press"
"#;

#[test]
fn opcua_trust_moves_rejected_server_certificates_and_asks_which_among_several() {
    use plantrelay::sources::opcua::pki::{colon_hex, sha256_hex};
    let dir = tempfile::tempdir().unwrap();
    let config = valid_config(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(PRESS_SOURCE);
    std::fs::write(&config, text).unwrap();
    let pki = dir.path().join("state/pki/press");
    let trust = |extra: &[&str]| {
        let mut args = vec!["opcua", "trust", "-c", s(&config), "--source", "press"];
        args.extend_from_slice(extra);
        plantrelay(&args)
    };

    let out = trust(&[]);
    out.expect_code(1);
    assert!(
        out.stdout.contains("no rejected server certificate"),
        "{}",
        out.stdout
    );
    let out = plantrelay(&["opcua", "trust", "-c", s(&config), "--source", "nope"]);
    out.expect_code(2);
    assert!(out.stderr.contains("press"), "{}", out.stderr);

    std::fs::create_dir_all(pki.join("rejected")).unwrap();
    std::fs::write(pki.join("rejected/a [1].der"), b"server a").unwrap();
    std::fs::write(pki.join("rejected/b [2].der"), b"server b").unwrap();
    let (fa, fb) = (sha256_hex(b"server a"), sha256_hex(b"server b"));
    let out = trust(&[]);
    out.expect_code(2);
    assert!(out.stderr.contains(&colon_hex(&fa)), "{}", out.stderr);
    assert!(out.stderr.contains(&colon_hex(&fb)), "{}", out.stderr);
    assert!(out.stderr.contains("--fingerprint"), "{}", out.stderr);
    assert!(
        !pki.join("trusted/a [1].der").exists(),
        "nothing trusted without a choice"
    );

    let out = trust(&["--fingerprint", &colon_hex(&fa)[..11]]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("prefix is not accepted"),
        "{}",
        out.stderr
    );
    let out = trust(&["--fingerprint", &colon_hex(&fa)]);
    out.expect_code(0);
    assert!(out.stdout.contains(&colon_hex(&fa)), "{}", out.stdout);
    assert!(pki.join("trusted/a [1].der").exists());
    assert!(!pki.join("rejected/a [1].der").exists());
    assert!(pki.join("rejected/b [2].der").exists());

    let out = trust(&["--fingerprint", &"0".repeat(64)]);
    out.expect_code(2);
    let out = trust(&["--all"]);
    out.expect_code(0);
    assert!(pki.join("trusted/b [2].der").exists());
}
