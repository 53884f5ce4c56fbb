//! Simulated machines for `plantrelay demo` (and the MQTT tests): an
//! embedded MQTT broker (rumqttd on loopback), four machines publishing
//! their states as JSON, and one Sparkplug B edge node with a device.
//!
//! Every machine publishes with QoS 1 and waits for the broker's PUBACK
//! before the next message, so the fleet knows exactly which messages the
//! broker acknowledged: those must all reach the upstream. Their event ids
//! are computed the way the agent derives them (a content hash for JSON,
//! `spb:...` for Sparkplug), so the demo can tell lost from delivered.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use crate::sources::mqtt::content_id;
use crate::sources::sparkplug::proto::Payload;
use crate::sources::sparkplug::proto::payload::Metric;
use crate::sources::sparkplug::proto::payload::metric::Value as MetricValue;
use crate::status::SourceStatus;

/// The JSON machines: `machines/<name>/state`.
pub const JSON_MACHINES: [&str; 4] = ["press07", "press08", "weld01", "paint02"];
/// The Sparkplug B group, edge node and device.
pub const SPARKPLUG_GROUP: &str = "hamburg";
pub const SPARKPLUG_NODE: &str = "line3-edge";
pub const SPARKPLUG_DEVICE: &str = "press09";

/// An MQTT broker (rumqttd) on loopback, with a v3.1.1 and a v5 listener.
/// rumqttd cannot be stopped: it lives until the process exits.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    v4: SocketAddr,
    v5: SocketAddr,
}

fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

fn server(name: &str, listen: SocketAddr) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 16 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd on two free loopback ports and waits until both
    /// accept connections.
    pub async fn start() -> Result<EmbeddedBroker, String> {
        let (v4, v5) = (free_port()?, free_port()?);
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 << 20,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([("1".to_owned(), server("v4", v4))])),
            v5: Some(HashMap::from([("1".to_owned(), server("v5", v5))])),
            ..Default::default()
        };
        let mut broker = rumqttd::Broker::new(config);
        std::thread::Builder::new()
            .name("demo-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "the embedded MQTT broker stopped");
                }
            })
            .map_err(|e| format!("cannot start the embedded MQTT broker: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in [v4, v5] {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                if Instant::now() > deadline {
                    return Err(format!("the embedded MQTT broker did not listen on {addr}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(EmbeddedBroker { v4, v5 })
    }

    /// The MQTT 3.1.1 listener.
    pub fn addr(&self) -> SocketAddr {
        self.v4
    }

    /// The MQTT 5 listener.
    pub fn v5_addr(&self) -> SocketAddr {
        self.v5
    }

    /// `mqtt://127.0.0.1:<port>` of the 3.1.1 listener.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.v4)
    }
}

/// A QoS 1 publisher that waits for each PUBACK: it knows exactly what the
/// broker acknowledged.
pub struct AckedPublisher {
    client: AsyncClient,
    eventloop: EventLoop,
}

impl AckedPublisher {
    pub fn new(broker: SocketAddr, client_id: &str) -> AckedPublisher {
        let mut o = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
        o.set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_max_packet_size(32 << 20, 32 << 20);
        let (client, eventloop) = AsyncClient::new(o, 16);
        AckedPublisher { client, eventloop }
    }

    /// Publishes with QoS 1 and returns once the broker acknowledged it.
    /// An error means "not known to be acknowledged" (it may still arrive).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        // The request channel is empty here (one message at a time), so
        // this only queues.
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| e.to_string())?;
        let mut pkid = None;
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Publish(p)))) => pkid = Some(p),
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) if Some(a.pkid) == pkid => {
                    return Ok(());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("no PUBACK in time".into()),
            }
        }
    }
}

/// What the fleet did, for the progress line and the verdict.
#[derive(Debug, Default)]
pub struct FleetCounters {
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    acked_ids: Mutex<Vec<String>>,
}

