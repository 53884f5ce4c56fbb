//! Cost at plant rates: under light traffic the journal gathers appends
//! into shared commits (`commit_window`), forwarders gather events into
//! fewer requests (`batch_linger`), and the per-stream counters are written
//! about once a second instead of with every commit. These tests hold the
//! savings and the limits around them: acks stay bounded, load is not
//! slowed, a backlog is not held back, and the counters survive a kill and
//! an upgrade from a schema 1 journal.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use plantrelay::agent;
use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{AppendOutcome, Journal, JournalOptions, Reader, SyncMode};
use support::agent::{Harness, http_client, mes_events, post};
use support::journal::{child_runtime, spawn_child_test};

const CHILD_ENV: &str = "PLANTRELAY_PLANT_RATES_CHILD_DIR";

fn event(id: &str, stream: &str) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id: id.into(),
        stream: stream.into(),
        class: Class::Critical,
        event_type: "test.rates".into(),
        source_time: None,
        data: br#"{"qty":1,"order":"4711-000000042","workcenter":"PRESS07"}"#.to_vec(),
        attrs: None,
    }
}

fn options(dir: &Path, window_ms: u64) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("journal.db"));
    o.sync = SyncMode::Normal;
    o.commit_window = Duration::from_millis(window_ms);
    o.sinks = vec!["central".into()];
    o
}

fn stored(o: &AppendOutcome) -> (u64, u64) {
    match *o {
        AppendOutcome::Stored { seq, stream_seq } => (seq, stream_seq),
        AppendOutcome::Duplicate { seq } => panic!("unexpected duplicate of seq {seq}"),
    }
}

