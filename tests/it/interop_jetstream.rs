//! The JetStream sink against the system nats-server (Debian package,
//! v2.9), started by each test with JetStream on a free loopback port and
//! its own store dir (`tests/it/support/nats_server.rs`). Run with
//! `cargo test --features interop --test it interop_jetstream::` (`.ci/run`
//! does).
//!
//! Scenarios: SIGKILLs of the real binary mid-batch (the server's
//! deduplication on `Nats-Msg-Id` keeps every event exactly once); a
//! nats-server restart mid-run; a missing stream (a clear status, ingest
//! goes on) and `create_stream`; TLS with a client certificate.

#![cfg(feature = "interop")]

use crate::support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plantrelay::agent::{self, RunningAgent};
use plantrelay::config::Config;
use plantrelay::status::{SinkProgress, SinkStatus};
use rand::Rng;
use serde_json::Value;
use support::agent::{agent_toml, http_client, mes_events, post, wait_listening, write_config};
use support::free_port;
use support::nats_server::{NatsServer, Stored};

const WAIT: Duration = Duration::from_secs(120);
const AGENT: &str = "gw-js";

/// A config with one HTTP source `mes` on `listen` and one JetStream sink
/// `central`; `sink_extra` is appended inside the sink table.
fn config_text(state: &Path, listen: &str, url: &str, sink_extra: &str) -> String {
    format!(
        r#"{head}
[[sinks.jetstream]]
name = "central"
url = "{url}"
retry_initial = "50ms"
retry_max = "1s"
timeout = "5s"
{sink_extra}
"#,
        head = agent_toml(AGENT, state, listen),
    )
}

