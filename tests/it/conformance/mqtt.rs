//! The MQTT sink against a scripted MQTT 5 broker: a real MQTT peer on
//! loopback (rumqttc's packet codec) that answers each batch of publishes
//! from the script — PUBACKs, PUBACKs with refusal reason codes, a
//! connection dropped after a prefix, acks held back or late.
//!
//! A batch, for the broker, is what the sink writes before it waits: the
//! sink writes a whole batch at once and sends nothing more until it is
//! acknowledged, so the publishes that arrive before a quiet gap are one
//! batch. Scenarios that need an upstream to name no event (bisection) or
//! to ask for a delay (`Retry-After`) do not exist in MQTT and are not run.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use plantrelay::config::Config;
use plantrelay::sinks::ForwarderSettings;
use plantrelay::sinks::mqtt::MqttSink;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubAckReason, PubComp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::conformance::rig::{Reply, SINK, Upstream};
use crate::support::agent::{load_config, minimal_config_text};

/// The sink's acknowledgement timeout in these scenarios.
const TIMEOUT: Duration = Duration::from_secs(1);

/// How long the broker waits for more publishes before it takes what it
/// has as one batch.
const QUIET: Duration = Duration::from_millis(40);

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    kept: Mutex<Vec<u64>>,
}

pub struct MqttUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
}

impl MqttUpstream {
    pub async fn new() -> MqttUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, s.clone()));
            }
        });
        MqttUpstream {
            addr,
            shared,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self, batch_max_events: usize) -> Config {
        let sink = format!(
            r#"
[[sinks.mqtt]]
name = "{SINK}"
url = "mqtt://{addr}"
protocol = "v5"
retry_initial = "50ms"
retry_max = "500ms"
timeout = "{timeout}ms"
batch_linger = "0s"
batch_max_events = {batch_max_events}
"#,
            addr = self.addr,
            timeout = TIMEOUT.as_millis(),
        );
        let state = self.dir.path().join("state");
        let text = minimal_config_text("gw-conformance", &state, "127.0.0.1:0", &sink);
        load_config(self.dir.path(), &text)
    }
}

impl Upstream for MqttUpstream {
    type S = MqttSink;

    fn script(&self, replies: Vec<Reply>) {
        for r in &replies {
            assert!(
                !matches!(
                    r,
                    Reply::Reject(None) | Reply::Retry(Some(_)) | Reply::Panic
                ),
                "an MQTT broker cannot answer {r:?}"
            );
        }
        self.shared.script.lock().unwrap().extend(replies);
    }

    fn sink(&self) -> MqttSink {
        let cfg = self.config(100);
        MqttSink::new(&cfg.sinks.mqtt[0], &cfg.agent.id).unwrap()
    }

    fn settings(&self, batch_max_events: usize) -> ForwarderSettings {
        MqttSink::settings(&self.config(batch_max_events).sinks.mqtt[0])
    }

    fn received(&self) -> Vec<u64> {
        self.shared.kept.lock().unwrap().clone()
    }

    fn timeout(&self) -> Duration {
        TIMEOUT
    }
}

/// The next packet, or `None` when the connection ended.
async fn read(sock: &mut TcpStream, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        match Packet::read(buf, None) {
            Ok(p) => return Some(p),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("malformed packet from the sink: {e}"),
        }
        if sock.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn write(sock: &mut TcpStream, packets: Vec<Packet>) -> Option<()> {
    let mut out = BytesMut::new();
    for p in packets {
        p.write(&mut out, None).unwrap();
    }
    sock.write_all(&out).await.ok()
}

/// The seq of a publish: the CloudEvent's `sequence`.
fn seq_of(payload: &[u8]) -> u64 {
    let ce: serde_json::Value = serde_json::from_slice(payload).unwrap();
    ce["sequence"].as_u64().unwrap()
}

fn puback(pkid: u16, reason: PubAckReason) -> Packet {
    Packet::PubAck(PubAck {
        pkid,
        reason,
        properties: None,
    })
}

/// One connection of the sink.
async fn serve(mut sock: TcpStream, shared: Arc<Shared>) {
    let mut buf = BytesMut::new();
    match read(&mut sock, &mut buf).await {
        Some(Packet::Connect(..)) => {}
        other => panic!("expected CONNECT, got {other:?}"),
    }
    let connack = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
        properties: None,
    });
    if write(&mut sock, vec![connack]).await.is_none() {
        return;
    }
    loop {
        // A batch: the publishes up to a quiet gap.
        let mut batch: Vec<(u16, u64)> = Vec::new();
        loop {
            let next = if batch.is_empty() {
                read(&mut sock, &mut buf).await
            } else {
                match tokio::time::timeout(QUIET, read(&mut sock, &mut buf)).await {
                    Ok(p) => p,
                    Err(_) => break,
                }
            };
            match next {
                None | Some(Packet::Disconnect(..)) => return,
                Some(Packet::Publish(p)) => batch.push((p.pkid, seq_of(&p.payload))),
                Some(Packet::PingReq(_)) => {
                    write(&mut sock, vec![Packet::PingResp(PingResp)]).await;
                }
                Some(Packet::PubRel(r)) => {
                    write(&mut sock, vec![Packet::PubComp(PubComp::new(r.pkid, None))]).await;
                }
                Some(other) => panic!("unexpected packet from the sink: {other:?}"),
            }
        }
        let reply = shared
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Reply::Ack);
        let keep = |upto: usize| {
            shared
                .kept
                .lock()
                .unwrap()
                .extend(batch.iter().take(upto).map(|(_, s)| *s));
        };
        let acks = |upto: usize| -> Vec<Packet> {
            batch
                .iter()
                .take(upto)
                .map(|(pkid, _)| puback(*pkid, PubAckReason::Success))
                .collect()
        };
        match reply {
            Reply::Ack => {
                keep(batch.len());
                write(&mut sock, acks(batch.len())).await;
            }
            Reply::Slow(d) => {
                tokio::time::sleep(d).await;
                keep(batch.len());
                write(&mut sock, acks(batch.len())).await;
            }
            Reply::Partial(n) => {
                keep(n);
                write(&mut sock, acks(n)).await;
                return;
            }
            Reply::Retry(None) => return,
            Reply::Reject(Some(index))
            | Reply::RejectAfter {
                index: Some(index), ..
            } => {
                keep(index);
                let mut packets = acks(index);
                packets.push(puback(batch[index].0, PubAckReason::PayloadFormatInvalid));
                // What follows the refused event is not taken either.
                packets.extend(
                    batch[index + 1..]
                        .iter()
                        .map(|(pkid, _)| puback(*pkid, PubAckReason::QuotaExceeded)),
                );
                write(&mut sock, packets).await;
            }
            Reply::Timeout => {
                // No answer: the sink gives up and drops the connection.
                while read(&mut sock, &mut buf).await.is_some() {}
                return;
            }
            other => panic!("an MQTT broker cannot answer {other:?}"),
        }
    }
}
