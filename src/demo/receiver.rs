//! The embedded HTTPS upstream receiver: a real CloudEvents batch ingest
//! endpoint (`POST /v1/events`) used by `plantrelay demo`, by the
//! integration tests and by the benchmarks.
//!
//! It owns three things:
//! - an ephemeral PKI ([`EphemeralPki`]): a CA, a server certificate for
//!   `localhost`/`127.0.0.1` and a client certificate, generated at run time;
//! - the endpoint ([`Receiver`]): TLS through [`crate::tls`] (ring only), an
//!   optional client-certificate requirement, content-type and
//!   content-encoding checks, and a recording of every accepted event in
//!   arrival order;
//! - fault injection (status codes with `Retry-After`, latency, connection
//!   resets, per-id rejection, stop and restart on the same port) and the
//!   [`Verdict`] computed from the recording: what arrived, how often, and in
//!   which order.
//!
//! It must never panic or hang on a request path: bad input is answered with
//! a 4xx and a reason, and state locks are never held across an `.await`.
//! It must never be part of `plantrelay run`: it trusts its own throwaway CA
//! and keeps everything it receives in memory.
//!
//! # Wire contract
//! - `Content-Type: application/cloudevents-batch+json` (parameters such as
//!   `charset` allowed), else 415.
//! - `Content-Encoding: gzip | zstd | identity` (or none), else 415; a body
//!   that does not decode is a 400; more than [`MAX_BODY_BYTES`] on the wire
//!   or decoded is a 413.
//! - The body is a JSON array of CloudEvents objects. `specversion` (`"1.0"`),
//!   `id`, `source` and `type` are required (non-empty strings); `subject`,
//!   `time`, `data` and the integer extensions `sequence` and
//!   `streamsequence` are optional. Anything else is a 400 naming the event
//!   and the field.
//! - Success is `200 {"received": n, "duplicates": d}`; the batch's
//!   `Idempotency-Key` header is recorded with it.
//!
//! # How the verdict treats `plantrelay.gap` events
//! A gap event announces stream sequences the agent evicted and will never
//! send. plantrelay's gap event names the stream by its own `subject` and
//! `source` and the inclusive range by `data.first_streamsequence` ..=
//! `data.last_streamsequence` (it stands in the stream in place of the
//! evicted events, with `streamsequence` = the first of them). Other shapes
//! are read too: `data` as one object, an array of objects, or an object with
//! a `streams` array, each naming `subject` (or `stream`), an optional
//! `source`, and `from_streamsequence` ..= `to_streamsequence`. Gap events
//! are counted in [`Verdict::gaps`] and are not themselves part of any
//! stream's order check. Because the agent journals a gap event after the
//! eviction, it normally arrives *after* the jump it explains, so the verdict
//! is computed over the whole recording: a forward jump whose skipped
//! sequences are all announced by gap events is not out of order, and those
//! sequences count as [`Verdict::gap_covered`] instead of
//! [`Verdict::missing`]. A gap event whose data names no range is counted but
//! excuses nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::event::GAP_EVENT_TYPE;
use crate::tls::{self, ClientTls, TlsError};

/// The ingest path.
pub const INGEST_PATH: &str = "/v1/events";
/// The only accepted media type.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Largest accepted body, on the wire and after decompression.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// The reason given in 422 answers for ids listed with [`Receiver::reject_ids`].
pub const REJECT_REASON: &str = "rejected by the receiver's fault injection (reject_ids)";

/// How long [`Receiver::restart`] retries binding the old port.
const REBIND_FOR: Duration = Duration::from_secs(5);
/// How long [`Receiver::stop`] waits for open connections to go away.
const STOP_DRAIN: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// PKI

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

// ---------------------------------------------------------------------------
// Options, errors

/// The server's certificate and key, and whom it trusts for client
/// certificates.
#[derive(Debug, Clone, Copy)]
pub enum ServerIdentity<'a> {
    /// Server certificate from the PKI; client certificates checked against
    /// its CA.
    Pki(&'a EphemeralPki),
    /// Explicit PEM; `client_ca_pem` is needed when client certificates are
    /// required.
    Pem {
        cert_pem: &'a str,
        key_pem: &'a str,
        client_ca_pem: Option<&'a str>,
    },
}

/// How to start a [`Receiver`].
#[derive(Debug, Clone, Copy)]
pub struct ReceiverOptions<'a> {
    /// Listen address; port 0 picks a free port (kept across restarts).
    pub bind: SocketAddr,
    pub identity: ServerIdentity<'a>,
    /// Fail the TLS handshake of clients without a valid certificate.
    pub require_client_cert: bool,
    /// Keep each event's `data`. Benchmarks that only need the verdict can
    /// turn this off to keep memory flat; `data` is then `null`.
    pub record_data: bool,
}

impl<'a> ReceiverOptions<'a> {
    /// `127.0.0.1:0`, the PKI's server certificate, no client certificates,
    /// data recorded.
    pub fn new(pki: &'a EphemeralPki) -> Self {
        ReceiverOptions {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            identity: ServerIdentity::Pki(pki),
            require_client_cert: false,
            record_data: true,
        }
    }
}

/// Why the receiver could not start or restart.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("receiver TLS set-up: {0}")]
    Tls(#[from] TlsError),
    #[error("receiver: client certificates are required but no client CA was given")]
    NoClientCa,
    #[error("receiver cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------
// Recording and verdict

/// One event as it arrived, in an accepted batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    /// CloudEvents `source` (for plantrelay: `plantrelay://<agent>/<source>`).
    pub source: String,
    pub id: String,
    /// CloudEvents `subject`: the stream.
    pub subject: Option<String>,
    pub event_type: String,
    pub time: Option<String>,
    /// Journal sequence extension.
    pub sequence: Option<u64>,
    /// Per-stream sequence extension.
    pub streamsequence: Option<u64>,
    /// `null` when absent, or when the receiver does not record data.
    pub data: Value,
    /// Whether `(source, id)` had arrived before.
    pub duplicate: bool,
    /// Index of its batch in [`Receiver::batches`].
    pub batch: usize,
}

