//! The status snapshot: one [`StatusReport`] built from the live counters,
//! the journal's shared statistics and a few short read transactions. The
//! JSON of `/api/v1/status`, the answer of `/readyz` and the `/metrics`
//! exposition are all rendered from one such snapshot, so their numbers
//! agree.
//!
//! A sink's state is decided here ([`sink_state`]): `stalled` when it has had
//! undelivered events and no success for `stall_after`, `retrying` while its
//! last attempt failed, `ok` otherwise. Warnings are raised for a stalled
//! sink, a quarantined journal, evictions and a disk under 5 % free.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::Config;
use crate::journal::{Journal, JournalError, Reader};
use crate::status::{SinkState, SinkStatus, SourceSnapshot, SourceStatus};
use crate::units::{rfc3339_us, unix_micros};

/// Below this share of free space on the journal's filesystem, the status
/// carries a `disk_low` warning.
pub const DISK_LOW_RATIO: f64 = 0.05;

/// Everything the health server reports on.
pub struct AgentView {
    pub agent_id: String,
    pub started: Instant,
    pub journal: Journal,
    pub sources: Vec<Arc<SourceStatus>>,
    pub sinks: Vec<Arc<SinkStatus>>,
    /// True between a completed start-up and the beginning of shutdown.
    pub ready: AtomicBool,
    pub stall_after: Duration,
    /// Tasks that ended when they should not have (see [`crate::supervise`]).
    pub supervisor: Arc<crate::supervise::Supervisor>,
    /// The lanes of each sink, by name (see [`crate::config::lanes`]).
    sink_lanes: Vec<(String, Vec<Option<crate::event::Class>>)>,
    /// The certificates in use and when they expire (the health listener's
    /// are replaced when they are reloaded).
    certificates: Mutex<Vec<super::certs::CertificateExpiry>>,
    /// One read connection, reopened after an error.
    reader: Mutex<Option<Reader>>,
    /// Backlogs of the last hour, for the status page.
    pub history: super::History,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub agent_id: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    /// When this snapshot was taken (RFC 3339, UTC).
    pub time: String,
    pub ready: bool,
    /// Why the agent is not ready (empty when it is).
    pub not_ready_reasons: Vec<String>,
    pub journal: JournalReport,
    pub sources: Vec<SourceSnapshot>,
    pub sinks: Vec<SinkReport>,
    pub warnings: Vec<Warning>,
    /// Every certificate file the agent loaded, with its expiry.
    pub certificates: Vec<super::certs::CertificateExpiry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JournalReport {
    pub path: String,
    pub writer_alive: bool,
    pub head_seq: u64,
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub capacity_ratio: f64,
    /// Space left for unprivileged writers on the journal's filesystem
    /// (`statvfs` `f_bavail`); null if it cannot be read.
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    pub disk_free_ratio: Option<f64>,
    /// Events stored since this process opened the journal.
    pub events_stored: u64,
    /// Events not stored again because their `(source, id)` was known.
    pub duplicates: u64,
    pub evicted_telemetry: u64,
    pub evicted_critical: u64,
    pub quarantined: Option<QuarantineReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuarantineReport {
    pub moved_to: String,
    pub reason: String,
    pub time: String,
    /// Intact events of the damaged file copied into the fresh journal.
    pub salvaged_events: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub name: String,
    pub kind: &'static str,
    pub state: SinkState,
    pub cursor: u64,
    pub backlog_events: u64,
    pub oldest_undelivered_age_seconds: Option<f64>,
    pub delivered: u64,
    /// Of those, re-sends the upstream said it already held (JetStream).
    pub upstream_duplicates: u64,
    pub attempts: u64,
    pub dead_letters: u64,
    pub running: bool,
    pub last_success_time: Option<String>,
    pub last_error: Option<String>,
    pub last_error_time: Option<String>,
    /// `last_success_time` as µs since the epoch, for the metrics.
    #[serde(skip)]
    pub last_success_us: Option<i64>,
    /// Per class, for a sink that sends critical events first (one cursor
    /// each); empty for one in journal order over both classes.
    pub classes: Vec<ClassReport>,
    /// The OAuth2 token of an HTTPS sink that uses one (never the token
    /// itself); omitted otherwise, and until its first send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<crate::status::TokenState>,
}

/// A sink's backlog in one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    pub class: crate::event::Class,
    pub cursor: u64,
    pub backlog_events: u64,
    pub oldest_undelivered_age_seconds: Option<f64>,
}

/// Something the central team should look at; the agent may still be ready.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    pub kind: WarningKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    SinkStalled,
    JournalQuarantined,
    EventsEvicted,
    DiskLow,
}

