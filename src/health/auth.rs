//! Who may call what. Two layers, both as configured:
//!
//! - client certificates (`client_ca`): checked in the TLS handshake, which
//!   fails without a valid certificate. With `open_probes` the handshake also
//!   admits clients without one, and [`read_auth`] then refuses them
//!   everything but `/healthz` and `/readyz`.
//! - bearer tokens: `token_file` for every endpoint (the admin token is
//!   accepted too), `admin_token_file` for the admin endpoints. Compared in
//!   constant time; a refusal is a bare 401 that says nothing about why.
//!
//! With `open_probes = true`, `/healthz` and `/readyz` need neither. Without
//! `admin_token_file` the admin endpoints are off: 403 with the reason, to
//! callers that passed the read checks.
//!
//! Each request that passes carries a [`Caller`]: its connection and the
//! role its token earned (never the token itself), for the audit lines.
//! Every refusal (401 anywhere; 400/403/404/405 on the admin endpoints) is
//! logged at warn, target `plantrelay::audit`, with the caller's address,
//! certificate subject and token role; [`REFUSALS_LOGGED_PER_MINUTE`] per kind,
//! then one line with the count left out, so that a flood of bad requests
//! cannot fill the disk. This module must never log a secret.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rustls::pki_types::CertificateDer;
use subtle::ConstantTimeEq;
use tracing::warn;

use super::AppState;

/// The configured secrets and switches.
pub(crate) struct Auth {
    pub read_token: Option<String>,
    pub admin_token: Option<String>,
    pub open_probes: bool,
    /// `client_ca` is set: every non-probe request must come over a
    /// connection with a verified client certificate.
    pub client_certs: bool,
}

/// The connection a request came over, attached by the TLS acceptor.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// Subject of the verified client certificate (RFC 4514 style), if the
    /// client presented one.
    pub cert_subject: Option<String>,
}

impl Peer {
    pub(crate) fn from_certs(
        addr: Option<SocketAddr>,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Peer {
        Peer {
            addr,
            cert_subject: certs
                .and_then(|c| c.first())
                .map(|c| subject(c).unwrap_or_else(|| "<unparsable certificate>".to_string())),
        }
    }
}

/// Which configured token a request presented, as far as it matters for
/// audit: named by role, never by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenRole {
    /// No token, or none is configured.
    #[default]
    None,
    /// `token_file`.
    Read,
    /// `admin_token_file`.
    Admin,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::None => "none",
            TokenRole::Read => "read-token",
            TokenRole::Admin => "admin-token",
        }
    }
}

/// Who made a request that passed authentication: attached to the request
/// by [`read_auth`] (and upgraded by [`admin_auth`]).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub peer: Peer,
    pub token: TokenRole,
}

impl Caller {
    /// The identity for an audit line: the client certificate's subject if
    /// there is one (with the token role), else the token role at the peer
    /// address, e.g. `admin-token@10.0.3.7` or `CN=central-ops (admin-token)`.
    pub fn who(&self) -> String {
        let role = self.token.as_str();
        match (&self.peer.cert_subject, self.token) {
            (Some(subject), TokenRole::None) => subject.clone(),
            (Some(subject), _) => format!("{subject} ({role})"),
            (None, TokenRole::None) => format!("anonymous@{}", addr_text(&self.peer)),
            (None, _) => format!("{role}@{}", addr_text(&self.peer)),
        }
    }
}

fn addr_text(peer: &Peer) -> String {
    peer.addr
        .map_or_else(|| "-".to_string(), |a| a.ip().to_string())
}

/// The subject of a DER certificate, e.g. `CN=central-ops, O=Example`.
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().as_bytes())
}

/// What a presented token is, for a refusal line: absent, or not one of
/// ours (its value is never logged).
fn presented(headers: &HeaderMap) -> &'static str {
    match headers.get(header::AUTHORIZATION) {
        None => "none",
        Some(_) if bearer(headers).is_some() => "wrong bearer token",
        Some(_) => "not a bearer token",
    }
}

fn matches(given: Option<&[u8]>, expected: Option<&str>) -> bool {
    match (given, expected) {
        (Some(g), Some(e)) => bool::from(g.ct_eq(e.as_bytes())),
        _ => false,
    }
}

pub(crate) fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "unauthorized\n",
    )
        .into_response()
}

impl Auth {
    #[cfg(test)]
    fn read_allowed(&self, headers: &HeaderMap, peer: Option<&Peer>) -> bool {
        self.read_role(headers, peer).is_some()
    }

