//! Priority lanes and routing end to end: a real journal filled as an
//! outage leaves it, the agent started on it, real HTTPS receivers.

use crate::support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use plantrelay::agent;
use plantrelay::config::Config;
use plantrelay::demo::receiver::{ReceivedEvent, Receiver, ReceiverOptions};
use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{Journal, JournalOptions, Reader};
use plantrelay::route::StreamFilter;
use support::agent::{Harness, agent_toml};
use support::journal::evicted;
use support::upstream::until_within;

const WAIT: Duration = Duration::from_secs(180);

/// `telemetry` events over 10 machine streams with `critical` MES events
/// spread evenly among them, as an outage leaves the journal.
fn backlog(telemetry: usize, critical: usize) -> Vec<NewEvent> {
    let every = (telemetry / critical.max(1)).max(1);
    let mut out = Vec::with_capacity(telemetry + critical);
    let mut c = 0;
    for t in 0..telemetry {
        out.push(event(
            Class::Telemetry,
            format!("machines/m{}", t % 10),
            format!("t-{t}"),
        ));
        if (t + 1) % every == every / 2 && c < critical {
            out.push(event(
                Class::Critical,
                format!("mes/line{}", c % 3),
                format!("c-{c}"),
            ));
            c += 1;
        }
    }
    while c < critical {
        out.push(event(
            Class::Critical,
            format!("mes/line{}", c % 3),
            format!("c-{c}"),
        ));
        c += 1;
    }
    out
}

fn event(class: Class, stream: String, id: String) -> NewEvent {
    NewEvent {
        source: "gw".into(),
        id,
        stream,
        class,
        event_type: match class {
            Class::Critical => "com.example.mes.confirmation".into(),
            Class::Telemetry => "plantrelay.mqtt.message".into(),
        },
        source_time: None,
        data: br#"{"v":1}"#.to_vec(),
        attrs: None,
    }
}

async fn fill(state_dir: &Path, events: Vec<NewEvent>) {
    std::fs::create_dir_all(state_dir).unwrap();
    let mut o = JournalOptions::new(state_dir.join("journal.db"));
    o.commit_window = Duration::ZERO;
    let j = Journal::open(o).unwrap();
    for chunk in events.chunks(5000) {
        j.append(chunk.to_vec()).await.unwrap();
    }
    j.close().await;
}

fn config(h: &Harness, sinks: &str) -> Config {
    let text = format!(
        "{}{sinks}\n",
        agent_toml("gw-lanes", &h.state_dir(), "127.0.0.1:0")
    );
    Config::load(&h.write_config(&text)).unwrap()
}

fn sink(h: &Harness, name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[[sinks.https]]
name = "{name}"
url = "{url}"
ca_file = "{ca}"
ca_only = true
retry_initial = "50ms"
retry_max = "500ms"
batch_linger = "0s"
{extra}
"#,
        ca = h.paths.ca.display()
    )
}

/// Per stream, stream sequences rise by one; returns events per stream.
fn assert_per_stream_order(events: &[ReceivedEvent]) -> HashMap<String, u64> {
    let mut last: HashMap<String, u64> = HashMap::new();
    for e in events.iter().filter(|e| !e.duplicate) {
        let stream = e.subject.clone().unwrap();
        let s = e.streamsequence.unwrap();
        let prev = last.get(&stream).copied().unwrap_or(0);
        assert_eq!(s, prev + 1, "stream {stream}: {s} after {prev}");
        last.insert(stream, s);
    }
    last
}

