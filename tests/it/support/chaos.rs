//! The chaos runner: a seeded fault campaign against the real binary.
//!
//! Events come in through all three sources at once: MES batches over HTTP
//! ingest, machine states over MQTT (from a Mosquitto of our own) and data
//! changes over OPC UA (the simulated press, in this process). They go out
//! to all three kinds of upstream at once: the demo HTTPS receiver (behind
//! the TCP fault proxy), an MQTT upstream (a second Mosquitto) and
//! JetStream (a nats-server). Meanwhile a scheduler seeded by
//! [`Plan::seed`] injects, one after the other and in a shuffled order,
//! [`Plan::faults_per_kind`] faults of every [`Fault`] kind, heals each and
//! measures its recovery: the time from the heal until the broken path
//! delivers again end to end. For a fault of an upstream, until that
//! upstream receives a new event; for a source broker or OPC UA server
//! restart, until an event that source produced after the restart reaches
//! the MQTT upstream; for a SIGKILL, until all three sources' new events
//! (HTTP: the batch after the one in flight at the kill) reach the MQTT
//! upstream and the HTTPS receiver and JetStream receive again.
//!
//! What counts as acknowledged: an HTTP batch answered 202; an MQTT message
//! the source broker answered with PUBACK; an OPC UA data change the agent
//! journaled (OPC UA has no acknowledgement to the server). At the end
//! every acknowledged event must be in the journal, every journaled event
//! at every upstream, each stream's events at each upstream in
//! `streamsequence` order (first arrivals), nothing there that the journal
//! does not hold, and duplicates only re-sends of the same id.
//!
//! Bounded: the run stops injecting at [`Plan::max_duration`], a recovery
//! wait ends after [`RECOVERY_LIMIT`], the final drain after
//! [`DRAIN_LIMIT`]. Every peer listens on loopback, and only the processes
//! this runner started are ever signalled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plantrelay::demo::press::{PressOptions, SimPress, load_node, press_node};
use plantrelay::demo::receiver::{EphemeralPki, Receiver, ReceiverOptions};
use plantrelay::journal::Reader;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};

use super::fault_proxy::FaultProxy;
use super::free_port;
use super::mosquitto::Mosquitto;
use super::nats_server::NatsServer;

/// The longest wait for a healed path to deliver again; past it the fault
/// counts as unrecovered (and the campaign goes on).
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// The longest wait, once load and faults end, for every upstream to hold
/// every journaled event.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(600);
/// The agent's id: CloudEvents sources are `plantrelay://gw-chaos/<source>`.
const AGENT: &str = "gw-chaos";
/// The JetStream stream the sink creates.
const JS_STREAM: &str = "CHAOS";
/// Events per HTTP ingest request.
const HTTP_BATCH: u64 = 50;
/// MQTT messages per publish window (all acknowledged before the next).
const MQTT_WINDOW: u64 = 20;

/// What a campaign does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    /// Acknowledged events (all sources) to reach before the run ends.
    pub events: u64,
    pub faults_per_kind: usize,
    /// MES events posted per second (in batches of 50).
    pub http_rate: u64,
    /// MQTT messages published per second.
    pub mqtt_rate: u64,
    /// Extra OPC UA items, each changing every 100 ms.
    pub opcua_items: usize,
    /// Faults and load stop here, reached or not.
    pub max_duration: Duration,
    /// The `plantrelay` binary to run.
    pub binary: PathBuf,
    /// Where the campaign's directory is made.
    pub dir: PathBuf,
}

