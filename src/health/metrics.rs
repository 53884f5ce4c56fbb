//! `/metrics`: the Prometheus text exposition (format 0.0.4) of one
//! [`StatusReport`], so every number equals the status JSON taken at the
//! same moment. A fresh registry is filled per scrape; nothing is kept
//! between scrapes (the counters live in the agent's status and journal).
//!
//! Names follow the Prometheus conventions: base units (`_bytes`,
//! `_seconds`), `_total` on counters (added by the encoder), a `_ratio` in
//! 0..1, `_timestamp_seconds` for Unix times (0 = never).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::status::SinkState;
use crate::status::report::{StatusReport, WarningKind};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

/// A float gauge family with one value per label set.
fn gauges(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, f64)>,
) {
    let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).set(v);
    }
    reg.register(name, help, family);
}

/// An integer gauge family.
fn int_gauges(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Gauge<i64>>::default();
    for (labels, v) in values {
        family
            .get_or_create(&labels)
            .set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    reg.register(name, help, family);
}

/// A counter family; `name` without `_total` (the encoder appends it).
fn counters(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, family);
}

fn one(v: u64) -> [(Labels, u64); 1] {
    [(Vec::new(), v)]
}

fn one_f(v: f64) -> [(Labels, f64); 1] {
    [(Vec::new(), v)]
}

fn seconds(us: Option<i64>) -> f64 {
    us.map_or(0.0, |us| us as f64 / 1e6)
}

