//! systemd integration for `Type=notify` units: `READY=1` once the journal is
//! open and every listener is bound, `WATCHDOG=1` only while the journal
//! writer and every forwarder are alive (so a hung writer gets the service
//! restarted), a one-line `STATUS=`, and `STOPPING=1` at shutdown.
//!
//! Without `NOTIFY_SOCKET` every call does nothing. Notification failures
//! are logged, never fatal; this module must never block the agent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::status::AgentView;
use crate::units::unix_micros;

/// A writer that has not completed a loop turn for this long is hung (its
/// idle ticker wakes it every second).
pub const WRITER_STALE: Duration = Duration::from_secs(5);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

/// Whether the parts the watchdog vouches for are alive; the reason if not.
pub fn liveness(view: &AgentView) -> Result<(), String> {
    let stats = view.journal.stats();
    if !stats.writer_alive.load(Ordering::Relaxed) {
        return Err("journal writer has stopped".into());
    }
    let beat = stats.writer_heartbeat_us.load(Ordering::Relaxed);
    let age_us = unix_micros(SystemTime::now()).saturating_sub(beat);
    if age_us > WRITER_STALE.as_micros() as i64 {
        return Err(format!(
            "journal writer has not completed a turn for {:.1}s",
            age_us as f64 / 1e6
        ));
    }
    for sink in &view.sinks {
        if !sink.progress().running {
            return Err(format!("forwarder of sink '{}' is not running", sink.name));
        }
    }
    if let Some(f) = view.supervisor.failures().first() {
        return Err(format!("{} has stopped ({})", f.task, f.how));
    }
    Ok(())
}

/// One line for `systemctl status`: per sink its backlog and state, and the
/// journal's use of its capacity.
pub fn summary(view: &AgentView) -> String {
    let stats = view.journal.stats();
    let head = stats.head_seq.load(Ordering::Relaxed);
    let used = stats.used_bytes.load(Ordering::Relaxed);
    let max = view.journal.options().max_size.max(1);
    let sinks: Vec<String> = view
        .sinks
        .iter()
        .map(|s| {
            let p = s.progress();
            let state = if p.consecutive_failures > 0 {
                "retrying"
            } else {
                "ok"
            };
            format!(
                "{} backlog {} ({state})",
                s.name,
                stats.backlog(head, p.cursor)
            )
        })
        .collect();
    format!(
        "{}; journal {:.0}% of {}",
        if sinks.is_empty() {
            "no sinks".to_string()
        } else {
            sinks.join(", ")
        },
        100.0 * used as f64 / max as f64,
        crate::units::fmt_bytes(max)
    )
}

/// Start-up is complete.
pub fn ready(view: &AgentView) {
    let status = summary(view);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pings the watchdog at half its interval while [`liveness`] holds, and
/// refreshes `STATUS=` every few seconds. Returns `None` without a service
/// manager.
pub fn spawn_watchdog(view: Arc<AgentView>, stop: CancellationToken) -> Option<JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog
        .map(|w| (w / 2).max(Duration::from_millis(100)))
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(10));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        let mut unhealthy_logged = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let status = summary(&view);
            match (watchdog.is_some(), liveness(&view)) {
                (true, Ok(())) => {
                    unhealthy_logged = false;
                    send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                }
                (true, Err(reason)) => {
                    if !unhealthy_logged {
                        warn!(reason = %reason, "withholding the watchdog ping: systemd restarts the service if this persists");
                        unhealthy_logged = true;
                    }
                    let line = format!("unhealthy: {reason}");
                    send(&[NotifyState::Status(&line)]);
                }
                (false, _) => send(&[NotifyState::Status(&status)]),
            }
            debug!(status = %status, "service manager notified");
        }
    }))
}
