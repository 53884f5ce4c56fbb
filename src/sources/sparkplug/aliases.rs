//! What the births said, per edge node: the alias → (name, datatype) table
//! of the last NBIRTH and the DBIRTHs after it, and the table of all edge
//! nodes, bounded by [`Limits`] (least recently used nodes forgotten
//! first). It must never grow past those bounds: a birth that would is
//! refused.

use std::collections::HashMap;
use std::sync::Arc;

use super::Limits;
use super::proto::payload::Metric;

/// What one alias-table entry costs besides its name, in bytes, as counted
/// against [`Limits::alias_memory`]: hash map slot, key, `Arc` header and
/// datatype, with the map's spare capacity.
const ENTRY_COST: usize = 96;
/// What a birth certificate said about a metric.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MetricDef {
    pub(super) name: Arc<str>,
    pub(super) datatype: Option<u32>,
}

/// The birth-certificate knowledge of one edge node.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeDefs {
    pub(super) by_alias: HashMap<u64, MetricDef>,
    pub(super) datatype_by_name: HashMap<Arc<str>, u32>,
    /// What this table counts against [`Limits::alias_memory`].
    pub(super) bytes: usize,
}

impl NodeDefs {
    /// The table with a birth's definitions added; `Err` when the node
    /// would then hold more than `max_aliases` aliases or named datatypes,
    /// or more than `max_bytes`.
    pub(super) fn learn(
        self,
        metrics: &[Metric],
        max_aliases: usize,
        max_bytes: usize,
    ) -> Result<NodeDefs, String> {
        let mut next = self;
        for m in metrics {
            let Some(name) = &m.name else { continue };
            let name: Arc<str> = Arc::from(name.as_str());
            if let Some(alias) = m.alias {
                let def = MetricDef {
                    name: name.clone(),
                    datatype: m.datatype,
                };
                next.bytes += name.len() + ENTRY_COST;
                if let Some(old) = next.by_alias.insert(alias, def) {
                    next.bytes -= old.name.len() + ENTRY_COST;
                }
            }
            if let Some(dt) = m.datatype {
                next.bytes += name.len() + ENTRY_COST;
                if next.datatype_by_name.insert(name.clone(), dt).is_some() {
                    next.bytes -= name.len() + ENTRY_COST;
                }
            }
            if next.by_alias.len() > max_aliases || next.datatype_by_name.len() > max_aliases {
                return Err(format!(
                    "the births of this edge node define more than {max_aliases} metrics \
                     (sparkplug_max_aliases); its alias table is not extended"
                ));
            }
            if next.bytes > max_bytes {
                return Err(format!(
                    "the births of this edge node need more than {max_bytes} bytes of alias \
                     table (sparkplug_alias_memory); its alias table is not extended"
                ));
            }
        }
        Ok(next)
    }
}

/// The alias tables of the edge nodes seen, bounded by [`Limits`]. Tables
/// are shared (`Arc`), so that a snapshot of the whole table is cheap.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeTable {
    pub(super) nodes: HashMap<(String, String), NodeEntry>,
    /// Sum of the tables' `bytes`, plus the keys.
    pub(super) bytes: usize,
    /// Use counter for least-recently-used eviction.
    clock: u64,
}

#[derive(Debug, Clone)]
pub(super) struct NodeEntry {
    pub(super) defs: Arc<NodeDefs>,
    last_used: u64,
}

impl NodeTable {
    fn key_cost(key: &(String, String)) -> usize {
        key.0.len() + key.1.len() + ENTRY_COST
    }

    pub(super) fn get(&mut self, key: &(String, String)) -> Option<Arc<NodeDefs>> {
        self.clock += 1;
        let now = self.clock;
        self.nodes.get_mut(key).map(|e| {
            e.last_used = now;
            e.defs.clone()
        })
    }

    pub(super) fn remove(&mut self, key: &(String, String)) {
        if let Some(e) = self.nodes.remove(key) {
            self.bytes = self
                .bytes
                .saturating_sub(e.defs.bytes + Self::key_cost(key));
        }
    }

    /// Puts a node's table, forgetting the least recently used other nodes
    /// while over `max_nodes` or `alias_memory`.
    pub(super) fn put(&mut self, key: (String, String), defs: NodeDefs, limits: &Limits) {
        self.remove(&key);
        self.clock += 1;
        self.bytes += defs.bytes + Self::key_cost(&key);
        self.nodes.insert(
            key,
            NodeEntry {
                defs: Arc::new(defs),
                last_used: self.clock,
            },
        );
        while self.nodes.len() > limits.max_nodes.max(1) || self.bytes > limits.alias_memory {
            let oldest = self
                .nodes
                .iter()
                .filter(|(_, e)| e.last_used != self.clock)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            tracing::debug!(group = %oldest.0, edge_node = %oldest.1, "Sparkplug alias table of the least recently used edge node forgotten");
            self.remove(&oldest);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }
}