/// Renders the exposition of `r`.
pub fn render(r: &StatusReport) -> String {
    let mut reg = Registry::default();
    reg.register(
        "plantrelay_build",
        "Build of the running agent (always 1)",
        Info::new(vec![
            ("version", r.version.to_string()),
            ("agent", r.agent_id.clone()),
        ]),
    );
    int_gauges(
        &mut reg,
        "plantrelay_uptime_seconds",
        "Seconds since the agent started",
        one(r.uptime_seconds),
    );
    int_gauges(
        &mut reg,
        "plantrelay_ready",
        "1 if /readyz answers 200",
        one(u64::from(r.ready)),
    );
    int_gauges(
        &mut reg,
        "plantrelay_warnings",
        "Warnings in the status, by kind",
        WarningKind::ALL.map(|k| {
            let n = r.warnings.iter().filter(|w| w.kind == k).count() as u64;
            (vec![("kind", k.as_str().to_string())], n)
        }),
    );

    let j = &r.journal;
    int_gauges(
        &mut reg,
        "plantrelay_journal_bytes",
        "Live bytes of the journal file",
        one(j.used_bytes),
    );
    int_gauges(
        &mut reg,
        "plantrelay_journal_max_bytes",
        "Configured journal max_size",
        one(j.max_bytes),
    );
    gauges(
        &mut reg,
        "plantrelay_journal_capacity_ratio",
        "Journal bytes over max_size",
        one_f(j.capacity_ratio),
    );
    if let (Some(free), Some(total)) = (j.disk_free_bytes, j.disk_total_bytes) {
        int_gauges(
            &mut reg,
            "plantrelay_journal_disk_free_bytes",
            "Bytes available on the journal's filesystem",
            one(free),
        );
        int_gauges(
            &mut reg,
            "plantrelay_journal_disk_total_bytes",
            "Size of the journal's filesystem",
            one(total),
        );
    }
    int_gauges(
        &mut reg,
        "plantrelay_journal_head_seq",
        "Highest committed journal seq",
        one(j.head_seq),
    );
    int_gauges(
        &mut reg,
        "plantrelay_journal_writer_alive",
        "1 while the journal writer thread runs",
        one(u64::from(j.writer_alive)),
    );
    int_gauges(
        &mut reg,
        "plantrelay_journal_quarantined",
        "1 if a damaged journal was moved aside at start-up",
        one(u64::from(j.quarantined.is_some())),
    );
    counters(
        &mut reg,
        "plantrelay_journal_events_stored",
        "Events stored in the journal since start",
        one(j.events_stored),
    );
    counters(
        &mut reg,
        "plantrelay_journal_damaged_rows",
        "Damaged event rows (failing their checksum) skipped, not delivered, since start",
        one(crate::journal::DAMAGED_ROWS.load(std::sync::atomic::Ordering::Relaxed)),
    );
    counters(
        &mut reg,
        "plantrelay_evicted_events",
        "Undelivered events evicted from a full journal, by class",
        [
            (
                vec![("class", "telemetry".to_string())],
                j.evicted_telemetry,
            ),
            (vec![("class", "critical".to_string())], j.evicted_critical),
        ],
    );

    let source = |name: &str| vec![("source", name.to_string())];
    counters(
        &mut reg,
        "plantrelay_events_ingested",
        "Events a source had stored in the journal since start",
        r.sources.iter().map(|s| (source(&s.name), s.events)),
    );
    counters(
        &mut reg,
        "plantrelay_duplicates",
        "Events a source delivered again that were already journaled (acked, not stored)",
        r.sources.iter().map(|s| (source(&s.name), s.duplicates)),
    );
    counters(
        &mut reg,
        "plantrelay_source_rejected_events",
        "Events a source refused as malformed",
        r.sources.iter().map(|s| (source(&s.name), s.rejects)),
    );
    counters(
        &mut reg,
        "plantrelay_source_schema_rejected_events",
        "Events a source refused because their data failed their type's schema (type \"(no schema)\": no schema under require_schema), by type",
        r.sources.iter().flat_map(|s| {
            s.schema_rejects.iter().map(|t| {
                (
                    vec![("source", s.name.clone()), ("type", t.event_type.clone())],
                    t.events,
                )
            })
        }),
    );
    counters(
        &mut reg,
        "plantrelay_source_dropped_events",
        "Events a source dropped before the journal (OPC UA: data changes superseded by a newer value of the same node while its queue was full)",
        r.sources.iter().map(|s| (source(&s.name), s.dropped)),
    );
    int_gauges(
        &mut reg,
        "plantrelay_source_requests_in_flight",
        "HTTP ingest requests being read, parsed or committed",
        r.sources
            .iter()
            .filter(|s| s.kind == "http")
            .map(|s| (source(&s.name), s.in_flight)),
    );
    int_gauges(
        &mut reg,
        "plantrelay_source_connected",
        "1 if the source is connected (listening, for HTTP)",
        r.sources
            .iter()
            .map(|s| (source(&s.name), u64::from(s.connected))),
    );
    gauges(
        &mut reg,
        "plantrelay_source_last_event_timestamp_seconds",
        "Unix time of the source's last event (0: none yet)",
        r.sources
            .iter()
            .map(|s| (source(&s.name), seconds(s.last_event_us))),
    );

    let sink = |name: &str| vec![("sink", name.to_string())];
    int_gauges(
        &mut reg,
        "plantrelay_sink_backlog_events",
        "Journal events after the sink's cursor",
        r.sinks.iter().map(|s| (sink(&s.name), s.backlog_events)),
    );
    gauges(
        &mut reg,
        "plantrelay_sink_oldest_undelivered_age_seconds",
        "Age of the oldest event the sink has not delivered (0: none)",
        r.sinks.iter().map(|s| {
            (
                sink(&s.name),
                s.oldest_undelivered_age_seconds.unwrap_or(0.0),
            )
        }),
    );
    // Per class, for sinks that send critical events first.
    let per_class = || {
        r.sinks.iter().flat_map(|s| {
            s.classes.iter().map(move |c| {
                (
                    vec![
                        ("sink", s.name.clone()),
                        ("class", c.class.as_str().to_string()),
                    ],
                    c,
                )
            })
        })
    };
    int_gauges(
        &mut reg,
        "plantrelay_sink_class_backlog_events",
        "Events of the class after the sink's cursor for that class (sinks with priority = critical_first)",
        per_class().map(|(l, c)| (l, c.backlog_events)),
    );
    gauges(
        &mut reg,
        "plantrelay_sink_class_oldest_undelivered_age_seconds",
        "Age of the oldest event of the class the sink has not delivered (0: none)",
        per_class().map(|(l, c)| (l, c.oldest_undelivered_age_seconds.unwrap_or(0.0))),
    );
    int_gauges(
        &mut reg,
        "plantrelay_sink_cursor",
        "Highest journal seq the sink's upstream acknowledged",
        r.sinks.iter().map(|s| (sink(&s.name), s.cursor)),
    );
    counters(
        &mut reg,
        "plantrelay_sink_delivered_events",
        "Events the upstream acknowledged since start",
        r.sinks.iter().map(|s| (sink(&s.name), s.delivered)),
    );
    counters(
        &mut reg,
        "plantrelay_sink_upstream_duplicate_events",
        "Events the upstream acknowledged as already held since start (JetStream deduplication of re-sends)",
        r.sinks
            .iter()
            .map(|s| (sink(&s.name), s.upstream_duplicates)),
    );
    counters(
        &mut reg,
        "plantrelay_sink_attempts",
        "Batches sent upstream since start, successful or not",
        r.sinks.iter().map(|s| (sink(&s.name), s.attempts)),
    );
    int_gauges(
        &mut reg,
        "plantrelay_dead_letters",
        "Events the upstream rejected for good, kept for retry",
        r.sinks.iter().map(|s| (sink(&s.name), s.dead_letters)),
    );
    gauges(
        &mut reg,
        "plantrelay_sink_last_success_timestamp_seconds",
        "Unix time of the sink's last acknowledged batch (0: none since start)",
        r.sinks
            .iter()
            .map(|s| (sink(&s.name), seconds(s.last_success_us))),
    );
    int_gauges(
        &mut reg,
        "plantrelay_sink_state",
        "1 for the sink's current state (ok, retrying, stalled), 0 for the others",
        r.sinks.iter().flat_map(|s| {
            [SinkState::Ok, SinkState::Retrying, SinkState::Stalled].map(|st| {
                (
                    vec![
                        ("sink", s.name.clone()),
                        ("state", state_name(st).to_string()),
                    ],
                    u64::from(s.state == st),
                )
            })
        }),
    );

    int_gauges(
        &mut reg,
        "plantrelay_certificate_expiry_timestamp_seconds",
        "Unix time when a certificate file the agent loaded at start expires (the first to expire, for a chain or bundle)",
        r.certificates.iter().map(|c| {
            (
                vec![
                    ("use", c.usage.to_string()),
                    ("key", c.key.clone()),
                    ("path", c.path.clone()),
                ],
                u64::try_from(c.not_after).unwrap_or(0),
            )
        }),
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

fn state_name(s: SinkState) -> &'static str {
    match s {
        SinkState::Ok => "ok",
        SinkState::Retrying => "retrying",
        SinkState::Stalled => "stalled",
    }
}
