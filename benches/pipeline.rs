//! `cargo bench --bench pipeline`: the whole agent path on the real
//! components, against the embedded HTTPS receiver. Prints a table; records
//! go to BENCHMARKS.md by hand.
//!
//! - (a) ingest: events/s through `POST /v1/events` (plain HTTP, batches of
//!   500 CloudEvents with ~200 B of data, several keep-alive clients) until
//!   every `202`, with `sync = "full"`; once with the upstream stopped (no
//!   forwarding competes), once with it up (forwarding runs alongside).
//! - (b) drain: a journal pre-filled with 1M events (through
//!   `Journal::append`, agent not running), then `agent::start` in process
//!   with an HTTPS sink (gzip, 1000 events per batch): events/s from start
//!   until the receiver has every id.
//! - (c) the same drain with the real `plantrelay run` binary as a separate
//!   process, from a 100k and a 2M backlog: events/s and its peak RSS
//!   (VmHWM).
//! - (d) lanes, in process: a 2M telemetry backlog holding 200 critical
//!   events, drained with `priority = "critical_first"` and with
//!   `"journal_order"` (events/s, and the time until the 200 critical
//!   events are upstream); and a sink with `classes = ["critical"]` that
//!   wants 20k events of a 2M backlog (time until it has them).
//!
//! - (e) JetStream: a journal pre-filled with 500k events (~200 B of
//!   data), drained in process by a JetStream sink into a nats-server
//!   (`-js`, file storage, started by the bench), against a plain
//!   async-nats publisher of the same messages in the same run (pipelined,
//!   acks awaited per window of 256) as the ceiling: events/s, and CPU µs
//!   per event of this process (the server is another process).
//!
//! - (f) schema validation: (a) with the upstream stopped, for ~1 KiB
//!   production confirmations, once without `[[schemas]]` and once
//!   validated against the shipped `production-confirmation.v1` schema:
//!   events/s of each, and the ratio (target: at least 80 %).
//!
//! `PLANTRELAY_BENCH_SCALE=0.05` shrinks every count (for a quick look);
//! `PLANTRELAY_BENCH_ONLY=lanes` runs (d) alone, `=jetstream` (e) alone,
//! `=schema` (f) alone, `=process` (c) alone; `PLANTRELAY_BENCH_BIN` is
//! the binary (c) runs (default: the one cargo built for the bench);
//! `PLANTRELAY_BENCH_PAGE_SIZE` sets `journal.page_size` of every row
//! (e.g. `"2KiB"`; with `PLANTRELAY_BENCH_BIN`, only for a binary that
//! knows the setting); `PLANTRELAY_BENCH_DIR` is where the temp dirs go
//! (default ".").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use plantrelay::agent;
use plantrelay::config::Config;
use plantrelay::demo::receiver::{EphemeralPki, PkiPaths, Receiver, ReceiverOptions};
use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{Journal, SyncMode};

// The bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/it/support/nats_server.rs"]
mod nats_server;
#[path = "support/mod.rs"]
mod support;
use nats_server::NatsServer;
use support::{clk_tck, scale, stat_ticks, status_kib};

/// Events per ingest request.
const REQUEST_EVENTS: usize = 500;
/// Concurrent keep-alive ingest clients.
const CLIENTS: usize = 6;
/// Events per `Journal::append` call when pre-filling.
const FILL_BATCH: u64 = 1024;
/// Concurrent `Journal::append` callers when pre-filling.
const FILL_CALLERS: u64 = 2;
const STREAMS: u64 = 10;
const EVENT_TYPE: &str = "com.example.mes.confirmation";
const MES_SOURCE: &str = "urn:mes:plant-hamburg";
const SOURCE_TIME: &str = "2026-11-29T10:00:00.123Z";

// Targets.
const INGEST_TARGET: f64 = 100_000.0;
const DRAIN_TARGET: f64 = 100_000.0;
const RSS_TARGET_MIB: f64 = 64.0;
const RSS_SPREAD: f64 = 0.10;

fn n(x: u64) -> u64 {
    support::scaled(x, 1)
}

/// How long to wait for `count` events to arrive upstream before giving up
/// (the rate is then taken over what arrived): at most 150 s, so that a slow
/// drain cannot push the whole run past ~10 minutes.
fn wait_limit(count: u64) -> Duration {
    Duration::from_secs((30 + count / 10_000).min(150))
}

/// ~200 bytes of MES confirmation data.
fn data(i: u64) -> String {
    format!(
        r#"{{"order":"4711-{i:09}","operation":"0010","qty":{},"unit":"PCE","workcenter":"PRESS07","material":"MAT-{:06}","batch":"B{:010}","operator":"op-{:04}","shift":"A","scrap":0,"note":"confirmed at line 3"}}"#,
        i % 97,
        i % 4999,
        i / 1000,
        i % 37
    )
}

fn stream(i: u64) -> String {
    format!("line3/press{:02}", i % STREAMS)
}

/// One CloudEvent as the MES posts it.
fn cloudevent(prefix: &str, i: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{prefix}-{i:09}","source":"{MES_SOURCE}","type":"{EVENT_TYPE}","subject":"{}","time":"{SOURCE_TIME}","data":{}}}"#,
        stream(i),
        data(i)
    )
}

/// The same event as the HTTP source would journal it (the MES's `source`
/// kept as `originsource`).
fn new_event(prefix: &str, i: u64) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id: format!("{prefix}-{i:09}"),
        stream: stream(i),
        class: Class::Critical,
        event_type: EVENT_TYPE.into(),
        source_time: Some(SOURCE_TIME.into()),
        data: data(i).into_bytes(),
        attrs: Some(format!(r#"{{"originsource":"{MES_SOURCE}"}}"#)),
    }
}

struct Env {
    dir: tempfile::TempDir,
    pki: EphemeralPki,
    paths: PkiPaths,
}

