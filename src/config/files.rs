//! The paths a config names: resolving relative ones against the config
//! file's directory, checking (in [`Config::load`] only) that each named file
//! can be opened, and [`read_secret`], the one place that reads a secret's
//! contents.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::Config;
use super::locate::RawIssue;

/// Reads a secret (token, password) from a file: trailing whitespace and
/// newlines are trimmed; an empty or multi-line secret is refused. Errors name
/// the path; the secret itself never appears in them.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read secret file {}: {e}", path.display()),
        )
    })?;
    let secret = text.trim_end();
    if secret.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("secret file {} is empty", path.display()),
        ));
    }
    if secret.contains(['\n', '\r']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("secret file {} has more than one line", path.display()),
        ));
    }
    Ok(secret.to_owned())
}

/// Reads a credentials file of several lines (a NATS `.creds` file: a JWT
/// and an NKey seed in armored blocks), at most 64 KiB. Errors name the
/// path; the content never appears in them.
pub fn read_credentials(path: &Path) -> io::Result<String> {
    const MAX: u64 = 64 * 1024;
    let too_big = fs::metadata(path).is_ok_and(|m| m.len() > MAX);
    if too_big {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "credentials file {} is larger than 64 KiB: not a credentials file",
                path.display()
            ),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read credentials file {}: {e}", path.display()),
        )
    })?;
    if text.trim().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("credentials file {} is empty", path.display()),
        ));
    }
    Ok(text)
}

/// How a path is checked when the config is loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PathKind {
    /// A file the agent reads (certificate, key, secret): must open.
    File,
    /// The state directory: if it exists it must be a directory.
    StateDir,
    /// A JSON Schema: must open and compile.
    Schema,
}

/// Calls `f` with the key path, kind and value of every path in the config.
fn for_each_path(config: &mut Config, f: &mut dyn FnMut(&str, PathKind, &mut PathBuf)) {
    use PathKind::File as F;
    fn opt(f: &mut dyn FnMut(&str, PathKind, &mut PathBuf), key: String, p: &mut Option<PathBuf>) {
        if let Some(p) = p {
            f(&key, PathKind::File, p);
        }
    }

    f(
        "agent.state_dir",
        PathKind::StateDir,
        &mut config.agent.state_dir,
    );
    if let Some(h) = &mut config.health {
        f("health.tls_cert", F, &mut h.tls_cert);
        f("health.tls_key", F, &mut h.tls_key);
        opt(f, "health.client_ca".into(), &mut h.client_ca);
        opt(f, "health.token_file".into(), &mut h.token_file);
        opt(f, "health.admin_token_file".into(), &mut h.admin_token_file);
    }
    for (i, s) in config.schemas.iter_mut().enumerate() {
        f(&format!("schemas[{i}].file"), PathKind::Schema, &mut s.file);
    }
    for (i, s) in config.sources.http.iter_mut().enumerate() {
        let p = format!("sources.http[{i}]");
        opt(f, format!("{p}.token_file"), &mut s.token_file);
        opt(f, format!("{p}.tls_cert"), &mut s.tls_cert);
        opt(f, format!("{p}.tls_key"), &mut s.tls_key);
    }
    for (i, s) in config.sources.mqtt.iter_mut().enumerate() {
        let p = format!("sources.mqtt[{i}]");
        opt(f, format!("{p}.password_file"), &mut s.password_file);
        opt(f, format!("{p}.ca_file"), &mut s.ca_file);
        opt(f, format!("{p}.client_cert"), &mut s.client_cert);
        opt(f, format!("{p}.client_key"), &mut s.client_key);
    }
    for (i, s) in config.sources.opcua.iter_mut().enumerate() {
        let p = format!("sources.opcua[{i}]");
        opt(f, format!("{p}.password_file"), &mut s.password_file);
        opt(f, format!("{p}.user_cert"), &mut s.user_cert);
        opt(f, format!("{p}.user_key"), &mut s.user_key);
    }
    for (i, s) in config.sinks.https.iter_mut().enumerate() {
        let p = format!("sinks.https[{i}]");
        opt(f, format!("{p}.ca_file"), &mut s.ca_file);
        opt(f, format!("{p}.client_cert"), &mut s.client_cert);
        opt(f, format!("{p}.client_key"), &mut s.client_key);
        opt(f, format!("{p}.token_file"), &mut s.token_file);
        if let Some(o) = &mut s.oauth2 {
            f(
                &format!("{p}.oauth2.client_secret_file"),
                F,
                &mut o.client_secret_file,
            );
        }
    }
    for (i, s) in config.sinks.mqtt.iter_mut().enumerate() {
        let p = format!("sinks.mqtt[{i}]");
        opt(f, format!("{p}.password_file"), &mut s.password_file);
        opt(f, format!("{p}.ca_file"), &mut s.ca_file);
        opt(f, format!("{p}.client_cert"), &mut s.client_cert);
        opt(f, format!("{p}.client_key"), &mut s.client_key);
    }
    for (i, s) in config.sinks.jetstream.iter_mut().enumerate() {
        let p = format!("sinks.jetstream[{i}]");
        opt(f, format!("{p}.token_file"), &mut s.token_file);
        opt(f, format!("{p}.credentials_file"), &mut s.credentials_file);
        opt(f, format!("{p}.ca_file"), &mut s.ca_file);
        opt(f, format!("{p}.client_cert"), &mut s.client_cert);
        opt(f, format!("{p}.client_key"), &mut s.client_key);
    }
}