/// Waits until `stream` holds at least `n` messages.
async fn wait_count(server: &NatsServer, stream: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let have = server.count(stream).await;
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} messages in {stream}: {have}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the sink's status satisfies `cond`.
async fn wait_sink(sink: &SinkStatus, what: &str, cond: impl Fn(&SinkProgress) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = sink.progress();
        if cond(&p) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every id once, every posted id there, and per subject (and overall)
/// the journal sequence rising in stream order.
fn check_stream(stored: &[Stored], posted: &HashSet<String>) {
    let mut ids = HashSet::new();
    for m in stored {
        assert!(ids.insert(m.msg_id.as_str()), "{} stored twice", m.msg_id);
    }
    assert_eq!(stored.len(), posted.len(), "messages in the stream");
    for id in posted {
        assert!(ids.contains(id.as_str()), "{id} missing from the stream");
    }
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut prev = 0;
    for m in stored {
        assert!(
            m.ce_sequence > prev,
            "stream order: {} after {prev}",
            m.ce_sequence
        );
        prev = m.ce_sequence;
        let l = last.entry(m.subject.as_str()).or_default();
        assert!(m.ce_sequence > *l, "order on {}", m.subject);
        *l = m.ce_sequence;
        let want = format!("plantrelay.{AGENT}.{}", m.ce_subject.replace('/', "."));
        assert_eq!(m.subject, want, "subject of {}", m.msg_id);
    }
}

fn spawn_agent(config: &Path, log: &Path) -> Child {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(config)
        .env("PLANTRELAY_LOG", "warn,plantrelay::sinks::jetstream=info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap()
}

/// Sum of the `duplicates` the sink logged (text or JSON log lines).
fn logged_duplicates(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("deduplicated on Nats-Msg-Id"))
        .filter_map(|l| {
            let at = l
                .find("duplicates=")
                .map(|i| i + "duplicates=".len())
                .or_else(|| {
                    l.find("\"duplicates\":")
                        .map(|i| i + "\"duplicates\":".len())
                })?;
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_mid_batch_leave_every_event_exactly_once_in_the_stream() {
    const N: usize = 20_000;
    const KILLS: usize = 6;
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Paced (2,000 events/s in batches of 100) so that the kills land
    // while the stream fills, at random points of the drain.
    let text = config_text(
        &dir.path().join("state"),
        &format!("127.0.0.1:{port}"),
        &server.url(),
        "stream = \"PLANT\"\ncreate_stream = true\nbatch_max_events = 100\nmax_events_per_sec = 2000",
    );
    let config = write_config(dir.path(), &text);
    let log = dir.path().join("agent.log");
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let client = http_client();
    let mut rng = rand::rng();

    let mut child = spawn_agent(&config, &log);
    wait_listening(port).await;
    let events = mes_events("k", N, 8);
    let posted: HashSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    for chunk in events.chunks(500) {
        let (status, body) = post(&client, &url, chunk).await;
        assert_eq!(status, 202, "{body}");
    }
    let mut kills = 0;
    let mut counts_at_kill = Vec::new();
    while kills < KILLS {
        let start = server.count("PLANT").await;
        let target = (start + rng.random_range(300..2_500)).min(N as u64 - 200);
        wait_count(&server, "PLANT", target).await;
        // SIGKILL (Child::kill) of our own child, mid-batch.
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        counts_at_kill.push(server.count("PLANT").await);
        child = spawn_agent(&config, &log);
        wait_listening(port).await;
        if server.count("PLANT").await >= N as u64 - 400 {
            break;
        }
    }
    assert!(kills >= 5, "only {kills} kills before the end of the drain");
    wait_count(&server, "PLANT", N as u64).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful stop on SIGTERM: {status}");

    let stored = server.stored("PLANT").await;
    check_stream(&stored, &posted);
    let log_text = std::fs::read_to_string(&log).unwrap();
    let dups = logged_duplicates(&log_text);
    eprintln!(
        "jetstream kill -9 test: {kills} SIGKILLs (stream at {counts_at_kill:?}), {N} events posted, {} in the stream, each Nats-Msg-Id once, in order; {dups} re-sent events deduplicated by the server (as logged by the sink)",
        stored.len()
    );
}

fn in_process_config(dir: &Path, url: &str, sink_extra: &str) -> Config {
    let text = config_text(&dir.join("state"), "127.0.0.1:0", url, sink_extra);
    Config::load(&write_config(dir, &text)).unwrap()
}

/// The W3C trace context every request of [`post_all`] carries.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

async fn post_all(agent: &RunningAgent, events: &[Value]) {
    let url = format!("http://{}/v1/events", agent.http_addr("mes").unwrap());
    let client = http_client();
    for chunk in events.chunks(500) {
        let resp = client
            .post(&url)
            .header("content-type", "application/cloudevents-batch+json")
            .header("traceparent", TRACEPARENT)
            .body(Value::Array(chunk.to_vec()).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
}

fn ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_run_loses_nothing_and_keeps_order() {
    const N: usize = 6_000;
    let mut server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = in_process_config(
        dir.path(),
        &server.url(),
        "stream = \"PLANT\"\ncreate_stream = true\nbatch_max_events = 100\nmax_events_per_sec = 3000",
    );
    let agent = agent::start(&config).await.unwrap();
    let events = mes_events("r", N, 5);
    post_all(&agent, &events).await;
    wait_count(&server, "PLANT", 1_500).await;
    server.kill();
    let sink = agent.view.sinks[0].clone();
    wait_sink(&sink, "the sink to see the server gone", |p| {
        p.consecutive_failures > 0
    })
    .await;
    let at_restart = sink.progress().delivered;
    server.spawn().await;
    wait_count(&server, "PLANT", N as u64).await;
    let stored = server.stored("PLANT").await;
    check_stream(&stored, &ids(&events));
    // The ingest request's trace context, as the NATS binding carries it.
    assert!(stored.iter().all(|m| m.ce_traceparent == TRACEPARENT));
    let p = sink.progress();
    agent.shutdown().await;
    assert!(
        (1_500..N as u64).contains(&at_restart),
        "restarted mid-run: {at_restart} delivered"
    );
    assert_eq!(p.dead_letters, 0);
    eprintln!(
        "jetstream server restart: killed at {at_restart} of {N} delivered, all {} stored once, in order",
        stored.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_named_in_the_status_and_create_stream_creates_it() {
    const N: usize = 300;
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = in_process_config(dir.path(), &server.url(), "stream = \"MISSING\"");
    let agent = agent::start(&config).await.unwrap();
    let sink = agent.view.sinks[0].clone();
    let want = format!(
        "JetStream stream 'MISSING' does not exist on {}; create it (capturing subject plantrelay.{AGENT}.>) or set create_stream = true",
        server.url()
    );
    wait_sink(&sink, "the status to name the missing stream", |p| {
        p.last_error.as_ref().is_some_and(|(_, e)| *e == want)
    })
    .await;
    // The agent still journals what the MES sends.
    let events = mes_events("m", N, 3);
    post_all(&agent, &events).await;
    let head = plantrelay::journal::Reader::open(agent.journal.path())
        .unwrap()
        .head_seq()
        .unwrap();
    assert_eq!(sink.progress().delivered, 0);
    assert_eq!(server.count("MISSING").await, 0, "nothing created");
    agent.shutdown().await;
    assert_eq!(head, N as u64, "journaled while the stream was missing");

    // The same agent with create_stream: the stream appears with the
    // configured window, and the journaled events reach it.
    let config = in_process_config(
        dir.path(),
        &server.url(),
        "stream = \"MISSING\"\ncreate_stream = true\nduplicate_window = \"2m\"",
    );
    let agent = agent::start(&config).await.unwrap();
    wait_count(&server, "MISSING", N as u64).await;
    let js = server.jetstream().await;
    let mut stream = js.get_stream("MISSING").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.subjects, vec![format!("plantrelay.{AGENT}.>")]);
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    check_stream(&server.stored("MISSING").await, &ids(&events));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    const N: usize = 500;
    plantrelay::tls::install_crypto_provider();
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = plantrelay::demo::receiver::EphemeralPki::generate().unwrap();
    let paths = pki.write_to(pki_dir.path()).unwrap();
    let conf = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
        paths.server_cert.display(),
        paths.server_key.display(),
        paths.ca.display()
    );
    let server = NatsServer::start_with(Some(conf)).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port);
    // Without a client certificate the server refuses the handshake; the
    // status says why and nothing is delivered.
    let config = in_process_config(
        dir.path(),
        &url,
        &format!(
            "stream = \"SECURE\"\ncreate_stream = true\nca_file = \"{}\"",
            paths.ca.display()
        ),
    );
    let agent = agent::start(&config).await.unwrap();
    let sink = agent.view.sinks[0].clone();
    wait_sink(&sink, "a connection error in the status", |p| {
        p.last_error
            .as_ref()
            .is_some_and(|(_, e)| e.contains("cannot connect to the NATS server"))
    })
    .await;
    agent.shutdown().await;

    let config = in_process_config(
        dir.path(),
        &url,
        &format!(
            "stream = \"SECURE\"\ncreate_stream = true\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
            paths.ca.display(),
            paths.client_cert.display(),
            paths.client_key.display()
        ),
    );
    let agent = agent::start(&config).await.unwrap();
    let events = mes_events("t", N, 4);
    post_all(&agent, &events).await;
    let sink = agent.view.sinks[0].clone();
    wait_sink(&sink, "every event delivered over TLS", |p| {
        p.delivered >= N as u64
    })
    .await;
    agent.shutdown().await;
    // Read back over TLS with the client certificate.
    let tls = plantrelay::tls::client_config(&paths.client_tls(true)).unwrap();
    let client = async_nats::ConnectOptions::new()
        .require_tls(true)
        .tls_client_config(tls)
        .connect(url.as_str())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("SECURE").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, N as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_stream_name_the_stream_is_found_by_subject_and_an_oversized_event_is_dead_lettered()
 {
    use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
    const N: usize = 60;
    const BIG: usize = 19;
    let server = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = in_process_config(dir.path(), &server.url(), "batch_max_events = 25");
    let agent = agent::start(&config).await.unwrap();
    let sink = agent.view.sinks[0].clone();
    let want = format!(
        "no JetStream stream on {} captures subject plantrelay.{AGENT}.probe",
        server.url()
    );
    wait_sink(
        &sink,
        "the status to say no stream captures the subject",
        |p| {
            p.last_error
                .as_ref()
                .is_some_and(|(_, e)| e.starts_with(&want))
        },
    )
    .await;
    let mut events = mes_events("b", N, 3);
    events[BIG]["data"] = Value::String("x".repeat(8 * 1024));
    post_all(&agent, &events).await;

    // Plant IT creates the stream, with a message size limit the big
    // event exceeds: the sink finds it by subject and delivers the rest.
    server
        .jetstream()
        .await
        .create_stream(StreamConfig {
            name: "FOUND".into(),
            subjects: vec!["plantrelay.>".into()],
            storage: StorageType::File,
            max_message_size: 4096,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_sink(
        &sink,
        "the rest delivered and the big event dead-lettered",
        |p| p.delivered == N as u64 - 1 && p.dead_letters == 1,
    )
    .await;
    let dead = plantrelay::journal::Reader::open(agent.journal.path())
        .unwrap()
        .dead_letters(Some("central"))
        .unwrap();
    agent.shutdown().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event_id, format!("b-{BIG}"));
    assert_eq!(dead[0].seq, BIG as u64 + 1);
    assert!(
        dead[0].reason.contains(&format!("b-{BIG}"))
            && dead[0].reason.contains("maximum message size"),
        "{}",
        dead[0].reason
    );
    let mut expected = ids(&events);
    expected.remove(&format!("b-{BIG}"));
    check_stream(&server.stored("FOUND").await, &expected);
}