    /// `Some(role)` when the read checks pass: the token that was presented
    /// and matched (the admin token counts; `None` when no read token is
    /// configured and none matched).
    fn read_role(&self, headers: &HeaderMap, peer: Option<&Peer>) -> Option<TokenRole> {
        if self.client_certs && peer.and_then(|p| p.cert_subject.as_ref()).is_none() {
            return None;
        }
        let given = bearer(headers);
        // Both compared, so the time does not tell which one matched.
        let read = matches(given, self.read_token.as_deref());
        let admin = matches(given, self.admin_token.as_deref());
        let role = if admin {
            TokenRole::Admin
        } else if read {
            TokenRole::Read
        } else {
            TokenRole::None
        };
        match &self.read_token {
            None => Some(role),
            Some(_) => (read | admin).then_some(role),
        }
    }
}

/// Refusals logged per kind and minute before the rest are only counted.
pub const REFUSALS_LOGGED_PER_MINUTE: u64 = 20;

const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// One kind of refusal: its current window, how many were logged in it and
/// how many were left out.
struct Window {
    start: Option<Instant>,
    logged: u64,
    left_out: u64,
}

/// The refusal kinds, each rate-limited on its own.
const KINDS: [&str; 6] = [
    "unauthorized",
    "forbidden",
    "bad_request",
    "not_found",
    "method_not_allowed",
    "other",
];

static REFUSALS: Mutex<[Window; 6]> = Mutex::new(
    [const {
        Window {
            start: None,
            logged: 0,
            left_out: 0,
        }
    }; 6],
);

fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ => "other",
    }
}

/// Whether this refusal gets its own line; logs the count left out of the
/// previous window when a new one starts.
fn admit(kind: &'static str, now: Instant) -> bool {
    let i = KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KINDS.len() - 1);
    // A poisoned lock only means another thread panicked mid-update of
    // plain counters: they are still usable.
    let mut all = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
    let w = &mut all[i];
    if w.start
        .is_none_or(|s| now.duration_since(s) >= REFUSAL_WINDOW)
    {
        if w.left_out > 0 {
            warn!(
                target: "plantrelay::audit",
                kind,
                left_out = w.left_out,
                "{} more refused health requests of this kind were not logged in the last minute",
                w.left_out
            );
        }
        *w = Window {
            start: Some(now),
            logged: 0,
            left_out: 0,
        };
    }
    if w.logged < REFUSALS_LOGGED_PER_MINUTE {
        w.logged += 1;
        true
    } else {
        w.left_out += 1;
        false
    }
}

/// One refusal line (rate-limited per kind).
pub(crate) fn log_refusal(
    status: StatusCode,
    method: &str,
    path: &str,
    peer: Option<&Peer>,
    token: &str,
    reason: &str,
) {
    let kind = kind_of(status);
    if !admit(kind, Instant::now()) {
        return;
    }
    let peer = peer.cloned().unwrap_or_default();
    warn!(
        target: "plantrelay::audit",
        status = status.as_u16(),
        kind,
        method,
        path,
        peer = %peer.addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
        client_cert = peer.cert_subject.as_deref().unwrap_or("-"),
        token,
        reason,
        "health request refused"
    );
}

/// The reason an admin handler gave for refusing, attached to its response
/// so that [`read_auth`] can log it.
#[derive(Debug, Clone)]
pub(crate) struct Refusal(pub String);

pub(crate) fn is_admin_path(path: &str) -> bool {
    path.starts_with("/api/v1/sinks/") || path.starts_with("/api/v1/dead-letters")
}

pub(crate) fn is_probe(path: &str) -> bool {
    path == "/healthz" || path == "/readyz"
}

/// Every request: the read checks, unless it is a probe and probes are open.
/// Also where refusals of admin requests are logged, whichever layer below
/// refused them.
pub(crate) async fn read_auth(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let open = state.auth.open_probes && is_probe(req.uri().path());
    let peer = req.extensions().get::<Peer>().cloned();
    let role = state.auth.read_role(req.headers(), peer.as_ref());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let Some(role) = role.or(open.then_some(TokenRole::None)) else {
        log_refusal(
            StatusCode::UNAUTHORIZED,
            &method,
            &path,
            peer.as_ref(),
            presented(req.headers()),
            "read checks failed",
        );
        return unauthorized();
    };
    req.extensions_mut().insert(Caller {
        peer: peer.clone().unwrap_or_default(),
        token: role,
    });
    let response = next.run(req).await;
    let status = response.status();
    // 401 and 403 from admin_auth are logged there, with what it knows.
    if is_admin_path(&path)
        && status.is_client_error()
        && status != StatusCode::UNAUTHORIZED
        && status != StatusCode::FORBIDDEN
    {
        let reason = response.extensions().get::<Refusal>().map_or_else(
            || status.canonical_reason().unwrap_or("-").to_string(),
            |r| r.0.clone(),
        );
        log_refusal(
            status,
            &method,
            &path,
            peer.as_ref(),
            role.as_str(),
            &reason,
        );
    }
    response
}