/// One accepted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub idempotency_key: Option<String>,
    pub events: usize,
    /// Body size as received.
    pub wire_bytes: usize,
    /// Body size after decompression.
    pub decoded_bytes: usize,
    /// `identity`, `gzip` or `zstd`.
    pub encoding: &'static str,
}

/// Running counters, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Every `POST /v1/events` that reached the handler.
    pub requests: u64,
    pub batches_accepted: u64,
    /// Events in accepted batches, duplicates included.
    pub events_received: u64,
    pub unique_ids: u64,
    pub duplicates: u64,
    pub wire_bytes: u64,
    pub decoded_bytes: u64,
    /// Answered with the status set by [`Receiver::set_fail`].
    pub injected_failures: u64,
    /// Dropped without an answer by [`Receiver::set_reset`].
    pub injected_resets: u64,
    /// Answered 422 because of [`Receiver::reject_ids`].
    pub rejected_batches: u64,
    /// Answered 400, 413 or 415.
    pub malformed_batches: u64,
}

/// Order and completeness of one stream (one `subject`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamVerdict {
    /// Distinct ids.
    pub unique: u64,
    /// Re-sent ids.
    pub duplicates: u64,
    /// New ids whose `streamsequence` was not the previous maximum + 1 (and
    /// not a jump fully announced by gap events).
    pub out_of_order: u64,
    /// `streamsequence` of the first new event that arrived.
    pub first: Option<u64>,
    /// Highest `streamsequence` received.
    pub last: Option<u64>,
    /// Sequences in `1..=last` neither received nor announced by a gap event.
    pub missing: u64,
    /// Sequences in `1..=last` not received but announced by a gap event.
    pub gap_covered: u64,
}

/// What the recording says about delivery. Streams are keyed by `subject`;
/// order is checked per `(source, subject)`, and should two sources share a
/// subject their counts are added up under that subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Events in accepted batches, duplicates and gap events included.
    pub events_received: u64,
    /// Distinct `(source, id)`.
    pub unique_ids: u64,
    /// `events_received - unique_ids`.
    pub duplicates: u64,
    /// Sum over streams of [`StreamVerdict::out_of_order`].
    pub out_of_order: u64,
    /// Distinct `plantrelay.gap` events.
    pub gaps: u64,
    /// Sum over streams of [`StreamVerdict::missing`].
    pub missing: u64,
    /// Sum over streams of [`StreamVerdict::gap_covered`].
    pub gap_covered: u64,
    /// Distinct non-gap events without `subject` or `streamsequence`: not
    /// order-checked.
    pub unsequenced: u64,
    pub per_stream: BTreeMap<String, StreamVerdict>,
}

impl Verdict {
    /// Computes the verdict of events in arrival order (see the module docs
    /// for the rules). `duplicate` flags are recomputed from `(source, id)`.
    pub fn compute(events: &[ReceivedEvent]) -> Verdict {
        let gaps = GapRanges::collect(events);
        let mut v = Verdict::default();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        // Per (source, subject): highest streamsequence so far, and every
        // one received.
        let mut streams: HashMap<(&str, &str), (u64, BTreeSet<u64>)> = HashMap::new();

        for e in events {
            v.events_received += 1;
            let new = seen.insert((e.source.as_str(), e.id.as_str()));
            if !new {
                v.duplicates += 1;
                if let Some(subject) = &e.subject
                    && e.event_type != GAP_EVENT_TYPE
                {
                    v.per_stream.entry(subject.clone()).or_default().duplicates += 1;
                }
                continue;
            }
            v.unique_ids += 1;
            if e.event_type == GAP_EVENT_TYPE {
                v.gaps += 1;
                continue;
            }
            let (Some(subject), Some(s)) = (&e.subject, e.streamsequence) else {
                v.unsequenced += 1;
                continue;
            };
            let sv = v.per_stream.entry(subject.clone()).or_default();
            sv.unique += 1;
            if sv.first.is_none() {
                sv.first = Some(s);
            }
            sv.last = Some(sv.last.map_or(s, |l| l.max(s)));
            let (max, received) = streams
                .entry((e.source.as_str(), subject.as_str()))
                .or_insert((0, BTreeSet::new()));
            received.insert(s);
            let expected = max.saturating_add(1);
            let in_order =
                s == expected || (s > expected && gaps.covers(&e.source, subject, expected, s - 1));
            if !in_order {
                sv.out_of_order += 1;
            }
            *max = (*max).max(s);
        }

        for ((source, subject), (_, received)) in &streams {
            let (missing, covered) = gaps.holes(source, subject, received);
            if let Some(sv) = v.per_stream.get_mut(*subject) {
                sv.missing += missing;
                sv.gap_covered += covered;
            }
        }
        for sv in v.per_stream.values() {
            v.out_of_order += sv.out_of_order;
            v.missing += sv.missing;
            v.gap_covered += sv.gap_covered;
        }
        v
    }

    /// Nothing lost, nothing out of order (duplicates are allowed: delivery
    /// is at-least-once).
    pub fn is_complete_and_ordered(&self) -> bool {
        self.out_of_order == 0 && self.missing == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered {} unique events in {} streams ({} received, {} duplicates); \
             {} out of order; {} missing; {} announced lost by {} gap events",
            self.unique_ids,
            self.per_stream.len(),
            self.events_received,
            self.duplicates,
            self.out_of_order,
            self.missing,
            self.gap_covered,
            self.gaps,
        )
    }
}

