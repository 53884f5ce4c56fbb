//! Hostile input: Sparkplug B. Anyone who can publish to the plant broker can
//! send the agent a payload that expands (a 1 MiB NDATA of 524k empty
//! metrics) or births to ever new edge nodes with large alias tables. The
//! real binary runs against an in-process broker, its memory is read from
//! /proc, and a well-behaved edge node publishes before, during and after
//! the attack: every one of its messages must be journaled, decoded.

use std::time::{Duration, Instant};

use plantrelay::demo::machines::{AckedPublisher, EmbeddedBroker};
use plantrelay::event::StoredEvent;
use plantrelay::sources::mqtt::REJECTED_EVENT_TYPE;
use plantrelay::sources::sparkplug::proto::Payload;
use plantrelay::sources::sparkplug::proto::payload::Metric;
use plantrelay::sources::sparkplug::proto::payload::metric::Value as MetricValue;
use prost::Message as _;
use serde_json::Value;

use crate::support::agent::{Harness, KillOnDrop, spawn};
use crate::support::proc_status_kib;

const TS: u64 = 1_764_409_200_000;
const PUBLISH: Duration = Duration::from_secs(30);

/// The real binary with one Sparkplug B source `edge` on the broker.
struct Agent(KillOnDrop);

impl Agent {
    fn spawn(h: &Harness, broker: &EmbeddedBroker) -> Agent {
        let source = format!(
            "\n[[sources.mqtt]]\nname = \"edge\"\nurl = \"{}\"\ntopics = [\"spBv1.0/#\"]\n\
             format = \"sparkplug_b\"\nmax_inflight = 10\n",
            broker.url()
        );
        let text = h.config_text("127.0.0.1:0", &h.receiver.url(), "", &source);
        Agent(KillOnDrop(spawn(&h.write_config(&text))))
    }

    /// (VmHWM, VmRSS) in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        let mib = |field| proc_status_kib(self.0.0.id(), field) as f64 / 1024.0;
        (mib("VmHWM"), mib("VmRSS"))
    }
}

fn metric(name: Option<&str>, alias: u64, v: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias: Some(alias),
        datatype: name.map(|_| 10),
        value: Some(v),
        ..Default::default()
    }
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(TS + seq),
        metrics,
        seq: Some(seq),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The well-behaved edge node `plant/good`: a birth with three aliased
/// metrics, then data by alias only.
struct GoodNode {
    publisher: AckedPublisher,
    seq: u64,
    data: u64,
}

impl GoodNode {
    fn birth() -> Vec<u8> {
        payload(
            0,
            vec![
                metric(Some("Speed"), 1, MetricValue::DoubleValue(0.0)),
                metric(Some("Count"), 2, MetricValue::DoubleValue(0.0)),
                metric(Some("Temp"), 3, MetricValue::DoubleValue(20.0)),
            ],
        )
    }

    async fn data(&mut self) {
        self.seq += 1;
        self.data += 1;
        let p = payload(
            self.seq,
            vec![
                metric(None, 1, MetricValue::DoubleValue(self.seq as f64)),
                metric(None, 3, MetricValue::DoubleValue(61.5)),
            ],
        );
        self.publisher
            .publish("spBv1.0/plant/NDATA/good", p, PUBLISH)
            .await
            .unwrap();
    }
}

/// Starts the agent and the good node; returns once the agent has journaled
/// the good node's birth (so it is subscribed) and its memory has settled.
async fn start(h: &Harness, broker: &EmbeddedBroker) -> (Agent, GoodNode) {
    let agent = Agent::spawn(h, broker);
    let mut good = GoodNode {
        publisher: AckedPublisher::new(broker.addr(), "good-node"),
        seq: 0,
        data: 0,
    };
    // Published until it arrives: the agent subscribes some time after start.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        good.publisher
            .publish("spBv1.0/plant/NBIRTH/good", GoodNode::birth(), PUBLISH)
            .await
            .unwrap();
        let seen = h
            .wait_journal(None, Duration::from_millis(500), |e| !e.is_empty())
            .await;
        if !seen.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never subscribed");
    }
    (agent, good)
}

