//! `cargo bench --bench journal`: append throughput through the public API
//! (random ids, batches of 1, 64 and 1024, sync full and normal, at 0→1M and
//! 4M→5M rows), the raw rusqlite ceiling for the same rows, read-in-order
//! throughput, dedup memory and open time. Prints a table; records go to
//! BENCHMARKS.md by hand.
//!
//! `PLANTRELAY_BENCH_SCALE=0.1` shrinks every count (for a quick look).

use std::path::Path;
use std::time::{Duration, Instant};

use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::dedup::{DedupIndex, key_hash};
use plantrelay::journal::{Journal, JournalOptions, Reader, SyncMode};
use rand::RngCore;

#[path = "support/mod.rs"]
mod support;

fn n(x: u64) -> u64 {
    support::scaled(x, 1)
}

fn random_id() -> String {
    format!(
        "{:032x}",
        rand::rng().next_u64() as u128 | ((rand::rng().next_u64() as u128) << 64)
    )
}

fn event(i: u64) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id: random_id(),
        stream: format!("line3/press{:02}", i % 10),
        class: Class::Critical,
        event_type: "com.example.mes.confirmation".into(),
        source_time: Some("2026-11-29T10:00:00.123Z".into()),
        data: format!(r#"{{"order":"4711-{i}","operation":"0010","qty":{},"unit":"PCE","workcenter":"PRESS07"}}"#, i % 97)
            .into_bytes(),
        attrs: None,
    }
}

fn options(path: &Path, sync: SyncMode) -> JournalOptions {
    let mut o = JournalOptions::new(path);
    o.sync = sync;
    o.max_size = 64 << 30;
    o.sinks = vec!["central".into()];
    o
}

