//! What the tests of the MQTT source share: its config section, an agent
//! started with it, and a pipelined QoS 1/2 publisher that returns what the
//! broker acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plantrelay::agent::{self, RunningAgent};
use plantrelay::event::StoredEvent;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};

use super::agent::{Harness, source_status, wait_connected};

/// A `[[sources.mqtt]]` section.
/// Machine-state messages `n` in `ns` over `topics` topics
/// (`<prefix>/m<t>/state`), in publish order: every topic's `n` before the
/// next `n`. About 180 bytes each.
pub fn json_messages(prefix: &str, topics: usize, ns: Range<usize>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(topics * ns.len());
    for n in ns {
        for t in 0..topics {
            let payload = json!({
                "machine": format!("m{t}"),
                "n": n,
                "state": "running",
                "pad": "x".repeat(120),
            });
            out.push((
                format!("{prefix}/m{t}/state"),
                payload.to_string().into_bytes(),
            ));
        }
    }
    out
}

/// Per stream, the `n` of the stored [`json_messages`] in journal order
/// (events without one, such as probes, left out).
pub fn per_stream_n(events: &[StoredEvent]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in events {
        let v: Value = serde_json::from_slice(&e.data).unwrap();
        if let Some(n) = v["n"].as_u64() {
            out.entry(e.stream.clone()).or_default().push(n);
        }
    }
    out
}

pub fn source_toml(name: &str, url: &str, topics: &[&str], extra: &str) -> String {
    let topics: Vec<String> = topics.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "\n[[sources.mqtt]]\nname = \"{name}\"\nurl = \"{url}\"\ntopics = [{}]\n{extra}\n",
        topics.join(", ")
    )
}

/// Publishes `messages` (topic, payload) with `qos` over one connection, up
/// to `inflight` unacknowledged, optionally paced; returns the messages the
/// broker acknowledged (PUBACK, or PUBCOMP for QoS 2), in publish order per
/// topic. Panics if the connection fails or nothing happens for 90 s.
pub async fn publish_pipelined(
    broker: SocketAddr,
    client_id: &str,
    qos: QoS,
    inflight: u16,
    messages: Vec<(String, Vec<u8>)>,
    per_sec: Option<f64>,
) -> Vec<(String, Vec<u8>)> {
    const STALL: Duration = Duration::from_secs(90);
    let mut o = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    o.set_keep_alive(Duration::from_secs(10))
        .set_inflight(inflight)
        .set_max_packet_size(32 << 20, 32 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    let total = messages.len();
    type Sent = Arc<Mutex<VecDeque<(String, Vec<u8>)>>>;
    let order: Sent = Arc::new(Mutex::new(VecDeque::new()));
    let producer = {
        let order = order.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            for (i, (topic, payload)) in messages.into_iter().enumerate() {
                if let Some(rate) = per_sec {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                order
                    .lock()
                    .unwrap()
                    .push_back((topic.clone(), payload.clone()));
                client.publish(topic, qos, false, payload).await.unwrap();
            }
            client
        })
    };
    let mut pending: HashMap<u16, (String, Vec<u8>)> = HashMap::new();
    let mut acked = Vec::with_capacity(total);
    while acked.len() < total {
        match tokio::time::timeout(STALL, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                let m = order.lock().unwrap().pop_front().unwrap();
                pending.insert(pkid, m);
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                acked.push(pending.remove(&a.pkid).unwrap());
            }
            Ok(Ok(Event::Incoming(Packet::PubComp(c)))) => {
                acked.push(pending.remove(&c.pkid).unwrap());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            Err(_) => panic!("publisher stalled"),
        }
    }
    let _client = producer.await.unwrap();
    acked
}

/// Starts an agent with the harness's config plus `sources` and waits until
/// each source of `names` is connected (an MQTT source: subscribed), at
/// most 10 s each.
pub async fn start_subscribed(h: &Harness, sources: &str, names: &[&str]) -> RunningAgent {
    let a = agent::start(&h.config_with_sources(sources)).await.unwrap();
    for name in names {
        assert!(
            wait_connected(&source_status(&a, name), true, Duration::from_secs(10))
                .await
                .is_some(),
            "source {name} not connected within 10 s"
        );
    }
    a
}

/// A journal that fills under an MQTT source `line` (of agent `a`, on
/// `broker`) while the harness's receiver is stopped: publishes 1,500
/// messages of 16 KiB (the broker acknowledges every one), waits until the
/// source reports an error containing `full` (it holds its acks and
/// retries), restarts the receiver and checks that every acknowledged
/// message arrives, in order. Returns how many were stored before the
/// journal filled, and the total.
pub async fn fill_hold_and_drain(
    h: &Harness,
    a: &RunningAgent,
    broker: SocketAddr,
    full: &str,
) -> (u64, u64) {
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;

    let s = source_status(a, "line");
    assert!(
        wait_connected(&s, true, Duration::from_secs(10))
            .await
            .is_some()
    );
    let total = 1500u64;
    let messages: Vec<(String, Vec<u8>)> = (0..total)
        .map(|n| {
            let payload = json!({"n": n, "pad": "x".repeat(16 * 1024)});
            (
                format!("full/m{}/state", n % 3),
                payload.to_string().into_bytes(),
            )
        })
        .collect();
    let acked = publish_pipelined(broker, "pub-full", QoS::AtLeastOnce, 100, messages, None).await;
    assert_eq!(acked.len() as u64, total);

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let err = s.snapshot().last_error.unwrap_or_default();
        if err.contains(full) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the journal never filled ({full:?}): {err:?}, {} stored",
            s.events.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored_while_full = s.events.load(Ordering::Relaxed);
    assert!(stored_while_full < total, "{stored_while_full}");

    // Upstream back: delivered rows are deleted, the appends go through,
    // the acks go out, the broker sends the rest.
    h.receiver.restart().await.unwrap();
    assert!(
        h.receiver
            .wait_until(Duration::from_secs(180), |v| v.unique_ids >= total)
            .await,
        "everything the broker acknowledged arrives upstream: {:?}\n{}",
        h.receiver.stats(),
        {
            let t = super::logs::text();
            let l: Vec<&str> = t.lines().collect();
            l[l.len().saturating_sub(60)..].join("\n")
        }
    );
    let received: HashSet<String> = h.receiver.ids().into_iter().map(|(_, id)| id).collect();
    for (topic, payload) in &acked {
        assert!(received.contains(&plantrelay::sources::mqtt::content_id(topic, payload, None)));
    }
    let v = h.receiver.verdict();
    assert_eq!((v.out_of_order, v.missing), (0, 0), "{v:?}");
    (stored_while_full, total)
}