/// The kinds of fault the scheduler injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// SIGKILL of the agent, restarted after 0-1 s.
    Kill9,
    /// An upstream stopped for 1-4 s, in turn the HTTPS receiver, the MQTT
    /// upstream broker and nats-server (each stopped gracefully: what they
    /// acknowledged they keep).
    UpstreamDown,
    /// The HTTPS receiver answers 503 or 429 (in turn, `Retry-After: 1`)
    /// to everything for 1-3 s.
    Refusals,
    /// The fault proxy resets every connection to the HTTPS receiver for
    /// 0.5-2 s.
    Resets,
    /// The fault proxy swallows traffic to the HTTPS receiver for 1-4 s.
    Blackhole,
    /// The source broker restarts (SIGTERM, persistence kept), down 0-1 s.
    BrokerRestart,
    /// The OPC UA server stops and starts again on its port after 0-1 s.
    OpcUaRestart,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::Kill9,
        Fault::UpstreamDown,
        Fault::Refusals,
        Fault::Resets,
        Fault::Blackhole,
        Fault::BrokerRestart,
        Fault::OpcUaRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9 of the agent",
            Fault::UpstreamDown => "upstream down (HTTPS, MQTT, JetStream in turn)",
            Fault::Refusals => "503 / 429 bursts",
            Fault::Resets => "connection resets (proxy)",
            Fault::Blackhole => "blackhole (proxy)",
            Fault::BrokerRestart => "source broker restart",
            Fault::OpcUaRestart => "OPC UA server restart",
        }
    }
}

/// Faults of one kind.
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    pub injected: u64,
    pub max_recovery: Duration,
    pub total_recovery: Duration,
    /// Healed, but the path did not deliver again within [`RECOVERY_LIMIT`].
    pub unrecovered: u64,
}

/// What one upstream received.
#[derive(Debug, Clone, Default)]
pub struct UpstreamReport {
    pub name: &'static str,
    /// Messages or events received, re-sends included.
    pub received: u64,
    pub unique: u64,
    /// Journaled events it never received.
    pub lost: u64,
    /// First arrivals whose `streamsequence` was not above the stream's
    /// previous one.
    pub reordered: u64,
    pub duplicates: u64,
    /// Events the journal does not hold.
    pub foreign: u64,
    /// A few of the lost, reordered or foreign, for the message.
    pub examples: Vec<String>,
}

/// The campaign's outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub elapsed: Duration,
    pub acked_http: u64,
    pub acked_mqtt: u64,
    /// OPC UA data changes journaled.
    pub opcua_events: u64,
    pub journal_events: u64,
    /// Acknowledged events the journal does not hold.
    pub not_journaled: u64,
    pub faults: BTreeMap<Fault, FaultStats>,
    pub upstreams: Vec<UpstreamReport>,
    /// Why the run stopped early, if it did.
    pub cut_short: Option<String>,
}

impl Report {
    pub fn acked(&self) -> u64 {
        self.acked_http + self.acked_mqtt + self.opcua_events
    }

    pub fn lost(&self) -> u64 {
        self.not_journaled + self.upstreams.iter().map(|u| u.lost).sum::<u64>()
    }

    pub fn reordered(&self) -> u64 {
        self.upstreams.iter().map(|u| u.reordered).sum()
    }

    pub fn foreign(&self) -> u64 {
        self.upstreams.iter().map(|u| u.foreign).sum()
    }

    pub fn max_recovery(&self) -> Duration {
        self.faults
            .values()
            .map(|f| f.max_recovery)
            .max()
            .unwrap_or_default()
    }

