//! The client and the security of a session: the application instance
//! certificate and trust store, the choice of the server endpoint by the
//! configured policy and mode, the `server_cert_sha256` pin, the X.509 user
//! identity, and what a refused activation means in words.
//!
//! It owns every decision about whom the source talks to and as whom. It
//! must never accept a server certificate that is neither in `trusted/`,
//! pinned by `server_cert_sha256`, nor accepted by `trust_unknown_server`,
//! never connect to an endpoint whose policy or mode differs from the
//! configured ones, and never let async-opcua reconnect on its own: every
//! reconnect is a new generation of [`super`].

use std::time::Duration;

use opcua::client::{Client, ClientBuilder, IdentityToken};
use opcua::crypto::SecurityPolicy as UaPolicy;
use opcua::types::{EndpointDescription, MessageSecurityMode, StatusCode};

use super::{LinkError, MAX_NOTIFICATIONS_PER_PUBLISH, OpcuaSource, OpcuaSourceError, pki};
use crate::config::{SecurityMode, SecurityPolicy};

impl OpcuaSource {
    /// The client: application instance certificate (created on first
    /// run), trust store, timeouts. async-opcua's own reconnect is off.
    pub(super) fn client(&self) -> Result<Client, OpcuaSourceError> {
        pki::ensure_layout(&self.pki_dir).map_err(|detail| OpcuaSourceError::Pki {
            name: self.name.clone(),
            path: self.pki_dir.clone(),
            detail,
        })?;
        // The configuration bounds both (config::sources::opcua), and the
        // arithmetic saturates anyway: `Duration`'s operators panic.
        let window = self
            .cfg
            .publishing_interval
            .saturating_mul(self.cfg.keep_alive_count);
        let request_timeout = self.cfg.connect_timeout;
        let client = ClientBuilder::new()
            .application_name(format!("plantrelay {}", self.name))
            .application_uri(self.app_uri.clone())
            .product_uri("urn:plantrelay")
            .pki_dir(self.pki_dir.clone())
            .create_sample_keypair(true)
            .trust_server_certs(self.cfg.trust_unknown_server)
            .verify_server_certs(true)
            .session_retry_limit(0)
            .recreate_subscriptions(false)
            .session_timeout(
                u32::try_from(
                    window
                        .saturating_mul(4)
                        .max(Duration::from_secs(60))
                        .as_millis(),
                )
                .unwrap_or(u32::MAX),
            )
            .keep_alive_interval(window.max(Duration::from_secs(1)))
            .max_failed_keep_alive_count(2)
            .request_timeout(request_timeout)
            .publish_timeout(window.saturating_mul(2).saturating_add(request_timeout))
            .min_publish_interval(Duration::from_millis(10))
            .channel_lifetime(600_000)
            // A publish response carries up to MAX_NOTIFICATIONS_PER_PUBLISH
            // values: the default decoding limits (1,000 array elements)
            // would turn a busy subscription into BadDecodingError.
            .max_array_length(MAX_NOTIFICATIONS_PER_PUBLISH as usize * 2 + 10_000)
            .max_message_size(64 << 20)
            .max_chunk_count(4096)
            .session_name(format!("plantrelay {}", self.name))
            .client()
            .map_err(|errors| OpcuaSourceError::Client {
                name: self.name.clone(),
                detail: errors.join("; "),
            })?;
        pki::restrict_private_key(&self.pki_dir);
        Ok(client)
    }

