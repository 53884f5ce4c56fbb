//! The connection task: it owns the socket to the upstream broker, writes
//! the publishes of the batch in hand within the broker's Receive Maximum,
//! answers PUBRECs with PUBRELs, pings when the link is quiet, and answers
//! the sink with the acknowledged prefix, the first refusal in batch order
//! or why the connection ended. It must never reorder a batch, nor answer
//! a batch delivered beyond the prefix the broker acknowledged.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::warn;

use super::{Job, JobEnd};
use crate::mqtt::link::{Conn, Incoming, Refusal};

/// The connection task's side: the socket and the protocol state of the
/// batch in hand.
pub(super) struct Link {
    /// The sink's name, for logs.
    pub(super) sink: String,
    pub(super) conn: Conn,
    pub(super) keep_alive: Duration,
    pub(super) qos: u8,
    pub(super) retain: bool,
    /// Most publishes unacknowledged at once (the broker's Receive Maximum).
    pub(super) window: usize,
    /// The broker's Maximum Packet Size, if it announced one.
    pub(super) max_packet: Option<usize>,
    pub(super) next_pkid: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unsent,
    Sent,
    /// QoS 2: PUBREC received, PUBREL sent.
    Released,
    Acked,
    Refused,
}

/// The batch in hand.
struct Running {
    job: Job,
    first_pkid: u16,
    states: Vec<State>,
    sent: usize,
    inflight: usize,
    prefix: usize,
    /// Set once something was refused or is unpublishable: nothing more of
    /// this batch is sent.
    stopped: Option<JobEnd>,
}

impl Running {
    fn index(&self, pkid: u16) -> Option<usize> {
        let i = (usize::from(pkid) + 65_535 - usize::from(self.first_pkid)) % 65_535;
        (i < self.sent).then_some(i)
    }

    fn done(&self) -> bool {
        self.inflight == 0 && (self.sent == self.states.len() || self.stopped.is_some())
    }

    fn advance(&mut self) {
        while self.prefix < self.states.len() && self.states[self.prefix] == State::Acked {
            self.prefix += 1;
        }
        self.job.acked.store(self.prefix, Ordering::Release);
    }
}

/// Packet ids run 1..=65535.
fn pkid_after(pkid: u16, n: usize) -> u16 {
    ((usize::from(pkid) - 1 + n) % 65_535 + 1) as u16
}

