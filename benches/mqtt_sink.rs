//! `cargo bench --bench mqtt_sink`: the MQTT sink draining a pre-filled
//! journal into the system Mosquitto (QoS 1), against a plain rumqttc
//! publisher of the same CloudEvents to the same broker in the same run as
//! the ceiling. Prints a table; records go to BENCHMARKS.md by hand.
//!
//! - journal: 500k events (~200 B of data each), filled through
//!   `Journal::append` with the agent not running;
//! - agent: `agent::start` in process with one `[[sinks.mqtt]]` (defaults
//!   but `batch_linger`), from start until the sink's status says every
//!   event is delivered (PUBACKed); CPU is this process's (Mosquitto runs
//!   apart), per event;
//! - plain publisher: rumqttc's `AsyncClient`, 100 publishes in flight,
//!   every payload encoded beforehand, until the last PUBACK.
//!
//! `PLANTRELAY_BENCH_SCALE=0.1` shrinks the count; `PLANTRELAY_BENCH_DIR`
//! is where the temp dirs go (default ".").

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use plantrelay::agent;
use plantrelay::config::Config;
use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{Journal, Reader, SyncMode};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[path = "support/mod.rs"]
mod support;
use support::{clk_tck, process_ticks, scaled};

const EVENTS: u64 = 500_000;
const TARGET_RATE: f64 = 50_000.0;
const TARGET_SHARE: f64 = 0.70;

fn new_event(i: u64) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id: format!("ev-{i:09}"),
        stream: format!("line{}/press", i % 10),
        class: Class::Telemetry,
        event_type: "com.example.machine.state".into(),
        source_time: Some("2026-12-05T10:00:00.123Z".into()),
        data: format!(
            r#"{{"machine":"press-{:02}","state":"running","counter":{i},"temperature":{}.5,"pressure":{},"operator":"op-1234","shift":"B","order":"ORD-{:07}"}}"#,
            i % 10,
            20 + i % 50,
            100 + i % 7,
            i / 100
        )
        .into_bytes(),
        attrs: None,
    }
}

struct Mosquitto {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Child,
}

impl Mosquitto {
    async fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let conf = format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
        );
        std::fs::write(dir.path().join("m.conf"), conf).expect("conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("m.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Mosquitto {
            _dir: dir,
            addr,
            child,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &std::path::Path, broker: SocketAddr) -> Config {
    let text = format!(
        r#"
[agent]
id = "gw-bench"
state_dir = "{state}"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:0"

[[sinks.mqtt]]
name = "uns"
url = "mqtt://{broker}"
topic = "plantrelay/{{agent}}/{{stream}}"
"#,
        state = dir.join("state").display()
    );
    let path = dir.join("plantrelay.toml");
    std::fs::write(&path, text).expect("config");
    Config::load(&path).expect("config")
}

async fn fill(config: &Config, count: u64) {
    let mut opts = config.journal_options();
    opts.sync = SyncMode::Normal;
    let j = tokio::task::spawn_blocking(move || Journal::open(opts))
        .await
        .expect("open task")
        .expect("open journal");
    let mut i = 0;
    while i < count {
        let k = 1024.min(count - i);
        j.append((i..i + k).map(new_event).collect())
            .await
            .expect("append");
        i += k;
    }
    assert_eq!(j.stats().head_seq.load(Ordering::Relaxed), count);
    j.close().await;
}

struct Run {
    rate: f64,
    cpu_us: f64,
}

fn self_ticks() -> u64 {
    process_ticks(std::process::id())
}

async fn agent_drain(dir: &std::path::Path, broker: SocketAddr, count: u64, tck: f64) -> Run {
    let cfg = config(dir, broker);
    fill(&cfg, count).await;
    let t0 = self_ticks();
    let start = Instant::now();
    let a = agent::start(&cfg).await.expect("agent");
    let deadline = Instant::now() + Duration::from_secs(600);
    while a.view.sinks[0].progress().delivered < count {
        assert!(Instant::now() < deadline, "drain did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let ticks = self_ticks() - t0;
    a.shutdown().await;
    Run {
        rate: count as f64 / secs,
        cpu_us: ticks as f64 / tck * 1e6 / count as f64,
    }
}

/// The same CloudEvents, read back from the journal and encoded
/// beforehand, published by rumqttc with 100 in flight.
async fn plain(dir: &std::path::Path, broker: SocketAddr, count: u64, tck: f64) -> Run {
    let db = dir.join("state").join("journal.db");
    let reader = Reader::open(&db).expect("reader");
    let events = reader.events_from(0, count as usize).expect("events");
    let payloads: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let mut out = Vec::with_capacity(400);
            e.write_cloudevent("gw-bench", &mut out);
            (format!("plantrelay/gw-bench/{}", e.stream), out)
        })
        .collect();
    let mut opts = MqttOptions::new("plain-publisher", broker.ip().to_string(), broker.port());
    opts.set_inflight(100);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let t0 = self_ticks();
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in payloads {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0u64;
    let mut sent = 0u64;
    while acked < count {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(Event::Outgoing(Outgoing::Publish(_))) => sent += 1,
            Ok(_) => {}
            Err(e) => panic!("plain publisher: {e} after {sent} sent, {acked} acked"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let ticks = self_ticks() - t0;
    let _client = publisher.await.expect("publisher");
    Run {
        rate: count as f64 / secs,
        cpu_us: ticks as f64 / tck * 1e6 / count as f64,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    plantrelay::tls::install_crypto_provider();
    let tck = clk_tck();
    let count = scaled(EVENTS, 1000);
    println!(
        "date: {}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    println!(
        "nproc: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("events: {count}");
    let base = std::env::var("PLANTRELAY_BENCH_DIR").unwrap_or_else(|_| ".".into());
    let dir = tempfile::Builder::new()
        .prefix("plantrelay-bench-mqtt-sink-")
        .tempdir_in(base)
        .expect("tempdir");
    let broker = Mosquitto::start().await;
    let agent = agent_drain(dir.path(), broker.addr, count, tck).await;
    let plain = plain(dir.path(), broker.addr, count, tck).await;
    let share = agent.rate / plain.rate;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!("| measure | events/s | CPU µs/event | target | result |");
    println!("|---|---:|---:|---|---|");
    println!(
        "| agent, MQTT sink (QoS 1, defaults) → Mosquitto | {:.0} | {:.1} | ≥ {TARGET_RATE:.0}/s | {} |",
        agent.rate,
        agent.cpu_us,
        verdict(agent.rate >= TARGET_RATE)
    );
    println!(
        "| plain rumqttc publisher, 100 in flight → Mosquitto | {:.0} | {:.1} | ceiling | |",
        plain.rate, plain.cpu_us
    );
    println!(
        "| agent / plain | {:.0} % | | ≥ {:.0} % | {} |",
        share * 100.0,
        TARGET_SHARE * 100.0,
        verdict(share >= TARGET_SHARE)
    );
}
