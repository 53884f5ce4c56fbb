//! The MQTT sink against a real broker in process (rumqttd on loopback):
//! a subscriber that stays connected checks order and completeness; the
//! connection is cut mid-run through the fault proxy; the real binary is
//! killed with SIGKILL mid-batch and restarted. The system Mosquitto runs
//! the same checks in `tests/it/interop_mqtt_sink.rs`.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use plantrelay::agent;
use plantrelay::demo::machines::EmbeddedBroker;
use rand::Rng;
use serde_json::{Value, json};
use support::agent::{http_client, load_config, minimal_config_text, post, spawn, write_config};
use support::fault_proxy::FaultProxy;
use support::free_port;
use support::upstream::{check, cloudevents, events, subscribe, subscribe_v5, until};

const WAIT: Duration = Duration::from_secs(60);

fn config(state: &std::path::Path, listen: &str, sink: &str) -> String {
    let sinks = format!(
        r#"
[[sinks.mqtt]]
name = "uns"
retry_initial = "50ms"
retry_max = "500ms"
timeout = "2s"
{sink}
"#
    );
    minimal_config_text("gw-mqtt", state, listen, &sinks)
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_upstream_broker_once_and_in_order() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let inbox = subscribe(broker.addr(), "check-plants", false, "plants/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load_config(
        dir.path(),
        &config(
            dir.path(),
            "127.0.0.1:0",
            &format!(
                "url = \"{}\"\ntopic = \"plants/{{agent}}/{{stream}}\"\nbatch_max_events = 64",
                broker.url()
            ),
        ),
    );
    let a = agent::start(&cfg).await.unwrap();
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let client = http_client();
    let all = events("ord", 0..3000, 3);
    for chunk in all.chunks(250) {
        let (status, body) = post(&client, &url, chunk).await;
        assert_eq!(status, 202, "{body}");
    }
    until("3000 events upstream", || {
        inbox.lock().unwrap().len() >= 3000
    })
    .await;
    let received = cloudevents(&inbox);
    let expected: HashSet<String> = (0..3000).map(|i| format!("ord-{i}")).collect();
    assert_eq!(check(&received, &expected), 0, "no faults, no re-sends");
    assert_eq!(received.len(), 3000);
    // The topic template, and the CloudEvent in the payload.
    let first_topic = inbox.lock().unwrap()[0].topic.clone();
    assert_eq!(first_topic, "plants/gw-mqtt/line0/orders");
    assert_eq!(received[0]["id"], "ord-0");
    assert_eq!(received[0]["source"], "plantrelay://gw-mqtt/mes");
    assert_eq!(received[0]["deliveryclass"], "critical");
    assert_eq!(received[0]["data"], json!({"n": 0}));
    // The subscriber may see the last publishes before their PUBACKs reach
    // the sink.
    until("3000 delivered", || {
        a.view.sinks[0].progress().delivered >= 3000
    })
    .await;
    assert_eq!(a.view.sinks[0].progress().delivered, 3000);
    assert_eq!(a.view.sinks[0].kind, "mqtt");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_format_over_mqtt5_carries_the_attributes_as_user_properties() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let inbox = subscribe_v5(broker.v5_addr(), "raw/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load_config(
        dir.path(),
        &config(
            dir.path(),
            "127.0.0.1:0",
            &format!(
                "url = \"mqtt://{}\"\nprotocol = \"v5\"\nformat = \"data\"\nqos = 2\ntopic = \"raw/{{source}}/{{stream}}\"",
                broker.v5_addr()
            ),
        ),
    );
    let a = agent::start(&cfg).await.unwrap();
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    // The MES request's trace context travels with its events.
    let resp = http_client()
        .post(&url)
        .header("content-type", "application/cloudevents-batch+json")
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "mes=7")
        .body(Value::Array(events("raw", 0..200, 2)).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    until("200 events upstream", || inbox.lock().unwrap().len() >= 200).await;
    let got = inbox.lock().unwrap().clone();
    assert_eq!(got.len(), 200, "QoS 2, no faults: exactly once");
    for (i, r) in got.iter().enumerate() {
        let prop = |name: &str| {
            r.user_properties
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(prop("id"), Some(format!("raw-{i}")), "in journal order");
        assert_eq!(prop("specversion").as_deref(), Some("1.0"));
        assert_eq!(prop("type").as_deref(), Some("com.example.order"));
        assert_eq!(prop("source").as_deref(), Some("plantrelay://gw-mqtt/mes"));
        assert_eq!(prop("subject"), Some(format!("line{}/orders", i % 2)));
        assert!(prop("sequence").is_some() && prop("deliveryclass").is_some());
        assert_eq!(prop("traceparent").as_deref(), Some(TRACEPARENT));
        assert_eq!(prop("tracestate").as_deref(), Some("mes=7"));
        assert_eq!(r.topic, format!("raw/mes/line{}/orders", i % 2));
        assert_eq!(
            serde_json::from_slice::<Value>(&r.payload).unwrap(),
            json!({"n": i}),
            "the payload is the data alone"
        );
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_run_resumes_in_order_and_loses_nothing() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let inbox = subscribe(broker.addr(), "check-cut", false, "cut/#").await;
    let proxy = FaultProxy::start(broker.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load_config(
        dir.path(),
        &config(
            dir.path(),
            "127.0.0.1:0",
            &format!(
                "url = \"mqtt://{}\"\ntopic = \"cut/{{stream}}\"\nbatch_max_events = 50\nmax_events_per_sec = 2000",
                proxy.addr()
            ),
        ),
    );
    let a = agent::start(&cfg).await.unwrap();
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let client = http_client();
    let all = events("cut", 0..4000, 4);
    let mut cuts = 0;
    for (i, chunk) in all.chunks(200).enumerate() {
        let (status, body) = post(&client, &url, chunk).await;
        assert_eq!(status, 202, "{body}");
        if i % 5 == 2 {
            // Cut while publishes are in flight, then let it reconnect.
            let before = inbox.lock().unwrap().len();
            until("some publishes after the last cut", || {
                inbox.lock().unwrap().len() > before
            })
            .await;
            proxy.cut();
            cuts += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
            proxy.pass();
        }
    }
    let expected: HashSet<String> = (0..4000).map(|i| format!("cut-{i}")).collect();
    until("every id upstream", || {
        let ids: HashSet<String> = cloudevents(&inbox)
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        expected.is_subset(&ids)
    })
    .await;
    let dups = check(&cloudevents(&inbox), &expected);
    assert!(cuts >= 4);
    assert!(
        proxy.connections_accepted() > 1,
        "the sink reconnected after the cuts"
    );
    until("4000 delivered", || {
        a.view.sinks[0].progress().delivered >= 4000
    })
    .await;
    assert_eq!(a.view.sinks[0].progress().delivered, 4000);
    eprintln!("{cuts} cuts: {dups} re-sends");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_resends_only_the_same_ids_and_loses_nothing() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let inbox = subscribe(broker.addr(), "check-kill", false, "kill/#").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = write_config(
        dir.path(),
        &config(
            dir.path(),
            &format!("127.0.0.1:{port}"),
            &format!(
                "url = \"{}\"\ntopic = \"kill/{{stream}}\"\nbatch_max_events = 100\nmax_events_per_sec = 3000",
                broker.url()
            ),
        ),
    );
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let client = http_client();
    let mut accepted = HashSet::new();
    let mut next = 0usize;
    let mut kills = 0;
    let mut rng = rand::rng();
    while kills < 4 {
        let mut child = spawn(&path);
        // Post until the agent dies or a random moment after some publishes.
        let kill_after = inbox.lock().unwrap().len() + rng.random_range(100..600);
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no progress upstream");
            let batch = events("kill", next..next + 50, 3);
            match client
                .post(&url)
                .header("content-type", "application/cloudevents-batch+json")
                .body(Value::Array(batch).to_string())
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == 202 => {
                    accepted.extend((next..next + 50).map(|i| format!("kill-{i}")));
                    next += 50;
                }
                // Not listening yet (starting up).
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            if inbox.lock().unwrap().len() >= kill_after {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    // A last run drains what is left.
    let mut child = spawn(&path);
    until("every accepted id upstream", || {
        let ids: HashSet<String> = cloudevents(&inbox)
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        accepted.is_subset(&ids)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let received = cloudevents(&inbox);
    let dups = check(&received, &accepted);
    // Re-sends are whole copies of events already upstream.
    let mut by_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for ce in &received {
        by_id
            .entry(ce["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(ce);
    }
    for (id, copies) in &by_id {
        assert!(
            copies.iter().all(|c| *c == copies[0]),
            "{id}: copies differ"
        );
        assert!(accepted.contains(id), "{id} was never accepted");
    }
    eprintln!(
        "{kills} SIGKILLs: {} ids accepted, {} publishes, {dups} re-sends",
        accepted.len(),
        received.len()
    );
}
