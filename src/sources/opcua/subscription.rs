//! What a new session sets up and keeps: the namespace array and every
//! node resolved against it, the resync snapshot, the subscription and its
//! monitored items (in request sizes the server allows), the retry of
//! refused nodes, and the health of each monitored node.
//!
//! It owns which nodes are monitored and which are listed in `bad_nodes`.
//! It must never let one refused node keep the others from being monitored,
//! never reuse a namespace index or a subscription of an earlier session,
//! and never send a request larger than the server's OperationLimits allow.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use opcua::client::Session;
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeTrigger, DeadbandType, ExtensionObject,
    MonitoredItemCreateRequest, NodeId, ReadValueId, StatusCode, TimestampsToReturn, Variant,
};
use tracing::{debug, info};

use super::feed::Notifications;
use super::{Feed, LinkError, MAX_NOTIFICATIONS_PER_PUBLISH, OpcuaSource};
use crate::config::Deadband;
use crate::status::SourceStatus;

/// Most nodes in one Read or CreateMonitoredItems request; less when the
/// server's OperationLimits say so (see [`Batches`]).
const CHUNK: usize = 500;
/// `Server_ServerCapabilities_OperationLimits_MaxNodesPerRead`.
const MAX_NODES_PER_READ: u32 = 11705;
/// `Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall`.
const MAX_MONITORED_ITEMS_PER_CALL: u32 = 11714;

/// How many nodes go into one request on this session: [`CHUNK`], or less
/// where the server's OperationLimits are lower (a server answers a larger
/// call with `BadTooManyOperations` as a whole, and set-up would fail on
/// every reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batches {
    /// Nodes per resync Read (two attributes each).
    read_nodes: usize,
    /// Items per CreateMonitoredItems.
    create_items: usize,
}

impl Batches {
    /// From the values of MaxNodesPerRead and MaxMonitoredItemsPerCall
    /// (0, missing or unreadable: no limit).
    fn from_limits(max_nodes_per_read: Option<u32>, max_items_per_call: Option<u32>) -> Batches {
        let limit = |v: Option<u32>| match v {
            Some(n) if n > 0 => (n as usize).min(CHUNK),
            _ => CHUNK,
        };
        Batches {
            // Each node is read with two attributes (Value, DisplayName).
            read_nodes: match max_nodes_per_read {
                Some(n) if n > 0 => ((n / 2) as usize).clamp(1, CHUNK),
                _ => CHUNK,
            },
            create_items: limit(max_items_per_call),
        }
    }
}

impl OpcuaSource {
    /// Namespaces, snapshot, subscription and monitored items.
    pub(super) async fn set_up(
        &self,
        session: &Arc<Session>,
        feed: &Feed,
        status: &Arc<SourceStatus>,
        generation: u64,
    ) -> Result<Live, LinkError> {
        let ns = session
            .read_namespace_array()
            .await
            .map_err(|e| LinkError::Failed(format!("reading the server's NamespaceArray: {e}")))?;
        let mut bad: Vec<BadNode> = Vec::new();
        let mut resolved: Vec<(usize, NodeId)> = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            match n.resolve(&ns) {
                Ok(id) => resolved.push((i, id)),
                Err(detail) => bad.push(BadNode {
                    index: i,
                    status: detail,
                }),
            }
        }

        // Resync snapshot (and display names) before the subscription: the
        // subscription's initial values then come after it in the journal.
        let batches = self.batches(session).await;
        let mut names = Vec::new();
        let mut snapshot = Vec::new();
        for chunk in resolved.chunks(batches.read_nodes) {
            let ids: Vec<ReadValueId> = chunk
                .iter()
                .flat_map(|(_, id)| {
                    [
                        read_id(id, AttributeId::Value),
                        read_id(id, AttributeId::DisplayName),
                    ]
                })
                .collect();
            let values = session
                .read(&ids, TimestampsToReturn::Both, 0.0)
                .await
                .map_err(|e| LinkError::Failed(format!("resync read: {e}")))?;
            for ((index, _), pair) in chunk.iter().zip(values.chunks(2)) {
                let [value, name] = pair else { continue };
                if let Some(Variant::LocalizedText(t)) = &name.value {
                    names.push((*index, t.text.to_string()));
                }
                let code = value.status.unwrap_or(StatusCode::Good);
                if code.is_bad() {
                    bad.push(BadNode {
                        index: *index,
                        status: code.to_string(),
                    });
                } else {
                    snapshot.push((*index, value.clone()));
                }
            }
        }
        feed.names(names);
        let snapshot_len = snapshot.len();
        feed.changes(snapshot, true);
        debug!(source = %self.name, generation, values = snapshot_len, "resync snapshot read");

