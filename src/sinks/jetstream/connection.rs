//! The NATS connection of one sink: credentials (token or `.creds` file),
//! TLS, and a connection that is opened once and never re-established by
//! async-nats (see [`JetStreamSink::open`]): a broken one is dropped and the
//! next send opens a new one. It must never resend what a dead connection
//! still held, nor install a crypto provider of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{AuthError, ConnectOptions, Event};
use tracing::{debug, info, warn};

use super::JetStreamSink;
use crate::warn_limit::WarnLimiter;

/// Credentials sent at connect.
#[derive(Clone)]
pub(super) enum Auth {
    None,
    Token(String),
    /// A `.creds` file: the user JWT and the seed of its NKey (`SU…`).
    Creds {
        jwt: String,
        seed: String,
    },
}

impl Auth {
    /// What the CONNECT carries for the server's `nonce`.
    pub(super) fn connect(&self, nonce: &[u8]) -> Result<async_nats::Auth, AuthError> {
        let mut auth = async_nats::Auth::new();
        match self {
            Auth::None => {}
            Auth::Token(t) => auth.token = Some(t.clone()),
            Auth::Creds { jwt, seed } => {
                let key = nkeys::KeyPair::from_seed(seed)
                    .map_err(|e| AuthError::new(format!("NKey seed: {e}")))?;
                let signature = key
                    .sign(nonce)
                    .map_err(|e| AuthError::new(format!("signing the server's nonce: {e}")))?;
                auth.jwt = Some(jwt.clone());
                auth.signature = Some(signature);
            }
        }
        Ok(auth)
    }
}

/// The user JWT and NKey seed of a `.creds` file (the blocks after
/// `-----BEGIN NATS USER JWT-----` and `-----BEGIN USER NKEY SEED-----`);
/// the seed is checked (prefix, checksum) by the `nkeys` crate.
pub(super) fn parse_creds(text: &str) -> Result<(String, String), String> {
    let after = |marker: &str| {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| l.contains(marker))?;
        lines.find(|l| !l.is_empty()).map(str::to_string)
    };
    let jwt = after("BEGIN NATS USER JWT").ok_or("no user JWT block")?;
    let seed = after("BEGIN USER NKEY SEED").ok_or("no user NKey seed block")?;
    nkeys::KeyPair::from_seed(&seed).map_err(|e| format!("the NKey seed is not valid: {e}"))?;
    Ok((jwt, seed))
}

/// One connection, never re-established: see [`JetStreamSink::open`].
#[derive(Clone)]
pub(super) struct Upstream {
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
}

impl JetStreamSink {
    /// Opens a connection to the first server that answers.
    ///
    /// The connection is never re-established by async-nats: publishes it
    /// still holds unsent when it breaks would go out on the next
    /// connection *after* a hole (what was in its write buffer is lost),
    /// so a later event could be stored before an earlier one that is then
    /// resent. Its authentication callback therefore refuses every
    /// connection after the first, async-nats gives up (`max_reconnects`)
    /// and drops what it held, and the next send opens a new connection.
    async fn open(&self) -> Result<Upstream, String> {
        let sink = self.name.clone();
        let warnings = Arc::new(WarnLimiter::default());
        let auth = self.auth.clone();
        let first = Arc::new(AtomicBool::new(true));
        let gate = first.clone();
        let mut opts = ConnectOptions::with_auth_callback(move |nonce| {
            let auth = auth.clone();
            let open = gate.load(Ordering::SeqCst);
            async move {
                if !open {
                    return Err(AuthError::new(
                        "plantrelay opens a new connection instead of reconnecting",
                    ));
                }
                auth.connect(&nonce)
            }
        })
        .name(format!("plantrelay {} {}", self.agent_id, self.name))
        .connection_timeout(self.timeout)
        .request_timeout(Some(self.timeout))
        // Subjects are made valid by the template.
        .skip_subject_validation(true)
        // One attempt per server at the first connect; afterwards every
        // attempt is refused at once (see above).
        .max_reconnects(Some(self.servers.len().max(1)))
        .reconnect_delay_callback(|_| Duration::ZERO)
        .event_callback(move |event| {
            let (sink, warnings) = (sink.clone(), warnings.clone());
            async move { log_event(&sink, &warnings, event) }
        });
        if let Some(tls) = &self.tls {
            opts = opts.require_tls(true).tls_client_config(tls.clone());
        }
        // Each server gets the connection timeout; the whole attempt is
        // bounded as well.
        let servers = u32::try_from(self.servers.len()).unwrap_or(u32::MAX);
        let bound = self.timeout.saturating_mul(servers.saturating_add(1));
        let client = match tokio::time::timeout(bound, opts.connect(self.servers.as_slice())).await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot connect to the NATS server ({}): {}",
                    self.shown,
                    describe(&e)
                ));
            }
            Err(_) => {
                return Err(format!(
                    "cannot connect to the NATS server ({}): no answer within {}",
                    self.shown,
                    humantime::format_duration(bound)
                ));
            }
        };
        first.store(false, Ordering::SeqCst);
        let js = jetstream::ContextBuilder::new()
            .timeout(self.timeout)
            .ack_timeout(self.timeout)
            // A whole batch is published before any acknowledgement is
            // awaited: it must never wait for a permit.
            .max_ack_inflight(self.inflight)
            .build(client.clone());
        let up = Upstream { client, js };
        self.set_current(Some(up.clone()));
        Ok(up)
    }

    /// The connection if it is up, else a new one (for a send: the
    /// stream was checked at [`Sink::connect`](crate::sinks::Sink::connect)).
    pub async fn ensure_connected(&self) -> Result<(), String> {
        self.usable().await.map(|_| ())
    }

    pub(super) async fn usable(&self) -> Result<Upstream, String> {
        match self.current() {
            Some(up) if up.client.connection_state() == State::Connected => Ok(up),
            _ => {
                // Whatever the old connection still holds dies with it.
                self.set_current(None);
                self.open().await
            }
        }
    }

    /// After a missing acknowledgement on a connection that looks alive
    /// (a NAT entry gone, a blackholed route): it is not used again, the
    /// next send opens a new one, instead of stalling until pings notice,
    /// minutes later. What it still holds may yet arrive, in order, before
    /// or among the resent events; the server keeps the first of each.
    pub(super) fn abandon(&self) {
        debug!(sink = %self.name, "abandoning the NATS connection after a missing acknowledgement");
        self.set_current(None);
    }
}

/// A server refusing every publish (a permission violation) sends a
/// `-ERR` for each one: those lines are limited to one a minute.
fn log_event(sink: &str, warnings: &WarnLimiter, event: Event) {
    match event {
        Event::Connected => info!(sink = %sink, "connected to the NATS server"),
        Event::Disconnected => {
            warn!(sink = %sink, "connection to the NATS server lost; reconnecting")
        }
        Event::LameDuckMode => {
            warn!(sink = %sink, "the NATS server is shutting down (lame duck mode)")
        }
        Event::ServerError(e) => match warnings.check("server_error") {
            Some(suppressed) => {
                warn!(sink = %sink, error = %e, suppressed_since_last_warning = suppressed, "NATS server error (further ones are logged at debug for a minute)")
            }
            None => debug!(sink = %sink, error = %e, "NATS server error"),
        },
        Event::ClientError(e) => warn!(sink = %sink, error = %e, "NATS client error"),
        other => debug!(sink = %sink, event = %other, "NATS connection event"),
    }
}

/// An error with its sources: async-nats puts the useful part (connection
/// refused, certificate unknown, no responders) there.
pub(super) fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
