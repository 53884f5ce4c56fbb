//! The expiry of every certificate file the agent loads, for
//! `plantrelay_certificate_expiry_timestamp_seconds` and the status JSON, so
//! that a certificate is renewed before a listener or an upstream starts
//! refusing handshakes.
//!
//! It reads the files named in the config when the agent loads them: at
//! start, and for the health listener again at each successful SIGHUP
//! reload (what the agent uses, not what has since been written to disk).
//! It never fails: a file it cannot read or parse is left out (start-up has already
//! refused a certificate the agent needs).

use std::path::Path;

use serde::Serialize;

use crate::config::{Config, HealthConfig};

/// One certificate file: for a chain or a CA bundle, the certificate in it
/// that expires first (that is when something stops working).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertificateExpiry {
    /// What it is for: `health`, `health_client_ca`, `ingest`,
    /// `source_client`, `source_ca`, `sink_client`, `sink_ca`, `opcua_user`.
    #[serde(rename = "use")]
    pub usage: &'static str,
    /// The config key that names the file, e.g. `sinks.https[0].client_cert`.
    pub key: String,
    pub path: String,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// The earliest `notAfter` among the certificates in a PEM file.
pub fn earliest_expiry(path: &Path) -> Option<i64> {
    let certs = crate::tls::load_certs(path).ok()?;
    certs
        .iter()
        .filter_map(|c| {
            let (_, parsed) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
            Some(parsed.validity().not_after.timestamp())
        })
        .min()
}

/// The health listener's certificate files (re-read on SIGHUP).
pub fn health_expiries(h: &HealthConfig) -> Vec<CertificateExpiry> {
    let mut files: Vec<(&'static str, String, &Path)> =
        vec![("health", "health.tls_cert".into(), &h.tls_cert)];
    if let Some(p) = &h.client_ca {
        files.push(("health_client_ca", "health.client_ca".into(), p));
    }
    with_expiry(files)
}

/// Whether an entry belongs to the health listener (replaced on reload).
pub fn is_health(c: &CertificateExpiry) -> bool {
    c.key.starts_with("health.")
}

fn with_expiry(files: Vec<(&'static str, String, &Path)>) -> Vec<CertificateExpiry> {
    files
        .into_iter()
        .filter_map(|(usage, key, path)| {
            Some(CertificateExpiry {
                usage,
                key,
                path: path.display().to_string(),
                not_after: earliest_expiry(path)?,
            })
        })
        .collect()
}

/// Every certificate file in `config`, with its expiry.
pub fn expiries(config: &Config) -> Vec<CertificateExpiry> {
    let mut out = config
        .health
        .as_ref()
        .map(health_expiries)
        .unwrap_or_default();
    let mut files: Vec<(&'static str, String, &Path)> = Vec::new();
    for (i, s) in config.sources.http.iter().enumerate() {
        if let Some(p) = &s.tls_cert {
            files.push(("ingest", format!("sources.http[{i}].tls_cert"), p));
        }
    }
    for (i, s) in config.sources.mqtt.iter().enumerate() {
        if let Some(p) = &s.client_cert {
            files.push(("source_client", format!("sources.mqtt[{i}].client_cert"), p));
        }
        if let Some(p) = &s.ca_file {
            files.push(("source_ca", format!("sources.mqtt[{i}].ca_file"), p));
        }
    }
    for (i, s) in config.sources.opcua.iter().enumerate() {
        if let Some(p) = &s.user_cert {
            files.push(("opcua_user", format!("sources.opcua[{i}].user_cert"), p));
        }
    }
    let sinks = config
        .sinks
        .https
        .iter()
        .enumerate()
        .map(|(i, s)| ("https", i, &s.client_cert, &s.ca_file))
        .chain(
            config
                .sinks
                .mqtt
                .iter()
                .enumerate()
                .map(|(i, s)| ("mqtt", i, &s.client_cert, &s.ca_file)),
        )
        .chain(
            config
                .sinks
                .jetstream
                .iter()
                .enumerate()
                .map(|(i, s)| ("jetstream", i, &s.client_cert, &s.ca_file)),
        );
    for (kind, i, cert, ca) in sinks {
        if let Some(p) = cert {
            files.push(("sink_client", format!("sinks.{kind}[{i}].client_cert"), p));
        }
        if let Some(p) = ca {
            files.push(("sink_ca", format!("sinks.{kind}[{i}].ca_file"), p));
        }
    }
    out.extend(with_expiry(files));
    out
}

#[cfg(all(test, feature = "demo"))]
mod tests {
    use super::*;
    use crate::demo::receiver::EphemeralPki;

    #[test]
    fn a_bundle_reports_the_certificate_that_expires_first_and_a_bad_file_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pki = EphemeralPki::generate().unwrap();
        let paths = pki.write_to(dir.path()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let leaf = earliest_expiry(&paths.server_cert).unwrap();
        assert!(leaf > now, "{leaf} <= {now}");
        let bundle = dir.path().join("bundle.pem");
        let mut both = std::fs::read(&paths.ca).unwrap();
        both.extend(std::fs::read(&paths.server_cert).unwrap());
        std::fs::write(&bundle, both).unwrap();
        let ca = earliest_expiry(&paths.ca).unwrap();
        assert_eq!(earliest_expiry(&bundle), Some(ca.min(leaf)));
        assert_eq!(earliest_expiry(&paths.server_key), None);
        assert_eq!(earliest_expiry(&dir.path().join("missing.pem")), None);
    }
}
