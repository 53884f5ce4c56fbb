//! MQTT on the wire, shared by the MQTT source and the MQTT sink: one
//! connection on rumqttc's packet codec ([`link`]). It knows packets and
//! sockets; it never decides what to publish, ack or retry.

pub(crate) mod link;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use url::Url;

use crate::tls::{self, ClientTls};

/// Host, port and whether TLS is wanted, from an `mqtt://` or `mqtts://`
/// URL (default ports 1883 and 8883); `None` without a host.
pub(crate) fn endpoint(url: &Url) -> Option<(String, u16, bool)> {
    let tls = url.scheme() == "mqtts";
    let host = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .filter(|h| !h.is_empty())?;
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    Some((host, port, tls))
}

/// The CONNECT login: a user name with the password read from its file
/// (an empty password without one).
pub(crate) fn login(
    username: Option<&String>,
    password_file: Option<&PathBuf>,
) -> std::io::Result<Option<(String, String)>> {
    Ok(match (username, password_file) {
        (Some(user), Some(path)) => Some((user.clone(), crate::config::read_secret(path)?)),
        (Some(user), None) => Some((user.clone(), String::new())),
        (None, _) => None,
    })
}

/// The client TLS of an `mqtts://` connection: with `ca_file`, only that
/// CA is trusted; else the system's.
pub(crate) fn client_tls(
    ca_file: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, tls::TlsError> {
    let client = ClientTls {
        ca_only: ca_file.is_some(),
        ca_file: ca_file.map(Path::to_path_buf),
        client_cert: client_cert.map(Path::to_path_buf),
        client_key: client_key.map(Path::to_path_buf),
    };
    tls::client_config(&client).map(Arc::new)
}
