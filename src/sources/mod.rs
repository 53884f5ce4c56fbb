//! Sources: everything that brings events into the journal. A source only
//! appends; it acknowledges to its peer only after the journal answered.
//!
//! - [`http`]: the MES ingest API (`POST /v1/events`).
//! - [`mqtt`]: subscriptions on a plant MQTT broker, acked after commit.
//! - [`opcua`]: subscriptions on an OPC UA server, resynced after every reconnect.
//! - [`sparkplug`]: the Sparkplug B types and decoder `mqtt` uses.
//! - [`reconnect`]: the jittered reconnect delay `mqtt` and `opcua` share.

pub mod http;
pub mod mqtt;
pub mod opcua;
pub mod reconnect;
pub mod sparkplug;

use std::time::Duration;

use crate::journal::JournalError;

/// How long a source that holds its data (MQTT, OPC UA) waits before
/// offering a failed journal append again, after `attempt` failures in a row.
pub(crate) fn append_retry_delay(e: &JournalError, attempt: u32) -> Duration {
    match e {
        // The journal already waited block_timeout for space.
        JournalError::Full { .. } => Duration::from_millis(100),
        _ => Duration::from_millis(200 * u64::from(attempt.min(25))),
    }
}
