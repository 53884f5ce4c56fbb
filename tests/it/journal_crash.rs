//! Crash test with real processes: a child appends in a loop and is killed
//! with SIGKILL at random moments. After every restart each append that had
//! been answered is present exactly once, under the seq it was answered
//! with; stream seqs have no gaps, and seqs none but the range each restart
//! steps over (see `lost_tail.rs`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{AppendOutcome, Journal, JournalOptions, Reader};
use rand::Rng;

use crate::support::journal::{child_runtime, spawn_child_test};

const CHILD_ENV: &str = "PLANTRELAY_CRASH_CHILD_DIR";

fn options(dir: &std::path::Path) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("journal.db"));
    o.sinks = vec!["central".into()];
    o
}

/// The child: not a test of its own (returns at once without the env var).
#[test]
fn crash_child_appender() {
    let Some((dir, rt)) = child_runtime(CHILD_ENV) else {
        return;
    };
    rt.block_on(async move {
        let journal = Journal::open(options(&dir)).unwrap();
        let mut out = std::io::stdout().lock();
        // Ids answered in earlier lives: they must come back as duplicates.
        let resend: Vec<String> = std::fs::read_to_string(dir.join("resend.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        for id in resend {
            let r = journal.append(vec![event(&id)]).await.unwrap();
            match r[0] {
                AppendOutcome::Duplicate { seq } => writeln!(out, "DUP {id} {seq}").unwrap(),
                AppendOutcome::Stored { seq, .. } => {
                    writeln!(out, "STORED-AGAIN {id} {seq}").unwrap()
                }
            }
        }
        // Own line: libtest has printed "test name ... " without a newline.
        writeln!(out, "\nREADY").unwrap();
        out.flush().unwrap();
        drop(out);
        let pid = std::process::id();
        let appenders: Vec<_> = (0..4)
            .map(|task| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let n = rand::rng().random_range(1..20);
                        let batch: Vec<_> = (0..n)
                            .map(|k| event(&format!("{pid}-{task}-{i}-{k}")))
                            .collect();
                        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
                        let outcomes = journal.append(batch).await.unwrap();
                        let mut lines = String::new();
                        for (id, o) in ids.iter().zip(outcomes) {
                            if let AppendOutcome::Stored { seq, .. } = o {
                                lines.push_str(&format!("ACK {id} {seq}\n"));
                            }
                        }
                        let mut out = std::io::stdout().lock();
                        out.write_all(lines.as_bytes()).unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for a in appenders {
            let _ = a.await;
        }
    });
}

fn event(id: &str) -> NewEvent {
    let stream = format!("line{}", id.len() % 7);
    NewEvent {
        source: "mes".into(),
        id: id.into(),
        stream,
        class: Class::Critical,
        event_type: "test.crash".into(),
        source_time: None,
        data: br#"{"qty":1}"#.to_vec(),
        attrs: None,
    }
}

#[test]
fn sigkilled_appenders_lose_nothing_that_was_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut rng = rand::rng();
    let trials = 24;
    for trial in 0..trials {
        let resend: Vec<&String> = acked.keys().take(40).collect();
        std::fs::write(
            dir.path().join("resend.txt"),
            resend.iter().map(|s| format!("{s}\n")).collect::<String>(),
        )
        .unwrap();
        let mut child =
            spawn_child_test("journal_crash::crash_child_appender", CHILD_ENV, dir.path());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait until it has had a new event answered (the journal is open
        // and appending; how long its first commit takes depends on the
        // machine and the commit window), then kill at a random moment.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lines = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("child makes progress");
            let appending = line.starts_with("ACK ");
            lines.push(line);
            if appending {
                break;
            }
            assert!(Instant::now() < deadline);
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        let mut new = 0;
        for line in &lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["ACK", id, seq] => {
                    let seq: u64 = seq.parse().unwrap();
                    assert!(
                        acked.insert(id.to_string(), seq).is_none(),
                        "{id} answered twice"
                    );
                    new += 1;
                }
                ["DUP", id, seq] => {
                    assert_eq!(
                        acked.get(*id),
                        Some(&seq.parse().unwrap()),
                        "re-sent {id} answered with its first seq"
                    );
                }
                ["STORED-AGAIN", id, _] => panic!("trial {trial}: {id} was stored twice"),
                _ => {}
            }
        }
        assert!(
            new > 0,
            "trial {trial}: the child appended before it was killed"
        );
    }

    // Verify the journal after the last kill (reading needs no writer).
    let reader = Reader::open(&dir.path().join("journal.db")).unwrap();
    let rows = reader.events_from(0, usize::MAX >> 1).unwrap();
    // Every restart after a kill steps over the seqs the killed run had
    // reserved (so that none a lost commit held is used again), and keeps
    // the range it skipped: the gap-free check below finds every gap in
    // them. A run killed while its head stood exactly at its reservation
    // (the next commit still reserving) left none to skip, so a restart
    // may have no range; most have one.
    let skips = reader.skipped_seqs().unwrap();
    assert!(
        skips.len() < trials && skips.len() >= (trials - 1) / 2,
        "one skipped range per restart but for those with nothing to skip, {} restarts: {skips:?}",
        trials - 1
    );
    let mut by_id: HashMap<&str, u64> = HashMap::new();
    for r in &rows {
        assert!(
            by_id.insert(&r.id, r.seq).is_none(),
            "{} stored twice",
            r.id
        );
    }
    for (id, seq) in &acked {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(seq),
            "answered append {id} lost or moved"
        );
    }
    let mut expected = 1;
    for r in &rows {
        if let Some(&(_, last)) = skips.iter().find(|(first, _)| *first == expected) {
            expected = last + 1;
        }
        assert_eq!(
            r.seq, expected,
            "seqs are gap-free but for the ranges skipped at restarts ({skips:?})"
        );
        expected += 1;
    }
    let mut per_stream: HashMap<&str, u64> = HashMap::new();
    for r in &rows {
        let last = per_stream.entry(&r.stream).or_insert(0);
        assert_eq!(r.stream_seq, *last + 1, "stream seqs are gap-free");
        *last = r.stream_seq;
    }
    eprintln!(
        "crash test: {trials} kills, {} answered appends, {} rows, 0 lost, 0 duplicated",
        acked.len(),
        rows.len()
    );
}
