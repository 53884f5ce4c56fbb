//! `plantrelay demo`: the whole store-and-forward path in one process on
//! loopback, with nothing to prepare. A simulated MES posts production events
//! over six streams to the HTTP ingest; the agent journals and forwards them
//! to an embedded HTTPS receiver that goes down for a while in the middle;
//! a simulated OPC UA press is subscribed and restarted once mid-demo;
//! the receiver then judges what arrived (delivered, lost, duplicates, out
//! of order) against what the agent acknowledged to the MES.
//!
//! Output goes to standard output for a person watching; the agent's own
//! logs stay on standard error (warnings only, by default).

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Mutex;

use super::receiver::{EphemeralPki, Receiver, ReceiverOptions};
use crate::config::Config;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the MES posts events.
    pub duration: Duration,
    /// Keep the state directory afterwards.
    pub keep: bool,
}

const STREAMS: [(&str, &str); 6] = [
    ("line1/orders", "com.example.mes.order.released"),
    ("line1/confirmations", "com.example.mes.operation.confirmed"),
    ("line1/consumption", "com.example.mes.material.consumed"),
    ("line2/orders", "com.example.mes.order.released"),
    ("line2/confirmations", "com.example.mes.operation.confirmed"),
    ("line2/quality", "com.example.mes.quality.result"),
];

fn mes_event(stream: &str, event_type: &str, n: u64) -> serde_json::Value {
    let order = format!("1000{:05}", n / 7);
    let data = match event_type {
        "com.example.mes.order.released" => {
            serde_json::json!({"order": order, "material": "BRACKET-7", "qty": 240})
        }
        "com.example.mes.operation.confirmed" => {
            serde_json::json!({"order": order, "operation": "0020", "yield": 12, "scrap": n.is_multiple_of(5) as u8})
        }
        "com.example.mes.material.consumed" => {
            serde_json::json!({"order": order, "material": "COIL-S235", "batch": format!("B{}", n % 31), "kg": 18.5})
        }
        _ => {
            serde_json::json!({"order": order, "characteristic": "hole-diameter", "value": 8.02, "ok": !n.is_multiple_of(13)})
        }
    };
    serde_json::json!({
        "specversion": "1.0",
        "id": format!("mes-{:016x}", rand::rng().random::<u64>()),
        "source": "urn:mes:plant-hamburg",
        "type": event_type,
        "subject": stream,
        "time": humantime::format_rfc3339_millis(crate::units::formattable(std::time::SystemTime::now()))
            .to_string(),
        "datacontenttype": "application/json",
        "data": data,
    })
}

struct Counters {
    posted: AtomicU64,
    acked: AtomicU64,
    reposted: AtomicU64,
    refused: AtomicU64,
    upstream_up: AtomicBool,
}

