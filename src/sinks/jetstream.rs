//! The NATS JetStream sink: one publish per event into a JetStream stream,
//! with `Nats-Msg-Id` = the event id so that the server drops what it
//! already holds (within the stream's duplicate window), and the event as a
//! CloudEvent in the NATS binary binding: `ce-*` headers, `data` as the
//! body.
//!
//! Headers: `Nats-Msg-Id`; `ce-specversion`, `ce-id`, `ce-source`
//! (`plantrelay://<agent>/<source>`), `ce-type`, `ce-subject` (the event's
//! stream), `ce-time` (source time, when given), `ce-sequence`,
//! `ce-streamsequence`, `ce-deliveryclass`, and `ce-<name>` for every
//! extension attribute (strings unquoted, other values as JSON text), values
//! percent-encoded as the binding asks; `content-type` is the event's
//! `datacontenttype`, else `application/json` unless the data is binary
//! (`data_base64`, sent decoded as the body).
//!
//! This module owns the NATS connection of one sink ([`Sink::connect`]
//! opens it and checks, before the first publish, that a stream captures
//! the subjects; a connection that breaks is replaced by a new one at the
//! next send, never re-established with publishes still queued on it, see
//! [`JetStreamSink::open`]), the subject of each event
//! (the `subject` template, every token made valid), the mapping of
//! publish acknowledgements to a [`SendOutcome`], and counters of what the
//! server acknowledged and deduplicated ([`JetStreamCounters`]).
//!
//! A batch is published pipelined (nothing waits for an acknowledgement
//! between publishes); then the acknowledgements are awaited in order and
//! the acknowledged prefix is what the forwarder may count as delivered.
//! The first missing acknowledgement (timeout, connection lost, no stream
//! for the subject) is a retry of the rest: resending from there is safe
//! because the server deduplicates on `Nats-Msg-Id`. Only a message the
//! server can never take (larger than its `max_payload` or the stream's
//! maximum message size) is rejected, naming that event.
//!
//! It must never decide about cursors or dead letters, never refuse to
//! start because the server is unreachable or the stream is missing (that
//! is a failed [`Sink::connect`], retried with backoff while the agent keeps
//! journaling), never create or change a stream unless `create_stream` says
//! so, and never install a crypto provider of its own: TLS uses the rustls
//! configuration of [`crate::tls`].

use std::fmt::Write as _;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, Info as StreamInfo, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{AuthError, ConnectOptions, Event, HeaderMap, HeaderName, Subject};
use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{ForwarderSettings, RetryPolicy, SendOutcome, Sink};
use crate::config::{JetStreamSinkConfig, read_credentials, read_secret};
use crate::event::StoredEvent;
use crate::tls::{ClientTls, client_config};

/// Errors building the sink from its config; they name the sink.
#[derive(Debug, thiserror::Error)]
#[error("sinks.jetstream '{sink}': {detail}")]
pub struct JetStreamSinkError {
    pub sink: String,
    pub detail: String,
}

/// The value of `{source}` and `{stream}` in the subject checked at connect.
const PROBE: &str = "probe";

/// What the server acknowledged for this sink since the agent started; the
/// agent may export them as metrics (the sink itself is owned by its
/// forwarder, so they are shared).
#[derive(Debug, Default)]
pub struct JetStreamCounters {
    published: AtomicU64,
    acknowledged: AtomicU64,
    duplicates: AtomicU64,
}

impl JetStreamCounters {
    /// Messages handed to the connection (re-sends included).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Publish acknowledgements received, duplicates included.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Acknowledgements with `duplicate: true`: re-sends (after a retry, a
    /// restart, a crash) the server already held and dropped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

/// One part of a parsed subject template.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Literal text, `{agent}` already in it.
    Lit(String),
    Source,
    Stream,
}

/// The `subject` template with `{agent}` filled in, rendered per event.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

impl SubjectTemplate {
    /// Parses a template validated by the config (`{agent}`, `{source}`,
    /// `{stream}`, no wildcards, no empty tokens). An unknown or unclosed
    /// placeholder is kept as literal text rather than failing.
    pub fn new(template: &str, agent_id: &str) -> SubjectTemplate {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                lit.push_str(&rest[open..]);
                rest = "";
                break;
            };
            match &after[..close] {
                "agent" => push_token(&mut lit, agent_id),
                "source" | "stream" => {
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(if &after[..close] == "source" {
                        Part::Source
                    } else {
                        Part::Stream
                    });
                }
                _ => lit.push_str(&rest[open..open + close + 2]),
            }
            rest = &after[close + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        SubjectTemplate { parts }
    }

