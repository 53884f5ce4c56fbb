//! OAuth2 client credentials (RFC 6749 §4.4) for the HTTPS sink: the access
//! token an upstream behind API management wants, fetched from the token
//! endpoint, cached, and renewed before it expires.
//!
//! This module owns the token: one fetch at a time however many batches
//! wait for it, renewal ahead of expiry, one renewal after the upstream
//! refused a token (`401`), and the token state shown in the status. It
//! must never let the client secret or a token reach a log line, an error,
//! the status or the metrics: errors quote only the endpoint's `error` code
//! and its description, bounded and with any echo of the secret masked.
//! It never decides about the batch: a token it cannot get is a reason to
//! retry, never to dead-letter.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::config::{OAuth2AuthMethod, OAuth2Config, read_secret};
use crate::text::escape_control;
use crate::units::formattable;

/// Renew this long before the token expires, or a fifth of its life if
/// that is shorter: a batch sent just before expiry must not arrive after.
const MAX_SKEW: Duration = Duration::from_secs(60);
/// How long a token past its renewal time (but not expired) is used after a
/// failed renewal before the endpoint is asked again.
const STALE_RETRY: Duration = Duration::from_secs(5);
/// Longest token response read (a JWT with many claims is a few KiB).
const MAX_RESPONSE: usize = 64 * 1024;
/// Longest `error_description` quoted in an error.
const MAX_DESCRIPTION: usize = 200;

/// A bearer token in hand.
#[derive(Clone)]
struct Token {
    header: HeaderValue,
    /// When to fetch the next one; `None`: the server gave no lifetime,
    /// keep it until the upstream refuses it.
    renew_at: Option<Instant>,
    expires_at: Option<SystemTime>,
    /// Counts tokens fetched, so a `401` renews only the token it refused.
    generation: u64,
}

pub use crate::status::TokenState;

/// Why no token could be had: the reason for the sink's retry.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenError {
    pub message: String,
    /// The endpoint's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

/// The token source of one sink.
pub struct OAuth2 {
    client: reqwest::Client,
    token_url: reqwest::Url,
    client_id: String,
    secret: String,
    scopes: Vec<String>,
    method: OAuth2AuthMethod,
    /// Held across a fetch: the batches that need a token meanwhile wait
    /// for this one rather than each asking the endpoint.
    token: tokio::sync::Mutex<Option<Token>>,
    state: Mutex<TokenState>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl OAuth2 {
    /// Reads the client secret; `client` carries the sink's TLS trust.
    pub fn new(cfg: &OAuth2Config, client: reqwest::Client) -> Result<OAuth2, String> {
        let secret = read_secret(&cfg.client_secret_file).map_err(|e| e.to_string())?;
        let token_url = reqwest::Url::parse(cfg.token_url.as_str())
            .map_err(|e| format!("oauth2.token_url: {e}"))?;
        Ok(OAuth2 {
            client,
            state: Mutex::new(TokenState {
                token_url: token_url.to_string(),
                ..TokenState::default()
            }),
            token_url,
            client_id: cfg.client_id.clone(),
            secret,
            scopes: cfg.scopes.clone(),
            method: cfg.auth_method,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The `Authorization` header for the next request and its token's
    /// generation: the cached token while it is fresh, else a new one.
    pub async fn header(&self) -> Result<(HeaderValue, u64), TokenError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && t.renew_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok((t.header.clone(), t.generation));
        }
        let generation = slot.as_ref().map_or(0, |t| t.generation) + 1;
        match self.fetch(generation).await {
            Ok(t) => {
                let out = (t.header.clone(), t.generation);
                self.record_success(&t);
                *slot = Some(t);
                Ok(out)
            }
            Err(e) => {
                // A token that is stale but not expired is still better
                // than none while the endpoint is down.
                if let Some(t) = slot.as_mut()
                    && let Some(left) = t
                        .expires_at
                        .and_then(|at| at.duration_since(SystemTime::now()).ok())
                {
                    self.record_failure(&e.message);
                    // Ask again in a while, not for every batch meanwhile.
                    t.renew_at = Some(Instant::now() + left.min(STALE_RETRY));
                    return Ok((t.header.clone(), t.generation));
                }
                *slot = None;
                self.record_failure(&e.message);
                Err(e)
            }
        }
    }

    /// The upstream refused the token of `generation`: drop it, so the next
    /// [`OAuth2::header`] fetches another (a newer one is kept).
    pub async fn refused(&self, generation: u64) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            info!(token_url = %self.token_url, "the upstream refused the access token (401); fetching a new one");
            *slot = None;
        }
    }