    /// Chooses the server endpoint with the configured policy and mode.
    pub(super) fn pick_endpoint(
        &self,
        url: &str,
        endpoints: &[EndpointDescription],
    ) -> Result<EndpointDescription, LinkError> {
        let policy = ua_policy(self.cfg.security_policy);
        let mode = ua_mode(self.cfg.security_mode);
        // Matched on policy and mode only, and then connected at the
        // configured URL: servers behind NAT or a port forward advertise
        // addresses the agent cannot reach.
        let found = endpoints.iter().find(|e| {
            e.security_mode == mode && UaPolicy::from_uri(e.security_policy_uri.as_ref()) == policy
        });
        if let Some(e) = found {
            let mut e = e.clone();
            e.endpoint_url = url.into();
            return Ok(e);
        }
        let offered = endpoints
            .iter()
            .map(|e| {
                format!(
                    "{} {:?}",
                    e.security_policy_uri
                        .as_ref()
                        .rsplit('#')
                        .next()
                        .unwrap_or_default(),
                    e.security_mode
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(LinkError::Failed(format!(
            "the server offers no endpoint with security_policy \"{}\" and security_mode \"{}\" (it offers: {offered})",
            self.cfg.security_policy, self.cfg.security_mode
        )))
    }

    /// Applies `server_cert_sha256`: a pinned certificate is placed in
    /// `trusted/`; any other certificate is refused before a session is
    /// attempted. Without a pin the library's trust list decides.
    pub(super) fn check_server_cert(
        &self,
        client: &Client,
        ep: &EndpointDescription,
    ) -> Result<(), LinkError> {
        if self.cfg.security_policy == SecurityPolicy::None {
            return Ok(());
        }
        let Some(pin) = &self.cfg.server_cert_sha256 else {
            return Ok(());
        };
        let der =
            ep.server_certificate.value.as_deref().ok_or_else(|| {
                LinkError::Failed("the server endpoint has no certificate".into())
            })?;
        let fingerprint = pki::sha256_hex(der);
        if !pki::fingerprint_eq(pin, &fingerprint) {
            let _ = pki::store_rejected(&self.pki_dir, der);
            return Err(LinkError::Failed(format!(
                "server certificate SHA-256 {fingerprint} does not match server_cert_sha256 {pin}; refused"
            )));
        }
        let _ = client;
        pki::store_trusted(&self.pki_dir, der).map_err(|e| {
            LinkError::Failed(format!("cannot store the pinned server certificate: {e}"))
        })?;
        Ok(())
    }
}

/// The X.509 user identity: the certificate as PEM or DER whatever the file
/// is called (async-opcua's own loader goes by the extension and refuses
/// `.crt`), the private key as PEM.
pub(super) fn user_identity_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<IdentityToken, String> {
    let bytes = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let x509 = opcua::crypto::X509::from_pem(&bytes)
        .or_else(|_| opcua::crypto::X509::from_der(&bytes))
        .map_err(|e| {
            format!(
                "{}: not a PEM or DER X.509 certificate: {e:?}",
                cert.display()
            )
        })?;
    let key = opcua::crypto::PrivateKey::read_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key: {e:?}", key.display()))?;
    Ok(IdentityToken::new_x509(x509, key))
}

/// A readable reason for a failed activation, with the trust and identity
/// hints.
pub(super) fn connect_failure(code: StatusCode, pki_dir: &std::path::Path) -> String {
    if matches!(
        code,
        StatusCode::BadIdentityTokenRejected
            | StatusCode::BadIdentityTokenInvalid
            | StatusCode::BadUserAccessDenied
            | StatusCode::BadUserSignatureInvalid
    ) {
        return format!(
            "session activation failed: {code}: the server refused the user identity — check username and password_file, or user_cert and user_key, and the user's rights on the server"
        );
    }
    if code == StatusCode::BadCertificateUntrusted || code == StatusCode::BadSecurityChecksFailed {
        format!(
            "{code}: the server certificate is not trusted; it was stored in {} — check its fingerprint, then run `plantrelay opcua trust` (or move it to trusted/), or pin it with server_cert_sha256",
            pki_dir.join("rejected").display()
        )
    } else {
        format!("session activation failed: {code}")
    }
}

fn ua_policy(p: SecurityPolicy) -> UaPolicy {
    match p {
        SecurityPolicy::None => UaPolicy::None,
        SecurityPolicy::Basic256Sha256 => UaPolicy::Basic256Sha256,
        SecurityPolicy::Aes128Sha256RsaOaep => UaPolicy::Aes128Sha256RsaOaep,
        SecurityPolicy::Aes256Sha256RsaPss => UaPolicy::Aes256Sha256RsaPss,
    }
}

fn ua_mode(m: SecurityMode) -> MessageSecurityMode {
    match m {
        SecurityMode::None => MessageSecurityMode::None,
        SecurityMode::Sign => MessageSecurityMode::Sign,
        SecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    }
}
