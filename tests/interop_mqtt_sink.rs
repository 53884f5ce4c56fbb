//! The MQTT sink against the system Mosquitto (Debian package), started by
//! each test on a free loopback port. A subscriber with a persistent session
//! (QoS 1, clean session off) checks order and completeness across a broker
//! restart (with persistence) and across SIGKILLs of the real binary. Run
//! with `cargo test --features interop --test interop_mqtt_sink` (`.ci/run`
//! does).

#![cfg(feature = "interop")]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plantrelay::agent;
use plantrelay::config::Config;
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use support::agent::{http_client, post};
use support::mosquitto::{Mosquitto, free_port};
use support::upstream::{check, events, spawn};

const WAIT: Duration = Duration::from_secs(90);

type Inbox = Arc<Mutex<Vec<Value>>>;

/// A subscriber with a persistent session: Mosquitto keeps what arrives
/// while it is away (or while the broker restarts) and delivers it after.
async fn subscriber(m: &Mosquitto, filter: &str) -> Inbox {
    let inbox: Inbox = Arc::default();
    let mut o = MqttOptions::new("checker", "127.0.0.1", m.port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let sink = inbox.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ce: Value = serde_json::from_slice(&p.payload).expect("a CloudEvent");
                    sink.lock().unwrap().push(ce);
                }
                Ok(_) => {}
                // The broker restarts: reconnect (the session is kept).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, subscribed)
        .await
        .unwrap()
        .unwrap();
    std::mem::forget(client);
    inbox
}

fn config_text(state: &std::path::Path, listen: &str, url: &str) -> String {
    format!(
        r#"
[agent]
id = "gw-interop"
state_dir = "{state}"

[[sources.http]]
name = "mes"
listen = "{listen}"

[[sinks.mqtt]]
name = "uns"
url = "{url}"
topic = "uns/{{agent}}/{{stream}}"
batch_max_events = 100
max_events_per_sec = 3000
retry_initial = "50ms"
retry_max = "500ms"
timeout = "2s"
"#,
        state = state.display()
    )
}

async fn until_all(inbox: &Inbox, expected: &HashSet<String>, m: &Mosquitto) {
    let deadline = Instant::now() + WAIT;
    loop {
        let have: HashSet<String> = inbox
            .lock()
            .unwrap()
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
    let inbox = subscriber(&m, "uns/#").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plantrelay.toml");
    std::fs::write(
        &path,
        config_text(dir.path(), "127.0.0.1:0", &m.url("mqtt")),
    )
    .unwrap();
    let a = agent::start(&Config::load(&path).unwrap()).await.unwrap();
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
    let dups = check(&inbox.lock().unwrap(), &expected);
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
    let inbox = subscriber(&m, "uns/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("plantrelay.toml");
    std::fs::write(
        &path,
        config_text(dir.path(), &format!("127.0.0.1:{port}"), &m.url("mqtt")),
    )
    .unwrap();
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
    let received = inbox.lock().unwrap().clone();
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
