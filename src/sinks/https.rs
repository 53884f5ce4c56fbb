//! The HTTPS sink: each batch is one `POST` of a CloudEvents batch
//! (`application/cloudevents-batch+json`), optionally compressed, with
//! `Idempotency-Key: <agent id>:<first seq>-<last seq>` so the upstream can
//! drop a batch it already has. It maps the upstream's answer to a
//! [`SendOutcome`] and must never decide about cursors or dead letters.
//!
//! - 2xx: acknowledged.
//! - 408, 425, 429, 5xx, timeouts, connection errors and resets: retry
//!   (with the upstream's `Retry-After`, seconds or HTTP date).
//! - With `[sinks.https.oauth2]`, the bearer token comes from the token
//!   endpoint ([`super::oauth2`]); a `401` renews it once and the batch is
//!   sent again at once, and no token to be had is a retry.
//! - 401, 403, 404, 405, 407, 410, 421: retry as well. They speak of the
//!   credentials or the endpoint, not of the events; rejecting would
//!   dead-letter everything sent until someone fixes the token or the URL.
//! - any other 4xx: rejected. A 400 or 422 whose JSON body names an event
//!   (`id`, `event_id`, `eventId`, or `rejected[0].id`) pins that event;
//!   otherwise the forwarder bisects the batch.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use super::oauth2::{OAuth2, TokenState};
use super::{ForwarderSettings, SendOutcome, Sink};
use crate::config::{Compression, HttpsSinkConfig, read_secret};
use crate::event::StoredEvent;
use crate::tls::{ClientTls, client_config, reqwest_client_builder};

/// Errors building the sink from its config; they name the sink.
#[derive(Debug, thiserror::Error)]
#[error("sinks.https '{sink}': {detail}")]
pub struct HttpsSinkError {
    pub sink: String,
    pub detail: String,
}

pub struct HttpsSink {
    client: reqwest::Client,
    url: reqwest::Url,
    agent_id: String,
    compression: Compression,
    auth: Option<HeaderValue>,
    oauth2: Option<OAuth2>,
    /// No `client_cert`: a connection the upstream drops before it answers
    /// gets a hint in the error (see [`closed_unanswered`]).
    without_client_cert: bool,
    /// `compression = "gzip"`: one deflate state kept from body to body.
    /// A new one for each body is ~300 KiB of fresh memory that the kernel
    /// maps and zeroes, and then unmaps: at a few requests a second that
    /// was most of the sink's CPU (0.4 ms per request on a 2 vCPU VM).
    deflate: std::sync::Mutex<Option<flate2::Compress>>,
}

/// Most bytes of an error body kept for logs and dead-letter reasons.
const REASON_LIMIT: usize = 512;

