//! The receiver's throwaway PKI: a CA, a server certificate for
//! `localhost`/`127.0.0.1` and a client certificate, generated at run time
//! and written to files for the agent under test. It must never be used
//! outside the demo, the tests and the benchmarks, and never let a key
//! reach a log.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::tls::ClientTls;

/// Why generating or writing the ephemeral PKI failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating the demo {what} failed: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A throwaway PKI generated at run time (ECDSA P-256): a CA, a server
/// certificate for `localhost` and `127.0.0.1`, and a client certificate,
/// both signed by the CA. For the demo and tests only.
#[derive(Clone)]
pub struct EphemeralPki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl fmt::Debug for EphemeralPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys stay out of logs, even throwaway ones.
        f.debug_struct("EphemeralPki").finish_non_exhaustive()
    }
}

/// Where [`EphemeralPki::write_to`] put each file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl PkiPaths {
    /// Client TLS settings that trust only this CA, optionally presenting the
    /// client certificate.
    pub fn client_tls(&self, with_client_cert: bool) -> ClientTls {
        ClientTls {
            ca_file: Some(self.ca.clone()),
            ca_only: true,
            client_cert: with_client_cert.then(|| self.client_cert.clone()),
            client_key: with_client_cert.then(|| self.client_key.clone()),
        }
    }
}

impl EphemeralPki {
    /// Generates the CA and both leaf certificates.
    pub fn generate() -> Result<Self, PkiError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let gen_err = |what| move |source| PkiError::Generate { what, source };

        let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "plantrelay demo CA (throwaway)");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(gen_err("CA"))?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().map_err(gen_err("server key"))?;
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .map_err(gen_err("server certificate"))?;
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.use_authority_key_identifier_extension = true;
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(gen_err("server certificate"))?;

        let client_key = KeyPair::generate().map_err(gen_err("client key"))?;
        let mut client =
            CertificateParams::new(Vec::<String>::new()).map_err(gen_err("client certificate"))?;
        client
            .distinguished_name
            .push(DnType::CommonName, "plantrelay demo agent");
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client.use_authority_key_identifier_extension = true;
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .map_err(gen_err("client certificate"))?;

        Ok(EphemeralPki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert_pem
    }
    pub fn client_key_pem(&self) -> &str {
        &self.client_key_pem
    }

    /// Writes `ca.crt`, `server.crt`, `server.key`, `client.crt` and
    /// `client.key` into `dir` (which must exist); keys are mode 0600 on Unix.
    pub fn write_to(&self, dir: &Path) -> Result<PkiPaths, PkiError> {
        let paths = PkiPaths {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        };
        write_file(&paths.ca, &self.ca_pem, false)?;
        write_file(&paths.server_cert, &self.server_cert_pem, false)?;
        write_file(&paths.server_key, &self.server_key_pem, true)?;
        write_file(&paths.client_cert, &self.client_cert_pem, false)?;
        write_file(&paths.client_key, &self.client_key_pem, true)?;
        Ok(paths)
    }
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = opts.open(path).map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    #[test]
    fn pki_files_are_written_with_private_keys_protected() {
        let pki = EphemeralPki::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = pki.write_to(dir.path()).unwrap();
        assert_eq!(tls::load_certs(&paths.ca).unwrap().len(), 1);
        assert_eq!(tls::load_certs(&paths.client_cert).unwrap().len(), 1);
        tls::load_key(&paths.client_key).unwrap();
        tls::server_config(&paths.server_cert, &paths.server_key, Some(&paths.ca)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&paths.server_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        assert!(!format!("{pki:?}").contains("PRIVATE KEY"));
    }
}