impl Link {
    /// Serves batches until the sink drops the sender (then DISCONNECT) or
    /// the connection fails; returns why it ended.
    pub(super) async fn run(mut self, mut jobs: mpsc::Receiver<Job>) -> String {
        let mut running: Option<Running> = None;
        let mut last_tx = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let tick = (self.keep_alive / 2).max(Duration::from_millis(500));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(r) = running.as_mut() {
                self.fill(r);
                if self.conn.queued() > 0 {
                    if let Err(e) = self.conn.flush().await {
                        return fail(&self.sink, running, e.to_string());
                    }
                    last_tx = Instant::now();
                }
                if r.done() {
                    if let Some(r) = running.take() {
                        finish(r);
                    }
                    continue;
                }
            }
            tokio::select! {
                job = jobs.recv(), if running.is_none() => match job {
                    Some(job) => {
                        let n = job.publishes.len();
                        running = Some(Running {
                            job,
                            first_pkid: self.next_pkid,
                            states: vec![State::Unsent; n],
                            sent: 0,
                            inflight: 0,
                            prefix: 0,
                            stopped: None,
                        });
                        self.next_pkid = pkid_after(self.next_pkid, n);
                    }
                    None => {
                        self.conn.disconnect();
                        let _ = self.conn.flush().await;
                        return "closed by the sink".into();
                    }
                },
                incoming = self.conn.read() => {
                    ping_sent = None;
                    match incoming {
                        Ok(p) => {
                            if let Err(reason) = self.on_incoming(p, running.as_mut()) {
                                return fail(&self.sink, running, reason);
                            }
                            if self.conn.queued() > 0 {
                                if let Err(e) = self.conn.flush().await {
                                    return fail(&self.sink, running, e.to_string());
                                }
                                last_tx = Instant::now();
                            }
                        }
                        Err(e) => return fail(&self.sink, running, e.to_string()),
                    }
                }
                _ = ticker.tick() => {
                    if ping_sent.is_some_and(|at| at.elapsed() > self.keep_alive) {
                        return fail(&self.sink, running, format!(
                            "no answer from the broker within the keep-alive ({})",
                            humantime::format_duration(self.keep_alive)
                        ));
                    }
                    if ping_sent.is_none() && last_tx.elapsed() >= tick {
                        self.conn.ping();
                        if let Err(e) = self.conn.flush().await {
                            return fail(&self.sink, running, e.to_string());
                        }
                        last_tx = Instant::now();
                        ping_sent = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Queues the publishes the window allows.
    fn fill(&mut self, r: &mut Running) {
        while r.stopped.is_none() && r.sent < r.states.len() && r.inflight < self.window {
            let i = r.sent;
            let p = &r.job.publishes[i];
            // Fixed header (5) + topic length (2) + topic + packet id (2) +
            // properties (their lengths, with room for the headers) + payload.
            let size = 9
                + p.topic.len()
                + p.payload.len()
                + p.content_type.as_ref().map_or(0, |c| c.len() + 3)
                + p.user_properties
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 5)
                    .sum::<usize>()
                + 5;
            if let Some(max) = self.max_packet
                && size > max
            {
                r.stopped = Some(JobEnd::Unpublishable {
                    index: i,
                    reason: format!(
                        "the event is {size} bytes as an MQTT packet; the broker takes at most {max} (its Maximum Packet Size)"
                    ),
                });
                break;
            }
            let pkid = pkid_after(r.first_pkid, i);
            if let Err(e) = self.conn.publish(pkid, self.qos, self.retain, p) {
                r.stopped = Some(JobEnd::Unpublishable {
                    index: i,
                    reason: format!("the event cannot be published over MQTT: {e}"),
                });
                break;
            }
            r.states[i] = State::Sent;
            r.sent += 1;
            r.inflight += 1;
        }
    }

    fn on_incoming(&mut self, p: Incoming, running: Option<&mut Running>) -> Result<(), String> {
        match p {
            Incoming::PubAck { pkid, refused } => {
                if let Some(r) = running {
                    settle(r, pkid, refused, State::Sent);
                }
            }
            Incoming::PubRec { pkid, refused } => {
                if let Some(r) = running {
                    match refused {
                        Some(_) => settle(r, pkid, refused, State::Sent),
                        None => {
                            if let Some(i) = r.index(pkid)
                                && r.states[i] == State::Sent
                            {
                                r.states[i] = State::Released;
                            }
                            self.conn.pubrel(pkid);
                        }
                    }
                }
            }
            Incoming::PubComp(pkid) => {
                if let Some(r) = running {
                    settle(r, pkid, None, State::Released);
                }
            }
            // Nothing is subscribed; a broker that sends anyway is
            // answered so that it does not resend forever.
            Incoming::Publish(p) => self.conn.ack(p.pkid, p.qos),
            Incoming::PubRel(pkid) => self.conn.pubcomp(pkid),
            Incoming::Disconnect(reason) => {
                return Err(format!("the broker ended the connection: {reason}"));
            }
            Incoming::ConnAck { .. } => return Err("unexpected CONNACK from the broker".into()),
            Incoming::SubAck(_) | Incoming::Other => {}
        }
        Ok(())
    }
}

/// Records the final answer to the publish `pkid` if it was in state
/// `from`.
fn settle(r: &mut Running, pkid: u16, refused: Option<Refusal>, from: State) {
    let Some(i) = r.index(pkid) else {
        return;
    };
    if r.states[i] != from {
        return;
    }
    r.inflight = r.inflight.saturating_sub(1);
    match refused {
        None => {
            r.states[i] = State::Acked;
            r.advance();
        }
        Some(refusal) => {
            r.states[i] = State::Refused;
            // The first refusal in batch order is the one reported.
            let earlier = match &r.stopped {
                Some(JobEnd::Refused { index, .. }) | Some(JobEnd::Unpublishable { index, .. }) => {
                    *index < i
                }
                _ => false,
            };
            if !earlier {
                r.stopped = Some(JobEnd::Refused { index: i, refusal });
            }
        }
    }
}

/// Answers the sink about a batch whose every publish was answered.
fn finish(r: Running) {
    let end = if r.prefix == r.states.len() {
        JobEnd::Delivered
    } else {
        match r.stopped {
            Some(end @ (JobEnd::Refused { .. } | JobEnd::Unpublishable { .. })) => end,
            _ => JobEnd::Lost("the batch ended unacknowledged".into()),
        }
    };
    let _ = r.job.reply.send(end);
}

/// Answers the sink that the connection ended; returns the reason.
fn fail(sink: &str, running: Option<Running>, reason: String) -> String {
    if let Some(r) = running {
        warn!(sink = %sink, acked = r.prefix, of = r.states.len(), reason = %reason, "upstream broker connection lost with publishes in flight");
        let _ = r.job.reply.send(JobEnd::Lost(reason.clone()));
    }
    reason
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::oneshot;

    use super::*;

    #[test]
    fn packet_ids_wrap_past_65535_and_skip_zero() {
        assert_eq!(pkid_after(1, 0), 1);
        assert_eq!(pkid_after(65_535, 1), 1);
        assert_eq!(pkid_after(65_000, 1_000), 465);
        let r = Running {
            job: Job {
                publishes: Vec::new(),
                acked: Arc::new(AtomicUsize::new(0)),
                reply: oneshot::channel().0,
            },
            first_pkid: 65_534,
            states: vec![State::Sent; 4],
            sent: 4,
            inflight: 4,
            prefix: 0,
            stopped: None,
        };
        assert_eq!(r.index(65_534), Some(0));
        assert_eq!(r.index(1), Some(2));
        assert_eq!(r.index(2), Some(3));
        assert_eq!(r.index(3), None, "not sent in this batch");
    }

    #[test]
    fn the_first_refusal_in_batch_order_is_reported_and_the_prefix_stops_there() {
        let (reply, mut answer) = oneshot::channel();
        let mut r = Running {
            job: Job {
                publishes: Vec::new(),
                acked: Arc::new(AtomicUsize::new(0)),
                reply,
            },
            first_pkid: 10,
            states: vec![State::Sent; 4],
            sent: 4,
            inflight: 4,
            prefix: 0,
            stopped: None,
        };
        let refusal = |code| {
            Some(Refusal {
                code,
                reason: format!("{code:#x}"),
            })
        };
        settle(&mut r, 10, None, State::Sent);
        settle(&mut r, 13, refusal(0x97), State::Sent);
        settle(&mut r, 12, refusal(0x99), State::Sent);
        settle(&mut r, 11, None, State::Sent);
        settle(&mut r, 11, None, State::Sent);
        assert!(r.done());
        assert_eq!(r.prefix, 2);
        assert_eq!(r.job.acked.load(Ordering::Acquire), 2);
        finish(r);
        match answer.try_recv() {
            Ok(JobEnd::Refused { index, refusal }) => {
                assert_eq!(index, 2);
                assert_eq!(refusal.code, 0x99);
            }
            other => panic!("{other:?}"),
        }
    }
}
