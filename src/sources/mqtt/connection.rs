//! The MQTT source's connection task: it owns the socket. It reads
//! continuously and hands each PUBLISH, in arrival order, to the appender;
//! writes the acks the appender reports (only on the connection each
//! message came on); pings, answers PUBREL and watches the link; pauses
//! reading at `max_inflight`.
//!
//! It must never wait for the journal, and never write an ack for a message
//! the appender has not reported as stored (see the module docs of
//! [`super`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::mapping::Message;
use super::{MqttSourceError, STABLE_AFTER};
use crate::mqtt::link::{Conn, Incoming, IncomingPublish, LinkError, LinkSettings};
use crate::sources::reconnect::ReconnectBackoff;
use crate::status::SourceStatus;

/// The appender's report on one message: stored (or known, or rejected)
/// and ready to be acknowledged on connection `epoch`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Done {
    pub(super) epoch: u64,
    pub(super) pkid: u16,
    pub(super) qos: u8,
}

/// One turn of the connected loop.
enum Step {
    Shutdown,
    Done(usize),
    Read(Result<Incoming, LinkError>),
    Ping,
    Dead,
}

/// Per-connection bookkeeping.
struct Live {
    conn: Conn,
    since: Instant,
    keep_alive: Duration,
    last_rx: Instant,
    last_tx: Instant,
    ping_outstanding: bool,
    /// When the last PUBLISH came, and the mean time between them (a
    /// moving average): the link's immediate TCP ACKs follow it.
    last_publish: Option<Instant>,
    spacing: Option<Duration>,
}

/// Messages further apart than this on average get immediate TCP ACKs
/// (`TCP_QUICKACK`). Our PUBACKs wait for the commit and its window, so
/// they cannot carry the TCP ACKs back in time, and a broker with Nagle's
/// algorithm on (Mosquitto's default, rumqttd too) holds each next message
/// until one comes: at 100 messages/s that doubled the time to the commit
/// (p50 32 ms with a 20 ms window, 12 ms with quick ACKs). Closer together
/// the broker's bunching costs no latency worth the name (the kernel ACKs
/// every second segment anyway) and saves reads: quick ACKs at 1,000
/// messages/s cost ~20 µs of CPU per message.
const QUICKACK_SPACING: Duration = Duration::from_millis(2);

/// The task that owns the socket.
pub(super) struct Connection {
    pub(super) name: String,
    pub(super) broker: String,
    pub(super) settings: LinkSettings,
    pub(super) max_inflight: usize,
    pub(super) max_payload: u64,
    pub(super) status: Arc<SourceStatus>,
}

impl Connection {
    pub(super) async fn run(
        self,
        tx: mpsc::UnboundedSender<Message>,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
        appender: JoinHandle<Result<(), MqttSourceError>>,
        shutdown: CancellationToken,
    ) -> Result<(), MqttSourceError> {
        let mut tx = Some(tx);
        let mut live: Option<Live> = None;
        let mut epoch = 0u64;
        let mut inflight = 0usize;
        let mut backoff = ReconnectBackoff::new();
        let mut failures = 0u64;
        let mut subscribed_once = false;
        let mut subscribe_pkid = 0u16;
        let mut stopping = false;
        let mut appender_done = false;
        let mut done = Vec::with_capacity(1024);
        info!(source = %self.name, broker = %self.broker, client_id = %self.settings.client_id, "MQTT source starting");

        loop {
            if !stopping && appender_done {
                // The appender only ends early when the journal stopped.
                error!(source = %self.name, "the journal has stopped; the MQTT source stops");
                stopping = true;
                tx = None;
            }
            let Some(l) = live.as_mut() else {
                if stopping {
                    break;
                }
                let connect = async {
                    let mut c = Conn::connect(&self.settings).await?;
                    let resubscribe = !subscribed_once || !c.session_present;
                    if resubscribe {
                        subscribe_pkid = subscribe_pkid.checked_add(1).unwrap_or(1);
                        c.conn.subscribe(subscribe_pkid, &self.settings.topics);
                        c.conn.flush().await?;
                    }
                    Ok::<_, LinkError>((c, resubscribe))
                };
                let attempt = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        stopping = true;
                        tx = None;
                        continue;
                    }
                    r = connect => r,
                };
                // Reports that came in meanwhile belong to older connections.
                while let Ok(_stale) = done_rx.try_recv() {
                    inflight -= 1;
                }
                match attempt {
                    Ok((c, resubscribed)) => {
                        epoch += 1;
                        self.on_connected(
                            c.session_present,
                            subscribed_once,
                            resubscribed,
                            failures,
                        );
                        subscribed_once |= resubscribed;
                        failures = 0;
                        let now = Instant::now();
                        live = Some(Live {
                            conn: c.conn,
                            since: now,
                            keep_alive: c.keep_alive,
                            last_rx: now,
                            last_tx: now,
                            ping_outstanding: false,
                            last_publish: None,
                            spacing: None,
                        });
                    }
                    Err(e) => {
                        let delay = self.lost(&e, None, &mut failures, &mut backoff);
                        let until = tokio::time::Instant::now() + delay;
                        // Wait, still counting what the appender finishes.
                        loop {
                            tokio::select! {
                                () = shutdown.cancelled(), if !stopping => {
                                    stopping = true;
                                    tx = None;
                                    break;
                                }
                                n = done_rx.recv_many(&mut done, 4096), if !appender_done => {
                                    if n == 0 {
                                        appender_done = true;
                                        break;
                                    }
                                    inflight -= done.len();
                                    done.clear();
                                }
                                () = tokio::time::sleep_until(until) => break,
                            }
                        }
                    }
                }
                continue;
            };

