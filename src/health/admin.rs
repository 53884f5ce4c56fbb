//! The admin endpoints (admin bearer token): replay a sink from a seq or a
//! time, list dead letters, put one back for delivery, drop one. They act
//! only through the journal's API ([`Journal::rewind`],
//! [`Journal::retry_dead_letter`], [`Journal::drop_dead_letter`]), whose
//! writer serialises them with everything else.
//!
//! Every write logs one audit line at info (target `plantrelay::audit`):
//! who (the client certificate's subject when mTLS is on, else the admin
//! token's role at the peer address: see [`Caller::who`]), the peer address,
//! what, the outcome, and when. Refused requests are logged by
//! [`super::auth`], with the reason given here.
//!
//! Times from a request are range-checked before anything converts or
//! formats them; nothing here may panic on what a caller sends.
//!
//! [`Journal::rewind`]: crate::journal::Journal::rewind
//! [`Journal::retry_dead_letter`]: crate::journal::Journal::retry_dead_letter
//! [`Journal::drop_dead_letter`]: crate::journal::Journal::drop_dead_letter

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use super::AppState;
use super::auth::{Caller, Refusal};
use crate::journal::{DeadLetter, JournalError, RewindTo};
use crate::units::{formattable, rfc3339_us, unix_micros};

/// An API refusal: a status and a reason, answered as `{"error": reason}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let refusal = Refusal(self.message.clone());
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        response.extensions_mut().insert(refusal);
        response
    }
}

impl From<JournalError> for ApiError {
    fn from(e: JournalError) -> ApiError {
        let status = match &e {
            JournalError::NotFound { .. } => StatusCode::NOT_FOUND,
            JournalError::BeyondRetention { .. } => StatusCode::CONFLICT,
            JournalError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match e {
            JournalError::NotFound { what, .. } => what,
            other => other.to_string(),
        };
        ApiError::new(status, message)
    }
}

type ApiResult = Result<Response, ApiError>;

/// One audit line per write.
fn audit(caller: Option<&Caller>, action: &str, object: &str, outcome: &str) {
    let caller = caller.cloned().unwrap_or_default();
    let peer = &caller.peer;
    let who = caller.who();
    info!(
        target: "plantrelay::audit",
        who = who.as_str(),
        role = caller.token.as_str(),
        client_cert = peer.cert_subject.as_deref().unwrap_or("-"),
        peer = %peer.addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
        action,
        object,
        outcome,
        at = %rfc3339_us(unix_micros(SystemTime::now())),
        "admin action"
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    from_seq: Option<u64>,
    since: Option<String>,
    class: Option<crate::event::Class>,
}

const REPLAY_USAGE: &str = r#"expected a JSON body {"from_seq": N} or {"since": "2h" | "2026-11-29T08:00:00Z"}, optionally with "class": "critical" | "telemetry""#;

/// Parses a replay body into the journal's rewind point, or a reason.
pub(crate) fn parse_replay(body: &[u8]) -> Result<RewindTo, String> {
    parse_replay_class(body).map(|(to, _)| to)
}

/// [`parse_replay`] and the class to replay, if the body names one.
pub(crate) fn parse_replay_class(
    body: &[u8],
) -> Result<(RewindTo, Option<crate::event::Class>), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("empty body: {REPLAY_USAGE}"));
    }
    let b: ReplayBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}; {REPLAY_USAGE}"))?;
    let to = match (b.from_seq, b.since) {
        (Some(_), Some(_)) => Err(format!("give from_seq or since, not both; {REPLAY_USAGE}")),
        (None, None) => Err(format!("give from_seq or since; {REPLAY_USAGE}")),
        (Some(0), None) => Err("from_seq must be at least 1".to_string()),
        (Some(seq), None) => Ok(RewindTo::Seq(seq)),
        (None, Some(since)) => parse_since(&since).map(RewindTo::Since),
    }?;
    Ok((to, b.class))
}

/// An RFC 3339 time (`2026-11-29T08:00:00Z`) or an age (`90m`, `2h`), in
/// the range the journal and the audit line can take (see
/// [`crate::units::since_time`]).
pub(crate) fn parse_since(s: &str) -> Result<SystemTime, String> {
    crate::units::since_time("since", s)
}

pub(crate) fn describe(to: RewindTo) -> String {
    match to {
        RewindTo::Seq(s) => format!("from_seq {s}"),
        RewindTo::Since(t) => format!(
            "since {}",
            humantime::format_rfc3339_seconds(formattable(t))
        ),
    }
}

