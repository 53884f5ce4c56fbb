//! Sources: everything that brings events into the journal. A source only
//! appends; it acknowledges to its peer only after the journal answered.
//!
//! - [`http`]: the MES ingest API (`POST /v1/events`).

pub mod http;
