//! The MQTT source against a real broker in process (rumqttd on loopback,
//! see `plantrelay::demo::machines::EmbeddedBroker`): bulk QoS 1 traffic in
//! per-topic order, connection cuts, a lost session, a dead link, bad
//! payloads, Sparkplug B, MQTT 5, a full journal that holds the acks, and
//! SIGKILLs of the real binary between receive and commit.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use plantrelay::agent::{self};
use plantrelay::config::Config;
use plantrelay::demo::machines::{AckedPublisher, EmbeddedBroker};
use plantrelay::event::StoredEvent;
use plantrelay::journal::Reader;
use plantrelay::sources::mqtt::{REJECTED_EVENT_TYPE, content_id};
use plantrelay::sources::sparkplug::proto::Payload;
use plantrelay::sources::sparkplug::proto::payload::Metric;
use plantrelay::sources::sparkplug::proto::payload::metric::Value as MetricValue;
use prost::Message as _;
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use support::agent::{Harness, source_status, spawn, wait_connected};
use support::fault_proxy::FaultProxy;
use support::mqtt::{
    fill_hold_and_drain, json_messages, per_stream_n, publish_pipelined, source_toml,
    start_subscribed,
};
use support::upstream::until;

const WAIT: Duration = Duration::from_secs(90);
/// Unacknowledged publishes the test publisher keeps in flight.
const INFLIGHT: u16 = 100;

