//! The MQTT source against the system Mosquitto (Debian package), started
//! by each test on a free loopback port with its own config
//! (`max_queued_messages 0`: Mosquitto's default queue limit silently
//! drops QoS 1 messages to a slow subscriber). Run with
//! `cargo test --features interop --test it interop_mqtt::` (`.ci/run` does).
//!
//! Scenarios: TLS with a client certificate; a broker restart with
//! persistence (session kept) and without (session lost, resubscribed),
//! both flowing again within 5 s; SIGKILLs of the real binary; QoS 2
//! across connection cuts; MQTT 5 sessions.

#![cfg(feature = "interop")]

use crate::support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use plantrelay::agent::{self};
use plantrelay::event::StoredEvent;
use plantrelay::journal::Reader;
use plantrelay::sources::mqtt::content_id;
use rand::Rng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use support::agent::{Harness, source_status, spawn, wait_connected};
use support::fault_proxy::FaultProxy;
use support::mosquitto::Mosquitto;
use support::mqtt::{
    json_messages, per_stream_n, publish_pipelined, source_toml, start_subscribed,
};

const WAIT: Duration = Duration::from_secs(90);
/// Mosquitto takes up to max_inflight_messages (20) unacknowledged
/// publishes from a client and drops it when it sends more.
const INFLIGHT: u16 = 20;

fn assert_all_journaled(events: &[StoredEvent], acked: &[(String, Vec<u8>)]) {
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let lost = acked
        .iter()
        .filter(|(t, p)| !ids.contains(content_id(t, p, None).as_str()))
        .count();
    assert_eq!(
        lost, 0,
        "broker-acknowledged messages missing from the journal"
    );
}