impl Env {
    fn new() -> Env {
        plantrelay::tls::install_crypto_provider();
        let base = std::env::var("PLANTRELAY_BENCH_DIR").unwrap_or_else(|_| ".".into());
        let dir = tempfile::Builder::new()
            .prefix("plantrelay-bench-pipeline-")
            .tempdir_in(base)
            .expect("tempdir");
        let pki = EphemeralPki::generate().expect("pki");
        let pki_dir = dir.path().join("pki");
        std::fs::create_dir_all(&pki_dir).expect("pki dir");
        let paths = pki.write_to(&pki_dir).expect("write pki");
        Env { dir, pki, paths }
    }

    async fn receiver(&self) -> Receiver {
        let mut opts = ReceiverOptions::new(&self.pki);
        opts.record_data = false;
        Receiver::start(opts).await.expect("receiver")
    }

    /// Writes `<name>/plantrelay.toml` (state in `<name>/state`) and loads it.
    fn config(&self, name: &str, url: &str, sync: &str) -> (PathBuf, Config) {
        self.config_with(name, url, sync, "")
    }

    /// [`Env::config`] with `sink_extra` lines in the sink's table.
    fn config_with(
        &self,
        name: &str,
        url: &str,
        sync: &str,
        sink_extra: &str,
    ) -> (PathBuf, Config) {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let text = format!(
            r#"
[agent]
id = "gw-bench"
state_dir = "{state}"
shutdown_timeout = "10s"

[journal]
sync = "{sync}"
{page_size}
[[sources.http]]
name = "mes"
listen = "127.0.0.1:0"

[[sinks.https]]
name = "central"
url = "{url}"
ca_file = "{ca}"
ca_only = true
compression = "gzip"
batch_max_events = 1000
{sink_extra}
"#,
            state = dir.join("state").display(),
            ca = self.paths.ca.display(),
            page_size = std::env::var("PLANTRELAY_BENCH_PAGE_SIZE")
                .map(|p| format!("page_size = \"{p}\"\n"))
                .unwrap_or_default(),
        );
        let path = dir.join("plantrelay.toml");
        std::fs::write(&path, text).expect("write config");
        let config = Config::load(&path).expect("config");
        (path, config)
    }
}

