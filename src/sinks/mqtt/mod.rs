//! The MQTT sink: one PUBLISH (QoS 1 or 2) per event into an upstream
//! broker, in journal order, on the project's own MQTT link
//! ([`crate::mqtt::link`], as the MQTT source has it).
//!
//! A batch is handed to the connection's task, which writes its publishes
//! (within the broker's Receive Maximum), answers PUBRECs with PUBRELs,
//! pings when the link is quiet and reports, per batch, the acknowledged
//! prefix, the publish the broker refused (MQTT 5 reason codes) or why the
//! connection ended. It maps that to a [`SendOutcome`]; it must never decide
//! about cursors or dead letters.
//!
//! Sessions are clean: after a reconnect nothing of the old connection is
//! resumed, the forwarder republishes from the first unacknowledged event,
//! and receivers drop what they already have by the CloudEvents id (in the
//! payload with `format = "cloudevents_json"`, in the `id` user property
//! with `format = "data"` over MQTT 5).
//!
//! - PUBACK / PUBCOMP: delivered.
//! - Connection lost, no acknowledgement within `timeout`, and the MQTT 5
//!   refusals that speak of the broker or of our rights (0x80 unspecified,
//!   0x87 not authorized, 0x91 packet id in use, 0x97 quota exceeded):
//!   retry. A broker's ACL is fixed by people; dead-lettering everything
//!   until then would be worse than waiting.
//! - The refusals that speak of the event (0x83 implementation specific,
//!   0x90 topic name invalid, 0x99 payload format invalid), and an event
//!   larger than the broker's Maximum Packet Size: rejected, naming the
//!   event.

mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::{ForwarderSettings, SendOutcome, Sink};
use crate::config::{MqttProtocol, MqttSinkConfig, MqttSinkFormat};
use crate::event::StoredEvent;
use crate::mqtt::link::{Conn, LinkSettings, OutgoingPublish, Refusal};

use task::Link;

/// Errors building the sink from its config; they name the sink.
#[derive(Debug, thiserror::Error)]
#[error("sinks.mqtt '{sink}': {detail}")]
pub struct MqttSinkError {
    pub sink: String,
    pub detail: String,
}

pub struct MqttSink {
    name: String,
    /// `mqtt(s)://host:port`, for logs and errors.
    broker: String,
    link: LinkSettings,
    qos: u8,
    retain: bool,
    format: MqttSinkFormat,
    topic: Template,
    agent_id: String,
    timeout: Duration,
    session: Mutex<Option<Session>>,
}

/// A live connection: its task and the way to hand it batches.
struct Session {
    jobs: mpsc::Sender<Job>,
    task: JoinHandle<()>,
}

/// One batch for the connection task.
struct Job {
    publishes: Vec<OutgoingPublish>,
    /// The acknowledged prefix so far, readable after a timeout.
    acked: Arc<AtomicUsize>,
    reply: oneshot::Sender<JobEnd>,
}

/// How a batch ended on the connection.
#[derive(Debug)]
enum JobEnd {
    Delivered,
    /// The broker refused the publish at `index` (the events before it are
    /// delivered).
    Refused {
        index: usize,
        refusal: Refusal,
    },
    /// The event at `index` cannot be published at all (too large).
    Unpublishable {
        index: usize,
        reason: String,
    },
    /// The connection ended; the acknowledged prefix is in `Job::acked`.
    Lost(String),
}

