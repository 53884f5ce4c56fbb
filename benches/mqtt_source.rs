//! `cargo bench --bench mqtt_source`: what durable journaling with manual
//! acks costs against the broker's own ceiling, and against what plants use
//! today (a Mosquitto bridge with persistence).
//!
//! Needs the system `mosquitto` (Debian package); every broker is started by
//! the bench on a free loopback port with `max_queued_messages 0` (the
//! default queue limit silently drops QoS 1 messages to a slow subscriber).
//! One Rust QoS 1 publisher (200-byte JSON, 10 topics) feeds, in turn:
//!
//! - (a) a plain rumqttc subscriber that does nothing (automatic acks): the
//!   broker's ceiling;
//! - (b) `plantrelay run` (the release binary, its own process) subscribed
//!   with manual acks, journal `sync = "full"`; a message counts when it is
//!   committed (its journal `recv_time`);
//! - (c) a Mosquitto bridge (persistence on) to a second Mosquitto, with the
//!   subscriber on the second one.
//!
//! Each consumer runs alone (the machine has few cores): first a burst of
//! 200k messages as fast as the publisher goes (msgs/s from the first
//! publish to the last consumed), then a paced 5k msg/s run for latency
//! (publish → consumed; p50/p99). For (b) the agent's peak RSS is read from
//! `/proc`. `PLANTRELAY_BENCH_SCALE=0.1` shrinks the counts;
//! `PLANTRELAY_BENCH_BIN` runs another build of the agent for (b).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use plantrelay::journal::Reader;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[path = "support/mod.rs"]
mod support;
use support::{head_seq, status_kib};

const TOPICS: usize = 10;
const PACED_RATE: f64 = 5_000.0;