/// Stream-sequence ranges announced by gap events.
struct GapRanges {
    /// subject -> (source filter, from, to)
    by_subject: HashMap<String, Vec<(Option<String>, u64, u64)>>,
}

impl GapRanges {
    fn collect(events: &[ReceivedEvent]) -> GapRanges {
        let mut by_subject: HashMap<String, Vec<(Option<String>, u64, u64)>> = HashMap::new();
        for e in events.iter().filter(|e| e.event_type == GAP_EVENT_TYPE) {
            let items: Vec<&Value> = match &e.data {
                Value::Array(a) => a.iter().collect(),
                Value::Object(o) => match o.get("streams") {
                    Some(Value::Array(a)) => a.iter().collect(),
                    _ => vec![&e.data],
                },
                _ => Vec::new(),
            };
            for item in items {
                // plantrelay's own shape: the gap event's subject and source
                // name the stream, its data `first_streamsequence` ..=
                // `last_streamsequence`.
                let subject = item
                    .get("subject")
                    .or_else(|| item.get("stream"))
                    .and_then(Value::as_str)
                    .or(e.subject.as_deref());
                let from = item
                    .get("from_streamsequence")
                    .or_else(|| item.get("first_streamsequence"))
                    .and_then(Value::as_u64);
                let to = item
                    .get("to_streamsequence")
                    .or_else(|| item.get("last_streamsequence"))
                    .and_then(Value::as_u64);
                if let (Some(subject), Some(from), Some(to)) = (subject, from, to)
                    && from <= to
                {
                    let own_shape = item.get("first_streamsequence").is_some();
                    let source = item
                        .get("source")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .or_else(|| own_shape.then(|| e.source.clone()));
                    by_subject
                        .entry(subject.to_owned())
                        .or_default()
                        .push((source, from, to));
                }
            }
        }
        GapRanges { by_subject }
    }

    /// Merged ranges that apply to `(source, subject)`.
    fn ranges(&self, source: &str, subject: &str) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self
            .by_subject
            .get(subject)
            .into_iter()
            .flatten()
            .filter(|(filter, _, _)| match filter {
                None => true,
                Some(f) => {
                    source == f
                        || source
                            .strip_suffix(f.as_str())
                            .is_some_and(|rest| rest.ends_with('/'))
                }
            })
            .map(|&(_, a, b)| (a, b))
            .collect();
        r.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (a, b) in r {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged
    }

    /// How many of `from..=to` the gap events announce.
    fn covered_count(ranges: &[(u64, u64)], from: u64, to: u64) -> u64 {
        ranges
            .iter()
            .map(|&(a, b)| {
                let lo = a.max(from);
                let hi = b.min(to);
                if lo <= hi { hi - lo + 1 } else { 0 }
            })
            .sum()
    }

    fn covers(&self, source: &str, subject: &str, from: u64, to: u64) -> bool {
        let ranges = self.ranges(source, subject);
        Self::covered_count(&ranges, from, to) == to - from + 1
    }

    /// `(missing, gap_covered)` over the holes in `1..=max(received)`.
    fn holes(&self, source: &str, subject: &str, received: &BTreeSet<u64>) -> (u64, u64) {
        let ranges = self.ranges(source, subject);
        let (mut missing, mut covered) = (0, 0);
        let mut next = 1u64;
        for &s in received {
            if s > next {
                let hole = s - next;
                let c = Self::covered_count(&ranges, next, s - 1);
                covered += c;
                missing += hole - c;
            }
            next = next.max(s.saturating_add(1));
        }
        (missing, covered)
    }
}

#[derive(Default)]
struct Recording {
    events: Vec<ReceivedEvent>,
    batches: Vec<BatchRecord>,
    seen: HashSet<(String, String)>,
    stats: ReceiverStats,
}

// ---------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy)]
struct FailFault {
    status: StatusCode,
    retry_after: Option<u64>,
    probability: f64,
}

#[derive(Debug, Clone, Default)]
struct Faults {
    fail: Option<FailFault>,
    latency: Duration,
    reset_probability: f64,
    rejected: Arc<HashSet<String>>,
}

/// One scripted answer (see [`Receiver::script`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// Answer this status (with `Retry-After: <secs>` if given), accepting
    /// nothing.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Refuse the batch: `Some(i)` answers 422 naming the id of its `i`-th
    /// event, `None` answers 400 naming no event.
    Reject(Option<usize>),
    /// Wait this long, then handle the batch as usual (a client with a
    /// shorter timeout has given up by then; what it sent is accepted all
    /// the same, as a slow upstream would).
    Delay(Duration),
}

fn roll(probability: f64) -> bool {
    if probability >= 1.0 {
        true
    } else if probability > 0.0 {
        rand::random::<f64>() < probability
    } else {
        false // includes NaN
    }
}

// ---------------------------------------------------------------------------
// Connections: a kill switch per TCP connection, so that a handler can make
// its own connection drop without an HTTP answer.

#[derive(Default)]
struct ConnState {
    killed: AtomicBool,
}