/// Runs the demo; returns the process exit status (0: nothing lost, nothing
/// out of order).
pub async fn run(opts: DemoOptions) -> Result<u8, String> {
    crate::tls::install_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("plantrelay-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let pki = EphemeralPki::generate().map_err(|e| e.to_string())?;
    let pki_dir = dir.path().join("pki");
    std::fs::create_dir_all(&pki_dir)
        .map_err(|e| format!("cannot create {}: {e}", pki_dir.display()))?;
    let paths = pki.write_to(&pki_dir).map_err(|e| e.to_string())?;
    let receiver = Arc::new(
        Receiver::start(ReceiverOptions::new(&pki))
            .await
            .map_err(|e| e.to_string())?,
    );
    let broker = super::machines::EmbeddedBroker::start().await?;
    let mut press_opts = super::press::PressOptions::new(dir.path().join("press-pki"));
    press_opts.tick = Duration::from_millis(250);
    let press = super::press::SimPress::start(&press_opts).await?;
    press_opts.port = press.addr().port();
    let state_dir = dir.path().join("state");
    let mut toml = format!(
        r#"
[agent]
id = "demo-gw"
state_dir = "{state}"
shutdown_timeout = "5s"

[journal]
sync = "full"
max_size = "256MiB"

[[sources.http]]
name = "mes"
listen = "127.0.0.1:0"
class = "critical"

[[sinks.https]]
name = "central"
url = "{url}"
ca_file = "{ca}"
ca_only = true
batch_max_events = 500
retry_initial = "200ms"
retry_max = "2s"
"#,
        state = state_dir.display(),
        url = receiver.url(),
        ca = paths.ca.display(),
    );
    toml.push_str(&super::machines::sources_toml(&broker));
    toml.push_str(&press_source_toml(&press.endpoint()));
    let config_path = dir.path().join("plantrelay.toml");
    std::fs::write(&config_path, &toml)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let agent = crate::agent::start(&config)
        .await
        .map_err(|e| e.to_string())?;
    let ingest = agent
        .http_addr("mes")
        .ok_or("the demo's HTTP source did not start")?;
    let ingest_url = format!("http://{ingest}/v1/events");

    let outage = Duration::from_secs(10).min(opts.duration / 3);
    let outage_at = opts.duration / 3;
    println!(
        "plantrelay demo: a simulated MES posts production events over {} streams for {}.",
        STREAMS.len(),
        crate::units::short_duration(opts.duration)
    );
    println!(
        "  machines ──MQTT──► embedded broker {} ──► plantrelay (acks after commit)",
        broker.url()
    );
    println!(
        "  press ──OPC UA──► simulated press {} (restarted at {}, namespace index moved) ──► plantrelay",
        press.endpoint(),
        crate::units::short_duration(opts.duration / 2)
    );
    println!(
        "  MES ──HTTP──► plantrelay (journal: {}) ──HTTPS──► central receiver {}",
        agent.journal.path().display(),
        receiver.url()
    );
    println!(
        "  the upstream goes down at {} for {}; nothing acknowledged may be lost or reordered.\n",
        crate::units::short_duration(outage_at),
        crate::units::short_duration(outage)
    );

    let counters = Arc::new(Counters {
        posted: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        reposted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        upstream_up: AtomicBool::new(true),
    });
    let acked_ids: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    super::machines::wait_until_subscribed(&agent.view.sources).await?;
    wait_opcua(&agent.view.sources, true, Duration::from_secs(30)).await?;
    let fleet_counters = Arc::new(super::machines::FleetCounters::default());
    let fleet = tokio::spawn(super::machines::run_fleet(
        broker.addr(),
        opts.duration,
        fleet_counters.clone(),
    ));

    // The MES: batches of 1–20 events every ~20 ms, sometimes re-posting a
    // batch as an MES does after a timeout.
    let mes = {
        let counters = counters.clone();
        let acked_ids = acked_ids.clone();
        let duration = opts.duration;
        tokio::spawn(async move {
            let client = match reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
            {
                Ok(c) => c,
                Err(e) => return Err(format!("cannot build the MES client: {e}")),
            };
            let mut n = 0u64;
            let mut last_batch: Option<String> = None;
            while started.elapsed() < duration {
                let repost = last_batch.is_some() && rand::rng().random_bool(0.05);
                let body = match (&last_batch, repost) {
                    (Some(b), true) => b.clone(),
                    _ => {
                        let k = rand::rng().random_range(1..=20);
                        let events: Vec<_> = (0..k)
                            .map(|_| {
                                n += 1;
                                let (stream, t) =
                                    STREAMS[rand::rng().random_range(0..STREAMS.len())];
                                mes_event(stream, t, n)
                            })
                            .collect();
                        serde_json::Value::Array(events).to_string()
                    }
                };
                let count = serde_json::from_str::<Vec<serde_json::Value>>(&body)
                    .map_or(0, |v| v.len()) as u64;
                let resp = client
                    .post(&ingest_url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body.clone())
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                        if repost {
                            counters.reposted.fetch_add(count, Ordering::Relaxed);
                        } else {
                            counters.posted.fetch_add(count, Ordering::Relaxed);
                            counters.acked.fetch_add(count, Ordering::Relaxed);
                            if let Ok(v) = serde_json::from_str::<Vec<serde_json::Value>>(&body) {
                                let mut ids = acked_ids.lock().await;
                                ids.extend(
                                    v.iter().filter_map(|e| e["id"].as_str().map(String::from)),
                                );
                            }
                            last_batch = Some(body);
                        }
                    }
                    _ => {
                        counters.refused.fetch_add(count, Ordering::Relaxed);
                    }
                }
                let pause = Duration::from_millis(rand::rng().random_range(5..35));
                tokio::time::sleep(pause).await;
            }
            Ok(())
        })
    };

    // The outage.
    let outage_task = {
        let receiver = receiver.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            tokio::time::sleep(outage_at).await;
            receiver.stop().await;
            counters.upstream_up.store(false, Ordering::Relaxed);
            tokio::time::sleep(outage).await;
            let r = receiver.restart().await;
            counters.upstream_up.store(true, Ordering::Relaxed);
            r
        })
    };

    // The press restarts mid-demo with its namespace array reordered.
    let press_task = {
        let sources = agent.view.sources.clone();
        let restart_at = opts.duration / 2;
        tokio::spawn(async move {
            tokio::time::sleep(restart_at).await;
            let before = opcua_events(&sources);
            press.stop().await;
            let _ = wait_opcua(&sources, false, Duration::from_secs(10)).await;
            press_opts.reorder = true;
            let press = super::press::SimPress::start(&press_opts).await?;
            let up = Instant::now();
            wait_opcua(&sources, true, Duration::from_secs(30)).await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while opcua_events(&sources) <= before + 3 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, String>((press, up.elapsed()))
        })
    };

    let tty = std::io::stdout().is_terminal();
    let progress = |final_line: bool| {
        let st = agent
            .view
            .sinks
            .first()
            .map(|s| s.progress())
            .unwrap_or_default();
        let head = agent.journal.stats().head_seq.load(Ordering::Relaxed);
        let line = format!(
            "[{:>6}] posted {:>6} | acked by agent {:>6} | journal backlog {:>6} | delivered {:>6} | upstream {}",
            crate::units::short_duration(started.elapsed()),
            counters.posted.load(Ordering::Relaxed),
            counters.acked.load(Ordering::Relaxed),
            head.saturating_sub(st.cursor),
            receiver.verdict().unique_ids,
            if counters.upstream_up.load(Ordering::Relaxed) {
                "up  "
            } else {
                "DOWN"
            },
        );
        let mut out = std::io::stdout().lock();
        if tty && !final_line {
            let _ = write!(out, "\r{line}");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    };
    let mut ticks = 0u64;
    while !mes.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ticks += 1;
        if tty || ticks.is_multiple_of(8) {
            progress(false);
        }
    }
    let mes_result = mes.await.map_err(|e| e.to_string())?;
    mes_result?;
    let (press, press_recovery) = press_task.await.map_err(|e| e.to_string())??;
    press.pause();
    fleet.await.map_err(|e| e.to_string())??;
    outage_task
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the receiver could not come back: {e}"))?;

    // The broker acknowledged the machines' last states before the agent
    // stored them: let those arrive first.
    super::machines::wait_until_stored(&agent.view.sources, &fleet_counters).await;
    // Drain: wait until the agent has delivered everything it acknowledged.
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    // The press keeps sending data changes until the end: what it sent
    // after the head the drain reached is not yet due upstream.
    let mut drained_head;
    loop {
        let head = agent.journal.stats().head_seq.load(Ordering::Relaxed);
        drained_head = head;
        let cursor = agent
            .view
            .sinks
            .first()
            .map(|s| s.progress().cursor)
            .unwrap_or(0);
        if cursor >= head || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tty {
            progress(false);
        }
    }
    if tty {
        println!();
    }
    progress(true);

    let verdict = receiver.verdict();
    let received: HashSet<String> = receiver.ids().into_iter().map(|(_, id)| id).collect();
    let mut acked = acked_ids.lock().await.clone();
    let mes_acked = acked.len();
    acked.extend(fleet_counters.acked_ids());
    // Every OPC UA data change the agent journaled must be delivered too.
    let press_ids = journaled_ids(&agent.journal, "press", drained_head);
    let press_changes = press_ids.len();
    acked.extend(press_ids);
    let lost = acked.iter().filter(|id| !received.contains(*id)).count() as u64;
    let st = agent
        .view
        .sinks
        .first()
        .map(|s| s.progress())
        .unwrap_or_default();
    println!();
    println!("verdict (computed by the receiver from ids and streamsequence):");
    println!(
        "  {:<26} {:>8} {:>9} {:>5} {:>11} {:>13}",
        "stream", "received", "delivered", "lost", "duplicates", "out of order"
    );
    for (stream, v) in &verdict.per_stream {
        println!(
            "  {:<26} {:>8} {:>9} {:>5} {:>11} {:>13}",
            stream,
            v.unique + v.duplicates,
            v.unique,
            v.missing,
            v.duplicates,
            v.out_of_order
        );
    }
    println!(
        "  {:<26} {:>8} {:>9} {:>5} {:>11} {:>13}",
        "total",
        verdict.events_received,
        verdict.unique_ids,
        lost,
        verdict.duplicates,
        verdict.out_of_order
    );
    println!();
    println!(
        "MES: {} events acknowledged with 202 after commit, {} re-posted (dropped as duplicates), {} refused; upstream: {} batches, {} failed attempts retried",
        mes_acked,
        counters.reposted.load(Ordering::Relaxed),
        counters.refused.load(Ordering::Relaxed),
        st.batches,
        st.attempts.saturating_sub(st.batches),
    );
    println!(
        "machines: {} states over MQTT (JSON and Sparkplug B), {} acknowledged by the broker with QoS 1; the agent acked each to the broker only after its journal commit",
        fleet_counters.published.load(Ordering::Relaxed),
        fleet_counters.acked.load(Ordering::Relaxed),
    );
    println!(
        "OPC UA press: {press_changes} data changes journaled; the press restarted with its namespace index moved, data changes resumed {} ms after it was back, with a resync snapshot",
        press_recovery.as_millis()
    );
    let ok = lost == 0 && verdict.out_of_order == 0 && verdict.missing == 0;
    println!(
        "result: {} (lost {lost}, out of order {}, duplicates at the receiver {} — those carry the same id and Idempotency-Key, so the upstream drops them)",
        if ok { "PASS" } else { "FAIL" },
        verdict.out_of_order,
        verdict.duplicates
    );
    agent.shutdown().await;
    press.stop().await;
    receiver.stop().await;
    if opts.keep {
        let kept = dir.keep();
        println!(
            "\njournal kept: {}\ntry: cargo run --release -- journal stats -c {}",
            kept.join("state/journal.db").display(),
            kept.join("plantrelay.toml").display()
        );
    }
    Ok(if ok { 0 } else { 1 })
}

