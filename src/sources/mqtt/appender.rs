//! The MQTT source's appender: gathers what the connection task has
//! queued (its own commit window under a trickle), maps it, appends it to
//! the journal in one append, retries a failed append with the same
//! messages in the same order, and reports every message back in arrival
//! order once the journal has answered.
//!
//! It must never report a message before the journal has answered its
//! append, and never reorder or skip one (see the module docs of
//! [`super`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

use super::connection::Done;
use super::mapping::{Mapped, Mapper, Message};
use super::{BATCH_MAX, MqttSourceError};
use crate::journal::{AppendOutcome, Journal, JournalError};
use crate::status::SourceStatus;
use crate::warn_limit::WarnLimiter;

/// The task that maps, appends and reports, in arrival order.
pub(super) struct Appender {
    pub(super) name: String,
    pub(super) journal: Journal,
    pub(super) mapper: Mapper,
    pub(super) status: Arc<SourceStatus>,
    pub(super) warnings: WarnLimiter,
    pub(super) window: Window,
}

/// The source's own commit window (see [`Window::gather`]).
pub(super) struct Window {
    /// `journal.commit_window`: how long the first message of a batch may
    /// wait for others to share its commit.
    len: Duration,
    max_inflight: usize,
    /// Mean time between messages (a moving average), and when the last
    /// one arrived.
    spacing: Option<Duration>,
    last_received: Option<std::time::SystemTime>,
    /// Messages in the last batch.
    last_len: usize,
}

/// What one message became in an append.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Event,
    Rejected,
}

impl Appender {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Message>,
        done: mpsc::UnboundedSender<Done>,
    ) -> Result<(), MqttSourceError> {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        while rx.recv_many(&mut batch, BATCH_MAX).await > 0 {
            self.window.gather(&mut rx, &mut batch).await;
            let age = |b: &[Message]| {
                b.first()
                    .and_then(|m| std::time::SystemTime::now().duration_since(m.received).ok())
                    .map_or(0, |d| d.as_micros())
            };
            trace!(source = %self.name, messages = batch.len(), first_age_us = age(&batch), "MQTT batch gathered");
            self.commit(&batch).await?;
            trace!(source = %self.name, messages = batch.len(), first_age_us = age(&batch), "MQTT batch committed");
            for m in batch.drain(..) {
                let _ = done.send(Done {
                    epoch: m.epoch,
                    pkid: m.pkid,
                    qos: m.qos,
                });
            }
        }
        Ok(())
    }

    /// Appends the batch (retrying until the journal takes it) and counts.
    async fn commit(&mut self, batch: &[Message]) -> Result<(), MqttSourceError> {
        let checkpoint = self.mapper.checkpoint();
        let mut attempt = 0u32;
        loop {
            let refusals_before = self.mapper.schema_refusals();
            let mut events = Vec::with_capacity(batch.len());
            let mut kinds = Vec::with_capacity(batch.len());
            let mut dropped = 0u64;
            for m in batch {
                match self.mapper.map(m) {
                    Mapped::Event(e) => {
                        events.push(e);
                        kinds.push(Kind::Event);
                    }
                    Mapped::Rejected(e, reason) => {
                        self.log_reject(&m.topic, &reason, "journaled as a rejected record");
                        events.push(e);
                        kinds.push(Kind::Rejected);
                    }
                    Mapped::Dropped(reason) => {
                        self.log_reject(&m.topic, &reason, "dropped (on_invalid = \"drop\")");
                        dropped += 1;
                    }
                }
            }
            let by_schema = self.mapper.schema_refusals() - refusals_before;
            if events.is_empty() {
                self.status.record_reject(dropped);
                self.record_schema_refusals(by_schema);
                return Ok(());
            }
            match self.journal.append_gathered(events).await {
                Ok(outcomes) => {
                    let (mut stored, mut duplicates, mut rejected) = (0u64, 0u64, dropped);
                    for (kind, outcome) in kinds.iter().zip(&outcomes) {
                        match (kind, outcome) {
                            (_, AppendOutcome::Duplicate { .. }) => duplicates += 1,
                            (Kind::Event, AppendOutcome::Stored { .. }) => stored += 1,
                            (Kind::Rejected, AppendOutcome::Stored { .. }) => rejected += 1,
                        }
                    }
                    self.status.record_events(stored, duplicates);
                    if rejected > 0 {
                        self.status.record_reject(rejected);
                    }
                    self.record_schema_refusals(by_schema);
                    if attempt > 0 {
                        info!(source = %self.name, attempts = attempt + 1, "journal append succeeded; acknowledging to the broker again");
                    }
                    return Ok(());
                }
                Err(JournalError::Closed) => {
                    return Err(MqttSourceError::JournalClosed {
                        name: self.name.clone(),
                    });
                }
                Err(e) => {
                    attempt += 1;
                    let message = e.to_string();
                    if let Some(suppressed) = self.warnings.check("append") {
                        warn!(source = %self.name, error = %message, messages = batch.len(), attempt, suppressed, "journal append failed; holding the acks (the broker keeps the messages) and retrying");
                    }
                    self.status.record_error(message);
                    self.mapper.restore(checkpoint.clone());
                    tokio::time::sleep(crate::sources::append_retry_delay(&e, attempt)).await;
                }
            }
        }
    }

    fn record_schema_refusals(&self, n: u64) {
        if n > 0 {
            self.status
                .record_schema_rejects(self.mapper.event_type(), n);
        }
    }

    fn log_reject(&self, topic: &str, reason: &str, what: &str) {
        match self.warnings.check("reject") {
            Some(suppressed) => {
                warn!(source = %self.name, topic = %topic, reason = %reason, suppressed, "invalid MQTT payload {what}")
            }
            None => {
                debug!(source = %self.name, topic = %topic, reason = %reason, "invalid MQTT payload {what}")
            }
        }
    }
}

