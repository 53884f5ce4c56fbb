//! What the bench binaries share: the scale knob and the `/proc` readings
//! (CPU ticks, VmHWM/VmRSS) they report. Each bench uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// `PLANTRELAY_BENCH_SCALE` (default 1): every count is multiplied by it.
pub fn scale() -> f64 {
    std::env::var("PLANTRELAY_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// `x` times the scale, at least `at_least`.
pub fn scaled(x: u64, at_least: u64) -> u64 {
    ((x as f64) * scale()).max(at_least as f64) as u64
}

/// A free TCP port on 127.0.0.1 (bound and released: a peer started next
/// can take it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// The journal's highest committed seq (0 while it cannot be read). Plain
/// SQL rather than `Reader`, which takes only its own schema version: the
/// benches also run earlier releases (`PLANTRELAY_BENCH_BIN`).
pub fn head_seq(db: &Path) -> u64 {
    open_ro(db)
        .and_then(|c| c.query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| r.get(0)))
        .map_or(0, |s: i64| s.max(0) as u64)
}

/// The journal opened read-only, whatever its schema version.
pub fn open_ro(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

/// Clock ticks per second for `/proc/.../stat` times.
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime in ticks from a `/proc/.../stat` line.
pub fn stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime in ticks of process `pid` (0 once it is gone).
pub fn process_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0)
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
