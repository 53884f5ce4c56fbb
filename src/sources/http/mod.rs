//! The MES ingest listener: `POST /v1/events` on a `[[sources.http]]`
//! address, plain HTTP or HTTPS (rustls, ring).
//!
//! This module owns the HTTP ingest contract: authentication (optional
//! bearer token, compared in constant time, checked before the body is
//! read), the body limit, the accepted content types, the CloudEvents
//! validation rules and how a CloudEvent maps onto a [`NewEvent`], and the
//! answers (`202` with counts and seqs, `400`, `401`, `413`, `415`, `503`
//! with `Retry-After`).
//!
//! It must never answer `2xx` before [`Journal::append`] returned `Ok` (the
//! journal commit is the durable-before-ack point), and it must never store
//! anything of a request it rejects: validation is all-or-nothing per
//! request, so a batch with one bad event stores none of them. It must never
//! let one client's request grow without bound: events per request,
//! attributes per event, nesting depth and requests at once are all capped
//! (see [Limits](#limits)), and text quoted from a request into an answer, a
//! log line or `last_error` is escaped and cut ([`crate::text`]).
//!
//! # Accepted bodies
//!
//! | `Content-Type` (parameters ignored)          | body                              |
//! |----------------------------------------------|-----------------------------------|
//! | `application/cloudevents+json`               | one CloudEvent object             |
//! | `application/cloudevents-batch+json`         | a JSON array of CloudEvents       |
//! | `application/x-ndjson`, `application/ndjson` | one CloudEvent per non-empty line |
//! | `application/json`                           | an object or an array             |
//!
//! A leading UTF-8 byte-order mark is ignored.
//!
//! # Mapping a CloudEvent onto the journal
//!
//! - `id` (required, non-empty string, at most 1024 bytes): the dedup key
//!   together with the source name. A re-posted id is acknowledged as a
//!   duplicate with the seq it was first stored under.
//! - `specversion`: optional; if present it must be `"1.0"`.
//! - `subject`: the stream (ordering key); default: the source name.
//! - `type`: kept; default `"plantrelay.http.event"`.
//! - `time`: optional RFC 3339 timestamp (`Z` or a numeric offset), kept as
//!   sent.
//! - `data`: any JSON value, kept verbatim (byte for byte) as JSON text;
//!   absent means `null`. `data_base64` (a base64 string) is kept as the
//!   attribute `data_base64` with `data` set to `null`; both at once are
//!   rejected.
//! - `source`: the sender's own source is kept as the extension
//!   `originsource` (plantrelay sets `source` to `plantrelay://<agent>/<name>`);
//!   an event carrying both `source` and `originsource` is rejected as
//!   ambiguous.
//! - `sequence` and `streamsequence` are **dropped**: plantrelay assigns
//!   these extensions itself when forwarding.
//! - Every other attribute (`datacontenttype`, `dataschema`, any extension)
//!   is forwarded unchanged; it must be a scalar (string, number, boolean),
//!   as must `source`: an object or an array is rejected. An attribute that
//!   appears twice in one event is rejected. A `null` `subject`, `type`,
//!   `time`, `source` or extension counts as absent.
//!
//! # Limits
//!
//! - `max_events_per_request` (default 10,000): the parser stops at the first
//!   event past it; `413`.
//! - `max_attributes` (default 64) per event: the parser stops at the first
//!   attribute past it; `400`.
//! - `max_depth` (default 32) of `data`: counted on the raw text, without
//!   recursion, before anything is built; `400`.
//! - `max_concurrent_requests` (default 4): a slot is taken after the
//!   headers are checked and before the body is read, and held until the
//!   events are parsed and checked; none free within 2 s gives `503` +
//!   `Retry-After: 1`. With a slot, the body must arrive within 20 s, else
//!   `408`. So requests being read hold at most `max_concurrent_requests` ×
//!   about 4 × `max_body` (measured by the hostile-input tests).
//! - Waiting for the commit, a request holds a share of a budget of
//!   `max_body` (its events' bytes plus a per-event overhead) instead of a
//!   slot, so one-event requests share commits however many are in flight;
//!   no share within 2 s gives `503` + `Retry-After: 1`.
//!
//! # Answers
//!
//! `202 {"accepted": n, "duplicates": d, "seqs": [...]}` once committed (one
//! seq per event, in request order); `400 {"error", "index"}` (index of the
//! first bad event, the 0-based line number for NDJSON; no index when the
//! problem is not one event's); `401` + `WWW-Authenticate: Bearer`; `408`
//! when the body is too slow; `413` (body or event count); `415` listing the
//! accepted types; `503` + `Retry-After: 1` when the journal is full under
//! `when_full = "block"` or no slot is free, `503` + `Retry-After: 5` when the
//! commit failed (nothing was stored; the sender must retry).
//!
//! # Where it lives
//!
//! This file holds the request path (header checks, the slot, the body, the
//! commit) and what the parts share. `listener` binds and serves and owns
//! the bearer token; `answer` turns a rejection or a commit into a
//! response; `parse` reads a body into events under the limits; `mapping`
//! maps one CloudEvent onto a [`NewEvent`]; `schemas` checks events
//! against their type's JSON Schema; `trace` reads the request's W3C Trace
//! Context.
//!
//! [`NewEvent`]: crate::event::NewEvent