impl Window {
    pub(super) fn new(len: Duration, max_inflight: usize) -> Window {
        Window {
            len,
            max_inflight,
            spacing: None,
            last_received: None,
            last_len: 0,
        }
    }

    /// The commit window, kept here rather than in the journal: the first
    /// message of a batch waits, up to `journal.commit_window` from its
    /// arrival, for more to share its commit (fewer commits, fewer pages
    /// written, under light traffic). The append then commits at once
    /// ([`Journal::append_gathered`]), so a message waits one window, not
    /// the rest of the one in progress and then its own. The same rules as
    /// the journal's own window: no wait when messages come further apart
    /// than the window (nothing to gather); none past
    /// `WINDOW_ENOUGH_EVENTS` (more saves no page writes) or `max_inflight`
    /// (the broker sends no more until the acks); and none when this batch
    /// and the last one together reach `max_inflight`: the broker may have
    /// been at its limit, and one that releases messages in rounds (the
    /// next round only once every message of the last is acknowledged)
    /// sends nothing while the tail of a round waits here. rumqttd does: at
    /// 5,000/s its rounds of 100 came split 90 + 10, and every 10 waited a
    /// whole window, so it delivered ~4,500/s and the acks fell a second
    /// behind. A batch that only reached `WINDOW_ENOUGH_EVENTS` says
    /// nothing of the kind: under a steady 1,000/s, the few messages that
    /// came during its commit committed at once when they followed it, two
    /// commits where one would do.
    async fn gather(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Message>,
        batch: &mut Vec<Message>,
    ) {
        self.note_arrivals(batch);
        let Some(first) = batch.first().map(|m| m.received) else {
            return;
        };
        let limit = self.max_inflight.min(BATCH_MAX);
        let enough = limit.min(crate::journal::WINDOW_ENOUGH_EVENTS);
        let at_limit = std::mem::replace(&mut self.last_len, batch.len()) + batch.len() >= limit;
        if at_limit || self.len.is_zero() || self.spacing.is_none_or(|s| s > self.len) {
            return;
        }
        let age = std::time::SystemTime::now()
            .duration_since(first)
            .unwrap_or_default();
        let Some(left) = self.len.checked_sub(age) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + left;
        while batch.len() < enough {
            let before = batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(batch, BATCH_MAX - before)).await {
                Ok(n) if n > 0 => self.note_arrivals(&batch[before..]),
                // Closed (the source is stopping) or the window passed.
                _ => break,
            }
        }
        self.last_len = batch.len();
    }

    /// Keeps the moving average of the time between messages.
    fn note_arrivals(&mut self, messages: &[Message]) {
        for m in messages {
            if let Some(gap) = self
                .last_received
                .and_then(|t| m.received.duration_since(t).ok())
            {
                let gap = gap.min(self.len * 100);
                self.spacing = Some(self.spacing.map_or(gap, |avg| (avg * 7 + gap) / 8));
            }
            self.last_received = Some(m.received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::WINDOW_ENOUGH_EVENTS;
    use std::time::SystemTime;

    fn message(pkid: u16) -> Message {
        Message {
            epoch: 1,
            pkid,
            qos: 1,
            retain: false,
            topic: "machines/press07/state".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            properties: None,
            received: SystemTime::now(),
            oversize: None,
        }
    }

    /// Sends `n` messages and gathers them; the time the gather took (in
    /// paused time: only its own timers advance it).
    async fn round(
        w: &mut Window,
        tx: &mpsc::UnboundedSender<Message>,
        rx: &mut mpsc::UnboundedReceiver<Message>,
        n: u16,
    ) -> (usize, Duration) {
        for pkid in 0..n {
            tx.send(message(pkid)).unwrap();
        }
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, BATCH_MAX).await;
        let t0 = tokio::time::Instant::now();
        w.gather(rx, &mut batch).await;
        (batch.len(), t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_tail_of_a_round_of_max_inflight_commits_at_once_and_the_next_small_one_waits() {
        let len = Duration::from_secs(5);
        let mut w = Window::new(len, 100);
        // Under a trickle as far as the window knows: messages 1 ms apart.
        w.spacing = Some(Duration::from_millis(1));
        let (tx, mut rx) = mpsc::unbounded_channel();

        // A full batch ends its window by itself.
        let (n, waited) = round(&mut w, &tx, &mut rx, 90).await;
        assert_eq!((n, waited), (90, Duration::ZERO));
        // The tail of a broker's round of 100 (max_inflight) right after
        // it: no wait, the broker sends nothing more until it is
        // acknowledged.
        let (n, waited) = round(&mut w, &tx, &mut rx, 10).await;
        assert_eq!((n, waited), (10, Duration::ZERO));
        // A small batch after a small one waits its window for company.
        let (n, waited) = round(&mut w, &tx, &mut rx, 3).await;
        assert_eq!(n, 3);
        assert!(
            waited >= len - Duration::from_millis(100) && waited <= len,
            "waited {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_batch_that_only_reached_enough_the_next_small_one_waits_for_company() {
        let len = Duration::from_secs(5);
        let mut w = Window::new(len, 100);
        w.spacing = Some(Duration::from_millis(1));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let enough = WINDOW_ENOUGH_EVENTS as u16;
        let (n, _) = round(&mut w, &tx, &mut rx, enough).await;
        assert_eq!(n, usize::from(enough));
        // Two messages came during its commit; the flow goes on, 1 ms
        // apart, far from max_inflight: they wait and share one commit.
        tx.send(message(0)).unwrap();
        tx.send(message(1)).unwrap();
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, BATCH_MAX).await;
        let sender = tokio::spawn(async move {
            for pkid in 2..enough {
                tokio::time::sleep(Duration::from_millis(1)).await;
                tx.send(message(pkid)).unwrap();
            }
            tx
        });
        let t0 = tokio::time::Instant::now();
        w.gather(&mut rx, &mut batch).await;
        assert_eq!(batch.len(), usize::from(enough));
        assert_eq!(t0.elapsed(), Duration::from_millis(u64::from(enough) - 2));
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_batch_waits_only_until_enough_messages_are_in() {
        let len = Duration::from_secs(5);
        let mut w = Window::new(len, 4);
        w.spacing = Some(Duration::from_millis(1));
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(message(1)).unwrap();
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, BATCH_MAX).await;
        let sender = tokio::spawn(async move {
            for pkid in 2..=4 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                tx.send(message(pkid)).unwrap();
            }
            tx
        });
        let t0 = tokio::time::Instant::now();
        w.gather(&mut rx, &mut batch).await;
        // max_inflight = 4: the broker sends no fifth before the acks.
        assert_eq!(batch.len(), 4);
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
        drop(sender.await.unwrap());
    }
}