        let health = Arc::new(NodeHealth::default());
        // Node ids by index, for logs and status: one list for the callback
        // and the watch loop.
        let names_of: Arc<[String]> = self.nodes.iter().map(|n| n.meta.node_id.clone()).collect();
        let callback = Notifications {
            source: self.name.clone(),
            feed: feed.clone(),
            health: health.clone(),
            names_of: names_of.clone(),
            status: status.clone(),
            last_sequence: 0,
            unknown_handles: 0,
            warnings: Default::default(),
        };
        let subscription_id = session
            .create_subscription(
                self.cfg.publishing_interval,
                self.cfg.lifetime_count,
                self.cfg.keep_alive_count,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                callback,
            )
            .await
            .map_err(|e| LinkError::Failed(format!("CreateSubscription: {e}")))?;
        let (publishing_interval, keep_alive_count) = {
            let state = session.subscription_state.lock();
            state
                .get(subscription_id)
                .map(|s| (s.publishing_interval(), s.max_keep_alive_count()))
                .unwrap_or((self.cfg.publishing_interval, self.cfg.keep_alive_count))
        };
        let already_bad: Vec<usize> = bad.iter().map(|b| b.index).collect();
        let to_create: Vec<(usize, NodeId)> = resolved
            .into_iter()
            .filter(|(i, _)| !already_bad.contains(i))
            .collect();
        bad.extend(
            self.create_items(session, subscription_id, &to_create, batches)
                .await?,
        );
        bad.sort_by_key(|b| b.index);
        bad.dedup_by_key(|b| b.index);
        Ok(Live {
            subscription_id,
            publishing_interval,
            keep_alive_count,
            bad,
            batches,
            health,
            names_of,
        })
    }

    /// The server's operation limits for this session's request sizes.
    async fn batches(&self, session: &Arc<Session>) -> Batches {
        let ids = [
            read_id(&NodeId::new(0, MAX_NODES_PER_READ), AttributeId::Value),
            read_id(
                &NodeId::new(0, MAX_MONITORED_ITEMS_PER_CALL),
                AttributeId::Value,
            ),
        ];
        let values = match session.read(&ids, TimestampsToReturn::Neither, 0.0).await {
            Ok(v) => v,
            Err(e) => {
                debug!(source = %self.name, error = %e, "OperationLimits not readable; default request sizes");
                Vec::new()
            }
        };
        let value = |i: usize| match values.get(i).and_then(|v| v.value.as_ref()) {
            Some(Variant::UInt32(n)) => Some(*n),
            _ => None,
        };
        let batches = Batches::from_limits(value(0), value(1));
        debug!(
            source = %self.name,
            max_nodes_per_read = ?value(0),
            max_monitored_items_per_call = ?value(1),
            read_nodes = batches.read_nodes,
            create_items = batches.create_items,
            "request sizes from the server's OperationLimits"
        );
        batches
    }

    /// Creates monitored items; returns the nodes the server refused.
    async fn create_items(
        &self,
        session: &Arc<Session>,
        subscription_id: u32,
        items: &[(usize, NodeId)],
        batches: Batches,
    ) -> Result<Vec<BadNode>, LinkError> {
        let mut bad = Vec::new();
        for chunk in items.chunks(batches.create_items) {
            let requests: Vec<MonitoredItemCreateRequest> = chunk
                .iter()
                .map(|(i, id)| self.nodes[*i].request(*i, id.clone()))
                .collect();
            let results = session
                .create_monitored_items(subscription_id, TimestampsToReturn::Both, requests)
                .await
                .map_err(|e| LinkError::Failed(format!("CreateMonitoredItems: {e}")))?;
            for ((index, _), r) in chunk.iter().zip(&results) {
                if r.result.status_code.is_bad() {
                    bad.push(BadNode {
                        index: *index,
                        status: r.result.status_code.to_string(),
                    });
                }
            }
        }
        Ok(bad)
    }

    /// Tries the refused nodes again on the live session.
    pub(super) async fn retry_bad(&self, session: &Arc<Session>, live: &mut Live) {
        let ns = match session.read_namespace_array().await {
            Ok(ns) => ns,
            Err(e) => {
                debug!(source = %self.name, error = %e, "namespace array read for the node retry failed");
                return;
            }
        };
        let mut still = Vec::new();
        let mut items = Vec::new();
        for b in live.bad.drain(..) {
            match self.nodes[b.index].resolve(&ns) {
                Ok(id) => items.push((b.index, id)),
                Err(status) => still.push(BadNode {
                    index: b.index,
                    status,
                }),
            }
        }
        match self
            .create_items(session, live.subscription_id, &items, live.batches)
            .await
        {
            Ok(refused) => {
                let refused_idx: Vec<usize> = refused.iter().map(|b| b.index).collect();
                for (i, _) in items.iter().filter(|(i, _)| !refused_idx.contains(i)) {
                    info!(source = %self.name, node = %live.names_of[*i], "node is monitored again");
                }
                still.extend(refused);
            }
            Err(e) => {
                debug!(source = %self.name, error = %e, "node retry failed");
                still.extend(items.into_iter().map(|(index, _)| BadNode {
                    index,
                    status: "retry failed".into(),
                }));
            }
        }
        for b in &still {
            debug!(source = %self.name, node = %live.names_of[b.index], status = %b.status, "node still refused; retrying later");
        }
        live.bad = still;
    }
}

