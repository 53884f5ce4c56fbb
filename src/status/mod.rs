//! Live state of every source and sink, shared between the components that
//! update it and the health server that reports it. Plain atomics and short
//! mutexes: updating status must never block a source or a forwarder, and
//! this module must never do I/O.
//!
//! Error text kept here is served by `/api/v1/status` and often holds what
//! a client or an upstream sent: it is stored escaped and bounded
//! ([`crate::text::bounded_error`], 512 bytes), never as given.

pub mod certs;
mod history;
pub mod report;

pub use history::History;
pub use report::{AgentView, StatusReport};

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;

use crate::text;
use crate::units::{rfc3339_us, unix_micros};

/// One source's counters; the source updates, the health server reads.
#[derive(Debug)]
pub struct SourceStatus {
    pub name: String,
    /// `http`, `mqtt` or `opcua`.
    pub kind: &'static str,
    pub started: AtomicBool,
    pub connected: AtomicBool,
    pub events: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejects: AtomicU64,
    /// Events dropped before the journal (OPC UA: data changes superseded
    /// by a newer value of the same node while the queue was full).
    pub dropped: AtomicU64,
    /// HTTP: ingest requests being read, parsed or committed right now (a
    /// value that stays up while nothing is stored points at a stuck
    /// sender or a journal that does not commit). 0 for other kinds.
    pub in_flight: AtomicU64,
    /// µs since the epoch; 0 = never.
    pub last_event_us: AtomicI64,
    pub last_error: Mutex<Option<(i64, String)>>,
    /// OPC UA: nodes the server refused or that could not be resolved
    /// (node id, status name), retried by the source.
    pub bad_nodes: Mutex<Vec<(String, String)>>,
    /// Events refused because their data failed their type's schema (or
    /// their type has none under `require_schema`), by type. Keys are the
    /// configured schema types and [`NO_SCHEMA`]: a sender cannot grow it.
    pub schema_rejects: Mutex<BTreeMap<String, u64>>,
}

/// The `type` label of events refused for having no schema.
pub const NO_SCHEMA: &str = "(no schema)";