fn write_pki(h: &Harness) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    let p = &h.paths;
    (
        p.ca.clone(),
        p.server_cert.clone(),
        p.server_key.clone(),
        p.client_cert.clone(),
        p.client_key.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_against_mosquitto() {
    let h = Harness::new().await;
    let (ca, cert, key, client_cert, client_key) = write_pki(&h);
    let m = Mosquitto::start(
        false,
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .await;
    let tls = format!(
        "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}",
        ca.display().to_string(),
        client_cert.display().to_string(),
        client_key.display().to_string()
    );
    // A second source without a client certificate must be refused.
    let sources = source_toml("tls", &m.url("mqtts"), &["tls/#"], &tls)
        + &source_toml(
            "nocert",
            &m.url("mqtts"),
            &["tls/#"],
            &format!("ca_file = {:?}", ca.display().to_string()),
        );
    let a = agent::start(&h.config_with_sources(&sources))
        .await
        .unwrap();
    let s = source_status(&a, "tls");
    assert!(
        wait_connected(&s, true, Duration::from_secs(10))
            .await
            .is_some(),
        "mutual TLS: {:?}\n{}",
        s.snapshot().last_error,
        m.log()
    );

    // Mosquitto's TLS listener needs a TLS publisher too: publish through
    // mosquitto_pub would add a dependency; use rumqttc with our rustls.
    let client_tls = h.paths.client_tls(true);
    let mut tls_cfg = plantrelay::tls::client_config(&client_tls).unwrap();
    tls_cfg.alpn_protocols.clear();
    let mut o = MqttOptions::new("pub-tls", "127.0.0.1", m.port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls_cfg)),
    ));
    let (client, mut el) = AsyncClient::new(o, 100);
    for i in 0..50 {
        client
            .publish(
                "tls/x",
                QoS::AtLeastOnce,
                false,
                json!({"n": i}).to_string(),
            )
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < 50 {
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
            acks += 1;
        }
    }
    let events = h.wait_journal(Some("tls"), WAIT, |e| e.len() >= 50).await;
    assert_eq!(events.len(), 50);
    let nocert = source_status(&a, "nocert");
    assert!(!nocert.connected.load(Ordering::Relaxed));
    assert!(nocert.snapshot().last_error.is_some());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restarted_with_persistence_keeps_the_session_and_flows_within_5s() {
    let mut m = Mosquitto::start(true, "").await;
    let h = Harness::new().await;
    let sources = source_toml("line", &m.url("mqtt"), &["per/+/state"], "")
        + &source_toml(
            "line5",
            &m.url("mqtt"),
            &["per5/+/state"],
            "protocol = \"v5\"",
        );
    let a = start_subscribed(&h, &sources, &["line", "line5"]).await;

    let mut acked = publish_pipelined(
        m.addr(),
        "pub-per-1",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("per", 5, 0..200),
        None,
    )
    .await;
    let mut acked5 = publish_pipelined(
        m.addr(),
        "pub-per5-1",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("per5", 2, 0..100),
        None,
    )
    .await;
    m.restart().await;
    let up = Instant::now();
    let after = publish_pipelined(
        m.addr(),
        "pub-per-2",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("per", 5, 200..210),
        None,
    )
    .await;
    acked.extend(after);
    acked5.extend(
        publish_pipelined(
            m.addr(),
            "pub-per5-2",
            QoS::AtLeastOnce,
            INFLIGHT,
            json_messages("per5", 2, 100..110),
            None,
        )
        .await,
    );
    let events = h
        .wait_journal(Some("line"), Duration::from_secs(5), |e| e.len() >= 1050)
        .await;
    let flowing = up.elapsed();
    assert_eq!(events.len(), 1050, "flowing within 5 s of the restart");
    let events5 = h
        .wait_journal(Some("line5"), Duration::from_secs(5), |e| e.len() >= 220)
        .await;
    assert_eq!(events5.len(), 220, "v5 session kept too");
    assert_all_journaled(&events, &acked);
    assert_all_journaled(&events5, &acked5);
    for (stream, ns) in per_stream_n(&events) {
        assert_eq!(ns, (0..210).collect::<Vec<u64>>(), "{stream}");
    }
    eprintln!(
        "restart with persistence: flowing {:.2}s after the broker was back",
        flowing.as_secs_f64()
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restarted_without_persistence_loses_the_session_and_the_agent_resubscribes() {
    let mut m = Mosquitto::start(false, "").await;
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml("line", &m.url("mqtt"), &["np/+/state"], ""),
        &["line"],
    )
    .await;
    publish_pipelined(
        m.addr(),
        "pub-np-1",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("np", 2, 0..100),
        None,
    )
    .await;
    h.wait_journal(Some("line"), WAIT, |e| e.len() >= 200).await;

    m.restart().await;
    let up = Instant::now();
    // Until the agent has resubscribed, the fresh broker drops what is
    // published (no subscriber): keep publishing until something arrives.
    let mut n = 100;
    loop {
        publish_pipelined(
            m.addr(),
            "pub-np-2",
            QoS::AtLeastOnce,
            INFLIGHT,
            json_messages("np", 2, n..n + 1),
            None,
        )
        .await;
        n += 1;
        let events = h
            .wait_journal(Some("line"), Duration::from_millis(100), |e| e.len() > 200)
            .await;
        if events.len() > 200 {
            break;
        }
        assert!(
            up.elapsed() < Duration::from_secs(5),
            "not resubscribed within 5 s"
        );
    }
    let resubscribed = up.elapsed();
    let acked = publish_pipelined(
        m.addr(),
        "pub-np-3",
        QoS::AtLeastOnce,
        INFLIGHT,
        json_messages("np", 2, 1000..1100),
        None,
    )
    .await;
    let events = h
        .wait_journal(Some("line"), WAIT, |e| {
            e.iter()
                .filter(|x| x.data.windows(8).any(|w| w == b"\"n\":1099"))
                .count()
                == 2
        })
        .await;
    assert_all_journaled(&events, &acked);
    eprintln!(
        "restart without persistence: resubscribed and flowing {:.2}s after the broker was back",
        resubscribed.as_secs_f64()
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_loses_nothing_mosquitto_acknowledged() {
    let m = Mosquitto::start(false, "max_inflight_messages 200\n").await;
    let h = Harness::new().await;
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "",
            &source_toml(
                "line",
                &m.url("mqtt"),
                &["crash/+/state"],
                "max_inflight = 200",
            ),
        )
        .replace("sync = \"normal\"", "sync = \"full\"");
    let config_path = h.write_config(&text);

    // A first life creates the session and its subscription.
    let mut child = spawn(&config_path);
    let probe = (
        "crash/probe/state".to_owned(),
        json!({"probe": true}).to_string().into_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        publish_pipelined(
            m.addr(),
            "probe",
            QoS::AtLeastOnce,
            INFLIGHT,
            vec![probe.clone()],
            None,
        )
        .await;
        if !h
            .wait_journal(Some("line"), Duration::from_millis(300), |e| !e.is_empty())
            .await
            .is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never subscribed");
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let messages = json_messages("crash", 10, 0..4000);
    let total = messages.len();
    let publisher = tokio::spawn(publish_pipelined(
        m.addr(),
        "pub-crash",
        QoS::AtLeastOnce,
        INFLIGHT,
        messages,
        Some(4000.0),
    ));
    let mut kills = 0;
    let mut rng = rand::rng();
    while !publisher.is_finished() {
        let mut child = spawn(&config_path);
        // A random moment of the agent's life is the SIGKILL's subject.
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let acked = publisher.await.unwrap();
    assert_eq!(acked.len(), total);
    let mut child = spawn(&config_path);
    let events = h
        .wait_journal(Some("line"), Duration::from_secs(120), |e| e.len() > total)
        .await;
    support::signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    let events: Vec<StoredEvent> = events
        .into_iter()
        .filter(|e| e.stream != "crash/probe/state")
        .collect();
    assert_all_journaled(&events, &acked);
    assert_eq!(events.len(), total, "each message journaled once");
    for (stream, ns) in per_stream_n(&events) {
        assert_eq!(ns, (0..4000).collect::<Vec<u64>>(), "{stream} in order");
    }
    let stats = Reader::open(&h.state_dir().join("journal.db"))
        .unwrap()
        .stats()
        .unwrap();
    eprintln!(
        "mosquitto SIGKILL test: {kills} kills, {total} acknowledged by mosquitto, {total} journaled once in order, {} redeliveries of already-committed messages dropped as duplicates",
        stats.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_subscriptions_survive_connection_cuts() {
    let m = Mosquitto::start(false, "").await;
    let proxy = FaultProxy::start(m.addr()).await;
    let h = Harness::new().await;
    let a = start_subscribed(
        &h,
        &source_toml(
            "q2",
            &format!("mqtt://{}", proxy.addr()),
            &[],
            "topics = [{ filter = \"q2/#\", qos = 2 }]",
        )
        .replace("topics = []\n", ""),
        &["q2"],
    )
    .await;
    let publisher = tokio::spawn(publish_pipelined(
        m.addr(),
        "pub-q2",
        QoS::ExactlyOnce,
        INFLIGHT,
        json_messages("q2", 4, 0..1500),
        Some(2000.0),
    ));
    // The faults' pacing: 600 ms of traffic, then a 200 ms cut, four times.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.pass();
    }
    let acked = match publisher.await {
        Ok(acked) => acked,
        Err(e) => panic!("{e}\nmosquitto log:\n{}", m.log()),
    };
    let events = h.wait_journal(Some("q2"), WAIT, |e| e.len() >= 6000).await;
    assert_all_journaled(&events, &acked);
    assert_eq!(events.len(), 6000);
    for (stream, ns) in per_stream_n(&events) {
        assert_eq!(ns, (0..1500).collect::<Vec<u64>>(), "{stream}");
    }
    a.shutdown().await;
}
