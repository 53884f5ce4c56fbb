//! The MQTT sink against the system Mosquitto (Debian package), started by
//! each test on a free loopback port. A subscriber with a persistent session
//! (QoS 1, clean session off) checks order and completeness across a broker
//! restart (with persistence) and across SIGKILLs of the real binary. Run
//! with `cargo test --features interop --test it interop_mqtt_sink::` (`.ci/run`
//! does).

#![cfg(feature = "interop")]

use crate::support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use plantrelay::agent;
use rand::Rng;
use serde_json::Value;
use support::agent::{http_client, load_config, minimal_config_text, post, spawn, write_config};
use support::free_port;
use support::mosquitto::Mosquitto;
use support::upstream::{Inbox, check, cloudevents, events, subscribe};

const WAIT: Duration = Duration::from_secs(90);

fn config_text(state: &std::path::Path, listen: &str, url: &str) -> String {
    let sink = format!(
        r#"
[[sinks.mqtt]]
name = "uns"
url = "{url}"
topic = "uns/{{agent}}/{{stream}}"
batch_max_events = 100
max_events_per_sec = 3000
retry_initial = "50ms"
retry_max = "500ms"
timeout = "2s"
"#
    );
    minimal_config_text("gw-interop", state, listen, &sink)
}

async fn until_all(inbox: &Inbox, expected: &HashSet<String>, m: &Mosquitto) {
    let deadline = Instant::now() + WAIT;
    loop {
        let have: HashSet<String> = cloudevents(inbox)
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        if expected.is_subset(&have) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} ids upstream; mosquitto log:\n{}",
            expected.intersection(&have).count(),
            expected.len(),
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_resumes_in_order_without_loss() {
    let mut m = Mosquitto::start(true, "").await;
    let inbox = subscribe(m.addr(), "checker", true, "uns/#").await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "127.0.0.1:0", &m.url("mqtt"));
    let a = agent::start(&load_config(dir.path(), &text)).await.unwrap();
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let client = http_client();
    let all = events("rst", 0..6000, 3);
    for (i, chunk) in all.chunks(500).enumerate() {
        let (status, body) = post(&client, &url, chunk).await;
        assert_eq!(status, 202, "{body}");
        if i == 5 {
            let before = inbox.lock().unwrap().len();
            let deadline = Instant::now() + WAIT;
            while inbox.lock().unwrap().len() == before {
                assert!(
                    Instant::now() < deadline,
                    "nothing upstream before the restart"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            m.restart().await;
        }
    }
    let expected: HashSet<String> = (0..6000).map(|i| format!("rst-{i}")).collect();
    until_all(&inbox, &expected, &m).await;
    let dups = check(&cloudevents(&inbox), &expected);
    // The subscriber may see the last publishes before their PUBACKs reach
    // the sink.
    let deadline = Instant::now() + WAIT;
    while a.view.sinks[0].progress().delivered < 6000 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            a.view.sinks[0].progress()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.view.sinks[0].progress().delivered, 6000);
    eprintln!("broker restart: 6000 ids, {dups} re-sends");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_of_the_agent_mid_batch_lose_nothing() {
    let m = Mosquitto::start(false, "").await;
    let inbox = subscribe(m.addr(), "checker", true, "uns/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = write_config(
        dir.path(),
        &config_text(dir.path(), &format!("127.0.0.1:{port}"), &m.url("mqtt")),
    );
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let client = http_client();
    let mut accepted = HashSet::new();
    let mut next = 0usize;
    let mut rng = rand::rng();
    let kills = 5;
    for _ in 0..kills {
        let mut child = spawn(&path);
        let kill_after = inbox.lock().unwrap().len() + rng.random_range(100..800);
        let deadline = Instant::now() + WAIT;
        while inbox.lock().unwrap().len() < kill_after {
            assert!(Instant::now() < deadline, "no progress upstream");
            let batch = events("k", next..next + 50, 3);
            match client
                .post(&url)
                .header("content-type", "application/cloudevents-batch+json")
                .body(Value::Array(batch).to_string())
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == 202 => {
                    accepted.extend((next..next + 50).map(|i| format!("k-{i}")));
                    next += 50;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let mut child = spawn(&path);
    until_all(&inbox, &accepted, &m).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let received = cloudevents(&inbox);
    let dups = check(&received, &accepted);
    for ce in &received {
        assert!(accepted.contains(ce["id"].as_str().unwrap()));
    }
    eprintln!(
        "{kills} SIGKILLs: {} ids accepted, {} publishes received, {dups} re-sends",
        accepted.len(),
        received.len()
    );
}