fn assert_stream_seqs_gap_free(events: &[StoredEvent]) {
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in events {
        let prev = last.insert(&e.stream, e.stream_seq).unwrap_or(0);
        assert_eq!(e.stream_seq, prev + 1, "stream {}", e.stream);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_qos1_messages_over_ten_topics_are_journaled_in_per_topic_order() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml("line", &broker.url(), &["plant/+/state"], ""),
        &["line"],
    )
    .await;

    let started = Instant::now();
    let acked = publish_pipelined(
        broker.addr(),
        "pub-10k",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("plant", 10, 0..1000),
        None,
    )
    .await;
    assert_eq!(acked.len(), 10_000);
    let events = h
        .wait_journal(Some("line"), WAIT, |e| e.len() >= 10_000)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(events.len(), 10_000, "all journaled, none twice");
    let streams = per_stream_n(&events);
    assert_eq!(streams.len(), 10);
    for (stream, ns) in &streams {
        assert_eq!(
            *ns,
            (0..1000).collect::<Vec<u64>>(),
            "{stream} in publish order"
        );
    }
    assert_stream_seqs_gap_free(&events);
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    for (topic, payload) in &acked {
        assert!(ids.contains(content_id(topic, payload, None).as_str()));
    }
    // The source counts after its append returns, so a reader of the
    // journal can see the rows a moment before the counter moves.
    let s = source_status(&a, "line");
    until("the source to count 10,000 events", || {
        s.events.load(Ordering::Relaxed) == 10_000
    })
    .await;
    assert!(s.last_event_us.load(Ordering::Relaxed) > 0);
    eprintln!(
        "10,000 QoS 1 messages published and journaled in {:.2}s",
        elapsed.as_secs_f64()
    );
    // And they go upstream, in order.
    assert!(
        h.receiver
            .wait_until(WAIT, |v| v.unique_ids >= 10_000)
            .await
    );
    let v = h.receiver.verdict();
    assert_eq!((v.out_of_order, v.missing), (0, 0), "{v:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_is_re_established_and_flowing_again_within_5s() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await;
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml(
            "line",
            &format!("mqtt://{}", proxy.addr()),
            &["cut/+/state"],
            "",
        ),
        &["line"],
    )
    .await;
    let s = source_status(&a, "line");

    let mut acked = publish_pipelined(
        broker.addr(),
        "pub-cut-1",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("cut", 2, 0..200),
        None,
    )
    .await;
    proxy.cut();
    // Published while the agent is cut off: the broker keeps them for the
    // persistent session.
    let during: Vec<_> = json_messages("cut", 2, 200..400);
    acked.extend(
        publish_pipelined(
            broker.addr(),
            "pub-cut-2",
            QoS::AtLeastOnce,
            INFLIGHT,
            during,
            None,
        )
        .await,
    );
    assert!(
        wait_connected(&s, false, Duration::from_millis(500))
            .await
            .is_some(),
        "the cut not noticed within 500 ms"
    );
    let back = Instant::now();
    proxy.pass();
    let events = h
        .wait_journal(Some("line"), Duration::from_secs(5), |e| e.len() >= 800)
        .await;
    let flowing_after = back.elapsed();
    assert_eq!(events.len(), 800, "flowing again within 5 s");
    let after: Vec<_> = json_messages("cut", 2, 400..500);
    acked.extend(
        publish_pipelined(
            broker.addr(),
            "pub-cut-3",
            QoS::AtLeastOnce,
            INFLIGHT,
            after,
            None,
        )
        .await,
    );
    let events = h
        .wait_journal(Some("line"), WAIT, |e| e.len() >= 1000)
        .await;
    assert_eq!(events.len(), 1000);
    for (stream, ns) in per_stream_n(&events) {
        assert_eq!(ns, (0..500).collect::<Vec<u64>>(), "{stream}");
    }
    eprintln!(
        "after the cut: {} acked by the broker, all journaled; flowing {:.2}s after the link came back",
        acked.len(),
        flowing_after.as_secs_f64()
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_on_the_broker_is_noticed_and_resubscribed() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml("line", &broker.url(), &["lost/+/state"], ""),
        &["line"],
    )
    .await;
    publish_pipelined(
        broker.addr(),
        "pub-lost-1",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("lost", 1, 0..100),
        None,
    )
    .await;
    h.wait_journal(Some("line"), WAIT, |e| e.len() >= 100).await;

    // Another client takes the agent's client id with a clean session: the
    // broker drops the agent and throws its session (and subscription) away.
    let mut o = MqttOptions::new(
        "plantrelay-gw-test-line",
        broker.addr().ip().to_string(),
        broker.addr().port(),
    );
    o.set_clean_session(true);
    let (intruder, mut el) = AsyncClient::new(o, 10);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    intruder.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    drop(el);

    // The agent comes back to a broker without its session: unless it
    // resubscribes, nothing more arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut published = 100;
    loop {
        let batch: Vec<_> = json_messages("lost", 1, published..published + 10);
        publish_pipelined(
            broker.addr(),
            "pub-lost-2",
            QoS::AtLeastOnce,
            INFLIGHT,
            batch,
            None,
        )
        .await;
        published += 10;
        let events = h
            .wait_journal(Some("line"), Duration::from_millis(500), |e| {
                e.iter().any(|x| {
                    serde_json::from_slice::<Value>(&x.data).unwrap()["n"]
                        .as_u64()
                        .is_some_and(|n| n >= 100)
                })
            })
            .await;
        if events.len() > 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no message after the session was lost"
        );
    }
    // Messages published while no session existed are lost on the broker;
    // everything after the resubscription arrives.
    let last = publish_pipelined(
        broker.addr(),
        "pub-lost-3",
        QoS::AtLeastOnce,
        INFLIGHT,
        vec![(
            "lost/m0/state".into(),
            json!({"n": 100_000}).to_string().into_bytes(),
        )],
        None,
    )
    .await;
    assert_eq!(last.len(), 1);
    let events = h
        .wait_journal(Some("line"), WAIT, |e| {
            e.iter().any(|x| x.data == br#"{"n":100000}"#)
        })
        .await;
    assert!(events.iter().any(|x| x.data == br#"{"n":100000}"#));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_link_is_detected_within_one_and_a_half_keep_alives() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let proxy = FaultProxy::start(broker.addr()).await;
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml(
            "line",
            &format!("mqtt://{}", proxy.addr()),
            &["dead/+/state"],
            "keep_alive = \"2s\"",
        ),
        &["line"],
    )
    .await;
    let s = source_status(&a, "line");
    publish_pipelined(
        broker.addr(),
        "pub-dead-1",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("dead", 1, 0..50),
        None,
    )
    .await;
    h.wait_journal(Some("line"), WAIT, |e| e.len() >= 50).await;

    // The far end looks alive (TCP stays up) but nothing comes back.
    proxy.blackhole();
    let since = Instant::now();
    while s.connected.load(Ordering::Relaxed) {
        assert!(
            since.elapsed() < Duration::from_secs(6),
            "dead link not noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = since.elapsed();
    // Nothing was received at most keep_alive (2 s) before the blackhole
    // (the last PINGRESP), so 1.5 × keep_alive from then is at most 3 s.
    assert!(noticed <= Duration::from_millis(3_300), "{noticed:?}");
    let during: Vec<_> = json_messages("dead", 1, 50..100);
    publish_pipelined(
        broker.addr(),
        "pub-dead-2",
        QoS::AtLeastOnce,
        INFLIGHT,
        during,
        None,
    )
    .await;
    proxy.pass();
    let events = h.wait_journal(Some("line"), WAIT, |e| e.len() >= 100).await;
    assert_eq!(events.len(), 100);
    eprintln!(
        "dead link noticed after {:.2}s (keep_alive 2s)",
        noticed.as_secs_f64()
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_become_rejected_records_and_every_valid_one_arrives() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let sources = source_toml(
        "line",
        &broker.url(),
        &["bad/+/state"],
        "max_payload = \"4KiB\"\nid_pointer = \"/id\"",
    ) + &source_toml(
        "dropper",
        &broker.url(),
        &["drop/#"],
        "on_invalid = \"drop\"",
    );
    let a = start_subscribed(&h, &sources, &["line", "dropper"]).await;

    let mut messages = Vec::new();
    let mut rng = rand::rng();
    let mut bad_positions = HashSet::new();
    while bad_positions.len() < 100 {
        bad_positions.insert(rng.random_range(0..1100usize));
    }
    let mut valid = 0usize;
    for i in 0..1100usize {
        let topic = format!("bad/m{}/state", i % 5);
        let payload = if bad_positions.contains(&i) {
            match i % 4 {
                0 => format!("{{\"id\": \"x{i}\", broken").into_bytes(),
                1 => [&[0xff, 0xfe][..], &(i as u32).to_be_bytes()].concat(),
                2 => format!("{{\"n\": {i}}}").into_bytes(), // no id
                // Unique payloads: identical ones on one topic would be
                // one message to the dedup (content-derived ids).
                _ => format!("[{i}").into_bytes(),
            }
        } else {
            valid += 1;
            json!({"id": format!("ok-{i}"), "i": i})
                .to_string()
                .into_bytes()
        };
        messages.push((topic, payload));
    }
    messages.push(("bad/m0/state".into(), vec![b'['; 10 * 1024]));
    messages.push(("drop/x".into(), b"not json".to_vec()));
    messages.push(("drop/x".into(), b"{\"fine\":true}".to_vec()));
    let acked = publish_pipelined(
        broker.addr(),
        "pub-bad",
        QoS::AtLeastOnce,
        INFLIGHT,
        messages,
        None,
    )
    .await;
    assert_eq!(acked.len(), 1103);

    let events = h
        .wait_journal(Some("line"), WAIT, |e| e.len() >= 1101)
        .await;
    assert_eq!(events.len(), 1101);
    let rejected: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| e.event_type == REJECTED_EVENT_TYPE)
        .collect();
    assert_eq!(rejected.len(), 101);
    let ok: HashSet<&str> = events
        .iter()
        .filter(|e| e.event_type != REJECTED_EVENT_TYPE)
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ok.len(), valid);
    for i in (0..1100).filter(|i| !bad_positions.contains(i)) {
        assert!(ok.contains(format!("ok-{i}").as_str()), "ok-{i} missing");
    }
    let mut reasons = HashSet::new();
    for r in &rejected {
        let d: Value = serde_json::from_slice(&r.data).unwrap();
        let reason = d["reason"].as_str().unwrap();
        reasons.insert(reason.split(':').next().unwrap().to_owned());
        assert!(d["topic"].as_str().unwrap().starts_with("bad/"));
        let kept = base64::engine::general_purpose::STANDARD
            .decode(d["payload_base64"].as_str().unwrap())
            .unwrap();
        if reason.contains("exceeds max_payload") {
            assert_eq!(d["size"], 10 * 1024);
            assert_eq!(kept.len(), 10 * 1024, "under the keep limit");
        }
    }
    assert!(
        reasons.iter().any(|r| r.contains("not valid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no event id")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("exceeds max_payload")),
        "{reasons:?}"
    );
    // Per stream, rejected records keep their place in arrival order.
    assert_stream_seqs_gap_free(&events);
    let line = source_status(&a, "line");
    until("101 rejects counted", || {
        line.rejects.load(Ordering::Relaxed) == 101
    })
    .await;

    // on_invalid = "drop": counted, not journaled, acknowledged.
    let dropped = h
        .wait_journal(Some("dropper"), WAIT, |e| !e.is_empty())
        .await;
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].data, b"{\"fine\":true}");
    let dropper = source_status(&a, "dropper");
    until("the drop counted", || {
        dropper.rejects.load(Ordering::Relaxed) == 1
    })
    .await;
    a.shutdown().await;
}