impl WarningKind {
    pub const ALL: [WarningKind; 4] = [
        WarningKind::SinkStalled,
        WarningKind::JournalQuarantined,
        WarningKind::EventsEvicted,
        WarningKind::DiskLow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WarningKind::SinkStalled => "sink_stalled",
            WarningKind::JournalQuarantined => "journal_quarantined",
            WarningKind::EventsEvicted => "events_evicted",
            WarningKind::DiskLow => "disk_low",
        }
    }
}

/// Free and total bytes of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    pub free: u64,
    pub total: u64,
}

impl DiskSpace {
    /// The filesystem that holds `path` (a directory or a file in it).
    pub fn of(path: &Path) -> Option<DiskSpace> {
        let st = rustix::fs::statvfs(path).ok()?;
        Some(DiskSpace {
            free: st.f_bavail.saturating_mul(st.f_frsize),
            total: st.f_blocks.saturating_mul(st.f_frsize),
        })
    }

    pub fn free_ratio(self) -> f64 {
        if self.total == 0 {
            return 1.0;
        }
        self.free as f64 / self.total as f64
    }

    pub fn is_low(self) -> bool {
        self.total > 0 && self.free_ratio() < DISK_LOW_RATIO
    }
}

/// A sink's state from what its forwarder last published. `waiting` is how
/// long the sink has had undelivered events without a success: the shortest
/// of the time since its last success, the age of its oldest undelivered
/// event and the agent's uptime.
pub fn sink_state(
    backlog: u64,
    waiting: Option<Duration>,
    consecutive_failures: u64,
    stall_after: Duration,
) -> SinkState {
    match waiting {
        Some(w) if backlog > 0 && w >= stall_after => SinkState::Stalled,
        _ if consecutive_failures > 0 => SinkState::Retrying,
        _ => SinkState::Ok,
    }
}

impl AgentView {
    pub fn new(
        config: &Config,
        journal: Journal,
        sources: Vec<Arc<SourceStatus>>,
        sinks: Vec<Arc<SinkStatus>>,
    ) -> AgentView {
        AgentView {
            agent_id: config.agent.id.clone(),
            started: Instant::now(),
            journal,
            sources,
            sinks,
            ready: AtomicBool::new(false),
            stall_after: config
                .health
                .as_ref()
                .map_or(Duration::from_secs(60), |h| h.stall_after),
            supervisor: Arc::new(crate::supervise::Supervisor::new()),
            sink_lanes: {
                let sk = &config.sinks;
                sk.https
                    .iter()
                    .map(|x| (x.name.clone(), crate::config::lanes(&x.classes, x.priority)))
                    .chain(
                        sk.mqtt.iter().map(|x| {
                            (x.name.clone(), crate::config::lanes(&x.classes, x.priority))
                        }),
                    )
                    .chain(
                        sk.jetstream.iter().map(|x| {
                            (x.name.clone(), crate::config::lanes(&x.classes, x.priority))
                        }),
                    )
                    .collect()
            },
            certificates: Mutex::new(super::certs::expiries(config)),
            reader: Mutex::new(None),
            history: super::History::default(),
        }
    }

    /// The health listener reloaded its certificates: these are in use now.
    pub fn health_certificates_reloaded(&self, now: Vec<super::certs::CertificateExpiry>) {
        let mut certs = self.certificates.lock().unwrap_or_else(|p| p.into_inner());
        certs.retain(|c| !super::certs::is_health(c));
        certs.splice(0..0, now);
    }

    /// The lanes of the sink `name` (see [`crate::config::lanes`]); empty
    /// for an unknown sink.
    pub fn sink_lanes(&self, name: &str) -> Vec<Option<crate::event::Class>> {
        self.sink_lanes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    }

    /// Whether a sink of this name is configured.
    pub fn has_sink(&self, name: &str) -> bool {
        self.sinks.iter().any(|s| s.name == name)
    }

