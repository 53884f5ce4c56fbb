//! Seeded damage to the journal and its WAL: truncations, bit flips and
//! overwritten ranges, as failing flash or a power cut leaves them. Every
//! case must start (recovery of what is intact: in place, or by quarantine
//! and a fresh journal into which the intact events are salvaged), never
//! crash-loop, take new events, and deliver from the damaged journal only
//! events that were stored, unchanged, per stream in order.

use std::collections::HashMap;
use std::path::Path;

use plantrelay::event::{Class, NewEvent, StoredEvent};
use plantrelay::journal::{
    AppendOutcome, DAMAGED_ROWS, Journal, JournalOptions, Reader, seq_mark_path,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CASES: u64 = 60;
const EVENTS: u32 = 1200;
const SINK: &str = "central";

fn opts(dir: &Path) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("journal.db"));
    o.sinks = vec![SINK.into()];
    o
}

fn ev(i: u32, tag: &str) -> NewEvent {
    let stream = format!("line{}", i % 4);
    // Every third as the MQTT source writes it: a type, a time and
    // attributes that the journal keeps in their short stored forms.
    let mqtt = i.is_multiple_of(3);
    NewEvent {
        source: "plc".into(),
        id: format!("{tag}-{i}"),
        class: if i.is_multiple_of(5) {
            Class::Critical
        } else {
            Class::Telemetry
        },
        event_type: if mqtt {
            "plantrelay.mqtt.message".into()
        } else {
            "test.state".into()
        },
        source_time: mqtt.then(|| {
            humantime::format_rfc3339_micros(
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_micros(1_796_000_000_000_000 + u64::from(i) * 7),
            )
            .to_string()
        }),
        data: format!(
            r#"{{"i":{i},"pad":"{}"}}"#,
            "p".repeat(120 + (i as usize % 60))
        )
        .into_bytes(),
        attrs: mqtt
            .then(|| format!(r#"{{"mqtttopic":"{stream}","datacontenttype":"application/json"}}"#)),
        stream,
    }
}

/// What was stored: id → (stream, stream seq, data, type, time, attrs).
type Stored = HashMap<String, (String, u64, Vec<u8>, String, Option<String>, Option<String>)>;

/// The journal every case damages: half its events checkpointed into the
/// main file, half still in the WAL, as a running agent leaves it.
async fn build_base(base: &Path, work: &Path) -> Stored {
    let mut stored = Stored::new();
    let mut record = |events: &[NewEvent], out: Vec<AppendOutcome>| {
        for (e, o) in events.iter().zip(out) {
            let AppendOutcome::Stored { stream_seq, .. } = o else {
                panic!("{} was a duplicate", e.id);
            };
            stored.insert(
                e.id.clone(),
                (
                    e.stream.clone(),
                    stream_seq,
                    e.data.clone(),
                    e.event_type.clone(),
                    e.source_time.clone(),
                    e.attrs.clone(),
                ),
            );
        }
    };
    let j = Journal::open(opts(work)).unwrap();
    for chunk in (0..EVENTS / 2).collect::<Vec<_>>().chunks(20) {
        let events: Vec<_> = chunk.iter().map(|&i| ev(i, "e")).collect();
        let out = j.append(events.clone()).await.unwrap();
        record(&events, out);
    }
    j.close().await;
    drop(j);
    let j = reopen(work).await;
    for chunk in (EVENTS / 2..EVENTS).collect::<Vec<_>>().chunks(20) {
        let events: Vec<_> = chunk.iter().map(|&i| ev(i, "e")).collect();
        let out = j.append(events.clone()).await.unwrap();
        record(&events, out);
    }
    std::fs::create_dir_all(base).unwrap();
    let db = work.join("journal.db");
    for (from, name) in [
        (db.clone(), "journal.db"),
        (work.join("journal.db-wal"), "journal.db-wal"),
        (seq_mark_path(&db), "journal.db.seq"),
    ] {
        std::fs::copy(&from, base.join(name)).unwrap();
    }
    assert!(
        std::fs::metadata(base.join("journal.db-wal"))
            .unwrap()
            .len()
            > 100_000,
        "the WAL holds the second half"
    );
    j.close().await;
    stored
}

/// Opens the journal in `dir` again. The lock of the one just dropped can
/// outlive it for a moment: a process another test forks meanwhile holds a
/// copy of its descriptor until it execs.
async fn reopen(dir: &Path) -> Journal {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Journal::open(opts(dir)) {
            Ok(j) => return j,
            Err(plantrelay::journal::JournalError::Locked { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(e) => panic!("cannot reopen the journal: {e}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    TruncateDb,
    TruncateWal,
    FlipDb,
    FlipWal,
    OverwriteDb,
    FlipBoth,
}

const KINDS: [Damage; 6] = [
    Damage::TruncateDb,
    Damage::TruncateWal,
    Damage::FlipDb,
    Damage::FlipWal,
    Damage::OverwriteDb,
    Damage::FlipBoth,
];

fn flip_bits(path: &Path, rng: &mut StdRng) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    let n = rng.random_range(1..=8);
    let mut at = Vec::new();
    for _ in 0..n {
        let i = rng.random_range(0..bytes.len());
        bytes[i] ^= 1 << rng.random_range(0..8);
        at.push(i);
    }
    std::fs::write(path, &bytes).unwrap();
    format!("{n} bits at {at:?}")
}

fn truncate(path: &Path, rng: &mut StdRng) -> String {
    let len = std::fs::metadata(path).unwrap().len();
    let to = rng.random_range(0..len);
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(to)
        .unwrap();
    format!("cut to {to} of {len} bytes")
}

fn damage(dir: &Path, kind: Damage, rng: &mut StdRng) -> String {
    let db = dir.join("journal.db");
    let wal = dir.join("journal.db-wal");
    match kind {
        Damage::TruncateDb => truncate(&db, rng),
        Damage::TruncateWal => truncate(&wal, rng),
        Damage::FlipDb => flip_bits(&db, rng),
        Damage::FlipWal => flip_bits(&wal, rng),
        Damage::OverwriteDb => {
            let mut bytes = std::fs::read(&db).unwrap();
            let n = rng.random_range(512..=4096).min(bytes.len());
            let at = rng.random_range(0..=bytes.len() - n);
            rng.fill(&mut bytes[at..at + n]);
            std::fs::write(&db, &bytes).unwrap();
            format!("{n} random bytes at {at}")
        }
        Damage::FlipBoth => format!("db: {}; wal: {}", flip_bits(&db, rng), flip_bits(&wal, rng)),
    }
}

/// Every event is one that was stored, unchanged; seqs rise; per stream
/// the stream seqs rise with them.
fn check_events(events: &[StoredEvent], stored: &Stored, case: &str) {
    let mut last_seq = 0;
    let mut per_stream: HashMap<&str, u64> = HashMap::new();
    for e in events {
        let Some((stream, stream_seq, data, event_type, time, attrs)) = stored.get(&e.id) else {
            panic!("{case}: seq {} has id {:?}, never stored", e.seq, e.id);
        };
        assert_eq!(
            (&e.stream, e.stream_seq, &e.data),
            (stream, *stream_seq, data),
            "{case}: {} changed",
            e.id
        );
        assert_eq!(
            (&e.event_type, &e.source_time, &e.attrs),
            (event_type, time, attrs),
            "{case}: {} changed",
            e.id
        );
        assert!(e.seq > last_seq, "{case}: seq {} after {last_seq}", e.seq);
        last_seq = e.seq;
        let prev = per_stream.entry(stream.as_str()).or_insert(0);
        assert!(
            e.stream_seq > *prev,
            "{case}: {} stream seq {} after {prev}",
            e.stream,
            e.stream_seq
        );
        *prev = e.stream_seq;
    }
}

#[derive(Default)]
struct Tally {
    cases: u64,
    quarantined: u64,
    recovered_events: u64,
    delivered_events: u64,
}

#[tokio::test]
async fn damaged_journals_start_every_time_and_deliver_only_what_was_stored_in_order() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let stored = build_base(&base, &root.path().join("build")).await;
    let damaged_before = DAMAGED_ROWS.load(std::sync::atomic::Ordering::Relaxed);
    let mut tallies: HashMap<String, Tally> = HashMap::new();

    for seed in 0..CASES {
        let kind = KINDS[(seed % KINDS.len() as u64) as usize];
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9 ^ seed);
        let dir = root.path().join(format!("case-{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["journal.db", "journal.db-wal", "journal.db.seq"] {
            std::fs::copy(base.join(name), dir.join(name)).unwrap();
        }
        let what = damage(&dir, kind, &mut rng);
        let case = format!("case {seed} ({kind:?}: {what})");

        let j = Journal::open(opts(&dir)).unwrap_or_else(|e| panic!("{case}: does not start: {e}"));
        let quarantined = j.quarantine().is_some();
        let reader = Reader::open(&dir.join("journal.db")).unwrap();
        let present = reader
            .events_from(0, usize::MAX >> 1)
            .unwrap_or_else(|e| panic!("{case}: cannot read: {e}"));
        check_events(&present, &stored, &case);
        if let Some(q) = j.quarantine() {
            // A quarantined journal starts with what the salvage copied.
            assert_eq!(q.salvaged.events, present.len() as u64, "{case}");
        }
        let head_before = present.last().map_or(0, |e| e.seq);

        // Deliver it all, as a sink does: read after the cursor, move it.
        let mut delivered = Vec::new();
        let mut cursor = 0;
        loop {
            let batch = reader
                .read_after(cursor, SINK, None, 100, 1 << 20)
                .unwrap_or_else(|e| panic!("{case}: cannot read for delivery: {e}"));
            let Some(last) = batch.last() else { break };
            cursor = last.seq;
            j.advance(SINK, None, cursor).await.unwrap();
            delivered.extend(batch);
        }
        check_events(&delivered, &stored, &case);
        assert_eq!(
            delivered.len(),
            present.len(),
            "{case}: delivery reads what a full read reads"
        );

        // It takes new events, past every seq the damaged file had and the
        // base had handed out.
        let new: Vec<_> = (0..10).map(|i| ev(i, &format!("new{seed}"))).collect();
        let out = j
            .append(new)
            .await
            .unwrap_or_else(|e| panic!("{case}: cannot append: {e}"));
        for o in out {
            let AppendOutcome::Stored { seq, .. } = o else {
                panic!("{case}: a new event taken as a duplicate")
            };
            assert!(
                seq > u64::from(EVENTS).max(head_before),
                "{case}: new event got seq {seq}"
            );
        }
        j.close().await;
        drop(j);
        // No crash loop: the next start is clean.
        let j = reopen(&dir).await;
        assert!(j.quarantine().is_none(), "{case}: quarantined again");
        j.close().await;
        drop(j);
        let _ = std::fs::remove_dir_all(&dir);

        let t = tallies.entry(format!("{kind:?}")).or_default();
        t.cases += 1;
        t.quarantined += u64::from(quarantined);
        t.recovered_events += present.len() as u64;
        t.delivered_events += delivered.len() as u64;
    }

    let mut kinds: Vec<_> = tallies.into_iter().collect();
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!("| damage | cases | quarantined | events recovered (of {EVENTS} each) | delivered |");
    eprintln!("|---|---|---|---|---|");
    for (kind, t) in &kinds {
        eprintln!(
            "| {kind} | {} | {} | {} | {} |",
            t.cases, t.quarantined, t.recovered_events, t.delivered_events
        );
    }
    eprintln!(
        "damaged rows skipped (all tests of this process): {}",
        DAMAGED_ROWS.load(std::sync::atomic::Ordering::Relaxed) - damaged_before
    );
    assert_eq!(kinds.iter().map(|(_, t)| t.cases).sum::<u64>(), CASES);
    // A file too damaged to open still gives up what is intact in it.
    for kind in ["TruncateDb", "OverwriteDb"] {
        let t = &kinds.iter().find(|(k, _)| k == kind).unwrap().1;
        assert!(
            t.quarantined > 0 && t.recovered_events > 0,
            "{kind}: nothing salvaged"
        );
    }
}
