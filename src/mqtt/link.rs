//! One MQTT connection, MQTT 3.1.1 or 5, on rumqttc's packet codec
//! (`rumqttc::mqttbytes`): connect (TCP, TLS, CONNECT/CONNACK), read
//! packets, write acks, PUBCOMP, SUBSCRIBE, PINGREQ and DISCONNECT for the
//! source; PUBLISH and PUBREL for the sink.
//!
//! Why not rumqttc's `EventLoop`: it writes at most one queued request (an
//! ack) per turn while it reads up to ten packets per turn, so under a
//! flood acks fall far behind commits (measured against Mosquitto, which
//! does not cap a 3.1.1 subscriber's in-flight window: 1,703 PUBLISHes sent
//! against 85 PUBACKs received); it cannot stop reading without also
//! stopping acks and pings, so there is no back-pressure; and after a
//! reconnect it answers the broker's PUBREL of an earlier QoS 2 message with
//! an "unsolicited" error and drops the connection, again and again. Here
//! the source owns the socket: every committed ack goes out in one write,
//! reading pauses while acks and pings continue, and a PUBREL is always
//! answered.
//!
//! This file knows the wire; it never decides when to ack, publish,
//! reconnect or subscribe (that is the source's loop and the sink's
//! connection task). No state survives a
//! connection: a reconnect starts from a fresh `Conn` (the broker keeps the
//! session), so no client-side protocol state can wedge.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as p4;
use rumqttc::tokio_rustls::TlsConnector;
use rumqttc::v5::mqttbytes::v5 as p5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::MqttProtocol;

/// The MQTT v5 PUBLISH properties that are part of the message as the
/// publisher sent it, and so the same on every redelivery. Excluded: the
/// message expiry interval (the broker counts it down), the topic alias and
/// subscription identifiers (they belong to one connection or subscription).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// The largest MQTT packet (256 MiB): the source accepts everything the
/// protocol allows so that an over-`max_payload` message can still be
/// received, rejected and acknowledged instead of breaking the connection
/// (and being redelivered) forever.
pub(crate) const MAX_PACKET: usize = 268_435_455 + 5;

/// The largest packet the source sends (SUBSCRIBE with every filter).
const MAX_OUTGOING: usize = 1 << 20;

/// Everything needed to connect; derived once from the config.
#[derive(Clone)]
pub(crate) struct LinkSettings {
    pub protocol: MqttProtocol,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT 5: the Receive Maximum announced in CONNECT (the broker sends
    /// no more unacknowledged QoS 1/2 messages than this).
    pub max_inflight: u16,
    /// Bound on TCP + TLS + CONNECT/CONNACK, and on every write.
    pub io_timeout: Duration,
    /// Acknowledge every TCP segment from the broker at once (Linux
    /// `TCP_QUICKACK`, set again after each read). For the sink: it waits
    /// for a batch's PUBACKs without sending anything, and a broker that
    /// leaves Nagle's algorithm on (Mosquitto's default) holds all PUBACKs
    /// after the first until our delayed ACK comes, 40 ms later: 2,200
    /// events/s instead of tens of thousands.
    pub quickack: bool,
    pub topics: Vec<(String, u8)>,
}

/// A received PUBLISH, protocol-independent.
#[derive(Debug)]
pub(crate) struct IncomingPublish {
    pub pkid: u16,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
    pub properties: Option<Properties>,
}

/// A packet from the broker, as far as the source cares.
#[derive(Debug)]
pub(crate) enum Incoming {
    Publish(IncomingPublish),
    /// QoS 2, second half: to be answered with PUBCOMP.
    PubRel(u16),
    /// Per topic of the SUBSCRIBE: `None` granted, `Some(reason)` refused.
    SubAck(Vec<Option<String>>),
    /// The broker ends the connection (MQTT 5 DISCONNECT), with its reason.
    Disconnect(String),
    ConnAck {
        session_present: bool,
        refused: Option<String>,
        server_keep_alive: Option<u16>,
        /// MQTT 5: most unacknowledged QoS 1/2 publishes the broker takes.
        receive_maximum: Option<u16>,
        /// MQTT 5: the largest packet the broker takes.
        max_packet_size: Option<u32>,
    },
    /// QoS 1 publish acknowledged; `refused`: an MQTT 5 reason code of
    /// 0x80 or more, with its text.
    PubAck {
        pkid: u16,
        refused: Option<Refusal>,
    },
    /// QoS 2, first half of our publish; `refused` as for PUBACK.
    PubRec {
        pkid: u16,
        refused: Option<Refusal>,
    },
    /// QoS 2, our publish completed.
    PubComp(u16),
    /// PINGRESP and anything else: proof of life only.
    Other,
}

/// An MQTT 5 broker's refusal of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: u8,
    pub reason: String,
}

