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

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rustls::pki_types::CertificateDer;
use subtle::ConstantTimeEq;

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
    fn read_allowed(&self, headers: &HeaderMap, peer: Option<&Peer>) -> bool {
        if self.client_certs && peer.and_then(|p| p.cert_subject.as_ref()).is_none() {
            return false;
        }
        match &self.read_token {
            None => true,
            Some(t) => {
                let given = bearer(headers);
                // Both compared, so the time does not tell which one matched.
                let read = matches(given, Some(t));
                let admin = matches(given, self.admin_token.as_deref());
                read | admin
            }
        }
    }
}

pub(crate) fn is_probe(path: &str) -> bool {
    path == "/healthz" || path == "/readyz"
}

/// Every request: the read checks, unless it is a probe and probes are open.
pub(crate) async fn read_auth(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let open = state.auth.open_probes && is_probe(req.uri().path());
    if !open
        && !state
            .auth
            .read_allowed(req.headers(), req.extensions().get::<Peer>())
    {
        return unauthorized();
    }
    next.run(req).await
}

/// The admin endpoints: the admin token, or 403 when there is none.
pub(crate) async fn admin_auth(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(admin) = state.auth.admin_token.as_deref() else {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({
                "error": "the admin API is off: set health.admin_token_file to enable it"
            })),
        )
            .into_response();
    };
    if !matches(bearer(req.headers()), Some(admin)) {
        return unauthorized();
    }
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
    fn no_authentication_configured_lets_everyone_read() {
        let a = auth(None, Some("adm"), false);
        assert!(a.read_allowed(&headers(None), None));
    }
}