/// Appends `count` events in calls of `batch` events, from enough concurrent
/// callers that small calls are grouped into shared commits (as concurrent
/// sources are in the agent). The events are built before the clock starts,
/// so only the journal is measured. Returns events/s.
async fn api_append(j: &Journal, count: u64, batch: u64, base: u64) -> f64 {
    let callers: u64 = if batch == 1 {
        256
    } else if batch < 1024 {
        16
    } else {
        2
    };
    let per_caller = count / callers;
    let calls: Vec<Vec<Vec<NewEvent>>> = (0..callers)
        .map(|c| {
            let first = base + c * per_caller;
            let mut calls = Vec::new();
            let mut done = 0;
            while done < per_caller {
                let k = batch.min(per_caller - done);
                calls.push((0..k).map(|i| event(first + done + i)).collect());
                done += k;
            }
            calls
        })
        .collect();
    let start = Instant::now();
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|calls| {
            let j = j.clone();
            tokio::spawn(async move {
                for evs in calls {
                    j.append(evs).await.expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (per_caller * callers) as f64 / start.elapsed().as_secs_f64()
}

/// The ceiling: the same rows into a table with only an integer primary
/// key, one transaction per 1024 rows, events built before the clock
/// starts. Returns rows/s.
fn raw_insert(conn: &rusqlite::Connection, count: u64, base: u64) -> f64 {
    let events: Vec<NewEvent> = (0..count).map(|i| event(base + i + 1)).collect();
    let start = Instant::now();
    for (c, chunk) in events.chunks(1024).enumerate() {
        let tx = conn.unchecked_transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO events (seq, source, event_id, stream, stream_seq, class, type, source_time, recv_time, data, attrs, size)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .expect("prepare");
            for (i, e) in chunk.iter().enumerate() {
                let seq = (base + (c * 1024 + i) as u64 + 1) as i64;
                st.execute(rusqlite::params![
                    seq,
                    e.source,
                    e.id,
                    e.stream,
                    seq,
                    0,
                    e.event_type,
                    e.source_time,
                    seq,
                    e.data,
                    e.attrs,
                    e.size() as i64
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    count as f64 / start.elapsed().as_secs_f64()
}

fn raw_open(path: &Path, sync: SyncMode) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.pragma_update_and_check(None, "journal_mode", "wal", |_| Ok(()))
        .expect("wal");
    conn.pragma_update(
        None,
        "synchronous",
        if sync == SyncMode::Full {
            "FULL"
        } else {
            "NORMAL"
        },
    )
    .expect("sync");
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, source TEXT, event_id TEXT, stream TEXT,
         stream_seq INTEGER, class INTEGER, type TEXT, source_time TEXT, recv_time INTEGER, data BLOB,
         attrs TEXT, size INTEGER)",
    )
    .expect("schema");
    conn
}

struct Row {
    what: String,
    sync: &'static str,
    batch: u64,
    at: String,
    rate: f64,
    ceiling: Option<f64>,
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| what | sync | batch | rows in journal | events/s | % of raw ceiling |");
    println!("|---|---|---:|---|---:|---:|");
    for r in rows {
        let pct = r
            .ceiling
            .map_or("".to_string(), |c| format!("{:.0}%", 100.0 * r.rate / c));
        println!(
            "| {} | {} | {} | {} | {:.0} | {} |",
            r.what, r.sync, r.batch, r.at, r.rate, pct
        );
    }
}

fn label(a: u64, b: u64) -> String {
    let f = |x: u64| {
        if x >= 1_000_000 {
            format!("{}M", x as f64 / 1e6)
        } else {
            format!("{}k", x / 1000)
        }
    };
    format!("{} → {}", f(a), f(b))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir =
        tempfile::tempdir_in(std::env::var("PLANTRELAY_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("tempdir");
    let mut rows = Vec::new();
    let m1 = n(1_000_000);
    let m4 = n(4_000_000);
    for sync in [SyncMode::Full, SyncMode::Normal] {
        let sname = if sync == SyncMode::Full {
            "full"
        } else {
            "normal"
        };
        // The ceiling first, for both phases.
        let raw_path = dir.path().join(format!("raw-{sname}.db"));
        let conn = raw_open(&raw_path, sync);
        let raw_low = raw_insert(&conn, m1, 0);
        let mut filled = m1;
        while filled < m4 {
            let k = m1.min(m4 - filled);
            let _ = raw_insert(&conn, k, filled);
            filled += k;
        }
        let raw_high = raw_insert(&conn, m1, m4);
        drop(conn);
        let _ = std::fs::remove_file(&raw_path);
        rows.push(Row {
            what: "raw rusqlite, integer PK only".into(),
            sync: sname,
            batch: 1024,
            at: label(0, m1),
            rate: raw_low,
            ceiling: None,
        });
        rows.push(Row {
            what: "raw rusqlite, integer PK only".into(),
            sync: sname,
            batch: 1024,
            at: label(m4, m4 + m1),
            rate: raw_high,
            ceiling: None,
        });

        let path = dir.path().join(format!("journal-{sname}.db"));
        let j = Journal::open(options(&path, sync)).expect("open");
        let mut base = 0;
        let rate = api_append(&j, m1, 1024, base).await;
        base += m1;
        rows.push(Row {
            what: "Journal::append, random ids".into(),
            sync: sname,
            batch: 1024,
            at: label(0, m1),
            rate,
            ceiling: Some(raw_low),
        });
        for (batch, count) in [(64, n(200_000)), (1, n(50_000))] {
            let rate = api_append(&j, count, batch, base).await;
            rows.push(Row {
                what: "Journal::append, random ids".into(),
                sync: sname,
                batch,
                at: label(base, base + count),
                rate,
                ceiling: Some(raw_low),
            });
            base += count;
        }
        // Fill to 4M (not measured), then the high phase.
        while base < m4 {
            let k = m1.min(m4 - base);
            let _ = api_append(&j, k, 1024, base).await;
            base += k;
        }
        let rate = api_append(&j, m1, 1024, base).await;
        rows.push(Row {
            what: "Journal::append, random ids".into(),
            sync: sname,
            batch: 1024,
            at: label(base, base + m1),
            rate,
            ceiling: Some(raw_high),
        });
        base += m1;
        for (batch, count) in [(64, n(200_000)), (1, n(50_000))] {
            let rate = api_append(&j, count, batch, base).await;
            rows.push(Row {
                what: "Journal::append, random ids".into(),
                sync: sname,
                batch,
                at: label(base, base + count),
                rate,
                ceiling: Some(raw_high),
            });
            base += count;
        }
        let ids = j
            .stats()
            .dedup_ids
            .load(std::sync::atomic::Ordering::Relaxed);
        j.close().await;
        drop(j);

        if sync == SyncMode::Full {
            // Read in order, as a forwarder does.
            let reader = Reader::open(&path).expect("reader");
            let start = Instant::now();
            let mut cursor = 0;
            let mut read = 0u64;
            while read < m1 {
                let batch = reader
                    .read_after(cursor, "central", None, 1000, 4 << 20)
                    .expect("read");
                let Some(last) = batch.last() else { break };
                cursor = last.seq;
                read += batch.len() as u64;
            }
            let rate = read as f64 / start.elapsed().as_secs_f64();
            rows.push(Row {
                what: "Reader::read_after, in order".into(),
                sync: sname,
                batch: 1000,
                at: label(0, m1),
                rate,
                ceiling: None,
            });
            drop(reader);
            // Re-open: quick_check and dedup rebuild of every id in the window.
            let start = Instant::now();
            let j = Journal::open(options(&path, sync)).expect("reopen");
            let open_s = start.elapsed().as_secs_f64();
            j.close().await;
            println!(
                "open with {} rows ({ids} ids in the dedup window, {:.2} GiB file): {open_s:.2} s",
                base,
                std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / (1u64 << 30) as f64
            );
        }
        let _ = std::fs::remove_file(&path);
    }
    print_table(&rows);

    let mut d = DedupIndex::new(Duration::from_secs(3600), 1_000_000).expect("dedup index");
    for i in 0..1_000_000u64 {
        d.insert(key_hash("mes", &random_id()), i + 1, i as i64);
    }
    println!(
        "\ndedup index: 1M ids in the window use {:.1} MiB (fixed by dedup_max_ids)",
        d.memory_bytes() as f64 / (1 << 20) as f64
    );
}