/// Every NDATA of the good node is journaled as a decoded event, names
/// resolved from its birth.
fn assert_good_node_complete(events: &[StoredEvent], expected: u64) {
    let good: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| e.stream == "plant/good" && e.id.contains(":NDATA:"))
        .collect();
    assert_eq!(good.len() as u64, expected, "every good NDATA journaled");
    for e in good {
        assert_ne!(e.event_type, REJECTED_EVENT_TYPE, "{}", e.id);
        let d: Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(d["metrics"][0]["name"], "Speed", "{}", e.id);
        assert_eq!(d["metrics"][1]["name"], "Temp", "{}", e.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_ndata_of_empty_metrics_is_refused_before_it_is_expanded() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let (agent, mut good) = start(&h, &broker).await;
    for _ in 0..3 {
        good.data().await;
    }
    h.wait_journal(None, PUBLISH, |e| e.len() >= 4).await;
    let (_, before_rss) = agent.memory_mib();

    // 524,280 empty metrics: 2 bytes each on the wire, just under 1 MiB
    // (max_payload); five of them, each with its own seq.
    const BOMBS: u64 = 5;
    let mut attacker = AckedPublisher::new(broker.addr(), "attacker");
    for i in 0..BOMBS {
        let bomb = Payload {
            timestamp: Some(TS),
            metrics: vec![Metric::default(); 524_280],
            seq: Some(1000 + i),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        attacker
            .publish("spBv1.0/plant/NDATA/evil", bomb, PUBLISH)
            .await
            .unwrap();
        good.data().await;
    }
    for _ in 0..3 {
        good.data().await;
    }
    let expected = good.data;
    let events = h
        .wait_journal(None, Duration::from_secs(60), |e| {
            e.iter()
                .filter(|e| e.event_type == REJECTED_EVENT_TYPE)
                .count() as u64
                >= BOMBS
                && e.iter().filter(|e| e.stream == "plant/good").count() as u64 > expected
        })
        .await;
    let (hwm, rss) = agent.memory_mib();
    eprintln!(
        "1 MiB NDATA bomb ×{BOMBS}: agent VmRSS {before_rss:.1} MiB before, VmHWM {hwm:.1} MiB, VmRSS {rss:.1} MiB after"
    );

    let rejected: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| e.event_type == REJECTED_EVENT_TYPE)
        .collect();
    assert_eq!(rejected.len() as u64, BOMBS);
    for r in &rejected {
        assert_eq!(r.stream, "plant/evil");
        let d: Value = serde_json::from_slice(&r.data).unwrap();
        let reason = d["reason"].as_str().unwrap();
        assert!(reason.contains("sparkplug_max_metrics"), "{reason}");
        assert!(reason.contains("refused before decoding"), "{reason}");
    }
    let largest = events.iter().map(|e| e.data.len()).max().unwrap();
    assert!(
        largest < 128 * 1024,
        "largest stored event {largest} bytes (a rejected record keeps 64 KiB of payload)"
    );
    assert_good_node_complete(&events, expected);
    // Decoded, the five bombs took over 400 MiB each time; refused on the
    // wire they cost their 1 MiB of payload and a 64 KiB rejected record.
    assert!(
        hwm - before_rss < 48.0,
        "VmHWM {hwm:.1} MiB, {:.1} MiB over the VmRSS before the bombs ({before_rss:.1} MiB)",
        hwm - before_rss
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_to_sixty_edge_nodes_with_ten_thousand_aliases_each_keep_memory_bounded() {
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    let (agent, mut good) = start(&h, &broker).await;
    for _ in 0..3 {
        good.data().await;
    }
    h.wait_journal(None, PUBLISH, |e| e.len() >= 4).await;
    let (_, before_rss) = agent.memory_mib();

    // Each birth: 10,000 aliased metrics with 40-byte names, about 560 KB
    // on the wire, within every per-message limit; 60 edge nodes, more than
    // the 64 MiB alias memory holds (about 2.7 MiB counted per node).
    const NODES: u64 = 60;
    let mut attacker = AckedPublisher::new(broker.addr(), "attacker");
    for n in 0..NODES {
        let metrics = (0..10_000u64)
            .map(|a| {
                metric(
                    Some(&format!("Area{n:03}/Line/Cell/Machine/Tag{a:015}")),
                    a,
                    MetricValue::DoubleValue(a as f64),
                )
            })
            .collect();
        attacker
            .publish(
                &format!("spBv1.0/plant/NBIRTH/evil{n:03}"),
                payload(0, metrics),
                PUBLISH,
            )
            .await
            .unwrap();
        // The good node publishes between the births: it stays among the
        // most recently used and keeps its names.
        good.data().await;
    }
    for _ in 0..3 {
        good.data().await;
    }
    let expected = good.data;
    let events = h
        .wait_journal(None, Duration::from_secs(120), |e| {
            e.iter().filter(|e| e.id.contains(":NBIRTH:")).count() as u64 > NODES
                && e.iter().filter(|e| e.stream == "plant/good").count() as u64 > expected
        })
        .await;
    let (hwm, rss) = agent.memory_mib();
    eprintln!(
        "{NODES} NBIRTHs × 10,000 aliases: agent VmRSS {before_rss:.1} MiB before, VmHWM {hwm:.1} MiB, VmRSS {rss:.1} MiB after"
    );
    assert_eq!(
        events.iter().filter(|e| e.id.contains(":NBIRTH:")).count() as u64,
        NODES + 1,
        "every birth is journaled (each is within the per-message limits)"
    );
    assert_good_node_complete(&events, expected);
    // The alias tables are held to 64 MiB (counted approximately); the
    // decoding of one birth at a time, its journal write and what the
    // allocator keeps of both come on top (measured: +142 MiB in a debug
    // build), so 192 MiB is the bound. Without the bound the tables alone
    // grew by over 400 MiB for 30 births and never gave it back.
    assert!(
        rss - before_rss < 192.0,
        "VmRSS {rss:.1} MiB, {:.1} MiB over the {before_rss:.1} MiB before the births",
        rss - before_rss
    );
    assert!(hwm - before_rss < 240.0, "VmHWM {hwm:.1} MiB");
}

/// The OPC UA source's queue to the journal: async-opcua acknowledges
/// notifications itself, so a blocked journal must not grow memory without
/// limit. With the journal full under `when_full = "block"` (and no sink to
/// drain it), data changes keep coming; at `max_queued_changes` the queue
/// keeps only the newest value per node and counts what it drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_journal_bounds_the_opc_ua_queue_and_counts_what_it_coalesces() {
    use std::sync::atomic::Ordering;

    use crate::support::agent::{http_client, post};
    use crate::support::opcua_server::{NO_SECURITY, SimPress, press_options, press_source_toml};
    use plantrelay::agent;
    use plantrelay::config::Config;
    use serde_json::json;

    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(20);
    let press = SimPress::start(&opts).await.unwrap();
    let source = press_source_toml(
        "press",
        &press.endpoint(),
        &format!("{NO_SECURITY}\nmax_queued_changes = 100"),
    );
    // No upstream: nothing is delivered, so nothing leaves the journal.
    let text = h
        .config_text("127.0.0.1:0", "https://127.0.0.1:9/v1/events", "", &source)
        .replace(
            "sync = \"normal\"",
            "sync = \"normal\"\nmax_size = \"16MiB\"\nwhen_full = \"block\"\nblock_timeout = \"100ms\"",
        );
    let cfg = Config::load(&h.write_config(&text)).unwrap();
    let a = agent::start(&cfg).await.unwrap();
    let st = a
        .view
        .sources
        .iter()
        .find(|s| s.name == "press")
        .cloned()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while st.events.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "{:?}", st.snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Fill the journal through HTTP ingest until it refuses (503), with
    // smaller events each time: what a refused 3 MiB event leaves free
    // would hold the press's changes for a minute.
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let client = http_client();
    for (size, count) in [(3 << 20, 20), (256 << 10, 40), (16 << 10, 40)] {
        let pad = "x".repeat(size);
        let mut full = false;
        for i in 0..count {
            let event = json!({
                "specversion": "1.0", "id": format!("fill-{size}-{i}"), "source": "urn:test",
                "type": "com.example.fill", "subject": "fill", "data": {"pad": pad},
            });
            let (code, _) = post(&client, &url, &[event]).await;
            if code == 503 {
                full = true;
                break;
            }
            assert_eq!(code, 202);
        }
        assert!(full, "the journal never refused an event of {size} bytes");
    }

    // Changes at 20 ms on three nodes: the bound of 100 is passed within
    // seconds; from then on superseded values are dropped and counted.
    let stored = st.events.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while st.dropped.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "{:?}", st.snapshot());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = st.snapshot();
    eprintln!(
        "blocked journal: {} data changes dropped (coalesced) at max_queued_changes = 100; {} stored before",
        snapshot.dropped, stored
    );
    assert!(snapshot.dropped >= 200);
    let view = a.view.clone();
    let report = tokio::task::spawn_blocking(move || view.status())
        .await
        .unwrap();
    let metrics = plantrelay::health::metrics::render(&report);
    let line = metrics
        .lines()
        .find(|l| l.starts_with("plantrelay_source_dropped_events_total{source=\"press\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let counted: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(counted >= 200.0, "{line}");
    a.shutdown().await;
    press.stop().await;
}