impl MqttSink {
    pub fn new(cfg: &MqttSinkConfig, agent_id: &str) -> Result<MqttSink, MqttSinkError> {
        let err = |detail: String| MqttSinkError {
            sink: cfg.name.clone(),
            detail,
        };
        let (host, port, tls_wanted) = crate::mqtt::endpoint(&cfg.url)
            .ok_or_else(|| err(format!("url {} has no host", cfg.url)))?;
        let credentials = crate::mqtt::login(cfg.username.as_ref(), cfg.password_file.as_ref())
            .map_err(|e| err(e.to_string()))?;
        let tls = if tls_wanted {
            Some(
                crate::mqtt::client_tls(
                    cfg.ca_file.as_deref(),
                    cfg.client_cert.as_deref(),
                    cfg.client_key.as_deref(),
                )
                .map_err(|e| err(e.to_string()))?,
            )
        } else {
            None
        };
        let client_id = cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("plantrelay-{agent_id}-{}", cfg.name));
        let link = LinkSettings {
            protocol: cfg.protocol,
            host: host.clone(),
            port,
            client_id,
            keep_alive: cfg.keep_alive,
            clean_session: true,
            credentials,
            tls,
            // What the broker may send us unacknowledged: nothing is
            // subscribed, so this only bounds a misbehaving broker.
            max_inflight: 16,
            io_timeout: cfg.timeout,
            quickack: true,
            topics: Vec::new(),
        };
        Ok(MqttSink {
            name: cfg.name.clone(),
            broker: format!("{}://{host}:{port}", cfg.url.scheme()),
            link,
            qos: cfg.qos,
            retain: cfg.retain,
            format: cfg.format,
            topic: Template::parse(&cfg.topic),
            agent_id: agent_id.to_owned(),
            timeout: cfg.timeout,
            session: Mutex::new(None),
        })
    }

    /// The forwarder settings of this sink's config.
    pub fn settings(cfg: &MqttSinkConfig) -> ForwarderSettings {
        ForwarderSettings::of(cfg)
    }

    /// One event as a publish.
    fn publish_of(&self, e: &StoredEvent) -> OutgoingPublish {
        let topic = self.topic.render(&self.agent_id, e);
        let v5 = self.link.protocol == MqttProtocol::V5;
        match self.format {
            MqttSinkFormat::CloudeventsJson => {
                let mut json = Vec::with_capacity(e.size() + 200);
                e.write_cloudevent(&self.agent_id, &mut json);
                OutgoingPublish {
                    topic,
                    payload: Bytes::from(json),
                    content_type: v5.then(|| "application/cloudevents+json".to_owned()),
                    user_properties: Vec::new(),
                }
            }
            MqttSinkFormat::Data => {
                let (mut attributes, payload) = e.binary_mode(&self.agent_id);
                // The MQTT binding carries `datacontenttype` as the Content
                // Type property, not as a user property.
                let content_type = match attributes.iter().position(|(n, _)| n == "datacontenttype")
                {
                    Some(i) => Some(attributes.remove(i).1),
                    None => Some("application/json".to_owned()),
                };
                OutgoingPublish {
                    topic,
                    payload: Bytes::from(payload),
                    content_type: content_type.filter(|_| v5),
                    user_properties: if v5 { attributes } else { Vec::new() },
                }
            }
        }
    }

    /// Connects and starts the connection task.
    async fn open(&self) -> Result<Session, String> {
        let connected = Conn::connect(&self.link)
            .await
            .map_err(|e| format!("broker {}: {e}", self.broker))?;
        info!(sink = %self.name, broker = %self.broker, client_id = %self.link.client_id, "connected to the upstream broker");
        let window = connected
            .receive_maximum
            .map_or(usize::from(u16::MAX), usize::from)
            .max(1);
        let link = Link {
            sink: self.name.clone(),
            conn: connected.conn,
            keep_alive: connected.keep_alive,
            qos: self.qos,
            retain: self.retain,
            window,
            max_packet: connected.max_packet_size.map(|m| m as usize),
            next_pkid: 1,
        };
        let (jobs, rx) = mpsc::channel(1);
        let (sink, broker) = (self.name.clone(), self.broker.clone());
        let task = tokio::spawn(async move {
            let reason = link.run(rx).await;
            debug!(sink = %sink, broker = %broker, reason = %reason, "upstream connection ended");
        });
        Ok(Session { jobs, task })
    }
}

/// A refusal that speaks of the event rather than of the broker or of our
/// rights (see the module doc).
fn refuses_the_event(code: u8) -> bool {
    matches!(code, 0x83 | 0x90 | 0x99)
}

/// A batch as publishes (topics rendered, payloads encoded).
pub struct Publishes(Vec<OutgoingPublish>);

impl Sink for MqttSink {
    type Encoded = Publishes;

    fn encode(&self, batch: &[StoredEvent]) -> Publishes {
        Publishes(batch.iter().map(|e| self.publish_of(e)).collect())
    }

    async fn send(&self, batch: &[StoredEvent], Publishes(publishes): Publishes) -> SendOutcome {
        if batch.is_empty() {
            return SendOutcome::Ack;
        }
        let mut session = self.session.lock().await;
        if session.as_ref().is_none_or(|s| s.jobs.is_closed()) {
            *session = None;
            match self.open().await {
                Ok(s) => *session = Some(s),
                Err(reason) => return SendOutcome::retry(None, reason),
            }
        }
        let Some(live) = session.as_ref() else {
            return SendOutcome::retry(None, "not connected");
        };
        let acked = Arc::new(AtomicUsize::new(0));
        let (reply, answer) = oneshot::channel();
        let job = Job {
            publishes,
            acked: acked.clone(),
            reply,
        };
        if live.jobs.send(job).await.is_err() {
            *session = None;
            return SendOutcome::retry(None, format!("broker {}: connection lost", self.broker));
        }
        let end = tokio::time::timeout(self.timeout, answer).await;
        let prefix = acked.load(Ordering::Acquire).min(batch.len());
        match end {
            Ok(Ok(JobEnd::Delivered)) => SendOutcome::Ack,
            Ok(Ok(JobEnd::Refused { index, refusal })) => {
                let reason = format!(
                    "broker {} refused the publish: {}",
                    self.broker, refusal.reason
                );
                if refuses_the_event(refusal.code) {
                    SendOutcome::Reject {
                        acked: index,
                        index: Some(index),
                        reason,
                    }
                } else {
                    SendOutcome::Retry {
                        acked: index,
                        after: None,
                        reason,
                    }
                }
            }
            Ok(Ok(JobEnd::Unpublishable { index, reason })) => SendOutcome::Reject {
                acked: index,
                index: Some(index),
                reason,
            },
            Ok(Ok(JobEnd::Lost(reason))) => {
                *session = None;
                SendOutcome::Retry {
                    acked: prefix,
                    after: None,
                    reason: format!("broker {}: {reason}", self.broker),
                }
            }
            Ok(Err(_)) => {
                *session = None;
                SendOutcome::Retry {
                    acked: prefix,
                    after: None,
                    reason: format!("broker {}: connection task ended", self.broker),
                }
            }
            Err(_) => {
                // What is in flight on this connection is abandoned with it:
                // a fresh connection resends from the first unacknowledged
                // event, and a late PUBACK cannot be mistaken for it.
                if let Some(s) = session.take() {
                    s.task.abort();
                }
                SendOutcome::Retry {
                    acked: prefix,
                    after: None,
                    reason: format!(
                        "broker {}: {} of {} publishes acknowledged within {}",
                        self.broker,
                        prefix,
                        batch.len(),
                        humantime::format_duration(self.timeout)
                    ),
                }
            }
        }
    }

