//! What the tests of the journal share: its eviction counters and the
//! set-up of a child process that appends to it until it is killed.

use plantrelay::journal::Journal;
use std::sync::atomic::Ordering;

/// The events the journal has evicted so far: (telemetry, critical).
pub fn evicted(j: &Journal) -> (u64, u64) {
    let stats = j.stats();
    (
        stats.evicted_telemetry.load(Ordering::Relaxed),
        stats.evicted_critical.load(Ordering::Relaxed),
    )
}

/// Runs the test `name` (its full path in the test binary, e.g.
/// `journal_crash::crash_child_appender`: `--exact` matches nothing else)
/// alone as a child process, with `env` set to `dir`; its stdout is piped,
/// for the lines it prints.
pub fn spawn_child_test(name: &str, env: &str, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// For a test that is the child process of another: the directory its
/// parent passes in `env` (None when run as a test of its own) and a
/// two-thread runtime to run it in.
pub fn child_runtime(env: &str) -> Option<(std::path::PathBuf, tokio::runtime::Runtime)> {
    let dir = std::path::PathBuf::from(std::env::var(env).ok()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    Some((dir, rt))
}
