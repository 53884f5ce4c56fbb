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