            let paused = !stopping && inflight >= self.max_inflight;
            if paused {
                // Nothing is read while paused: silence now says nothing
                // about the link, so the dead-link clock starts afresh.
                l.last_rx = Instant::now();
            }
            let ping_at = if l.ping_outstanding {
                l.last_tx + l.keep_alive
            } else {
                l.last_tx.min(l.last_rx) + l.keep_alive
            };
            let dead_at = l.last_rx + l.keep_alive.mul_f64(1.5);
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled(), if !stopping => Step::Shutdown,
                n = done_rx.recv_many(&mut done, 4096), if !appender_done => Step::Done(n),
                r = l.conn.read(), if !paused => Step::Read(r),
                () = tokio::time::sleep_until(ping_at.into()) => Step::Ping,
                () = tokio::time::sleep_until(dead_at.into()), if !paused => Step::Dead,
            };
            let result: Result<(), LinkError> = match step {
                Step::Shutdown => {
                    info!(source = %self.name, "MQTT source stopping: storing what was received, acknowledging it, then disconnecting");
                    stopping = true;
                    tx = None;
                    Ok(())
                }
                Step::Done(0) => {
                    appender_done = true;
                    Ok(())
                }
                Step::Done(_) => {
                    inflight -= done.len();
                    for d in done.drain(..) {
                        if d.epoch == epoch {
                            l.conn.ack(d.pkid, d.qos);
                        }
                    }
                    self.flush(l).await
                }
                Step::Read(Ok(first)) => {
                    // Handle everything the last read brought in, then
                    // write once.
                    let mut next = Some(first);
                    let mut flush = false;
                    let mut result = Ok(());
                    while let Some(incoming) = next.take() {
                        match self.on_packet(l, incoming, tx.as_ref(), epoch, &mut inflight) {
                            Ok(f) => flush |= f,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                        if !stopping && inflight >= self.max_inflight {
                            break;
                        }
                        match l.conn.buffered() {
                            Ok(p) => next = p,
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    if result.is_ok() && flush {
                        result = self.flush(l).await;
                    }
                    result
                }
                Step::Read(Err(e)) => Err(e),
                Step::Ping => {
                    l.conn.ping();
                    l.ping_outstanding = true;
                    self.flush(l).await
                }
                Step::Dead => Err(LinkError(format!(
                    "nothing received from the broker for {} (keep_alive × 1.5): the link is dead",
                    humantime::format_duration(l.keep_alive.mul_f64(1.5))
                ))),
            };

            match result {
                Ok(()) if stopping && appender_done => {
                    // Every ack of the last batch is written: say goodbye.
                    l.conn.disconnect();
                    if let Err(e) = l.conn.flush().await {
                        debug!(source = %self.name, error = %e, "DISCONNECT not sent");
                    }
                    break;
                }
                Ok(()) => {}
                Err(e) => {
                    let since = l.since;
                    live = None;
                    self.lost(&e, Some(since), &mut failures, &mut backoff);
                    // A jittered pause before the reconnect.
                    if !stopping {
                        let delay = backoff.delay();
                        tokio::select! {
                            () = shutdown.cancelled() => {
                                stopping = true;
                                tx = None;
                            }
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }

        drop(tx);
        // Let the appender finish what it holds (nothing more is acked).
        let result = match appender.await {
            Ok(r) => r,
            Err(e) => {
                error!(source = %self.name, error = %e, "the MQTT appender task failed");
                Ok(())
            }
        };
        info!(source = %self.name, "MQTT source stopped");
        result
    }

    /// Handles one packet from the broker; `Ok(true)` when something was
    /// queued to write.
    fn on_packet(
        &self,
        l: &mut Live,
        incoming: Incoming,
        tx: Option<&mpsc::UnboundedSender<Message>>,
        epoch: u64,
        inflight: &mut usize,
    ) -> Result<bool, LinkError> {
        l.last_rx = Instant::now();
        l.ping_outstanding = false;
        match incoming {
            Incoming::Publish(p) => {
                let now = l.last_rx;
                if let Some(gap) = l.last_publish.map(|t| now - t) {
                    let gap = gap.min(Duration::from_secs(1));
                    let spacing = l.spacing.map_or(gap, |avg| (avg * 7 + gap) / 8);
                    l.spacing = Some(spacing);
                    l.conn.set_quickack(spacing >= QUICKACK_SPACING);
                }
                l.last_publish = Some(now);
                if let Some(tx) = tx {
                    *inflight += 1;
                    self.forward(tx, epoch, p);
                }
                // While stopping: neither stored nor acked; the broker
                // redelivers it to the next session.
                Ok(false)
            }
            Incoming::PubRel(pkid) => {
                l.conn.pubcomp(pkid);
                Ok(true)
            }
            Incoming::SubAck(codes) => {
                self.on_suback(&codes);
                Ok(false)
            }
            Incoming::Disconnect(reason) => Err(LinkError(format!(
                "the broker ended the connection: {reason}"
            ))),
            Incoming::ConnAck { .. } => Err(LinkError("unexpected CONNACK from the broker".into())),
            // The source publishes nothing: acks of publishes are noise.
            Incoming::PubAck { .. } | Incoming::PubRec { .. } | Incoming::PubComp(_) => Ok(false),
            Incoming::Other => Ok(false),
        }
    }

    /// Writes what is queued; on success notes the time.
    async fn flush(&self, l: &mut Live) -> Result<(), LinkError> {
        l.conn.flush().await?;
        l.last_tx = Instant::now();
        Ok(())
    }

    /// Bookkeeping for a failed connect or a lost connection; returns the
    /// delay before the next attempt (for failed connects).
    fn lost(
        &self,
        e: &LinkError,
        connected_since: Option<Instant>,
        failures: &mut u64,
        backoff: &mut ReconnectBackoff,
    ) -> Duration {
        self.status.connected.store(false, Ordering::Relaxed);
        self.status.record_error(e.0.clone());
        match connected_since {
            Some(since) => {
                if since.elapsed() >= STABLE_AFTER.max(self.settings.keep_alive) {
                    backoff.reset();
                }
                warn!(source = %self.name, broker = %self.broker, error = %e, "MQTT connection lost; reconnecting");
                Duration::ZERO
            }
            None => {
                *failures += 1;
                let delay = backoff.delay();
                if *failures == 1 || failures.is_multiple_of(20) {
                    warn!(source = %self.name, broker = %self.broker, error = %e, attempts = *failures, retry_in_ms = delay.as_millis() as u64, "cannot connect to the MQTT broker; retrying");
                } else {
                    debug!(source = %self.name, error = %e, attempts = *failures, "MQTT connect failed");
                }
                delay
            }
        }
    }

    /// `connected` in the status means "receiving": with a subscription in
    /// flight it is set when the SUBACK arrives (a message published before
    /// the broker has the subscription is not ours to receive).
    fn on_connected(
        &self,
        session_present: bool,
        subscribed_once: bool,
        subscribing: bool,
        failures: u64,
    ) {
        if !subscribing {
            self.status.connected.store(true, Ordering::Relaxed);
        }
        if !session_present && subscribed_once && !self.settings.clean_session {
            warn!(source = %self.name, broker = %self.broker, "the broker has no session for us any more (session_present = false): resubscribing; what it held for us while the session was gone is lost on the broker");
        } else {
            info!(source = %self.name, broker = %self.broker, session_present, after_failed_attempts = failures, "connected to the MQTT broker");
        }
    }

    fn on_suback(&self, codes: &[Option<String>]) {
        let mut refused = 0;
        for ((filter, qos), code) in self.settings.topics.iter().zip(codes) {
            if let Some(reason) = code {
                refused += 1;
                error!(source = %self.name, topic = %filter, qos, reason = %reason, "the broker refused the subscription");
                self.status
                    .record_error(format!("subscription to {filter} refused: {reason}"));
            }
        }
        if refused == 0 {
            info!(source = %self.name, topics = codes.len(), "subscribed");
        }
        self.status.connected.store(true, Ordering::Relaxed);
    }

    fn forward(&self, tx: &mpsc::UnboundedSender<Message>, epoch: u64, p: IncomingPublish) {
        let msg = Message::new(
            epoch,
            p.pkid,
            p.qos,
            p.retain,
            p.topic,
            p.payload,
            p.properties,
            self.max_payload,
        );
        // A send error means the appender is gone; the loop notices.
        let _ = tx.send(msg);
    }
}
