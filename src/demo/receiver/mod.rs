//! The embedded HTTPS upstream receiver: a real CloudEvents batch ingest
//! endpoint (`POST /v1/events`) used by `plantrelay demo`, by the
//! integration tests and by the benchmarks.
//!
//! It owns three things:
//! - an ephemeral PKI ([`EphemeralPki`]): a CA, a server certificate for
//!   `localhost`/`127.0.0.1` and a client certificate, generated at run time;
//! - the endpoint ([`Receiver`]): TLS through [`crate::tls`] (ring only), an
//!   optional client-certificate requirement, content-type and
//!   content-encoding checks, and a recording of every accepted event in
//!   arrival order;
//! - fault injection (status codes with `Retry-After`, latency, connection
//!   resets, per-id rejection, stop and restart on the same port) and the
//!   [`Verdict`] computed from the recording: what arrived, how often, and in
//!   which order.
//!
//! It must never panic or hang on a request path: bad input is answered with
//! a 4xx and a reason, and state locks are never held across an `.await`.
//! It must never be part of `plantrelay run`: it trusts its own throwaway CA
//! and keeps everything it receives in memory.
//!
//! # Wire contract
//! - `Content-Type: application/cloudevents-batch+json` (parameters such as
//!   `charset` allowed), else 415.
//! - `Content-Encoding: gzip | zstd | identity` (or none), else 415; a body
//!   that does not decode is a 400; more than [`MAX_BODY_BYTES`] on the wire
//!   or decoded is a 413.
//! - The body is a JSON array of CloudEvents objects. `specversion` (`"1.0"`),
//!   `id`, `source` and `type` are required (non-empty strings); `subject`,
//!   `time`, `data` and the integer extensions `sequence` and
//!   `streamsequence` are optional. Anything else is a 400 naming the event
//!   and the field.
//! - Success is `200 {"received": n, "duplicates": d}`; the batch's
//!   `Idempotency-Key` header is recorded with it.
//!
//! # How the verdict treats `plantrelay.gap` events
//! A gap event announces stream sequences the agent evicted and will never
//! send. plantrelay's gap event names the stream by its own `subject` and
//! `source` and the inclusive range by `data.first_streamsequence` ..=
//! `data.last_streamsequence` (it stands in the stream in place of the
//! evicted events, with `streamsequence` = the first of them). Other shapes
//! are read too: `data` as one object, an array of objects, or an object with
//! a `streams` array, each naming `subject` (or `stream`), an optional
//! `source`, and `from_streamsequence` ..= `to_streamsequence`. Gap events
//! are counted in [`Verdict::gaps`] and are not themselves part of any
//! stream's order check. Because the agent journals a gap event after the
//! eviction, it normally arrives *after* the jump it explains, so the verdict
//! is computed over the whole recording: a forward jump whose skipped
//! sequences are all announced by gap events is not out of order, and those
//! sequences count as [`Verdict::gap_covered`] instead of
//! [`Verdict::missing`]. A gap event whose data names no range is counted but
//! excuses nothing.

mod conn;
mod faults;
mod handler;
mod pki;
mod recording;
mod server;
mod verdict;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

pub use faults::Scripted;
pub use pki::{EphemeralPki, PkiError, PkiPaths};
pub use recording::{BatchRecord, ReceivedEvent, ReceiverStats};
pub use server::{Receiver, ReceiverError, ReceiverOptions, ServerIdentity};
pub use verdict::{StreamVerdict, Verdict};

use conn::ConnState;
use faults::Faults;
use recording::Recording;

/// The ingest path.
pub const INGEST_PATH: &str = "/v1/events";
/// The only accepted media type.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Largest accepted body, on the wire and after decompression.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// The reason given in 422 answers for ids listed with [`Receiver::reject_ids`].
pub const REJECT_REASON: &str = "rejected by the receiver's fault injection (reject_ids)";

/// What the server, each connection and the handler share: one per
/// receiver, kept across restarts.
struct Shared {
    recording: Mutex<Recording>,
    faults: Mutex<Faults>,
    script: Mutex<std::collections::VecDeque<Scripted>>,
    conns: Mutex<HashMap<SocketAddr, Arc<ConnState>>>,
    changed: Notify,
    record_data: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the receiver down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
