//! A journal whose WAL lost its last commits (power lost under
//! `sync = "normal"`, a cut or damaged WAL, an older copy put back) must
//! never give new events the seqs of the lost ones: an upstream may hold
//! those under the same `sequence` and `Idempotency-Key` and would drop the
//! new events as duplicates.
//!
//! The disk at the moment of the loss is modelled by copies of the files:
//! the journal and its WAL as they were some commits earlier, beside the
//! seq mark as it was last fsynced.

use std::path::Path;

use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{AppendOutcome, Journal, JournalOptions, Reader, seq_mark_path};

fn ev(id: &str) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id: id.into(),
        stream: "line1".into(),
        class: Class::Critical,
        event_type: "test.event".into(),
        source_time: None,
        data: br#"{"qty":1}"#.to_vec(),
        attrs: None,
    }
}

fn opts(dir: &Path) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("journal.db"));
    o.sinks = vec!["central".into()];
    o
}

async fn append(j: &Journal, ids: std::ops::Range<u32>, tag: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in ids {
        let out = j.append(vec![ev(&format!("{tag}-{i}"))]).await.unwrap();
        match out[0] {
            AppendOutcome::Stored { seq, .. } => seqs.push(seq),
            AppendOutcome::Duplicate { seq } => panic!("{tag}-{i} taken as a duplicate of {seq}"),
        }
    }
    seqs
}

/// Copies the journal and its WAL (what a power loss would leave of them
/// at this moment) into `to`.
fn snapshot_journal(dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["journal.db", "journal.db-wal"] {
        let from = dir.join(name);
        if from.exists() {
            std::fs::copy(&from, to.join(name)).unwrap();
        }
    }
}

/// Puts the snapshot's journal and WAL back, as the disk after the loss.
fn restore_journal(snapshot: &Path, dir: &Path) {
    for name in ["journal.db", "journal.db-wal", "journal.db-shm"] {
        let _ = std::fs::remove_file(dir.join(name));
        let from = snapshot.join(name);
        if from.exists() {
            std::fs::copy(&from, dir.join(name)).unwrap();
        }
    }
}

fn backlog(dir: &Path) -> u64 {
    let r = Reader::open(&dir.join("journal.db")).unwrap();
    let head = r.head_seq().unwrap();
    r.position("central", &[None], head).unwrap().backlog
}

#[tokio::test]
async fn after_a_crash_that_lost_the_wal_tail_no_seq_is_handed_out_twice() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let before_loss = root.path().join("before-loss");
    let crashed = root.path().join("crashed");

    let j = Journal::open(opts(&dir)).unwrap();
    let kept = append(&j, 0..50, "kept").await;
    snapshot_journal(&dir, &before_loss);
    let lost = append(&j, 50..100, "lost").await;
    assert_eq!(lost.last(), Some(&100));
    // The crash: the process dies with the journal open. The files as they
    // are now (the seq mark among them) are what it leaves; the journal
    // closes afterwards only because this test's process lives on.
    std::fs::create_dir_all(&crashed).unwrap();
    std::fs::copy(seq_mark_path(&dir.join("journal.db")), crashed.join("mark")).unwrap();
    j.close().await;
    drop(j);
    std::fs::copy(crashed.join("mark"), seq_mark_path(&dir.join("journal.db"))).unwrap();
    // ... and the WAL lost its last 50 commits.
    restore_journal(&before_loss, &dir);

    let j = Journal::open(opts(&dir)).unwrap();
    assert_eq!(
        j.stats()
            .head_seq
            .load(std::sync::atomic::Ordering::Relaxed),
        50
    );
    let new = append(&j, 0..20, "new").await;
    assert!(
        new.iter().all(|s| !lost.contains(s) && !kept.contains(s)),
        "new events took seqs the lost run had handed out: {new:?}"
    );
    assert!(new.windows(2).all(|w| w[1] == w[0] + 1), "{new:?}");
    // A backlog counts events, not the seqs jumped over.
    assert_eq!(backlog(&dir), 70);
    assert_eq!(j.stats().backlog(new[19], 0), 70);
    j.close().await;
    drop(j);

    // The jump is taken once: the next run counts on from the head.
    let j = Journal::open(opts(&dir)).unwrap();
    let next = append(&j, 20..21, "new").await;
    assert_eq!(next, vec![new[19] + 1]);
    assert_eq!(backlog(&dir), 71);
    j.close().await;
}

#[tokio::test]
async fn a_journal_that_lost_commits_after_a_clean_stop_counts_on_from_the_stop() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let older = root.path().join("older");

    let j = Journal::open(opts(&dir)).unwrap();
    append(&j, 0..30, "kept").await;
    snapshot_journal(&dir, &older);
    let lost = append(&j, 30..60, "lost").await;
    j.close().await;
    drop(j);
    // An older copy of the journal put back after a clean stop at seq 60.
    restore_journal(&older, &dir);

    let j = Journal::open(opts(&dir)).unwrap();
    let new = append(&j, 0..5, "new").await;
    assert_eq!(new, vec![61, 62, 63, 64, 65], "lost: {lost:?}");
    assert_eq!(backlog(&dir), 35);
    j.close().await;
}

#[tokio::test]
async fn a_clean_stop_leaves_no_gap_and_a_crash_without_new_events_keeps_its_jump() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    let mark = seq_mark_path(&dir.join("journal.db"));

    let j = Journal::open(opts(&dir)).unwrap();
    append(&j, 0..10, "a").await;
    let crash_mark = std::fs::read(&mark).unwrap();
    j.close().await;
    drop(j);
    let j = Journal::open(opts(&dir)).unwrap();
    assert_eq!(
        append(&j, 10..11, "a").await,
        vec![11],
        "clean stop: no gap"
    );
    j.close().await;
    drop(j);

    // A crash (the mark as a running journal leaves it), then a run that
    // stores nothing and stops cleanly: the seqs the crashed run reserved
    // stay skipped for the run after.
    std::fs::write(&mark, &crash_mark).unwrap();
    let j = Journal::open(opts(&dir)).unwrap();
    j.close().await;
    drop(j);
    let j = Journal::open(opts(&dir)).unwrap();
    let s = append(&j, 11..12, "a").await;
    assert!(s[0] > 11 + 1000, "the reserved seqs were skipped: {s:?}");
    assert_eq!(backlog(&dir), 12);
    j.close().await;
}