mod answer;
mod listener;
mod mapping;
mod parse;
mod schemas;
#[cfg(test)]
mod tests;
mod trace;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use crate::config::HttpSourceConfig;
use crate::event::{Class, NewEvent};
use crate::journal::Journal;
use crate::schema::Schemas;
use crate::status::SourceStatus;
use crate::text::{QUOTE_MAX, escape_control};
use crate::tls::TlsError;

use self::answer::Reject;
pub use self::listener::HttpSource;
use self::listener::Token;
pub(crate) use self::parse::{body_format, parse_events};
use self::trace::TraceContext;
use crate::warn_limit::WarnLimiter;

/// The one ingest path.
pub const INGEST_PATH: &str = "/v1/events";

/// CloudEvents `type` of an event that does not name its own.
pub const DEFAULT_EVENT_TYPE: &str = "plantrelay.http.event";

/// Longest accepted `id`, `subject` (stream) and `type`, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Attribute names plantrelay assigns itself; dropped from incoming events.
pub use crate::event::RESERVED_ATTRIBUTES;

/// The content types `POST /v1/events` accepts (listed in a `415`).
pub const ACCEPTED_CONTENT_TYPES: [&str; 5] = [
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "application/x-ndjson",
    "application/ndjson",
    "application/json",
];

/// How long a request waits for one of the `max_concurrent_requests` slots
/// before it is answered `503`: long enough to ride out a burst of normal
/// batches (a commit takes milliseconds), short enough that a sender is told
/// to come back rather than left hanging.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// How long a request may take to send its body once it holds a slot: a
/// sender that trickles its body must not keep a slot from the others for
/// longer. 4 MiB in 20 s needs 1.7 Mbit/s.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Why an HTTP source could not start or stopped. Every message names the
/// source and, where there is one, the address.
#[derive(Debug, thiserror::Error)]
pub enum HttpSourceError {
    /// The token file could not be read (or is empty / multi-line).
    #[error("sources.http '{name}': token_file: {source}")]
    Token {
        name: String,
        #[source]
        source: io::Error,
    },
    /// Only one of `tls_cert` / `tls_key` is set.
    #[error(
        "sources.http '{name}': tls_cert and tls_key must be set together; only {given} is set"
    )]
    IncompleteTls { name: String, given: &'static str },
    /// The certificate or key could not be loaded.
    #[error("sources.http '{name}': {source}")]
    Tls {
        name: String,
        #[source]
        source: TlsError,
    },
    /// The listener could not be bound.
    #[error("sources.http '{name}': cannot listen on {addr}: {reason}")]
    Bind {
        name: String,
        addr: SocketAddr,
        reason: String,
        #[source]
        source: io::Error,
    },
}

// ---------------------------------------------------------------------------
// Request handling

/// What every request of one source shares.
struct Ingest {
    name: String,
    class: Class,
    max_body: u64,
    token: Option<Token>,
    journal: Journal,
    status: Arc<SourceStatus>,
    warnings: WarnLimiter,
    limits: Limits,
    /// JSON Schemas by event type, checked before the commit.
    schemas: Arc<Schemas>,
    /// Refuse events whose type has no schema.
    require_schema: bool,
    /// One permit per request being read and parsed: bounds the memory
    /// all requests together hold to about `max_concurrent_requests` times
    /// that of one.
    slots: tokio::sync::Semaphore,
    /// Parsed events waiting for (or in) their commit, in KiB of
    /// [`waiting_kib`], at most `max_body` in all ([`waiting_budget_kib`]). A request takes its share
    /// before it gives its slot back, so the slots bound the reading and
    /// parsing, this the waiting, and requests of a few events each can
    /// share a commit whatever `max_concurrent_requests` is (with the slot
    /// held through the commit, four one-event requests were the most a
    /// commit ever gathered: 4.8 KB written per event at 1,000 requests/s).
    waiting: tokio::sync::Semaphore,
}

/// Per-event cost counted against [`Ingest::waiting`] beside
/// [`crate::event::NewEvent::size`]: what an event holds in memory besides
/// its bytes (its strings' headers, the vectors), so that a body of tiny
/// events counts for what it costs.
const EVENT_OVERHEAD: usize = 128;