impl SourceStatus {
    pub fn new(name: &str, kind: &'static str) -> SourceStatus {
        SourceStatus {
            name: name.to_string(),
            kind,
            started: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            events: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejects: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_event_us: AtomicI64::new(0),
            last_error: Mutex::new(None),
            bad_nodes: Mutex::new(Vec::new()),
            schema_rejects: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts `n` events of `event_type` refused by schema (also in `rejects`).
    pub fn record_schema_rejects(&self, event_type: &str, n: u64) {
        if let Ok(mut m) = self.schema_rejects.lock() {
            *m.entry(event_type.to_owned()).or_default() += n;
        }
    }

    /// Replaces the list of refused nodes (OPC UA).
    pub fn set_bad_nodes(&self, nodes: Vec<(String, String)>) {
        if let Ok(mut b) = self.bad_nodes.lock() {
            *b = nodes;
        }
    }

    /// Counts events the journal accepted (`stored` new, `duplicates` known).
    pub fn record_events(&self, stored: u64, duplicates: u64) {
        self.events.fetch_add(stored, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.last_event_us
            .store(unix_micros(SystemTime::now()), Ordering::Relaxed);
    }

    pub fn record_reject(&self, n: u64) {
        self.rejects.fetch_add(n, Ordering::Relaxed);
    }

    pub fn record_error(&self, message: impl Into<String>) {
        let message = text::bounded_error(&message.into());
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some((unix_micros(SystemTime::now()), message));
        }
    }

    pub fn snapshot(&self) -> SourceSnapshot {
        let last_error = self.last_error.lock().ok().and_then(|e| e.clone());
        let last_event = self.last_event_us.load(Ordering::Relaxed);
        SourceSnapshot {
            name: self.name.clone(),
            kind: self.kind,
            started: self.started.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            rejects: self.rejects.load(Ordering::Relaxed),
            schema_rejects: self
                .schema_rejects
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(t, n)| SchemaRejects {
                            event_type: t.clone(),
                            events: *n,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            dropped: self.dropped.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            last_event_time: (last_event > 0).then(|| rfc3339_us(last_event)),
            last_event_us: (last_event > 0).then_some(last_event),
            last_error: last_error.as_ref().map(|(_, m)| m.clone()),
            last_error_time: last_error.map(|(t, _)| rfc3339_us(t)),
            bad_nodes: self
                .bad_nodes
                .lock()
                .map(|b| {
                    b.iter()
                        .map(|(node_id, status)| BadNodeSnapshot {
                            node_id: node_id.clone(),
                            status: status.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceSnapshot {
    pub name: String,
    pub kind: &'static str,
    pub started: bool,
    pub connected: bool,
    pub events: u64,
    pub duplicates: u64,
    pub rejects: u64,
    /// Of `rejects`, those refused by a schema, by type; omitted when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schema_rejects: Vec<SchemaRejects>,
    /// See [`SourceStatus::dropped`].
    pub dropped: u64,
    /// See [`SourceStatus::in_flight`].
    pub in_flight: u64,
    pub last_event_time: Option<String>,
    /// `last_event_time` as µs since the epoch, for the metrics.
    #[serde(skip)]
    pub last_event_us: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_time: Option<String>,
    /// OPC UA nodes not monitored right now, and why; omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bad_nodes: Vec<BadNodeSnapshot>,
}

/// Events of one type a source refused by schema.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaRejects {
    #[serde(rename = "type")]
    pub event_type: String,
    pub events: u64,
}

/// A node an OPC UA source cannot monitor right now (retried).
#[derive(Debug, Clone, Serialize)]
pub struct BadNodeSnapshot {
    pub node_id: String,
    pub status: String,
}

/// How a sink is doing, as the central team sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkState {
    /// Delivering, or idle with nothing to deliver.
    Ok,
    /// The last attempt failed; retrying with backoff.
    Retrying,
    /// No success for `stall_after` while there is a backlog.
    Stalled,
}

/// A sink forwarder's bookkeeping as last published by its loop.
#[derive(Debug, Clone, Default)]
pub struct SinkProgress {
    pub cursor: u64,
    pub delivered: u64,
    pub batches: u64,
    pub attempts: u64,
    pub consecutive_failures: u64,
    pub dead_letters: u64,
    /// See [`crate::sinks::Sink::upstream_duplicates`].
    pub upstream_duplicates: u64,
    /// See [`crate::sinks::Sink::token_state`].
    pub oauth2: Option<TokenState>,
    pub last_success_us: Option<i64>,
    pub last_error: Option<(i64, String)>,
    pub running: bool,
}

#[derive(Debug)]
pub struct SinkStatus {
    pub name: String,
    /// `https`, `mqtt` or `jetstream`.
    pub kind: &'static str,
    pub progress: Mutex<SinkProgress>,
}

impl SinkStatus {
    pub fn new(name: &str, kind: &'static str) -> SinkStatus {
        SinkStatus {
            name: name.to_string(),
            kind,
            progress: Mutex::new(SinkProgress::default()),
        }
    }

    /// Applies `f`; a `last_error` it sets is escaped and bounded here, so
    /// that no caller can store an upstream's whole answer.
    pub fn update(&self, f: impl FnOnce(&mut SinkProgress)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p);
            if let Some((_, e)) = p.last_error.as_mut()
                && let std::borrow::Cow::Owned(safe) = text::escape_control(e, text::MAX_ERROR_LEN)
            {
                *e = safe;
            }
        }
    }

    pub fn progress(&self) -> SinkProgress {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// What the status shows of an OAuth2 sink's token (never the token).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TokenState {
    /// The token endpoint.
    pub token_url: String,
    /// When the token in hand expires (RFC 3339); `null` before the first
    /// fetch, or when the server gave no lifetime.
    pub valid_until: Option<String>,
    /// Tokens fetched since start.
    pub fetches: u64,
    /// Why the last fetch failed, if it did (cleared by the next success).
    pub last_error: Option<String>,
    pub last_error_time: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_error_is_stored_escaped_and_bounded() {
        let s = SourceStatus::new("mes", "http");
        s.record_error(format!("bad request: {}", "x\n\x1b".repeat(1 << 20)));
        let e = s.snapshot().last_error.unwrap();
        assert!(e.len() <= text::MAX_ERROR_LEN, "{}", e.len());
        let k = SinkStatus::new("central", "https");
        k.update(|p| p.last_error = Some((1, format!("422: {}\n\x07", "y".repeat(1 << 20)))));
        let (_, e) = k.progress().last_error.unwrap();
        assert!(e.len() <= text::MAX_ERROR_LEN, "{}", e.len());
        assert!(!e.contains('\n') && !e.contains('\x07'));
    }
}