/// The simulated press's `[[sources.opcua]]` section.
fn press_source_toml(endpoint: &str) -> String {
    use super::press::press_node;
    format!(
        r#"
[[sources.opcua]]
name = "press"
endpoint = "{endpoint}"
security_policy = "None"
security_mode = "None"
publishing_interval = "250ms"
keep_alive_count = 4
lifetime_count = 12
connect_timeout = "3s"

[[sources.opcua.nodes]]
node_id = "{state}"
stream = "line1/press/state"
state_map = {{ "0" = "STOPPED", "1" = "RUNNING", "2" = "FAULT" }}

[[sources.opcua.nodes]]
node_id = "{counter}"
stream = "line1/press/process"
sampling_interval = "100ms"

[[sources.opcua.nodes]]
node_id = "{temperature}"
stream = "line1/press/process"
sampling_interval = "100ms"
"#,
        state = press_node("State"),
        counter = press_node("Counter"),
        temperature = press_node("Temperature"),
    )
}

/// Waits until the OPC UA sources are all connected (or all not).
async fn wait_opcua(
    sources: &[Arc<crate::status::SourceStatus>],
    connected: bool,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while sources
        .iter()
        .any(|s| s.kind == "opcua" && s.connected.load(Ordering::Relaxed) != connected)
    {
        if Instant::now() > deadline {
            return Err(format!(
                "the agent's OPC UA source did not {} the simulated press within {}",
                if connected {
                    "connect to"
                } else {
                    "notice the loss of"
                },
                crate::units::short_duration(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Events the OPC UA sources stored so far.
fn opcua_events(sources: &[Arc<crate::status::SourceStatus>]) -> u64 {
    sources
        .iter()
        .filter(|s| s.kind == "opcua")
        .map(|s| s.events.load(Ordering::Relaxed))
        .sum()
}

/// The ids of every event `source` stored in the journal.
/// Ids of `source`'s events journaled at or before seq `through`.
fn journaled_ids(journal: &crate::journal::Journal, source: &str, through: u64) -> Vec<String> {
    let Ok(reader) = journal.reader() else {
        return Vec::new();
    };
    reader
        .events_from(0, 10_000_000)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.source == source && e.seq <= through)
        .map(|e| e.id)
        .collect()
}
