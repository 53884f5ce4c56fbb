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
//!   answer; none free within 2 s gives `503` + `Retry-After: 1`. With a
//!   slot, the body must arrive within 20 s, else `408`. So requests in
//!   flight hold at most `max_concurrent_requests` × about 4 × `max_body`
//!   (measured by the hostile-input tests).
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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{HttpSourceConfig, read_secret};
use crate::event::{Class, NewEvent, is_rfc3339, json_depth, json_lone_surrogate};
use crate::journal::{AppendOutcome, Journal, JournalError};
use crate::schema::{self, Schemas};
use crate::serve;
use crate::status::{NO_SCHEMA, SourceStatus};
use crate::text::{QUOTE_MAX, escape_control};
use crate::tls::{self, TlsError};

/// The one ingest path.
pub const INGEST_PATH: &str = "/v1/events";

/// CloudEvents `type` of an event that does not name its own.
pub const DEFAULT_EVENT_TYPE: &str = "plantrelay.http.event";

/// Why an event whose `data` holds a lone surrogate escape is refused.
const LONE_SURROGATE_DATA: &str = "attribute \"data\" holds a \\u escape of half a surrogate \
     pair (e.g. \\ud800 alone), which is no Unicode text; upstream JSON readers would \
     refuse it";

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

/// Longest reason, in bytes, in a `4xx`/`503` answer, a log line or the
/// source's `last_error`.
const MAX_REASON: usize = 512;

/// Most problems listed in one `422` answer.
const MAX_SCHEMA_ERRORS: usize = 100;

/// How often the same kind of rejection is logged at `warn`.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why an HTTP source could not start or stopped. Every message names the
/// source and, where there is one, the address.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
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

/// A bound (not yet serving) ingest listener.
pub struct HttpSource {
    name: String,
    class: Class,
    max_body: u64,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    token: Option<Token>,
    tls: Option<Arc<rustls::ServerConfig>>,
    listener_limits: serve::Limits,
    limits: Limits,
    schemas: Arc<Schemas>,
    require_schema: bool,
}

impl fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSource")
            .field("name", &self.name)
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

/// The bearer token; never printed.
struct Token(Box<[u8]>);

impl Token {
    /// Constant-time check of an `Authorization` header value.
    fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(value) = header else {
            return false;
        };
        let value = value.as_bytes();
        let Some(space) = value.iter().position(|b| *b == b' ') else {
            return false;
        };
        let (scheme, rest) = value.split_at(space);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
        let given = rest.trim_ascii();
        // `ct_eq` on slices of different lengths is false without comparing
        // the contents: only the length can leak, never a prefix.
        bool::from(given.ct_eq(&self.0))
    }
}

impl HttpSource {
    /// Reads the token file, builds TLS if configured, and binds the
    /// listener (so the agent can report "listeners bound" before it serves).
    /// Errors name the source, the address and the cause
    /// (`sources.http 'mes': cannot listen on 127.0.0.1:8081: address in use`).
    pub async fn bind(cfg: &HttpSourceConfig) -> Result<HttpSource, SourceError> {
        let name = cfg.name.clone();
        let token = match &cfg.token_file {
            Some(path) => {
                let secret = read_secret(path).map_err(|source| SourceError::Token {
                    name: name.clone(),
                    source,
                })?;
                Some(Token(secret.into_bytes().into_boxed_slice()))
            }
            None => None,
        };
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => {
                let config =
                    tls::server_config(cert, key, None).map_err(|source| SourceError::Tls {
                        name: name.clone(),
                        source,
                    })?;
                Some(Arc::new(config))
            }
            (Some(_), None) => {
                return Err(SourceError::IncompleteTls {
                    name,
                    given: "tls_cert",
                });
            }
            (None, Some(_)) => {
                return Err(SourceError::IncompleteTls {
                    name,
                    given: "tls_key",
                });
            }
            (None, None) => None,
        };
        let bind_err = |source: io::Error| SourceError::Bind {
            name: name.clone(),
            addr: cfg.listen,
            reason: describe_bind_error(&source),
            source,
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        debug!(source = %name, addr = %local_addr, tls = tls.is_some(), "HTTP ingest listener bound");
        Ok(HttpSource {
            name,
            class: cfg.class,
            max_body: cfg.max_body,
            listener,
            local_addr,
            token,
            tls,
            listener_limits: serve::Limits {
                max_connections: cfg.max_connections,
                max_connections_per_ip: cfg.max_connections_per_ip,
                header_timeout: cfg.header_timeout,
                request_timeout: cfg.request_timeout,
            },
            limits: Limits::new(cfg),
            schemas: Arc::new(Schemas::default()),
            require_schema: cfg.require_schema,
        })
    }

    /// The JSON Schemas the data of this source's events must match, by type.
    pub fn with_schemas(mut self, schemas: Arc<Schemas>) -> HttpSource {
        self.schemas = schemas;
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets
    /// requests in flight finish (graceful): each of them is still answered
    /// after its journal commit.
    pub async fn serve(
        self,
        journal: Journal,
        status: Arc<SourceStatus>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let HttpSource {
            name,
            class,
            max_body,
            listener,
            local_addr,
            token,
            tls,
            listener_limits,
            limits,
            schemas,
            require_schema,
        } = self;
        let ingest = Arc::new(Ingest {
            name: name.clone(),
            class,
            max_body,
            token,
            journal,
            status: status.clone(),
            warnings: WarnLimiter::default(),
            slots: tokio::sync::Semaphore::new(limits.max_concurrent_requests),
            limits,
            schemas,
            require_schema,
        });
        let app = Router::new()
            .route(INGEST_PATH, post(post_events))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(
                usize::try_from(max_body).unwrap_or(usize::MAX),
            ))
            .with_state(ingest);

        status
            .started
            .store(true, std::sync::atomic::Ordering::Relaxed);
        status
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let scheme = if tls.is_some() { "https" } else { "http" };
        info!(source = %name, addr = %local_addr, "HTTP ingest listening on {scheme}://{local_addr}{INGEST_PATH}");

        let listener = serve::Listener {
            label: format!("sources.http '{name}'"),
            socket: listener,
            tls: tls.map(serve::TlsConfig::new),
            limits: listener_limits,
            // The agent bounds the whole shutdown; each request is bounded
            // by request_timeout.
            grace: None,
        };
        serve::serve(listener, app, Arc::new(|_, _| ()), shutdown).await;
        status
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        info!(source = %name, addr = %local_addr, "HTTP ingest stopped");
        Ok(())
    }
}