/// The TCP stream under TLS. Once its connection is killed every read and
/// write fails and the socket is closed with a RST, so the client never sees
/// an HTTP answer. A kill is only ever triggered from a request handler, which
/// then hands hyper a response to write: that write is what fails, so no
/// waker needs to be stored.
struct TrackedStream {
    inner: TcpStream,
    peer: SocketAddr,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl TrackedStream {
    fn check(&self) -> std::io::Result<()> {
        if self.conn.killed.load(Ordering::Acquire) {
            // Zero linger: the close below (on drop) sends a RST.
            let _ = self.inner.set_zero_linger();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by the receiver's fault injection",
            ));
        }
        Ok(())
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        let mut conns = lock(&self.shared.conns);
        if conns
            .get(&self.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
        {
            conns.remove(&self.peer);
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Wraps each accepted TCP stream (before TLS) in a [`TrackedStream`].
#[derive(Clone)]
struct TrackingAcceptor {
    shared: Arc<Shared>,
}

impl<S> Accept<TcpStream, S> for TrackingAcceptor {
    type Stream = TrackedStream;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(TrackedStream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let result = stream.peer_addr().map(|peer| {
            let _ = stream.set_nodelay(true);
            let conn = Arc::new(ConnState::default());
            lock(&self.shared.conns).insert(peer, conn.clone());
            (
                TrackedStream {
                    inner: stream,
                    peer,
                    conn,
                    shared: self.shared.clone(),
                },
                service,
            )
        });
        std::future::ready(result)
    }
}

// ---------------------------------------------------------------------------
// The receiver

struct Shared {
    recording: Mutex<Recording>,
    faults: Mutex<Faults>,
    script: Mutex<std::collections::VecDeque<Scripted>>,
    conns: Mutex<HashMap<SocketAddr, Arc<ConnState>>>,
    changed: Notify,
    record_data: bool,
}

struct Running {
    handle: axum_server::Handle<SocketAddr>,
    task: JoinHandle<()>,
}

/// The embedded HTTPS upstream. Dropping it shuts the server down.
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: RustlsConfig,
    running: Mutex<Option<Running>>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the receiver down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Receiver {
    /// Binds, builds the TLS configuration and starts serving. Must be called
    /// within a Tokio runtime. Needs no process-wide crypto provider: ring is
    /// passed explicitly (see [`crate::tls`]).
    pub async fn start(opts: ReceiverOptions<'_>) -> Result<Receiver, ReceiverError> {
        let (cert, key, ca) = match opts.identity {
            ServerIdentity::Pki(pki) => (
                pki.server_cert_pem(),
                pki.server_key_pem(),
                Some(pki.ca_pem()),
            ),
            ServerIdentity::Pem {
                cert_pem,
                key_pem,
                client_ca_pem,
            } => (cert_pem, key_pem, client_ca_pem),
        };
        let client_ca = if opts.require_client_cert {
            Some(ca.ok_or(ReceiverError::NoClientCa)?)
        } else {
            None
        };
        let config = tls::server_config_from_pem(cert, key, client_ca)?;
        let tls = RustlsConfig::from_config(Arc::new(config));

        let listener = bind(opts.bind).map_err(|source| ReceiverError::Bind {
            addr: opts.bind,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ReceiverError::Bind {
                addr: opts.bind,
                source,
            })?;
        let receiver = Receiver {
            shared: Arc::new(Shared {
                recording: Mutex::new(Recording::default()),
                faults: Mutex::new(Faults::default()),
                script: Mutex::new(std::collections::VecDeque::new()),
                conns: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                record_data: opts.record_data,
            }),
            addr,
            tls,
            running: Mutex::new(None),
        };
        receiver.serve(listener)?;
        tracing::info!(
            %addr,
            mtls = opts.require_client_cert,
            "demo receiver listening on https://{addr}{INGEST_PATH}"
        );
        Ok(receiver)
    }

    fn serve(&self, listener: std::net::TcpListener) -> Result<(), ReceiverError> {
        let handle = axum_server::Handle::new();
        let acceptor = RustlsAcceptor::new(self.tls.clone()).acceptor(TrackingAcceptor {
            shared: self.shared.clone(),
        });
        let server = axum_server::from_tcp(listener)
            .map_err(|source| ReceiverError::Bind {
                addr: self.addr,
                source,
            })?
            .acceptor(acceptor)
            .handle(handle.clone())
            .http1_only();
        let app = Router::new()
            .route(INGEST_PATH, post(ingest))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.shared.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let addr = self.addr;
        let task = tokio::spawn(async move {
            if let Err(e) = server.serve(app).await {
                tracing::error!(%addr, error = %e, "demo receiver stopped with an error");
            }
        });
        *lock(&self.running) = Some(Running { handle, task });
        Ok(())
    }

    /// The listening address (stable across [`Receiver::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>/v1/events`.
    pub fn url(&self) -> String {
        format!("https://{}{INGEST_PATH}", self.addr)
    }

    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Closes the listener and every open connection. Returns once new
    /// connections are refused (and open ones are closed, or after 2 s).
    pub async fn stop(&self) {
        let Some(running) = lock(&self.running).take() else {
            return;
        };
        running.handle.shutdown();
        for conn in lock(&self.shared.conns).values() {
            conn.killed.store(true, Ordering::Release);
        }
        let mut task = running.task;
        match tokio::time::timeout(STOP_DRAIN, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "demo receiver task ended abnormally"),
            Err(_) => {
                // Dropping the serve future closes the listener too.
                tracing::warn!("demo receiver did not shut down in time; aborting it");
                task.abort();
                let _ = task.await;
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_DRAIN;
        while running.handle.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(addr = %self.addr, "demo receiver stopped");
    }

    /// Listens again on the same address after [`Receiver::stop`], retrying
    /// the bind for a few seconds. A no-op while running.
    pub async fn restart(&self) -> Result<(), ReceiverError> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + REBIND_FOR;
        let listener = loop {
            match bind(self.addr) {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(source) => {
                    return Err(ReceiverError::Bind {
                        addr: self.addr,
                        source,
                    });
                }
            }
        };
        self.serve(listener)?;
        tracing::info!(addr = %self.addr, "demo receiver restarted");
        Ok(())
    }

    // -- faults ------------------------------------------------------------

    /// Answer `status` (with `Retry-After: <secs>` if given) instead of
    /// accepting, for a fraction `probability` (0.0..=1.0) of requests. A
    /// status outside 100..=999 is answered as 500.
    pub fn set_fail(&self, status: u16, retry_after: Option<u64>, probability: f64) {
        let code = StatusCode::from_u16(status).unwrap_or_else(|_| {
            tracing::warn!(status, "invalid status for set_fail; answering 500 instead");
            StatusCode::INTERNAL_SERVER_ERROR
        });
        lock(&self.shared.faults).fail = Some(FailFault {
            status: code,
            retry_after,
            probability,
        });
    }

    /// Delay every request by `latency` before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// Drop the connection without an HTTP answer for a fraction
    /// `probability` of requests (nothing of those batches is recorded).
    pub fn set_reset(&self, probability: f64) {
        lock(&self.shared.faults).reset_probability = probability;
    }

    /// Answer 422 `{"error":"rejected","id":…,"reason":…}` to any batch with
    /// one of these ids, accepting nothing of it. Replaces the previous list.
    pub fn reject_ids<I, S>(&self, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        lock(&self.shared.faults).rejected = Arc::new(ids.into_iter().map(Into::into).collect());
    }

    /// Answer the next requests, one each, as scripted (before any other
    /// fault); once the script is used up, the other faults apply again.
    pub fn script<I>(&self, answers: I)
    where
        I: IntoIterator<Item = Scripted>,
    {
        lock(&self.shared.script).extend(answers);
    }

    /// Back to accepting everything, at once.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
        lock(&self.shared.script).clear();
    }

    // -- recording ---------------------------------------------------------

    /// Every accepted event, in arrival order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        lock(&self.shared.recording).events.clone()
    }

    /// How many accepted events match `f`, without copying them.
    pub fn count_events(&self, f: impl Fn(&ReceivedEvent) -> bool) -> usize {
        lock(&self.shared.recording)
            .events
            .iter()
            .filter(|e| f(e))
            .count()
    }

    /// `(source, id)` of every accepted event, in arrival order.
    pub fn ids(&self) -> Vec<(String, String)> {
        lock(&self.shared.recording)
            .events
            .iter()
            .map(|e| (e.source.clone(), e.id.clone()))
            .collect()
    }

    /// Every accepted batch, in arrival order.
    pub fn batches(&self) -> Vec<BatchRecord> {
        lock(&self.shared.recording).batches.clone()
    }

    /// The `Idempotency-Key` of every accepted batch (`None` when absent).
    pub fn idempotency_keys(&self) -> Vec<Option<String>> {
        lock(&self.shared.recording)
            .batches
            .iter()
            .map(|b| b.idempotency_key.clone())
            .collect()
    }

    pub fn stats(&self) -> ReceiverStats {
        lock(&self.shared.recording).stats
    }

    /// Order, duplicates and completeness of everything received so far.
    pub fn verdict(&self) -> Verdict {
        Verdict::compute(&lock(&self.shared.recording).events)
    }

    /// Waits until `n_unique` distinct `(source, id)` have arrived; false on
    /// timeout.
    pub async fn wait_for(&self, n_unique: usize, timeout: Duration) -> bool {
        let n = n_unique as u64;
        self.wait_until(timeout, |s| s.unique_ids >= n).await
    }

    /// Waits until `done(stats)` holds, re-checking after every request the
    /// receiver handles; false on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&ReceiverStats) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Register before checking so that no notification is lost.
            notified.as_mut().enable();
            if done(&self.stats()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&self.stats());
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(running) = lock(&self.running).take() {
            running.handle.shutdown();
            running.task.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Lets restart() take the port back while old connections sit in
    // TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

// ---------------------------------------------------------------------------
// The handler

/// One CloudEvent as the wire carries it.
#[derive(Deserialize)]
struct WireEvent {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    sequence: Option<u64>,
    #[serde(default)]
    streamsequence: Option<u64>,
    /// Kept as text: building a JSON tree of every event's data is most of
    /// a receiver's CPU, and only recording receivers need it.
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

fn error_response(status: StatusCode, error: &str, reason: String) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "reason": reason })),
    )
        .into_response()
}