impl FleetCounters {
    fn acked(&self, id: String) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut ids) = self.acked_ids.lock() {
            ids.push(id);
        }
    }

    /// Ids of every message the broker acknowledged to the fleet.
    pub fn acked_ids(&self) -> Vec<String> {
        self.acked_ids.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// The `[[sources.mqtt]]` sections the demo agent runs with: `machines`
/// (JSON, stream `line3/<machine>`) and `edge` (Sparkplug B).
pub fn sources_toml(broker: &EmbeddedBroker) -> String {
    format!(
        r#"
[[sources.mqtt]]
name = "machines"
url = "{url}"
topics = ["machines/+/state"]
format = "json"
time_pointer = "/ts"
stream = "line3/{{2}}"
type = "com.example.machine.state"
keep_alive = "5s"

[[sources.mqtt]]
name = "edge"
url = "{url}"
topics = ["spBv1.0/{SPARKPLUG_GROUP}/#"]
format = "sparkplug_b"
type = "com.example.sparkplug"
keep_alive = "5s"
"#,
        url = broker.url()
    )
}

/// Runs the fleet until `duration` has passed: each JSON machine publishes
/// a state every ~100 ms, the Sparkplug node births its device and then
/// reports data every ~200 ms.
pub async fn run_fleet(
    broker: SocketAddr,
    duration: Duration,
    counters: Arc<FleetCounters>,
) -> Result<(), String> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for machine in JSON_MACHINES {
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            json_machine(broker, machine, started, duration, &counters).await
        }));
    }
    {
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            sparkplug_node(broker, started, duration, &counters).await
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Waits (up to 30 s) until every MQTT source of the agent is connected and
/// subscribed: the broker keeps nothing for a subscription it does not have
/// yet, so machines that publish earlier would publish into the void.
pub async fn wait_until_subscribed(sources: &[Arc<SourceStatus>]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sources
        .iter()
        .any(|s| s.kind == "mqtt" && !s.connected.load(Ordering::Relaxed))
    {
        if Instant::now() > deadline {
            return Err("the agent's MQTT sources did not connect to the embedded broker".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits (up to 30 s) until the agent's MQTT sources have taken in at least
/// as many messages as the broker acknowledged to the fleet.
pub async fn wait_until_stored(sources: &[Arc<SourceStatus>], counters: &FleetCounters) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = counters.acked.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        let taken: u64 = sources
            .iter()
            .filter(|s| s.kind == "mqtt")
            .map(|s| s.events.load(Ordering::Relaxed) + s.duplicates.load(Ordering::Relaxed))
            .sum();
        if taken >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(crate::units::formattable(SystemTime::now())).to_string()
}

async fn json_machine(
    broker: SocketAddr,
    machine: &'static str,
    started: Instant,
    duration: Duration,
    counters: &FleetCounters,
) -> Result<(), String> {
    let mut publisher = AckedPublisher::new(broker, &format!("demo-{machine}"));
    let topic = format!("machines/{machine}/state");
    let states = ["running", "running", "running", "idle", "setup", "fault"];
    let mut seq = 0u64;
    let mut state = "running";
    while started.elapsed() < duration {
        seq += 1;
        if rand::rng().random_bool(0.05) {
            state = states[rand::rng().random_range(0..states.len())];
        }
        let payload = serde_json::json!({
            "machine": machine,
            "seq": seq,
            "state": state,
            "temperature_c": 40.0 + rand::rng().random_range(0.0..25.0_f64).round(),
            "parts": seq / 3,
            "ts": now_rfc3339(),
        })
        .to_string()
        .into_bytes();
        let id = content_id(&topic, &payload, None);
        counters.published.fetch_add(1, Ordering::Relaxed);
        match publisher
            .publish(&topic, payload, Duration::from_secs(10))
            .await
        {
            Ok(()) => counters.acked(id),
            Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let pause = rand::rng().random_range(60..140);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Ok(())
}

fn metric(name: &str, alias: u64, datatype: u32, value: MetricValue) -> Metric {
    Metric {
        name: Some(name.to_owned()),
        alias: Some(alias),
        datatype: Some(datatype),
        value: Some(value),
        ..Default::default()
    }
}

/// A DATA metric: alias only; name and datatype come from the birth.
fn data_metric(alias: u64, value: MetricValue) -> Metric {
    Metric {
        alias: Some(alias),
        value: Some(value),
        ..Default::default()
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn sparkplug_node(
    broker: SocketAddr,
    started: Instant,
    duration: Duration,
    counters: &FleetCounters,
) -> Result<(), String> {
    const UINT64: u32 = 8;
    const DOUBLE: u32 = 10;
    const STRING: u32 = 12;
    const BOOLEAN: u32 = 11;
    let mut publisher = AckedPublisher::new(broker, "demo-edge-node");
    let node = format!("{SPARKPLUG_GROUP}/{SPARKPLUG_NODE}");
    let device = format!("{node}/{SPARKPLUG_DEVICE}");
    let mut seq = 0u64;
    let mut last_ts = 0u64;
    let mut next = |kind: &str, stream: &str, metrics: Vec<Metric>| {
        // Distinct timestamps keep the ids distinct.
        let ts = epoch_ms().max(last_ts + 1);
        last_ts = ts;
        let payload = Payload {
            timestamp: Some(ts),
            metrics,
            seq: Some(seq),
            ..Default::default()
        };
        let id = format!("spb:{stream}:{kind}:{seq}:{ts}");
        seq = (seq + 1) % 256;
        (payload.encode_to_vec(), id)
    };
    let send =
        async |publisher: &mut AckedPublisher, topic: String, (payload, id): (Vec<u8>, String)| {
            counters.published.fetch_add(1, Ordering::Relaxed);
            match publisher
                .publish(&topic, payload, Duration::from_secs(10))
                .await
            {
                Ok(()) => counters.acked(id),
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        };

    let nbirth = next(
        "NBIRTH",
        &node,
        vec![
            metric("bdSeq", 0, UINT64, MetricValue::LongValue(0)),
            metric(
                "Node Control/Rebirth",
                1,
                BOOLEAN,
                MetricValue::BooleanValue(false),
            ),
            metric("Line/Speed", 2, DOUBLE, MetricValue::DoubleValue(42.0)),
        ],
    );
    send(
        &mut publisher,
        format!("spBv1.0/{SPARKPLUG_GROUP}/NBIRTH/{SPARKPLUG_NODE}"),
        nbirth,
    )
    .await;
    let dbirth = next(
        "DBIRTH",
        &device,
        vec![
            metric("Temperature", 10, DOUBLE, MetricValue::DoubleValue(61.0)),
            metric(
                "State",
                11,
                STRING,
                MetricValue::StringValue("running".into()),
            ),
            metric("Parts", 12, UINT64, MetricValue::LongValue(0)),
        ],
    );
    send(
        &mut publisher,
        format!("spBv1.0/{SPARKPLUG_GROUP}/DBIRTH/{SPARKPLUG_NODE}/{SPARKPLUG_DEVICE}"),
        dbirth,
    )
    .await;
    // Births first: the broker orders per topic only.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut parts = 0u64;
    let mut tick = 0u64;
    while started.elapsed() < duration {
        tick += 1;
        parts += u64::from(rand::rng().random_bool(0.4));
        let temp = 60.0 + rand::rng().random_range(-3.0..3.0_f64);
        let (topic, message) = if tick.is_multiple_of(5) {
            (
                format!("spBv1.0/{SPARKPLUG_GROUP}/NDATA/{SPARKPLUG_NODE}"),
                next(
                    "NDATA",
                    &node,
                    vec![data_metric(
                        2,
                        MetricValue::DoubleValue(40.0 + (tick % 7) as f64),
                    )],
                ),
            )
        } else {
            (
                format!("spBv1.0/{SPARKPLUG_GROUP}/DDATA/{SPARKPLUG_NODE}/{SPARKPLUG_DEVICE}"),
                next(
                    "DDATA",
                    &device,
                    vec![
                        data_metric(10, MetricValue::DoubleValue(temp)),
                        data_metric(12, MetricValue::LongValue(parts)),
                    ],
                ),
            )
        };
        send(&mut publisher, topic, message).await;
        let pause = Duration::from_millis(rand::rng().random_range(150..250));
        tokio::time::sleep(pause).await;
    }
    Ok(())
}
