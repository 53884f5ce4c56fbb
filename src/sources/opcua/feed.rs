//! What the session reports while it runs: the driver task that polls
//! async-opcua's session event loop and turns it into [`LoopEvent`]s for
//! the watch loop, and the subscription callback that hands every data
//! change to the appender's queue.
//!
//! It owns the translation of the library's events and notifications. It
//! must never block or fail in the callback (it runs on the session's
//! task), never drop a data change it was given (the queue decides what a
//! full journal costs), and never let a connection outlive the generation
//! that made it: the driver ends its event loop when dropped.

use std::sync::Arc;

use opcua::client::{
    MonitoredItemMap, OnSubscriptionNotificationCore, SessionPollResult, SubscriptionActivity,
};
use opcua::types::{
    DataChangeNotification, MonitoredItemNotification, NotificationMessage, StatusCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::Feed;
use super::subscription::NodeHealth;
use crate::status::SourceStatus;
use crate::warn_limit::WarnLimiter;

/// What the event loop driver reports.
#[derive(Debug)]
pub(super) enum LoopEvent {
    Connected,
    Publish,
    PublishFailed(StatusCode),
    Lost(StatusCode),
    Ended(StatusCode),
}

/// The task that polls async-opcua's session event loop.
pub(super) struct Driver {
    task: JoinHandle<()>,
}

impl Driver {
    pub(super) fn spawn<T>(
        event_loop: opcua::client::SessionEventLoop<T>,
        tx: mpsc::UnboundedSender<LoopEvent>,
    ) -> Driver
    where
        T: opcua::client::transport::Connector + Send + Sync + 'static,
    {
        use futures_util::StreamExt as _;
        let task = tokio::spawn(async move {
            let stream = event_loop.enter();
            let mut stream = std::pin::pin!(stream);
            loop {
                let ev = match stream.next().await {
                    None => LoopEvent::Ended(StatusCode::BadConnectionClosed),
                    Some(Err(code)) => LoopEvent::Ended(code),
                    Some(Ok(SessionPollResult::Reconnected(_))) => LoopEvent::Connected,
                    Some(Ok(SessionPollResult::ConnectionLost(code))) => LoopEvent::Lost(code),
                    Some(Ok(SessionPollResult::ReconnectFailed(code))) => LoopEvent::Lost(code),
                    Some(Ok(SessionPollResult::Subscription(SubscriptionActivity::Publish))) => {
                        LoopEvent::Publish
                    }
                    Some(Ok(SessionPollResult::Subscription(
                        SubscriptionActivity::PublishFailed(code),
                    ))) => LoopEvent::PublishFailed(code),
                    Some(Ok(SessionPollResult::Subscription(
                        SubscriptionActivity::FatalFailure(code),
                    ))) => LoopEvent::Lost(code),
                    Some(Ok(_)) => continue,
                };
                let end = matches!(ev, LoopEvent::Ended(_) | LoopEvent::Lost(_));
                if tx.send(ev).is_err() || end {
                    return;
                }
            }
        });
        Driver { task }
    }

    pub(super) fn abort(self) {
        drop(self);
    }
}

impl Drop for Driver {
    /// The event loop owns the connection: a generation that ends in any
    /// way (including being dropped) ends its connection.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The subscription callback: hands every data change to the appender,
/// tracks which nodes currently report a bad status, and notices
/// notification messages the server sent but the client never got.
pub(super) struct Notifications {
    pub(super) source: String,
    pub(super) feed: Feed,
    pub(super) health: Arc<NodeHealth>,
    pub(super) names_of: Arc<[String]>,
    pub(super) status: Arc<SourceStatus>,
    /// Sequence number of the last data notification message (0: none yet;
    /// the server numbers them from 1).
    pub(super) last_sequence: u32,
    /// Data changes for client handles this source never gave out.
    pub(super) unknown_handles: u64,
    /// A flapping sensor or a server that numbers its messages wrongly
    /// would otherwise log at its own rate.
    pub(super) warnings: WarnLimiter,
}

impl Notifications {
    /// One monitored item's data change: to the node's health and the
    /// appender's queue.
    fn data_change(&mut self, n: MonitoredItemNotification) {
        // Client handles are node index + 1 (see NodeSpec::request). Any
        // other is the server's error, and ignored: kept, it would be a key
        // in the node health and the queue's overflow, which a server
        // sending every u32 would grow without bound.
        let Some(index) = (n.client_handle as usize)
            .checked_sub(1)
            .filter(|i| *i < self.names_of.len())
        else {
            self.unknown_handles += 1;
            if self.unknown_handles == 1 {
                warn!(
                    source = %self.source,
                    client_handle = n.client_handle,
                    "the server sent a data change for a client handle this source never gave out; ignored, and further ones are not logged until the next session"
                );
            }
            return;
        };
        let code = n.value.status.unwrap_or(StatusCode::Good);
        if self.health.record(index, code) {
            let node = self.names_of.get(index).map(String::as_str).unwrap_or("?");
            let kind = if code.is_bad() {
                "node_bad"
            } else {
                "node_good"
            };
            match self.warnings.check(kind) {
                Some(suppressed) if code.is_bad() => {
                    warn!(source = %self.source, node, status = %code, suppressed_since_last_warning = suppressed, "node reports a bad status; listed in bad_nodes until a good value arrives (further changes to bad are logged at debug for a minute)");
                }
                Some(suppressed) => {
                    info!(source = %self.source, node, status = %code, suppressed_since_last_line = suppressed, "node reports good values again (further changes to good are logged at debug for a minute)");
                }
                None => {
                    debug!(source = %self.source, node, status = %code, "node status changed");
                }
            }
        }
        self.feed.changes([(index, n.value)], false);
    }

    /// A keep-alive carries the sequence number of the next data message, a
    /// data message its own: either one above `last_sequence + 1` means
    /// messages were lost (e.g. a response the server could not send).
    fn check_sequence(&mut self, sequence: u32, keep_alive: bool) {
        let expected = self.last_sequence.wrapping_add(1);
        if sequence > expected {
            let lost = sequence - expected;
            match self.warnings.check("sequence_gap") {
                Some(suppressed) => warn!(
                    source = %self.source,
                    lost_messages = lost,
                    first_missing = expected,
                    suppressed_since_last_warning = suppressed,
                    "OPC UA notification messages were lost between server and agent; the data changes in them are missing from the journal (further gaps are logged at debug for a minute)"
                ),
                None => debug!(
                    source = %self.source,
                    lost_messages = lost,
                    first_missing = expected,
                    "OPC UA notification messages were lost"
                ),
            }
            self.status.record_error(format!(
                "{lost} notification message(s) from sequence number {expected} never arrived; their data changes are missing"
            ));
        }
        // A lower number is a wrap-around (or a late message): follow it.
        self.last_sequence = if keep_alive {
            sequence.wrapping_sub(1)
        } else {
            sequence
        };
    }
}

impl OnSubscriptionNotificationCore for Notifications {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _monitored_items: MonitoredItemMap<'_>,
    ) {
        let Some(data) = notification.notification_data else {
            self.check_sequence(notification.sequence_number, true);
            return;
        };
        self.check_sequence(notification.sequence_number, false);
        for obj in data {
            let Some(change) = obj.into_inner_as::<DataChangeNotification>() else {
                continue;
            };
            for n in change.monitored_items.into_iter().flatten() {
                self.data_change(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opcua::types::{DataValue, Variant};

    use super::super::queue::{self, Item};
    use super::*;

    /// Log lines written while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned()
    }

    fn notifications(nodes: usize) -> (Notifications, queue::Receiver, Arc<NodeHealth>) {
        let status = Arc::new(SourceStatus::new("press", "opcua"));
        let (feed, rx) = queue::channel(100, "press", status.clone());
        let health = Arc::new(NodeHealth::default());
        let n = Notifications {
            source: "press".into(),
            feed,
            health: health.clone(),
            names_of: (0..nodes).map(|i| format!("ns=2;i={i}")).collect(),
            status,
            last_sequence: 0,
            unknown_handles: 0,
            warnings: WarnLimiter::default(),
        };
        (n, rx, health)
    }

    #[test]
    fn a_flapping_sensor_is_logged_once_a_minute_not_at_every_change() {
        let (mut n, _rx, health) = notifications(2);
        let text = logged(|| {
            for i in 0..200u32 {
                let status = if i % 2 == 0 {
                    StatusCode::BadSensorFailure
                } else {
                    StatusCode::Good
                };
                n.data_change(MonitoredItemNotification {
                    client_handle: 1 + i % 4 / 2,
                    value: DataValue {
                        status: Some(status),
                        ..DataValue::value_only(Variant::UInt32(i))
                    },
                });
            }
            // A server whose sequence numbers skip at every message.
            for seq in (1..100).map(|k| k * 3) {
                n.check_sequence(seq, false);
            }
        });
        assert_eq!(
            text.matches("node reports a bad status").count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("node reports good values again").count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("notification messages were lost").count(),
            1,
            "{text}"
        );
        // The health still follows every change: the last values were good.
        assert!(health.bad().is_empty());
    }

    #[tokio::test]
    async fn a_client_handle_this_source_never_gave_out_is_ignored() {
        let (mut n, mut rx, health) = notifications(2);
        for handle in [0, 1, 2, 3, u32::MAX] {
            n.data_change(MonitoredItemNotification {
                client_handle: handle,
                value: DataValue {
                    status: Some(StatusCode::BadSensorFailure),
                    ..DataValue::value_only(Variant::UInt32(handle))
                },
            });
        }
        assert_eq!(n.unknown_handles, 3);
        let bad: Vec<usize> = health.bad().into_iter().map(|(i, _)| i).collect();
        assert_eq!(bad, vec![0, 1]);
        drop(n);
        let mut out = Vec::new();
        while rx.recv_many(&mut out, 10).await > 0 {}
        let got: Vec<(usize, Option<Variant>)> = out
            .into_iter()
            .filter_map(|i| match i {
                Item::Change { index, value, .. } => Some((index, value.value)),
                Item::Names(_) => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![(0, Some(Variant::UInt32(1))), (1, Some(Variant::UInt32(2)))]
        );
    }
}