    /// The subject of an event from `source` on `stream`: `{source}` is one
    /// token, `{stream}` one token per `/`-separated level.
    pub fn render(&self, source: &str, stream: &str) -> String {
        let mut out = String::with_capacity(64 + source.len() + stream.len());
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Source => push_token(&mut out, source),
                Part::Stream => {
                    for (i, level) in stream.split('/').enumerate() {
                        if i > 0 {
                            out.push('.');
                        }
                        push_token(&mut out, level);
                    }
                }
            }
        }
        out
    }

    /// The subjects a stream created for this sink captures: the template
    /// itself without `{source}` and `{stream}`, else its complete literal
    /// tokens before the first of them followed by `>`
    /// (`plantrelay.gw-01.{stream}` → `plantrelay.gw-01.>`). None when the
    /// first token is already variable (it would capture everything).
    pub fn capture(&self) -> Option<String> {
        let mut prefix = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => prefix.push_str(s),
                Part::Source | Part::Stream => {
                    let dot = prefix.rfind('.')?;
                    prefix.truncate(dot + 1);
                    prefix.push('>');
                    return Some(prefix);
                }
            }
        }
        Some(prefix)
    }
}

/// Appends `text` as (part of) one subject token: characters a token cannot
/// hold (spaces and other control characters, `.`, `*`, `>`) become `_`,
/// and an empty value becomes `_` so that no token is empty.
fn push_token(out: &mut String, text: &str) {
    if text.is_empty() {
        out.push('_');
        return;
    }
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>') {
            out.push('_');
        } else {
            out.push(c);
        }
    }
}

/// NATS subject matching: `*` matches one token, a final `>` one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A header value in the CloudEvents NATS binding: characters outside
/// printable ASCII, space, `"` and `%` percent-encoded (UTF-8 bytes).
fn header_value(v: String) -> String {
    let safe = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if v.bytes().all(safe) {
        return v;
    }
    let mut out = String::with_capacity(v.len() + 16);
    for b in v.bytes() {
        if safe(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const CE_ID: HeaderName = HeaderName::from_static("ce-id");
const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
const CE_SUBJECT: HeaderName = HeaderName::from_static("ce-subject");
const CE_TIME: HeaderName = HeaderName::from_static("ce-time");
const CE_SEQUENCE: HeaderName = HeaderName::from_static("ce-sequence");
const CE_STREAMSEQUENCE: HeaderName = HeaderName::from_static("ce-streamsequence");
const CE_DELIVERYCLASS: HeaderName = HeaderName::from_static("ce-deliveryclass");
const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");

/// One event in its wire form, built by [`Sink::encode`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    subject: Subject,
    headers: HeaderMap,
    payload: Bytes,
}

impl Outgoing {
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Subject, headers and body, to publish it yourself (benchmarks).
    pub fn into_parts(self) -> (Subject, HeaderMap, Bytes) {
        (self.subject, self.headers, self.payload)
    }
}

/// Builds the message of one event (see the module docs).
pub fn outgoing(template: &SubjectTemplate, agent_id: &str, e: &StoredEvent) -> Outgoing {
    let (attrs, payload) = e.binary_mode(agent_id);
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, e.id.as_str());
    let mut content_type = None;
    for (name, value) in attrs {
        let header = match name.as_str() {
            "specversion" => CE_SPECVERSION,
            "id" => CE_ID,
            "source" => CE_SOURCE,
            "type" => CE_TYPE,
            "subject" => CE_SUBJECT,
            "time" => CE_TIME,
            "sequence" => CE_SEQUENCE,
            "streamsequence" => CE_STREAMSEQUENCE,
            "deliveryclass" => CE_DELIVERYCLASS,
            // The binding's content type is the message's, not a `ce-`
            // attribute.
            "datacontenttype" => {
                content_type = Some(value);
                continue;
            }
            other => match format!("ce-{other}").parse::<HeaderName>() {
                Ok(h) => h,
                // A name no header can carry (`:`, non-ASCII): dropped
                // rather than failing the event.
                Err(_) => continue,
            },
        };
        headers.insert(header, header_value(value));
    }
    // Binary data (`data_base64`) has no type unless the source gave one.
    let binary = e
        .attrs
        .as_deref()
        .is_some_and(|a| a.contains("\"data_base64\""));
    match content_type {
        Some(ct) => headers.insert(CONTENT_TYPE, ct),
        None if !binary => headers.insert(CONTENT_TYPE, "application/json"),
        None => {}
    }
    Outgoing {
        subject: Subject::from(template.render(&e.source, &e.stream)),
        headers,
        payload: Bytes::from(payload),
    }
}

/// Why a publish or its acknowledgement failed, for the outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth sending again (the server's dedup makes it safe).
    Transient(String),
    /// The server can never take this message.
    Permanent(String),
}