/// A publish of the sink, protocol-independent.
#[derive(Debug, Clone)]
pub(crate) struct OutgoingPublish {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 only: the Content Type property.
    pub content_type: Option<String>,
    /// MQTT 5 only: user properties.
    pub user_properties: Vec<(String, String)>,
}

/// Why a connection failed or ended.
#[derive(Debug)]
pub(crate) struct LinkError(pub String);

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An established connection.
pub(crate) struct Conn {
    io: Box<dyn Io>,
    /// The TCP socket again (a duplicate descriptor), to set
    /// `TCP_QUICKACK` on; see [`LinkSettings::quickack`].
    quickack: Option<socket2::Socket>,
    /// Whether reads set `TCP_QUICKACK` now ([`Conn::set_quickack`]).
    quickack_on: bool,
    protocol: MqttProtocol,
    rbuf: BytesMut,
    wbuf: BytesMut,
    io_timeout: Duration,
}

/// What `connect` returns.
pub(crate) struct Connected {
    pub conn: Conn,
    pub session_present: bool,
    /// The keep-alive in force (MQTT 5 brokers may impose their own).
    pub keep_alive: Duration,
    /// MQTT 5: most unacknowledged QoS 1/2 publishes the broker takes.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the broker takes.
    pub max_packet_size: Option<u32>,
}