    pub fn state(&self) -> TokenState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn record_success(&self, t: &Token) {
        if let Ok(mut s) = self.state.lock() {
            s.fetches += 1;
            s.valid_until = t
                .expires_at
                .map(|at| humantime::format_rfc3339_seconds(formattable(at)).to_string());
            if s.last_error.take().is_some() {
                info!(token_url = %self.token_url, "access token fetched again");
            }
            s.last_error_time = None;
        }
        debug!(token_url = %self.token_url, valid_until = ?t.expires_at.map(|at| humantime::format_rfc3339_seconds(formattable(at))), "access token fetched");
    }

    fn record_failure(&self, message: &str) {
        if let Ok(mut s) = self.state.lock() {
            if s.last_error.as_deref() != Some(message) {
                warn!(token_url = %self.token_url, error = %message, "cannot get an access token; the backlog waits and the sink retries");
            }
            s.last_error = Some(message.to_owned());
            s.last_error_time =
                Some(humantime::format_rfc3339_seconds(formattable(SystemTime::now())).to_string());
        }
    }

    /// The form body and `Authorization` of a token request.
    fn request_parts(&self) -> (String, Option<HeaderValue>) {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !self.scopes.is_empty() {
            form.append_pair("scope", &self.scopes.join(" "));
        }
        let auth = match self.method {
            OAuth2AuthMethod::Post => {
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_secret", &self.secret);
                None
            }
            OAuth2AuthMethod::Basic => {
                // RFC 6749 §2.3.1: each part form-encoded, then Basic.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let pair = format!("{}:{}", enc(&self.client_id), enc(&self.secret));
                HeaderValue::from_str(&format!("Basic {}", BASE64.encode(pair)))
                    .ok()
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
            }
        };
        (form.finish(), auth)
    }

    async fn fetch(&self, generation: u64) -> Result<Token, TokenError> {
        let fail = |message: String| TokenError {
            message: self.mask(&format!(
                "OAuth2 token endpoint {}: {message}",
                self.token_url
            )),
            retry_after: None,
        };
        let (body, auth) = self.request_parts();
        let mut req = self
            .client
            .post(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(body);
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth);
        }
        let sent_at = Instant::now();
        let issued_at = SystemTime::now();
        let resp = req
            .send()
            .await
            .map_err(|e| fail(format!("request failed: {}", super::https::describe(&e))))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(super::https::parse_retry_after);
        let bytes = read_bounded(resp)
            .await
            .map_err(|m| fail(format!("answered {status} but {m}")))?;
        if !status.is_success() {
            let detail = match serde_json::from_slice::<ErrorResponse>(&bytes) {
                Ok(e) => {
                    let mut d = format!("error {}", escape_control(&e.error, 60));
                    if let Some(desc) = e.error_description.filter(|d| !d.is_empty()) {
                        d.push_str(&format!(" ({})", escape_control(&desc, MAX_DESCRIPTION)));
                    }
                    d
                }
                Err(_) => "no OAuth2 error in the body".into(),
            };
            let hint = match (status, &self.method) {
                (StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED, _)
                    if detail.contains("invalid_client") =>
                {
                    "; check client_id and the client secret file"
                }
                _ => "",
            };
            let mut e = fail(format!("answered {status}: {detail}{hint}"));
            e.retry_after = retry_after;
            return Err(e);
        }
        let t: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("answered {status} without a token response: {e}")))?;
        if !t.token_type.eq_ignore_ascii_case("bearer") {
            return Err(fail(format!(
                "token_type \"{}\" is not supported (only Bearer)",
                escape_control(&t.token_type, 40)
            )));
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {}", t.access_token))
            .map_err(|_| fail("the access token is not a valid header value".into()))?;
        header.set_sensitive(true);
        // Some servers send the lifetime as a string.
        let lifetime = t.expires_in.as_ref().and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
        let (renew_at, expires_at) = match lifetime {
            Some(secs) => {
                let (renew_in, life) = renewal(secs);
                (sent_at.checked_add(renew_in), issued_at.checked_add(life))
            }
            None => (None, None),
        };
        Ok(Token {
            header,
            renew_at,
            expires_at,
            generation,
        })
    }

    /// Masks the secret, should a misbehaving endpoint echo it.
    fn mask(&self, text: &str) -> String {
        if self.secret.len() >= 4 && text.contains(&self.secret) {
            text.replace(&self.secret, "***")
        } else {
            text.to_owned()
        }
    }
}

