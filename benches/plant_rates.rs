//! `cargo bench --bench plant_rates`: what one event costs at the rates a
//! plant gateway lives at, not only at saturation. Prints a table; records
//! go to BENCHMARKS.md by hand.
//!
//! For the MQTT source (the embedded rumqttd broker, one QoS 1 publisher,
//! 200-byte JSON over 10 topics) and for HTTP ingest (by default one event
//! per `POST`, each on its own connection-pooled request, the way MES
//! integrations post), each to an HTTPS sink (the embedded receiver), with
//! `sync = "full"` and defaults otherwise, at paced 10, 100, 1,000 and 5,000
//! events/s and at saturation (MQTT: a burst as fast as the publisher goes;
//! HTTP: 6 clients × 500 events per request), the real `plantrelay run`
//! binary as its own process. Before each row, 20,000 events at full speed
//! warm the journal, as on a gateway that has run for a while (its WAL past
//! its checkpoint and reused), and the bench then checkpoints it (see
//! `checkpoint`). Of the row's own events it measures:
//!
//! - bytes written to disk per event (`write_bytes` of `/proc/PID/io`) and
//!   write system calls per event (`syscw`);
//! - bytes the block device took per event (sectors written, from
//!   `/sys/dev/block/MAJ:MIN/stat` of the device that holds the journal):
//!   what the flash wears, the file system's own journal included; it
//!   counts every writer on that device, so it means something only on a
//!   machine that is otherwise idle ("–" where the device has no such
//!   counter, e.g. tmpfs);
//! - agent CPU µs per event (utime + stime of `/proc/PID/stat`);
//! - upstream requests per second (over the time events were sent);
//! - ack p50/p99: MQTT from publish to the journal commit (the row's
//!   receive time, taken as the commit starts; the agent acks the broker
//!   right after), HTTP from sending the `POST` to its `202`;
//! - delivery p50/p99: from publish or `POST` to the upstream's receipt
//!   (the n-th event counts as received when the receiver holds n new
//!   events; the receiver's count is polled every millisecond);
//! - with the HTTP rows, for every paced rate of 1,000/s or more, the
//!   floor under HTTP ingest's CPU: what a bare axum server on the same
//!   stack, storing nothing, costs per request under the same client (this
//!   binary run again with `PLANTRELAY_BENCH_FLOOR_SERVE`; its runtime
//!   has `PLANTRELAY_BENCH_FLOOR_WORKERS` workers, default 2 as the agent
//!   on two cores, 0 for a current-thread runtime).
//!
//! Knobs: `PLANTRELAY_BENCH_SCALE` (default 1) scales the run time of every
//! row; `PLANTRELAY_BENCH_LINGER` and `PLANTRELAY_BENCH_WINDOW` set
//! `batch_linger` and `commit_window` (unset: the defaults; `"0s"` for both
//! behaves as the releases before them did); `PLANTRELAY_BENCH_PAGE_SIZE`
//! sets `journal.page_size` (e.g. `"2KiB"`); `PLANTRELAY_BENCH_ONLY`
//! (`mqtt` or `http`) runs one source (`floor`: the floor rows alone);
//! `PLANTRELAY_BENCH_RATES` (e.g. `100,1000,sat`) picks rows;
//! `PLANTRELAY_BENCH_BIN` runs another `plantrelay` binary (an earlier
//! release, for the figures before); the knobs above must then stay unset,
//! as it does not know them;
//! `PLANTRELAY_BENCH_DIR` is where the temp dirs go (default ".");
//! `PLANTRELAY_BENCH_HTTP_EVENTS` (default 1) is the events per `POST` of
//! the paced HTTP rows (more than one: a `cloudevents-batch+json` array
//! every that many events, an MES that batches);
//! `PLANTRELAY_BENCH_BROKER` (`host:port`) puts another broker (e.g. a
//! Mosquitto of one's own) in place of the in-process one;
//! `PLANTRELAY_BENCH_AGENT_LOG` (a log filter, e.g.
//! `error,plantrelay::journal=trace`) keeps each row's agent log there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use plantrelay::demo::machines::EmbeddedBroker;
use plantrelay::demo::receiver::{EphemeralPki, PkiPaths, Receiver, ReceiverOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[path = "support/mod.rs"]
mod support;
use support::{clk_tck, head_seq, process_ticks};

const TOPICS: u64 = 10;
/// Saturation, HTTP: concurrent clients and events per request (as the
/// pipeline bench).
const SAT_CLIENTS: u64 = 6;
const SAT_REQUEST_EVENTS: u64 = 500;
/// Events sent at full speed before each row (whole HTTP requests): ~16 MB
/// of journal writes, four times the WAL's checkpoint size.
const WARM_EVENTS: u64 = 20_000;
/// Paced HTTP rows: at most this many requests in flight (the listener's
/// default `max_connections_per_ip` is 64).
const HTTP_POOL: usize = 48;

// Targets of the issue, with the defaults.
const BYTES_TARGET_100: f64 = 3.0 * 1024.0;
const BYTES_TARGET_1000: f64 = 1.5 * 1024.0;
const CPU_TARGET_US: f64 = 40.0;
const REQUESTS_TARGET: f64 = 10.0;
const ACK_P99_TARGET_MS: f64 = 50.0;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// 200 bytes of JSON carrying its publish time.
fn payload(i: u64) -> Vec<u8> {
    let mut s = format!(
        r#"{{"machine":"press{:02}","n":{i},"t_ns":{},"state":"running","temperature_c":61.5,"pad":""#,
        i % TOPICS,
        now_ns()
    );
    while s.len() < 198 {
        s.push('x');
    }
    s.push_str("\"}");
    s.into_bytes()
}

fn t_ns_of(data: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(data).ok()?;
    let at = s.find("\"t_ns\":")? + 7;
    s[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// One MES CloudEvent with ~200 bytes of data.
fn cloudevent(prefix: &str, i: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{prefix}-{i:09}","source":"urn:mes:plant-hamburg","type":"com.example.mes.confirmation","subject":"line3/press{:02}","time":"2026-11-29T10:00:00.123Z","data":{{"order":"4711-{i:09}","operation":"0010","qty":{},"unit":"PCE","workcenter":"PRESS07","material":"MAT-{:06}","batch":"B{:010}","operator":"op-{:04}","shift":"A","scrap":0,"note":"confirmed at line 3"}}}}"#,
        i % TOPICS,
        i % 97,
        i % 4999,
        i / 1000,
        i % 37
    )
}

/// The events `range` of `prefix` as one `cloudevents-batch+json` body.
fn batch_body(prefix: &str, range: std::ops::Range<u64>) -> String {
    let events: Vec<_> = range.map(|i| cloudevent(prefix, i)).collect();
    format!("[{}]", events.join(","))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    Mqtt,
    Http,
}

impl SourceKind {
    fn label(self) -> &'static str {
        match self {
            SourceKind::Mqtt => "MQTT",
            SourceKind::Http => "HTTP",
        }
    }
}

/// A paced rate, or `None`: saturation.
type Rate = Option<u64>;

/// How long a paced row publishes, before the scale: long enough for the
/// WAL to pass its checkpoint (4 MiB, `wal_autocheckpoint`) at least once
/// more, so that the bytes per event include the checkpoints' copies into
/// the database file in their steady share. The WAL fills at ~0.1 MB/s at
/// 10 events/s and ~0.2 MB/s at 100: rows of 30 and 20 s, as before (and
/// without the warm-up), ended before the first checkpoint and read
/// ~0.2 KB less per event at 100/s than the 3.0 KB of a longer run.
fn paced_seconds(rate: u64) -> f64 {
    match rate {
        0..=10 => 120.0,
        11..=100 => 60.0,
        _ => 10.0,
    }
}

/// Events of a paced row at `rate` (at least 20).
fn paced_count(rate: u64) -> u64 {
    ((rate as f64 * paced_seconds(rate) * support::scale()).round() as u64).max(20)
}

struct Row {
    source: SourceKind,
    rate: Rate,
    events: u64,
    bytes_per_event: f64,
    /// `None` where the journal's device has no block counters.
    device_bytes_per_event: Option<f64>,
    syscw_per_event: f64,
    cpu_us_per_event: f64,
    requests_per_s: f64,
    events_per_s: f64,
    ack: (f64, f64),
    delivery: (f64, f64),
    complete: bool,
}

struct Io {
    write_bytes: u64,
    syscw: u64,
}

fn proc_io(pid: u32) -> Io {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Io {
        write_bytes: field("write_bytes:"),
        syscw: field("syscw:"),
    }
}

/// Bytes written so far to the block device that holds `path` (sectors
/// written × 512, from `/sys/dev/block/MAJ:MIN/stat`); `None` when there
/// is no such device (tmpfs, overlay).
fn device_written(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    // glibc's `major`/`minor` encoding of `dev_t`.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    // The seventh field: sectors written, always of 512 bytes.
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

/// Checkpoints the journal's WAL from the bench, synced, before a row:
/// after the warm-up's burst the WAL holds up to a checkpoint's worth of
/// distinct pages (full table leaves, each written once), which the row's
/// first checkpoint would copy into the database file and count as the
/// row's (~0.2 KB per event at 1,000/s). A steady flow rewrites the same
/// few pages instead, and that is what the row is to measure.
fn checkpoint(db: &Path) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .expect("open the journal to checkpoint it");
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (busy, log, done): (i64, i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("checkpoint");
        // Readers (a sink's) may hold an older snapshot for a moment.
        if busy == 0 && done == log {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the journal's WAL could not be checkpointed after the warm-up ({done} of {log} frames)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Events per `POST` of the paced HTTP rows (`PLANTRELAY_BENCH_HTTP_EVENTS`).
fn http_events_per_post() -> u64 {
    std::env::var("PLANTRELAY_BENCH_HTTP_EVENTS")
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .expect("PLANTRELAY_BENCH_HTTP_EVENTS: a number of at least 1")
        })
        .unwrap_or(1)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

struct Env {
    dir: tempfile::TempDir,
    _pki: EphemeralPki,
    paths: PkiPaths,
    receiver: Arc<Receiver>,
    /// The in-process broker, unless `PLANTRELAY_BENCH_BROKER` names another.
    _broker: Option<EmbeddedBroker>,
    broker_addr: SocketAddr,
    linger: Option<String>,
    window: Option<String>,
    page_size: Option<String>,
}

impl Env {
    async fn new() -> Env {
        plantrelay::tls::install_crypto_provider();
        let base = std::env::var("PLANTRELAY_BENCH_DIR").unwrap_or_else(|_| ".".into());
        let dir = tempfile::Builder::new()
            .prefix("plantrelay-bench-rates-")
            .tempdir_in(base)
            .expect("tempdir");
        let pki = EphemeralPki::generate().expect("pki");
        let pki_dir = dir.path().join("pki");
        std::fs::create_dir_all(&pki_dir).expect("pki dir");
        let paths = pki.write_to(&pki_dir).expect("write pki");
        let mut opts = ReceiverOptions::new(&pki);
        opts.record_data = false;
        let receiver = Receiver::start(opts).await.expect("receiver");
        let (broker, broker_addr) = match std::env::var("PLANTRELAY_BENCH_BROKER") {
            Ok(addr) => (
                None,
                addr.parse().expect("PLANTRELAY_BENCH_BROKER: host:port"),
            ),
            Err(_) => {
                let b = EmbeddedBroker::start().await.expect("broker");
                let addr = b.addr();
                (Some(b), addr)
            }
        };
        Env {
            dir,
            _pki: pki,
            paths,
            receiver: Arc::new(receiver),
            _broker: broker,
            broker_addr,
            linger: std::env::var("PLANTRELAY_BENCH_LINGER").ok(),
            window: std::env::var("PLANTRELAY_BENCH_WINDOW").ok(),
            page_size: std::env::var("PLANTRELAY_BENCH_PAGE_SIZE").ok(),
        }
    }

    /// Writes the agent's config for one row; returns it, the state dir and
    /// the HTTP listen port (HTTP rows).
    fn config(&self, name: &str, source: SourceKind) -> (PathBuf, PathBuf, u16) {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        let port = support::free_port();
        let source_toml = match source {
            SourceKind::Mqtt => format!(
                r#"
[[sources.mqtt]]
name = "line"
url = "mqtt://{}"
topics = ["bench/#"]
"#,
                self.broker_addr
            ),
            SourceKind::Http => format!(
                r#"
[[sources.http]]
name = "mes"
listen = "127.0.0.1:{port}"
"#
            ),
        };
        let window = self
            .window
            .as_ref()
            .map(|w| format!("commit_window = \"{w}\"\n"))
            .unwrap_or_default();
        let page_size = self
            .page_size
            .as_ref()
            .map(|p| format!("page_size = \"{p}\"\n"))
            .unwrap_or_default();
        let linger = self
            .linger
            .as_ref()
            .map(|l| format!("batch_linger = \"{l}\"\n"))
            .unwrap_or_default();
        let state = dir.join("state");
        let text = format!(
            r#"
[agent]
id = "gw-bench"
state_dir = "{state}"
shutdown_timeout = "10s"

[journal]
sync = "full"
{window}{page_size}
{source_toml}
[[sinks.https]]
name = "central"
url = "{url}"
ca_file = "{ca}"
ca_only = true
{linger}"#,
            state = state.display(),
            url = self.receiver.url(),
            ca = self.paths.ca.display(),
        );
        let path = dir.join("plantrelay.toml");
        std::fs::write(&path, text).expect("write config");
        (path, state, port)
    }
}

struct Agent {
    child: Child,
}

impl Agent {
    fn spawn(config: &Path) -> Agent {
        let bin = std::env::var("PLANTRELAY_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_plantrelay").to_string());
        // PLANTRELAY_BENCH_AGENT_LOG: the agent's log filter, its log then
        // going to `<row>.agent.log` in PLANTRELAY_BENCH_DIR (to see inside
        // a row; the row's own directory goes away with the run).
        let log = std::env::var("PLANTRELAY_BENCH_AGENT_LOG").ok();
        let stderr = match &log {
            Some(_) => {
                let row = config
                    .parent()
                    .and_then(|d| d.file_name())
                    .expect("row dir");
                let base = std::env::var("PLANTRELAY_BENCH_DIR").unwrap_or_else(|_| ".".into());
                let path = Path::new(&base).join(format!("{}.agent.log", row.to_string_lossy()));
                Stdio::from(std::fs::File::create(path).expect("agent log"))
            }
            None => Stdio::null(),
        };
        let child = Command::new(bin)
            .args(["run", "-c"])
            .arg(config)
            .env("PLANTRELAY_LOG", log.as_deref().unwrap_or("error"))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn plantrelay");
        Agent { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// An MQTT publisher with QoS 1 (100 in flight) that keeps its connection
/// across rows of the same run.
async fn publish(broker: SocketAddr, count: u64, rate: Rate, first: u64) {
    let mut o = MqttOptions::new(
        format!("bench-pub-{}", now_ns()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 1000);
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..count {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let n = first + i;
            let topic = format!("bench/press{:02}/state", n % TOPICS);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload(n))
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < count {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("publisher: {e}"),
        }
    }
    let _client = producer.await.expect("producer");
}

/// Polls the receiver's count of new events every millisecond; returns
/// (when, count) at every change, until `stop`.
fn watch_receipts(
    receiver: &Arc<Receiver>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, u64)>> {
    let receiver = receiver.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut last = u64::MAX;
        while !stop.load(Ordering::Relaxed) {
            let n = receiver.stats().unique_ids;
            if n != last {
                seen.push((Instant::now(), n));
                last = n;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen
    })
}

/// Delivery latency of the k-th event sent (`sent[k]`): the first time the
/// receiver held `base + k + 1` events.
fn delivery_ms(sent: &[Instant], receipts: &[(Instant, u64)], base: u64) -> Vec<f64> {
    let mut out = Vec::with_capacity(sent.len());
    let mut j = 0;
    for (k, t) in sent.iter().enumerate() {
        let want = base + k as u64 + 1;
        while j < receipts.len() && receipts[j].1 < want {
            j += 1;
        }
        if let Some((at, _)) = receipts.get(j) {
            out.push(at.saturating_duration_since(*t).as_secs_f64() * 1e3);
        }
    }
    out
}

/// Waits until the receiver holds `want` new events or `limit` passes.
async fn wait_received(receiver: &Receiver, want: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while receiver.stats().unique_ids < want {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// The MQTT rows' send times: the `t_ns` each payload carries, and the
/// commit times, from the journal after `from_seq`.
fn committed(db: &Path, from_seq: u64) -> Vec<(i64, Option<u64>)> {
    let read = |c: rusqlite::Connection| -> rusqlite::Result<Vec<(i64, Option<u64>)>> {
        let mut st =
            c.prepare("SELECT recv_time, data FROM events WHERE seq >= ?1 ORDER BY seq")?;
        st.query_map([from_seq as i64], |r| {
            Ok((r.get::<_, i64>(0)?, t_ns_of(&r.get::<_, Vec<u8>>(1)?)))
        })?
        .collect()
    };
    support::open_ro(db).and_then(read).unwrap_or_default()
}

async fn run_row(env: &Env, source: SourceKind, rate: Rate, tck: f64) -> Row {
    let name = format!(
        "{}-{}",
        source.label().to_lowercase(),
        rate.map_or("sat".into(), |r| r.to_string())
    );
    let (config, state, port) = env.config(&name, source);
    let db = state.join("journal.db");
    let agent = Agent::spawn(&config);
    let pid = agent.pid();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let ingest = format!("http://127.0.0.1:{port}/v1/events");
    let mut seq_base = 0u64;

    // Ready: one event through to the upstream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let received_before = env.receiver.stats().unique_ids;
    loop {
        assert!(
            Instant::now() < deadline,
            "the agent did not start ({name})"
        );
        match source {
            SourceKind::Mqtt => {
                publish(env.broker_addr, 1, None, 1_000_000_000 + seq_base).await;
                seq_base += 1;
            }
            SourceKind::Http => {
                let ok = client
                    .post(&ingest)
                    .header("content-type", "application/cloudevents+json")
                    .body(cloudevent(&format!("{name}-probe"), seq_base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202);
                seq_base += u64::from(ok);
            }
        }
        if head_seq(&db) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probes = head_seq(&db);
    assert!(
        wait_received(
            &env.receiver,
            received_before + probes,
            Duration::from_secs(30)
        )
        .await,
        "probe not delivered ({name})"
    );
    // Warm the journal as on a gateway that has run for a while: its WAL
    // past its checkpoint and reused from its start. A fresh WAL grows with
    // every commit, and on ext4 with a journal each growth costs a journal
    // commit of the file's new size and blocks (2–3 times the agent's
    // bytes at the block device at 10 events/s), which a gateway pays once
    // after each start.
    match source {
        SourceKind::Mqtt => publish(env.broker_addr, WARM_EVENTS, None, 2_000_000_000).await,
        SourceKind::Http => {
            let prefix = format!("{name}-warm");
            for k in (0..WARM_EVENTS).step_by(SAT_REQUEST_EVENTS as usize) {
                let body = batch_body(&prefix, k..k + SAT_REQUEST_EVENTS);
                let accepted = client
                    .post(&ingest)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 202);
                assert!(accepted, "a warm-up batch was not accepted ({name})");
            }
        }
    }
    assert!(
        wait_received(
            &env.receiver,
            received_before + probes + WARM_EVENTS,
            Duration::from_secs(60)
        )
        .await,
        "warm-up not delivered ({name})"
    );
    // Let the warm-up's last writes (cursor, stream counters) settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let wal_db = db.clone();
    tokio::task::spawn_blocking(move || checkpoint(&wal_db))
        .await
        .expect("checkpoint task");

    let scale = support::scale();
    let per_post = http_events_per_post();
    let count = match rate {
        Some(r) => {
            let n = paced_count(r);
            match source {
                SourceKind::Mqtt => n,
                // Whole requests.
                SourceKind::Http => n.next_multiple_of(per_post),
            }
        }
        None => match source {
            SourceKind::Mqtt => ((100_000.0 * scale) as u64).max(2_000),
            SourceKind::Http => {
                // Whole requests for every client.
                let unit = SAT_CLIENTS * SAT_REQUEST_EVENTS;
                ((200_000.0 * scale) as u64).div_ceil(unit).max(2) * unit
            }
        },
    };
    let head0 = head_seq(&db);
    let base = env.receiver.stats().unique_ids;
    let requests0 = env.receiver.stats().requests;
    let io0 = proc_io(pid);
    let dev0 = device_written(&state);
    let cpu0 = process_ticks(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let receipts = watch_receipts(&env.receiver, stop.clone());
    let t0 = Instant::now();

    let mut sent: Vec<Instant> = Vec::new();
    let mut acks: Vec<f64> = Vec::new();
    match source {
        SourceKind::Mqtt => {
            // Send times of MQTT rows come from the payloads (below); here
            // only the pacing.
            publish(env.broker_addr, count, rate, 0).await;
        }
        SourceKind::Http => match rate {
            Some(r) => {
                (sent, acks) = post_paced(&client, &ingest, &name, count, r, per_post, t0).await;
            }
            None => {
                let per_client = count / SAT_CLIENTS;
                let mut tasks = Vec::new();
                for c in 0..SAT_CLIENTS {
                    let (client, url, name) = (client.clone(), ingest.clone(), name.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut lat = Vec::new();
                        let mut i = c * per_client;
                        while i < (c + 1) * per_client {
                            let body = batch_body(&name, i..i + SAT_REQUEST_EVENTS);
                            let t = Instant::now();
                            let resp = client
                                .post(&url)
                                .header("content-type", "application/cloudevents-batch+json")
                                .body(body)
                                .send()
                                .await;
                            assert!(
                                resp.is_ok_and(|r| r.status().as_u16() == 202),
                                "a batch was not accepted"
                            );
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                            i += SAT_REQUEST_EVENTS;
                        }
                        lat
                    }));
                }
                for t in tasks {
                    acks.extend(t.await.expect("client task"));
                }
            }
        },
    }
    let sending = t0.elapsed();
    let complete = wait_received(
        &env.receiver,
        base + count,
        Duration::from_secs(60) + sending,
    )
    .await;
    // The cursor write after the last batch.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let io1 = proc_io(pid);
    let dev1 = device_written(&state);
    let cpu1 = process_ticks(pid);
    let requests = env.receiver.stats().requests - requests0;
    stop.store(true, Ordering::Relaxed);
    let receipts = receipts.await.expect("receipts");

    if source == SourceKind::Mqtt {
        // Ack: publish → commit; delivery: publish → upstream, with the
        // publish time carried in each payload (same clock).
        let rows = committed(&db, head0 + 1);
        let t_ref = Instant::now();
        let ns_ref = now_ns();
        let mut sent_ns: Vec<u64> = Vec::with_capacity(rows.len());
        for (recv_us, t_ns) in rows {
            if let Some(t_ns) = t_ns {
                acks.push(((recv_us as f64) * 1e3 - t_ns as f64).max(0.0) / 1e6);
                sent_ns.push(t_ns);
            }
        }
        // Payload times (wall clock) onto the monotonic clock of receipts.
        sent = sent_ns
            .iter()
            .map(|&t| t_ref - Duration::from_nanos(ns_ref.saturating_sub(t)))
            .collect();
    }
    // HTTP at saturation has no per-event send times: no delivery figure.
    let delivery = delivery_ms(&sent, &receipts, base);
    drop(agent);
    let n = count as f64;
    let secs = sending.as_secs_f64().max(1e-3);
    Row {
        source,
        rate,
        events: count,
        bytes_per_event: io1.write_bytes.saturating_sub(io0.write_bytes) as f64 / n,
        device_bytes_per_event: dev0.zip(dev1).map(|(a, b)| b.saturating_sub(a) as f64 / n),
        syscw_per_event: io1.syscw.saturating_sub(io0.syscw) as f64 / n,
        cpu_us_per_event: cpu1.saturating_sub(cpu0) as f64 / tck * 1e6 / n,
        requests_per_s: requests as f64 / secs,
        events_per_s: n / secs,
        ack: p50_p99(acks),
        delivery: p50_p99(delivery),
        complete,
    }
}

/// Posts `count` CloudEvents to `url` at `rate` events/s from `t0`,
/// `per_post` to a request; the send time of every event and the time to
/// each answer (ms). Panics unless every answer is a `202`.
async fn post_paced(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    count: u64,
    rate: u64,
    per_post: u64,
    t0: Instant,
) -> (Vec<Instant>, Vec<f64>) {
    let mut sent = Vec::with_capacity(count as usize);
    let mut tasks = Vec::with_capacity(count.div_ceil(per_post) as usize);
    // An MES client keeps a bounded pool: more requests in flight than the
    // listener admits per address would be closed at once
    // (`max_connections_per_ip`). Were the agent slower than the rate, the
    // send times slip and the events/s column shows it.
    let pool = Arc::new(tokio::sync::Semaphore::new(HTTP_POOL));
    for i in (0..count).step_by(per_post as usize) {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = pool.clone().acquire_owned().await.expect("pool");
        let (client, url) = (client.clone(), url.to_string());
        let (content_type, body) = if per_post == 1 {
            ("application/cloudevents+json", cloudevent(name, i))
        } else {
            (
                "application/cloudevents-batch+json",
                batch_body(name, i..i + per_post),
            )
        };
        let now = Instant::now();
        sent.extend((0..per_post).map(|_| now));
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let resp = client
                .post(&url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await;
            let status = resp.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
            (status, t.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let mut acks = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (status, ms) = t.await.expect("post task");
        assert_eq!(status, Ok(202), "a POST was not accepted ({name})");
        acks.push(ms);
    }
    (sent, acks)
}

/// The floor under HTTP ingest's CPU: this bench binary, run again with
/// `PLANTRELAY_BENCH_FLOOR_SERVE=<addr>`, is a bare axum server on the
/// agent's stack (hyper HTTP/1.1, a two-worker Tokio runtime as the agent
/// has on two cores) that answers every `POST` to the ingest path with a
/// `202` and stores nothing: no journal, no commit, no sink.
async fn serve_floor(addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("floor server: bind");
    let app = axum::Router::new().route(
        plantrelay::sources::http::INGEST_PATH,
        axum::routing::post(|body: axum::body::Bytes| async move {
            (
                axum::http::StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "accepted": 1, "bytes": body.len() })),
            )
        }),
    );
    axum::serve(listener, app)
        .await
        .expect("floor server: serve");
}

/// One paced row against the floor server (one event per `POST`): its
/// CPU per request and the time to each `202`.
async fn floor_row(rate: u64, tck: f64) -> (f64, (f64, f64)) {
    let port = support::free_port();
    let exe = std::env::current_exe().expect("bench executable");
    // Ended on drop as an agent is (SIGTERM, then wait), also when a
    // `POST` fails the row.
    let server = Agent {
        child: Command::new(exe)
            .env("PLANTRELAY_BENCH_FLOOR_SERVE", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the floor server"),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let url = format!(
        "http://127.0.0.1:{port}{}",
        plantrelay::sources::http::INGEST_PATH
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client
        .post(&url)
        .body("{}")
        .send()
        .await
        .is_ok_and(|r| r.status().as_u16() == 202)
    {
        assert!(Instant::now() < deadline, "the floor server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let count = paced_count(rate);
    let pid = server.pid();
    let cpu0 = process_ticks(pid);
    let (_, acks) = post_paced(&client, &url, "floor", count, rate, 1, Instant::now()).await;
    let cpu1 = process_ticks(pid);
    drop(server);
    (
        cpu1.saturating_sub(cpu0) as f64 / tck * 1e6 / count as f64,
        p50_p99(acks),
    )
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    if let Ok(addr) = std::env::var("PLANTRELAY_BENCH_FLOOR_SERVE") {
        // PLANTRELAY_BENCH_FLOOR_WORKERS: the floor server's runtime, 0 for
        // a current-thread one (default 2, the agent's on two cores).
        let workers: usize = std::env::var("PLANTRELAY_BENCH_FLOOR_WORKERS")
            .map(|w| w.parse().expect("PLANTRELAY_BENCH_FLOOR_WORKERS: a number"))
            .unwrap_or(2);
        let runtime = match workers {
            0 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            n => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
        }
        .expect("floor server: runtime");
        runtime.block_on(serve_floor(&addr));
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("bench runtime")
        .block_on(bench());
}

async fn bench() {
    let env = Env::new().await;
    let tck = clk_tck();
    let only = std::env::var("PLANTRELAY_BENCH_ONLY").ok();
    println!(
        "plant_rates: scale {}, batch_linger {}, commit_window {}, page_size {}, HTTP events per POST {}, load {} at start",
        support::scale(),
        env.linger.as_deref().unwrap_or("default"),
        env.window.as_deref().unwrap_or("default"),
        env.page_size.as_deref().unwrap_or("default"),
        http_events_per_post(),
        loadavg()
    );
    let rates: Vec<Rate> = match std::env::var("PLANTRELAY_BENCH_RATES") {
        Ok(list) => list
            .split(',')
            .map(|r| match r.trim() {
                "sat" => None,
                n => Some(n.parse().expect("PLANTRELAY_BENCH_RATES: numbers or sat")),
            })
            .collect(),
        Err(_) => vec![Some(10), Some(100), Some(1000), Some(5000), None],
    };
    // PLANTRELAY_BENCH_ONLY: the one source to run, if set, or `floor`
    // for the floor rows alone.
    let floor_only = only
        .as_deref()
        .is_some_and(|o| o.eq_ignore_ascii_case("floor"));
    let runs = |source: SourceKind| {
        only.as_deref()
            .is_none_or(|o| o.eq_ignore_ascii_case(source.label()))
    };
    let mut rows = Vec::new();
    for source in [SourceKind::Mqtt, SourceKind::Http] {
        if !runs(source) || floor_only {
            continue;
        }
        for &rate in &rates {
            let row = run_row(&env, source, rate, tck).await;
            eprintln!(
                "  {} {}: {:.0} B/event, {:.1} µs/event (load {})",
                source.label(),
                rate.map_or("saturation".into(), |r| format!("{r}/s")),
                row.bytes_per_event,
                row.cpu_us_per_event,
                loadavg()
            );
            rows.push(row);
        }
    }
    println!();
    println!(
        "| source | rate | events | written per event | device writes per event | write calls per event | agent CPU per event | upstream requests/s | ack p50 / p99 ms | delivery p50 / p99 ms | events/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} KB | {} | {:.2} | {:.1} µs | {:.1} | {} / {} | {} / {} | {:.0}{} |",
            r.source.label(),
            r.rate.map_or("saturation".into(), |x| format!("{x}/s")),
            r.events,
            r.bytes_per_event / 1000.0,
            r.device_bytes_per_event
                .map_or("–".into(), |b| format!("{:.2} KB", b / 1000.0)),
            r.syscw_per_event,
            r.cpu_us_per_event,
            r.requests_per_s,
            fmt_ms(r.ack.0),
            fmt_ms(r.ack.1),
            fmt_ms(r.delivery.0),
            fmt_ms(r.delivery.1),
            r.events_per_s,
            if r.complete { "" } else { " (incomplete)" },
        );
    }
    println!();
    // The floor under HTTP ingest's CPU where the CPU target applies.
    let floor_rates: Vec<u64> = rates
        .iter()
        .flatten()
        .copied()
        .filter(|r| *r >= 1000)
        .collect();
    if !floor_rates.is_empty() && (runs(SourceKind::Http) || floor_only) {
        println!(
            "The floor: a bare axum server on the same stack that stores nothing, the same client, one event per POST:"
        );
        println!();
        println!("| rate | server CPU per request | answer p50 / p99 ms |");
        println!("|---|---|---|");
        for rate in floor_rates {
            let (cpu, (p50, p99)) = floor_row(rate, tck).await;
            println!(
                "| {rate}/s | {cpu:.1} µs | {} / {} |",
                fmt_ms(p50),
                fmt_ms(p99)
            );
        }
        println!();
    }
    let linger_ms = env
        .linger
        .as_deref()
        .and_then(|l| humantime::parse_duration(l).ok())
        .unwrap_or(plantrelay::sinks::DEFAULT_BATCH_LINGER)
        .as_secs_f64()
        * 1e3;
    for r in rows.iter().filter(|r| r.rate.is_some()) {
        let rate = r.rate.unwrap_or(0);
        let label = format!("{} {rate}/s", r.source.label());
        let mut misses = Vec::new();
        if rate >= 1000 && r.bytes_per_event > BYTES_TARGET_1000 {
            misses.push("≤ 1.5 KB written per event");
        } else if rate >= 100 && r.bytes_per_event > BYTES_TARGET_100 {
            misses.push("≤ 3 KB written per event");
        }
        if rate >= 1000 && r.cpu_us_per_event > CPU_TARGET_US {
            misses.push("≤ 40 µs CPU per event");
        }
        if r.requests_per_s > REQUESTS_TARGET {
            misses.push("≤ 10 upstream requests/s");
        }
        if r.ack.1 > ACK_P99_TARGET_MS {
            misses.push("ack p99 ≤ 50 ms");
        }
        if r.delivery.1 > linger_ms + 50.0 {
            misses.push("delivery p99 ≤ linger + 50 ms");
        }
        if misses.is_empty() {
            println!("{label}: targets met");
        } else {
            println!("{label}: missed {}", misses.join(", "));
        }
    }
    println!("load {} at end", loadavg());
}