/// Rejects empty paths and makes relative ones relative to `base` (the
/// config file's directory), when there is one.
pub(crate) fn resolve_paths(config: &mut Config, base: Option<&Path>, out: &mut Vec<RawIssue>) {
    for_each_path(config, &mut |key_path, _, path| {
        if path.as_os_str().is_empty() {
            out.push(RawIssue::new(key_path, "path must not be empty"));
        } else if let Some(base) = base
            && path.is_relative()
        {
            *path = base.join(&*path);
        }
    });
}

/// Checks that every named file opens and that the state directory, if it
/// exists, is a directory. Nothing is created or read beyond opening.
pub(crate) fn check_files(config: &mut Config, out: &mut Vec<RawIssue>) {
    for_each_path(config, &mut |key_path, kind, path| {
        if path.as_os_str().is_empty() {
            return; // Already reported by resolve_paths.
        }
        let problem = match kind {
            PathKind::File => match File::open(&*path).and_then(|f| f.metadata()) {
                Ok(meta) if meta.is_dir() => Some(format!(
                    "{} is a directory, expected a file",
                    path.display()
                )),
                Ok(_) => None,
                Err(e) => Some(format!("cannot open {}: {e}", path.display())),
            },
            // Compiled here, so check-config reports a broken schema with
            // its file and the pointer of the fault, not the agent's start.
            PathKind::Schema => crate::schema::Schema::load(path)
                .err()
                .map(|e| e.to_string()),
            PathKind::StateDir => match fs::metadata(&*path) {
                Ok(meta) if !meta.is_dir() => {
                    Some(format!("{} exists but is not a directory", path.display()))
                }
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => Some(format!("cannot access {}: {e}", path.display())),
            },
        };
        if let Some(message) = problem {
            out.push(RawIssue::new(key_path, message));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_secret_trims_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_secret(&path).unwrap(), "s3cret");
    }

    #[test]
    fn read_secret_refuses_an_empty_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, " \n").unwrap();
        let err = read_secret(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn read_secret_refuses_a_multi_line_file_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "first\nsecond\n").unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(err.contains("more than one line"), "{err}");
        assert!(!err.contains("first"), "{err}");
    }

    #[test]
    fn read_secret_names_a_missing_file() {
        let err = read_secret(Path::new("/nonexistent/plantrelay/token")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/plantrelay/token"),
            "{err}"
        );
    }
}