/// Fills the journal the agent of `config` opens with `count` events, with
/// the agent not running (sync normal, batches of 1024); returns events/s.
async fn fill(config: &Config, count: u64, prefix: &'static str) -> f64 {
    let mut opts = config.journal_options();
    opts.sync = SyncMode::Normal;
    let j = tokio::task::spawn_blocking(move || Journal::open(opts))
        .await
        .expect("open task")
        .expect("open journal");
    let start = Instant::now();
    let per_caller = count.div_ceil(FILL_CALLERS);
    let tasks: Vec<_> = (0..FILL_CALLERS)
        .map(|c| {
            let j = j.clone();
            let (from, to) = (
                (c * per_caller).min(count),
                ((c + 1) * per_caller).min(count),
            );
            tokio::spawn(async move {
                let mut i = from;
                while i < to {
                    let k = FILL_BATCH.min(to - i);
                    let evs: Vec<_> = (i..i + k).map(|x| new_event(prefix, x)).collect();
                    j.append(evs).await.expect("append");
                    i += k;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("fill task");
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    assert_eq!(
        j.stats().head_seq.load(Ordering::Relaxed),
        count,
        "journal filled"
    );
    j.close().await;
    drop(j);
    rate
}

// ---------------------------------------------------------------------------
// /proc

/// Clock ticks per second for /proc/<pid>/stat.
/// CPU seconds of process `pid` (all threads, dead ones included) and of its
/// threads named `journal-writer`.
fn cpu_seconds(pid: &str, tck: f64) -> (f64, f64) {
    let total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0);
    let mut writer = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == "journal-writer" {
                writer += std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| stat_ticks(&s))
                    .unwrap_or(0);
            }
        }
    }
    (total as f64 / tck, writer as f64 / tck)
}

/// A `kB` field of `/proc/<pid>/status` (VmHWM, VmRSS), in KiB.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------
// (a) ingest

struct Ingest {
    events: u64,
    rate: f64,
    /// With forwarding: events/s from the first post until the receiver had
    /// them all.
    end_to_end: Option<f64>,
    commits: u64,
    /// CPU seconds of the bench process (agent and clients) while posting,
    /// and of its journal writer thread.
    cpu_s: f64,
    writer_cpu_s: f64,
}

async fn ingest(env: &Env, forward: bool, tck: f64) -> Ingest {
    let name = if forward { "ingest-fwd" } else { "ingest" };
    ingest_with(env, name, forward, cloudevent, "", tck).await
}

/// [`ingest`] of the events `event(name, i)` makes, with `extra` TOML at
/// the end of the config.
async fn ingest_with(
    env: &Env,
    name: &str,
    forward: bool,
    event: fn(&str, u64) -> String,
    extra: &str,
    tck: f64,
) -> Ingest {
    let receiver = env.receiver().await;
    if !forward {
        receiver.stop().await;
    }
    let (_, config) = env.config_with(name, &receiver.url(), "full", extra);
    let a = agent::start(&config).await.expect("agent start");
    let url = format!("http://{}/v1/events", a.http_addr("mes").expect("mes"));

    let requests = (n(200_000) as usize).div_ceil(REQUEST_EVENTS).max(CLIENTS);
    let events = (requests * REQUEST_EVENTS) as u64;
    // Bodies built beforehand: the client's JSON is not what is measured.
    let mut per_client: Vec<Vec<Bytes>> = vec![Vec::new(); CLIENTS];
    for r in 0..requests {
        let first = (r * REQUEST_EVENTS) as u64;
        let mut body = String::with_capacity(REQUEST_EVENTS * 400);
        body.push('[');
        for i in first..first + REQUEST_EVENTS as u64 {
            if i > first {
                body.push(',');
            }
            body.push_str(&event(name, i));
        }
        body.push(']');
        per_client[r % CLIENTS].push(Bytes::from(body));
    }
    let commits_before = a.journal.stats().commits.load(Ordering::Relaxed);
    let me = std::process::id().to_string();
    let (cpu0, writer0) = cpu_seconds(&me, tck);

    let start = Instant::now();
    let tasks: Vec<_> = per_client
        .into_iter()
        .map(|bodies| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("client");
                let mut accepted = 0u64;
                for body in bodies {
                    let resp = client
                        .post(&url)
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(body)
                        .send()
                        .await
                        .expect("post");
                    let status = resp.status().as_u16();
                    let text = resp.bytes().await.expect("answer");
                    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&text));
                    let v: serde_json::Value = serde_json::from_slice(&text).expect("json");
                    accepted += v["accepted"].as_u64().expect("accepted");
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.expect("client task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu1, writer1) = cpu_seconds(&me, tck);
    assert_eq!(accepted, events, "every event accepted as new");
    let commits = a.journal.stats().commits.load(Ordering::Relaxed) - commits_before;

    let end_to_end = if forward {
        let ok = receiver
            .wait_until(wait_limit(events), |s| s.unique_ids >= events)
            .await;
        ok.then(|| events as f64 / start.elapsed().as_secs_f64())
    } else {
        None
    };
    a.shutdown().await;
    drop(receiver);
    Ingest {
        events,
        rate: events as f64 / elapsed,
        end_to_end,
        commits,
        cpu_s: cpu1 - cpu0,
        writer_cpu_s: writer1 - writer0,
    }
}

// ---------------------------------------------------------------------------
// (f) schema validation at ingest

const CONFIRMATION_TYPE: &str = "plantrelay.mes.production-confirmation.v1";

/// A production confirmation as the MES posts it: ~1 KiB of data valid
/// under the shipped schema (about 30 rules apply to it).
fn confirmation(prefix: &str, i: u64) -> String {
    let data = format!(
        r#"{{"order":"{:07}","operation":"{:04}","work_center":"PRESS{:02}","plant":"1000","yield":{{"value":{},"unit":"C62"}},"scrap":{{"value":{},"unit":"C62"}},"scrap_reason":"DIM","rework":{{"value":{},"unit":"C62"}},"activities":[{{"activity":"setup","duration_s":1800}},{{"activity":"machine","duration_s":{}}},{{"activity":"labor","duration_s":14400}}],"start":"2026-12-05T06:00:00+01:00","end":"2026-12-05T14:05:30.250+01:00","posting_time":"2026-12-05T13:06:00Z","final_confirmation":{},"confirmation_text":"Lot {i} done, die changed","personnel":"{:08}","extensions":{{"shift":"B","line":{{"id":3,"speed_pct":92.5}},"mes_transaction":"MES-TX-{i:012}","terminal":"T-PRESS-{:02}","quality_gate":"passed","die":"DIE-{:05}","coil":"COIL-{:08}","remark":"confirmed by the line 3 terminal after the end-of-lot count; no deviation from the routing","inspection":{{"first_piece":"approved","inspector":"QA-{:04}","gauge":"G-17","measured_mm":12.03}},"tooling":{{"setup_sheet":"SS-4711-B","program":"PRG-0815-rev7"}}}}}}"#,
        1_000_000 + i % 9_000_000,
        10 * (1 + i % 9),
        i % STREAMS,
        i % 500,
        i % 7,
        i % 3,
        3600 + i % 10_000,
        i.is_multiple_of(5),
        i % 100_000_000,
        i % STREAMS,
        i % 20_000,
        i,
        i % 1_000,
    );
    format!(
        r#"{{"specversion":"1.0","id":"{prefix}-{i:09}","source":"{MES_SOURCE}","type":"{CONFIRMATION_TYPE}","subject":"{}","time":"{SOURCE_TIME}","data":{data}}}"#,
        stream(i)
    )
}

struct SchemaCost {
    without: Ingest,
    with: Ingest,
    data_bytes: usize,
}

async fn run_schema(env: &Env, tck: f64) -> SchemaCost {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/schemas/production-confirmation.v1.json");
    // The events are valid: refused ones would be a different measurement.
    let check = plantrelay::schema::Schema::load(&schema).expect("schema");
    let mut data = String::new();
    for i in [0, 7, 999_999] {
        let v: serde_json::Value = serde_json::from_str(&confirmation("x", i)).expect("json");
        data = v["data"].to_string();
        if let Err(e) = check.check(data.as_bytes()) {
            panic!("the bench's confirmation {i} is not valid: {e:?}");
        }
    }
    let without = ingest_with(env, "schema-off", false, confirmation, "", tck).await;
    let extra = format!(
        "\n[[schemas]]\ntype = \"{CONFIRMATION_TYPE}\"\nfile = \"{}\"\n",
        schema.display()
    );
    let with = ingest_with(env, "schema-on", false, confirmation, &extra, tck).await;
    SchemaCost {
        without,
        with,
        data_bytes: data.len(),
    }
}

fn print_schema(s: &SchemaCost) {
    let ratio = s.with.rate / s.without.rate;
    println!(
        "| ingest of {} B production confirmations, no schema | {} | {} | | |",
        s.data_bytes,
        count_label(s.without.events),
        rate(Some(s.without.rate)),
    );
    println!(
        "| the same, validated against production-confirmation.v1 | {} | {} ({:.0}% of it) | ≥ 80% | {} |",
        count_label(s.with.events),
        rate(Some(s.with.rate)),
        100.0 * ratio,
        if ratio >= 0.8 {
            "ok".to_string()
        } else {
            "**miss**".to_string()
        }
    );
}

fn print_schema_notes(s: &SchemaCost) {
    println!(
        "schema validation: CPU {:.1} µs per event without, {:.1} µs with (agent and clients; journal writer {:.1} / {:.1} µs)",
        1e6 * s.without.cpu_s / s.without.events as f64,
        1e6 * s.with.cpu_s / s.with.events as f64,
        1e6 * s.without.writer_cpu_s / s.without.events as f64,
        1e6 * s.with.writer_cpu_s / s.with.events as f64,
    );
}

// ---------------------------------------------------------------------------
// (b) drain in process

struct Drain {
    events: u64,
    fill_rate: f64,
    /// Seconds `agent::start` took (journal open: quick_check, dedup rebuild).
    open_s: f64,
    /// Events/s from start until the receiver had every id (on a timeout:
    /// what arrived by then).
    rate: f64,
    complete: bool,
    elapsed_s: f64,
    received: u64,
    batches: u64,
    wire_bytes: u64,
    decoded_bytes: u64,
    ordered: bool,
    /// CPU seconds of the whole bench process (agent and receiver) during
    /// the drain.
    cpu_s: f64,
    writer_cpu_s: f64,
}

async fn drain_in_process(env: &Env, count: u64, tck: f64) -> Drain {
    let receiver = env.receiver().await;
    let (_, config) = env.config("drain", &receiver.url(), "full");
    let fill_rate = fill(&config, count, "drain").await;
    let me = std::process::id().to_string();
    let (cpu0, _) = cpu_seconds(&me, tck);

    let start = Instant::now();
    let a = agent::start(&config).await.expect("agent start");
    let open_s = start.elapsed().as_secs_f64();
    let ok = receiver
        .wait_until(wait_limit(count), |s| s.unique_ids >= count)
        .await;
    let elapsed_s = start.elapsed().as_secs_f64();
    let (cpu1, writer_cpu_s) = cpu_seconds(&me, tck);
    let s = receiver.stats();
    a.shutdown().await;
    let v = receiver.verdict();
    drop(receiver);
    Drain {
        events: count,
        fill_rate,
        open_s,
        rate: s.unique_ids as f64 / elapsed_s,
        complete: ok,
        elapsed_s,
        received: s.unique_ids,
        batches: s.batches_accepted,
        wire_bytes: s.wire_bytes,
        decoded_bytes: s.decoded_bytes,
        ordered: v.is_complete_and_ordered(),
        cpu_s: cpu1 - cpu0,
        writer_cpu_s,
    }
}

// ---------------------------------------------------------------------------
// (d) lanes

/// Fills the journal of `config` with `count` telemetry events over
/// `STREAMS` machine streams, every `every`-th one a critical MES event.
async fn fill_lanes(config: &Config, count: u64, every: u64) {
    let mut opts = config.journal_options();
    opts.sync = SyncMode::Normal;
    let j = tokio::task::spawn_blocking(move || Journal::open(opts))
        .await
        .expect("open task")
        .expect("open journal");
    let mut i = 0;
    while i < count {
        let k = FILL_BATCH.min(count - i);
        let evs: Vec<_> = (i..i + k)
            .map(|x| {
                let mut e = new_event("lane", x);
                if x % every == every / 2 {
                    e.stream = format!("mes/line{}", x % 3);
                } else {
                    e.class = Class::Telemetry;
                    e.stream = format!("machines/m{}", x % STREAMS);
                }
                e
            })
            .collect();
        j.append(evs).await.expect("append");
        i += k;
    }
    j.close().await;
}

struct LaneDrain {
    events: u64,
    /// Seconds from `agent::start` until every critical event was upstream.
    critical_s: Option<f64>,
    rate: f64,
    complete: bool,
    ordered: bool,
}

/// Critical events the receiver has.
fn critical_received(r: &Receiver) -> usize {
    r.count_events(|e| e.subject.as_deref().is_some_and(|s| s.starts_with("mes/")))
}

async fn drain_lanes(env: &Env, name: &str, count: u64, every: u64, extra: &str) -> LaneDrain {
    let receiver = env.receiver().await;
    let (_, config) = env.config_with(name, &receiver.url(), "full", extra);
    fill_lanes(&config, count, every).await;
    let critical = (count / every) as usize;
    let wants_all = !(extra.contains("classes") || extra.contains("streams"));
    let want = if wants_all { count } else { critical as u64 };
    let start = Instant::now();
    let a = agent::start(&config).await.expect("agent start");
    let mut critical_s = None;
    let deadline = start + wait_limit(count);
    while Instant::now() < deadline {
        if critical_received(&receiver) >= critical {
            critical_s = Some(start.elapsed().as_secs_f64());
            break;
        }
        // Counting walks what arrived: often at first, rarely once much has.
        let pause = if receiver.stats().unique_ids < 50_000 {
            2
        } else {
            100
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let ok = receiver
        .wait_until(deadline.saturating_duration_since(Instant::now()), |s| {
            s.unique_ids >= want
        })
        .await;
    let elapsed_s = start.elapsed().as_secs_f64();
    let s = receiver.stats();
    a.shutdown().await;
    let v = receiver.verdict();
    LaneDrain {
        events: want,
        critical_s,
        rate: s.unique_ids as f64 / elapsed_s,
        complete: ok,
        ordered: v.out_of_order == 0 && v.missing == 0,
    }
}

// ---------------------------------------------------------------------------
// (c) drain by the binary, peak RSS

/// The child is killed if the bench panics with it still running.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct BinDrain {
    events: u64,
    fill_rate: f64,
    rate: f64,
    complete: bool,
    elapsed_s: f64,
    received: u64,
    /// Peak RSS (VmHWM), KiB.
    hwm_kib: u64,
    /// RSS just before SIGTERM, KiB.
    rss_end_kib: u64,
    startup_ms: Option<u64>,
    agent_cpu_s: f64,
    writer_cpu_s: f64,
    /// CPU seconds of the bench process (the receiver) meanwhile.
    receiver_cpu_s: f64,
    exit: String,
    ordered: bool,
}

/// The `plantrelay` binary the process rows run: `PLANTRELAY_BENCH_BIN`
/// (e.g. the packaged gateway build, or an older release to compare with),
/// else the one cargo built for this bench.
fn agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("PLANTRELAY_BENCH_BIN") {
        return PathBuf::from(bin);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_plantrelay"));
    if built.exists() {
        return built;
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("plantrelay")));
    if let Some(p) = beside.filter(|p| p.exists()) {
        return p;
    }
    println!(
        "note: {} missing; running cargo build --release",
        built.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "plantrelay"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build");
    assert!(status.success(), "cargo build --release failed");
    built
}

/// `startup_ms` of the agent's "plantrelay started" line (colour codes
/// stripped: the agent writes them even into a file).
fn startup_ms(log: &Path) -> Option<u64> {
    let raw = std::fs::read_to_string(log).ok()?;
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    let at = text.find("startup_ms=")? + "startup_ms=".len();
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

async fn drain_binary(env: &Env, bin: &Path, count: u64, label: &str, tck: f64) -> BinDrain {
    let receiver = env.receiver().await;
    let name = format!("rss-{label}");
    let (config_path, config) = env.config(&name, &receiver.url(), "full");
    let fill_rate = fill(&config, count, "rss").await;
    let log = env.dir.path().join(&name).join("agent.log");
    let me = std::process::id().to_string();
    let (bench_cpu0, _) = cpu_seconds(&me, tck);

    let start = Instant::now();
    let child = Command::new(bin)
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .env("PLANTRELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn plantrelay");
    let pid = child.id();
    let mut guard = ChildGuard(Some(child));
    let limit = wait_limit(count);
    let mut hwm = 0;
    let mut ok = false;
    while start.elapsed() < limit {
        if receiver
            .wait_until(Duration::from_millis(100), |s| s.unique_ids >= count)
            .await
        {
            ok = true;
            break;
        }
        hwm = hwm.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        if let Some(status) = guard.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("plantrelay exited early ({status}); its log:\n{tail}");
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    hwm = hwm.max(status_kib(pid, "VmHWM:").unwrap_or(0));
    let rss_end = status_kib(pid, "VmRSS:").unwrap_or(0);
    let (agent_cpu_s, writer_cpu_s) = cpu_seconds(&pid.to_string(), tck);
    let (bench_cpu1, _) = cpu_seconds(&me, tck);
    let received = receiver.stats().unique_ids;

    // Graceful stop, as systemd does it; the peak of the shutdown counts too.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let stop_by = Instant::now() + Duration::from_secs(20);
    let mut exit = "did not stop within 20 s of SIGTERM; killed".to_string();
    while Instant::now() < stop_by {
        hwm = hwm.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        if let Some(status) = guard.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            exit = status.to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(guard);
    let v = receiver.verdict();
    drop(receiver);
    BinDrain {
        events: count,
        fill_rate,
        rate: received as f64 / elapsed_s,
        complete: ok,
        elapsed_s,
        received,
        hwm_kib: hwm,
        rss_end_kib: rss_end,
        startup_ms: startup_ms(&log),
        agent_cpu_s,
        writer_cpu_s,
        receiver_cpu_s: bench_cpu1 - bench_cpu0,
        exit,
        ordered: v.is_complete_and_ordered(),
    }
}

// ---------------------------------------------------------------------------
// Output

fn count_label(x: u64) -> String {
    if x >= 1_000_000 && x.is_multiple_of(100_000) {
        format!("{}M", x as f64 / 1e6)
    } else if x >= 1000 && x.is_multiple_of(1000) {
        format!("{}k", x / 1000)
    } else {
        x.to_string()
    }
}

/// "ok" or how far below a floor target the figure is.
fn at_least(v: f64, target: f64) -> String {
    if v >= target {
        "ok".into()
    } else {
        format!("**miss** ({:.0}% below)", 100.0 * (1.0 - v / target))
    }
}

/// A drain's figure; a drain stopped by [`wait_limit`] says so.
fn drain_rate(rate: f64, complete: bool, received: u64, elapsed_s: f64) -> String {
    if complete {
        format!("{rate:.0} events/s")
    } else {
        format!(
            "{rate:.0} events/s (stopped after {elapsed_s:.0} s, {} delivered)",
            count_label(received)
        )
    }
}

fn at_most(v: f64, target: f64) -> String {
    if v <= target {
        "ok".into()
    } else {
        format!("**miss** ({:.0}% above)", 100.0 * (v / target - 1.0))
    }
}

fn rate(v: Option<f64>) -> String {
    v.map_or("timed out".into(), |v| format!("{v:.0} events/s"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The commit measured, and whether the working tree differed from it.
fn revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev} + uncommitted changes")
            } else {
                rev
            }
        }
        None => "?".into(),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Lanes {
    first: LaneDrain,
    order: LaneDrain,
    subset: LaneDrain,
    streams: LaneDrain,
}

async fn run_lanes(env: &Env) -> Lanes {
    let every = n(10_000).max(1);
    Lanes {
        first: drain_lanes(env, "lanes-first", n(2_000_000), every, "").await,
        order: drain_lanes(
            env,
            "lanes-order",
            n(2_000_000),
            every,
            r#"priority = "journal_order""#,
        )
        .await,
        subset: drain_lanes(
            env,
            "lanes-subset",
            n(2_000_000),
            100,
            r#"classes = ["critical"]"#,
        )
        .await,
        streams: drain_lanes(
            env,
            "lanes-streams",
            n(2_000_000),
            100,
            r#"streams = ["mes/#"]"#,
        )
        .await,
    }
}

/// The table rows of (d).
fn print_lanes(lanes: &Lanes) {
    let (lanes_first, lanes_order, lanes_subset) = (&lanes.first, &lanes.order, &lanes.subset);
    let lanes_streams = &lanes.streams;
    for (label, d) in [
        ("critical_first", lanes_first),
        ("journal_order", lanes_order),
    ] {
        println!(
            "| drain with priority = \"{label}\", in process, 1 critical in {} | {} | {} | ≥ 100k events/s | {} |",
            count_label(n(10_000).max(1)),
            count_label(d.events),
            drain_rate(d.rate, d.complete, d.events, d.events as f64 / d.rate),
            at_least(d.rate, DRAIN_TARGET)
        );
        println!(
            "| time until the critical events of that backlog are upstream ({label}) | {} | {} | {} | {} |",
            d.events / n(10_000).max(1),
            d.critical_s.map_or("never".into(), |s| format!("{s:.2} s")),
            if label == "critical_first" {
                "≤ 1 s"
            } else {
                "(for comparison)"
            },
            match (label, d.critical_s) {
                ("critical_first", Some(s)) => at_most(s, 1.0),
                ("critical_first", None) => "**miss**".to_string(),
                _ => String::new(),
            }
        );
    }
    println!(
        "| a sink with classes = [\"critical\"] wanting 1 % of a {} backlog | {} | {} | ≤ 2 s | {} |",
        count_label(n(2_000_000)),
        count_label(lanes_subset.events),
        lanes_subset
            .critical_s
            .map_or("never".into(), |s| format!("{s:.2} s")),
        lanes_subset
            .critical_s
            .map_or("**miss**".into(), |s| at_most(s, 2.0))
    );
    println!(
        "| a sink with streams = [\"mes/#\"] wanting 1 % of a {} backlog (read once, in passing) | {} | {} | ≤ 2 s | {} |",
        count_label(n(2_000_000)),
        count_label(lanes_streams.events),
        lanes_streams
            .critical_s
            .map_or("never".into(), |s| format!("{s:.2} s")),
        lanes_streams
            .critical_s
            .map_or("**miss**".into(), |s| at_most(s, 2.0))
    );
    for (label, d) in [
        ("critical_first", lanes_first),
        ("journal_order", lanes_order),
        ("classes = [critical]", lanes_subset),
        ("streams = [mes/#]", lanes_streams),
    ] {
        if !d.ordered {
            println!("lanes, {label}: NOT in order per stream or with holes");
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tck = clk_tck();
    let date = humantime::format_rfc3339_seconds(SystemTime::now());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("date: {date}");
    println!("nproc: {nproc}");
    println!("cpu: {}", cpu_model());
    println!("load average (1, 5, 15 min) at start: {}", loadavg());
    println!("revision: {}", revision());
    println!("scale: {}", scale());
    let _ = std::io::stdout().flush();

    let env = Env::new();
    if std::env::var("PLANTRELAY_BENCH_ONLY").as_deref() == Ok("lanes") {
        // (d) alone.
        let lanes = run_lanes(&env).await;
        println!();
        println!("| measure | events | figure | target | result |");
        println!("|---|---:|---:|---|---|");
        print_lanes(&lanes);
        return;
    }
    if std::env::var("PLANTRELAY_BENCH_ONLY").as_deref() == Ok("schema") {
        // (f) alone.
        let schema = run_schema(&env, tck).await;
        println!();
        println!("| measure | events | figure | target | result |");
        println!("|---|---:|---:|---|---|");
        print_schema(&schema);
        println!();
        print_schema_notes(&schema);
        return;
    }
    if std::env::var("PLANTRELAY_BENCH_ONLY").as_deref() == Ok("jetstream") {
        // (e) alone.
        let js = run_jetstream(&env, tck).await;
        println!();
        println!("| measure | events | figure | target | result |");
        println!("|---|---:|---:|---|---|");
        print_jetstream(&js);
        println!();
        print_jetstream_notes(&js);
        return;
    }
    let bin = agent_binary();
    if std::env::var("PLANTRELAY_BENCH_ONLY").as_deref() == Ok("process") {
        // (c) alone: the binary's own figures (with PLANTRELAY_BENCH_BIN, of
        // another build).
        println!("binary: {}", bin.display());
        let small = drain_binary(&env, &bin, n(100_000), "small", tck).await;
        let large = drain_binary(&env, &bin, n(2_000_000), "large", tck).await;
        println!();
        println!("| measure | events | figure | target | result |");
        println!("|---|---:|---:|---|---|");
        print_process(&small, &large);
        return;
    }
    let run_start = Instant::now();

    let ingest_stopped = ingest(&env, false, tck).await;
    let ingest_fwd = ingest(&env, true, tck).await;
    let drain = drain_in_process(&env, n(1_000_000), tck).await;
    let small = drain_binary(&env, &bin, n(100_000), "small", tck).await;
    let large = drain_binary(&env, &bin, n(2_000_000), "large", tck).await;
    let lanes = run_lanes(&env).await;
    let js = run_jetstream(&env, tck).await;
    let schema = run_schema(&env, tck).await;
    println!();
    println!("| measure | events | figure | target | result |");
    println!("|---|---:|---:|---|---|");
    println!(
        "| ingest, sync full, upstream stopped ({CLIENTS} clients × {REQUEST_EVENTS} events/request) | {} | {} | ≥ 100k events/s | {} |",
        count_label(ingest_stopped.events),
        rate(Some(ingest_stopped.rate)),
        at_least(ingest_stopped.rate, INGEST_TARGET)
    );
    println!(
        "| ingest, sync full, upstream up (forwarding alongside) | {} | {} | ≥ 100k events/s | {} |",
        count_label(ingest_fwd.events),
        rate(Some(ingest_fwd.rate)),
        at_least(ingest_fwd.rate, INGEST_TARGET)
    );
    println!(
        "| drain, in process (agent + receiver), from start | {} | {} | ≥ 100k events/s | {} |",
        count_label(drain.events),
        drain_rate(drain.rate, drain.complete, drain.received, drain.elapsed_s),
        at_least(drain.rate, DRAIN_TARGET)
    );
    print_process(&small, &large);
    print_lanes(&lanes);
    print_jetstream(&js);
    print_schema(&schema);
    let spread = mib(large.hwm_kib) / mib(small.hwm_kib).max(f64::MIN_POSITIVE) - 1.0;
    println!(
        "| peak RSS, {} vs {} backlog | | {:+.0}% | within ±10% | {} |",
        count_label(large.events),
        count_label(small.events),
        100.0 * spread,
        if spread.abs() <= RSS_SPREAD {
            "ok".to_string()
        } else {
            format!(
                "**miss** ({:.0} points over)",
                100.0 * (spread.abs() - RSS_SPREAD)
            )
        }
    );

    println!();
    println!(
        "ingest, upstream stopped: {} commits for {} requests ({:.1} requests per commit); CPU {:.2} s of {:.2} s wall × {nproc} cores = {:.1} µs per event, agent and clients (journal writer {:.1} µs)",
        ingest_stopped.commits,
        ingest_stopped.events / REQUEST_EVENTS as u64,
        (ingest_stopped.events / REQUEST_EVENTS as u64) as f64
            / ingest_stopped.commits.max(1) as f64,
        ingest_stopped.cpu_s,
        ingest_stopped.events as f64 / ingest_stopped.rate,
        1e6 * ingest_stopped.cpu_s / ingest_stopped.events as f64,
        1e6 * ingest_stopped.writer_cpu_s / ingest_stopped.events as f64,
    );
    println!(
        "ingest, upstream up: everything was upstream at {} from the first post; CPU while posting {:.1} µs per event",
        rate(ingest_fwd.end_to_end),
        1e6 * ingest_fwd.cpu_s / ingest_fwd.events as f64,
    );
    println!(
        "drain in process: fill {:.0} events/s; agent::start {:.2} s; {}/{} delivered in {:.1} s, {} batches, gzip {:.1} MiB → {:.1} MiB on the wire; in order without holes: {}; CPU {:.1} s of {:.1} s wall × {nproc} cores (journal writer {:.1} s)",
        drain.fill_rate,
        drain.open_s,
        drain.received,
        drain.events,
        drain.elapsed_s,
        drain.batches,
        drain.decoded_bytes as f64 / (1 << 20) as f64,
        drain.wire_bytes as f64 / (1 << 20) as f64,
        if drain.ordered { "ok" } else { "NOT ok" },
        drain.cpu_s,
        drain.elapsed_s,
        drain.writer_cpu_s
    );
    for d in [&small, &large] {
        println!(
            "`plantrelay run`, {} backlog: fill {:.0} events/s; startup {} ms; {}/{} delivered in {:.1} s; agent CPU {:.1} s (journal writer {:.1} s), receiver CPU {:.1} s; RSS at the end {:.1} MiB; exit after SIGTERM: {}; in order without holes: {}",
            count_label(d.events),
            d.fill_rate,
            d.startup_ms.map_or("?".into(), |m| m.to_string()),
            d.received,
            d.events,
            d.elapsed_s,
            d.agent_cpu_s,
            d.writer_cpu_s,
            d.receiver_cpu_s,
            mib(d.rss_end_kib),
            d.exit,
            if d.ordered { "ok" } else { "NOT ok" },
        );
    }
    print_jetstream_notes(&js);
    print_schema_notes(&schema);
    println!(
        "total bench time {:.0} s; load average at the end: {}",
        run_start.elapsed().as_secs_f64(),
        loadavg()
    );
    // Dropping env deletes every temp file.
    drop(env);
}

// ---------------------------------------------------------------------------
// (e) JetStream

/// Events per window of the plain publisher (acks awaited per window), and
/// the sink's `batch_max_events`.
const JS_WINDOW: usize = 256;
const JS_TARGET: f64 = 50_000.0;
/// The sink against the plain publisher of the same events.
const JS_SHARE_TARGET: f64 = 0.70;
const JS_AGENT: &str = "gw-bench";

struct JsRun {
    events: u64,
    rate: f64,
    elapsed_s: f64,
    complete: bool,
    cpu_s: f64,
}

struct JetStreamBench {
    fill_rate: f64,
    /// `priority = "journal_order"`: one cursor.
    sink: JsRun,
    stored: u64,
    /// `priority = "critical_first"` (the default): a cursor per class.
    lanes: JsRun,
    lanes_stored: u64,
    plain: JsRun,
}

/// The event `i` as the journal hands it back after the fill (seq `i + 1`).
fn stored_event(prefix: &str, i: u64) -> plantrelay::event::StoredEvent {
    let e = new_event(prefix, i);
    plantrelay::event::StoredEvent {
        seq: i + 1,
        source: e.source,
        id: e.id,
        stream: e.stream,
        stream_seq: i / STREAMS + 1,
        class: e.class,
        event_type: e.event_type,
        source_time: e.source_time,
        recv_time_us: 0,
        data: e.data,
        attrs: e.attrs,
    }
}

/// A plain async-nats JetStream publisher of the same messages (built by
/// the sink's own encoding on a blocking thread, ahead, as the forwarder
/// does): windows of [`JS_WINDOW`] publishes, pipelined, then their acks.
async fn plain_publisher(server: &NatsServer, count: u64, tck: f64) -> JsRun {
    use async_nats::jetstream::message::PublishMessage;
    use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
    use plantrelay::sinks::jetstream::{SubjectTemplate, outgoing};

    let js = server.jetstream().await;
    js.create_stream(StreamConfig {
        name: "CEILING".into(),
        subjects: vec!["ceiling.>".into()],
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .expect("create stream CEILING");
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let me = std::process::id().to_string();
    let (cpu0, _) = cpu_seconds(&me, tck);
    let start = Instant::now();
    let producer = tokio::task::spawn_blocking(move || {
        let template = SubjectTemplate::new("ceiling.{agent}.{stream}", JS_AGENT);
        let mut i = 0;
        while i < count {
            let k = (JS_WINDOW as u64).min(count - i);
            let window: Vec<_> = (i..i + k)
                .map(|x| outgoing(&template, JS_AGENT, &stored_event("plain", x)).into_parts())
                .collect();
            if tx.blocking_send(window).is_err() {
                return;
            }
            i += k;
        }
    });
    let mut acked = 0u64;
    while let Some(window) = rx.recv().await {
        let mut acks = Vec::with_capacity(window.len());
        for (subject, headers, payload) in window {
            let p = PublishMessage::build().payload(payload).headers(headers);
            acks.push(js.send_publish(subject, p).await.expect("publish"));
        }
        for a in acks {
            a.await.expect("ack");
            acked += 1;
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let (cpu1, _) = cpu_seconds(&me, tck);
    producer.await.expect("producer");
    JsRun {
        events: count,
        rate: acked as f64 / elapsed_s,
        elapsed_s,
        complete: acked == count,
        cpu_s: cpu1 - cpu0,
    }
}

/// A journal pre-filled with `count` events, drained by `agent::start`
/// with one JetStream sink (file-stored stream, batches of
/// [`JS_WINDOW`]): events/s and the agent's CPU from start until the
/// status counts every event delivered.
async fn drain_jetstream(
    env: &Env,
    server: &NatsServer,
    count: u64,
    priority: &str,
    tck: f64,
) -> (f64, JsRun, u64) {
    let stream = format!("BENCH_{}", priority.to_uppercase());
    let dir = env.dir.path().join(format!("jetstream-{priority}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let text = format!(
        r#"
[agent]
id = "{JS_AGENT}"
state_dir = "{state}"
shutdown_timeout = "10s"

[journal]
sync = "full"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:0"

[[sinks.jetstream]]
name = "central"
url = "{url}"
stream = "{stream}"
subject = "{priority}.{{agent}}.{{stream}}"
create_stream = true
batch_max_events = {JS_WINDOW}
priority = "{priority}"
"#,
        state = dir.join("state").display(),
        url = server.url(),
    );
    let path = dir.join("plantrelay.toml");
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(&path).expect("config");
    let fill_rate = fill(&config, count, "drain").await;
    let me = std::process::id().to_string();
    let (cpu0, _) = cpu_seconds(&me, tck);
    let start = Instant::now();
    let a = agent::start(&config).await.expect("agent start");
    let sink = a.view.sinks[0].clone();
    let deadline = start + wait_limit(count);
    while sink.progress().delivered < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let (cpu1, _) = cpu_seconds(&me, tck);
    let delivered = sink.progress().delivered;
    a.shutdown().await;
    let stored = server.count(&stream).await;
    (
        fill_rate,
        JsRun {
            events: count,
            rate: delivered as f64 / elapsed_s,
            elapsed_s,
            complete: delivered >= count,
            cpu_s: cpu1 - cpu0,
        },
        stored,
    )
}

async fn run_jetstream(env: &Env, tck: f64) -> JetStreamBench {
    let count = n(500_000);
    let server = NatsServer::start().await;
    let plain = plain_publisher(&server, count, tck).await;
    let (fill_rate, sink, stored) =
        drain_jetstream(env, &server, count, "journal_order", tck).await;
    let (_, lanes, lanes_stored) =
        drain_jetstream(env, &server, count, "critical_first", tck).await;
    JetStreamBench {
        fill_rate,
        sink,
        stored,
        lanes,
        lanes_stored,
        plain,
    }
}

fn print_jetstream(b: &JetStreamBench) {
    let share = b.sink.rate / b.plain.rate.max(f64::MIN_POSITIVE);
    println!(
        "| JetStream sink drain, in process (agent + nats-server -js, file storage), journal_order | {} | {} | ≥ 50k events/s | {} |",
        count_label(b.sink.events),
        drain_rate(b.sink.rate, b.sink.complete, b.stored, b.sink.elapsed_s),
        at_least(b.sink.rate, JS_TARGET)
    );
    println!(
        "| the same, critical_first (default; two lanes, no telemetry in the journal) | {} | {} | ≥ 50k events/s | {} |",
        count_label(b.lanes.events),
        drain_rate(
            b.lanes.rate,
            b.lanes.complete,
            b.lanes_stored,
            b.lanes.elapsed_s
        ),
        at_least(b.lanes.rate, JS_TARGET)
    );
    println!(
        "| plain async-nats publisher, same events (windows of {JS_WINDOW}) | {} | {} | ceiling | |",
        count_label(b.plain.events),
        drain_rate(
            b.plain.rate,
            b.plain.complete,
            b.plain.events,
            b.plain.elapsed_s
        ),
    );
    println!(
        "| JetStream sink / plain publisher | | {:.0}% | ≥ 70% | {} |",
        100.0 * share,
        if share >= JS_SHARE_TARGET {
            "ok".to_string()
        } else {
            format!(
                "**miss** ({:.0} points under)",
                100.0 * (JS_SHARE_TARGET - share)
            )
        }
    );
    println!(
        "| CPU per event, agent (journal_order drain, critical_first drain) vs plain publisher | | {:.1} µs, {:.1} µs vs {:.1} µs | | |",
        1e6 * b.sink.cpu_s / b.sink.events as f64,
        1e6 * b.lanes.cpu_s / b.lanes.events as f64,
        1e6 * b.plain.cpu_s / b.plain.events as f64,
    );
}

fn print_jetstream_notes(b: &JetStreamBench) {
    println!(
        "jetstream: fill {:.0} events/s; sink drain (journal_order) {:.1} s wall, agent CPU {:.1} s, stream holds {} of {}; (critical_first) {:.1} s wall, agent CPU {:.1} s, stream holds {} of {}; plain publisher {:.1} s wall, CPU {:.1} s",
        b.fill_rate,
        b.sink.elapsed_s,
        b.sink.cpu_s,
        b.stored,
        b.sink.events,
        b.lanes.elapsed_s,
        b.lanes.cpu_s,
        b.lanes_stored,
        b.lanes.events,
        b.plain.elapsed_s,
        b.plain.cpu_s,
    );
}

/// The rows of (c).
fn print_process(small: &BinDrain, large: &BinDrain) {
    for d in [small, large] {
        println!(
            "| drain, `plantrelay run` process, from spawn | {} | {} | ≥ 100k events/s | {} |",
            count_label(d.events),
            drain_rate(d.rate, d.complete, d.received, d.elapsed_s),
            at_least(d.rate, DRAIN_TARGET)
        );
    }
    for d in [small, large] {
        println!(
            "| peak RSS of `plantrelay run` (VmHWM), {} backlog | {} | {:.1} MiB | ≤ 64 MiB | {} |",
            count_label(d.events),
            count_label(d.events),
            mib(d.hwm_kib),
            at_most(mib(d.hwm_kib), RSS_TARGET_MIB)
        );
    }
}