/// 200 single-event appends, 2 ms apart, each on its own task (as many
/// MES requests or source messages arrive): returns the commits they took
/// and the slowest ack.
async fn trickle(journal: &Journal) -> (u64, Duration) {
    let before = journal
        .stats()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for i in 0..200 {
        tick.tick().await;
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let out = j
                .append(vec![event(&format!("t-{i}"), "line/0")])
                .await
                .unwrap();
            assert!(matches!(out[0], AppendOutcome::Stored { .. }));
            t0.elapsed()
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    let after = journal
        .stats()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    (after - before, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_that_waits_for_each_answer_is_not_held_to_one_append_per_window() {
    // An MES posting its events one by one: nothing can join its window,
    // which would only hold it to one append per 100 ms (4 s for these 40).
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(options(dir.path(), 100)).unwrap();
    let t0 = Instant::now();
    for i in 0..40 {
        let out = journal
            .append(vec![event(&format!("s-{i}"), "line/0")])
            .await
            .unwrap();
        assert_eq!(stored(&out[0]).1, i + 1);
    }
    let took = t0.elapsed();
    // The first windows and one retry in eight wait: about 1 s. Never
    // less than 4 s if every append waited its window.
    assert!(took < Duration::from_secs(3), "40 appends took {took:?}");
    // A trickle from many tasks still shares commits afterwards: the
    // windows gather again.
    let (commits, _) = trickle(&journal).await;
    assert!(commits <= 60, "200 trickled appends took {commits} commits");
    journal.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_under_a_trickle_share_commits_and_are_acked_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(options(dir.path(), 20)).unwrap();
    let (commits, slowest) = trickle(&journal).await;
    // 2 ms apart in a 20 ms window: about 10 appends per commit.
    assert!(
        commits <= 60,
        "200 trickled appends took {commits} commits; the window should gather them"
    );
    // The window plus a loaded machine's scheduling; never the 1 s tick.
    assert!(
        slowest < Duration::from_millis(400),
        "slowest ack {slowest:?}"
    );
    let r = Reader::open(&dir.path().join("journal.db")).unwrap();
    assert_eq!(r.head_seq().unwrap(), 200);
    journal.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_large_enough_to_fill_pages_commit_without_waiting_for_the_window() {
    let dir = tempfile::tempdir().unwrap();
    // The largest window there is: a batch that waited would take 100 ms.
    let journal = Journal::open(options(dir.path(), 100)).unwrap();
    let t0 = Instant::now();
    for b in 0..40 {
        let batch: Vec<_> = (0..64)
            .map(|k| event(&format!("b-{b}-{k}"), "line/1"))
            .collect();
        journal.append(batch).await.unwrap();
    }
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "40 sequential appends of 64 events took {elapsed:?}: they waited for the window (≥ 4 s)"
    );
    // A cursor move does not wait either: a forwarder's drain runs at one
    // batch per commit.
    let t0 = Instant::now();
    for to in 1..=20 {
        assert!(journal.advance("central", None, to * 100).await.unwrap());
    }
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_millis(1000),
        "20 cursor moves took {elapsed:?}: they waited for the window (≥ 2 s)"
    );
    journal.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_window_of_zero_commits_every_arrival_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(options(dir.path(), 0)).unwrap();
    let t0 = Instant::now();
    for i in 0..50 {
        journal
            .append(vec![event(&format!("z-{i}"), "line/2")])
            .await
            .unwrap();
    }
    let commits = journal
        .stats()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(commits, 50, "one commit per sequential append");
    assert!(t0.elapsed() < Duration::from_secs(5));
    journal.close().await;
}

/// The child of the kill test: appends ten events to one stream, lets the
/// sink deliver them and retention delete every row, says READY and waits
/// to be killed. Returns at once without the env var.
#[test]
fn retention_child() {
    let Some((dir, rt)) = child_runtime(CHILD_ENV) else {
        return;
    };
    rt.block_on(async move {
        let mut o = options(&dir, 20);
        o.retain_acked = Duration::ZERO;
        let journal = Journal::open(o).unwrap();
        let batch: Vec<_> = (0..10)
            .map(|i| event(&format!("k-{i}"), "line/9"))
            .collect();
        let out = journal.append(batch).await.unwrap();
        assert_eq!(stored(&out[9]), (10, 10));
        assert!(journal.advance("central", None, 10).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = Reader::open(&dir.join("journal.db"))
                .unwrap()
                .stats()
                .unwrap()
                .events;
            if left == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "retention did not delete the rows"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("\nREADY");
        // Alive until the parent kills it.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

#[test]
fn stream_sequences_continue_after_a_kill_once_retention_deleted_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child_test("plant_rates::retention_child", CHILD_ENV, dir.path());
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "READY");
    // SIGKILL: no shutdown, so nothing but the deleting transaction can
    // have written the counter.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "the child never got its rows deleted");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let journal = Journal::open(options(dir.path(), 20)).unwrap();
        let out = journal
            .append(vec![event("after-kill", "line/9")])
            .await
            .unwrap();
        // The seq steps over what the killed run had reserved (see
        // `lost_tail.rs`); the stream seq counts on from the deleted rows.
        let (seq, stream_seq) = stored(&out[0]);
        assert_eq!(
            stream_seq, 11,
            "stream seq continues after the deleted rows"
        );
        assert!(seq > 10, "seq continues after the deleted rows: {seq}");
        let skipped = Reader::open(&dir.path().join("journal.db"))
            .unwrap()
            .skipped_seqs()
            .unwrap();
        assert_eq!(skipped, vec![(11, seq - 1)]);
        journal.close().await;
    });
}

/// The first schema, as plantrelay 0.1 created it.
const SCHEMA_1: &str = r#"
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY, source TEXT NOT NULL, event_id TEXT NOT NULL,
        stream TEXT NOT NULL, stream_seq INTEGER NOT NULL, class INTEGER NOT NULL,
        type TEXT NOT NULL, source_time TEXT, recv_time INTEGER NOT NULL,
        data BLOB NOT NULL, attrs TEXT, size INTEGER NOT NULL, only_sink TEXT);
    CREATE TABLE streams (source TEXT NOT NULL, stream TEXT NOT NULL,
        last_seq INTEGER NOT NULL, PRIMARY KEY (source, stream)) WITHOUT ROWID;
    CREATE TABLE cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL,
        updated_us INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL,
        seq INTEGER NOT NULL, reason TEXT NOT NULL, time_us INTEGER NOT NULL,
        source TEXT NOT NULL, event_id TEXT NOT NULL, stream TEXT NOT NULL,
        stream_seq INTEGER NOT NULL, class INTEGER NOT NULL, type TEXT NOT NULL,
        source_time TEXT, recv_time INTEGER NOT NULL, data BLOB NOT NULL, attrs TEXT);
    CREATE INDEX dead_letters_by_sink ON dead_letters (sink, id);
    CREATE TABLE gaps (id INTEGER PRIMARY KEY, source TEXT NOT NULL,
        stream TEXT NOT NULL, first_stream_seq INTEGER NOT NULL,
        last_stream_seq INTEGER NOT NULL, count INTEGER NOT NULL,
        class INTEGER NOT NULL, reason TEXT NOT NULL, time_us INTEGER NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    PRAGMA user_version = 1;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_journal_is_upgraded_and_keeps_its_stream_counters() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("journal.db");
    {
        // What 0.1 left behind: rows 1..=3 of line/0 are kept, 4..=10 were
        // delivered and deleted by retention (only the streams table and
        // meta remember them), line/1 has rows 11..=12.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update_and_check(None, "journal_mode", "wal", |_| Ok(()))
            .unwrap();
        conn.execute_batch(SCHEMA_1).unwrap();
        let mut ins = conn
            .prepare(
                "INSERT INTO events (seq, source, event_id, stream, stream_seq, class, type,
                     recv_time, data, size) VALUES (?1, 'mes', ?2, ?3, ?4, 0, 't', ?5, x'7b7d', 2)",
            )
            .unwrap();
        let now_us = 1_800_000_000_000_000i64;
        for (seq, stream, sseq) in [
            (1, "line/0", 1),
            (2, "line/0", 2),
            (3, "line/0", 3),
            (11, "line/1", 1),
            (12, "line/1", 2),
        ] {
            ins.execute(rusqlite::params![
                seq,
                format!("old-{seq}"),
                stream,
                sseq,
                now_us
            ])
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO streams VALUES ('mes', 'line/0', 10), ('mes', 'line/1', 2);
             INSERT INTO meta VALUES ('last_seq', 12);
             INSERT INTO cursors VALUES ('central', 3, 0);",
        )
        .unwrap();
    }
    let journal = Journal::open(options(dir.path(), 20)).unwrap();
    let out = journal
        .append(vec![event("new-0", "line/0"), event("new-1", "line/1")])
        .await
        .unwrap();
    assert_eq!(stored(&out[0]), (13, 11), "line/0 continues after 10");
    assert_eq!(stored(&out[1]), (14, 3), "line/1 continues after 2");
    journal.close().await;

    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, plantrelay::journal::SCHEMA_VERSION);
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    assert_eq!(page_size, 4096, "an existing journal keeps its page size");
    let r = Reader::open(&db).unwrap();
    assert_eq!(r.head_seq().unwrap(), 14);
    assert_eq!(r.cursor("central").unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_journal_takes_the_configured_page_size_and_keeps_it_when_reconfigured() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("journal.db");
    let page_size = |db: &Path| -> i64 {
        rusqlite::Connection::open(db)
            .unwrap()
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap()
    };
    let mut opts = options(dir.path(), 20);
    opts.page_size = 2048;
    let journal = Journal::open(opts.clone()).unwrap();
    let mut big = event("big", "line/0");
    big.data = format!("{{\"blob\":\"{}\"}}", "x".repeat(9_000)).into_bytes();
    let out = journal
        .append(vec![event("small", "line/0"), big.clone()])
        .await
        .unwrap();
    assert_eq!(stored(&out[1]), (2, 2));
    journal.close().await;
    drop(journal);
    assert_eq!(page_size(&db), 2048);
    let r = Reader::open(&db).unwrap();
    assert_eq!(r.stats().unwrap().page_size, 2048, "journal stats show it");
    let rows = r.tail(10, None).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].id, "big");
    assert_eq!(
        rows[1].data, big.data,
        "a row over several pages reads back whole"
    );
    drop(r);

    // Another setting later: the journal keeps its pages and its events.
    opts.page_size = 8192;
    let journal = Journal::open(opts).unwrap();
    let out = journal
        .append(vec![event("after", "line/0")])
        .await
        .unwrap();
    assert_eq!(stored(&out[0]), (3, 3));
    journal.close().await;
    assert_eq!(page_size(&db), 2048);

    // The default is SQLite's own.
    let other = tempfile::tempdir().unwrap();
    let journal = Journal::open(options(other.path(), 20)).unwrap();
    journal.close().await;
    assert_eq!(page_size(&other.path().join("journal.db")), 4096);
}