/// Shows the nodes not monitored right now in the source status: those the
/// server refused (retried) and those whose latest data change on the live
/// subscription had a bad status (until a good one arrives).
pub(super) fn publish_bad_nodes(status: &SourceStatus, live: &Live) {
    let mut bad: Vec<(usize, String)> = live
        .bad
        .iter()
        .map(|b| (b.index, b.status.clone()))
        .collect();
    for (index, code) in live.health.bad() {
        if !bad.iter().any(|(i, _)| *i == index) {
            bad.push((index, code));
        }
    }
    bad.sort_by_key(|(i, _)| *i);
    status.set_bad_nodes(
        bad.into_iter()
            .filter_map(|(i, code)| live.names_of.get(i).map(|n| (n.clone(), code)))
            .collect(),
    );
}

/// Nodes whose latest data change on the live subscription had a bad status
/// (index → status name), shared by the subscription callback (writer) and
/// the watch loop (which publishes it).
#[derive(Debug, Default)]
pub(super) struct NodeHealth {
    bad: std::sync::Mutex<std::collections::BTreeMap<usize, String>>,
    changed: std::sync::atomic::AtomicBool,
}

impl NodeHealth {
    /// Records the status of a node's latest data change; true when the
    /// node's state (good, or which bad status) changed.
    pub(super) fn record(&self, index: usize, code: StatusCode) -> bool {
        let Ok(mut bad) = self.bad.lock() else {
            return false;
        };
        let changed = if code.is_bad() {
            let name = code.to_string();
            bad.insert(index, name.clone()).as_ref() != Some(&name)
        } else {
            bad.remove(&index).is_some()
        };
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
        changed
    }

    /// Whether the set changed since the last call.
    pub(super) fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }

    pub(super) fn bad(&self) -> Vec<(usize, String)> {
        self.bad
            .lock()
            .map(|b| b.iter().map(|(i, s)| (*i, s.clone())).collect())
            .unwrap_or_default()
    }
}

/// A node the server refused (or whose namespace it lacks), and why.
#[derive(Debug, Clone)]
pub(super) struct BadNode {
    index: usize,
    status: String,
}

/// A live session's subscription.
pub(super) struct Live {
    pub(super) subscription_id: u32,
    pub(super) publishing_interval: Duration,
    pub(super) keep_alive_count: u32,
    /// Nodes the server refused or that could not be resolved (retried).
    pub(super) bad: Vec<BadNode>,
    /// Request sizes the server allows.
    batches: Batches,
    /// Monitored nodes whose latest value is bad.
    pub(super) health: Arc<NodeHealth>,
    names_of: Arc<[String]>,
}

fn read_id(id: &NodeId, attribute: AttributeId) -> ReadValueId {
    ReadValueId {
        node_id: id.clone(),
        attribute_id: attribute as u32,
        ..Default::default()
    }
}

/// The data-change filter of a node's deadband (none without one).
pub(super) fn deadband_filter(deadband: Option<Deadband>) -> ExtensionObject {
    let (kind, value) = match deadband {
        None => return ExtensionObject::null(),
        Some(Deadband::Absolute(v)) => (DeadbandType::Absolute, v),
        Some(Deadband::Percent(v)) => (DeadbandType::Percent, v),
    };
    ExtensionObject::from_message(DataChangeFilter {
        trigger: DataChangeTrigger::StatusValue,
        deadband_type: kind as u32,
        deadband_value: value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_sizes_follow_the_server_operation_limits() {
        let none = Batches::from_limits(None, None);
        assert_eq!((none.read_nodes, none.create_items), (CHUNK, CHUNK));
        let zero = Batches::from_limits(Some(0), Some(0));
        assert_eq!(zero, none, "0 means no limit");
        let small = Batches::from_limits(Some(150), Some(100));
        assert_eq!((small.read_nodes, small.create_items), (75, 100));
        let large = Batches::from_limits(Some(100_000), Some(100_000));
        assert_eq!(large, none);
    }
}
