//! The bounded queue between the subscription callback and the appender.
//!
//! async-opcua acknowledges notifications to the server itself, so nothing
//! holds the server back when the journal is slower than the data (a full
//! journal under `when_full = "block"`, a failing disk): what the journal
//! has not taken yet waits here. This module owns that bound and what
//! happens at it; it must never block the callback (it runs on the
//! session's task) and never reorder what it keeps.
//!
//! Up to `max_queued_changes` data changes wait in arrival order. At the
//! bound the queue **coalesces**: each further change goes to an overflow
//! slot of its node, replacing (and counting as dropped) a value of that
//! node that was waiting there. So a blocked journal costs memory for at
//! most `max_queued_changes` plus one value per node (plus the batch the
//! appender holds), and when it moves again it gets the newest value of
//! every node that changed. The overflow is taken in arrival order once
//! the queue before it is empty, and until then every new change goes to
//! the overflow too: journal order stays arrival order for what is kept.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opcua::types::DataValue;
use tokio::sync::Notify;
use tracing::warn;

use crate::status::SourceStatus;

/// How often dropped (superseded) data changes are logged at `warn`.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What goes from the session to the appender, in arrival order.
#[derive(Debug)]
pub(super) enum Item {
    /// A data change of node `index`; `resync` for a snapshot read.
    Change {
        index: usize,
        value: DataValue,
        resync: bool,
    },
    /// Display names read for the nodes (by index) on a new session.
    Names(Vec<(usize, String)>),
}

struct State {
    items: VecDeque<Item>,
    /// Data changes in `items`.
    changes: usize,
    /// At the bound: the newest waiting value per node, with its arrival
    /// number.
    overflow: HashMap<usize, (u64, DataValue, bool)>,
    arrivals: u64,
    senders: usize,
    receiver_gone: bool,
    /// Dropped since the last warning, and when that was.
    unlogged: u64,
    last_warn: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    max: usize,
    source: String,
    status: Arc<SourceStatus>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queue
        // inconsistent in a way that matters more than losing the agent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A bounded queue of at most `max` data changes (plus one per node at the
/// bound); `source` and `status` are for the drop count and its log.
pub(super) fn channel(max: usize, source: &str, status: Arc<SourceStatus>) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            changes: 0,
            overflow: HashMap::new(),
            arrivals: 0,
            senders: 1,
            receiver_gone: false,
            unlogged: 0,
            last_warn: None,
        }),
        notify: Notify::new(),
        max: max.max(1),
        source: source.to_owned(),
        status,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The sending side; clones count as senders until dropped.
pub(super) struct Sender {
    shared: Arc<Shared>,
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.lock().senders -= 1;
        self.shared.notify.notify_one();
    }
}

impl Sender {
    /// Queues data changes (one node's, or a resync snapshot); never waits.
    pub(super) fn changes(
        &self,
        changes: impl IntoIterator<Item = (usize, DataValue)>,
        resync: bool,
    ) {
        let mut dropped = 0u64;
        let warn_now = {
            let mut st = self.shared.lock();
            for (index, value) in changes {
                if st.overflow.is_empty() && st.changes < self.shared.max {
                    st.items.push_back(Item::Change {
                        index,
                        value,
                        resync,
                    });
                    st.changes += 1;
                } else {
                    st.arrivals += 1;
                    let arrival = st.arrivals;
                    if st
                        .overflow
                        .insert(index, (arrival, value, resync))
                        .is_some()
                    {
                        dropped += 1;
                    }
                }
            }
            st.unlogged += dropped;
            let due = st.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY);
            if dropped > 0 && due {
                st.last_warn = Some(Instant::now());
                Some((
                    std::mem::take(&mut st.unlogged),
                    st.changes,
                    st.overflow.len(),
                ))
            } else {
                None
            }
        };
        if dropped > 0 {
            self.shared
                .status
                .dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
        if let Some((n, queued, nodes)) = warn_now {
            warn!(
                source = %self.shared.source,
                dropped = n,
                queued,
                coalescing_nodes = nodes,
                max_queued_changes = self.shared.max,
                "OPC UA data changes arrive faster than the journal takes them: the queue is full, only the newest value per node is kept; superseded values were dropped (counted in the source's `dropped`)"
            );
        }
        self.shared.notify.notify_one();
    }

