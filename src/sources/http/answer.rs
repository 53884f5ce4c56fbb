//! The answers of the ingest route: a [`Reject`] and the response it
//! becomes (status code, `{"error", "index"}` body, `WWW-Authenticate`,
//! `Accept-Post`, `Retry-After`, `Connection: close`), the `202` of a
//! commit and the `503` of a failed one, and how rejections are logged.
//!
//! It owns the shape of every answer and the bound on what they quote. It
//! must never put a raw control character or an unbounded reason from the
//! request into an answer, a log line or `last_error`, never give a `401`'s
//! reason away beyond "unauthorized", and never log every rejection of a
//! flood at `warn`.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::{debug, warn};

use super::{ACCEPTED_CONTENT_TYPES, BODY_READ_TIMEOUT, INGEST_PATH, Ingest, SLOT_WAIT};
use crate::journal::{AppendOutcome, JournalError};
use crate::text::escape_control;

/// Longest reason, in bytes, in a `4xx`/`503` answer, a log line or the
/// source's `last_error`.
pub(super) const MAX_REASON: usize = 512;

/// A rejected request, before it becomes a response.
pub(crate) struct Reject {
    pub(super) status: StatusCode,
    /// Short, stable kind for logs and the warning limiter.
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) index: Option<usize>,
    /// Every failing event of a `422` (`{"errors": [...]}` in the answer).
    pub(super) errors: Option<serde_json::Value>,
}

impl Reject {
    pub(super) fn bad_request(message: impl Into<String>, index: Option<usize>) -> Reject {
        Reject {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid request",
            message: message.into(),
            index,
            errors: None,
        }
    }

    pub(super) fn busy(max_concurrent_requests: usize) -> Reject {
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

    /// The events of earlier requests fill the waiting budget (`max_body`)
    /// and none was committed within [`SLOT_WAIT`]: the journal is behind.
    pub(super) fn commits_behind(max_body: u64) -> Reject {
        Reject {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "commits behind",
            message: format!(
                "earlier requests' events ({}, max_body) are still waiting for the journal \
                 and none was committed within {} s; nothing was stored, retry later",
                crate::units::fmt_bytes(max_body),
                SLOT_WAIT.as_secs()
            ),
            index: None,
            errors: None,
        }
    }

    pub(super) fn body_timeout() -> Reject {
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

    pub(super) fn too_many_events(max: usize) -> Reject {
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

    pub(super) fn too_large(max_body: u64) -> Reject {
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

pub(super) async fn not_found() -> Response {
    let body = serde_json::json!({
        "error": format!("not found; POST CloudEvents to {INGEST_PATH}")
    });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

impl Ingest {
    pub(super) fn committed(&self, count: usize, outcomes: &[AppendOutcome]) -> Response {
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

    pub(super) fn commit_failed(&self, count: usize, e: &JournalError) -> Response {
        let (retry_after, message) = match e {
            JournalError::Full { used, max, .. } => (
                "1",
                format!(
                    "journal full ({} of {} used, when_full = \"block\"); nothing was stored, retry later",
                    crate::units::fmt_bytes(*used),
                    crate::units::fmt_bytes(*max)
                ),
            ),
            other => ("5", format!("journal commit failed: {other}")),
        };
        // Clients retry at their own pace while the journal cannot take
        // anything: one line a minute, not one per request.
        match self.warnings.check("commit_failed") {
            Some(suppressed) => warn!(
                source = %self.name,
                events = count,
                error = %e,
                suppressed_since_last_warning = suppressed,
                "ingest request not stored; answered 503 (further ones are logged at debug for a minute)"
            ),
            None => {
                debug!(source = %self.name, events = count, error = %e, "ingest request not stored; answered 503")
            }
        }
        self.status.record_error(format!("answered 503: {message}"));
        let body = serde_json::json!({ "error": message });
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
        response
    }

    pub(super) fn rejected(&self, mut reject: Reject) -> Response {
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