impl HttpsSink {
    pub fn new(cfg: &HttpsSinkConfig, agent_id: &str) -> Result<HttpsSink, HttpsSinkError> {
        let err = |detail: String| HttpsSinkError {
            sink: cfg.name.clone(),
            detail,
        };
        let tls = client_config(&ClientTls {
            ca_file: cfg.ca_file.clone(),
            ca_only: cfg.ca_only,
            client_cert: cfg.client_cert.clone(),
            client_key: cfg.client_key.clone(),
        })
        .map_err(|e| err(e.to_string()))?;
        let oauth2 = match &cfg.oauth2 {
            Some(o) => {
                // The token endpoint is reached with the sink's own trust
                // (and client certificate, for mTLS-bound tokens).
                let client = reqwest_client_builder(tls.clone())
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
                    .user_agent(concat!("plantrelay/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| err(format!("cannot build the OAuth2 client: {e}")))?;
                Some(OAuth2::new(o, client).map_err(err)?)
            }
            None => None,
        };
        let client = reqwest_client_builder(tls)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("plantrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?;
        let auth = match &cfg.token_file {
            Some(path) => {
                let token = read_secret(path).map_err(|e| err(e.to_string()))?;
                let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    err(format!(
                        "token in {} is not a valid header value",
                        path.display()
                    ))
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let url = reqwest::Url::parse(cfg.url.as_str()).map_err(|e| err(format!("url: {e}")))?;
        Ok(HttpsSink {
            client,
            url,
            agent_id: agent_id.to_string(),
            compression: cfg.compression,
            auth,
            oauth2,
            without_client_cert: cfg.client_cert.is_none(),
            deflate: std::sync::Mutex::new(None),
        })
    }

    /// The forwarder settings of this sink's config.
    pub fn settings(cfg: &HttpsSinkConfig) -> ForwarderSettings {
        ForwarderSettings::of(cfg)
    }

    /// The request body: the batch as CloudEvents JSON, compressed as
    /// configured.
    fn body(&self, batch: &[StoredEvent]) -> Vec<u8> {
        let mut json = Vec::with_capacity(batch.iter().map(|e| e.size() + 160).sum());
        json.push(b'[');
        for (i, e) in batch.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            e.write_cloudevent(&self.agent_id, &mut json);
        }
        json.push(b']');
        match self.compression {
            Compression::None => json,
            Compression::Gzip => self.gzip(&json),
            Compression::Zstd => ruzstd::encoding::compress_to_vec(
                json.as_slice(),
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
        }
    }

    /// `json` as a gzip member (RFC 1952): the fixed header, raw deflate at
    /// the fastest level, then CRC-32 and length. The deflate state is the
    /// kept one when it is free (two lanes may encode at once), reset for
    /// the next body.
    fn gzip(&self, json: &[u8]) -> Vec<u8> {
        let kept = self.deflate.lock().ok().and_then(|mut d| d.take());
        let mut deflate =
            kept.unwrap_or_else(|| flate2::Compress::new(flate2::Compression::fast(), false));
        let out = gzip_member(&mut deflate, json);
        deflate.reset();
        if let Ok(mut d) = self.deflate.lock() {
            *d = Some(deflate);
        }
        out
    }
}

/// `json` as one gzip member: the header (no name, no time, unknown OS),
/// `json` deflated by `deflate` (fresh or reset) to its end, then CRC-32
/// and length.
fn gzip_member(deflate: &mut flate2::Compress, json: &[u8]) -> Vec<u8> {
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    // zlib's compressBound: deflate never grows data by more than this, so
    // the first call normally ends the stream.
    let bound = json.len() + (json.len() >> 12) + (json.len() >> 14) + (json.len() >> 25) + 13;
    let mut out = Vec::with_capacity(HEADER.len() + bound + 8);
    out.extend_from_slice(&HEADER);
    let mut ended = false;
    // Bounded: with room for the bound, one call ends the stream.
    for _ in 0..16 {
        let consumed =
            usize::try_from(deflate.total_in()).map_or(json.len(), |n| n.min(json.len()));
        match deflate.compress_vec(&json[consumed..], &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => {
                ended = true;
                break;
            }
            // Out of room: more, and go on.
            Ok(_) => out.reserve(bound.max(4096)),
            Err(_) => break,
        }
    }
    if !ended {
        // Not seen: a deflate state that refuses its input. A fresh
        // encoder of its own makes the body instead.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing into a Vec cannot fail.
        return match std::io::Write::write_all(&mut enc, json).and_then(|_| enc.finish()) {
            Ok(v) => v,
            Err(_) => json.to_vec(),
        };
    }
    let mut crc = flate2::Crc::new();
    crc.update(json);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE is the length modulo 2^32 (RFC 1952, 2.3.1).
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out
}

fn encoding_name(c: Compression) -> Option<&'static str> {
    match c {
        Compression::None => None,
        Compression::Gzip => Some("gzip"),
        Compression::Zstd => Some("zstd"),
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The event a 400/422 body names, as an index into `batch`.
pub fn rejected_index(body: &str, batch: &[StoredEvent]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let id = ["id", "event_id", "eventId"]
        .iter()
        .find_map(|k| v.get(k).and_then(|x| x.as_str()))
        .or_else(|| v.pointer("/rejected/0/id").and_then(|x| x.as_str()))?;
    batch.iter().position(|e| e.id == id)
}

/// Transient failures, and the 4xx that speak of the endpoint or of our
/// credentials rather than of the events (a revoked token, a moved URL, a
/// proxy asking for authentication): rejecting on those would turn every
/// event sent meanwhile into a dead letter, so they are retried, with the
/// status in the sink's last error, until plant IT fixes the cause.
fn is_retryable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        401 | 403 | 404 | 405 | 407 | 408 | 410 | 421 | 425 | 429
    ) || status.is_server_error()
}

/// How the HTTP client words a connection closed by the peer before any
/// answer. Under TLS 1.3 the handshake ends on the client's side before
/// the server has checked the client's certificate, so an upstream that
/// requires one and gets none shows up like this, not as a handshake error.
fn closed_unanswered(message: &str) -> bool {
    [
        "connection was not ready",
        "connection closed before message completed",
    ]
    .iter()
    .any(|m| message.contains(m))
}

pub(super) fn describe(e: &reqwest::Error) -> String {
    // The chain holds the useful part (connection refused, certificate
    // unknown, …); reqwest's own text is generic.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl HttpsSink {
    /// One POST of the batch, with the bearer token of the moment; `Err` is
    /// the outcome when no answer came (or no token could be had). Returns
    /// the generation of the OAuth2 token it used.
    async fn post(
        &self,
        key: &str,
        body: bytes::Bytes,
    ) -> Result<(reqwest::Response, Option<u64>), SendOutcome> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/cloudevents-batch+json")
            .header("Idempotency-Key", key)
            .body(body);
        if let Some(enc) = encoding_name(self.compression) {
            req = req.header(CONTENT_ENCODING, enc);
        }
        let mut generation = None;
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        } else if let Some(oauth2) = &self.oauth2 {
            let (header, g) = oauth2
                .header()
                .await
                .map_err(|e| SendOutcome::retry(e.retry_after, e.message))?;
            req = req.header(AUTHORIZATION, header);
            generation = Some(g);
        }
        match req.send().await {
            Ok(r) => Ok((r, generation)),
            Err(e) => {
                let mut message = format!("request failed: {}", describe(&e));
                if self.without_client_cert && closed_unanswered(&message) {
                    message.push_str(
                        " (the upstream closed the connection without an answer; \
                         one that requires a client certificate does so when none is sent: see client_cert)",
                    );
                }
                Err(SendOutcome::retry(None, message))
            }
        }
    }
}

impl Sink for HttpsSink {
    type Encoded = Vec<u8>;

    fn token_state(&self) -> Option<TokenState> {
        self.oauth2.as_ref().map(OAuth2::state)
    }

    fn encode(&self, batch: &[StoredEvent]) -> Vec<u8> {
        self.body(batch)
    }

    async fn send(&self, batch: &[StoredEvent], body: Vec<u8>) -> SendOutcome {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return SendOutcome::Ack;
        };
        let key = format!("{}:{}-{}", self.agent_id, first.seq, last.seq);
        let body = bytes::Bytes::from(body);
        let mut resp = match self.post(&key, body.clone()).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        // A refused OAuth2 token (revoked, or expired early) is renewed
        // once and the batch sent again with the new one.
        if resp.0.status() == StatusCode::UNAUTHORIZED
            && let (Some(oauth2), Some(generation)) = (&self.oauth2, resp.1)
        {
            oauth2.refused(generation).await;
            resp = match self.post(&key, body).await {
                Ok(r) => r,
                Err(outcome) => return outcome,
            };
        }
        let resp = resp.0;
        let status = resp.status();
        if status.is_success() {
            return SendOutcome::Ack;
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match tokio::time::timeout(Duration::from_secs(5), resp.text()).await {
            Ok(Ok(b)) => b,
            _ => String::new(),
        };
        let mut snippet: String = body.chars().take(REASON_LIMIT).collect();
        if snippet.len() < body.len() {
            snippet.push('…');
        }
        let reason = if snippet.is_empty() {
            format!("upstream answered {status}")
        } else {
            format!("upstream answered {status}: {snippet}")
        };
        if is_retryable(status) {
            return SendOutcome::retry(retry_after, reason);
        }
        let index = match status.as_u16() {
            400 | 422 => rejected_index(&body, batch),
            _ => None,
        };
        SendOutcome::reject(index, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies gzipped one after another through the kept deflate state
    /// each decode to their own JSON, with the CRC and length a decoder
    /// checks.
    #[test]
    fn gzip_bodies_decode_one_after_another_through_one_deflate_state() {
        use std::io::Read;
        let mut deflate = flate2::Compress::new(flate2::Compression::fast(), false);
        let bodies = [
            br#"[{"id":"a","data":{"qty":1}}]"#.to_vec(),
            Vec::new(),
            (0..20_000u32)
                .flat_map(|i| {
                    format!("{{\"seq\":{i},\"x\":\"{}\"}},", i * 7919 % 1000).into_bytes()
                })
                .collect(),
        ];
        for json in bodies.iter().chain(bodies.iter()) {
            let out = gzip_member(&mut deflate, json);
            deflate.reset();
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(out.as_slice())
                .read_to_end(&mut back)
                .expect("valid gzip");
            assert_eq!(&back, json);
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn retryable_statuses_are_the_transient_ones() {
        for s in [
            401, 403, 404, 405, 407, 408, 410, 421, 425, 429, 500, 502, 503, 504,
        ] {
            assert!(is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 409, 413, 415, 422] {
            assert!(!is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