fn describe_bind_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address in use (another process listens there)".into(),
        io::ErrorKind::AddrNotAvailable => "address not available (no such local address)".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".into()
        }
        _ => e.to_string(),
    }
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
    /// One permit per request being read, parsed or committed: bounds the
    /// memory all requests together hold to about `max_concurrent_requests`
    /// times that of one.
    slots: tokio::sync::Semaphore,
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

/// Logs a kind of rejection at `warn` at most once per [`WARN_EVERY`], with
/// the number of rejections of that kind in between; the rest go to `debug`.
#[derive(Default)]
struct WarnLimiter {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl WarnLimiter {
    /// `Some(suppressed since the last warning)` when this one should be a warning.
    fn check(&self, kind: &'static str) -> Option<u64> {
        let Ok(mut last) = self.last.lock() else {
            return Some(0);
        };
        let now = Instant::now();
        match last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < WARN_EVERY => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

/// A rejected request, before it becomes a response.
pub(crate) struct Reject {
    status: StatusCode,
    /// Short, stable kind for logs and the warning limiter.
    kind: &'static str,
    message: String,
    index: Option<usize>,
    /// Every failing event of a `422` (`{"errors": [...]}` in the answer).
    errors: Option<serde_json::Value>,
}

impl Reject {
    fn bad_request(message: impl Into<String>, index: Option<usize>) -> Reject {
        Reject {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid request",
            message: message.into(),
            index,
            errors: None,
        }
    }

    fn busy(max_concurrent_requests: usize) -> Reject {
        Reject {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "too many concurrent requests",
            message: format!(
                "{max_concurrent_requests} ingest requests are already in progress \
                 (max_concurrent_requests) and none finished within {} s; nothing was stored, retry later",
                SLOT_WAIT.as_secs()
            ),
            index: None,
            errors: None,
        }
    }

    fn body_timeout() -> Reject {
        Reject {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: "body too slow",
            message: format!(
                "the request body did not arrive within {} s; nothing was stored",
                BODY_READ_TIMEOUT.as_secs()
            ),
            index: None,
            errors: None,
        }
    }

    fn too_many_events(max: usize) -> Reject {
        Reject {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "too many events",
            message: format!(
                "request carries more than {max} events (max_events_per_request); \
                 nothing was stored, send smaller batches"
            ),
            index: None,
            errors: None,
        }
    }

    fn too_large(max_body: u64) -> Reject {
        Reject {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "body too large",
            message: format!(
                "request body exceeds the limit of {max_body} bytes (max_body); send smaller batches"
            ),
            index: None,
            errors: None,
        }
    }
}

async fn not_found() -> Response {
    let body = serde_json::json!({
        "error": format!("not found; POST CloudEvents to {INGEST_PATH}")
    });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn post_events(State(ingest): State<Arc<Ingest>>, req: Request) -> Response {
    match ingest_request(&ingest, req).await {
        Ok(response) => response,
        Err(reject) => ingest.rejected(reject),
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
    let _slot = match tokio::time::timeout(SLOT_WAIT, ingest.slots.acquire()).await {
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
    let count = events.len();
    // 7. The commit: only its success is acknowledged.
    match ingest.journal.append(events).await {
        Ok(outcomes) => Ok(ingest.committed(count, &outcomes)),
        Err(e) => Ok(ingest.commit_failed(count, &e)),
    }
}

impl Ingest {
    /// Every event's `data` against its type's schema: `Err` is a `422`
    /// listing every failing event (bounded), and nothing is stored.
    fn check_schemas(&self, events: &[NewEvent]) -> Result<(), Reject> {
        if self.schemas.is_empty() && !self.require_schema {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut failing = 0usize;
        let mut per_type: HashMap<&str, u64> = HashMap::new();
        for (index, e) in events.iter().enumerate() {
            let violations = match self.schemas.get(&e.event_type) {
                Some(_) if e.data.as_slice() == b"null" && carries_data_base64(e) => {
                    vec![schema::Violation {
                        pointer: String::new(),
                        message: "the event carries data_base64 (bytes); its type's schema \
                                  applies to JSON data"
                            .into(),
                    }]
                }
                // The answer's list is full: count, do not describe.
                Some(schema) if errors.len() == MAX_SCHEMA_ERRORS => {
                    if schema.passes(&e.data) {
                        continue;
                    }
                    Vec::new()
                }
                Some(schema) => match schema.check(&e.data) {
                    Ok(()) => continue,
                    Err(v) => v,
                },
                None if self.require_schema => vec![schema::Violation {
                    pointer: String::new(),
                    message: format!(
                        "type \"{}\" has no schema, and this source requires one \
                         (require_schema)",
                        escape_control(&e.event_type, QUOTE_MAX)
                    ),
                }],
                None => continue,
            };
            failing += 1;
            let label = if self.schemas.get(&e.event_type).is_some() {
                e.event_type.as_str()
            } else {
                NO_SCHEMA
            };
            *per_type.entry(label).or_default() += 1;
            for v in violations {
                if errors.len() == MAX_SCHEMA_ERRORS {
                    break;
                }
                errors.push(serde_json::json!({
                    "index": index,
                    "id": escape_control(&e.id, QUOTE_MAX),
                    "pointer": v.pointer,
                    "message": v.message,
                }));
            }
        }
        if failing == 0 {
            return Ok(());
        }
        for (event_type, n) in per_type {
            self.status.record_schema_rejects(event_type, n);
        }
        let first = errors.first().and_then(|e| e["index"].as_u64());
        let mut message = format!(
            "{failing} of {} events fail their schema; nothing was stored",
            events.len()
        );
        if errors.len() == MAX_SCHEMA_ERRORS {
            message.push_str(&format!(
                " (the first {MAX_SCHEMA_ERRORS} problems are listed)"
            ));
        }
        Err(Reject {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            kind: "schema validation failed",
            message,
            index: first.and_then(|i| usize::try_from(i).ok()),
            errors: Some(serde_json::Value::Array(errors)),
        })
    }

    fn committed(&self, count: usize, outcomes: &[AppendOutcome]) -> Response {
        let mut stored = 0u64;
        let mut duplicates = 0u64;
        let seqs: Vec<u64> = outcomes
            .iter()
            .map(|o| match *o {
                AppendOutcome::Stored { seq, .. } => {
                    stored += 1;
                    seq
                }
                AppendOutcome::Duplicate { seq } => {
                    duplicates += 1;
                    seq
                }
            })
            .collect();
        self.status.record_events(stored, duplicates);
        debug!(
            source = %self.name,
            events = count,
            stored,
            duplicates,
            first_seq = seqs.first().copied(),
            last_seq = seqs.last().copied(),
            "ingest request committed"
        );
        let body = serde_json::json!({
            "accepted": stored,
            "duplicates": duplicates,
            "seqs": seqs,
        });
        (StatusCode::ACCEPTED, axum::Json(body)).into_response()
    }

    fn commit_failed(&self, count: usize, e: &JournalError) -> Response {
        let (retry_after, message) = match e {
            JournalError::Full { used, max, .. } => (
                "1",
                format!(
                    "journal full ({} of {} used, when_full = \"block\"); nothing was stored, retry later",
                    crate::journal::fmt_bytes(*used),
                    crate::journal::fmt_bytes(*max)
                ),
            ),
            other => ("5", format!("journal commit failed: {other}")),
        };
        warn!(source = %self.name, events = count, error = %e, "ingest request not stored; answered 503");
        self.status.record_error(format!("answered 503: {message}"));
        let body = serde_json::json!({ "error": message });
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
        response
    }

    fn rejected(&self, mut reject: Reject) -> Response {
        // Reasons quote the request: built escaped where they are made, and
        // bounded once more here so no answer, log line or `last_error`
        // carries a raw control character or kilobytes of the sender's text.
        if let Cow::Owned(bounded) = escape_control(&reject.message, MAX_REASON) {
            reject.message = bounded;
        }
        self.status.record_reject(1);
        if reject.status != StatusCode::UNAUTHORIZED {
            // The reason of a 401 stays out of the status page as well.
            self.status.record_error(format!(
                "rejected a request ({}): {}",
                reject.status.as_u16(),
                reject.message
            ));
        } else {
            self.status
                .record_error("rejected a request (401): missing or wrong bearer token");
        }
        match self.warnings.check(reject.kind) {
            Some(suppressed) => warn!(
                source = %self.name,
                status = reject.status.as_u16(),
                reason = %reject.message,
                index = reject.index,
                suppressed_since_last_warning = suppressed,
                "ingest request rejected ({}); further ones are logged at debug for a minute",
                reject.kind
            ),
            None => debug!(
                source = %self.name,
                status = reject.status.as_u16(),
                reason = %reject.message,
                index = reject.index,
                "ingest request rejected ({})",
                reject.kind
            ),
        }
        let mut body = serde_json::Map::new();
        body.insert("error".into(), reject.message.into());
        if let Some(index) = reject.index {
            body.insert("index".into(), index.into());
        }
        if let Some(errors) = reject.errors {
            body.insert("errors".into(), errors);
        }
        if reject.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            body.insert("supported".into(), ACCEPTED_CONTENT_TYPES.to_vec().into());
        }
        let mut response = (reject.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match reject.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                headers.insert(
                    "accept-post",
                    HeaderValue::from_static(
                        "application/cloudevents+json, application/cloudevents-batch+json, \
                         application/x-ndjson, application/ndjson, application/json",
                    ),
                );
            }
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
                // The rest of the body may still be on its way: do not try to
                // keep this connection.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// What the body holds, by content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One CloudEvent object.
    Single,
    /// A JSON array of CloudEvents.
    Batch,
    /// One CloudEvent per non-empty line.
    Ndjson,
    /// `application/json`: an object or an array.
    Json,
}

pub(crate) fn body_format(headers: &HeaderMap) -> Result<Format, Reject> {
    let unsupported = |given: &str| Reject {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        kind: "unsupported content type",
        message: format!(
            "unsupported content type {given}; send one of: {}",
            ACCEPTED_CONTENT_TYPES.join(", ")
        ),
        index: None,
        errors: None,
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("(none)"));
    };
    let Ok(text) = value.to_str() else {
        return Err(unsupported("(not ASCII)"));
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    let lower = essence.to_ascii_lowercase();
    match lower.as_str() {
        "application/cloudevents+json" => Ok(Format::Single),
        "application/cloudevents-batch+json" => Ok(Format::Batch),
        "application/x-ndjson" | "application/ndjson" => Ok(Format::Ndjson),
        "application/json" => Ok(Format::Json),
        _ => Err(unsupported(&format!(
            "\"{}\"",
            escape_control(essence, QUOTE_MAX)
        ))),
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

// ---------------------------------------------------------------------------
// Parsing and validation

/// One CloudEvent as sent: its attributes in order, values as raw JSON,
/// borrowed from the request body (a name is copied only when it holds an
/// escape sequence).
struct RawEvent<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// An attribute name, borrowed from the body when it can be.
struct AttrName<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for AttrName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AttrName<'de>, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = AttrName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attribute name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(AttrName(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(AttrName(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(AttrName(Cow::Owned(v)))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// Why the parser stopped before the end of the body: a count limit was
/// reached. Recorded beside the serde error it raises, which then becomes
/// the limit's own answer rather than "malformed JSON".
enum Stop {
    /// More than `max_events_per_request` events.
    Events,
    /// An event with more than `max_attributes` attributes; the first name
    /// past the limit.
    Attributes(String),
    /// An event of a batch broke a rule (see [`to_new_event`]).
    Invalid(String),
}

/// What the parser of one body shares: the limits, and why it stopped.
struct ParseState<'l> {
    limits: &'l Limits,
    trace: Option<&'l TraceContext>,
    source: &'l str,
    class: Class,
    /// The element of a batch being parsed, so that an error can name it.
    at: std::cell::Cell<Option<usize>>,
    stop: std::cell::Cell<Option<Stop>>,
}

impl ParseState<'_> {
    /// Turns a serde error into an answer: the limit that stopped the parser,
    /// or the syntax error (which may quote the body: escaped and bounded).
    fn reject(&self, e: &serde_json::Error, what: &str, index: Option<usize>) -> Reject {
        match self.stop.take() {
            Some(Stop::Events) => Reject::too_many_events(self.limits.max_events_per_request),
            Some(Stop::Invalid(message)) => Reject::bad_request(message, index),
            Some(Stop::Attributes(name)) => Reject::bad_request(
                format!(
                    "event has more than {} attributes (max_attributes); the first one past \
                     the limit is \"{}\"",
                    self.limits.max_attributes,
                    escape_control(&name, QUOTE_MAX)
                ),
                index,
            ),
            None => Reject::bad_request(
                format!("{what}: {}", escape_control(&e.to_string(), MAX_REASON / 2)),
                index,
            ),
        }
    }
}

/// One CloudEvent, parsed with the attribute limit: it stops at the first
/// attribute past `max_attributes`, before storing it.
struct EventSeed<'s, 'l> {
    state: &'s ParseState<'l>,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_> {
    type Value = RawEvent<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawEvent<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, '_> {
    type Value = RawEvent<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvent (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEvent<'de>, A::Error> {
        let max = self.state.limits.max_attributes;
        let mut attrs = Vec::with_capacity(8);
        while let Some(AttrName(key)) = map.next_key::<AttrName<'de>>()? {
            if attrs.len() == max {
                self.state
                    .stop
                    .set(Some(Stop::Attributes(key.into_owned())));
                return Err(serde::de::Error::custom("too many attributes"));
            }
            let value: &'de RawValue = map.next_value()?;
            attrs.push((key, value));
        }
        Ok(RawEvent(attrs))
    }
}

/// A JSON array of CloudEvents, mapped one by one as they are parsed (so
/// that only one event's attribute list exists at a time). Records which
/// element it is parsing, so that an error can name the event, and stops at
/// the first event past `max_events_per_request`, before mapping it.
struct BatchSeed<'s, 'l> {
    state: &'s ParseState<'l>,
}

impl<'de> DeserializeSeed<'de> for BatchSeed<'_, '_> {
    type Value = Vec<NewEvent>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<NewEvent>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_, '_> {
    type Value = Vec<NewEvent>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of CloudEvents")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<NewEvent>, A::Error> {
        let state = self.state;
        let max = state.limits.max_events_per_request;
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        loop {
            state.at.set(Some(events.len()));
            match seq.next_element_seed(EventSeed { state })? {
                Some(_) if events.len() == max => {
                    state.stop.set(Some(Stop::Events));
                    return Err(serde::de::Error::custom("too many events"));
                }
                Some(raw) => {
                    match to_new_event(raw, state.source, state.class, state.limits, state.trace) {
                        Ok(event) => events.push(event),
                        Err(message) => {
                            state.stop.set(Some(Stop::Invalid(message)));
                            return Err(serde::de::Error::custom("invalid event"));
                        }
                    }
                }
                None => break,
            }
        }
        state.at.set(None);
        Ok(events)
    }
}

/// Whether a parsed event carried `data_base64` (kept in its attributes).
fn carries_data_base64(e: &NewEvent) -> bool {
    e.attrs.as_deref().is_some_and(|a| {
        serde_json::from_str::<HashMap<&str, &RawValue>>(a)
            .is_ok_and(|m| m.contains_key("data_base64"))
    })
}

/// W3C Trace Context of an ingest request (`traceparent`, `tracestate`),
/// checked and kept as JSON strings ready to become event attributes.
#[derive(Debug)]
pub(crate) struct TraceContext {
    traceparent: Box<RawValue>,
    tracestate: Option<Box<RawValue>>,
}

/// Longest `tracestate` accepted (W3C: 32 members of up to 256 bytes can
/// be cut to 512 by anyone passing them on).
const MAX_TRACESTATE: usize = 512;

impl TraceContext {
    /// The request's trace context; a malformed header is a `400` naming it.
    /// `tracestate` without `traceparent` means nothing and is ignored.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Option<TraceContext>, Reject> {
        let bad = |name: &str, why: String| {
            Reject::bad_request(format!("header {name}: {why}; nothing was stored"), None)
        };
        let mut parents = headers.get_all("traceparent").iter();
        let Some(parent) = parents.next() else {
            return Ok(None);
        };
        if parents.next().is_some() {
            return Err(bad("traceparent", "sent more than once".into()));
        }
        let parent = parent
            .to_str()
            .map_err(|_| bad("traceparent", "not ASCII".into()))?
            .trim();
        check_traceparent(parent).map_err(|why| bad("traceparent", why))?;
        let mut state = String::new();
        // Several tracestate headers are one list (W3C Trace Context §3.3).
        for v in headers.get_all("tracestate") {
            let v = v
                .to_str()
                .map_err(|_| bad("tracestate", "not ASCII".into()))?
                .trim();
            if v.is_empty() {
                continue;
            }
            if !state.is_empty() {
                state.push(',');
            }
            state.push_str(v);
        }
        if state.len() > MAX_TRACESTATE {
            return Err(bad(
                "tracestate",
                format!(
                    "{} bytes; at most {MAX_TRACESTATE} are accepted",
                    state.len()
                ),
            ));
        }
        if state.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(bad("tracestate", "holds a control character".into()));
        }
        let json = |v: &str| {
            // A string of visible ASCII always serialises, and is valid JSON.
            serde_json::to_string(v)
                .ok()
                .and_then(|t| RawValue::from_string(t).ok())
        };
        let Some(traceparent) = json(parent) else {
            return Err(bad("traceparent", "cannot be kept".into()));
        };
        Ok(Some(TraceContext {
            traceparent,
            tracestate: if state.is_empty() { None } else { json(&state) },
        }))
    }
}

/// W3C Trace Context `traceparent`: `version-traceid-parentid-flags`, lower-
/// case hex; version `ff` and all-zero ids are invalid. A later version may
/// append fields after the flags (§3.2.4).
fn check_traceparent(v: &str) -> Result<(), String> {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let expected = "expected version-traceid-parentid-flags \
                    (e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)";
    let quoted = escape_control(v, 80);
    let mut parts = v.splitn(5, '-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("\"{quoted}\" is malformed; {expected}"));
    };
    let rest = parts.next();
    if !hex(version, 2) || version == "ff" {
        return Err(format!("\"{quoted}\" has an invalid version; {expected}"));
    }
    if version == "00" && rest.is_some() {
        return Err(format!(
            "\"{quoted}\" has fields after the flags; {expected}"
        ));
    }
    if !hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
        return Err(format!("\"{quoted}\" has an invalid trace id; {expected}"));
    }
    if !hex(parent, 16) || parent.bytes().all(|b| b == b'0') {
        return Err(format!("\"{quoted}\" has an invalid parent id; {expected}"));
    }
    if !hex(flags, 2) {
        return Err(format!("\"{quoted}\" has invalid flags; {expected}"));
    }
    Ok(())
}

fn no_events() -> Reject {
    Reject::bad_request("no events", None)
}

/// Parses and validates a whole body; the first problem rejects all of it.
///
/// The count limits are enforced while parsing (the parser stops at the
/// first event or attribute past them, so a body of a million tiny events
/// costs no more than one at the limit), the depth limit on each value's
/// raw text before anything of it is built.
pub(crate) fn parse_events(
    body: &[u8],
    format: Format,
    source: &str,
    class: Class,
    limits: &Limits,
    trace: Option<&TraceContext>,
) -> Result<Vec<NewEvent>, Reject> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let trimmed = body.trim_ascii_start();
    if trimmed.is_empty() {
        return Err(no_events());
    }
    let format = match format {
        Format::Json if trimmed.first() == Some(&b'[') => Format::Batch,
        Format::Json => Format::Single,
        other => other,
    };
    let state = ParseState {
        limits,
        trace,
        source,
        class,
        at: std::cell::Cell::new(None),
        stop: std::cell::Cell::new(None),
    };
    let mut events = Vec::new();
    match format {
        Format::Single | Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let raw = EventSeed { state: &state }
                .deserialize(&mut de)
                .and_then(|raw| de.end().map(|()| raw))
                .map_err(|e| state.reject(&e, "malformed JSON", Some(0)))?;
            events.push(
                to_new_event(raw, source, class, limits, trace)
                    .map_err(|m| Reject::bad_request(m, Some(0)))?,
            );
        }
        Format::Batch => {
            let mut de = serde_json::Deserializer::from_slice(body);
            events = BatchSeed { state: &state }
                .deserialize(&mut de)
                .and_then(|events| de.end().map(|()| events))
                .map_err(|e| {
                    let at = state.at.get();
                    state.reject(&e, "malformed JSON", at)
                })?;
            if events.is_empty() {
                return Err(no_events());
            }
        }
        Format::Ndjson => {
            for (i, line) in body.split(|b| *b == b'\n').enumerate() {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                if events.len() == limits.max_events_per_request {
                    return Err(Reject::too_many_events(limits.max_events_per_request));
                }
                let mut de = serde_json::Deserializer::from_slice(line);
                let raw = EventSeed { state: &state }
                    .deserialize(&mut de)
                    .and_then(|raw| de.end().map(|()| raw))
                    .map_err(|e| {
                        state.reject(&e, &format!("malformed JSON on line {}", i + 1), Some(i))
                    })?;
                events.push(
                    to_new_event(raw, source, class, limits, trace)
                        .map_err(|m| Reject::bad_request(m, Some(i)))?,
                );
            }
            if events.is_empty() {
                return Err(no_events());
            }
        }
    }
    Ok(events)
}

/// An optional string attribute: `null` counts as absent.
fn opt_string(name: &str, raw: &RawValue) -> Result<Option<String>, String> {
    if raw.get() == "null" {
        return Ok(None);
    }
    json_string(raw)
        .map(Some)
        .ok_or_else(|| format!("{name} must be a string"))
}

/// The string a raw JSON value holds, `None` when it is not a string. Most
/// strings hold no escape sequence: their text is the raw value's inside.
fn json_string(raw: &RawValue) -> Option<String> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(inner.to_owned()),
        _ => serde_json::from_str::<String>(text).ok(),
    }
}

