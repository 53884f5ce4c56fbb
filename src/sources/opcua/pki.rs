//! The certificate folders of an OPC UA source, one per source:
//! `<state_dir>/pki/<source name>/` with
//!
//! - `own/cert.der`: the agent's application instance certificate,
//!   created (RSA 2048, self-signed) on the first run;
//! - `private/private.pem`: its private key (mode 0600);
//! - `trusted/`: server certificates trusted for this source (DER);
//! - `rejected/`: server certificates seen and refused, waiting for plant IT
//!   to check their fingerprint and trust them (`plantrelay opcua trust`).
//!
//! File names are async-opcua's: `<common name> [<SHA-1 thumbprint>].der`;
//! a certificate is trusted by moving its file from `rejected/` to
//! `trusted/` unchanged. This module does file work only; it never decides
//! about trust by itself.

use std::fs;
use std::path::{Path, PathBuf};

use opcua::crypto::{CertificateStore, X509};

/// `<state_dir>/pki/<source>`.
pub fn source_dir(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join("pki").join(source)
}

/// Creates `own/`, `private/`, `trusted/` and `rejected/`.
pub fn ensure_layout(dir: &Path) -> Result<(), String> {
    for sub in ["own", "private", "trusted", "rejected"] {
        let p = dir.join(sub);
        fs::create_dir_all(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir.join("private"), fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// Makes the private key readable by the agent's user only.
pub fn restrict_private_key(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("private").join("private.pem");
        if key.exists() {
            let _ = fs::set_permissions(&key, fs::Permissions::from_mode(0o600));
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Lowercase hex SHA-256 of DER bytes.
pub fn sha256_hex(der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `aa:bb:…` form of a hex fingerprint, as servers display it.
pub fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// A full SHA-256 fingerprint as people copy it from a server's display
/// (`AA:BB:…`, `aa bb …` or plain hex, any case) in the lowercase hex form
/// of [`sha256_hex`]; anything but 64 hex digits is refused, a prefix too:
/// trusting by prefix would trust whatever certificate an attacker ground to
/// match it.
pub fn parse_fingerprint(s: &str) -> Result<String, String> {
    let norm: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if !norm.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "--fingerprint {s:?}: not a hex fingerprint; give the certificate's full SHA-256 (64 hex digits, colons optional)"
        ));
    }
    if norm.len() != 64 {
        return Err(format!(
            "--fingerprint {s:?}: {} hex digits; give the certificate's full SHA-256 (64 hex digits, colons optional): a prefix is not accepted",
            norm.len()
        ));
    }
    Ok(norm)
}

/// `AA:BB:…` (colons optional, any case) equals a lowercase hex fingerprint,
/// whole: a prefix pins nothing, since a certificate made to match a short
/// prefix is cheap.
pub fn fingerprint_eq(configured: &str, hex: &str) -> bool {
    let norm: String = configured
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    !norm.is_empty() && norm == hex
}

fn file_name(der: &[u8]) -> Result<String, String> {
    let cert = X509::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(CertificateStore::cert_file_name(&cert))
}

/// Writes a certificate into `trusted/` (and removes it from `rejected/`).
pub fn store_trusted(dir: &Path, der: &[u8]) -> Result<PathBuf, String> {
    let name = file_name(der)?;
    let path = dir.join("trusted").join(&name);
    fs::write(&path, der).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let _ = fs::remove_file(dir.join("rejected").join(&name));
    Ok(path)
}

/// Writes a certificate into `rejected/`.
pub fn store_rejected(dir: &Path, der: &[u8]) -> Result<PathBuf, String> {
    let name = file_name(der)?;
    let path = dir.join("rejected").join(&name);
    fs::write(&path, der).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// A certificate file in `rejected/` or `trusted/`.
#[derive(Debug, Clone)]
pub struct CertFile {
    pub path: PathBuf,
    /// Lowercase hex SHA-256 of the DER file.
    pub sha256: String,
    /// Subject common name, when readable.
    pub subject: String,
}

/// The certificates in `<dir>/<sub>` (`rejected` or `trusted`), by name.
pub fn list(dir: &Path, sub: &str) -> Result<Vec<CertFile>, String> {
    let folder = dir.join(sub);
    let entries = match fs::read_dir(&folder) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", folder.display())),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let der = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let subject = X509::from_der(&der)
            .ok()
            .and_then(|c| c.common_name().ok())
            .unwrap_or_default();
        out.push(CertFile {
            sha256: sha256_hex(&der),
            subject,
            path,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Moves one rejected certificate to `trusted/`; returns its new path.
pub fn trust(dir: &Path, cert: &CertFile) -> Result<PathBuf, String> {
    let name = cert
        .path
        .file_name()
        .ok_or_else(|| format!("{} has no file name", cert.path.display()))?;
    let to = dir.join("trusted").join(name);
    fs::create_dir_all(dir.join("trusted"))
        .map_err(|e| format!("cannot create {}: {e}", dir.join("trusted").display()))?;
    fs::rename(&cert.path, &to).map_err(|e| {
        format!(
            "cannot move {} to {}: {e}",
            cert.path.display(),
            to.display()
        )
    })?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_without_colons_and_case() {
        let hex = sha256_hex(b"x");
        let colons: String = hex
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert!(fingerprint_eq(&colons, &hex));
        assert!(fingerprint_eq(&hex, &hex));
        assert!(!fingerprint_eq(&sha256_hex(b"y"), &hex));
        assert!(!fingerprint_eq("", &hex));
        assert!(!fingerprint_eq(&hex[..8], &hex), "a prefix is no pin");
        assert!(!fingerprint_eq(&hex[..63], &hex));
    }

    #[test]
    fn trust_takes_a_full_sha256_only() {
        let hex = sha256_hex(b"x");
        assert_eq!(parse_fingerprint(&hex).unwrap(), hex);
        assert_eq!(
            parse_fingerprint(&colon_hex(&hex).to_uppercase()).unwrap(),
            hex
        );
        let spaced = colon_hex(&hex).replace(':', " ");
        assert_eq!(parse_fingerprint(&spaced).unwrap(), hex);
        let e = parse_fingerprint(&hex[..8]).unwrap_err();
        assert!(
            e.contains("8 hex digits") && e.contains("prefix is not accepted"),
            "{e}"
        );
        assert!(parse_fingerprint(&hex[..63]).is_err());
        assert!(parse_fingerprint(&format!("{hex}0")).is_err());
        assert!(parse_fingerprint("zz").unwrap_err().contains("not a hex"));
    }
}