/// Maps a failed publish (or its acknowledgement) of `event` to subject to
/// a [`Failure`] whose text says what to do.
pub fn failure(e: &PublishError, event: &StoredEvent, subject: &str, timeout: Duration) -> Failure {
    let jet = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent(format!(
            "event {} is larger than the NATS server accepts: {e}",
            event.id
        )),
        PublishErrorKind::TimedOut => Failure::Transient(format!(
            "no JetStream acknowledgement within {} for event {} (subject {subject})",
            humantime::format_duration(timeout),
            event.id
        )),
        PublishErrorKind::StreamNotFound => Failure::Transient(format!(
            "no JetStream stream captures subject {subject} (event {}): no responders",
            event.id
        )),
        PublishErrorKind::BrokenPipe => Failure::Transient(format!(
            "connection to the NATS server lost before the acknowledgement of event {}",
            event.id
        )),
        _ => match jet.map(|j| j.error_code()) {
            Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
            | Some(ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM) => Failure::Permanent(format!(
                "event {} exceeds the stream's maximum message size: {e}",
                event.id
            )),
            _ => Failure::Transient(format!(
                "JetStream refused event {} (subject {subject}): {e}",
                event.id
            )),
        },
    }
}

/// The outcome of a batch of which the first `acked` events were
/// acknowledged and the next one failed (or none did).
pub fn outcome(acked: usize, failed: Option<Failure>) -> SendOutcome {
    match failed {
        None => SendOutcome::Ack,
        Some(Failure::Transient(reason)) => SendOutcome::Retry {
            acked,
            after: None,
            reason,
        },
        Some(Failure::Permanent(reason)) => SendOutcome::Reject {
            acked,
            index: Some(acked),
            reason,
        },
    }
}