    /// Queues display names; they apply to what comes after them.
    pub(super) fn names(&self, names: Vec<(usize, String)>) {
        {
            let mut st = self.shared.lock();
            drain_overflow(&mut st);
            st.items.push_back(Item::Names(names));
        }
        self.shared.notify.notify_one();
    }

    /// Whether the appender has gone (the journal stopped).
    pub(super) fn is_closed(&self) -> bool {
        self.shared.lock().receiver_gone
    }
}

/// Moves the overflow behind the queue, in arrival order.
fn drain_overflow(st: &mut State) {
    if st.overflow.is_empty() {
        return;
    }
    let mut kept: Vec<(u64, usize, DataValue, bool)> = st
        .overflow
        .drain()
        .map(|(index, (arrival, value, resync))| (arrival, index, value, resync))
        .collect();
    kept.sort_unstable_by_key(|k| k.0);
    st.changes += kept.len();
    st.items.extend(
        kept.into_iter()
            .map(|(_, index, value, resync)| Item::Change {
                index,
                value,
                resync,
            }),
    );
}

/// The appender's side.
pub(super) struct Receiver {
    shared: Arc<Shared>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.lock().receiver_gone = true;
    }
}

impl Receiver {
    /// Waits for items and moves up to `limit` of them into `out`; 0 once
    /// every sender is gone and nothing is left.
    pub(super) async fn recv_many(&mut self, out: &mut Vec<Item>, limit: usize) -> usize {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if st.items.is_empty() {
                    drain_overflow(&mut st);
                }
                if !st.items.is_empty() {
                    let n = st.items.len().min(limit.max(1));
                    let taken: Vec<Item> = st.items.drain(..n).collect();
                    let changes = taken
                        .iter()
                        .filter(|i| matches!(i, Item::Change { .. }))
                        .count();
                    st.changes -= changes;
                    out.extend(taken);
                    return n;
                }
                if st.senders == 0 {
                    return 0;
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use opcua::types::Variant;

    use super::*;

    fn value(v: i32) -> DataValue {
        DataValue::value_only(Variant::Int32(v))
    }

    fn changes(items: &[Item]) -> Vec<(usize, i32)> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Change { index, value, .. } => match value.value {
                    Some(Variant::Int32(v)) => Some((*index, v)),
                    _ => None,
                },
                Item::Names(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn at_the_bound_only_the_newest_value_per_node_is_kept_and_the_rest_counted() {
        let status = Arc::new(SourceStatus::new("press", "opcua"));
        let (tx, mut rx) = channel(4, "press", status.clone());
        // Four fit; then node 0 and node 1 change 100 times each.
        tx.changes((0..4).map(|i| (i % 2, value(i as i32))), false);
        for v in 10..110 {
            tx.changes([(0, value(v)), (1, value(1000 + v))], false);
        }
        assert_eq!(status.dropped.load(Ordering::Relaxed), 198);
        tx.changes([(2, value(7))], false);
        let mut out = Vec::new();
        while out.len() < 7 {
            rx.recv_many(&mut out, 100).await;
        }
        assert_eq!(
            changes(&out),
            vec![(0, 0), (1, 1), (0, 2), (1, 3), (0, 109), (1, 1109), (2, 7)],
            "what is kept stays in arrival order"
        );
        // Below the bound again: changes queue one by one.
        tx.changes([(0, value(1)), (0, value(2))], false);
        out.clear();
        rx.recv_many(&mut out, 100).await;
        assert_eq!(changes(&out), vec![(0, 1), (0, 2)]);
        assert_eq!(status.dropped.load(Ordering::Relaxed), 198);
    }

    #[tokio::test]
    async fn the_receiver_ends_once_every_sender_is_gone_and_the_queue_is_empty() {
        let status = Arc::new(SourceStatus::new("press", "opcua"));
        let (tx, mut rx) = channel(10, "press", status);
        let tx2 = tx.clone();
        tx.changes([(0, value(1))], false);
        tx2.names(vec![(0, "Press".into())]);
        drop(tx);
        drop(tx2);
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 10).await, 2);
        assert_eq!(rx.recv_many(&mut out, 10).await, 0);
        let (tx, rx) = channel(10, "press", Arc::new(SourceStatus::new("p", "opcua")));
        drop(rx);
        assert!(tx.is_closed());
    }
}
