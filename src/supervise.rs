//! Supervision of the agent's long-running tasks: sources, forwarders,
//! listeners (the journal writer is a thread watched through its own
//! heartbeat).
//!
//! A supervised task that ends before shutdown began, or panics, is logged
//! by name and recorded here; from then on `/readyz` answers not ready and
//! the systemd watchdog ping is withheld, so that systemd restarts the
//! agent instead of leaving it up with a part silently gone (a forwarder
//! that died while the watchdog was still fed would forward nothing, for
//! ever). Release builds abort on a panic (`panic = "abort"`), which ends
//! the process at once; this module is what catches the rest.
//!
//! It must never restart a task itself: a task dies for a reason the
//! process state may share, and a clean restart by systemd is the recovery
//! with a known starting point.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio::task::{AbortHandle, JoinHandle};
use tracing::error;

use crate::text;
use crate::units::unix_micros;

/// The task failures of one agent, and whether shutdown has begun.
#[derive(Debug, Default)]
pub struct Supervisor {
    stopping: AtomicBool,
    failures: Mutex<Vec<TaskFailure>>,
}

/// A supervised task that ended when it should not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// What the task is, e.g. `forwarder of sink 'central'`.
    pub task: String,
    /// `exited` or `panicked: <message>`.
    pub how: String,
    /// µs since the epoch.
    pub at_us: i64,
}

/// A supervised task: await it, or abort it past a deadline.
pub struct Supervised {
    watcher: JoinHandle<()>,
    abort: AbortHandle,
}

impl Supervised {
    /// Waits until the task has ended (and its end is recorded).
    pub async fn join(self) {
        let _ = self.watcher.await;
    }

    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Shutdown has begun: tasks ending from now on are expected to.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Every failure so far, oldest first.
    pub fn failures(&self) -> Vec<TaskFailure> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Records that `task` ended unexpectedly (`how`), unless shutdown has
    /// begun.
    pub fn record(&self, task: &str, how: String) {
        if self.is_stopping() {
            return;
        }
        error!(task = %task, how = %how, "a part of the agent has stopped; the agent is not ready and withholds the watchdog ping so that systemd restarts it");
        if let Ok(mut f) = self.failures.lock() {
            f.push(TaskFailure {
                task: task.to_string(),
                how,
                at_us: unix_micros(SystemTime::now()),
            });
        }
    }

    /// Spawns `fut` as the task named `task`, watched.
    pub fn spawn<F>(self: &std::sync::Arc<Self>, task: String, fut: F) -> Supervised
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let inner = tokio::spawn(fut);
        let abort = inner.abort_handle();
        let me = self.clone();
        let watcher = tokio::spawn(async move {
            match inner.await {
                Ok(()) => me.record(&task, "exited".to_string()),
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".to_string());
                    me.record(&task, format!("panicked: {}", text::bounded_error(&msg)));
                }
                // Aborted: only at shutdown, past its deadline.
                Err(_) => {}
            }
        });
        Supervised { watcher, abort }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_task_that_panics_or_exits_is_recorded_by_name() {
        let s = Arc::new(Supervisor::new());
        s.spawn("forwarder of sink 'a'".into(), async { panic!("boom") })
            .join()
            .await;
        s.spawn("source 'b'".into(), async {}).join().await;
        let f = s.failures();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].task, "forwarder of sink 'a'");
        assert_eq!(f[0].how, "panicked: boom");
        assert_eq!(f[1].task, "source 'b'");
        assert_eq!(f[1].how, "exited");
    }

    #[tokio::test]
    async fn tasks_ending_at_shutdown_or_aborted_are_not_failures() {
        let s = Arc::new(Supervisor::new());
        let t = s.spawn("forever".into(), std::future::pending());
        t.abort_handle().abort();
        t.join().await;
        s.stopping();
        s.spawn("done".into(), async {}).join().await;
        assert!(s.failures().is_empty());
    }
}