fn is_critical(e: &ReceivedEvent) -> bool {
    e.subject.as_deref().is_some_and(|s| s.starts_with("mes/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_critical_events_overtake_a_100k_telemetry_backlog() {
    let h = Harness::new().await;
    fill(&h.state_dir(), backlog(100_000, 200)).await;
    let cfg = config(&h, &sink(&h, "central", &h.receiver.url(), ""));
    let a = agent::start(&cfg).await.unwrap();
    assert!(
        h.receiver.wait_for(100_200, WAIT).await,
        "{:?}",
        h.receiver.stats()
    );
    let events = h.receiver.events();
    assert_eq!(events.iter().filter(|e| e.duplicate).count(), 0);
    let last_critical = events.iter().rposition(is_critical).unwrap();
    let telemetry_before = events[..last_critical]
        .iter()
        .filter(|e| !is_critical(e))
        .count();
    assert!(
        telemetry_before < 20_000,
        "all 200 critical events arrive before the 20,000th telemetry event ({telemetry_before} came first)"
    );
    let per_stream = assert_per_stream_order(&events);
    assert_eq!(per_stream.len(), 13, "10 machine streams and 3 MES streams");
    assert_eq!(events.iter().filter(|e| is_critical(e)).count(), 200);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_order_sends_the_same_backlog_in_seq_order() {
    let h = Harness::new().await;
    fill(&h.state_dir(), backlog(20_000, 100)).await;
    let cfg = config(
        &h,
        &sink(
            &h,
            "central",
            &h.receiver.url(),
            r#"priority = "journal_order""#,
        ),
    );
    let a = agent::start(&cfg).await.unwrap();
    assert!(h.receiver.wait_for(20_100, WAIT).await);
    let seqs: Vec<u64> = h
        .receiver
        .events()
        .iter()
        .map(|e| e.sequence.unwrap())
        .collect();
    assert_eq!(seqs, (1..=20_100).collect::<Vec<_>>());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sink_gets_exactly_its_classes_and_streams_two_of_them_down_for_a_while() {
    let h = Harness::new().await;
    let erp = Receiver::start(ReceiverOptions::new(&h.pki)).await.unwrap();
    let datahub = Receiver::start(ReceiverOptions::new(&h.pki)).await.unwrap();
    let line = Receiver::start(ReceiverOptions::new(&h.pki)).await.unwrap();
    datahub.stop().await;
    line.stop().await;
    fill(&h.state_dir(), backlog(5_000, 100)).await;
    let sinks = [
        sink(&h, "erp", &erp.url(), r#"classes = ["critical"]"#),
        sink(&h, "datahub", &datahub.url(), r#"classes = ["telemetry"]"#),
        sink(
            &h,
            "line",
            &line.url(),
            r#"streams = ["machines/m3", "mes/+"]"#,
        ),
        sink(
            &h,
            "archive",
            &h.receiver.url(),
            r#"priority = "journal_order""#,
        ),
    ]
    .concat();
    let a = agent::start(&config(&h, &sinks)).await.unwrap();
    assert!(erp.wait_for(100, WAIT).await);
    assert!(h.receiver.wait_for(5_100, WAIT).await);
    datahub.restart().await.unwrap();
    line.restart().await.unwrap();
    assert!(datahub.wait_for(5_000, WAIT).await);
    assert!(line.wait_for(600, WAIT).await);
    let line_events = line.events();
    assert_eq!(line_events.iter().filter(|e| !e.duplicate).count(), 600);
    assert!(
        line_events
            .iter()
            .all(|e| matches!(e.subject.as_deref(), Some(s) if s == "machines/m3" || s.starts_with("mes/"))),
        "the line sink gets only its streams"
    );
    assert_per_stream_order(&line_events);

    let erp_events = erp.events();
    assert_eq!(erp_events.len(), 100);
    assert!(
        erp_events.iter().all(is_critical),
        "ERP gets only critical events"
    );
    let hub_events = datahub.events();
    assert_eq!(hub_events.iter().filter(|e| !e.duplicate).count(), 5_000);
    assert!(
        hub_events.iter().all(|e| !is_critical(e)),
        "the data hub gets only telemetry"
    );
    assert_per_stream_order(&erp_events);
    assert_per_stream_order(&hub_events);
    let archive: Vec<u64> = h
        .receiver
        .events()
        .iter()
        .map(|e| e.sequence.unwrap())
        .collect();
    assert_eq!(
        archive,
        (1..=5_100).collect::<Vec<_>>(),
        "the archive gets all, in order"
    );

    // The status shows each sink per class.
    let status = tokio::task::spawn_blocking({
        let view = a.view.clone();
        move || view.status()
    })
    .await
    .unwrap();
    let by_name = |n: &str| status.sinks.iter().find(|s| s.name == n).unwrap().clone();
    let erp_s = by_name("erp");
    assert_eq!(erp_s.classes.len(), 1);
    assert_eq!(erp_s.classes[0].class, Class::Critical);
    assert_eq!(erp_s.backlog_events, 0);
    assert_eq!(
        by_name("archive").classes.len(),
        0,
        "journal order: one cursor"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_of_the_previous_schema_with_one_cursor_resends_nothing_delivered() {
    let h = Harness::new().await;
    let state = h.state_dir();
    fill(&state, backlog(900, 100)).await;
    // What the previous release left: schema 2 (no lane index or table,
    // no row checksums, no table of texts) and one cursor row for the
    // sink, at 600.
    {
        let conn = rusqlite::Connection::open(state.join("journal.db")).unwrap();
        conn.execute_batch(
            "UPDATE events SET type = 'com.example.mes.confirmation' WHERE class = 0;
             DROP TABLE texts;
             DROP TRIGGER critical_row_deleted;
             DROP TABLE critical;
             ALTER TABLE events DROP COLUMN crc;
             INSERT INTO cursors(sink, seq, updated_us) VALUES ('central', 600, 0);
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let cfg = config(&h, &sink(&h, "central", &h.receiver.url(), ""));
    let a = agent::start(&cfg).await.unwrap();
    assert!(h.receiver.wait_for(400, WAIT).await);
    let r = a.journal.reader().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while r.cursor("central").unwrap() < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "cursor never reached the head"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seqs: Vec<u64> = h
        .receiver
        .events()
        .iter()
        .map(|e| e.sequence.unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (601..=1000).collect::<Vec<_>>(),
        "only what followed the old cursor"
    );
    a.shutdown().await;
    let stats = plantrelay::journal::Reader::open(&state.join("journal.db"))
        .unwrap()
        .stats()
        .unwrap();
    assert_eq!(stats.schema_version, plantrelay::journal::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_name_shared_by_sources_of_both_classes_is_two_streams_each_in_order() {
    // What check-config cannot see: HTTP ingest takes the stream from the
    // data, so two sources of different classes may use the same name.
    let h = Harness::new().await;
    let mut events = Vec::new();
    for i in 0..3000 {
        let mut e = event(Class::Telemetry, "line3/press07".into(), format!("t-{i}"));
        e.source = "scada".into();
        events.push(e);
        if i % 100 == 50 {
            let mut c = event(Class::Critical, "line3/press07".into(), format!("c-{i}"));
            c.source = "mes".into();
            events.push(c);
        }
    }
    fill(&h.state_dir(), events).await;
    let a = agent::start(&config(&h, &sink(&h, "central", &h.receiver.url(), "")))
        .await
        .unwrap();
    assert!(h.receiver.wait_for(3030, WAIT).await);
    let got = h.receiver.events();
    // Order holds per CloudEvents source and subject, as streamsequence counts.
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    for e in &got {
        let key = (e.source.clone(), e.subject.clone().unwrap());
        let prev = last
            .insert(key.clone(), e.streamsequence.unwrap())
            .unwrap_or(0);
        assert_eq!(e.streamsequence.unwrap(), prev + 1, "{key:?}");
    }
    assert_eq!(last.len(), 2);
    // The critical one overtook the other.
    let first_critical_done = got
        .iter()
        .rposition(|e| e.source.ends_with("/mes"))
        .unwrap();
    assert!(
        first_critical_done < 1100,
        "critical events came after {first_critical_done}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_one_class_moves_only_that_lane() {
    use plantrelay::journal::{Reader, RewindTo};
    let h = Harness::new().await;
    let state = h.state_dir();
    fill(&state, backlog(900, 100)).await;
    {
        let conn = rusqlite::Connection::open(state.join("journal.db")).unwrap();
        conn.execute_batch(
            "INSERT INTO cursors(sink, seq, updated_us) VALUES ('central/critical', 1000, 0);
             INSERT INTO cursors(sink, seq, updated_us) VALUES ('central/telemetry', 1000, 0);",
        )
        .unwrap();
    }
    let cfg = config(&h, &sink(&h, "central", &h.receiver.url(), ""));
    let mut out = Vec::new();
    plantrelay::cli::replay(
        &cfg,
        "central",
        Some(Class::Critical),
        RewindTo::Seq(1),
        &mut out,
    )
    .await
    .unwrap();
    let r = Reader::open(&state.join("journal.db")).unwrap();
    assert_eq!(r.lane_cursor("central/critical").unwrap(), 0);
    assert_eq!(r.lane_cursor("central/telemetry").unwrap(), 1000);
    drop(r);
    // Started, the agent sends the critical events again, and only them.
    let a = agent::start(&cfg).await.unwrap();
    assert!(h.receiver.wait_for(100, WAIT).await);
    let r = a.journal.reader().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    // The lane's own cursor stops at the last critical event; the sink
    // counts as at the head once nothing of either class is left.
    while r.cursor("central").unwrap() < 1000 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    let got = h.receiver.events();
    assert_eq!(got.len(), 100);
    assert!(got.iter().all(is_critical));

    // A sink in journal order has one cursor: no class to replay alone.
    let cfg = config(
        &h,
        &sink(
            &h,
            "central",
            &h.receiver.url(),
            r#"priority = "journal_order""#,
        ),
    );
    let err = plantrelay::cli::replay(
        &cfg,
        "central",
        Some(Class::Telemetry),
        RewindTo::Seq(1),
        &mut out,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code, 2);
    assert!(err.message.contains("--class telemetry"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_reach_each_sink_as_gap_events_of_its_own_classes_only() {
    let h = Harness::new().await;
    let erp = Receiver::start(ReceiverOptions::new(&h.pki)).await.unwrap();
    let sinks = [
        sink(&h, "erp", &erp.url(), r#"classes = ["critical"]"#),
        sink(&h, "hub", &h.receiver.url(), r#"classes = ["telemetry"]"#),
    ]
    .concat();
    let cfg = config(&h, &sinks);
    let mut opts = cfg.journal_options();
    opts.max_size = 16 << 20;
    opts.when_full = plantrelay::journal::WhenFull::DropOldest;
    opts.commit_window = Duration::ZERO;
    std::fs::create_dir_all(h.state_dir()).unwrap();
    let j = Journal::open(opts).unwrap();
    let payload = format!("\"{}\"", "x".repeat(900)).into_bytes();
    let (mut telemetry, mut critical) = (0u64, 0u64);
    for round in 0..50 {
        let mut batch = Vec::new();
        for i in 0..500 {
            let class = if i % 10 == 0 {
                Class::Critical
            } else {
                Class::Telemetry
            };
            let (stream, n) = match class {
                Class::Critical => (format!("mes/line{}", i % 3), &mut critical),
                Class::Telemetry => (format!("machines/m{}", i % 4), &mut telemetry),
            };
            *n += 1;
            let mut e = event(class, stream, format!("{round}-{i}"));
            e.data = payload.clone();
            batch.push(e);
        }
        j.append(batch).await.unwrap();
    }
    let (evicted_t, evicted_c) = evicted(&j);
    j.close().await;
    drop(j);
    assert!(evicted_t > 0, "the journal had to evict");
    assert_eq!(evicted_c, 0, "telemetry goes first");

    let a = agent::start(&cfg).await.unwrap();
    assert!(erp.wait_for(critical as usize, WAIT).await);
    let r = a.journal.reader().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while r.cursor("hub").unwrap()
        < a.journal
            .stats()
            .head_seq
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the hub's backlog drains"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;

    let erp_events = erp.events();
    assert_eq!(
        erp_events.len() as u64,
        critical,
        "every critical event, once"
    );
    assert!(
        erp_events.iter().all(|e| e.event_type != "plantrelay.gap"),
        "no gap for events ERP never takes"
    );
    let v = h.receiver.verdict();
    assert!(v.gaps > 0);
    assert_eq!(v.out_of_order, 0, "{v:?}");
    assert_eq!(
        v.missing, 0,
        "every hole is announced by a gap event: {v:?}"
    );
    let hub = h.receiver.events();
    assert!(
        hub.iter().all(|e| !is_critical(e)),
        "the hub gets only telemetry"
    );
    let announced: u64 = hub
        .iter()
        .filter(|e| e.event_type == "plantrelay.gap" && !e.duplicate)
        .map(|e| e.data["count"].as_u64().unwrap())
        .sum();
    assert_eq!(announced, evicted_t, "every eviction is announced once");
    let delivered = hub
        .iter()
        .filter(|e| e.event_type != "plantrelay.gap" && !e.duplicate)
        .count() as u64;
    assert_eq!(delivered + evicted_t, telemetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_with_stream_filters_gets_exactly_its_streams_in_order() {
    let h = Harness::new().await;
    let other = Receiver::start(ReceiverOptions::new(&h.pki)).await.unwrap();
    fill(&h.state_dir(), backlog(20_000, 100)).await;
    let sinks = [
        sink(
            &h,
            "m3",
            &h.receiver.url(),
            r#"streams = ["machines/m3", "mes/line1"]"#,
        ),
        sink(&h, "all", &other.url(), ""),
    ]
    .concat();
    let a = agent::start(&config(&h, &sinks)).await.unwrap();
    assert!(other.wait_for(20_100, WAIT).await);
    let r = a.journal.reader().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while r.cursor("m3").unwrap() < 20_100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the filtered sink's cursor reaches the head"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    let got = h.receiver.events();
    let streams: std::collections::BTreeSet<String> =
        got.iter().map(|e| e.subject.clone().unwrap()).collect();
    assert_eq!(
        streams.into_iter().collect::<Vec<_>>(),
        vec!["machines/m3".to_string(), "mes/line1".to_string()]
    );
    assert_eq!(
        got.iter()
            .filter(|e| e.subject.as_deref() == Some("machines/m3"))
            .count(),
        2000
    );
    assert_eq!(
        got.iter()
            .filter(|e| e.subject.as_deref() == Some("mes/line1"))
            .count(),
        33
    );
    assert_eq!(got.iter().filter(|e| e.duplicate).count(), 0);
    assert_per_stream_order(&got);
}

/// A lane's read looks at the rows present when it began: stopping short of
/// its limits it reports the last of them as `through`, so an idle
/// telemetry lane beside a flow of MES events starts its next read at the
/// head instead of stepping over the same critical rows after every commit.
#[tokio::test]
async fn a_lane_read_that_stops_short_reports_the_head_as_read_through() {
    let h = Harness::new().await;
    let critical: Vec<NewEvent> = (0..1000)
        .map(|i| event(Class::Critical, "mes/line1".into(), format!("c-{i}")))
        .collect();
    fill(&h.state_dir(), critical).await;
    let db = h.state_dir().join("journal.db");
    let reader = Reader::open(&db).unwrap();
    let all = StreamFilter::all();
    let telemetry = Some(Class::Telemetry);

    let r = reader
        .read_routed(0, "central", telemetry, &all, 100, 1 << 20, 10_000)
        .unwrap();
    assert!(r.events.is_empty());
    assert_eq!(
        (r.through, r.more),
        (1000, false),
        "nothing of the lane up to the head"
    );

    let mut more: Vec<NewEvent> = (0..3)
        .map(|i| event(Class::Telemetry, "machines/m1".into(), format!("t-{i}")))
        .collect();
    more.extend((1000..1002).map(|i| event(Class::Critical, "mes/line1".into(), format!("c-{i}"))));
    fill(&h.state_dir(), more).await;
    let r = reader
        .read_routed(1000, "central", telemetry, &all, 100, 1 << 20, 10_000)
        .unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1001, 1002, 1003]);
    assert_eq!(r.through, 1005, "short of its limits: through the head");

    // Stopped by its limits, the read is through its last event only.
    let r = reader
        .read_routed(1000, "central", telemetry, &all, 2, 1 << 20, 10_000)
        .unwrap();
    assert_eq!(r.events.len(), 2);
    assert_eq!(r.through, 1002, "full by count");
    let r = reader
        .read_routed(1000, "central", telemetry, &all, 100, 1, 10_000)
        .unwrap();
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.through, 1001, "full by bytes");
    // The critical lane through its index, the same rule.
    let r = reader
        .read_routed(
            1000,
            "central",
            Some(Class::Critical),
            &all,
            100,
            1 << 20,
            10_000,
        )
        .unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1004, 1005]);
    assert_eq!(r.through, 1005);
}

/// Every critical row, in seq order, straight from the table.
fn critical_rows(path: &Path) -> Vec<u64> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut st = conn
        .prepare("SELECT seq FROM events WHERE class = 0 ORDER BY seq")
        .unwrap();
    st.query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|s| s.unwrap() as u64)
        .collect()
}

fn lane_seqs(r: &Reader, after: u64, max: usize) -> Vec<u64> {
    r.read_after(after, "central", Some(Class::Critical), max, 1 << 20)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_critical_lane_reads_the_rows_its_table_lists_and_those_after_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    fill(dir.path(), backlog(90, 10)).await;
    let all = critical_rows(&path);
    assert_eq!(all.len(), 10);
    // As between two writes of the stream counters: `critical` lists the
    // rows through `streams_through`, the later ones are only in `events`.
    let through = all[4] + 1;
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'streams_through'",
            [through as i64],
        )
        .unwrap();
        conn.execute("DELETE FROM critical WHERE seq > ?1", [through as i64])
            .unwrap();
        let listed: i64 = conn
            .query_row("SELECT count(*) FROM critical", [], |r| r.get(0))
            .unwrap();
        assert_eq!(listed, 5);
    }
    let r = Reader::open(&path).unwrap();
    for max in 1..=12 {
        assert_eq!(lane_seqs(&r, 0, max), all[..max.min(10)], "max {max}");
    }
    for (i, after) in all.iter().enumerate() {
        assert_eq!(lane_seqs(&r, *after, 100), all[i + 1..], "after {after}");
    }
    let head = *critical_rows(&path).last().unwrap().max(&100);
    let lanes = [Some(Class::Critical), Some(Class::Telemetry)];
    let p = r.position("central", &lanes, head).unwrap();
    assert_eq!(p.classes[0].backlog, 10);
    assert_eq!(p.classes[1].backlog, 90);

    // A deleted row takes its entry in `critical` with it.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute("DELETE FROM events WHERE seq <= ?1", [all[1] as i64])
            .unwrap();
        let listed: i64 = conn
            .query_row("SELECT count(*) FROM critical", [], |r| r.get(0))
            .unwrap();
        assert_eq!(listed, 3);
    }
    assert_eq!(lane_seqs(&r, 0, 100), all[2..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_events_in_the_place_of_evicted_critical_rows_stay_in_the_critical_lane() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    let mut o = JournalOptions::new(path.clone());
    o.max_size = 16 << 20;
    o.when_full = plantrelay::journal::WhenFull::DropOldest;
    o.commit_window = Duration::ZERO;
    let j = Journal::open(o).unwrap();
    let payload = format!("\"{}\"", "x".repeat(900)).into_bytes();
    for round in 0..50 {
        let batch = (0..500)
            .map(|i| {
                let mut e = event(
                    Class::Critical,
                    format!("mes/line{}", i % 3),
                    format!("{round}-{i}"),
                );
                e.data = payload.clone();
                e
            })
            .collect();
        j.append(batch).await.unwrap();
    }
    let (_, evicted_c) = evicted(&j);
    j.close().await;
    drop(j);
    assert!(evicted_c > 0, "the journal had to evict critical events");
    let rows = critical_rows(&path);
    let r = Reader::open(&path).unwrap();
    let mut read = Vec::new();
    let mut after = 0;
    loop {
        let got = lane_seqs(&r, after, 1000);
        let Some(last) = got.last() else { break };
        after = *last;
        read.extend(got);
    }
    assert_eq!(
        read, rows,
        "the lane reads every critical row, gaps among them"
    );
    let gaps = r
        .events_from(0, 1 << 20)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "plantrelay.gap")
        .count();
    assert!(gaps > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_waits_for_its_own_class_and_counts_as_caught_up_meanwhile() {
    let h = Harness::new().await;
    let cfg = config(&h, &sink(&h, "central", &h.receiver.url(), ""));
    let a = agent::start(&cfg).await.unwrap();
    // Telemetry alone, commit by commit: the critical lane has nothing.
    for i in 0..20 {
        let batch = (0..5)
            .map(|k| {
                event(
                    Class::Telemetry,
                    format!("machines/m{k}"),
                    format!("t-{i}-{k}"),
                )
            })
            .collect();
        a.journal.append(batch).await.unwrap();
    }
    assert!(h.receiver.wait_for(100, WAIT).await);
    let committed = *a.journal.committed().borrow();
    assert_eq!(committed.head, 100);
    assert_eq!(committed.of(Some(Class::Telemetry)), 100);
    assert!(committed.of(Some(Class::Critical)) < 100);
    // The idle critical lane does not hold the sink's cursor back.
    until_within("the sink's cursor at the head", WAIT, || {
        a.view
            .status()
            .sinks
            .iter()
            .any(|s| s.name == "central" && s.cursor == 100)
    })
    .await;
    // A critical event wakes its lane.
    let stored = a
        .journal
        .append(vec![event(
            Class::Critical,
            "mes/line1".into(),
            "c-0".into(),
        )])
        .await
        .unwrap();
    assert!(matches!(
        stored[..],
        [plantrelay::journal::AppendOutcome::Stored { seq: 101, .. }]
    ));
    assert!(h.receiver.wait_for(101, WAIT).await);
    let events = h.receiver.events();
    assert_eq!(events.iter().filter(|e| is_critical(e)).count(), 1);
    assert_eq!(events.last().and_then(|e| e.sequence), Some(101));
    let committed = *a.journal.committed().borrow();
    assert_eq!(
        (
            committed.head,
            committed.of(Some(Class::Critical)),
            committed.of(Some(Class::Telemetry))
        ),
        (101, 101, 100)
    );
    a.shutdown().await;
}