/// `POST /api/v1/sinks/{name}/replay`.
pub(crate) async fn replay(
    State(state): State<Arc<AppState>>,
    caller: Option<axum::Extension<Caller>>,
    Path(sink): Path<String>,
    body: Bytes,
) -> ApiResult {
    let caller = caller.map(|c| c.0);
    let view = &state.view;
    if !view.has_sink(&sink) {
        let names: Vec<&str> = view.sinks.iter().map(|s| s.name.as_str()).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no sink named '{sink}' (sinks: {})", names.join(", ")),
        ));
    }
    let (to, class) = parse_replay_class(&body)
        .map_err(|reason| ApiError::new(StatusCode::BAD_REQUEST, reason))?;
    if let Some(class) = class
        && !view.sink_lanes(&sink).contains(&Some(class))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "sink '{sink}' has no {class} lane to replay alone (it sends in journal order, or does not take {class}); replay without \"class\""
            ),
        ));
    }
    let object = match class {
        Some(c) => format!("sink {sink} class {c} {}", describe(to)),
        None => format!("sink {sink} {}", describe(to)),
    };
    let rewound = match class {
        Some(c) => view.journal.rewind_class(&sink, c, to).await,
        None => view.journal.rewind(&sink, to).await,
    };
    let cursor = rewound
        .inspect_err(|e| audit(caller.as_ref(), "replay", &object, &format!("refused: {e}")))?;
    audit(
        caller.as_ref(),
        "replay",
        &object,
        &format!("ok: cursor {cursor}"),
    );
    let head = view.journal.stats().head_seq.load(Ordering::Relaxed);
    Ok(Json(json!({
        "sink": sink,
        "cursor": cursor,
        "from_seq": cursor + 1,
        "backlog_events": view.journal.stats().backlog(head, cursor),
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeadLetterQuery {
    sink: Option<String>,
}

/// A dead letter as the API shows it.
#[derive(Debug, Serialize)]
struct DeadLetterView {
    id: i64,
    sink: String,
    seq: u64,
    reason: String,
    time: String,
    source: String,
    event_id: String,
    stream: String,
    stream_seq: u64,
    #[serde(rename = "type")]
    event_type: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            id: d.id,
            sink: d.sink,
            seq: d.seq,
            reason: d.reason,
            time: rfc3339_us(d.time_us),
            source: d.source,
            event_id: d.event_id,
            stream: d.stream,
            stream_seq: d.stream_seq,
            event_type: d.event_type,
        }
    }
}

async fn all_dead_letters(
    state: &Arc<AppState>,
    sink: Option<String>,
) -> Result<Vec<DeadLetter>, ApiError> {
    let view = state.view.clone();
    let list = tokio::task::spawn_blocking(move || view.read(|r| r.dead_letters(sink.as_deref())))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(list)
}

/// `GET /api/v1/dead-letters?sink=`.
pub(crate) async fn list_dead_letters(
    State(state): State<Arc<AppState>>,
    Query(q): Query<DeadLetterQuery>,
) -> ApiResult {
    if let Some(sink) = q.sink.as_deref()
        && !state.view.has_sink(sink)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no sink named '{sink}'"),
        ));
    }
    let list: Vec<DeadLetterView> = all_dead_letters(&state, q.sink)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(json!({ "dead_letters": list })).into_response())
}

/// The dead letter `id` names and the sink it belongs to, or a 400/404.
async fn dead_letter_of(state: &Arc<AppState>, id: &str) -> Result<(i64, String), ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("dead-letter id {id:?} is not an integer"),
        )
    })?;
    all_dead_letters(state, None)
        .await?
        .into_iter()
        .find(|d| d.id == id)
        .map(|d| (id, d.sink))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no dead letter with id {id}"),
            )
        })
}

/// `POST /api/v1/dead-letters/{id}/retry`.
pub(crate) async fn retry_dead_letter(
    State(state): State<Arc<AppState>>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult {
    let caller = caller.map(|c| c.0);
    let (id, sink) = dead_letter_of(&state, &id).await?;
    let object = format!("dead letter {id} of sink {sink}");
    let action = "dead_letter_retry";
    let seq = state
        .view
        .journal
        .retry_dead_letter(id)
        .await
        .inspect_err(|e| audit(caller.as_ref(), action, &object, &format!("refused: {e}")))?;
    audit(
        caller.as_ref(),
        action,
        &object,
        &format!("ok: journaled again as seq {seq}"),
    );
    Ok(Json(json!({ "id": id, "sink": sink, "seq": seq })).into_response())
}

/// `DELETE /api/v1/dead-letters/{id}`.
pub(crate) async fn drop_dead_letter(
    State(state): State<Arc<AppState>>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult {
    let caller = caller.map(|c| c.0);
    let (id, sink) = dead_letter_of(&state, &id).await?;
    let object = format!("dead letter {id} of sink {sink}");
    let action = "dead_letter_delete";
    state
        .view
        .journal
        .drop_dead_letter(id)
        .await
        .inspect_err(|e| audit(caller.as_ref(), action, &object, &format!("refused: {e}")))?;
    audit(caller.as_ref(), action, &object, "ok");
    Ok(Json(json!({ "id": id, "sink": sink, "deleted": true })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_bodies_parse_or_say_why_not() {
        assert_eq!(parse_replay(br#"{"from_seq": 31}"#), Ok(RewindTo::Seq(31)));
        assert!(matches!(
            parse_replay(br#"{"since": "2h"}"#),
            Ok(RewindTo::Since(_))
        ));
        assert!(matches!(
            parse_replay(br#"{"since": "2026-11-29T08:00:00Z"}"#),
            Ok(RewindTo::Since(_))
        ));
        let e = |b: &[u8]| parse_replay(b).unwrap_err();
        assert!(e(b"").contains("empty body"));
        assert!(e(b"{").contains("invalid body"));
        assert!(e(br#"{"from_seq": -1}"#).contains("invalid body"));
        assert!(e(br#"{"from": 3}"#).contains("unknown field"));
        assert!(e(br#"{"from_seq": 1, "since": "2h"}"#).contains("not both"));
        assert!(e(br#"{}"#).contains("give from_seq or since"));
        assert!(e(br#"{"from_seq": 0}"#).contains("at least 1"));
        assert!(e(br#"{"since": "yesterday"}"#).contains("RFC 3339"));
        assert!(e(br#"{"since": "57y"}"#).contains("before 1970-01-01T00:00:00Z"));
        assert!(e(br#"{"since": "1969-12-31T23:59:59Z"}"#).contains("out of range"));
        assert!(e(br#"{"since": "99999999999999999999y"}"#).contains("since"));
        assert!(matches!(
            parse_replay(br#"{"since": "9999-12-31T23:59:59Z"}"#),
            Ok(RewindTo::Since(_))
        ));
    }
}