async fn ingest(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let faults = lock(&shared.faults).clone();
    let scripted = lock(&shared.script).pop_front();
    lock(&shared.recording).stats.requests += 1;
    let response = match scripted {
        Some(answer) => scripted_answer(&shared, peer, &headers, &body, faults, answer).await,
        None => handle_batch(&shared, peer, &headers, &body, faults).await,
    };
    shared.changed.notify_waiters();
    response
}

async fn scripted_answer(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
    faults: Faults,
    answer: Scripted,
) -> Response {
    match answer {
        Scripted::Status {
            status,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (
                status,
                axum::Json(json!({ "error": "scripted", "status": status.as_u16() })),
            )
                .into_response();
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
        Scripted::Reject(index) => {
            let named = decode_body(headers, body)
                .and_then(|(decoded, _)| parse_batch(&decoded))
                .ok()
                .and_then(|events| index.and_then(|i| events.get(i).map(|e| e.id.clone())));
            match named {
                Some(id) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(json!({ "error": "rejected", "id": id, "reason": REJECT_REASON })),
                )
                    .into_response(),
                None => (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({ "error": "rejected", "reason": REJECT_REASON })),
                )
                    .into_response(),
            }
        }
        Scripted::Delay(d) => {
            tokio::time::sleep(d).await;
            handle_batch(shared, peer, headers, body, faults).await
        }
    }
}

