//! Shared helpers for the integration tests: in-process peers, fixtures and
//! fault injection, used by the modules of the one test binary.

pub mod agent;
#[cfg(feature = "interop")]
pub mod chaos;
pub mod fault_proxy;
pub mod journal;
pub mod logs;
#[cfg(feature = "interop")]
pub mod mosquitto;
pub mod mqtt;
#[cfg(feature = "interop")]
pub mod nats_server;
pub mod opcua_server;
pub mod upstream;

/// A free TCP port on 127.0.0.1 (bound and released: a peer started next
/// can take it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Every table of the config file, as written in TOML headers.
pub const CONFIG_TABLES: &[&str] = &[
    "[agent]",
    "[journal]",
    "[health]",
    "[[sources.http]]",
    "[[sources.mqtt]]",
    "[[sources.opcua]]",
    "[[sources.opcua.nodes]]",
    "[[sinks.https]]",
    "[sinks.https.oauth2]",
    "[[sinks.mqtt]]",
    "[[sinks.jetstream]]",
    "[[schemas]]",
];

/// Sends `signal` (`TERM`, `HUP`, ...) to `pid` with kill(1), as systemd
/// and operators do; asserts that it was delivered.
pub fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}