/// A message whose data fails the schema of the source's type is invalid:
/// `on_invalid = "journal"` keeps it as a rejected record in its place,
/// `"drop"` counts it; both are counted per type, and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_failing_its_schema_follows_on_invalid_and_is_counted_per_type() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let schema = h.state_dir().parent().unwrap().join("state.v1.json");
    std::fs::write(
        &schema,
        r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object",
            "required":["state"],"properties":{"state":{"enum":["running","stopped"]}}}"#,
    )
    .unwrap();
    let sources = source_toml(
        "line",
        &broker.url(),
        &["keep/+/state"],
        "type = \"plant.state.v1\"",
    ) + &source_toml(
        "dropper",
        &broker.url(),
        &["drop/+/state"],
        "type = \"plant.state.v1\"\non_invalid = \"drop\"",
    ) + &format!(
        "\n[[schemas]]\ntype = \"plant.state.v1\"\nfile = \"{}\"\n",
        schema.display()
    );
    let a = start_subscribed(&h, &sources, &["line", "dropper"]).await;
    // Subscribed once a probe arrives (the same payload is one event).
    for (source, topic) in [
        ("line", "keep/probe/state"),
        ("dropper", "drop/probe/state"),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = vec![(topic.to_owned(), br#"{"state":"stopped"}"#.to_vec())];
            publish_pipelined(
                broker.addr(),
                "pub-probe",
                QoS::AtLeastOnce,
                INFLIGHT,
                probe,
                None,
            )
            .await;
            let got = h
                .wait_journal(Some(source), Duration::from_millis(200), |e| !e.is_empty())
                .await;
            if !got.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{source} never subscribed");
        }
    }

    let mut messages = Vec::new();
    for i in 0..40 {
        let state = if i % 4 == 3 { "exploded" } else { "running" };
        let payload = json!({"state": state, "i": i}).to_string().into_bytes();
        messages.push((format!("keep/m{}/state", i % 2), payload.clone()));
        messages.push((format!("drop/m{}/state", i % 2), payload));
    }
    let acked = publish_pipelined(
        broker.addr(),
        "pub-schema",
        QoS::AtLeastOnce,
        INFLIGHT,
        messages,
        None,
    )
    .await;
    assert_eq!(acked.len(), 80, "every message is acknowledged");

    let kept = h.wait_journal(Some("line"), WAIT, |e| e.len() >= 41).await;
    assert_eq!(kept.len(), 41);
    let rejected: Vec<&StoredEvent> = kept
        .iter()
        .filter(|e| e.event_type == REJECTED_EVENT_TYPE)
        .collect();
    assert_eq!(rejected.len(), 10);
    for r in &rejected {
        let d: Value = serde_json::from_slice(&r.data).unwrap();
        let reason = d["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("data fails the schema of type \"plant.state.v1\": /state:"),
            "{reason}"
        );
    }
    assert_stream_seqs_gap_free(&kept);
    let dropped = h
        .wait_journal(Some("dropper"), WAIT, |e| e.len() >= 31)
        .await;
    assert_eq!(dropped.len(), 31, "30 valid and the probe");
    assert!(dropped.iter().all(|e| e.event_type == "plant.state.v1"));
    for (name, n) in [("line", 10), ("dropper", 10)] {
        let st = source_status(&a, name);
        until(&format!("{name} to count {n} schema rejects"), || {
            st.snapshot()
                .schema_rejects
                .iter()
                .map(|r| r.events)
                .sum::<u64>()
                == n
        })
        .await;
        let s = st.snapshot();
        assert_eq!(s.rejects, n, "{name}");
        assert_eq!(s.schema_rejects.len(), 1, "{name}");
        assert_eq!(
            (
                s.schema_rejects[0].event_type.as_str(),
                s.schema_rejects[0].events
            ),
            ("plant.state.v1", n),
            "{name}"
        );
    }
    a.shutdown().await;
}