async fn handle_batch(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
    faults: Faults,
) -> Response {
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }

    if roll(faults.reset_probability) {
        lock(&shared.recording).stats.injected_resets += 1;
        match lock(&shared.conns).get(&peer) {
            Some(conn) => {
                conn.killed.store(true, Ordering::Release);
                tracing::debug!(%peer, "fault injection: resetting the connection");
            }
            None => tracing::error!(%peer, "fault injection: connection to reset not found"),
        }
        // Never reaches the client: the write fails on the killed stream.
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }

    if let Some(fail) = faults.fail
        && roll(fail.probability)
    {
        lock(&shared.recording).stats.injected_failures += 1;
        tracing::debug!(%peer, status = fail.status.as_u16(), "fault injection: failing the batch");
        let mut response = (
            fail.status,
            axum::Json(json!({ "error": "injected fault", "status": fail.status.as_u16() })),
        )
            .into_response();
        if let Some(secs) = fail.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }

    let parsed = check_content_type(headers)
        .and_then(|()| decode_body(headers, body))
        .and_then(|(decoded, encoding)| {
            parse_batch(&decoded).map(|events| (events, encoding, decoded.len()))
        });
    let (events, encoding, decoded_len) = match parsed {
        Ok(v) => v,
        Err((status, error, reason)) => {
            lock(&shared.recording).stats.malformed_batches += 1;
            tracing::warn!(%peer, status = status.as_u16(), %reason, "rejecting a malformed batch");
            return error_response(status, error, reason);
        }
    };

    if let Some(bad) = events.iter().find(|e| faults.rejected.contains(&e.id)) {
        lock(&shared.recording).stats.rejected_batches += 1;
        tracing::debug!(%peer, id = %bad.id, "fault injection: rejecting the batch");
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({ "error": "rejected", "id": bad.id, "reason": REJECT_REASON })),
        )
            .into_response();
    }

    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let n = events.len();
    let mut duplicates = 0usize;
    {
        let mut rec = lock(&shared.recording);
        let batch = rec.batches.len();
        rec.batches.push(BatchRecord {
            idempotency_key: idempotency_key.clone(),
            events: n,
            wire_bytes: body.len(),
            decoded_bytes: decoded_len,
            encoding,
        });
        for w in events {
            let duplicate = !rec.seen.insert((w.source.clone(), w.id.clone()));
            duplicates += usize::from(duplicate);
            rec.events.push(ReceivedEvent {
                source: w.source,
                id: w.id,
                subject: w.subject,
                event_type: w.event_type,
                time: w.time,
                sequence: w.sequence,
                streamsequence: w.streamsequence,
                data: match w.data {
                    Some(raw) if shared.record_data => {
                        // The batch parsed as JSON, so each part does too.
                        serde_json::from_str(raw.get()).unwrap_or(Value::Null)
                    }
                    _ => Value::Null,
                },
                duplicate,
                batch,
            });
        }
        let s = &mut rec.stats;
        s.batches_accepted += 1;
        s.events_received += n as u64;
        s.duplicates += duplicates as u64;
        s.unique_ids += (n - duplicates) as u64;
        s.wire_bytes += body.len() as u64;
        s.decoded_bytes += decoded_len as u64;
    }
    tracing::debug!(
        %peer,
        events = n,
        duplicates,
        encoding,
        idempotency_key = idempotency_key.as_deref().unwrap_or("-"),
        "batch accepted"
    );
    (
        StatusCode::OK,
        axum::Json(json!({ "received": n, "duplicates": duplicates })),
    )
        .into_response()
}

type Rejection = (StatusCode, &'static str, String);

fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("<not text>"));
    let essence = value
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if essence.eq_ignore_ascii_case(BATCH_CONTENT_TYPE) {
        Ok(())
    } else {
        Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported media type",
            format!(
                "Content-Type must be {BATCH_CONTENT_TYPE}, got {}",
                value.unwrap_or("none")
            ),
        ))
    }
}

fn decode_body(headers: &HeaderMap, body: &[u8]) -> Result<(Vec<u8>, &'static str), Rejection> {
    let encoding = headers.get(header::CONTENT_ENCODING).map(|v| {
        v.to_str()
            .unwrap_or("<not text>")
            .trim()
            .to_ascii_lowercase()
    });
    let limit = MAX_BODY_BYTES as u64 + 1;
    let mut out = Vec::new();
    let (result, name) = match encoding.as_deref() {
        None | Some("") | Some("identity") => return Ok((body.to_vec(), "identity")),
        Some("gzip") | Some("x-gzip") => (
            flate2::read::MultiGzDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out)
                .map(drop)
                .map_err(|e| e.to_string()),
            "gzip",
        ),
        Some("zstd") => (zstd_decode(body, &mut out, limit), "zstd"),
        Some(other) => {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported content encoding",
                format!("Content-Encoding must be gzip, zstd or identity, got {other}"),
            ));
        }
    };
    if let Err(e) = result {
        return Err((
            StatusCode::BAD_REQUEST,
            "undecodable body",
            format!("the {name} body does not decode: {e}"),
        ));
    }
    if out.len() > MAX_BODY_BYTES {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("the decoded body exceeds {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok((out, name))
}

/// Decodes every zstd frame of `body` (encoders may write several) into
/// `out`, up to `limit` bytes, checking content checksums where present.
fn zstd_decode(body: &[u8], out: &mut Vec<u8>, limit: u64) -> Result<(), String> {
    let mut src = body;
    let mut frame = 0;
    while !src.is_empty() {
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut src)
            .map_err(|e| format!("frame {frame}: {e}"))?;
        let room = limit.saturating_sub(out.len() as u64);
        (&mut decoder)
            .take(room)
            .read_to_end(out)
            .map_err(|e| format!("frame {frame}: {e}"))?;
        if out.len() as u64 >= limit {
            // The caller answers 413.
            return Ok(());
        }
        let d = &decoder.decoder;
        if let (Some(sent), Some(computed)) =
            (d.get_checksum_from_data(), d.get_calculated_checksum())
            && sent != computed
        {
            return Err(format!("frame {frame}: content checksum mismatch"));
        }
        frame += 1;
    }
    Ok(())
}

