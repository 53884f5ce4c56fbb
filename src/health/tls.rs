//! The health listener's TLS: its server configuration from `[health]` and
//! the reload hook behind SIGHUP. Which client certificate a connection
//! presented reaches each request as a [`super::Peer`] extension, made by
//! the server loop ([`crate::serve`]) after the handshake.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tracing::{error, info};

use super::HealthError;
use super::auth::subject;
use crate::config::HealthConfig;
use crate::serve::TlsConfig;
use crate::tls::{self, TlsError};

/// The server configuration for `[health]`. With `client_ca` a client
/// certificate is required in the handshake, except with `open_probes`:
/// then a certificate is verified if presented but may be absent, and the
/// HTTP layer admits certificate-less connections to the probes only.
pub fn server_config(cfg: &HealthConfig) -> Result<rustls::ServerConfig, TlsError> {
    let (Some(ca), true) = (&cfg.client_ca, cfg.open_probes) else {
        return tls::server_config(&cfg.tls_cert, &cfg.tls_key, cfg.client_ca.as_deref());
    };
    let certs = tls::load_certs(&cfg.tls_cert)?;
    let key = tls::load_key(&cfg.tls_key)?;
    let origin = ca.display().to_string();
    let mut roots = RootCertStore::empty();
    for cert in tls::load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            origin: origin.clone(),
            source,
        })?;
    }
    let provider = tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|source| TlsError::ClientVerifier { origin, source })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::CertKey {
            cert: cfg.tls_cert.display().to_string(),
            key: cfg.tls_key.display().to_string(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Re-reads `tls_cert`, `tls_key` and `client_ca` and swaps them in for new
/// handshakes (connections already open keep theirs). Cheap to clone.
#[derive(Clone)]
pub struct TlsReloader {
    rustls: TlsConfig,
    cfg: Arc<HealthConfig>,
    /// Told the expiry of the certificates now in use.
    view: Arc<super::AgentView>,
}

impl TlsReloader {
    pub(crate) fn new(
        rustls: TlsConfig,
        cfg: HealthConfig,
        view: Arc<super::AgentView>,
    ) -> TlsReloader {
        TlsReloader {
            rustls,
            cfg: Arc::new(cfg),
            view,
        }
    }

    /// Reloads the files. On failure the certificates in use stay, and the
    /// error is logged and returned.
    pub fn reload(&self) -> Result<(), HealthError> {
        match server_config(&self.cfg) {
            Ok(config) => {
                self.rustls.reload(Arc::new(config));
                self.view
                    .health_certificates_reloaded(crate::status::certs::health_expiries(&self.cfg));
                let leaf = tls::load_certs(&self.cfg.tls_cert)
                    .ok()
                    .and_then(|c| c.first().and_then(subject));
                info!(
                    cert = %self.cfg.tls_cert.display(),
                    subject = leaf.as_deref().unwrap_or("?"),
                    "health TLS certificates reloaded"
                );
                Ok(())
            }
            Err(e) => {
                error!(
                    cert = %self.cfg.tls_cert.display(),
                    error = %e,
                    "reloading the health TLS certificates failed; the previous ones stay in use"
                );
                Err(HealthError(format!("TLS reload: {e}")))
            }
        }
    }
}