fn spb_metric(name: Option<&str>, alias: u64, datatype: Option<u32>, v: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias: Some(alias),
        datatype,
        value: Some(v),
        ..Default::default()
    }
}

fn spb_payload(seq: u64, ts: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(ts),
        metrics,
        seq: Some(seq),
        ..Default::default()
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_birth_and_data_are_decoded_with_metric_names_from_the_aliases() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml(
            "edge",
            &broker.url(),
            &["spBv1.0/plant/#"],
            "format = \"sparkplug_b\"",
        ),
        &["edge"],
    )
    .await;
    let mut p = AckedPublisher::new(broker.addr(), "edge-node");
    let ts = 1_764_409_200_000u64;
    let t = Duration::from_secs(10);
    p.publish(
        "spBv1.0/plant/NBIRTH/line3",
        spb_payload(
            0,
            ts,
            vec![
                spb_metric(Some("bdSeq"), 0, Some(8), MetricValue::LongValue(3)),
                spb_metric(Some("Line/Speed"), 1, Some(3), MetricValue::IntValue(12)),
            ],
        ),
        t,
    )
    .await
    .unwrap();
    p.publish(
        "spBv1.0/plant/DBIRTH/line3/press07",
        spb_payload(
            1,
            ts + 1,
            vec![
                spb_metric(
                    Some("Temperature"),
                    10,
                    Some(10),
                    MetricValue::DoubleValue(20.0),
                ),
                spb_metric(
                    Some("State"),
                    11,
                    Some(12),
                    MetricValue::StringValue("idle".into()),
                ),
            ],
        ),
        t,
    )
    .await
    .unwrap();
    // The broker orders per topic only: let the births land first.
    h.wait_journal(Some("edge"), WAIT, |e| e.len() >= 2).await;
    p.publish(
        "spBv1.0/plant/DDATA/line3/press07",
        spb_payload(
            2,
            ts + 2,
            vec![
                spb_metric(None, 10, None, MetricValue::DoubleValue(61.5)),
                spb_metric(None, 11, None, MetricValue::StringValue("running".into())),
            ],
        ),
        t,
    )
    .await
    .unwrap();
    p.publish(
        "spBv1.0/plant/NDATA/line3",
        spb_payload(
            3,
            ts + 3,
            vec![spb_metric(
                None,
                1,
                None,
                MetricValue::IntValue((-4i32) as u32),
            )],
        ),
        t,
    )
    .await
    .unwrap();
    p.publish(
        "spBv1.0/plant/DDATA/line3/press07",
        vec![0xff, 0x01, 0x02],
        t,
    )
    .await
    .unwrap();

    let events = h.wait_journal(Some("edge"), WAIT, |e| e.len() >= 5).await;
    assert_eq!(events.len(), 5);
    let by_id: HashMap<&str, &StoredEvent> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let ddata = by_id[format!("spb:plant/line3/press07:DDATA:2:{}", ts + 2).as_str()];
    assert_eq!(ddata.stream, "plant/line3/press07");
    assert_eq!(
        ddata.source_time.as_deref(),
        Some("2025-11-29T09:40:00.002Z")
    );
    let d: Value = serde_json::from_slice(&ddata.data).unwrap();
    assert_eq!(d["message_type"], "DDATA");
    assert_eq!(d["metrics"][0]["name"], "Temperature");
    assert_eq!(d["metrics"][0]["datatype"], "Double");
    assert_eq!(d["metrics"][0]["value"], 61.5);
    assert_eq!(d["metrics"][1]["name"], "State");
    assert_eq!(d["metrics"][1]["value"], "running");
    let ndata = by_id[format!("spb:plant/line3:NDATA:3:{}", ts + 3).as_str()];
    assert_eq!(ndata.stream, "plant/line3");
    let d: Value = serde_json::from_slice(&ndata.data).unwrap();
    assert_eq!(d["metrics"][0]["name"], "Line/Speed");
    assert_eq!(d["metrics"][0]["value"], -4, "Int32 is sign-corrected");
    let bad: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == REJECTED_EVENT_TYPE)
        .collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].stream, "plant/line3/press07");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_messages_are_journaled_and_acknowledged_with_their_properties_in_the_id() {
    use rumqttc::v5::mqttbytes::QoS as Qos5;
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let url = format!("mqtt://{}", broker.v5_addr());
    let a = start_subscribed(
        &h,
        &source_toml(
            "v5",
            &url,
            &["five/#"],
            "protocol = \"v5\"\nmax_inflight = 20",
        ),
        &["v5"],
    )
    .await;

    let mut o = rumqttc::v5::MqttOptions::new(
        "pub-v5",
        broker.v5_addr().ip().to_string(),
        broker.v5_addr().port(),
    );
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 1000);
    let props = PublishProperties {
        user_properties: vec![("line".into(), "3".into())],
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    let n = 500;
    let publisher = tokio::spawn({
        let props = props.clone();
        async move {
            for i in 0..n {
                client
                    .publish_with_properties(
                        "five/a",
                        Qos5::AtLeastOnce,
                        false,
                        json!({"n": i}).to_string(),
                        props.clone(),
                    )
                    .await
                    .unwrap();
            }
            client
        }
    });
    let mut acks = 0;
    while acks < n {
        if let rumqttc::v5::Event::Incoming(P5::PubAck(_)) = el.poll().await.unwrap() {
            acks += 1;
        }
    }
    let _client = publisher.await.unwrap();
    let events = h.wait_journal(Some("v5"), WAIT, |e| e.len() >= n).await;
    assert_eq!(events.len(), n);
    let props_in_id = plantrelay::sources::mqtt::Properties {
        content_type: Some("application/json".into()),
        user_properties: vec![("line".into(), "3".into())],
        ..Default::default()
    };
    assert_eq!(
        events[0].id,
        content_id("five/a", br#"{"n":0}"#, Some(&props_in_id))
    );
    assert_ne!(events[0].id, content_id("five/a", br#"{"n":0}"#, None));
    let ns: Vec<u64> = per_stream_n(&events).remove("five/a").unwrap();
    assert_eq!(ns, (0..n as u64).collect::<Vec<_>>());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_receive_and_commit_loses_nothing_the_broker_acknowledged() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "",
            &source_toml(
                "line",
                &broker.url(),
                &["crash/+/state"],
                "max_inflight = 200",
            ),
        )
        .replace("sync = \"normal\"", "sync = \"full\"");
    let config_path = h.write_config(&text);

    // A first life creates the persistent session and its subscription
    // (the broker keeps nothing for a session that does not exist yet).
    let mut child = spawn(&config_path);
    let probe = (
        "crash/probe/state".to_owned(),
        json!({"n": 0, "probe": true}).to_string().into_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        publish_pipelined(
            broker.addr(),
            "pub-probe",
            QoS::AtLeastOnce,
            INFLIGHT,
            vec![probe.clone()],
            None,
        )
        .await;
        let seen = h
            .wait_journal(Some("line"), Duration::from_millis(500), |e| !e.is_empty())
            .await;
        if !seen.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never subscribed");
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The publisher streams 30,000 messages at ~3,000/s while the agent is
    // killed with SIGKILL every 0.4–1.2 s and restarted.
    let messages = json_messages("crash", 10, 0..3000);
    let total = messages.len();
    let publisher = tokio::spawn(publish_pipelined(
        broker.addr(),
        "pub-crash",
        QoS::AtLeastOnce,
        INFLIGHT,
        messages,
        Some(3000.0),
    ));
    let mut kills = 0;
    let mut rng = rand::rng();
    while !publisher.is_finished() {
        let mut child = spawn(&config_path);
        let life = Duration::from_millis(rng.random_range(400..1200));
        // A random moment of the agent's life is the SIGKILL's subject.
        tokio::time::sleep(life).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let acked = publisher.await.unwrap();
    assert_eq!(acked.len(), total);

    // A last life drains what the broker still holds for the session.
    let mut child = spawn(&config_path);
    let events = h
        .wait_journal(Some("line"), Duration::from_secs(120), |e| e.len() > total)
        .await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());

    let events: Vec<StoredEvent> = events
        .into_iter()
        .filter(|e| e.stream != "crash/probe/state")
        .collect();
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let lost: Vec<&(String, Vec<u8>)> = acked
        .iter()
        .filter(|(t, p)| !ids.contains(content_id(t, p, None).as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} broker-acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.iter()
            .take(5)
            .map(|(t, p)| format!("{t} {}", String::from_utf8_lossy(&p[..p.len().min(30)])))
            .collect::<Vec<_>>()
    );
    assert_eq!(events.len(), total, "every message journaled exactly once");
    for (stream, ns) in per_stream_n(&events) {
        assert_eq!(ns, (0..3000).collect::<Vec<u64>>(), "{stream} in order");
    }
    assert_stream_seqs_gap_free(&events);
    let stats = Reader::open(&h.state_dir().join("journal.db"))
        .unwrap()
        .stats()
        .unwrap();
    eprintln!(
        "SIGKILL test: {kills} kills while {total} QoS 1 messages flowed; all {total} broker-acknowledged messages journaled once, in order; stats: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_holds_the_acks_and_the_broker_keeps_the_rest_until_space_frees() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    // Nothing is delivered while the upstream is down, so nothing can be
    // deleted: 16 MiB fill up.
    h.receiver.stop().await;
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "",
            &source_toml("line", &broker.url(), &["full/+/state"], ""),
        )
        .replace(
            "sync = \"normal\"",
            "sync = \"normal\"\nmax_size = \"16MiB\"\nblock_timeout = \"1s\"\nretain_acked = \"0s\"",
        );
    let a = agent::start(&Config::load(&h.write_config(&text)).unwrap())
        .await
        .unwrap();
    let (stored_while_full, total) = fill_hold_and_drain(&h, &a, broker.addr(), "full").await;
    eprintln!(
        "journal full: {stored_while_full} of {total} stored before the journal filled; all {total} delivered after space was freed"
    );
    a.shutdown().await;
}