/// The admin endpoints: the admin token, or 403 when there is none.
pub(crate) async fn admin_auth(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req.extensions().get::<Peer>().cloned();
    let refuse = |status: StatusCode, req: &Request, reason: &str| {
        let token = match bearer(req.headers()) {
            Some(_) if status == StatusCode::UNAUTHORIZED => "not the admin token",
            _ => presented(req.headers()),
        };
        log_refusal(
            status,
            req.method().as_str(),
            req.uri().path(),
            peer.as_ref(),
            token,
            reason,
        );
    };
    let Some(admin) = state.auth.admin_token.as_deref() else {
        refuse(
            StatusCode::FORBIDDEN,
            &req,
            "the admin API is off (no health.admin_token_file)",
        );
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({
                "error": "the admin API is off: set health.admin_token_file to enable it"
            })),
        )
            .into_response();
    };
    if !matches(bearer(req.headers()), Some(admin)) {
        refuse(StatusCode::UNAUTHORIZED, &req, "admin token required");
        return unauthorized();
    }
    let caller = Caller {
        peer: peer.clone().unwrap_or_default(),
        token: TokenRole::Admin,
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        h
    }

    fn auth(read: Option<&str>, admin: Option<&str>, client_certs: bool) -> Auth {
        Auth {
            read_token: read.map(String::from),
            admin_token: admin.map(String::from),
            open_probes: false,
            client_certs,
        }
    }

    #[test]
    fn the_read_token_or_the_admin_token_reads() {
        let a = auth(Some("r"), Some("adm"), false);
        assert!(a.read_allowed(&headers(Some("r")), None));
        assert!(a.read_allowed(&headers(Some("adm")), None));
        assert!(!a.read_allowed(&headers(Some("x")), None));
        assert!(!a.read_allowed(&headers(Some("")), None));
        assert!(!a.read_allowed(&headers(None), None));
    }

    #[test]
    fn with_client_certs_a_connection_without_one_reads_nothing() {
        let a = auth(None, None, true);
        let anonymous = Peer::default();
        let known = Peer {
            addr: None,
            cert_subject: Some("CN=ops".into()),
        };
        assert!(!a.read_allowed(&headers(None), Some(&anonymous)));
        assert!(!a.read_allowed(&headers(None), None));
        assert!(a.read_allowed(&headers(None), Some(&known)));
    }

    #[test]
    fn the_role_names_the_token_that_matched_never_its_value() {
        let a = auth(Some("r"), Some("adm"), false);
        assert_eq!(
            a.read_role(&headers(Some("r")), None),
            Some(TokenRole::Read)
        );
        assert_eq!(
            a.read_role(&headers(Some("adm")), None),
            Some(TokenRole::Admin)
        );
        assert_eq!(a.read_role(&headers(Some("x")), None), None);
        let open = auth(None, Some("adm"), false);
        assert_eq!(open.read_role(&headers(None), None), Some(TokenRole::None));
        let caller = Caller {
            peer: Peer {
                addr: Some("10.0.3.7:50000".parse().unwrap()),
                cert_subject: None,
            },
            token: TokenRole::Admin,
        };
        assert_eq!(caller.who(), "admin-token@10.0.3.7");
        let with_cert = Caller {
            peer: Peer {
                addr: None,
                cert_subject: Some("CN=central-ops".into()),
            },
            token: TokenRole::Admin,
        };
        assert_eq!(with_cert.who(), "CN=central-ops (admin-token)");
    }

    #[test]
    fn refusals_past_the_budget_are_counted_not_logged() {
        // Its own kind, so that other tests' refusals do not interfere.
        let start = Instant::now();
        let logged = (0..REFUSALS_LOGGED_PER_MINUTE + 30)
            .filter(|_| admit("other", start))
            .count() as u64;
        assert_eq!(logged, REFUSALS_LOGGED_PER_MINUTE);
        assert!(admit("other", start + REFUSAL_WINDOW));
    }

    #[test]
    fn no_authentication_configured_lets_everyone_read() {
        let a = auth(None, Some("adm"), false);
        assert!(a.read_allowed(&headers(None), None));
    }
}
