//! What the tests of the per-event sinks (MQTT, JetStream) share: MES
//! events to post, and the check of what an upstream received.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

/// What an MQTT subscriber received: topic, payload and (MQTT 5) user
/// properties and content type.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

pub type Inbox = Arc<Mutex<Vec<Received>>>;

/// One turn of a subscriber's event loop, whatever its MQTT version.
enum Polled {
    SubAck,
    Message(Received),
    Other,
    /// The broker went away (or restarts): polling again reconnects.
    Lost,
}

/// rumqttc's v3.1.1 and v5 event loops, polled alike.
trait SubscriberLoop: Send + 'static {
    fn turn(&mut self) -> impl std::future::Future<Output = Polled> + Send;
}

impl SubscriberLoop for rumqttc::EventLoop {
    async fn turn(&mut self) -> Polled {
        match self.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => Polled::SubAck,
            Ok(Event::Incoming(Packet::Publish(p))) => Polled::Message(Received {
                topic: p.topic.clone(),
                payload: p.payload.to_vec(),
                user_properties: Vec::new(),
                content_type: None,
            }),
            Ok(_) => Polled::Other,
            Err(_) => Polled::Lost,
        }
    }
}

impl SubscriberLoop for rumqttc::v5::EventLoop {
    async fn turn(&mut self) -> Polled {
        use rumqttc::v5::{Event as E5, mqttbytes::v5::Packet as P5};
        match self.poll().await {
            Ok(E5::Incoming(P5::SubAck(_))) => Polled::SubAck,
            Ok(E5::Incoming(P5::Publish(p))) => {
                let props = p.properties.clone().unwrap_or_default();
                Polled::Message(Received {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                    user_properties: props.user_properties,
                    content_type: props.content_type,
                })
            }
            Ok(_) => Polled::Other,
            Err(_) => Polled::Lost,
        }
    }
}

/// Runs `eventloop` for the rest of the test, keeping what arrives;
/// `subscribe` sends the SUBSCRIBE, and this returns once it is acknowledged.
async fn run_subscriber<F>(mut eventloop: impl SubscriberLoop, subscribe: F) -> Inbox
where
    F: std::future::Future<Output = ()>,
{
    let inbox: Inbox = Arc::default();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let sink = inbox.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.turn().await {
                Polled::SubAck => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Polled::Message(m) => sink.lock().unwrap().push(m),
                Polled::Other => {}
                Polled::Lost => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    subscribe.await;
    tokio::time::timeout(Duration::from_secs(60), subscribed)
        .await
        .unwrap()
        .unwrap();
    inbox
}

/// A QoS 1 MQTT 3.1.1 subscriber to `filter` on `addr`, subscribed when
/// this returns and connected until the test ends (it reconnects after a
/// broker restart). With `persistent`, its session is kept by the broker:
/// what arrives while it is away is delivered after.
pub async fn subscribe(addr: SocketAddr, client_id: &str, persistent: bool, filter: &str) -> Inbox {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_clean_session(!persistent);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, eventloop) = AsyncClient::new(opts, 1000);
    let inbox = run_subscriber(eventloop, async {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    })
    .await;
    // The client lives as long as its event loop.
    std::mem::forget(client);
    inbox
}

/// A QoS 1 MQTT 5 subscriber to `filter` on `addr` (user properties and
/// content type kept), subscribed when this returns.
pub async fn subscribe_v5(addr: std::net::SocketAddr, filter: &str) -> Inbox {
    use rumqttc::v5::{AsyncClient as C5, MqttOptions as O5, mqttbytes::QoS as Q5};
    let mut opts = O5::new(
        format!("check5-{}", rand::random::<u32>()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, eventloop) = C5::new(opts, 1000);
    let inbox = run_subscriber(eventloop, async {
        client.subscribe(filter, Q5::AtLeastOnce).await.unwrap();
    })
    .await;
    std::mem::forget(client);
    inbox
}

/// The payloads received, as CloudEvents.
pub fn cloudevents(inbox: &Inbox) -> Vec<Value> {
    inbox
        .lock()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).expect("a CloudEvent in JSON"))
        .collect()
}

/// Waits until `cond` holds, at most a minute.
pub async fn until(what: &str, cond: impl FnMut() -> bool) {
    until_within(what, Duration::from_secs(60), cond).await;
}

/// Waits until `cond` holds, at most `timeout`.
pub async fn until_within(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` MES events over `streams` streams, ids `<prefix>-<i>`.
pub fn events(prefix: &str, range: std::ops::Range<usize>, streams: usize) -> Vec<Value> {
    range
        .map(|i| {
            json!({
                "specversion": "1.0",
                "id": format!("{prefix}-{i}"),
                "source": "mes",
                "type": "com.example.order",
                "subject": format!("line{}/orders", i % streams),
                "data": {"n": i},
            })
        })
        .collect()
}

/// Checks a subscriber's CloudEvents: every id of `expected` there; per
/// stream, `streamsequence` rises over first occurrences; the only
/// duplicates are whole re-sends of the same id. Returns the duplicates.
pub fn check(received: &[Value], expected: &HashSet<String>) -> usize {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut dups = 0;
    for ce in received {
        let id = ce["id"].as_str().expect("an id").to_owned();
        if !seen.insert(id.clone()) {
            dups += 1;
            continue;
        }
        let stream = ce["subject"].as_str().unwrap().to_owned();
        let seq = ce["streamsequence"].as_u64().unwrap();
        let prev = last.insert(stream.clone(), seq).unwrap_or(0);
        assert!(
            seq > prev,
            "stream {stream}: {id} (streamsequence {seq}) after {prev}: out of order"
        );
    }
    let missing: Vec<_> = expected.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {} ids missing, e.g. {missing:?}",
        expected.difference(&seen).count(),
        expected.len()
    );
    dups
}