/// The waiting budget of a source with `max_body`, in KiB (at least one
/// request's share, whatever the body limit).
fn waiting_budget_kib(max_body: u64) -> u32 {
    u32::try_from(max_body.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_WAITING_KIB)
}

/// Most KiB the waiting budget holds: far above any sane `max_body`, within
/// what a semaphore counts.
const MAX_WAITING_KIB: u32 = 1 << 24;

/// What `events` take of the waiting budget: never more than all of it, so
/// a request alone always fits.
fn waiting_kib(events: &[NewEvent], budget_kib: u32) -> u32 {
    let bytes: usize = events.iter().map(|e| e.size() + EVENT_OVERHEAD).sum();
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, budget_kib)
}

/// What one request may hold, from the source's config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    max_events_per_request: usize,
    max_concurrent_requests: usize,
    max_depth: usize,
    max_attributes: usize,
}

impl Limits {
    pub(crate) fn new(cfg: &HttpSourceConfig) -> Limits {
        Limits {
            max_events_per_request: cfg.max_events_per_request,
            // A zero would refuse every request; validation keeps it >= 1.
            max_concurrent_requests: cfg.max_concurrent_requests.max(1),
            max_depth: cfg.max_depth,
            max_attributes: cfg.max_attributes,
        }
    }
}

async fn post_events(State(ingest): State<Arc<Ingest>>, req: Request) -> Response {
    let _in_flight = InFlight::enter(&ingest.status);
    match ingest_request(&ingest, req).await {
        Ok(response) => response,
        Err(reject) => ingest.rejected(reject),
    }
}

/// Counts a request in [`SourceStatus::in_flight`] for as long as it is
/// handled, however its handler ends (answered, or dropped with its
/// connection).
struct InFlight<'a>(&'a SourceStatus);

impl<'a> InFlight<'a> {
    fn enter(status: &'a SourceStatus) -> InFlight<'a> {
        status
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(status)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn ingest_request(ingest: &Ingest, req: Request) -> Result<Response, Reject> {
    // 1. Who is asking: before anything of the body is read.
    if let Some(token) = &ingest.token
        && !token.accepts(req.headers().get(header::AUTHORIZATION))
    {
        return Err(Reject {
            status: StatusCode::UNAUTHORIZED,
            kind: "unauthorized",
            message: "unauthorized".into(),
            index: None,
            errors: None,
        });
    }
    // 2. What it is.
    let format = body_format(req.headers())?;
    let trace = TraceContext::from_headers(req.headers())?;
    // 3. How big it claims to be (a streamed body is limited while read).
    if let Some(len) = content_length(req.headers())
        && len > ingest.max_body
    {
        return Err(Reject::too_large(ingest.max_body));
    }
    // 4. A slot, before the body is read: what requests hold in memory is
    // bounded by the number of slots, not by the number of clients.
    let slot = match tokio::time::timeout(SLOT_WAIT, ingest.slots.acquire()).await {
        Ok(Ok(permit)) => permit,
        // The semaphore is never closed; either way there is no slot.
        Ok(Err(_)) | Err(_) => return Err(Reject::busy(ingest.limits.max_concurrent_requests)),
    };
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(req, &())).await {
        Err(_) => return Err(Reject::body_timeout()),
        Ok(Ok(body)) => body,
        Ok(Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)))) => {
            return Err(Reject::too_large(ingest.max_body));
        }
        Ok(Err(e)) => {
            return Err(Reject::bad_request(
                format!(
                    "cannot read the request body: {}",
                    escape_control(&e.body_text(), QUOTE_MAX)
                ),
                None,
            ));
        }
    };
    // 5. Every event valid, or none stored.
    let events = parse_events(
        &body,
        format,
        &ingest.name,
        ingest.class,
        &ingest.limits,
        trace.as_ref(),
    )?;
    // 6. Every event's data matches its type's schema, or none stored.
    ingest.check_schemas(&events)?;
    // The events own their bytes: the body need not live through the commit.
    drop(body);
    // 7. A share of the waiting budget, then the slot goes back: the next
    // request is read while this one waits for its commit.
    let share = waiting_kib(&events, waiting_budget_kib(ingest.max_body));
    let _waiting = match tokio::time::timeout(SLOT_WAIT, ingest.waiting.acquire_many(share)).await {
        Ok(Ok(permit)) => permit,
        // The semaphore is never closed; either way there is no room.
        Ok(Err(_)) | Err(_) => return Err(Reject::commits_behind(ingest.max_body)),
    };
    drop(slot);
    let count = events.len();
    // 8. The commit: only its success is acknowledged.
    match ingest.journal.append(events).await {
        Ok(outcomes) => Ok(ingest.committed(count, &outcomes)),
        Err(e) => Ok(ingest.commit_failed(count, &e)),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
