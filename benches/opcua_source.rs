//! `cargo bench --bench opcua_source`: data changes per second the OPC UA
//! source journals with `sync = "full"`, from the simulated press
//! (`plantrelay::demo::press`, an async-opcua server in this process) with
//! 10,000 monitored items all changing at 1 Hz and at 10 Hz.
//!
//! The agent is the release binary in its own process (`plantrelay run`),
//! its sink pointing nowhere (the bench measures the source path). For each
//! rate: the press starts paused; once the agent's start-up resync snapshot
//! (one event per item) is committed, the press runs a fixed number of ticks
//! and the bench waits until every change is committed. Reported: changes
//! offered per second, changes journaled per second (from the first tick to
//! the last commit), the agent's CPU seconds per 100k changes (user + system,
//! from `/proc`), and its peak RSS. `PLANTRELAY_BENCH_SCALE=0.1` shrinks the
//! tick counts.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plantrelay::demo::press::{PressOptions, SimPress, load_node};

#[path = "support/mod.rs"]
mod support;
use support::{clk_tck, head_seq, process_ticks, scale, status_kib};

const ITEMS: usize = 10_000;

struct Row {
    hz: u32,
    changes: u64,
    offered: f64,
    journaled: f64,
    cpu_per_100k: f64,
    rss_mib: u64,
}

async fn run_rate(hz: u32, ticks: u64, tck: f64) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = PressOptions::new(dir.path().join("press-pki"));
    opts.tick = Duration::from_millis(1000 / u64::from(hz));
    opts.load_items = ITEMS;
    opts.max_ticks = Some(ticks);
    opts.paused = true;
    let press = SimPress::start(&opts).await.unwrap();
    let publishing = if hz >= 10 { "200ms" } else { "500ms" };
    let mut text = format!(
        r#"
[agent]
id = "bench"
state_dir = "{state}"

[journal]
sync = "full"
max_size = "4GiB"

[[sources.opcua]]
name = "press"
endpoint = "{endpoint}"
security_policy = "None"
security_mode = "None"
publishing_interval = "{publishing}"
keep_alive_count = 20
lifetime_count = 60
connect_timeout = "30s"

[[sinks.https]]
name = "central"
url = "https://127.0.0.1:9/v1/events"
retry_initial = "5s"
retry_max = "60s"
"#,
        state = dir.path().join("state").display(),
        endpoint = press.endpoint(),
    );
    // Node tables after the sink table would land in the sink: put the
    // nodes right after the source.
    let mut nodes = String::new();
    for i in 0..ITEMS {
        nodes.push_str(&format!(
            "[[sources.opcua.nodes]]\nnode_id = \"{}\"\nstream = \"press/{}\"\nsampling_interval = \"0s\"\nqueue_size = 10\n",
            load_node(i),
            i % 16
        ));
    }
    let at = text.find("\n[[sinks.https]]").unwrap();
    text.insert_str(at, &format!("\n{nodes}"));
    let config = dir.path().join("plantrelay.toml");
    std::fs::write(&config, text).unwrap();
    let db = dir.path().join("state/journal.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(&config)
        .env("PLANTRELAY_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The start-up snapshot: one event per item.
    let deadline = Instant::now() + Duration::from_secs(120);
    while head_seq(&db) < ITEMS as u64 {
        assert!(Instant::now() < deadline, "the agent did not subscribe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = head_seq(&db);
    let cpu0 = process_ticks(pid);
    let t0 = Instant::now();
    press.resume();
    let changes = ITEMS as u64 * ticks;
    let offered_s = opts.tick.as_secs_f64() * ticks as f64;
    let deadline = Instant::now() + Duration::from_secs_f64(offered_s * 10.0 + 120.0);
    while head_seq(&db) < base + changes {
        if Instant::now() > deadline {
            eprintln!(
                "opcua_source: {hz} Hz: only {} of {changes} changes journaled before the deadline",
                head_seq(&db) - base
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let done = head_seq(&db) - base;
    let cpu_s = (process_ticks(pid) - cpu0) as f64 / tck;
    let rss = status_kib(pid, "VmHWM:").unwrap_or(0) / 1024;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    press.stop().await;
    Row {
        hz,
        changes: done,
        offered: changes as f64 / offered_s,
        journaled: done as f64 / elapsed,
        cpu_per_100k: cpu_s / (done.max(1) as f64 / 100_000.0),
        rss_mib: rss,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let tck = clk_tck();
    let ticks_1hz = ((30.0 * scale()) as u64).max(3);
    let ticks_10hz = ((100.0 * scale()) as u64).max(10);
    println!(
        "opcua_source: {ITEMS} monitored items, sync full, agent = release binary in its own process"
    );
    let rows = runtime.block_on(async {
        vec![
            run_rate(1, ticks_1hz, tck).await,
            run_rate(10, ticks_10hz, tck).await,
        ]
    });
    println!(
        "\n| items × rate | changes | offered/s | journaled/s | agent CPU s per 100k | agent peak RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {ITEMS} × {} Hz | {} | {:.0} | {:.0} | {:.2} | {} MiB |",
            r.hz, r.changes, r.offered, r.journaled, r.cpu_per_100k, r.rss_mib
        );
    }
}