fn qos4(q: u8) -> rumqttc::mqttbytes::QoS {
    use rumqttc::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

impl Conn {
    /// Opens TCP (and TLS), sends CONNECT and waits for the CONNACK, all
    /// within `io_timeout`.
    pub async fn connect(s: &LinkSettings) -> Result<Connected, LinkError> {
        match tokio::time::timeout(s.io_timeout, Conn::connect_inner(s)).await {
            Ok(r) => r,
            Err(_) => Err(LinkError(format!(
                "connect timed out after {}",
                humantime::format_duration(s.io_timeout)
            ))),
        }
    }

    async fn connect_inner(s: &LinkSettings) -> Result<Connected, LinkError> {
        let tcp = TcpStream::connect((s.host.as_str(), s.port))
            .await
            .map_err(|e| LinkError(format!("TCP connect to {}:{}: {e}", s.host, s.port)))?;
        let _ = tcp.set_nodelay(true);
        let quickack = if s.quickack {
            use std::os::fd::AsFd;
            tcp.as_fd()
                .try_clone_to_owned()
                .ok()
                .map(socket2::Socket::from)
        } else {
            None
        };
        let io: Box<dyn Io> = match &s.tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(s.host.clone())
                    .map_err(|e| LinkError(format!("TLS server name {:?}: {e}", s.host)))?;
                let tls = TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| LinkError(format!("TLS handshake: {e}")))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let mut conn = Conn {
            io,
            quickack_on: quickack.is_some(),
            quickack,
            protocol: s.protocol,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            io_timeout: s.io_timeout,
        };
        conn.write_connect(s)?;
        conn.flush().await?;
        match conn.read().await? {
            Incoming::ConnAck {
                refused: Some(reason),
                ..
            } => Err(LinkError(format!(
                "the broker refused the connection: {reason}"
            ))),
            Incoming::ConnAck {
                session_present,
                refused: None,
                server_keep_alive,
                receive_maximum,
                max_packet_size,
            } => Ok(Connected {
                conn,
                session_present,
                keep_alive: server_keep_alive
                    .filter(|k| *k > 0)
                    .map_or(s.keep_alive, |k| Duration::from_secs(u64::from(k))),
                receive_maximum,
                max_packet_size,
            }),
            other => Err(LinkError(format!(
                "expected CONNACK from the broker, got {other:?}"
            ))),
        }
    }

    fn write_connect(&mut self, s: &LinkSettings) -> Result<(), LinkError> {
        let keep_alive = u16::try_from(s.keep_alive.as_secs()).unwrap_or(u16::MAX);
        let written = match s.protocol {
            MqttProtocol::V311 => {
                let mut c = p4::Connect::new(s.client_id.clone());
                c.keep_alive = keep_alive;
                c.clean_session = s.clean_session;
                if let Some((user, pass)) = &s.credentials {
                    c.set_login(user.clone(), pass.clone());
                }
                p4::Packet::Connect(c)
                    .write(&mut self.wbuf, MAX_OUTGOING)
                    .map_err(|e| e.to_string())
            }
            MqttProtocol::V5 => {
                let properties = p5::ConnectProperties {
                    // A v5 session ends with the connection unless it has an
                    // expiry interval; u32::MAX means "never", like a 3.1.1
                    // persistent session.
                    session_expiry_interval: (!s.clean_session).then_some(u32::MAX),
                    receive_maximum: Some(s.max_inflight),
                    max_packet_size: Some(MAX_PACKET as u32),
                    topic_alias_max: None,
                    request_response_info: None,
                    request_problem_info: None,
                    user_properties: Vec::new(),
                    authentication_method: None,
                    authentication_data: None,
                };
                let c = p5::Connect {
                    keep_alive,
                    client_id: s.client_id.clone(),
                    clean_start: s.clean_session,
                    properties: Some(properties),
                };
                let login = s.credentials.as_ref().map(|(u, p)| p5::Login {
                    username: u.clone(),
                    password: p.clone(),
                });
                p5::Packet::Connect(c, None, login)
                    .write(&mut self.wbuf, Some(MAX_OUTGOING as u32))
                    .map_err(|e| e.to_string())
            }
        };
        written
            .map(|_| ())
            .map_err(|e| LinkError(format!("cannot encode CONNECT: {e}")))
    }

    /// Turns the immediate TCP ACKs of a link set up with
    /// [`LinkSettings::quickack`] off or on again (a no-op on one without).
    pub fn set_quickack(&mut self, on: bool) {
        self.quickack_on = on && self.quickack.is_some();
    }

    /// The next packet from the broker. Cancel-safe: bytes read stay in
    /// the buffer until a whole packet is there.
    pub async fn read(&mut self) -> Result<Incoming, LinkError> {
        loop {
            if !self.rbuf.is_empty()
                && let Some(packet) = self.parse()?
            {
                return Ok(packet);
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| LinkError(format!("read: {e}")))?;
            if n == 0 {
                return Err(LinkError("the broker closed the connection".into()));
            }
            if self.quickack_on
                && let Some(sock) = &self.quickack
            {
                // Linux clears the flag as it sees fit: set it every time.
                let _ = sock.set_tcp_quickack(true);
            }
        }
    }

    /// The next packet already in the read buffer, without any I/O (so a
    /// burst read in one system call is handled in one go).
    pub fn buffered(&mut self) -> Result<Option<Incoming>, LinkError> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        self.parse()
    }

    /// One packet from the read buffer, or `None` when it is incomplete.
    fn parse(&mut self) -> Result<Option<Incoming>, LinkError> {
        parse(self.protocol, &mut self.rbuf)
    }

    fn encode4(&mut self, p: p4::Packet) {
        // Encoding our own small packets into a growable buffer cannot fail.
        let _ = p.write(&mut self.wbuf, MAX_OUTGOING);
    }

    fn encode5(&mut self, p: p5::Packet) {
        let _ = p.write(&mut self.wbuf, Some(MAX_OUTGOING as u32));
    }

    /// Queues the ack of a committed message: PUBACK (QoS 1) or PUBREC
    /// (QoS 2). Nothing for QoS 0.
    pub fn ack(&mut self, pkid: u16, qos: u8) {
        match (self.protocol, qos) {
            (_, 0) => {}
            (MqttProtocol::V311, 1) => self.encode4(p4::Packet::PubAck(p4::PubAck::new(pkid))),
            (MqttProtocol::V311, _) => self.encode4(p4::Packet::PubRec(p4::PubRec::new(pkid))),
            (MqttProtocol::V5, 1) => {
                self.encode5(p5::Packet::PubAck(p5::PubAck::new(pkid, None)));
            }
            (MqttProtocol::V5, _) => {
                self.encode5(p5::Packet::PubRec(p5::PubRec::new(pkid, None)));
            }
        }
    }

    /// Queues the PUBCOMP that answers a PUBREL (always: after a reconnect
    /// the broker may release a message acknowledged on an earlier one).
    pub fn pubcomp(&mut self, pkid: u16) {
        match self.protocol {
            MqttProtocol::V311 => self.encode4(p4::Packet::PubComp(p4::PubComp { pkid })),
            MqttProtocol::V5 => self.encode5(p5::Packet::PubComp(p5::PubComp::new(pkid, None))),
        }
    }

    /// Queues a SUBSCRIBE for every topic with its QoS.
    pub fn subscribe(&mut self, pkid: u16, topics: &[(String, u8)]) {
        match self.protocol {
            MqttProtocol::V311 => self.encode4(p4::Packet::Subscribe(p4::Subscribe {
                pkid,
                filters: topics
                    .iter()
                    .map(|(f, q)| p4::SubscribeFilter::new(f.clone(), qos4(*q)))
                    .collect(),
            })),
            MqttProtocol::V5 => self.encode5(p5::Packet::Subscribe(p5::Subscribe {
                pkid,
                filters: topics
                    .iter()
                    .map(|(f, q)| p5::Filter::new(f.clone(), qos5(*q)))
                    .collect(),
                properties: None,
            })),
        }
    }

    /// Queues a PUBLISH (QoS 1 or 2) of the sink. `Err` when the packet
    /// cannot be encoded (larger than MQTT allows): nothing is queued then.
    pub fn publish(
        &mut self,
        pkid: u16,
        qos: u8,
        retain: bool,
        p: &OutgoingPublish,
    ) -> Result<(), String> {
        let written = match self.protocol {
            MqttProtocol::V311 => {
                let mut publish = p4::Publish::new(p.topic.as_str(), qos4(qos), p.payload.clone());
                publish.pkid = pkid;
                publish.retain = retain;
                p4::Packet::Publish(publish)
                    .write(&mut self.wbuf, MAX_PACKET)
                    .map_err(|e| e.to_string())
            }
            MqttProtocol::V5 => {
                let properties =
                    (p.content_type.is_some() || !p.user_properties.is_empty()).then(|| {
                        p5::PublishProperties {
                            content_type: p.content_type.clone(),
                            user_properties: p.user_properties.clone(),
                            ..Default::default()
                        }
                    });
                let mut publish =
                    p5::Publish::new(p.topic.as_str(), qos5(qos), p.payload.clone(), properties);
                publish.pkid = pkid;
                publish.retain = retain;
                p5::Packet::Publish(publish)
                    .write(&mut self.wbuf, Some(MAX_PACKET as u32))
                    .map_err(|e| e.to_string())
            }
        };
        written.map(|_| ())
    }

    /// Queues the PUBREL that answers the broker's PUBREC of our QoS 2
    /// publish.
    pub fn pubrel(&mut self, pkid: u16) {
        match self.protocol {
            MqttProtocol::V311 => self.encode4(p4::Packet::PubRel(p4::PubRel { pkid })),
            MqttProtocol::V5 => self.encode5(p5::Packet::PubRel(p5::PubRel::new(pkid, None))),
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.wbuf.len()
    }

    pub fn ping(&mut self) {
        match self.protocol {
            MqttProtocol::V311 => self.encode4(p4::Packet::PingReq),
            MqttProtocol::V5 => self.encode5(p5::Packet::PingReq(p5::PingReq)),
        }
    }

    pub fn disconnect(&mut self) {
        match self.protocol {
            MqttProtocol::V311 => self.encode4(p4::Packet::Disconnect),
            MqttProtocol::V5 => self.encode5(p5::Packet::Disconnect(p5::Disconnect::new(
                p5::DisconnectReasonCode::NormalDisconnection,
            ))),
        }
    }

    /// Writes everything queued, within `io_timeout`. Not cancel-safe: call
    /// it from a branch body, never as a `select!` future.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.io_timeout, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(LinkError(format!("write: {e}"))),
            Err(_) => Err(LinkError(format!(
                "write timed out after {} (the broker does not read)",
                humantime::format_duration(self.io_timeout)
            ))),
        }
    }
}