/// An agent with an HTTP source and the HTTPS sink of `h`; returns it and
/// the ingest URL.
async fn start_agent(h: &Harness, sink_extra: &str) -> (agent::RunningAgent, String) {
    let running = agent::start(&h.config(sink_extra)).await.unwrap();
    let addr = running.http_addrs[0].1;
    (running, format!("http://{addr}/v1/events"))
}

/// Posts each of `events` in a request of its own, `every_ms` apart, each
/// on its own task (as MES systems post), and checks every one gets 202.
async fn post_one_by_one(
    client: &reqwest::Client,
    url: &str,
    events: Vec<serde_json::Value>,
    every_ms: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
    let mut posts = Vec::new();
    for e in events {
        tick.tick().await;
        let (client, url) = (client.clone(), url.to_owned());
        posts.push(tokio::spawn(
            async move { post(&client, &url, &[e]).await.0 },
        ));
    }
    for p in posts {
        assert_eq!(p.await.unwrap(), 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_reaches_the_upstream_in_a_few_requests_a_second() {
    let h = Harness::new().await;
    // The default batch_linger (250 ms).
    let (running, url) = start_agent(&h, "").await;
    let client = http_client();
    let t0 = Instant::now();
    post_one_by_one(&client, &url, mes_events("trickle", 200, 4), 10).await;
    assert!(
        h.receiver.wait_for(200, Duration::from_secs(20)).await,
        "every event arrives"
    );
    let seconds = t0.elapsed().as_secs_f64().ceil();
    let requests = h.receiver.stats().requests;
    // 100 events/s: at most 1/linger + 1 = 5 requests a second.
    assert!(
        requests as f64 <= 5.0 * seconds,
        "{requests} requests in {seconds} s for 200 events at 100/s"
    );
    assert!(h.receiver.verdict().is_complete_and_ordered());
    running.shutdown().await;
}

/// MES systems post one event per request: requests beyond
/// `max_concurrent_requests` (4 here) share a commit too, as a request
/// gives its slot back once parsed and waits for its commit without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_requests_beyond_max_concurrent_requests_share_commits() {
    let h = Harness::new().await;
    let (running, url) = start_agent(&h, "batch_linger = \"5s\"").await;
    let client = http_client();
    assert_eq!(post(&client, &url, &mes_events("warm", 1, 1)).await.0, 202);
    let commits = || {
        running
            .journal
            .stats()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = commits();
    post_one_by_one(&client, &url, mes_events("burst", 200, 4), 1).await;
    let took = commits() - before;
    // Four requests a commit at most, as when a slot was held through the
    // commit, would take at least 50.
    assert!(took < 50, "200 one-event requests took {took} commits");
    assert!(
        h.receiver.wait_for(201, Duration::from_secs(30)).await,
        "every event arrives"
    );
    assert!(h.receiver.verdict().is_complete_and_ordered());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_and_a_backlog_go_out_without_lingering() {
    let h = Harness::new().await;
    let (running, url) = start_agent(&h, "batch_linger = \"5s\"\nbatch_max_events = 500").await;
    let client = http_client();

    // Full batches go at once; only the last 100 events linger.
    let t0 = Instant::now();
    assert_eq!(
        post(&client, &url, &mes_events("full", 1100, 4)).await.0,
        202
    );
    assert!(
        h.receiver.wait_for(1000, Duration::from_secs(4)).await,
        "two full batches arrive well within the 5 s linger"
    );
    assert!(h.receiver.wait_for(1100, Duration::from_secs(20)).await);
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "the partial batch lingered ({:?})",
        t0.elapsed()
    );

    // A backlog older than the linger (an outage) drains at once.
    h.receiver.stop().await;
    let t_backlog = Instant::now();
    assert_eq!(
        post(&client, &url, &mes_events("late", 1300, 4)).await.0,
        202
    );
    let aged = t_backlog + Duration::from_millis(5200);
    tokio::time::sleep_until(aged.into()).await;
    h.receiver.restart().await.unwrap();
    let t_up = Instant::now();
    assert!(
        h.receiver.wait_for(2400, Duration::from_secs(3)).await,
        "the backlog, its partial last batch included, drains without waiting"
    );
    assert!(t_up.elapsed() < Duration::from_secs(3));
    assert!(h.receiver.verdict().is_complete_and_ordered());
    running.shutdown().await;
}