fn n(x: u64) -> u64 {
    support::scaled(x, 1000)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// 200 bytes of JSON carrying its publish time.
fn payload(i: u64) -> Vec<u8> {
    let head = format!(
        r#"{{"machine":"press{:02}","n":{i},"t_ns":{},"state":"running","temperature_c":61.5,"pad":""#,
        i % TOPICS as u64,
        now_ns()
    );
    let mut s = head;
    while s.len() < 198 {
        s.push('x');
    }
    s.push_str("\"}");
    s.into_bytes()
}

fn t_ns_of(data: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(data).ok()?;
    let at = s.find("\"t_ns\":")? + 7;
    s[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Mosquitto {
    fn start(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = support::free_port();
        let conf = format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
             max_queued_messages 0\npersistence_location {}/\nlog_dest none\n{extra}\n",
            dir.path().display()
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto { dir, port, child }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// Publishes `count` messages over 10 topics with QoS 1 (100 in flight),
/// paced at `rate` msg/s when given. Returns when every PUBACK is in.
async fn publish(broker: SocketAddr, count: u64, rate: Option<f64>) -> Duration {
    let mut o = MqttOptions::new(
        format!("bench-pub-{}", now_ns()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 1000);
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..count {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let topic = format!("bench/press{:02}/state", i % TOPICS as u64);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload(i))
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < count {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("publisher: {e}"),
        }
    }
    let _client = producer.await.unwrap();
    started.elapsed()
}

/// A subscriber that records, per message, the latency from its publish.
struct Subscriber {
    received: Arc<AtomicU64>,
    last_at: Arc<Mutex<Option<Instant>>>,
    latencies_us: Arc<Mutex<Vec<u64>>>,
}

fn subscribe(broker: SocketAddr, id: &str) -> Subscriber {
    let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false);
    let (client, mut el) = AsyncClient::new(o, 100);
    let s = Subscriber {
        received: Arc::new(AtomicU64::new(0)),
        last_at: Arc::new(Mutex::new(None)),
        latencies_us: Arc::new(Mutex::new(Vec::new())),
    };
    let (received, last_at, lat) = (
        s.received.clone(),
        s.last_at.clone(),
        s.latencies_us.clone(),
    );
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe("bench/#", QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(t) = t_ns_of(&p.payload) {
                        lat.lock().unwrap().push(now_ns().saturating_sub(t) / 1000);
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                    *last_at.lock().unwrap() = Some(Instant::now());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    s
}

impl Subscriber {
    async fn wait_for(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.received.load(Ordering::Relaxed) < count {
            assert!(Instant::now() < deadline, "subscriber stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn reset(&self) {
        self.received.store(0, Ordering::Relaxed);
        self.latencies_us.lock().unwrap().clear();
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Row {
    name: &'static str,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss: String,
}

async fn wait_subscribed(sub: &Subscriber, broker: SocketAddr) {
    // Probe until the subscription is in place (the broker keeps nothing
    // for a subscription that does not exist yet).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sub.received.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no subscription");
        publish(broker, 1, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    sub.reset();
}

/// (a) and (c): a plain subscriber, on the broker itself or behind a bridge.
async fn plain(
    name: &'static str,
    publish_to: SocketAddr,
    consume_from: SocketAddr,
    burst: u64,
    paced: u64,
) -> Row {
    let sub = subscribe(consume_from, &format!("bench-sub-{}", now_ns()));
    wait_subscribed(&sub, publish_to).await;
    let started = Instant::now();
    publish(publish_to, burst, None).await;
    sub.wait_for(burst).await;
    let elapsed = sub.last_at.lock().unwrap().unwrap() - started;
    let msgs_per_s = burst as f64 / elapsed.as_secs_f64();
    sub.reset();
    publish(publish_to, paced, Some(PACED_RATE)).await;
    sub.wait_for(paced).await;
    let mut lat = sub.latencies_us.lock().unwrap().clone();
    lat.sort_unstable();
    Row {
        name,
        msgs_per_s,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        rss: "-".into(),
    }
}

/// The committed events of source `line` after `from_seq`: (recv_time_us,
/// publish t_ns).
fn committed(db: &Path, from_seq: u64) -> Vec<(i64, Option<u64>)> {
    let Ok(r) = Reader::open(db) else {
        return Vec::new();
    };
    r.events_from(from_seq, 10_000_000)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.source == "line")
        .map(|e| (e.recv_time_us, t_ns_of(&e.data)))
        .collect()
}

/// (b): the agent as its own process.
async fn agent(broker: SocketAddr, burst: u64, paced: u64, max_inflight: u16) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("journal.db");
    let config = dir.path().join("plantrelay.toml");
    // The sink points nowhere: the bench measures the source path (the
    // forwarder only retries, with backoff, in the background).
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
id = "bench"
state_dir = "{state}"

[journal]
sync = "full"
max_size = "8GiB"

[[sources.mqtt]]
name = "line"
url = "mqtt://127.0.0.1:{port}"
topics = ["bench/#"]
max_inflight = {max_inflight}

[[sinks.https]]
name = "central"
url = "https://127.0.0.1:9/v1/events"
retry_initial = "5s"
retry_max = "60s"
"#,
            state = state.display(),
            port = broker.port(),
        ),
    )
    .unwrap();
    // PLANTRELAY_BENCH_BIN: another build of the agent (the packaged
    // gateway build, an older release) in place of this bench's.
    let bin = std::env::var("PLANTRELAY_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_plantrelay").to_string());
    let mut child = Command::new(bin)
        .args(["run", "-c"])
        .arg(&config)
        .env("PLANTRELAY_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while head_seq(&db) == 0 {
        assert!(Instant::now() < deadline, "the agent did not subscribe");
        publish(broker, 1, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let base = head_seq(&db);
    let started_us = plantrelay::units::unix_micros(SystemTime::now());
    publish(broker, burst, None).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while head_seq(&db) < base + burst {
        assert!(Instant::now() < deadline, "the agent stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = committed(&db, base + 1);
    let last_us = rows.iter().map(|r| r.0).max().unwrap_or(started_us);
    let msgs_per_s = burst as f64 / ((last_us - started_us) as f64 / 1e6);

    let base = head_seq(&db);
    publish(broker, paced, Some(PACED_RATE)).await;
    while head_seq(&db) < base + paced {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat: Vec<u64> = committed(&db, base + 1)
        .into_iter()
        .filter_map(|(recv_us, t_ns)| Some(((recv_us as u64) * 1000).saturating_sub(t_ns?) / 1000))
        .collect();
    lat.sort_unstable();
    let peak = status_kib(pid, "VmHWM:").unwrap_or(0);
    let now = status_kib(pid, "VmRSS:").unwrap_or(0);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    Row {
        name: if max_inflight >= 1000 {
            "(b) plantrelay, sync full, max_inflight 1000"
        } else {
            "(b) plantrelay, sync full, max_inflight 100"
        },
        msgs_per_s,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        rss: format!("{} MiB peak, {} MiB at end", peak / 1024, now / 1024),
    }
}

async fn run() {
    if Command::new("mosquitto").arg("-h").output().is_err() {
        eprintln!("mqtt_source bench: `mosquitto` not found (apt-get install mosquitto); skipped");
        return;
    }
    let burst = n(200_000);
    let paced = n(50_000);
    println!(
        "mqtt_source: {burst} messages burst, {paced} paced at {PACED_RATE} msg/s, 200-byte JSON, {TOPICS} topics, QoS 1"
    );
    let mut rows = Vec::new();
    {
        let m = Mosquitto::start("");
        rows.push(
            plain(
                "(a) rumqttc subscriber, no work",
                m.addr(),
                m.addr(),
                burst,
                paced,
            )
            .await,
        );
    }
    for inflight in [100u16, 1000] {
        let m = Mosquitto::start("");
        rows.push(agent(m.addr(), burst, paced, inflight).await);
    }
    {
        let central = Mosquitto::start("persistence true\n");
        let plant = Mosquitto::start(&format!(
            "persistence true\nautosave_interval 30\n\
             connection central\naddress 127.0.0.1:{}\ntopic bench/# out 1\n\
             cleansession false\nbridge_protocol_version mqttv311\n",
            central.port
        ));
        // Give the bridge a moment to connect.
        tokio::time::sleep(Duration::from_millis(500)).await;
        rows.push(
            plain(
                "(c) mosquitto bridge, persistence on",
                plant.addr(),
                central.addr(),
                burst,
                paced,
            )
            .await,
        );
    }
    let ceiling = rows[0].msgs_per_s;
    println!();
    println!("| consumer | msgs/s | of (a) | p50 ms @5k/s | p99 ms @5k/s | agent RSS |");
    println!("|---|---:|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0}% | {:.2} | {:.2} | {} |",
            r.name,
            r.msgs_per_s,
            100.0 * r.msgs_per_s / ceiling,
            r.p50_ms,
            r.p99_ms,
            r.rss
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    plantrelay::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}
