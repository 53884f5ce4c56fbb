//! Publishing a batch and reading its acknowledgements: everything is
//! published pipelined, then the acknowledgements are awaited in order, and
//! the acknowledged prefix, the first failure and its kind (transient or
//! permanent) become the [`SendOutcome`]. It must never count an event as
//! delivered without its acknowledgement, nor reject an event the server
//! might still take.

use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use tracing::{debug, info, warn};

use super::{JetStreamSink, Outgoing, outgoing};
use crate::event::StoredEvent;
use crate::sinks::{SendOutcome, Sink};

/// Why a publish or its acknowledgement failed, for the outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth sending again (the server's dedup makes it safe).
    Transient(String),
    /// The server can never take this message.
    Permanent(String),
}

/// Maps a failed publish (or its acknowledgement) of `event` to subject to
/// a [`Failure`] whose text says what to do.
pub fn failure(e: &PublishError, event: &StoredEvent, subject: &str, timeout: Duration) -> Failure {
    let jet = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent(format!(
            "event {} is larger than the NATS server accepts: {e}",
            event.id
        )),
        PublishErrorKind::TimedOut => Failure::Transient(format!(
            "no JetStream acknowledgement within {} for event {} (subject {subject})",
            humantime::format_duration(timeout),
            event.id
        )),
        PublishErrorKind::StreamNotFound => Failure::Transient(format!(
            "no JetStream stream captures subject {subject} (event {}): no responders",
            event.id
        )),
        PublishErrorKind::BrokenPipe => Failure::Transient(format!(
            "connection to the NATS server lost before the acknowledgement of event {}",
            event.id
        )),
        _ => match jet.map(|j| j.error_code()) {
            Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
            | Some(ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM) => Failure::Permanent(format!(
                "event {} exceeds the stream's maximum message size: {e}",
                event.id
            )),
            _ => Failure::Transient(format!(
                "JetStream refused event {} (subject {subject}): {e}",
                event.id
            )),
        },
    }
}

/// The outcome of a batch of which the first `acked` events were
/// acknowledged and the next one failed (or none did).
pub fn outcome(acked: usize, failed: Option<Failure>) -> SendOutcome {
    match failed {
        None => SendOutcome::Ack,
        Some(Failure::Transient(reason)) => SendOutcome::Retry {
            acked,
            after: None,
            reason,
        },
        Some(Failure::Permanent(reason)) => SendOutcome::Reject {
            acked,
            index: Some(acked),
            reason,
        },
    }
}

impl Sink for JetStreamSink {
    type Encoded = Vec<Outgoing>;

    fn encode(&self, batch: &[StoredEvent]) -> Vec<Outgoing> {
        batch
            .iter()
            .map(|e| outgoing(&self.template, &self.agent_id, e))
            .collect()
    }

    async fn send(&self, batch: &[StoredEvent], encoded: Vec<Outgoing>) -> SendOutcome {
        let up = match self.usable().await {
            Ok(up) => up,
            Err(e) => return SendOutcome::retry(None, e),
        };
        // Publish everything, then collect the acknowledgements: the
        // batch costs one round trip, not one per event.
        let mut pending = Vec::with_capacity(encoded.len());
        let mut stopped = None;
        for (i, m) in encoded.into_iter().enumerate() {
            let subject = m.subject.clone();
            let publish = PublishMessage::build()
                .payload(m.payload)
                .headers(m.headers);
            match up.js.send_publish(m.subject, publish).await {
                Ok(ack) => pending.push((ack, subject)),
                Err(e) => {
                    stopped = batch
                        .get(i)
                        .map(|event| failure(&e, event, &subject, self.timeout));
                    break;
                }
            }
        }
        self.counters
            .published
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut acked = 0usize;
        let mut duplicates = 0u64;
        let mut failed = None;
        let mut timed_out = false;
        for (ack, subject) in pending {
            let Some(event) = batch.get(acked) else { break };
            match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(Ok(a)) => {
                    acked += 1;
                    duplicates += u64::from(a.duplicate);
                }
                Ok(Err(e)) => {
                    timed_out = e.kind() == PublishErrorKind::TimedOut;
                    failed = Some(failure(&e, event, &subject, self.timeout));
                    break;
                }
                Err(_) => {
                    timed_out = true;
                    failed = Some(failure(
                        &PublishError::new(PublishErrorKind::TimedOut),
                        event,
                        &subject,
                        self.timeout,
                    ));
                    break;
                }
            }
        }
        self.counters
            .acknowledged
            .fetch_add(acked as u64, Ordering::Relaxed);
        if duplicates > 0 {
            self.counters
                .duplicates
                .fetch_add(duplicates, Ordering::Relaxed);
            info!(
                sink = %self.name,
                duplicates,
                first_seq = batch.first().map_or(0, |e| e.seq),
                "JetStream already held re-sent events and dropped them (deduplicated on Nats-Msg-Id)"
            );
        }
        let failed = failed.or(stopped);
        if let Some(Failure::Transient(reason)) = &failed {
            warn!(sink = %self.name, acked, batch = batch.len(), reason = %reason, "JetStream publish not acknowledged; the rest of the batch will be sent again");
            if timed_out {
                self.abandon();
            }
        }
        outcome(acked, failed)
    }

    fn upstream_duplicates(&self) -> u64 {
        self.counters.duplicates()
    }

    async fn connect(&self) -> Result<(), String> {
        // Kept even if the stream check fails: the next attempt checks
        // again on the same connection.
        let up = self.usable().await?;
        let info = self.check_stream(&up.js).await?;
        info!(
            sink = %self.name,
            servers = %self.shown,
            stream = %info.config.name,
            subjects = ?info.config.subjects,
            messages = info.state.messages,
            duplicate_window = %humantime::format_duration(info.config.duplicate_window),
            "JetStream sink ready"
        );
        Ok(())
    }

    async fn close(&self) {
        let Some(up) = self.current() else { return };
        self.set_current(None);
        // Nothing is in flight (the forwarder finished its batch); drain
        // flushes what async-nats still buffers and closes cleanly.
        if tokio::time::timeout(self.timeout, up.client.drain())
            .await
            .is_err()
        {
            debug!(sink = %self.name, "NATS connection did not drain in time; dropped");
        }
    }
}
