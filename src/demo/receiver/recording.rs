//! What the receiver keeps of what it accepted: every event in arrival
//! order, every batch, and running counters. Plain data, filled in by the
//! handler under one lock; it must never judge order or completeness (that
//! is the [`super::Verdict`]'s job).

use std::collections::HashSet;

use serde_json::Value;

/// One event as it arrived, in an accepted batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    /// CloudEvents `source` (for plantrelay: `plantrelay://<agent>/<source>`).
    pub source: String,
    pub id: String,
    /// CloudEvents `subject`: the stream.
    pub subject: Option<String>,
    pub event_type: String,
    pub time: Option<String>,
    /// Journal sequence extension.
    pub sequence: Option<u64>,
    /// Per-stream sequence extension.
    pub streamsequence: Option<u64>,
    /// `null` when absent, or when the receiver does not record data.
    pub data: Value,
    /// Whether `(source, id)` had arrived before.
    pub duplicate: bool,
    /// Index of its batch in [`Receiver::batches`](super::Receiver::batches).
    pub batch: usize,
}

/// One accepted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub idempotency_key: Option<String>,
    pub events: usize,
    /// Body size as received.
    pub wire_bytes: usize,
    /// Body size after decompression.
    pub decoded_bytes: usize,
    /// `identity`, `gzip` or `zstd`.
    pub encoding: &'static str,
}

/// Running counters, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Every `POST /v1/events` that reached the handler.
    pub requests: u64,
    pub batches_accepted: u64,
    /// Events in accepted batches, duplicates included.
    pub events_received: u64,
    pub unique_ids: u64,
    pub duplicates: u64,
    pub wire_bytes: u64,
    pub decoded_bytes: u64,
    /// Answered with the status set by [`Receiver::set_fail`](super::Receiver::set_fail).
    pub injected_failures: u64,
    /// Dropped without an answer by [`Receiver::set_reset`](super::Receiver::set_reset).
    pub injected_resets: u64,
    /// Answered 422 because of [`Receiver::reject_ids`](super::Receiver::reject_ids).
    pub rejected_batches: u64,
    /// Answered 400, 413 or 415.
    pub malformed_batches: u64,
}

#[derive(Default)]
pub(super) struct Recording {
    pub(super) events: Vec<ReceivedEvent>,
    pub(super) batches: Vec<BatchRecord>,
    pub(super) seen: HashSet<(String, String)>,
    pub(super) stats: ReceiverStats,
}
