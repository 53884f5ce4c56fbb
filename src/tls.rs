//! rustls set-up shared by every listener (health server, HTTP ingest, the
//! demo receiver) and every client (HTTPS sink, `plantrelay status`, MQTT and
//! NATS over TLS).
//!
//! This module owns three things: reading PEM certificates and keys with
//! errors a plant IT engineer can act on (which file, what is wrong with it),
//! building `rustls` server and client configurations, and handing a client
//! configuration to `reqwest`.
//!
//! It must never let a second crypto provider in: every configuration is
//! built with ring passed explicitly (`builder_with_provider`), so nothing here
//! depends on, or panics for lack of, a process-wide default provider
//! ("Could not automatically determine the process-level CryptoProvider").
//! [`install_crypto_provider`] still installs ring as that default at
//! start-up for libraries that build their own configurations. It must never
//! weaken verification either: there is no "accept any certificate" switch
//! here, and a configured client CA always *requires* a valid client
//! certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// ALPN protocol the servers built here offer: every listener of the agent
/// speaks HTTP/1.1.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a TLS set-up failed. Every message names the file (or in-memory
/// origin) and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read at all.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{what} {origin} is not valid PEM: {detail}")]
    Pem {
        what: &'static str,
        origin: String,
        detail: String,
    },
    /// The file parsed but holds no `CERTIFICATE` block.
    #[error(
        "no certificate found in {origin} (expected a \"-----BEGIN CERTIFICATE-----\" block){hint}"
    )]
    NoCertificate { origin: String, hint: &'static str },
    /// The file parsed but holds no usable private key.
    #[error("no private key (PKCS#8, PKCS#1 or SEC1) in {origin}{hint}")]
    NoPrivateKey { origin: String, hint: &'static str },
    /// A CA file holds a certificate that cannot serve as a trust anchor.
    #[error("CA certificate in {origin} cannot be used as a trust anchor: {source}")]
    BadCa {
        origin: String,
        #[source]
        source: rustls::Error,
    },
    /// The client CA could not be turned into a client-certificate verifier.
    #[error("client CA {origin} cannot be used to verify client certificates: {source}")]
    ClientVerifier {
        origin: String,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// Certificate and key were read but rustls refused them together
    /// (mismatched pair, unsupported key type, ...).
    #[error("certificate {cert} and private key {key} cannot be used together: {source}")]
    CertKey {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    /// Only one half of a client certificate was configured.
    #[error(
        "client certificate authentication needs both client_cert and client_key; only {given} is set"
    )]
    IncompleteClientAuth { given: &'static str },
    /// `ca_only` without a `ca_file`: nothing would be trusted.
    #[error("ca_only is set but no ca_file is given: no server certificate could ever be trusted")]
    NoTrustAnchors,
    /// The protocol versions could not be set up with the ring provider.
    #[error("TLS protocol set-up failed: {0}")]
    Protocol(#[source] rustls::Error),
}

/// Client-side trust and identity, as configured for a sink or for
/// `plantrelay status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Extra trust anchors (PEM, one or more `CERTIFICATE` blocks).
    pub ca_file: Option<PathBuf>,
    /// Trust only `ca_file`, not the system trust store.
    pub ca_only: bool,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// The crypto provider of the whole process: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default crypto provider. Idempotent: if
/// a provider is already installed (by an earlier call, or by a library), it
/// is kept and nothing happens.
pub fn install_crypto_provider() {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::trace!("a process-wide rustls crypto provider was already installed");
    }
}

/// Reads every certificate from a PEM file, in file order (leaf first for a
/// chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file("certificate file", path)?;
    certs_from_pem(&bytes, &path.display().to_string())
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file("private key file", path)?;
    key_from_pem(&bytes, &path.display().to_string())
}

/// Parses every certificate from in-memory PEM; `origin` names it in errors.
pub fn certs_from_pem(
    pem_bytes: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = sections("certificate file", pem_bytes, origin)?;
    let has_key = sections.iter().any(|s| is_key(s.kind));
    let certs: Vec<CertificateDer<'static>> = sections
        .into_iter()
        .filter(|s| s.kind == SectionKind::Certificate)
        .map(|s| CertificateDer::from(s.der))
        .collect();
    if certs.is_empty() {
        let hint = if has_key {
            " (it holds a private key: are the certificate and key paths swapped?)"
        } else {
            ""
        };
        return Err(TlsError::NoCertificate {
            origin: origin.to_owned(),
            hint,
        });
    }
    Ok(certs)
}

/// Parses the first private key from in-memory PEM; `origin` names it in
/// errors.
pub fn key_from_pem(pem_bytes: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let sections = sections("private key file", pem_bytes, origin)?;
    let has_cert = sections.iter().any(|s| s.kind == SectionKind::Certificate);
    for s in sections {
        let key = match s.kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(s.der.into()),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(s.der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(s.der.into()),
            _ => continue,
        };
        return Ok(key);
    }
    let hint = if contains(pem_bytes, b"ENCRYPTED PRIVATE KEY") {
        " (the key is encrypted: store it unencrypted with restrictive file permissions, e.g. `openssl pkey -in key.pem -out key-plain.pem`)"
    } else if has_cert {
        " (it holds a certificate: are the certificate and key paths swapped?)"
    } else {
        ""
    };
    Err(TlsError::NoPrivateKey {
        origin: origin.to_owned(),
        hint,
    })
}

/// A server configuration from PEM files: ring, TLS 1.2 and 1.3, ALPN
/// `http/1.1`. With `client_ca`, every client must present a certificate
/// that chains to it; connections without one fail the handshake.
pub fn server_config(
    cert_pem: &Path,
    key_pem: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(cert_pem)?;
    let key = load_key(key_pem)?;
    let client_roots = match client_ca {
        Some(path) => {
            let certs = load_certs(path)?;
            Some((
                roots_from(certs, &path.display().to_string())?,
                path.display().to_string(),
            ))
        }
        None => None,
    };
    build_server_config(
        certs,
        key,
        client_roots,
        &cert_pem.display().to_string(),
        &key_pem.display().to_string(),
    )
}

/// [`server_config`] from in-memory PEM (the demo and tests generate their
/// certificates at run time).
pub fn server_config_from_pem(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Result<rustls::ServerConfig, TlsError> {
    const CERT: &str = "<in-memory server certificate>";
    const KEY: &str = "<in-memory server key>";
    const CA: &str = "<in-memory client CA>";
    let certs = certs_from_pem(cert_pem.as_bytes(), CERT)?;
    let key = key_from_pem(key_pem.as_bytes(), KEY)?;
    let client_roots = match client_ca_pem {
        Some(pem) => Some((
            roots_from(certs_from_pem(pem.as_bytes(), CA)?, CA)?,
            CA.to_owned(),
        )),
        None => None,
    };
    build_server_config(certs, key, client_roots, CERT, KEY)
}

/// A client configuration: trust the system store (unless `ca_only`) plus
/// `ca_file`; present `client_cert`/`client_key` when both are set. No ALPN
/// is set here (MQTT and NATS do not want `h2`); see
/// [`reqwest_client_builder`].
pub fn client_config(tls: &ClientTls) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    if !tls.ca_only {
        add_system_roots(&mut roots);
    }
    match &tls.ca_file {
        Some(path) => {
            let origin = path.display().to_string();
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    origin: origin.clone(),
                    source,
                })?;
            }
        }
        None if tls.ca_only => return Err(TlsError::NoTrustAnchors),
        None => {}
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Protocol)?
        .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let certs = load_certs(cert)?;
            let private_key = load_key(key)?;
            builder
                .with_client_auth_cert(certs, private_key)
                .map_err(|source| TlsError::CertKey {
                    cert: cert.display().to_string(),
                    key: key.display().to_string(),
                    source,
                })
        }
        (Some(_), None) => Err(TlsError::IncompleteClientAuth {
            given: "client_cert",
        }),
        (None, Some(_)) => Err(TlsError::IncompleteClientAuth {
            given: "client_key",
        }),
    }
}

