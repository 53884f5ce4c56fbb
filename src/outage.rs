//! Outage reports in the data: when a sink's upstream has failed for at
//! least `agent.outage_report_after` and then delivers again, the agent
//! journals one `plantrelay.outage` event, and once the backlog of that
//! outage is delivered a `plantrelay.outage.drained` event; so the central
//! data platform learns of every plant outage from the data itself.
//!
//! Both are critical events of source `plantrelay`, stream
//! `plantrelay/outage/<sink>`, with ids derived from the sink and the
//! outage's start (a re-sent report is a duplicate, not a second outage).
//! They go to every sink that takes them, the recovered one included.
//!
//! This module only watches the sinks' status and appends through the
//! journal like a source; it must never touch cursors or hold up a
//! forwarder. An outage in progress when the agent stops is not reported.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::event::{Class, NewEvent};
use crate::journal::Journal;
use crate::status::SinkStatus;
use crate::units::{formattable, rfc3339_us, unix_micros};

/// `type` of the report journaled when the upstream is back.
pub const OUTAGE_EVENT_TYPE: &str = "plantrelay.outage";
/// `type` of the report journaled when the outage's backlog is delivered.
pub const DRAINED_EVENT_TYPE: &str = "plantrelay.outage.drained";
/// The source name of the reports.
pub const SOURCE: &str = "plantrelay";

/// How often the sinks' status is looked at.
const TICK: Duration = Duration::from_millis(500);

/// One sink's watch.
#[derive(Debug, Default)]
struct Watch {
    failing: Option<Failing>,
    draining: Option<Draining>,
}

/// A sink failing since `since_us`.
#[derive(Debug, Clone, Copy)]
struct Failing {
    since_us: i64,
    /// The sink's cursor when it began: what was journaled after it waited
    /// for the outage to end.
    cursor_at_start: u64,
    peak_backlog: u64,
    /// When the backlog was at its peak.
    peak_at_us: i64,
}

/// A sink delivering again, its outage's backlog not yet delivered.
#[derive(Debug, Clone, Copy)]
struct Draining {
    since_us: i64,
    ended_us: i64,
    /// Delivered once the cursor reaches it: the head when it recovered.
    head_at_end: u64,
}

/// Watches `sinks` until `stop`; `after` must be non-zero.
pub async fn watch(
    journal: Journal,
    sinks: Vec<Arc<SinkStatus>>,
    after: Duration,
    stop: CancellationToken,
) {
    let after_us = i64::try_from(after.as_micros()).unwrap_or(i64::MAX);
    let mut watches: Vec<Watch> = sinks.iter().map(|_| Watch::default()).collect();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let head = journal
            .stats()
            .head_seq
            .load(std::sync::atomic::Ordering::Relaxed);
        let now_us = unix_micros(SystemTime::now());
        for (status, w) in sinks.iter().zip(watches.iter_mut()) {
            let p = status.progress();
            let backlog = journal.stats().backlog(head, p.cursor);
            if p.consecutive_failures > 0 {
                let f = w.failing.get_or_insert_with(|| Failing {
                    // The first failure of the run, when the status has it.
                    since_us: p
                        .last_error
                        .as_ref()
                        .map_or(now_us, |(t, _)| *t)
                        .min(now_us),
                    cursor_at_start: p.cursor,
                    peak_backlog: backlog,
                    peak_at_us: now_us,
                });
                if backlog > f.peak_backlog {
                    f.peak_backlog = backlog;
                    f.peak_at_us = now_us;
                }
                continue;
            }
            if let Some(f) = w.failing.take() {
                let lasted = now_us.saturating_sub(f.since_us);
                if lasted >= after_us {
                    let data = json!({
                        "sink": status.name,
                        "started": rfc3339(f.since_us),
                        "ended": rfc3339(now_us),
                        "duration_seconds": seconds(lasted),
                        "buffered_events": head.saturating_sub(f.cursor_at_start),
                        "backlog_at_end": backlog,
                        "peak_backlog": f.peak_backlog.max(backlog),
                        "peak_backlog_at": rfc3339(f.peak_at_us),
                        "last_error": p.last_error.as_ref().map(|(_, m)| m.clone()),
                    });
                    info!(sink = %status.name, duration_s = seconds(lasted), backlog, "upstream back after an outage; reporting it in the journal");
                    append(&journal, &status.name, OUTAGE_EVENT_TYPE, f.since_us, data).await;
                    w.draining = Some(Draining {
                        since_us: f.since_us,
                        ended_us: now_us,
                        head_at_end: head,
                    });
                }
            }
            if let Some(d) = w.draining
                && p.cursor >= d.head_at_end
            {
                w.draining = None;
                let data = json!({
                    "sink": status.name,
                    "started": rfc3339(d.since_us),
                    "ended": rfc3339(d.ended_us),
                    "drained": rfc3339(now_us),
                    "drain_seconds": seconds(now_us.saturating_sub(d.ended_us)),
                });
                append(&journal, &status.name, DRAINED_EVENT_TYPE, d.since_us, data).await;
            }
        }
    }
}

fn seconds(us: i64) -> f64 {
    (us as f64 / 1e5).round() / 10.0
}

fn rfc3339(us: i64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_millis(formattable(at)).to_string()
}

async fn append(
    journal: &Journal,
    sink: &str,
    event_type: &str,
    since_us: i64,
    data: serde_json::Value,
) {
    let kind = event_type.rsplit('.').next().unwrap_or(event_type);
    let event = NewEvent {
        source: SOURCE.to_owned(),
        id: format!("{kind}:{sink}:{since_us}"),
        stream: format!("plantrelay/outage/{sink}"),
        class: Class::Critical,
        event_type: event_type.to_owned(),
        source_time: Some(rfc3339_us(unix_micros(SystemTime::now()))),
        data: data.to_string().into_bytes(),
        attrs: Some(r#"{"datacontenttype":"application/json"}"#.to_owned()),
    };
    if let Err(e) = journal.append(vec![event]).await {
        warn!(sink = %sink, error = %e, event_type, "cannot journal the outage report");
    }
}