    async fn connect(&self) -> Result<(), String> {
        let mut session = self.session.lock().await;
        if session.as_ref().is_some_and(|s| !s.jobs.is_closed()) {
            return Ok(());
        }
        *session = Some(self.open().await?);
        Ok(())
    }

    async fn close(&self) {
        let Some(s) = self.session.lock().await.take() else {
            return;
        };
        // Dropping the sender tells the task to DISCONNECT and end.
        drop(s.jobs);
        let mut task = s.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// A topic template: `{agent}`, `{source}` and `{stream}` (validated by
/// check-config).
#[derive(Debug, Clone)]
struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Agent,
    Source,
    Stream,
}

impl Template {
    fn parse(template: &str) -> Template {
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            let next = ["{agent}", "{source}", "{stream}"]
                .iter()
                .filter_map(|p| rest.find(p).map(|at| (at, *p)))
                .min();
            match next {
                Some((at, placeholder)) => {
                    if at > 0 {
                        parts.push(Part::Text(rest[..at].to_owned()));
                    }
                    parts.push(match placeholder {
                        "{agent}" => Part::Agent,
                        "{source}" => Part::Source,
                        _ => Part::Stream,
                    });
                    rest = &rest[at + placeholder.len()..];
                }
                None => {
                    parts.push(Part::Text(rest.to_owned()));
                    rest = "";
                }
            }
        }
        Template { parts }
    }

    /// The topic of one event. Values lose what a publish topic must not
    /// hold (the wildcards `+` and `#`, NUL), so that no event can make its
    /// own topic invalid.
    fn render(&self, agent: &str, e: &StoredEvent) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            let value = match part {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Agent => agent,
                Part::Source => e.source.as_str(),
                Part::Stream => e.stream.as_str(),
            };
            out.extend(value.chars().map(|c| match c {
                '+' | '#' | '\0' => '_',
                c => c,
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Class;

    fn event(stream: &str) -> StoredEvent {
        StoredEvent {
            seq: 7,
            source: "mes".into(),
            id: "order-1".into(),
            stream: stream.into(),
            stream_seq: 3,
            class: Class::Critical,
            event_type: "com.example.order".into(),
            source_time: Some("2026-12-05T10:00:00Z".into()),
            recv_time_us: 1,
            data: br#"{"qty":5}"#.to_vec(),
            attrs: Some(r#"{"datacontenttype":"application/json","line":"3"}"#.into()),
        }
    }

    #[test]
    fn topics_render_placeholders_and_lose_wildcards() {
        let t = Template::parse("plants/{agent}/{source}/{stream}/events");
        assert_eq!(
            t.render("gw-1", &event("line3/press")),
            "plants/gw-1/mes/line3/press/events"
        );
        assert_eq!(
            t.render("gw-1", &event("a+b/#")),
            "plants/gw-1/mes/a_b/_/events"
        );
        assert_eq!(Template::parse("fixed").render("gw", &event("x")), "fixed");
    }

    #[test]
    fn refusals_of_the_event_reject_and_the_others_retry() {
        for code in [0x83, 0x90, 0x99] {
            assert!(refuses_the_event(code), "{code:#x}");
        }
        for code in [0x80, 0x87, 0x91, 0x97] {
            assert!(!refuses_the_event(code), "{code:#x}");
        }
    }

    #[test]
    fn data_format_over_v5_carries_the_attributes_as_user_properties() {
        let (attrs, payload) = event("line3").binary_mode("gw-1");
        assert_eq!(payload, br#"{"qty":5}"#);
        let get = |n: &str| attrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("id"), Some("order-1"));
        assert_eq!(get("source"), Some("plantrelay://gw-1/mes"));
        assert_eq!(get("sequence"), Some("7"));
        assert_eq!(get("streamsequence"), Some("3"));
        assert_eq!(get("deliveryclass"), Some("critical"));
        assert_eq!(get("line"), Some("3"));
        assert_eq!(get("datacontenttype"), Some("application/json"));
    }
}