/// Credentials sent at connect.
#[derive(Clone)]
enum Auth {
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
    fn connect(&self, nonce: &[u8]) -> Result<async_nats::Auth, AuthError> {
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
fn parse_creds(text: &str) -> Result<(String, String), String> {
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
struct Upstream {
    client: async_nats::Client,
    js: jetstream::Context,
}

pub struct JetStreamSink {
    name: String,
    agent_id: String,
    /// Server URLs as given to async-nats.
    servers: Vec<String>,
    /// The servers for messages, without credentials.
    shown: String,
    auth: Auth,
    tls: Option<rustls::ClientConfig>,
    stream: Option<String>,
    create_stream: bool,
    duplicate_window: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    /// Acknowledgements one batch may have outstanding.
    inflight: usize,
    template_text: String,
    template: SubjectTemplate,
    upstream: Mutex<Option<Upstream>>,
    counters: Arc<JetStreamCounters>,
}

impl JetStreamSink {
    pub fn new(
        cfg: &JetStreamSinkConfig,
        agent_id: &str,
    ) -> Result<JetStreamSink, JetStreamSinkError> {
        let err = |detail: String| JetStreamSinkError {
            sink: cfg.name.clone(),
            detail,
        };
        let wants_tls = cfg.url.iter().any(|u| u.scheme() == "tls")
            || cfg.ca_file.is_some()
            || cfg.client_cert.is_some();
        let tls = if wants_tls {
            Some(
                client_config(&ClientTls {
                    ca_file: cfg.ca_file.clone(),
                    ca_only: false,
                    client_cert: cfg.client_cert.clone(),
                    client_key: cfg.client_key.clone(),
                })
                .map_err(|e| err(e.to_string()))?,
            )
        } else {
            None
        };
        let auth = match (&cfg.token_file, &cfg.credentials_file) {
            (Some(path), _) => Auth::Token(read_secret(path).map_err(|e| err(e.to_string()))?),
            (None, Some(path)) => {
                let text = read_credentials(path).map_err(|e| err(e.to_string()))?;
                // Parsed now so that a damaged file is a config error, not
                // a connection failure retried forever.
                let (jwt, seed) = parse_creds(&text).map_err(|e| {
                    err(format!(
                        "{} is not a NATS credentials file: {e}",
                        path.display()
                    ))
                })?;
                Auth::Creds { jwt, seed }
            }
            (None, None) => Auth::None,
        };
        if cfg.url.is_empty() {
            return Err(err("url: at least one server is required".into()));
        }
        let shown = cfg
            .url
            .iter()
            .map(|u| match (u.host_str(), u.port()) {
                (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
                (Some(h), None) => format!("{}://{h}", u.scheme()),
                _ => u.scheme().to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(JetStreamSink {
            name: cfg.name.clone(),
            agent_id: agent_id.to_string(),
            servers: cfg.url.iter().map(|u| u.as_str().to_string()).collect(),
            shown,
            auth,
            tls,
            stream: cfg.stream.clone(),
            create_stream: cfg.create_stream,
            duplicate_window: cfg.duplicate_window,
            timeout: cfg.timeout,
            retry: RetryPolicy {
                initial: cfg.retry_initial,
                max: cfg.retry_max,
            },
            // Room for a batch, and for the acknowledgements of a failed
            // batch still held by async-nats until they time out.
            inflight: cfg.batch_max_events.max(256).saturating_mul(2),
            template_text: cfg.subject.clone(),
            template: SubjectTemplate::new(&cfg.subject, agent_id),
            upstream: Mutex::new(None),
            counters: Arc::new(JetStreamCounters::default()),
        })
    }

    /// The forwarder settings of this sink's config.
    pub fn settings(cfg: &JetStreamSinkConfig) -> ForwarderSettings {
        ForwarderSettings::of(cfg)
    }

    /// The counters of this sink, shared: take them before the sink moves
    /// into its forwarder.
    pub fn counters(&self) -> Arc<JetStreamCounters> {
        self.counters.clone()
    }

    /// The subject template with `{agent}` filled in.
    pub fn template(&self) -> &SubjectTemplate {
        &self.template
    }

    /// Whether the connection to a server is up now.
    pub fn is_connected(&self) -> bool {
        self.current()
            .is_some_and(|u| u.client.connection_state() == State::Connected)
    }

    fn current(&self) -> Option<Upstream> {
        self.upstream.lock().ok().and_then(|u| u.clone())
    }

    fn set_current(&self, up: Option<Upstream>) {
        if let Ok(mut slot) = self.upstream.lock() {
            *slot = up;
        }
    }

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
            let sink = sink.clone();
            async move { log_event(&sink, event) }
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
    /// stream was checked at [`Sink::connect`]).
    pub async fn ensure_connected(&self) -> Result<(), String> {
        self.usable().await.map(|_| ())
    }

    async fn usable(&self) -> Result<Upstream, String> {
        match self.current() {
            Some(up) if up.client.connection_state() == State::Connected => Ok(up),
            _ => {
                // Whatever the old connection still holds dies with it.
                self.set_current(None);
                self.open().await
            }
        }
    }

    /// Finds (or creates) the stream and checks that it captures this
    /// sink's subjects.
    async fn check_stream(&self, js: &jetstream::Context) -> Result<StreamInfo, String> {
        let probe = self.template.render(PROBE, PROBE);
        let on = &self.shown;
        let info = match &self.stream {
            Some(name) => match js.get_stream(name).await {
                Ok(s) => s.cached_info().clone(),
                Err(e)
                    if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {
                    let capture = self.template.capture();
                    if !self.create_stream {
                        return Err(format!(
                            "JetStream stream '{name}' does not exist on {on}; create it (capturing subject {}) or set create_stream = true",
                            capture.as_deref().unwrap_or(&probe)
                        ));
                    }
                    let Some(capture) = capture else {
                        return Err(format!(
                            "JetStream stream '{name}' does not exist on {on}, and its subjects cannot be derived from the subject template `{}` (its first token varies); create the stream yourself",
                            self.template_text
                        ));
                    };
                    self.create(js, name, capture).await?
                }
                Err(e) => {
                    return Err(format!(
                        "cannot look up JetStream stream '{name}' on {on}: {} (is JetStream enabled on the server?)",
                        describe(&e)
                    ));
                }
            },
            None => match js.stream_by_subject(probe.clone()).await {
                Ok(name) => match js.get_stream(&name).await {
                    Ok(s) => s.cached_info().clone(),
                    Err(e) => {
                        return Err(format!(
                            "cannot look up JetStream stream '{name}' on {on}: {}",
                            describe(&e)
                        ));
                    }
                },
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                    return Err(format!(
                        "no JetStream stream on {on} captures subject {probe} (from the subject template `{}`); create one, or set `stream` and create_stream = true",
                        self.template_text
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "cannot look up the JetStream stream for subject {probe} on {on}: {} (is JetStream enabled on the server?)",
                        describe(&e)
                    ));
                }
            },
        };
        let name = &info.config.name;
        if !info
            .config
            .subjects
            .iter()
            .any(|f| subject_matches(f, &probe))
        {
            return Err(format!(
                "JetStream stream '{name}' on {on} does not capture subject {probe} (from the subject template `{}`); its subjects are {:?}",
                self.template_text, info.config.subjects
            ));
        }
        let horizon = self.retry.max + self.timeout;
        if info.config.duplicate_window < horizon {
            warn!(
                sink = %self.name,
                stream = %name,
                duplicate_window = %humantime::format_duration(info.config.duplicate_window),
                needed = %humantime::format_duration(horizon),
                "the stream's duplicate window is shorter than retry_max + timeout: an event resent after a long retry may be stored twice"
            );
        }
        Ok(info)
    }

    async fn create(
        &self,
        js: &jetstream::Context,
        name: &str,
        capture: String,
    ) -> Result<StreamInfo, String> {
        let config = StreamConfig {
            name: name.to_string(),
            subjects: vec![capture.clone()],
            storage: StorageType::File,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(s) => {
                info!(
                    sink = %self.name,
                    stream = %name,
                    subjects = %capture,
                    duplicate_window = %humantime::format_duration(self.duplicate_window),
                    "created the JetStream stream (create_stream = true)"
                );
                Ok(s.cached_info().clone())
            }
            Err(e) => Err(format!(
                "cannot create JetStream stream '{name}' (capturing {capture}) on {}: {}",
                self.shown,
                describe(&e)
            )),
        }
    }

    /// After a missing acknowledgement on a connection that looks alive
    /// (a NAT entry gone, a blackholed route): it is not used again, the
    /// next send opens a new one, instead of stalling until pings notice,
    /// minutes later. What it still holds may yet arrive, in order, before
    /// or among the resent events; the server keeps the first of each.
    fn abandon(&self) {
        debug!(sink = %self.name, "abandoning the NATS connection after a missing acknowledgement");
        self.set_current(None);
    }
}

fn log_event(sink: &str, event: Event) {
    match event {
        Event::Connected => info!(sink = %sink, "connected to the NATS server"),
        Event::Disconnected => {
            warn!(sink = %sink, "connection to the NATS server lost; reconnecting")
        }
        Event::LameDuckMode => {
            warn!(sink = %sink, "the NATS server is shutting down (lame duck mode)")
        }
        Event::ServerError(e) => warn!(sink = %sink, error = %e, "NATS server error"),
        Event::ClientError(e) => warn!(sink = %sink, error = %e, "NATS client error"),
        other => debug!(sink = %sink, event = %other, "NATS connection event"),
    }
}

/// An error with its sources: async-nats puts the useful part (connection
/// refused, certificate unknown, no responders) there.
fn describe(e: &dyn std::error::Error) -> String {
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

impl Sink for JetStreamSink {
    type Encoded = Vec<Outgoing>;

    fn encode(&self, batch: &[StoredEvent]) -> Vec<Outgoing> {
        batch
            .iter()
            .map(|e| outgoing(&self.template, &self.agent_id, e))
            .collect()
    }

    async fn send(&self, batch: &[StoredEvent], encoded: Vec<Outgoing>) -> SendOutcome {
        let up = match self.usable().await {
            Ok(up) => up,
            Err(e) => return SendOutcome::retry(None, e),
        };
        // Publish everything, then collect the acknowledgements: the
        // batch costs one round trip, not one per event.
        let mut pending = Vec::with_capacity(encoded.len());
        let mut stopped = None;
        for (i, m) in encoded.into_iter().enumerate() {
            let subject = m.subject.clone();
            let publish = PublishMessage::build()
                .payload(m.payload)
                .headers(m.headers);
            match up.js.send_publish(m.subject, publish).await {
                Ok(ack) => pending.push((ack, subject)),
                Err(e) => {
                    stopped = batch
                        .get(i)
                        .map(|event| failure(&e, event, &subject, self.timeout));
                    break;
                }
            }
        }
        self.counters
            .published
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut acked = 0usize;
        let mut duplicates = 0u64;
        let mut failed = None;
        let mut timed_out = false;
        for (ack, subject) in pending {
            let Some(event) = batch.get(acked) else { break };
            match tokio::time::timeout_at(deadline, ack.into_future()).await {
                Ok(Ok(a)) => {
                    acked += 1;
                    duplicates += u64::from(a.duplicate);
                }
                Ok(Err(e)) => {
                    timed_out = e.kind() == PublishErrorKind::TimedOut;
                    failed = Some(failure(&e, event, &subject, self.timeout));
                    break;
                }
                Err(_) => {
                    timed_out = true;
                    failed = Some(failure(
                        &PublishError::new(PublishErrorKind::TimedOut),
                        event,
                        &subject,
                        self.timeout,
                    ));
                    break;
                }
            }
        }
        self.counters
            .acknowledged
            .fetch_add(acked as u64, Ordering::Relaxed);
        if duplicates > 0 {
            self.counters
                .duplicates
                .fetch_add(duplicates, Ordering::Relaxed);
            info!(
                sink = %self.name,
                duplicates,
                first_seq = batch.first().map_or(0, |e| e.seq),
                "JetStream already held re-sent events and dropped them (deduplicated on Nats-Msg-Id)"
            );
        }
        let failed = failed.or(stopped);
        if let Some(Failure::Transient(reason)) = &failed {
            warn!(sink = %self.name, acked, batch = batch.len(), reason = %reason, "JetStream publish not acknowledged; the rest of the batch will be sent again");
            if timed_out {
                self.abandon();
            }
        }
        outcome(acked, failed)
    }

    fn upstream_duplicates(&self) -> u64 {
        self.counters.duplicates()
    }

    async fn connect(&self) -> Result<(), String> {
        // Kept even if the stream check fails: the next attempt checks
        // again on the same connection.
        let up = self.usable().await?;
        let info = self.check_stream(&up.js).await?;
        info!(
            sink = %self.name,
            servers = %self.shown,
            stream = %info.config.name,
            subjects = ?info.config.subjects,
            messages = info.state.messages,
            duplicate_window = %humantime::format_duration(info.config.duplicate_window),
            "JetStream sink ready"
        );
        Ok(())
    }

    async fn close(&self) {
        let Some(up) = self.current() else { return };
        self.set_current(None);
        // Nothing is in flight (the forwarder finished its batch); drain
        // flushes what async-nats still buffers and closes cleanly.
        if tokio::time::timeout(self.timeout, up.client.drain())
            .await
            .is_err()
        {
            debug!(sink = %self.name, "NATS connection did not drain in time; dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Class;

    fn event(stream: &str, attrs: Option<&str>) -> StoredEvent {
        StoredEvent {
            seq: 42,
            source: "mes".into(),
            id: "e-42".into(),
            stream: stream.into(),
            stream_seq: 7,
            class: Class::Critical,
            event_type: "com.example.mes.confirmation".into(),
            source_time: Some("2026-11-29T10:00:00Z".into()),
            recv_time_us: 0,
            data: br#"{"qty":3}"#.to_vec(),
            attrs: attrs.map(str::to_string),
        }
    }

    fn header<'a>(m: &'a Outgoing, name: &str) -> Option<&'a str> {
        m.headers().get(name).map(|v| v.as_str())
    }

    #[test]
    fn subjects_render_every_placeholder_with_valid_tokens() {
        let t = SubjectTemplate::new("plantrelay.{agent}.{stream}", "gw-01");
        assert_eq!(
            t.render("mes", "line3/press7"),
            "plantrelay.gw-01.line3.press7"
        );
        assert_eq!(
            t.render("mes", "line 3/a.b/*/>"),
            "plantrelay.gw-01.line_3.a_b._._"
        );
        assert_eq!(t.render("mes", "/x//"), "plantrelay.gw-01._.x._._");
        assert_eq!(t.render("mes", ""), "plantrelay.gw-01._");
        let t = SubjectTemplate::new("f.{agent}.{source}.{stream}.v1", "gw.a b");
        assert_eq!(t.render("mes.x", "a/b"), "f.gw_a_b.mes_x.a.b.v1");
        assert_eq!(t.render("", "a"), "f.gw_a_b._.a.v1");
        let t = SubjectTemplate::new("events", "gw");
        assert_eq!(t.render("mes", "a/b"), "events");
        let t = SubjectTemplate::new("x.pre-{source}-post", "gw");
        assert_eq!(t.render("s\t1", "a"), "x.pre-s_1-post");
    }

    #[test]
    fn the_capture_subject_is_the_literal_prefix() {
        let cap = |t: &str| SubjectTemplate::new(t, "gw-01").capture();
        assert_eq!(
            cap("plantrelay.{agent}.{stream}").as_deref(),
            Some("plantrelay.gw-01.>")
        );
        assert_eq!(
            cap("a.{agent}.x{source}.{stream}").as_deref(),
            Some("a.gw-01.>")
        );
        assert_eq!(cap("a.{agent}.events").as_deref(), Some("a.gw-01.events"));
        assert_eq!(cap("{stream}.x"), None);
        assert_eq!(cap("p{source}.x"), None);
        let t = SubjectTemplate::new("plantrelay.{agent}.{source}.{stream}", "gw-01");
        let cap = t.capture().unwrap();
        assert!(subject_matches(&cap, &t.render("mes", "line/3")));
        assert!(subject_matches(&cap, &t.render(PROBE, PROBE)));
    }

    #[test]
    fn subjects_match_with_nats_wildcards() {
        assert!(subject_matches("a.b.c", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(subject_matches("a.*.c", "a.x.c"));
        assert!(!subject_matches("a.*", "a.x.c"));
        assert!(subject_matches("a.>", "a.x.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches(">", "a"));
        assert!(subject_matches("*.>", "a.b"));
    }

    #[test]
    fn headers_carry_the_cloudevent_and_the_dedup_id() {
        let t = SubjectTemplate::new("plantrelay.{agent}.{stream}", "gw-01");
        let e = event(
            "line/3",
            Some(r#"{"traceparent":"00-ab","partof":{"order":7},"sequence":"x","odd key":"v w"}"#),
        );
        let m = outgoing(&t, "gw-01", &e);
        assert_eq!(m.subject(), "plantrelay.gw-01.line.3");
        assert_eq!(header(&m, "Nats-Msg-Id"), Some("e-42"));
        assert_eq!(header(&m, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&m, "ce-id"), Some("e-42"));
        assert_eq!(header(&m, "ce-source"), Some("plantrelay://gw-01/mes"));
        assert_eq!(header(&m, "ce-type"), Some("com.example.mes.confirmation"));
        assert_eq!(header(&m, "ce-subject"), Some("line/3"));
        assert_eq!(header(&m, "ce-time"), Some("2026-11-29T10:00:00Z"));
        assert_eq!(header(&m, "ce-sequence"), Some("42"), "never from attrs");
        assert_eq!(header(&m, "ce-streamsequence"), Some("7"));
        assert_eq!(header(&m, "ce-deliveryclass"), Some("critical"));
        assert_eq!(header(&m, "ce-traceparent"), Some("00-ab"));
        assert_eq!(header(&m, "ce-partof"), Some("{%22order%22:7}"));
        // A space cannot be in a header name: dropped, not fatal.
        assert_eq!(
            m.headers()
                .iter()
                .filter(|(k, _)| k.to_string().contains("odd"))
                .count(),
            0
        );
        assert_eq!(header(&m, "content-type"), Some("application/json"));
        assert_eq!(m.payload(), br#"{"qty":3}"#);
        let mut e = event("a", None);
        e.source_time = None;
        let m = outgoing(&t, "gw-01", &e);
        assert_eq!(header(&m, "ce-time"), None);
    }

    #[test]
    fn binary_data_is_the_body_and_datacontenttype_the_content_type() {
        let t = SubjectTemplate::new("p.{stream}", "gw");
        let mut e = event("a", Some(r#"{"data_base64":"AAEC"}"#));
        e.data = b"null".to_vec();
        let m = outgoing(&t, "gw", &e);
        assert_eq!(m.payload(), &[0u8, 1, 2]);
        assert_eq!(header(&m, "content-type"), None);
        assert_eq!(header(&m, "ce-data_base64"), None);
        let e = event("a", Some(r#"{"datacontenttype":"application/xml"}"#));
        let m = outgoing(&t, "gw", &e);
        assert_eq!(header(&m, "content-type"), Some("application/xml"));
        assert_eq!(header(&m, "ce-datacontenttype"), None);
    }

    #[test]
    fn header_values_are_percent_encoded_as_the_binding_says() {
        assert_eq!(header_value("abc-1:2".into()), "abc-1:2");
        assert_eq!(header_value("a b\"%é".into()), "a%20b%22%25%C3%A9");
        assert_eq!(header_value("x\r\ny".into()), "x%0D%0Ay");
    }

    #[test]
    fn credentials_files_yield_the_jwt_and_a_seed_that_signs_the_nonce() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGciOi.jwt.sig\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let (jwt, parsed) = parse_creds(&creds).unwrap();
        assert_eq!(jwt, "eyJhbGciOi.jwt.sig");
        assert_eq!(parsed, seed);
        assert!(parse_creds("nothing here").is_err());
        let mut broken = seed.clone().into_bytes();
        broken[10] = if broken[10] == b'A' { b'B' } else { b'A' };
        let broken = creds.replace(&seed, std::str::from_utf8(&broken).unwrap());
        assert!(
            parse_creds(&broken).unwrap_err().contains("not valid"),
            "a damaged seed is refused"
        );
        let auth = Auth::Creds { jwt, seed }.connect(b"nonce-123").unwrap();
        assert_eq!(auth.jwt.as_deref(), Some("eyJhbGciOi.jwt.sig"));
        user.verify(b"nonce-123", &auth.signature.unwrap()).unwrap();
        let auth = Auth::Token("t0k".into()).connect(b"n").unwrap();
        assert_eq!(auth.token.as_deref(), Some("t0k"));
    }

    fn js_error(code: u64) -> PublishError {
        let e: jetstream::Error = serde_json::from_str(&format!(
            r#"{{"code":400,"err_code":{code},"description":"refused"}}"#
        ))
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, e)
    }

    #[test]
    fn failures_map_to_retries_and_named_rejections() {
        let e = event("a", None);
        let t = Duration::from_secs(10);
        let f = |err: PublishError| failure(&err, &e, "p.a", t);
        let transient = |x: Failure| match x {
            Failure::Transient(r) => r,
            other => panic!("{other:?}"),
        };
        let r = transient(f(PublishError::new(PublishErrorKind::TimedOut)));
        assert!(
            r.contains("10s") && r.contains("e-42") && r.contains("p.a"),
            "{r}"
        );
        let r = transient(f(PublishError::new(PublishErrorKind::StreamNotFound)));
        assert!(
            r.contains("no JetStream stream captures subject p.a"),
            "{r}"
        );
        let r = transient(f(PublishError::new(PublishErrorKind::BrokenPipe)));
        assert!(r.contains("connection"), "{r}");
        transient(f(js_error(10077)));
        for code in [10054, 10097] {
            assert!(matches!(f(js_error(code)), Failure::Permanent(r) if r.contains("e-42")));
        }
        assert!(matches!(
            f(PublishError::new(PublishErrorKind::MaxPayloadExceeded)),
            Failure::Permanent(r) if r.contains("e-42")
        ));

        assert_eq!(outcome(5, None), SendOutcome::Ack);
        assert_eq!(
            outcome(3, Some(Failure::Transient("t".into()))),
            SendOutcome::Retry {
                acked: 3,
                after: None,
                reason: "t".into()
            }
        );
        assert_eq!(
            outcome(3, Some(Failure::Permanent("p".into()))),
            SendOutcome::Reject {
                acked: 3,
                index: Some(3),
                reason: "p".into()
            }
        );
    }
}