    /// Runs `f` on the shared read connection, opening it first if needed
    /// and dropping it after an error (the next call opens a fresh one).
    /// Blocking: call it from `spawn_blocking`.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        let mut slot = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let reader = match &mut *slot {
            Some(r) => r,
            empty => empty.insert(self.journal.reader()?),
        };
        let out = f(reader);
        if out.is_err() {
            *slot = None;
        }
        out
    }

    /// Why the agent's components are not running (without the sinks'
    /// stall check, which needs the journal: see [`AgentView::status`]).
    fn component_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ready.load(Ordering::Relaxed) {
            out.push("agent is starting or stopping".to_string());
        }
        if !self.journal.stats().writer_alive.load(Ordering::Relaxed) {
            out.push("journal writer is not running".to_string());
        }
        for s in &self.sources {
            if !s.started.load(Ordering::Relaxed) {
                out.push(format!("source '{}' is not started", s.name));
            }
        }
        for s in &self.sinks {
            if !s.progress().running {
                out.push(format!("forwarder of sink '{}' is not running", s.name));
            }
        }
        for f in self.supervisor.failures() {
            out.push(format!("{} has stopped ({})", f.task, f.how));
        }
        out
    }

    /// Builds the snapshot. Blocking (short journal reads and a `statvfs`):
    /// call it from `spawn_blocking`.
    pub fn status(&self) -> StatusReport {
        let js = self.journal.stats();
        let head = js.head_seq.load(Ordering::Relaxed);
        let used = js.used_bytes.load(Ordering::Relaxed);
        let max = self.journal.options().max_size;
        let now_us = unix_micros(SystemTime::now());
        let uptime = self.started.elapsed();
        let mut warnings = Vec::new();
        let mut not_ready_reasons = self.component_reasons();

        let sinks: Vec<SinkReport> = self
            .sinks
            .iter()
            .map(|s| {
                let p = s.progress();
                let lanes = self
                    .sink_lanes
                    .iter()
                    .find(|(n, _)| *n == s.name)
                    .map_or(&[None][..], |(_, l)| l.as_slice());
                let read = self.read(|r| {
                    Ok((
                        r.position(&s.name, lanes, head)?,
                        r.dead_letter_count(&s.name)?,
                    ))
                });
                let (cursor, backlog, oldest_us, dead_letters, classes) = match read {
                    Ok((pos, dl)) => (
                        pos.cursor,
                        pos.backlog,
                        pos.oldest_undelivered_us,
                        dl,
                        pos.classes,
                    ),
                    Err(_) => (
                        p.cursor,
                        head.saturating_sub(p.cursor),
                        None,
                        p.dead_letters,
                        Vec::new(),
                    ),
                };
                let age_us = |t: i64| (now_us - t).max(0) as u64;
                let classes = classes
                    .into_iter()
                    .map(|c| ClassReport {
                        class: c.class,
                        cursor: c.cursor,
                        backlog_events: c.backlog,
                        oldest_undelivered_age_seconds: c
                            .oldest_undelivered_us
                            .map(|t| Duration::from_micros(age_us(t)).as_secs_f64()),
                    })
                    .collect();
                let oldest_age = oldest_us.map(|t| Duration::from_micros(age_us(t)));
                let waiting = oldest_age.map(|oldest| {
                    let since_success = p
                        .last_success_us
                        .map_or(uptime, |t| Duration::from_micros(age_us(t)));
                    oldest.min(since_success).min(uptime)
                });
                let state = sink_state(backlog, waiting, p.consecutive_failures, self.stall_after);
                if state == SinkState::Stalled {
                    let message = format!(
                        "sink '{}' stalled: no delivery for {}s with {} events waiting",
                        s.name,
                        waiting.unwrap_or_default().as_secs(),
                        backlog
                    );
                    not_ready_reasons.push(message.clone());
                    warnings.push(Warning {
                        kind: WarningKind::SinkStalled,
                        message,
                    });
                }
                SinkReport {
                    name: s.name.clone(),
                    kind: s.kind,
                    state,
                    cursor,
                    backlog_events: backlog,
                    oldest_undelivered_age_seconds: oldest_age.map(|d| d.as_secs_f64()),
                    delivered: p.delivered,
                    upstream_duplicates: p.upstream_duplicates,
                    attempts: p.attempts,
                    dead_letters,
                    running: p.running,
                    last_success_time: p.last_success_us.map(rfc3339_us),
                    last_error: p.last_error.as_ref().map(|(_, m)| m.clone()),
                    last_error_time: p.last_error.as_ref().map(|(t, _)| rfc3339_us(*t)),
                    last_success_us: p.last_success_us,
                    classes,
                    oauth2: p.oauth2.clone(),
                }
            })
            .collect();

        let quarantined = self.journal.quarantine().map(|q| QuarantineReport {
            moved_to: q.moved_to.display().to_string(),
            reason: q.reason.clone(),
            time: humantime::format_rfc3339_seconds(crate::units::formattable(q.time)).to_string(),
            salvaged_events: q.salvaged.events,
        });
        if let Some(q) = &quarantined {
            warnings.push(Warning {
                kind: WarningKind::JournalQuarantined,
                message: format!(
                    "the journal was found damaged at start-up and replaced; {} intact events were copied into the new one; the damaged file is {}",
                    q.salvaged_events, q.moved_to
                ),
            });
        }
        let evicted_t = js.evicted_telemetry.load(Ordering::Relaxed);
        let evicted_c = js.evicted_critical.load(Ordering::Relaxed);
        if evicted_t + evicted_c > 0 {
            warnings.push(Warning {
                kind: WarningKind::EventsEvicted,
                message: format!(
                    "journal full: {evicted_t} telemetry and {evicted_c} critical events evicted"
                ),
            });
        }
        let journal_dir = self
            .journal
            .path()
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let disk = DiskSpace::of(journal_dir);
        if let Some(d) = disk.filter(|d| d.is_low()) {
            warnings.push(Warning {
                kind: WarningKind::DiskLow,
                message: format!(
                    "disk almost full: {} free of {} ({:.1}%) on the journal's filesystem",
                    crate::units::fmt_bytes(d.free),
                    crate::units::fmt_bytes(d.total),
                    100.0 * d.free_ratio()
                ),
            });
        }

        let report = StatusReport {
            agent_id: self.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: uptime.as_secs(),
            time: rfc3339_us(now_us),
            ready: not_ready_reasons.is_empty(),
            not_ready_reasons,
            journal: JournalReport {
                path: self.journal.path().display().to_string(),
                writer_alive: js.writer_alive.load(Ordering::Relaxed),
                head_seq: head,
                used_bytes: used,
                max_bytes: max,
                capacity_ratio: if max > 0 {
                    used as f64 / max as f64
                } else {
                    0.0
                },
                disk_free_bytes: disk.map(|d| d.free),
                disk_total_bytes: disk.map(|d| d.total),
                disk_free_ratio: disk.map(DiskSpace::free_ratio),
                events_stored: js.events_stored.load(Ordering::Relaxed),
                duplicates: js.duplicates.load(Ordering::Relaxed),
                evicted_telemetry: evicted_t,
                evicted_critical: evicted_c,
                quarantined,
            },
            sources: self.sources.iter().map(|s| s.snapshot()).collect(),
            sinks,
            warnings,
            certificates: self
                .certificates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        };
        self.history.record(&report, now_us);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(60);

    #[test]
    fn a_sink_with_a_backlog_and_no_success_for_stall_after_is_stalled() {
        let s = sink_state(5, Some(Duration::from_secs(60)), 3, STALL);
        assert_eq!(s, SinkState::Stalled);
    }

    #[test]
    fn a_failing_sink_is_retrying_until_stall_after() {
        let s = sink_state(5, Some(Duration::from_secs(59)), 1, STALL);
        assert_eq!(s, SinkState::Retrying);
    }

    #[test]
    fn a_sink_without_a_backlog_is_never_stalled() {
        assert_eq!(sink_state(0, None, 0, STALL), SinkState::Ok);
        assert_eq!(sink_state(0, None, 4, STALL), SinkState::Retrying);
        // Rows after the cursor that are all for other sinks: no oldest age.
        assert_eq!(sink_state(3, None, 0, STALL), SinkState::Ok);
    }

    #[test]
    fn a_slow_but_succeeding_sink_is_ok() {
        assert_eq!(
            sink_state(1000, Some(Duration::from_secs(1)), 0, STALL),
            SinkState::Ok
        );
    }

    #[test]
    fn under_five_percent_free_is_low() {
        let d = |free, total| DiskSpace { free, total };
        assert!(d(4, 100).is_low());
        assert!(!d(5, 100).is_low());
        assert!(!d(50, 100).is_low());
        // A filesystem that reports no size (some pseudo filesystems).
        assert!(!d(0, 0).is_low());
    }

    #[test]
    fn the_filesystem_of_a_temp_dir_has_space() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskSpace::of(dir.path()).unwrap();
        assert!(d.total > 0 && d.free <= d.total, "{d:?}");
    }
}