fn check_len(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{name} must not be empty"));
    }
    if value.len() > MAX_KEY_LEN {
        return Err(format!(
            "{name} is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            value.len()
        ));
    }
    Ok(())
}

/// Attributes up to which `repeated_name` compares every pair rather than
/// hash: a CloudEvent has a handful, and hashing each cost more than the
/// comparisons.
const PAIRWISE_NAMES: usize = 16;

/// The first attribute name that appears twice. Hashed (with a keyed hash)
/// past `PAIRWISE_NAMES`, so an event with thousands of attributes costs
/// linear time, not quadratic.
fn repeated_name<'r>(attrs: &'r [(Cow<'_, str>, &RawValue)]) -> Option<&'r str> {
    if attrs.len() <= PAIRWISE_NAMES {
        return attrs.iter().enumerate().find_map(|(i, (name, _))| {
            attrs[..i]
                .iter()
                .any(|(n, _)| n == name)
                .then_some(name.as_ref())
        });
    }
    let mut seen = HashSet::with_capacity(attrs.len());
    attrs
        .iter()
        .map(|(name, _)| name.as_ref())
        .find(|name| !seen.insert(*name))
}

/// Maps one CloudEvent onto a [`NewEvent`] (see the module docs for the rules).
fn to_new_event(
    raw: RawEvent<'_>,
    source: &str,
    class: Class,
    limits: &Limits,
    trace: Option<&TraceContext>,
) -> Result<NewEvent, String> {
    if let Some(name) = repeated_name(&raw.0) {
        return Err(format!(
            "attribute \"{}\" appears more than once",
            escape_control(name, QUOTE_MAX)
        ));
    }

    let mut id = None;
    let mut stream = None;
    let mut event_type = None;
    let mut time = None;
    let mut data: Option<&RawValue> = None;
    let mut data_base64 = false;
    let mut origin: Option<&RawValue> = None;
    let mut has_originsource = false;
    let (mut has_traceparent, mut has_tracestate) = (false, false);
    let mut attrs: Vec<(Cow<'_, str>, &RawValue)> = Vec::new();

    for (name, value) in raw.0 {
        match name.as_ref() {
            "id" => {
                if value.get() == "null" {
                    continue;
                }
                let v = json_string(value).ok_or_else(|| "id must be a string".to_string())?;
                check_len("id", &v)?;
                id = Some(v);
            }
            "specversion" => {
                if json_string(value).as_deref() != Some("1.0") {
                    return Err(format!(
                        "unsupported specversion {}; only \"1.0\" is accepted",
                        escape_control(value.get(), QUOTE_MAX)
                    ));
                }
            }
            "subject" => {
                if let Some(v) = opt_string("subject", value)? {
                    check_len("subject", &v)?;
                    stream = Some(v);
                }
            }
            "type" => {
                if let Some(v) = opt_string("type", value)? {
                    check_len("type", &v)?;
                    event_type = Some(v);
                }
            }
            "time" => {
                if let Some(v) = opt_string("time", value)? {
                    if !is_rfc3339(&v) {
                        return Err(format!(
                            "time \"{}\" is not an RFC 3339 timestamp \
                             (e.g. 2026-11-29T10:00:00Z or 2026-11-29T11:00:00.123+01:00)",
                            escape_control(&v, QUOTE_MAX)
                        ));
                    }
                    time = Some(v);
                }
            }
            "data" => {
                let depth = json_depth(value.get().as_bytes());
                if depth > limits.max_depth {
                    return Err(format!(
                        "attribute \"data\" nests arrays and objects {depth} levels deep; \
                         at most {} are allowed (max_depth)",
                        limits.max_depth
                    ));
                }
                if json_lone_surrogate(value.get().as_bytes()) {
                    return Err(LONE_SURROGATE_DATA.to_string());
                }
                data = Some(value);
            }
            "data_base64" => {
                let v =
                    json_string(value).ok_or_else(|| "data_base64 must be a string".to_string())?;
                if !is_base64(&v) {
                    return Err("data_base64 is not valid base64".into());
                }
                data_base64 = true;
                attrs.push((name, value));
            }
            "source" => {
                if value.get() != "null" {
                    check_scalar(&name, value)?;
                    origin = Some(value);
                }
            }
            "originsource" => {
                has_originsource = true;
                check_scalar(&name, value)?;
                attrs.push((name, value));
            }
            n if RESERVED_ATTRIBUTES.contains(&n) => {}
            "traceparent" | "tracestate" if value.get() != "null" => {
                has_traceparent |= name == "traceparent";
                has_tracestate |= name == "tracestate";
                check_scalar(&name, value)?;
                attrs.push((name, value));
            }
            // An absent extension and a null one mean the same.
            _ if value.get() == "null" => {}
            _ => {
                check_scalar(&name, value)?;
                attrs.push((name, value));
            }
        }
    }

    let id = id.ok_or_else(|| "id is required (a non-empty string)".to_string())?;
    if data.is_some() && data_base64 {
        return Err("data and data_base64 are mutually exclusive".into());
    }
    if let Some(origin) = origin {
        if has_originsource {
            return Err(
                "source and originsource are both present; plantrelay keeps the event's own \
                 source as the extension originsource"
                    .into(),
            );
        }
        attrs.push(("originsource".into(), origin));
    }
    // The request's trace context goes to the events that carry none of
    // their own; an event's own is kept whole (its tracestate belongs to its
    // traceparent).
    if let Some(t) = trace
        && !has_traceparent
    {
        attrs.push(("traceparent".into(), &t.traceparent));
        if let (Some(state), false) = (&t.tracestate, has_tracestate) {
            attrs.push(("tracestate".into(), state));
        }
    }
    let data = match data {
        Some(raw) => raw.get().as_bytes().to_vec(),
        None => b"null".to_vec(),
    };
    let attrs = (!attrs.is_empty()).then(|| attrs_json(&attrs));
    Ok(NewEvent {
        source: source.to_string(),
        id,
        stream: stream.unwrap_or_else(|| source.to_string()),
        class,
        event_type: event_type.unwrap_or_else(|| DEFAULT_EVENT_TYPE.to_string()),
        source_time: time,
        data,
        attrs,
    })
}

/// CloudEvents attributes other than `data` are scalars (string, number,
/// boolean): an object or an array there would travel upstream unchecked
/// (and, nested deep enough, fail there as a dead letter hours later).
fn check_scalar(name: &str, value: &RawValue) -> Result<(), String> {
    let kind = match value.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        _ if json_lone_surrogate(value.get().as_bytes()) => {
            return Err(format!(
                "attribute \"{}\" holds a \\u escape of half a surrogate pair, \
                 which is no Unicode text; upstream JSON readers would refuse it",
                escape_control(name, QUOTE_MAX)
            ));
        }
        _ => return Ok(()),
    };
    Err(format!(
        "attribute \"{}\" is {kind}; CloudEvents attributes other than data must be a string, \
         number or boolean",
        escape_control(name, QUOTE_MAX)
    ))
}

/// `{"name":<raw value>,...}` in the given order.
fn attrs_json(attrs: &[(Cow<'_, str>, &RawValue)]) -> String {
    let mut out = String::with_capacity(
        2 + attrs
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>(),
    );
    out.push('{');
    for (i, (name, value)) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Serialising a string cannot fail; fall back to an escaped debug
        // form that is still valid JSON for plain names.
        match serde_json::to_string(name) {
            Ok(key) => out.push_str(&key),
            Err(_) => out.push_str("\"\""),
        }
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    out
}

/// Standard base64 (RFC 4648 §4) with padding; the empty string is valid.
fn is_base64(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return false;
    }
    let body = b
        .strip_suffix(b"==")
        .or_else(|| b.strip_suffix(b"="))
        .unwrap_or(b);
    body.iter()
        .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_events_per_request: 100,
        max_concurrent_requests: 4,
        max_depth: 8,
        max_attributes: 300,
    };

    fn parse(body: &str, format: Format) -> Result<Vec<NewEvent>, (String, Option<usize>)> {
        parse_events(
            body.as_bytes(),
            format,
            "mes",
            Class::Critical,
            &LIMITS,
            None,
        )
        .map_err(|r| (r.message, r.index))
    }

    #[test]
    fn base64_check() {
        assert!(is_base64(""));
        assert!(is_base64("aGVsbG8="));
        assert!(is_base64("aGk="));
        assert!(is_base64("aGVs"));
        assert!(!is_base64("aGVsbG8"));
        assert!(!is_base64("a=Vs"));
        assert!(!is_base64("aGV$"));
    }

    #[test]
    fn escaped_names_and_strings_read_as_their_text() {
        // Names with escapes are copied, the others borrowed; both must
        // mean the same attribute.
        let events = parse(
            r#"[{"i\u0064":"a\"b","subject":"line\/1","type":"t","x\u0065xt":"\u00e9"},
                {"id":"plain","subject":"s\u00fc"}]"#,
            Format::Batch,
        )
        .unwrap();
        assert_eq!(events[0].id, "a\"b");
        assert_eq!(events[0].stream, "line/1");
        assert_eq!(events[0].attrs.as_deref(), Some(r#"{"xext":"\u00e9"}"#));
        assert_eq!(events[1].id, "plain");
        assert_eq!(events[1].stream, "s\u{fc}");
        assert_eq!(
            parse(r#"{"id":"a","\u0069d":"b"}"#, Format::Single)
                .unwrap_err()
                .0,
            "attribute \"id\" appears more than once"
        );
        assert_eq!(
            parse(r#"{"id":7}"#, Format::Single).unwrap_err().0,
            "id must be a string"
        );
    }

    #[test]
    fn a_repeated_attribute_is_named_with_few_and_with_many_attributes() {
        let event = |n: usize, repeat: Option<usize>| {
            let mut attrs: Vec<String> = (0..n).map(|i| format!("\"a{i}ext\":{i}")).collect();
            if let Some(r) = repeat {
                attrs.push(format!("\"a{r}ext\":0"));
            }
            format!("{{\"id\":\"x\",{}}}", attrs.join(","))
        };
        for n in [3, PAIRWISE_NAMES - 2, PAIRWISE_NAMES, 200] {
            let ok = parse(&event(n, None), Format::Single).unwrap();
            assert_eq!(ok.len(), 1, "{n} distinct attributes");
            let err = parse(&event(n, Some(n / 2)), Format::Single).unwrap_err();
            assert_eq!(
                err.0,
                format!("attribute \"a{}ext\" appears more than once", n / 2),
                "{n} attributes"
            );
        }
    }

    #[test]
    fn data_is_kept_verbatim_and_attributes_in_order() {
        let events = parse(
            r#"{"id":"a","data":{"b":1, "a":12345678901234567890123},"zext":"z","aext":1,"sequence":9,"streamsequence":2}"#,
            Format::Single,
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&events[0].data).unwrap(),
            r#"{"b":1, "a":12345678901234567890123}"#
        );
        assert_eq!(events[0].attrs.as_deref(), Some(r#"{"zext":"z","aext":1}"#));
    }

    #[test]
    fn validation_reasons() {
        let cases = [
            (r#"{"data":1}"#, "id is required"),
            (r#"{"id":""}"#, "id must not be empty"),
            (r#"{"id":5}"#, "id must be a string"),
            (r#"{"id":"a","specversion":"0.3"}"#, "specversion"),
            (r#"{"id":"a","time":"now"}"#, "RFC 3339"),
            (r#"{"id":"a","subject":7}"#, "subject must be a string"),
            (r#"{"id":"a","id":"b"}"#, "more than once"),
            (
                r#"{"id":"a","data":1,"data_base64":"aGk="}"#,
                "mutually exclusive",
            ),
            (r#"{"id":"a","data_base64":"%%"}"#, "base64"),
            (
                r#"{"id":"a","source":"x","originsource":"y"}"#,
                "both present",
            ),
        ];
        for (body, reason) in cases {
            let (msg, index) = parse(body, Format::Single).unwrap_err();
            assert!(msg.contains(reason), "{body}: {msg}");
            assert_eq!(index, Some(0));
        }
        let long = "x".repeat(MAX_KEY_LEN + 1);
        let (msg, _) = parse(&format!(r#"{{"id":"{long}"}}"#), Format::Single).unwrap_err();
        assert!(msg.contains("at most 1024"), "{msg}");
        assert!(parse(&format!(r#"{{"id":"{}"}}"#, &long[1..]), Format::Single).is_ok());
    }

    #[test]
    fn syntax_errors_name_the_element_or_line() {
        let (msg, index) =
            parse(r#"[{"id":"a"},{"id":"b"},{"id" "c"}]"#, Format::Batch).unwrap_err();
        assert!(msg.contains("line 1 column"), "{msg}");
        assert_eq!(index, Some(2));
        let (msg, index) = parse(r#"[{"id":"a"}] x"#, Format::Batch).unwrap_err();
        assert!(msg.contains("trailing"), "{msg}");
        assert_eq!(index, None);
        let (_, index) = parse(r#"{"id":"a"}"#, Format::Batch).unwrap_err();
        assert_eq!(index, None);
        let (_, index) = parse(r#"[{"id":"a"}, 5]"#, Format::Batch).unwrap_err();
        assert_eq!(index, Some(1));
        let (msg, index) = parse("{\"id\":\"a\"}\n\n{oops}\n", Format::Ndjson).unwrap_err();
        assert!(msg.contains("line 3"), "{msg}");
        assert_eq!(index, Some(2));
    }

    #[test]
    fn empty_bodies_have_no_events() {
        for (body, format) in [
            ("", Format::Single),
            ("  \n", Format::Json),
            ("[]", Format::Batch),
            (" [ ] ", Format::Json),
            ("\n\r\n  \n", Format::Ndjson),
        ] {
            let (msg, _) = parse(body, format).unwrap_err();
            assert_eq!(msg, "no events", "{body:?}");
        }
    }

    #[test]
    fn json_content_type_takes_an_object_or_an_array_and_a_bom() {
        assert_eq!(
            parse("\u{feff}{\"id\":\"a\"}", Format::Json).unwrap().len(),
            1
        );
        assert_eq!(
            parse(r#" [{"id":"a"},{"id":"b"}]"#, Format::Json)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn the_event_cap_stops_the_parser_in_every_format() {
        let max = LIMITS.max_events_per_request;
        let batch = |n: usize| {
            let events: Vec<String> = (0..n).map(|i| format!("{{\"id\":\"e{i}\"}}")).collect();
            format!("[{}]", events.join(","))
        };
        assert_eq!(parse(&batch(max), Format::Batch).unwrap().len(), max);
        for body in [batch(max + 1), batch(max * 50)] {
            let (msg, index) = parse(&body, Format::Batch).unwrap_err();
            assert!(msg.contains(&format!("more than {max} events (max_events_per_request)")));
            assert_eq!(index, None);
        }
        let ndjson = |n: usize| {
            (0..n)
                .map(|i| format!("{{\"id\":\"e{i}\"}}\n"))
                .collect::<String>()
        };
        assert_eq!(parse(&ndjson(max), Format::Ndjson).unwrap().len(), max);
        let (msg, _) = parse(&ndjson(max + 1), Format::Ndjson).unwrap_err();
        assert!(msg.contains("max_events_per_request"), "{msg}");
        // Past the cap the rest is not even read: a syntax error after it
        // does not change the answer.
        let (msg, _) = parse(&format!("{}, oops", &batch(max + 1)), Format::Batch).unwrap_err();
        assert!(msg.contains("max_events_per_request"), "{msg}");
    }

    #[test]
    fn depth_attribute_count_and_scalar_extensions_are_checked_per_event() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let ok = format!(r#"{{"id":"a","data":{}}}"#, deep(LIMITS.max_depth));
        assert_eq!(parse(&ok, Format::Single).unwrap().len(), 1);
        let body = format!(
            r#"[{{"id":"a"}},{{"id":"b","data":{{"x":{}}}}}]"#,
            deep(10_000)
        );
        let (msg, index) = parse(&body, Format::Batch).unwrap_err();
        assert!(
            msg.contains("\"data\" nests arrays and objects 10001 levels deep"),
            "{msg}"
        );
        assert!(msg.contains("at most 8 are allowed (max_depth)"), "{msg}");
        assert_eq!(index, Some(1));

        for (value, kind) in [(r#"{"a":1}"#, "an object"), ("[1]", "an array")] {
            let body = format!(r#"{{"id":"a","plantext":{value}}}"#);
            let (msg, index) = parse(&body, Format::Single).unwrap_err();
            assert!(msg.contains(&format!("\"plantext\" is {kind}")), "{msg}");
            assert_eq!(index, Some(0));
        }
        let body = format!(r#"{{"id":"a","source":{}}}"#, deep(10_000));
        assert!(
            parse(&body, Format::Single)
                .unwrap_err()
                .0
                .contains("\"source\" is an array")
        );
        // A null extension is absent; scalars are kept as sent.
        let e = parse(
            r#"{"id":"a","nullext":null,"n":1.5,"b":true}"#,
            Format::Single,
        )
        .unwrap();
        assert_eq!(e[0].attrs.as_deref(), Some(r#"{"n":1.5,"b":true}"#));

        let many: Vec<String> = (0..100_000).map(|i| format!("\"x{i}\":1")).collect();
        let body = format!(r#"{{"id":"a",{}}}"#, many.join(","));
        let (msg, index) = parse(&format!("[{body}]"), Format::Batch).unwrap_err();
        assert!(
            msg.contains("more than 300 attributes (max_attributes)"),
            "{msg}"
        );
        assert!(msg.contains("\"x299\""), "{msg}");
        assert_eq!(index, Some(0));
    }

    #[test]
    fn reasons_quoting_the_request_carry_no_control_characters_and_are_bounded() {
        let forged = "x\\n2026-12-05T08:00:00Z  WARN admin action: journal dropped\\u001b[0m";
        let body = format!(r#"{{"id":"a","{forged}":1,"{forged}":2}}"#);
        let (msg, _) = parse(&body, Format::Single).unwrap_err();
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
        assert!(msg.contains("x\\n2026-12-05"), "{msg}");
        assert!(msg.contains("\\x1b"), "{msg}");

        let long = format!("\\n{}", "A".repeat(100_000));
        for body in [
            format!(r#"{{"id":"a","{long}":1,"{long}":2}}"#),
            format!(r#"{{"id":"a","time":"{long}"}}"#),
            format!(r#"{{"id":"a","specversion":["{long}"]}}"#),
            format!(r#"[{{"id":"a"}}, "{long}"]"#),
        ] {
            let (msg, _) = parse(&body, Format::Json).unwrap_err();
            assert!(msg.len() < 600, "{} bytes: {}", msg.len(), &msg[..200]);
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
        }
    }

    #[test]
    fn bearer_token_check() {
        let token = Token(b"s3cret".to_vec().into_boxed_slice());
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(token.accepts(Some(&h("Bearer s3cret"))));
        assert!(token.accepts(Some(&h("bearer  s3cret"))));
        assert!(!token.accepts(Some(&h("Bearer s3cre"))));
        assert!(!token.accepts(Some(&h("Bearer s3cretx"))));
        assert!(!token.accepts(Some(&h("Basic s3cret"))));
        assert!(!token.accepts(Some(&h("Bearers3cret"))));
        assert!(!token.accepts(None));
    }
}
