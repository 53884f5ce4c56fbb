//! The handler of `POST /v1/events`: faults first (scripted answers,
//! latency, resets, failing statuses), then the wire checks, rejected ids,
//! and the recording of an accepted batch. It must never panic or hang on a
//! request: bad input is answered with a 4xx and a reason, and no state
//! lock is held across an `.await`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::faults::{Faults, roll};
use super::wire::{check_content_type, decode_body, parse_batch};
use super::{BatchRecord, REJECT_REASON, ReceivedEvent, Scripted, Shared, lock};

fn error_response(status: StatusCode, error: &str, reason: String) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "reason": reason })),
    )
        .into_response()
}

pub(super) async fn ingest(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let faults = lock(&shared.faults).clone();
    let scripted = lock(&shared.script).pop_front();
    lock(&shared.recording).stats.requests += 1;
    let response = match scripted {
        Some(answer) => scripted_answer(&shared, peer, &headers, &body, faults, answer).await,
        None => handle_batch(&shared, peer, &headers, &body, faults).await,
    };
    shared.changed.notify_waiters();
    response
}

async fn scripted_answer(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
    faults: Faults,
    answer: Scripted,
) -> Response {
    match answer {
        Scripted::Status {
            status,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (
                status,
                axum::Json(json!({ "error": "scripted", "status": status.as_u16() })),
            )
                .into_response();
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
        Scripted::Reject(index) => {
            let named = decode_body(headers, body)
                .and_then(|(decoded, _)| parse_batch(&decoded))
                .ok()
                .and_then(|events| index.and_then(|i| events.get(i).map(|e| e.id.clone())));
            match named {
                Some(id) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(json!({ "error": "rejected", "id": id, "reason": REJECT_REASON })),
                )
                    .into_response(),
                None => (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({ "error": "rejected", "reason": REJECT_REASON })),
                )
                    .into_response(),
            }
        }
        Scripted::Delay(d) => {
            tokio::time::sleep(d).await;
            handle_batch(shared, peer, headers, body, faults).await
        }
    }
}

async fn handle_batch(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
    faults: Faults,
) -> Response {
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }

    if roll(faults.reset_probability) {
        lock(&shared.recording).stats.injected_resets += 1;
        match lock(&shared.conns).get(&peer) {
            Some(conn) => {
                conn.killed.store(true, Ordering::Release);
                tracing::debug!(%peer, "fault injection: resetting the connection");
            }
            None => tracing::error!(%peer, "fault injection: connection to reset not found"),
        }
        // Never reaches the client: the write fails on the killed stream.
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }

    if let Some(fail) = faults.fail
        && roll(fail.probability)
    {
        lock(&shared.recording).stats.injected_failures += 1;
        tracing::debug!(%peer, status = fail.status.as_u16(), "fault injection: failing the batch");
        let mut response = (
            fail.status,
            axum::Json(json!({ "error": "injected fault", "status": fail.status.as_u16() })),
        )
            .into_response();
        if let Some(secs) = fail.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }

    let parsed = check_content_type(headers)
        .and_then(|()| decode_body(headers, body))
        .and_then(|(decoded, encoding)| {
            parse_batch(&decoded).map(|events| (events, encoding, decoded.len()))
        });
    let (events, encoding, decoded_len) = match parsed {
        Ok(v) => v,
        Err((status, error, reason)) => {
            lock(&shared.recording).stats.malformed_batches += 1;
            tracing::warn!(%peer, status = status.as_u16(), %reason, "rejecting a malformed batch");
            return error_response(status, error, reason);
        }
    };

    if let Some(bad) = events.iter().find(|e| faults.rejected.contains(&e.id)) {
        lock(&shared.recording).stats.rejected_batches += 1;
        tracing::debug!(%peer, id = %bad.id, "fault injection: rejecting the batch");
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({ "error": "rejected", "id": bad.id, "reason": REJECT_REASON })),
        )
            .into_response();
    }

    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let n = events.len();
    let mut duplicates = 0usize;
    {
        let mut rec = lock(&shared.recording);
        let batch = rec.batches.len();
        rec.batches.push(BatchRecord {
            idempotency_key: idempotency_key.clone(),
            events: n,
            wire_bytes: body.len(),
            decoded_bytes: decoded_len,
            encoding,
        });
        for w in events {
            let duplicate = !rec.seen.insert((w.source.clone(), w.id.clone()));
            duplicates += usize::from(duplicate);
            rec.events.push(ReceivedEvent {
                source: w.source,
                id: w.id,
                subject: w.subject,
                event_type: w.event_type,
                time: w.time,
                sequence: w.sequence,
                streamsequence: w.streamsequence,
                data: match w.data {
                    Some(raw) if shared.record_data => {
                        // The batch parsed as JSON, so each part does too.
                        serde_json::from_str(raw.get()).unwrap_or(Value::Null)
                    }
                    _ => Value::Null,
                },
                duplicate,
                batch,
            });
        }
        let s = &mut rec.stats;
        s.batches_accepted += 1;
        s.events_received += n as u64;
        s.duplicates += duplicates as u64;
        s.unique_ids += (n - duplicates) as u64;
        s.wire_bytes += body.len() as u64;
        s.decoded_bytes += decoded_len as u64;
    }
    tracing::debug!(
        %peer,
        events = n,
        duplicates,
        encoding,
        idempotency_key = idempotency_key.as_deref().unwrap_or("-"),
        "batch accepted"
    );
    (
        StatusCode::OK,
        axum::Json(json!({ "received": n, "duplicates": duplicates })),
    )
        .into_response()
}
