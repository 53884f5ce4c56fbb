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
use tracing::{info, warn};

use super::Feed;
use super::subscription::NodeHealth;
use crate::status::SourceStatus;

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
            if code.is_bad() {
                warn!(source = %self.source, node, status = %code, "node reports a bad status; listed in bad_nodes until a good value arrives");
            } else {
                info!(source = %self.source, node, status = %code, "node reports good values again");
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
            warn!(
                source = %self.source,
                lost_messages = lost,
                first_missing = expected,
                "OPC UA notification messages were lost between server and agent; the data changes in them are missing from the journal"
            );
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

    #[tokio::test]
    async fn a_client_handle_this_source_never_gave_out_is_ignored() {
        let status = Arc::new(SourceStatus::new("press", "opcua"));
        let (feed, mut rx) = queue::channel(100, "press", status.clone());
        let health = Arc::new(NodeHealth::default());
        let mut n = Notifications {
            source: "press".into(),
            feed,
            health: health.clone(),
            names_of: Arc::from(vec!["ns=2;s=A".to_string(), "ns=2;s=B".to_string()]),
            status,
            last_sequence: 0,
            unknown_handles: 0,
        };
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