    /// Nothing lost, reordered or invented, and every fault recovered.
    pub fn is_clean(&self) -> bool {
        self.lost() == 0
            && self.reordered() == 0
            && self.foreign() == 0
            && self.faults.values().all(|f| f.unrecovered == 0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos campaign, seed {}: {:.0} s, {} events acknowledged \
             (HTTP {}, MQTT {}, OPC UA {}), {} in the journal, {} acknowledged but not journaled",
            self.seed,
            self.elapsed.as_secs_f64(),
            self.acked(),
            self.acked_http,
            self.acked_mqtt,
            self.opcua_events,
            self.journal_events,
            self.not_journaled
        )?;
        if let Some(why) = &self.cut_short {
            writeln!(f, "cut short: {why}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "| fault | injected | recovery mean | recovery max | unrecovered |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|")?;
        for (kind, s) in &self.faults {
            let mean = s.total_recovery.as_secs_f64() / s.injected.max(1) as f64;
            writeln!(
                f,
                "| {} | {} | {:.2} s | {:.2} s | {} |",
                kind.name(),
                s.injected,
                mean,
                s.max_recovery.as_secs_f64(),
                s.unrecovered
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "| upstream | received | unique | lost | reordered | duplicates | not in the journal |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
        for u in &self.upstreams {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} |",
                u.name, u.received, u.unique, u.lost, u.reordered, u.duplicates, u.foreign
            )?;
        }
        for u in &self.upstreams {
            if !u.examples.is_empty() {
                writeln!(f, "{}: e.g. {}", u.name, u.examples.join("; "))?;
            }
        }
        write!(
            f,
            "\nlost {}, reordered {}, invented {}, max recovery {:.2} s",
            self.lost(),
            self.reordered(),
            self.foreign(),
            self.max_recovery().as_secs_f64()
        )
    }
}

/// Order and completeness at one upstream, fed in arrival order. Events
/// are keyed `<source name>/<id>`.
#[derive(Default)]
struct Tally {
    seen: HashSet<String>,
    last: HashMap<String, u64>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, key: String, stream: &str, streamsequence: u64) {
        self.received += 1;
        if self.seen.contains(&key) {
            self.duplicates += 1;
            return;
        }
        let last = self.last.entry(stream.to_owned()).or_insert(0);
        if streamsequence <= *last {
            self.reordered += 1;
            if self.examples.len() < 3 {
                self.examples.push(format!(
                    "{key} (stream {stream}, streamsequence {streamsequence}) after {last}"
                ));
            }
        }
        *last = (*last).max(streamsequence);
        self.seen.insert(key);
    }

    fn report(mut self, name: &'static str, journal: &HashSet<String>) -> UpstreamReport {
        let lost: Vec<&String> = journal.difference(&self.seen).collect();
        let foreign: Vec<&String> = self.seen.difference(journal).collect();
        for k in lost.iter().take(3) {
            self.examples.push(format!("lost {k}"));
        }
        for k in foreign.iter().take(3) {
            self.examples.push(format!("not in the journal: {k}"));
        }
        UpstreamReport {
            name,
            received: self.received,
            unique: self.seen.len() as u64,
            lost: lost.len() as u64,
            reordered: self.reordered,
            duplicates: self.duplicates,
            foreign: foreign.len() as u64,
            examples: self.examples,
        }
    }
}

/// `mes` from `plantrelay://gw-chaos/mes`.
fn source_name(ce_source: &str) -> &str {
    ce_source.rsplit('/').next().unwrap_or(ce_source)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// What the MQTT upstream checker has seen so far, for the recovery waits.
#[derive(Default)]
struct Live {
    unique: AtomicU64,
    /// Highest `n` of an HTTP ingest event (`h-<n>`).
    max_http_n: AtomicU64,
    /// Highest `n` of an MQTT-source event (`m-<n>`).
    max_mqtt_n: AtomicU64,
    /// Latest CloudEvents `time` of an OPC UA event, µs since the epoch.
    max_opcua_time_us: AtomicI64,
    opcua_unique: AtomicU64,
}

/// Subscribes to the MQTT upstream with a persistent session (what arrives
/// while it reconnects is kept by the broker) and feeds `tally`.
async fn watch_mqtt_upstream(
    addr: std::net::SocketAddr,
    tally: Arc<Mutex<Tally>>,
    live: Arc<Live>,
) {
    let mut opts = MqttOptions::new("chaos-checker", addr.ip().to_string(), addr.port());
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    // The subscription is made once: the persistent session keeps it
    // across reconnects and broker restarts.
    client.subscribe("uns/#", QoS::AtLeastOnce).await.unwrap();
    tokio::spawn(async move {
        // The client lives as long as its event loop.
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ce: Value = serde_json::from_slice(&p.payload).expect("a CloudEvent");
                    let source = source_name(ce["source"].as_str().unwrap_or_default());
                    let id = ce["id"].as_str().unwrap_or_default();
                    let stream = ce["subject"].as_str().unwrap_or_default();
                    let seq = ce["streamsequence"].as_u64().unwrap_or(0);
                    let key = format!("{source}/{id}");
                    let mut t = tally.lock().unwrap();
                    let before = t.seen.len();
                    t.add(key, stream, seq);
                    if t.seen.len() > before {
                        live.unique.fetch_add(1, Ordering::Relaxed);
                        if source == "mes"
                            && let Some(n) = id.strip_prefix("h-").and_then(|n| n.parse().ok())
                        {
                            live.max_http_n.fetch_max(n, Ordering::Relaxed);
                        }
                        if source == "line"
                            && let Some(n) = id.strip_prefix("m-").and_then(|n| n.parse().ok())
                        {
                            live.max_mqtt_n.fetch_max(n, Ordering::Relaxed);
                        }
                        if source == "press" {
                            live.opcua_unique.fetch_add(1, Ordering::Relaxed);
                            if let Some(t) = ce["time"]
                                .as_str()
                                .and_then(|t| humantime::parse_rfc3339(t).ok())
                                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            {
                                live.max_opcua_time_us
                                    .fetch_max(t.as_micros() as i64, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Ok(_) => {}
                // The broker restarts: polling again reconnects.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), subscribed)
        .await
        .expect("the MQTT upstream checker was not subscribed within 30 s")
        .expect("the checker's event loop ended");
}

/// The agent as a child process: spawned, SIGKILLed, stopped.
struct AgentProcess {
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl AgentProcess {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(&self.binary)
                .args(["run", "-c"])
                .arg(&self.config)
                .env("PLANTRELAY_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; panics unless it exits 0.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::signal(c.id(), "TERM");
            let status = c.wait().unwrap();
            assert!(status.success(), "the agent exited with {status}");
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Counts of what the sources acknowledged, shared with the load tasks.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    /// `h-0 .. h-<acked_http>` were answered 202.
    acked_http: AtomicU64,
    /// `m-0 .. m-<acked_mqtt>` were PUBACKed by the source broker.
    acked_mqtt: AtomicU64,
    /// `m-0 .. m-<published_mqtt>` were handed to the MQTT client.
    published_mqtt: AtomicU64,
    /// Answers other than 202 (the agent down, or back-pressure).
    http_retries: AtomicU64,
}

/// Posts MES batches of [`HTTP_BATCH`] at `rate` events/s until stopped,
/// each batch again until it is answered 202.
async fn post_http(url: String, rate: u64, load: Arc<Load>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let period = Duration::from_secs_f64(HTTP_BATCH as f64 / rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let batch: Vec<Value> = (n..n + HTTP_BATCH)
            .map(|i| {
                json!({
                    "specversion": "1.0",
                    "id": format!("h-{i}"),
                    "source": "urn:mes:chaos",
                    "type": "com.example.mes.confirmation",
                    "subject": format!("mes/line{}", i % 4),
                    "data": {"n": i, "qty": i % 17, "pad": "x".repeat(120)},
                })
            })
            .collect();
        let body = Value::Array(batch).to_string();
        loop {
            let answer = client
                .post(&url)
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().as_u16() == 202 => break,
                Ok(r) if matches!(r.status().as_u16(), 429 | 503) => {}
                Ok(r) => {
                    let status = r.status();
                    panic!(
                        "HTTP ingest answered {status}: {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                // The agent is down (killed) or restarting.
                Err(_) => {}
            }
            load.http_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n += HTTP_BATCH;
        load.acked_http.store(n, Ordering::Relaxed);
    }
}

fn mqtt_message(n: u64) -> (String, Vec<u8>) {
    (
        format!("chaos/m{}/state", n % 4),
        json!({"id": format!("m-{n}"), "n": n, "state": "running", "pad": "y".repeat(100)})
            .to_string()
            .into_bytes(),
    )
}

/// Publishes machine states at `rate` messages/s, QoS 1, persistent
/// session, in windows of [`MQTT_WINDOW`] each fully acknowledged before
/// the next: `acked_mqtt` is then an exact prefix. A broker restart holds
/// the window until the client, reconnected, has its PUBACKs.
async fn publish_mqtt(addr: std::net::SocketAddr, rate: u64, load: Arc<Load>) {
    let mut o = MqttOptions::new("chaos-press-line", addr.ip().to_string(), addr.port());
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    // Packet ids written and not acknowledged; messages written once.
    let pending: Arc<Mutex<HashSet<u16>>> = Arc::default();
    let written = Arc::new(AtomicU64::new(0));
    let poller = {
        let pending = pending.clone();
        let written = written.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        // A re-send after a reconnect writes a pending id again.
                        if pending.lock().unwrap().insert(pkid) {
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        pending.lock().unwrap().remove(&a.pkid);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    };
    let period = Duration::from_secs_f64(MQTT_WINDOW as f64 / rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let end = n + MQTT_WINDOW;
        load.published_mqtt.store(end, Ordering::Relaxed);
        for i in n..end {
            let (topic, payload) = mqtt_message(i);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        while written.load(Ordering::Relaxed) < end || !pending.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n = end;
        load.acked_mqtt.store(n, Ordering::Relaxed);
    }
    poller.abort();
}

/// Everything the campaign runs, so the scheduler can break and heal it.
struct Rig {
    agent: AgentProcess,
    receiver: Receiver,
    proxy: FaultProxy,
    source_broker: Mosquitto,
    upstream_broker: Mosquitto,
    nats: NatsServer,
    press: Option<SimPress>,
    press_opts: PressOptions,
    live: Arc<Live>,
    load: Arc<Load>,
}

/// The counters a recovery is measured against, taken at the heal.
struct Mark {
    https: u64,
    mqtt: u64,
    jetstream: u64,
    published_mqtt: u64,
    /// The first HTTP batch the poster sends only after a 202 from the
    /// agent as it is now.
    next_http: u64,
    at_us: i64,
}

impl Rig {
    async fn mark(&self) -> Mark {
        Mark {
            https: self.receiver.stats().unique_ids,
            mqtt: self.live.unique.load(Ordering::Relaxed),
            jetstream: self.nats.count(JS_STREAM).await,
            published_mqtt: self.load.published_mqtt.load(Ordering::Relaxed),
            next_http: self.load.acked_http.load(Ordering::Relaxed) + HTTP_BATCH,
            at_us: now_us(),
        }
    }

    /// Whether the path `fault` broke delivers again since `m`.
    async fn recovered(&self, fault: Fault, target: usize, m: &Mark) -> bool {
        let https = || self.receiver.stats().unique_ids > m.https;
        let mqtt = || self.live.unique.load(Ordering::Relaxed) > m.mqtt;
        let mqtt_source = || self.live.max_mqtt_n.load(Ordering::Relaxed) >= m.published_mqtt;
        let opcua_source = || self.live.max_opcua_time_us.load(Ordering::Relaxed) > m.at_us;
        let http_source = || self.live.max_http_n.load(Ordering::Relaxed) >= m.next_http;
        match fault {
            // Every source takes new events again and every sink delivers.
            Fault::Kill9 => {
                http_source()
                    && mqtt_source()
                    && opcua_source()
                    && https()
                    && self.nats.count(JS_STREAM).await > m.jetstream
            }
            Fault::UpstreamDown => match target {
                0 => https(),
                1 => mqtt(),
                _ => self.nats.count(JS_STREAM).await > m.jetstream,
            },
            Fault::Refusals | Fault::Resets | Fault::Blackhole => https(),
            Fault::BrokerRestart => mqtt_source(),
            Fault::OpcUaRestart => opcua_source(),
        }
    }

    /// Breaks what `fault` names, waits `hold`, heals it.
    async fn inject(&mut self, fault: Fault, target: usize, status: u16, hold: Duration) {
        match fault {
            Fault::Kill9 => {
                self.agent.kill9();
                tokio::time::sleep(hold).await;
                self.agent.spawn();
            }
            Fault::UpstreamDown => match target {
                0 => {
                    self.receiver.stop().await;
                    tokio::time::sleep(hold).await;
                    self.receiver.restart().await.unwrap();
                }
                1 => {
                    self.upstream_broker.stop();
                    tokio::time::sleep(hold).await;
                    self.upstream_broker.spawn().await;
                }
                _ => {
                    self.nats.stop();
                    tokio::time::sleep(hold).await;
                    self.nats.spawn().await;
                }
            },
            Fault::Refusals => {
                self.receiver.set_fail(status, Some(1), 1.0);
                tokio::time::sleep(hold).await;
                self.receiver.clear_faults();
            }
            Fault::Resets => {
                self.proxy.cut();
                tokio::time::sleep(hold).await;
                self.proxy.pass();
            }
            Fault::Blackhole => {
                self.proxy.blackhole();
                tokio::time::sleep(hold).await;
                self.proxy.pass();
            }
            Fault::BrokerRestart => {
                self.source_broker.stop();
                tokio::time::sleep(hold).await;
                self.source_broker.spawn().await;
            }
            Fault::OpcUaRestart => {
                if let Some(p) = self.press.take() {
                    p.stop().await;
                }
                tokio::time::sleep(hold).await;
                // The port may linger a moment after the stop.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match SimPress::start(&self.press_opts).await {
                        Ok(p) => break self.press = Some(p),
                        Err(e) => {
                            assert!(Instant::now() < deadline, "OPC UA server restart: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
    }
}

/// Where the agent's peers are.
struct Peers<'a> {
    http_port: u16,
    source_broker: &'a str,
    endpoint: &'a str,
    https_url: &'a str,
    ca: &'a Path,
    upstream_broker: &'a str,
    nats: &'a str,
}

fn agent_config(state: &Path, opcua_items: usize, p: &Peers<'_>) -> String {
    let mut nodes = String::new();
    for name in ["State", "Counter", "Temperature"] {
        nodes += &format!(
            "\n[[sources.opcua.nodes]]\nnode_id = \"{}\"\nstream = \"press/main\"\nsampling_interval = \"50ms\"\nqueue_size = 10\n",
            press_node(name)
        );
    }
    for i in 0..opcua_items {
        nodes += &format!(
            "\n[[sources.opcua.nodes]]\nnode_id = \"{}\"\nstream = \"press/load{}\"\nsampling_interval = \"50ms\"\nqueue_size = 10\n",
            load_node(i),
            i % 2
        );
    }
    format!(
        r#"
[agent]
id = "{AGENT}"
state_dir = "{state}"
shutdown_timeout = "5s"

[journal]
sync = "full"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:{http_port}"

[[sources.mqtt]]
name = "line"
url = "{source_broker}"
client_id = "plantrelay-chaos-line"
clean_session = false
topics = [{{ filter = "chaos/+/state", qos = 1 }}]
format = "json"
id_pointer = "/id"
stream = "line/{{2}}"

[[sources.opcua]]
name = "press"
endpoint = "{endpoint}"
security_policy = "None"
security_mode = "None"
publishing_interval = "100ms"
keep_alive_count = 5
lifetime_count = 15
connect_timeout = "3s"
{nodes}
[[sinks.https]]
name = "central"
url = "{https_url}"
ca_file = "{ca}"
ca_only = true
timeout = "2s"
retry_initial = "50ms"
retry_max = "1s"

[[sinks.mqtt]]
name = "uns"
url = "{upstream_broker}"
topic = "uns/{{agent}}/{{stream}}"
batch_max_events = 100
timeout = "2s"
retry_initial = "50ms"
retry_max = "1s"

[[sinks.jetstream]]
name = "hub"
url = "{nats}"
stream = "{JS_STREAM}"
create_stream = true
timeout = "2s"
retry_initial = "50ms"
retry_max = "1s"
"#,
        state = state.display(),
        ca = p.ca.display(),
        http_port = p.http_port,
        source_broker = p.source_broker,
        endpoint = p.endpoint,
        https_url = p.https_url,
        upstream_broker = p.upstream_broker,
        nats = p.nats,
    )
}

/// Reads the whole JetStream stream back into a tally, in stream order.
async fn read_jetstream(nats: &NatsServer) -> Tally {
    let mut tally = Tally::default();
    nats.each_stored(JS_STREAM, |m| {
        let key = format!("{}/{}", source_name(&m.ce_source), m.ce_id);
        tally.add(key, &m.ce_subject, m.ce_streamsequence);
    })
    .await;
    tally
}

/// Every event the journal at `db` holds, as `<source>/<id>`.
fn journal_keys(db: &Path) -> (HashSet<String>, u64) {
    let reader = Reader::open(db).unwrap();
    let mut keys = HashSet::new();
    let mut opcua = 0;
    let mut from = 0;
    loop {
        let chunk = reader.events_from(from, 100_000).unwrap();
        let Some(last) = chunk.last() else { break };
        from = last.seq + 1;
        for e in chunk {
            if e.source == "press" {
                opcua += 1;
            }
            keys.insert(format!("{}/{}", e.source, e.id));
        }
    }
    (keys, opcua)
}

/// Runs the campaign `plan` describes; see the module docs.
pub async fn run(plan: &Plan) -> Report {
    plantrelay::tls::install_crypto_provider();
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    std::fs::create_dir_all(&plan.dir).unwrap();
    let dir = tempfile::tempdir_in(&plan.dir).unwrap();
    let state = dir.path().join("state");

    // Peers.
    let pki = EphemeralPki::generate().unwrap();
    let pki_paths = pki.write_to(dir.path()).unwrap();
    let mut ropts = ReceiverOptions::new(&pki);
    ropts.record_data = false;
    let receiver = Receiver::start(ropts).await.unwrap();
    let proxy = FaultProxy::start(receiver.addr()).await;
    let source_broker = Mosquitto::start(true, "").await;
    let upstream_broker = Mosquitto::start(true, "").await;
    let nats = NatsServer::start().await;
    let mut press_opts = PressOptions::new(dir.path().join("press-pki"));
    press_opts.tick = Duration::from_millis(100);
    press_opts.load_items = plan.opcua_items;
    let press = SimPress::start(&press_opts).await.unwrap();
    press_opts.port = press.addr().port();

    let live = Arc::new(Live::default());
    let mqtt_tally = Arc::new(Mutex::new(Tally::default()));
    watch_mqtt_upstream(upstream_broker.addr(), mqtt_tally.clone(), live.clone()).await;

    let http_port = free_port();
    let https_url = format!("https://{}/v1/events", proxy.addr());
    let config = agent_config(
        &state,
        plan.opcua_items,
        &Peers {
            http_port,
            source_broker: &source_broker.url("mqtt"),
            endpoint: &press.endpoint(),
            https_url: &https_url,
            ca: &pki_paths.ca,
            upstream_broker: &upstream_broker.url("mqtt"),
            nats: &nats.url(),
        },
    );
    let config_path = dir.path().join("plantrelay.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut agent = AgentProcess {
        binary: plan.binary.clone(),
        config: config_path,
        log: dir.path().join("agent.log"),
        child: None,
    };
    agent.spawn();

    let load = Arc::new(Load::default());
    let mut rig = Rig {
        agent,
        receiver,
        proxy,
        source_broker,
        upstream_broker,
        nats,
        press: Some(press),
        press_opts,
        live,
        load: load.clone(),
    };
    let log_tail = |rig: &Rig| {
        let log = std::fs::read_to_string(&rig.agent.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };

    // The agent's MQTT session must exist before anything is published to
    // it: a first message that reaches the upstream proves it subscribed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe = 0u64;
    {
        let mut o = MqttOptions::new("chaos-probe", "127.0.0.1", rig.source_broker.port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 100);
        let poll = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        while rig.live.unique.load(Ordering::Relaxed) == 0 || rig.receiver.stats().unique_ids == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing reached the upstreams within 60 s; agent log:\n{}",
                log_tail(&rig)
            );
            let payload = json!({"id": format!("probe-{probe}")}).to_string();
            probe += 1;
            let _ = client
                .publish("chaos/probe/state", QoS::AtLeastOnce, false, payload)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        poll.abort();
    }

    let http = tokio::spawn(post_http(
        format!("http://127.0.0.1:{http_port}/v1/events"),
        plan.http_rate,
        load.clone(),
    ));
    let mqtt = tokio::spawn(publish_mqtt(
        rig.source_broker.addr(),
        plan.mqtt_rate,
        load.clone(),
    ));

    // The campaign.
    let mut schedule: Vec<Fault> = Fault::ALL
        .iter()
        .flat_map(|k| std::iter::repeat_n(*k, plan.faults_per_kind))
        .collect();
    schedule.shuffle(&mut rng);
    let mut report = Report {
        seed: plan.seed,
        ..Default::default()
    };
    let mut down_turn = 0usize;
    let mut refusal_turn = 0usize;
    for fault in schedule {
        if started.elapsed() > plan.max_duration {
            report.cut_short = Some(format!(
                "max duration {:?} reached before every fault was injected",
                plan.max_duration
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
        let (hold_ms, target) = match fault {
            Fault::Kill9 | Fault::BrokerRestart | Fault::OpcUaRestart => (0..1000, 0),
            Fault::UpstreamDown => {
                down_turn += 1;
                (1000..4000, down_turn % 3)
            }
            Fault::Refusals => (1000..3000, 0),
            Fault::Resets => (500..2000, 0),
            Fault::Blackhole => (1000..4000, 0),
        };
        let status = if fault == Fault::Refusals {
            refusal_turn += 1;
            if refusal_turn.is_multiple_of(2) {
                429
            } else {
                503
            }
        } else {
            0
        };
        let hold = Duration::from_millis(rng.random_range(hold_ms));
        rig.inject(fault, target, status, hold).await;
        let mark = rig.mark().await;
        let healed = Instant::now();
        let stats = report.faults.entry(fault).or_default();
        stats.injected += 1;
        loop {
            if rig.recovered(fault, target, &mark).await {
                let took = healed.elapsed();
                stats.max_recovery = stats.max_recovery.max(took);
                stats.total_recovery += took;
                break;
            }
            if healed.elapsed() > RECOVERY_LIMIT {
                stats.unrecovered += 1;
                stats.max_recovery = stats.max_recovery.max(healed.elapsed());
                stats.total_recovery += healed.elapsed();
                eprintln!(
                    "chaos: {} not recovered after {RECOVERY_LIMIT:?}; agent log:\n{}",
                    fault.name(),
                    log_tail(&rig)
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Load goes on, without faults, until the event count is reached.
    let acked_now = |rig: &Rig| {
        load.acked_http.load(Ordering::Relaxed)
            + load.acked_mqtt.load(Ordering::Relaxed)
            + rig.live.opcua_unique.load(Ordering::Relaxed)
    };
    while acked_now(&rig) < plan.events {
        if started.elapsed() > plan.max_duration {
            report.cut_short = Some(format!(
                "max duration {:?} reached at {} of {} events",
                plan.max_duration,
                acked_now(&rig),
                plan.events
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    http.await.unwrap();
    mqtt.await.unwrap();
    if let Some(p) = &rig.press {
        p.pause();
    }
    report.acked_http = load.acked_http.load(Ordering::Relaxed);
    report.acked_mqtt = load.acked_mqtt.load(Ordering::Relaxed);

    // Drain: the sources' last events into the journal, then the journal
    // to every upstream.
    let db = state.join("journal.db");
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let (journal, opcua) = loop {
        let (keys, _) = journal_keys(&db);
        let http_in = (0..report.acked_http).all(|i| keys.contains(&format!("mes/h-{i}")));
        let mqtt_in = (0..report.acked_mqtt).all(|i| keys.contains(&format!("line/m-{i}")));
        let n = keys.len() as u64;
        let upstreams_have = rig.receiver.stats().unique_ids >= n
            && rig.live.unique.load(Ordering::Relaxed) >= n
            && rig.nats.count(JS_STREAM).await >= n;
        if (http_in && mqtt_in && upstreams_have) || Instant::now() > drain_deadline {
            // One more read: nothing came in since.
            let (again, opcua) = journal_keys(&db);
            if again.len() == keys.len() || Instant::now() > drain_deadline {
                break (again, opcua);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    report.opcua_events = opcua;
    report.journal_events = journal.len() as u64;
    report.not_journaled = (0..report.acked_http)
        .filter(|i| !journal.contains(&format!("mes/h-{i}")))
        .count() as u64
        + (0..report.acked_mqtt)
            .filter(|i| !journal.contains(&format!("line/m-{i}")))
            .count() as u64;

    let mut https = Tally::default();
    for e in rig.receiver.events() {
        https.add(
            format!("{}/{}", source_name(&e.source), e.id),
            e.subject.as_deref().unwrap_or_default(),
            e.streamsequence.unwrap_or(0),
        );
    }
    let mqtt_tally = std::mem::take(&mut *mqtt_tally.lock().unwrap());
    let js = read_jetstream(&rig.nats).await;
    report.upstreams = vec![
        https.report("HTTPS receiver", &journal),
        mqtt_tally.report("MQTT upstream", &journal),
        js.report("JetStream", &journal),
    ];
    rig.agent.stop();
    report.elapsed = started.elapsed();
    report
}