/// When to renew a token that lives `secs` (from the endpoint: clamped to
/// 1 s .. a year, so that neither a zero nor a huge lifetime can make the
/// sink fetch per batch or overflow a clock), and its lifetime.
fn renewal(secs: u64) -> (Duration, Duration) {
    let life = Duration::from_secs(secs.clamp(1, MAX_LIFETIME_SECS));
    let skew = (life / 5).min(MAX_SKEW);
    (life.saturating_sub(skew), life)
}

/// Longest token lifetime believed (a year).
const MAX_LIFETIME_SECS: u64 = 365 * 24 * 3600;

async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let read = async {
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if out.len() + chunk.len() > MAX_RESPONSE {
                return Err(format!("its body exceeds {MAX_RESPONSE} bytes"));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(format!("its body could not be read: {e}")),
        Err(_) => Err("its body did not arrive within 10 s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oauth(method: OAuth2AuthMethod, scopes: &[&str]) -> (OAuth2, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "p&ss:w rd\n").unwrap();
        let cfg = OAuth2Config {
            token_url: "https://127.0.0.1:1/token".parse().unwrap(),
            client_id: "gw hamburg".into(),
            client_secret_file: secret,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            auth_method: method,
        };
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder().build().unwrap();
        (OAuth2::new(&cfg, client).unwrap(), dir)
    }

    #[test]
    fn basic_form_encodes_id_and_secret_and_post_puts_them_in_the_body() {
        let (o, _d) = oauth(OAuth2AuthMethod::Basic, &["events.write", "x"]);
        let (body, auth) = o.request_parts();
        assert_eq!(body, "grant_type=client_credentials&scope=events.write+x");
        let auth = auth.unwrap();
        assert!(auth.is_sensitive());
        let b64 = auth.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let pair = String::from_utf8(BASE64.decode(b64).unwrap()).unwrap();
        assert_eq!(pair, "gw+hamburg:p%26ss%3Aw+rd");

        let (o, _d) = oauth(OAuth2AuthMethod::Post, &[]);
        let (body, auth) = o.request_parts();
        assert!(auth.is_none());
        assert_eq!(
            body,
            "grant_type=client_credentials&client_id=gw+hamburg&client_secret=p%26ss%3Aw+rd"
        );
    }

    #[test]
    fn renewal_comes_ahead_of_expiry_whatever_the_lifetime() {
        assert_eq!(
            renewal(3600),
            (Duration::from_secs(3540), Duration::from_secs(3600))
        );
        assert_eq!(
            renewal(2),
            (Duration::from_millis(1600), Duration::from_secs(2))
        );
        let (renew, life) = renewal(0);
        assert!(renew > Duration::ZERO && life == Duration::from_secs(1));
        let (renew, life) = renewal(u64::MAX);
        assert_eq!(life, Duration::from_secs(MAX_LIFETIME_SECS));
        assert!(Instant::now().checked_add(renew).is_some());
        assert!(SystemTime::now().checked_add(life).is_some());
    }

    #[test]
    fn an_echoed_secret_is_masked() {
        let (o, _d) = oauth(OAuth2AuthMethod::Basic, &[]);
        assert_eq!(o.mask("bad secret p&ss:w rd!"), "bad secret ***!");
    }
}