fn parse_batch(body: &[u8]) -> Result<Vec<WireEvent>, Rejection> {
    let bad = |reason: String| (StatusCode::BAD_REQUEST, "malformed batch", reason);
    // Tracking the path costs on every field: only a body that fails to
    // parse is parsed again with it, for the message.
    let events: Vec<WireEvent> = match serde_json::from_slice(body) {
        Ok(events) => events,
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let events: Vec<WireEvent> =
                serde_path_to_error::deserialize(&mut de).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    if path == "." {
                        bad(format!(
                            "the body must be a JSON array of CloudEvents: {inner}"
                        ))
                    } else {
                        bad(format!("event {path}: {inner}"))
                    }
                })?;
            de.end()
                .map_err(|e| bad(format!("trailing data after the JSON array: {e}")))?;
            events
        }
    };
    for (i, e) in events.iter().enumerate() {
        if e.specversion != "1.0" {
            return Err(bad(format!(
                "event [{i}]: specversion must be \"1.0\", got {:?}",
                e.specversion
            )));
        }
        for (name, value) in [
            ("id", &e.id),
            ("source", &e.source),
            ("type", &e.event_type),
        ] {
            if value.is_empty() {
                return Err(bad(format!("event [{i}]: \"{name}\" must not be empty")));
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(source: &str, id: &str, subject: &str, s: u64) -> ReceivedEvent {
        ReceivedEvent {
            source: source.into(),
            id: id.into(),
            subject: Some(subject.into()),
            event_type: "t".into(),
            time: None,
            sequence: None,
            streamsequence: Some(s),
            data: Value::Null,
            duplicate: false,
            batch: 0,
        }
    }

    fn gap(id: &str, data: Value) -> ReceivedEvent {
        ReceivedEvent {
            source: "plantrelay://gw/_journal".into(),
            id: id.into(),
            subject: Some("_gaps".into()),
            event_type: GAP_EVENT_TYPE.into(),
            time: None,
            sequence: None,
            streamsequence: None,
            data,
            duplicate: false,
            batch: 0,
        }
    }

    #[test]
    fn in_order_stream_is_clean() {
        let events: Vec<_> = (1..=5).map(|i| ev("s", &format!("e{i}"), "a", i)).collect();
        let v = Verdict::compute(&events);
        assert_eq!(v.events_received, 5);
        assert_eq!(v.unique_ids, 5);
        assert_eq!(v.duplicates, 0);
        assert_eq!(v.out_of_order, 0);
        assert_eq!(v.missing, 0);
        assert!(v.is_complete_and_ordered());
        let a = &v.per_stream["a"];
        assert_eq!((a.first, a.last, a.unique), (Some(1), Some(5), 5));
    }

    #[test]
    fn resent_ids_are_duplicates_not_out_of_order() {
        // 1 2 3, then a retry re-sends 2 3, then 4.
        let events = vec![
            ev("s", "e1", "a", 1),
            ev("s", "e2", "a", 2),
            ev("s", "e3", "a", 3),
            ev("s", "e2", "a", 2),
            ev("s", "e3", "a", 3),
            ev("s", "e4", "a", 4),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.events_received, 6);
        assert_eq!(v.unique_ids, 4);
        assert_eq!(v.duplicates, 2);
        assert_eq!(v.per_stream["a"].duplicates, 2);
        assert_eq!(v.out_of_order, 0);
        assert!(v.is_complete_and_ordered());
    }

    #[test]
    fn late_and_skipped_sequences_are_out_of_order() {
        // 1 3 2 5 4: 3 jumps, 2 is late, 5 jumps, 4 is late.
        let events = vec![
            ev("s", "e1", "a", 1),
            ev("s", "e3", "a", 3),
            ev("s", "e2", "a", 2),
            ev("s", "e5", "a", 5),
            ev("s", "e4", "a", 4),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.out_of_order, 4);
        assert_eq!(v.missing, 0, "everything arrived in the end");
        assert!(!v.is_complete_and_ordered());
    }

    #[test]
    fn missing_sequences_are_counted_and_streams_are_independent() {
        let events = vec![
            ev("s", "a1", "a", 1),
            ev("s", "b1", "b", 1),
            ev("s", "a2", "a", 2),
            ev("s", "a5", "a", 5),
            ev("s", "b2", "b", 2),
            // Same subject from another source: its own sequence space.
            ev("t", "x1", "a", 1),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.per_stream["a"].out_of_order, 1);
        assert_eq!(v.per_stream["a"].missing, 2);
        assert_eq!(v.per_stream["b"].out_of_order, 0);
        assert_eq!(v.per_stream["b"].missing, 0);
        assert_eq!((v.out_of_order, v.missing), (1, 2));
    }

    #[test]
    fn a_stream_that_does_not_start_at_one_is_missing_its_head() {
        let v = Verdict::compute(&[ev("s", "e3", "a", 3), ev("s", "e4", "a", 4)]);
        assert_eq!(v.out_of_order, 1);
        assert_eq!(v.missing, 2);
    }

    #[test]
    fn a_gap_event_excuses_the_jump_it_announces_even_when_it_arrives_later() {
        let events = vec![
            ev("plantrelay://gw/line3", "e1", "a", 1),
            ev("plantrelay://gw/line3", "e5", "a", 5),
            ev("plantrelay://gw/line3", "e6", "a", 6),
            gap(
                "g1",
                json!({"source": "line3", "subject": "a",
                       "from_streamsequence": 2, "to_streamsequence": 4}),
            ),
            gap("g1", json!(null)), // re-sent gap event: a duplicate
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.gaps, 1);
        assert_eq!(v.duplicates, 1);
        assert_eq!(v.out_of_order, 0);
        assert_eq!(v.missing, 0);
        assert_eq!(v.gap_covered, 3);
        assert!(v.is_complete_and_ordered());
        assert!(!v.per_stream.contains_key("_gaps"));
    }

    #[test]
    fn a_gap_event_excuses_only_what_it_announces() {
        let events = vec![
            ev("s", "e1", "a", 1),
            ev("s", "e6", "a", 6), // 2..=5 skipped, only 2..=3 announced
            ev("s", "b3", "b", 3), // other stream: not covered
            gap(
                "g1",
                json!({"streams": [
                    {"stream": "a", "from_streamsequence": 2, "to_streamsequence": 3},
                    {"subject": "b", "source": "other", "from_streamsequence": 1, "to_streamsequence": 2}
                ]}),
            ),
        ];
        let v = Verdict::compute(&events);
        assert_eq!(v.per_stream["a"].out_of_order, 1);
        assert_eq!(v.per_stream["a"].missing, 2);
        assert_eq!(v.per_stream["a"].gap_covered, 2);
        assert_eq!(v.per_stream["b"].out_of_order, 1);
        assert_eq!(v.per_stream["b"].missing, 2);
        assert_eq!(v.gaps, 1);
    }

    #[test]
    fn events_without_stream_sequence_are_not_order_checked() {
        let mut e = ev("s", "e1", "a", 1);
        e.streamsequence = None;
        let v = Verdict::compute(&[e, ev("s", "e2", "a", 1)]);
        assert_eq!(v.unsequenced, 1);
        assert_eq!(v.out_of_order, 0);
    }

    #[test]
    fn huge_sequence_numbers_do_not_hang_or_overflow() {
        let v = Verdict::compute(&[ev("s", "e1", "a", u64::MAX)]);
        assert_eq!(v.missing, u64::MAX - 1);
        assert_eq!(v.out_of_order, 1);
    }

    #[test]
    fn batch_parsing_names_the_event_and_field() {
        let (status, _, reason) = parse_batch(br#"{"id":"x"}"#).err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(reason.contains("JSON array"), "{reason}");
        let body = br#"[{"specversion":"1.0","id":"a","source":"s","type":"t"},
                        {"specversion":"1.0","source":"s","type":"t"}]"#;
        let (_, _, reason) = parse_batch(body).err().unwrap();
        assert!(reason.contains("[1]") && reason.contains("id"), "{reason}");
        let body = br#"[{"specversion":"0.3","id":"a","source":"s","type":"t"}]"#;
        let (_, _, reason) = parse_batch(body).err().unwrap();
        assert!(reason.contains("specversion"), "{reason}");
        let body =
            br#"[{"specversion":"1.0","id":"a","source":"s","type":"t","streamsequence":"x"}]"#;
        let (_, _, reason) = parse_batch(body).err().unwrap();
        assert!(reason.contains("streamsequence"), "{reason}");
        let body = br#"[{"specversion":"1.0","id":"a","source":"s","type":"t","sequence":3,"data":{"q":1}}]"#;
        let events = parse_batch(body).unwrap();
        assert_eq!(events[0].sequence, Some(3));
        assert_eq!(events[0].data.as_ref().map(|d| d.get()), Some(r#"{"q":1}"#));
    }

    #[test]
    fn zstd_bodies_decode_and_garbage_is_rejected() {
        let text = br#"[{"specversion":"1.0","id":"a","source":"s","type":"t"}]"#.repeat(50);
        let compressed = ruzstd::encoding::compress_to_vec(
            &text[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        let (out, name) = decode_body(&headers, &compressed).unwrap();
        assert_eq!((out.as_slice(), name), (&text[..], "zstd"));
        let (status, _, _) = decode_body(&headers, b"not zstd").err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        let (status, _, reason) = decode_body(&headers, b"x").err().unwrap();
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(reason.contains("br"), "{reason}");
    }

    /// `zstd --check` output of two frames: the batch split in the middle.
    const TWO_ZSTD_FRAMES: [u8; 82] = [
        0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0xf9, 0x00, 0x00, 0x5b, 0x7b, 0x22, 0x73, 0x70, 0x65,
        0x63, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x22, 0x3a, 0x22, 0x31, 0x2e, 0x30, 0x22,
        0x2c, 0x22, 0x69, 0x64, 0x22, 0x3a, 0x22, 0x61, 0x22, 0x2c, 0x23, 0x44, 0x4a, 0x11, 0x28,
        0xb5, 0x2f, 0xfd, 0x04, 0x58, 0xc9, 0x00, 0x00, 0x22, 0x73, 0x6f, 0x75, 0x72, 0x63, 0x65,
        0x22, 0x3a, 0x22, 0x73, 0x22, 0x2c, 0x22, 0x74, 0x79, 0x70, 0x65, 0x22, 0x3a, 0x22, 0x74,
        0x22, 0x7d, 0x5d, 0xd6, 0xb3, 0xe6, 0x76,
    ];

    #[test]
    fn zstd_bodies_of_several_frames_decode_and_checksums_are_checked() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        let (out, _) = decode_body(&headers, &TWO_ZSTD_FRAMES).unwrap();
        assert_eq!(
            out,
            br#"[{"specversion":"1.0","id":"a","source":"s","type":"t"}]"#
        );
        let mut corrupt = TWO_ZSTD_FRAMES;
        corrupt[81] ^= 0xff; // last byte of the second frame's checksum
        let (status, _, reason) = decode_body(&headers, &corrupt).err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            reason.contains("frame 1") && reason.contains("checksum"),
            "{reason}"
        );
    }

    #[test]
    fn oversized_decoded_bodies_are_413() {
        // 65 MiB of zeros compress to almost nothing: a zip bomb in miniature.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![0u8; MAX_BODY_BYTES + 1024]).unwrap();
        let body = gz.finish().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let (status, _, _) = decode_body(&headers, &body).err().unwrap();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

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
