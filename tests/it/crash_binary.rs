//! Crash test with the real binary: `plantrelay run` is killed with SIGKILL
//! at random moments while an MES posts and the forwarder ships; it is
//! restarted each time. Every id that got a 202 must reach the receiver; per
//! stream the receiver sees `streamsequence` rise by one over new ids; the
//! journal holds every id once; re-sent ids are the only duplicates.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use support::agent::{Harness, http_client, mes_events, spawn, try_post, wait_listening};
use support::free_port;

/// Posts one batch; Some(true) on 202, Some(false) on another answer, None
/// when the connection failed (the agent died).
async fn post(client: &reqwest::Client, url: &str, events: &[Value]) -> Option<bool> {
    let resp = try_post(client, url, events).await.ok()?;
    Some(resp.status().as_u16() == 202)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_ingest_and_forwarding_loses_nothing_acknowledged() {
    let h = Harness::new().await;
    h.receiver.set_latency(Duration::from_millis(5));
    let port = free_port();
    let text = h
        .config_text(
            &format!("127.0.0.1:{port}"),
            &h.receiver.url(),
            "batch_max_events = 200",
            "",
        )
        .replace("sync = \"normal\"", "sync = \"full\"");
    let config = h.write_config(&text);
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let client = http_client();
    let mut rng = rand::rng();

    let mut acked: HashSet<String> = HashSet::new();
    let mut unanswered: Vec<Value> = Vec::new();
    let mut next = 0usize;
    let trials = 12;
    for trial in 0..trials {
        let mut child = spawn(&config);
        wait_listening(port).await;
        // An MES re-sends what it got no answer for.
        if !unanswered.is_empty() {
            let batch = std::mem::take(&mut unanswered);
            assert_eq!(
                post(&client, &url, &batch).await,
                Some(true),
                "trial {trial}: re-send"
            );
            acked.extend(batch.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        }
        let kill_at = Instant::now() + Duration::from_millis(rng.random_range(200..1500));
        while Instant::now() < kill_at {
            let n = rng.random_range(1..60);
            let mut batch = mes_events("crash", next + n, 8).split_off(next);
            next += n;
            // Unique ids across trials.
            for e in &mut batch {
                e["id"] = Value::String(format!("t{trial}-{}", e["id"].as_str().unwrap()));
            }
            match post(&client, &url, &batch).await {
                Some(true) => {
                    acked.extend(batch.iter().map(|e| e["id"].as_str().unwrap().to_string()))
                }
                _ => unanswered.extend(batch),
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    // Last life: re-send, let it drain, then stop it with SIGTERM.
    let mut child = spawn(&config);
    wait_listening(port).await;
    if !unanswered.is_empty() {
        assert_eq!(post(&client, &url, &unanswered).await, Some(true));
        acked.extend(
            unanswered
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string()),
        );
    }
    let want = acked.len() as u64;
    let delivered = h
        .receiver
        .wait_until(Duration::from_secs(120), |s| s.unique_ids >= want)
        .await;
    // kill(1) rather than a libc binding: one SIGTERM, as systemd sends.
    support::signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(delivered, "not everything acknowledged arrived");
    assert!(status.success(), "graceful stop on SIGTERM: {status}");

    let received: HashMap<String, usize> =
        h.receiver
            .ids()
            .into_iter()
            .fold(HashMap::new(), |mut m, (_, id)| {
                *m.entry(id).or_default() += 1;
                m
            });
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !received.contains_key(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged ids lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let v = h.receiver.verdict();
    assert_eq!(v.out_of_order, 0, "{v:?}");
    assert_eq!(v.missing, 0, "{v:?}");

    // The journal holds every id once: duplicates upstream are re-sends only.
    let rows = plantrelay::journal::Reader::open(&h.state_dir().join("journal.db"))
        .unwrap()
        .events_from(0, 10_000_000)
        .unwrap();
    let mut seen = HashSet::new();
    for r in &rows {
        assert!(seen.insert(r.id.clone()), "{} journaled twice", r.id);
    }
    let dup_events: Vec<_> = h
        .receiver
        .events()
        .into_iter()
        .filter(|e| e.duplicate)
        .collect();
    for d in &dup_events {
        assert!(seen.contains(&d.id));
    }
    eprintln!(
        "binary crash test: {trials} SIGKILLs, {} ids acknowledged, {} journaled, {} received, 0 lost, 0 out of order, {} re-sent duplicates upstream",
        acked.len(),
        rows.len(),
        v.unique_ids,
        v.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_lane_drain_loses_nothing_and_keeps_every_stream_in_order() {
    use plantrelay::event::{Class, NewEvent};
    let h = Harness::new().await;
    h.receiver.set_latency(Duration::from_millis(5));
    // An outage's backlog: telemetry over 10 machine streams, critical MES
    // events among it.
    let state = h.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    {
        let mut o = plantrelay::journal::JournalOptions::new(state.join("journal.db"));
        o.commit_window = Duration::ZERO;
        let j = plantrelay::journal::Journal::open(o).unwrap();
        let events: Vec<NewEvent> = (0..30_000)
            .map(|i| {
                let critical = i % 100 == 50;
                NewEvent {
                    source: "gw".into(),
                    id: format!("b-{i}"),
                    stream: if critical {
                        format!("mes/line{}", i % 3)
                    } else {
                        format!("machines/m{}", i % 10)
                    },
                    class: if critical {
                        Class::Critical
                    } else {
                        Class::Telemetry
                    },
                    event_type: "t".into(),
                    source_time: None,
                    data: b"{}".to_vec(),
                    attrs: None,
                }
            })
            .collect();
        for chunk in events.chunks(5000) {
            j.append(chunk.to_vec()).await.unwrap();
        }
        j.close().await;
    }
    let port = free_port();
    let text = h
        .config_text(
            &format!("127.0.0.1:{port}"),
            &h.receiver.url(),
            "batch_max_events = 250\nbatch_linger = \"0s\"",
            "",
        )
        .replace("sync = \"normal\"", "sync = \"full\"");
    let config = h.write_config(&text);
    let mut rng = rand::rng();
    for _ in 0..8 {
        let mut child = spawn(&config);
        wait_listening(port).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut child = spawn(&config);
    let delivered = h
        .receiver
        .wait_until(Duration::from_secs(120), |s| s.unique_ids >= 30_000)
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(delivered, "{:?}", h.receiver.stats());
    let v = h.receiver.verdict();
    assert_eq!(
        v.out_of_order, 0,
        "per stream, in order across kills: {v:?}"
    );
    assert_eq!(v.missing, 0, "{v:?}");
    // The critical events went first: all of them before most telemetry.
    let events = h.receiver.events();
    let last_critical = events
        .iter()
        .rposition(|e| e.subject.as_deref().is_some_and(|s| s.starts_with("mes/")))
        .unwrap();
    assert!(
        last_critical < events.len() / 2,
        "critical events at the end of the drain: {last_critical} of {}",
        events.len()
    );
}

/// The WAL loses its last commits after a SIGKILL (a power cut under
/// `sync = "normal"` does that; here the file is cut), after the upstream
/// already had their events: new events must not come with the `sequence`
/// or the `Idempotency-Key` of the lost ones, which an upstream that
/// deduplicates by key would drop as re-sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_wal_lost_delivered_commits_no_sequence_or_key_names_two_events() {
    let h = Harness::new().await;
    let port = free_port();
    let text = h.config_text(
        &format!("127.0.0.1:{port}"),
        &h.receiver.url(),
        "batch_max_events = 20\nbatch_linger = \"0s\"",
        "",
    );
    assert!(text.contains("sync = \"normal\""));
    let config = h.write_config(&text);
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let client = http_client();

    let mut child = spawn(&config);
    wait_listening(port).await;
    let first = mes_events("before", 300, 4);
    for chunk in first.chunks(10) {
        assert_eq!(post(&client, &url, chunk).await, Some(true));
    }
    assert!(
        h.receiver
            .wait_until(Duration::from_secs(60), |s| s.unique_ids >= 300)
            .await,
        "the first 300 were delivered"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Cut the WAL to a third: its last commits, delivered upstream, are gone.
    let db = h.state_dir().join("journal.db");
    let wal = h.state_dir().join("journal.db-wal");
    let len = std::fs::metadata(&wal).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let _ = std::fs::remove_file(h.state_dir().join("journal.db-shm"));
    let head = plantrelay::journal::Reader::open(&db)
        .unwrap()
        .head_seq()
        .unwrap();
    assert!(head < 300, "the cut lost commits (head {head})");

    let mut child = spawn(&config);
    wait_listening(port).await;
    let second = mes_events("after", 200, 4);
    for chunk in second.chunks(10) {
        assert_eq!(post(&client, &url, chunk).await, Some(true));
    }
    let delivered = h
        .receiver
        .wait_until(Duration::from_secs(60), |s| s.unique_ids >= 500)
        .await;
    support::signal(child.id(), "TERM");
    child.wait().unwrap();
    assert!(delivered, "the 200 new events were delivered");

    // One event per sequence, one set of events per key.
    let events = h.receiver.events();
    let mut by_sequence: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut by_batch: HashMap<usize, Vec<String>> = HashMap::new();
    for e in &events {
        by_sequence
            .entry(e.sequence.unwrap())
            .or_default()
            .insert(e.id.clone());
        by_batch.entry(e.batch).or_default().push(e.id.clone());
    }
    let reused: Vec<_> = by_sequence
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    assert!(
        reused.is_empty(),
        "{} sequences name two events, e.g. {:?}",
        reused.len(),
        reused.iter().take(3).collect::<Vec<_>>()
    );
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for (i, b) in h.receiver.batches().iter().enumerate() {
        let key = b.idempotency_key.clone().expect("every batch has a key");
        let mut ids = by_batch.remove(&i).unwrap_or_default();
        ids.sort();
        if let Some(before) = by_key.insert(key.clone(), ids.clone()) {
            assert_eq!(before, ids, "key {key} sent for two sets of events");
        }
    }
    let new_min = events
        .iter()
        .filter(|e| e.id.starts_with("after"))
        .filter_map(|e| e.sequence)
        .min()
        .unwrap();
    assert!(
        new_min > 300,
        "new events start past every seq handed out: {new_min}"
    );
}

/// Standard error that fails (here a pipe whose reader has gone, as when
/// the process reading the agent's output exits; a log file on a full disk
/// fails the same way) costs the log lines, not the agent: it takes and
/// delivers events, logs its shutdown into the broken pipe, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_standard_error_costs_log_lines_not_the_agent() {
    use std::io::Read;
    use std::process::{Command, Stdio};

    let h = Harness::new().await;
    let port = free_port();
    let text = h.config_text(&format!("127.0.0.1:{port}"), &h.receiver.url(), "", "");
    let config = h.write_config(&text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(&config)
        .env("PLANTRELAY_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    wait_listening(port).await;
    // The agent has logged its start: read some of it, then go away.
    let mut first = [0u8; 256];
    let n = stderr.read(&mut first).unwrap();
    assert!(n > 0, "the agent logs its start");
    drop(stderr);

    let url = format!("http://127.0.0.1:{port}/v1/events");
    let client = http_client();
    let events = mes_events("no-stderr", 100, 2);
    for chunk in events.chunks(10) {
        assert_eq!(post(&client, &url, chunk).await, Some(true));
    }
    assert!(
        h.receiver
            .wait_until(Duration::from_secs(60), |s| s.unique_ids >= 100)
            .await,
        "the 100 events were delivered with standard error gone"
    );
    support::signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the agent ended with {status} after logging into a broken pipe"
    );
}