/// One packet from `rbuf`, or `None` when it is incomplete.
///
/// rumqttc answers `InsufficientBytes` both for a frame that has not all
/// arrived and for a whole frame whose fields run past its own end (an MQTT
/// 5 properties length cut off by the end of the frame); in the second
/// case it has already taken the frame out of the buffer. Waiting for more bytes then would
/// lose the packet without a word (a PUBLISH never acknowledged, holding
/// one of the broker's in-flight slots until the session ends), so a
/// buffer that shrank is a malformed packet, as any other decoding error.
fn parse(protocol: MqttProtocol, rbuf: &mut BytesMut) -> Result<Option<Incoming>, LinkError> {
    let before = rbuf.len();
    let incomplete = |rbuf: &mut BytesMut, n: usize| {
        if rbuf.len() < before {
            return Err(LinkError(
                "malformed packet from the broker: its fields run past its end".into(),
            ));
        }
        rbuf.reserve(n);
        Ok(None)
    };
    match protocol {
        MqttProtocol::V311 => match p4::Packet::read(rbuf, MAX_PACKET) {
            Ok(p) => Ok(Some(incoming_v4(p))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => incomplete(rbuf, n),
            Err(e) => Err(LinkError(format!("malformed packet from the broker: {e}"))),
        },
        MqttProtocol::V5 => match p5::Packet::read(rbuf, Some(MAX_PACKET as u32)) {
            Ok(p) => incoming_v5(p).map(Some),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => incomplete(rbuf, n),
            Err(e) => Err(LinkError(format!("malformed packet from the broker: {e}"))),
        },
    }
}

fn incoming_v4(p: p4::Packet) -> Incoming {
    match p {
        p4::Packet::Publish(p) => Incoming::Publish(IncomingPublish {
            pkid: p.pkid,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic,
            payload: p.payload,
            properties: None,
        }),
        p4::Packet::PubRel(r) => Incoming::PubRel(r.pkid),
        p4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        p4::Packet::PubRec(r) => Incoming::PubRec {
            pkid: r.pkid,
            refused: None,
        },
        p4::Packet::PubComp(c) => Incoming::PubComp(c.pkid),
        p4::Packet::SubAck(s) => Incoming::SubAck(
            s.return_codes
                .iter()
                .map(|c| match c {
                    p4::SubscribeReasonCode::Success(_) => None,
                    p4::SubscribeReasonCode::Failure => Some("refused (0x80)".to_owned()),
                })
                .collect(),
        ),
        p4::Packet::ConnAck(c) => Incoming::ConnAck {
            session_present: c.session_present,
            refused: (c.code != p4::ConnectReturnCode::Success).then(|| format!("{:?}", c.code)),
            server_keep_alive: None,
            receive_maximum: None,
            max_packet_size: None,
        },
        _ => Incoming::Other,
    }
}

fn incoming_v5(p: p5::Packet) -> Result<Incoming, LinkError> {
    Ok(match p {
        p5::Packet::Publish(p) => {
            if p.topic.is_empty() {
                return Err(LinkError(
                    "the broker used a topic alias, which the source did not allow".into(),
                ));
            }
            let topic = match String::from_utf8(p.topic.to_vec()) {
                Ok(t) => t,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            Incoming::Publish(IncomingPublish {
                pkid: p.pkid,
                qos: p.qos as u8,
                retain: p.retain,
                topic,
                payload: p.payload,
                properties: p.properties.map(|pp| Properties {
                    payload_format_indicator: pp.payload_format_indicator,
                    content_type: pp.content_type,
                    response_topic: pp.response_topic,
                    correlation_data: pp.correlation_data,
                    user_properties: pp.user_properties,
                }),
            })
        }
        p5::Packet::PubRel(r) => Incoming::PubRel(r.pkid),
        p5::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            refused: refusal(
                puback_code(a.reason),
                format!("{:?}", a.reason),
                a.properties.and_then(|p| p.reason_string),
            ),
        },
        p5::Packet::PubRec(r) => Incoming::PubRec {
            pkid: r.pkid,
            refused: refusal(
                pubrec_code(r.reason),
                format!("{:?}", r.reason),
                r.properties.and_then(|p| p.reason_string),
            ),
        },
        p5::Packet::PubComp(c) => Incoming::PubComp(c.pkid),
        p5::Packet::SubAck(s) => Incoming::SubAck(
            s.return_codes
                .iter()
                .map(|c| match c {
                    p5::SubscribeReasonCode::Success(_) => None,
                    other => Some(format!("{other:?}")),
                })
                .collect(),
        ),
        p5::Packet::ConnAck(c) => Incoming::ConnAck {
            session_present: c.session_present,
            refused: (c.code != p5::ConnectReturnCode::Success).then(|| format!("{:?}", c.code)),
            server_keep_alive: c.properties.as_ref().and_then(|p| p.server_keep_alive),
            receive_maximum: c.properties.as_ref().and_then(|p| p.receive_max),
            max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        p5::Packet::Disconnect(d) => {
            Incoming::Disconnect(match d.properties.and_then(|p| p.reason_string) {
                Some(reason) => format!("{:?}: {reason}", d.reason_code),
                None => format!("{:?}", d.reason_code),
            })
        }
        _ => Incoming::Other,
    })
}

/// A reason code of 0x80 or more is a refusal (MQTT 5, 3.4.2.1).
fn refusal(code: u8, name: String, text: Option<String>) -> Option<Refusal> {
    (code >= 0x80).then(|| Refusal {
        code,
        reason: match text {
            Some(t) => format!("{name} (0x{code:02x}): {t}"),
            None => format!("{name} (0x{code:02x})"),
        },
    })
}

/// The wire value of a PUBACK reason (rumqttc's enum has no discriminants;
/// MQTT 5, 3.4.2.1). rumqttc refuses to parse a code outside this list.
fn puback_code(r: p5::PubAckReason) -> u8 {
    use p5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// The wire value of a PUBREC reason (MQTT 5, 3.5.2.1).
fn pubrec_code(r: p5::PubRecReason) -> u8 {
    use p5::PubRecReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_whose_fields_run_past_its_end_is_malformed_not_incomplete() {
        // MQTT 5 PUBLISH QoS 0 of 5 bytes: the topic `abc`, and the frame
        // ends where its properties' length should be, or in the middle of
        // it (a continuation bit set in its last byte).
        for frame in [
            &[0x30, 5, 0, 3, b'a', b'b', b'c'][..],
            &[0x30, 6, 0, 3, b'a', b'b', b'c', 0x80],
        ] {
            let mut rbuf = BytesMut::from(frame);
            let err = parse(MqttProtocol::V5, &mut rbuf).unwrap_err();
            assert!(err.0.contains("fields run past its end"), "{err}");
        }
        for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
            // A frame still arriving is incomplete, and stays in the buffer.
            let mut rbuf = BytesMut::from(&[0x30, 10, 0x00, 0x03, b'a'][..]);
            assert!(parse(protocol, &mut rbuf).unwrap().is_none());
            assert_eq!(rbuf.len(), 5);
            rbuf.extend_from_slice(b"bc");
            if protocol == MqttProtocol::V5 {
                rbuf.extend_from_slice(&[0]); // no properties
                rbuf[1] = 11;
            }
            rbuf.extend_from_slice(b"hello");
            let Some(Incoming::Publish(m)) = parse(protocol, &mut rbuf).unwrap() else {
                panic!("the completed frame is not a PUBLISH");
            };
            assert_eq!((m.topic.as_str(), &m.payload[..]), ("abc", &b"hello"[..]));
            assert!(rbuf.is_empty());
        }
    }

    #[test]
    fn mqtt5_refusals_carry_their_wire_codes() {
        let mut buf = BytesMut::new();
        let mut ack = p5::PubAck::new(9, None);
        ack.reason = p5::PubAckReason::PayloadFormatInvalid;
        p5::Packet::PubAck(ack).write(&mut buf, None).unwrap();
        let Ok(Incoming::PubAck { pkid, refused }) =
            incoming_v5(p5::Packet::read(&mut buf, None).unwrap())
        else {
            panic!("not a PUBACK");
        };
        assert_eq!(pkid, 9);
        assert_eq!(refused.map(|r| r.code), Some(0x99));
        let mut ack = p5::PubAck::new(10, None);
        ack.reason = p5::PubAckReason::NoMatchingSubscribers;
        assert!(matches!(
            incoming_v5(p5::Packet::PubAck(ack)),
            Ok(Incoming::PubAck { refused: None, .. })
        ));
    }
}