/// The system's trust store (`/etc/ssl/certs` and friends, where plant IT
/// installs the enterprise CA); the bundled Mozilla roots (webpki-roots)
/// when the system has none. Certificates the store holds but rustls cannot
/// parse are skipped.
fn add_system_roots(roots: &mut RootCertStore) {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "while loading the system trust store");
    }
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            "no usable certificates in the system trust store; trusting the bundled Mozilla roots instead"
        );
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
}

/// A `reqwest` client builder that uses `cfg` (and so ring, and exactly the
/// trust configured) for every HTTPS connection. If `cfg` sets no ALPN
/// protocols, `http/1.1` is offered (the client speaks nothing else).
/// Callers add timeouts, pool settings and headers before `build()`.
pub fn reqwest_client_builder(mut cfg: rustls::ClientConfig) -> reqwest::ClientBuilder {
    if cfg.alpn_protocols.is_empty() {
        cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    }
    reqwest::Client::builder().tls_backend_preconfigured(cfg)
}

fn build_server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<(RootCertStore, String)>,
    cert_origin: &str,
    key_origin: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Protocol)?;
    let builder = match client_roots {
        Some((roots, origin)) => {
            // `build()` without `allow_unauthenticated()`: a client
            // certificate is required, not merely requested.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientVerifier { origin, source })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::CertKey {
            cert: cert_origin.to_owned(),
            key: key_origin.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(config)
}

fn roots_from(
    certs: Vec<CertificateDer<'static>>,
    origin: &str,
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            origin: origin.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// One recognised PEM section, whatever its kind.
struct Section {
    kind: SectionKind,
    der: Vec<u8>,
}

impl PemObject for Section {
    fn from_pem(kind: SectionKind, der: Vec<u8>) -> Option<Self> {
        Some(Section { kind, der })
    }
}

fn sections(what: &'static str, bytes: &[u8], origin: &str) -> Result<Vec<Section>, TlsError> {
    Section::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| TlsError::Pem {
            what,
            origin: origin.to_owned(),
            detail: e.to_string(),
        })
}

fn is_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    struct Pki {
        dir: tempfile::TempDir,
        ca: PathBuf,
        server_cert: PathBuf,
        server_key: PathBuf,
        client_cert: PathBuf,
        client_key: PathBuf,
        other_key: PathBuf,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tls.rs test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = p.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "client");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = p.signed_by(&client_key, &issuer).unwrap();
        let other_key = KeyPair::generate().unwrap();

        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Pki {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            other_key: write("other.key", other_key.serialize_pem()),
            dir,
        }
    }

    /// One blocking TLS handshake + echo of a few bytes between a server and a
    /// client built here; returns the client's error, if any.
    fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> Result<(), String> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(server);
        let t = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(server).unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut buf = [0u8; 4];
            match tls.read_exact(&mut buf) {
                Ok(()) => {
                    let _ = tls.write_all(&buf);
                    let _ = tls.flush();
                }
                Err(_) => {
                    // Flush the alert so that the client sees why.
                    let _ = conn.complete_io(&mut tcp);
                }
            }
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut tcp = TcpStream::connect(addr).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        let result = (|| {
            tls.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            if &buf != b"ping" {
                return Err(format!("echo mismatch: {buf:?}"));
            }
            Ok(())
        })();
        drop(tcp);
        t.join().unwrap();
        result
    }

    #[test]
    fn install_crypto_provider_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }

    #[test]
    fn loads_certs_and_keys_from_pem_files() {
        let p = pki();
        assert_eq!(load_certs(&p.server_cert).unwrap().len(), 1);
        assert!(matches!(
            load_key(&p.server_key).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
        // A bundle with two certificates yields both, in order.
        let bundle = p.dir.path().join("bundle.pem");
        let text = std::fs::read_to_string(&p.server_cert).unwrap()
            + &std::fs::read_to_string(&p.ca).unwrap();
        std::fs::write(&bundle, text).unwrap();
        let certs = load_certs(&bundle).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[1], load_certs(&p.ca).unwrap()[0]);
    }

    #[test]
    fn errors_name_the_path_and_the_problem() {
        let p = pki();
        let missing = p.dir.path().join("nope.pem");
        let e = load_certs(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.pem") && e.contains("cannot read"), "{e}");

        let e = load_certs(&p.server_key).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "no certificate found in {}",
                p.server_key.display()
            )) && e.contains("swapped"),
            "{e}"
        );
        let e = load_key(&p.server_cert).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "no private key (PKCS#8, PKCS#1 or SEC1) in {}",
                p.server_cert.display()
            )) && e.contains("swapped"),
            "{e}"
        );

        let empty = p.dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = load_certs(&empty).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "no certificate found in {} (expected a \"-----BEGIN CERTIFICATE-----\" block)",
                empty.display()
            )
        );

        let broken = p.dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let e = load_certs(&broken).unwrap_err().to_string();
        assert!(
            e.contains("broken.pem") && e.contains("not valid PEM"),
            "{e}"
        );

        let enc = p.dir.path().join("enc.key");
        std::fs::write(
            &enc,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load_key(&enc).unwrap_err().to_string();
        assert!(e.contains("enc.key") && e.contains("encrypted"), "{e}");
    }

    #[test]
    fn server_config_offers_http11_and_rejects_mismatched_key() {
        let p = pki();
        let cfg = server_config(&p.server_cert, &p.server_key, None).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let e = server_config(&p.server_cert, &p.other_key, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.pem")
                && e.contains("other.key")
                && e.contains("cannot be used together"),
            "{e}"
        );
    }

    #[test]
    fn client_config_checks_its_inputs() {
        let p = pki();
        let e = client_config(&ClientTls {
            ca_only: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::NoTrustAnchors));
        let e = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            client_cert: Some(p.client_cert.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("only client_cert is set"), "{e}");
        // No ALPN on the generic client config (MQTT/NATS must not offer h2).
        let cfg = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(cfg.alpn_protocols.is_empty());
    }

    #[test]
    fn handshake_with_ca_only_trust() {
        let p = pki();
        let server = server_config(&p.server_cert, &p.server_key, None).unwrap();
        let client = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            ca_only: true,
            ..Default::default()
        })
        .unwrap();
        handshake(server, client).unwrap();
    }

    #[test]
    fn handshake_fails_when_the_server_is_not_trusted() {
        let p = pki();
        let server = server_config(&p.server_cert, &p.server_key, None).unwrap();
        // webpki-roots only: our private CA is unknown.
        let client = client_config(&ClientTls::default()).unwrap();
        let e = handshake(server, client).unwrap_err();
        assert!(
            e.contains("UnknownIssuer") || e.contains("certificate"),
            "{e}"
        );
    }

    #[test]
    fn mutual_tls_requires_a_client_certificate() {
        let p = pki();
        let server = || server_config(&p.server_cert, &p.server_key, Some(&p.ca)).unwrap();
        let anonymous = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            ca_only: true,
            ..Default::default()
        })
        .unwrap();
        let e = handshake(server(), anonymous).unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");

        let with_cert = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            ca_only: true,
            client_cert: Some(p.client_cert.clone()),
            client_key: Some(p.client_key.clone()),
        })
        .unwrap();
        handshake(server(), with_cert).unwrap();
    }

    #[test]
    fn in_memory_server_config_matches_the_file_one() {
        let p = pki();
        let read = |path: &Path| std::fs::read_to_string(path).unwrap();
        let server = server_config_from_pem(
            &read(&p.server_cert),
            &read(&p.server_key),
            Some(&read(&p.ca)),
        )
        .unwrap();
        let client = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            ca_only: true,
            client_cert: Some(p.client_cert.clone()),
            client_key: Some(p.client_key.clone()),
        })
        .unwrap();
        handshake(server, client).unwrap();
        let e = server_config_from_pem("", &read(&p.server_key), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("<in-memory server certificate>"), "{e}");
    }

    #[test]
    fn reqwest_builder_accepts_the_preconfigured_rustls_config() {
        let p = pki();
        let cfg = client_config(&ClientTls {
            ca_file: Some(p.ca.clone()),
            ca_only: true,
            ..Default::default()
        })
        .unwrap();
        reqwest_client_builder(cfg).build().unwrap();
    }
}
