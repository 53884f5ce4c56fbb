//! ENOSPC for real: the journal on a small tmpfs that runs out of space.
//!
//! Each test mounts its own tmpfs (`mount -t tmpfs -o size=…`), which needs
//! root (or CAP_SYS_ADMIN). Where mounting is not permitted the test says so
//! on stderr and returns without failing, except under `CI=true`, where it
//! fails; the guard unmounts on every path, a failed assertion included.
//!
//! What must hold when the disk fills: the append that does not fit is
//! answered `DiskFull` (never a panic, never a hang, never `Closed`), every
//! append answered Ok is in the file, and once space is freed appends succeed
//! again on the same handle: the writer recovers by itself. Through the
//! real binary and sources: HTTP ingest answers 503 and takes events again
//! once there is room; an MQTT source holds its acknowledgements (the
//! broker keeps the messages); the drain frees the disk by itself; and
//! under `when_full = "drop_oldest"` new events keep coming in while the
//! oldest make way behind gap events.

use crate::support;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{AppendOutcome, Journal, JournalError, JournalOptions, Reader, SyncMode};
use serde_json::Value;
use support::agent::{Harness, http_client, mes_events, post};

// ---------------------------------------------------------------- tmpfs ---

/// A tmpfs mounted on a fresh temp dir; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"24m"`), or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount(8): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(self.dir.path())
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // Busy (an agent that still holds a file): detach it lazily.
        if !umount(false) && !umount(true) {
            eprintln!("warning: could not unmount {}", self.dir.path().display());
        }
    }
}

/// Mounts a tmpfs or returns from the test, explaining why on stderr.
macro_rules! tmpfs_or_skip {
    ($size:expr) => {
        match Tmpfs::mount($size) {
            Ok(fs) => fs,
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("this test needs a real full filesystem and cannot mount one under CI: {why}")
            }
            Err(why) => {
                eprintln!(
                    "SKIPPED {}: this test needs a real full filesystem and cannot mount one here: {why}",
                    module_path!()
                );
                return;
            }
        }
    };
}

// -------------------------------------------------------------- helpers ---

fn ev(id: String, data_len: usize) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id,
        stream: "line/1".into(),
        class: Class::Critical,
        event_type: "test.event".into(),
        source_time: None,
        data: format!("\"{}\"", "x".repeat(data_len)).into_bytes(),
        attrs: None,
    }
}

/// Writes `bytes` of filler at `path` (fails on ENOSPC).
fn write_filler(path: &Path, bytes: usize) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(&vec![0xA5; bytes])?;
    f.sync_all()
}

/// Fills the filesystem under `dir` to the last byte with files named
/// `fill-*`; returns how many bytes went in.
fn fill_up(dir: &Path) -> u64 {
    let chunk = vec![0x5Au8; 64 * 1024];
    let mut total = 0u64;
    // Several files: a byte that does not fit one more block still fits
    // nowhere, but a short write into a new file still finds the last pages.
    for i in 0.. {
        let mut f = match std::fs::File::create(dir.join(format!("fill-{i}"))) {
            Ok(f) => f,
            Err(_) => return total,
        };
        let mut wrote_any = false;
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n as u64;
                    wrote_any = true;
                }
            }
        }
        if !wrote_any {
            return total;
        }
    }
    unreachable!()
}

fn journal_options(path: PathBuf) -> JournalOptions {
    let mut opts = JournalOptions::new(path);
    // The journal's own cap must not kick in: only the filesystem limits it.
    opts.max_size = 1 << 30;
    opts.sync = SyncMode::Normal;
    opts.sinks = vec!["central".into()];
    opts
}

// ------------------------------------------------------------ in-process ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_full_disk_fails_as_disk_full_keeps_what_was_acknowledged_and_recovers_once_space_is_freed()
 {
    let fs = tmpfs_or_skip!("40m");
    let filler = fs.path().join("filler");
    write_filler(&filler, 20 << 20).unwrap();
    let path = fs.path().join("journal.db");
    let journal = Journal::open(journal_options(path.clone())).unwrap();

    // Batches of 16 events of ~1 KiB until the disk says no.
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut n = 0usize;
    let started = Instant::now();
    let err = loop {
        let batch: Vec<NewEvent> = (0..16).map(|i| ev(format!("e{}", n + i), 1000)).collect();
        match journal.append(batch.clone()).await {
            Ok(out) => {
                for (o, e) in out.iter().zip(&batch) {
                    match o {
                        AppendOutcome::Stored { seq, .. } => acked.push((*seq, e.id.clone())),
                        AppendOutcome::Duplicate { .. } => panic!("{} is not a duplicate", e.id),
                    }
                }
                n += 16;
            }
            Err(e) => break e,
        }
        assert!(
            n < 200_000 && started.elapsed() < Duration::from_secs(120),
            "a 24 MiB filesystem never filled after {n} events"
        );
    };
    eprintln!(
        "disk full after {} acknowledged events ({:?}): {err}",
        acked.len(),
        started.elapsed()
    );
    assert!(
        matches!(err, JournalError::DiskFull { .. }),
        "the append that does not fit is answered DiskFull, got {err:?}"
    );
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    assert!(
        acked.len() > 1000,
        "only {} events fit in 20 MiB",
        acked.len()
    );

    // The writer is alive and keeps answering: DiskFull again (or Ok, should
    // a checkpoint have made room inside the files), never Closed, never a hang.
    assert!(journal.stats().writer_alive.load(Ordering::Relaxed));
    for attempt in 0..3 {
        let batch: Vec<NewEvent> = (0..16)
            .map(|i| ev(format!("still-full-{attempt}-{i}"), 1000))
            .collect();
        let again = tokio::time::timeout(Duration::from_secs(30), journal.append(batch.clone()))
            .await
            .expect("an append on a full disk is answered, not left hanging");
        match again {
            Err(JournalError::DiskFull { .. }) => {}
            Ok(out) => {
                eprintln!("attempt {attempt} on the full disk fit after all");
                for (o, e) in out.iter().zip(&batch) {
                    let AppendOutcome::Stored { seq, .. } = o else {
                        panic!("{o:?}")
                    };
                    acked.push((*seq, e.id.clone()));
                }
            }
            Err(other) => panic!("still full: expected DiskFull, got {other:?}"),
        }
    }
    let last_error = journal.stats().last_error.lock().unwrap().clone();
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("disk full")),
        "the status shows the disk-full error: {last_error:?}"
    );

    // Every append answered Ok is in the file, nothing else is.
    let rows = Reader::open(&path)
        .unwrap()
        .events_from(0, usize::MAX >> 1)
        .unwrap();
    assert_eq!(
        rows.len(),
        acked.len(),
        "rows in the journal vs acknowledged"
    );
    let in_file: Vec<(u64, String)> = rows.iter().map(|r| (r.seq, r.id.clone())).collect();
    assert_eq!(
        in_file, acked,
        "the journal holds exactly what was acknowledged"
    );
    assert_eq!(
        journal.stats().head_seq.load(Ordering::Relaxed),
        acked.len() as u64
    );

    // Free space (enough to set the reserve aside again, which lifts the
    // hold on the journal's size at the next maintenance, within a
    // second); the same handle appends again, numbering continues.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            journal.append((0..16).map(|i| ev(format!("after-{i}"), 1000)).collect()),
        )
        .await
        .expect("append after freeing space answered");
        match r {
            Ok(out) => break out,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "appends succeed again once space is freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let next = acked.len() as u64 + 1;
    assert_eq!(
        out[0],
        AppendOutcome::Stored {
            seq: next,
            stream_seq: next
        },
        "seq and stream seq continue where the last commit left them: no gap, no reuse"
    );
    journal.close().await;
    // The lock on journal.db.lock goes with the last handle, not with close().
    drop(journal);

    // A fresh open finds an intact journal (no quarantine) with everything.
    let reopened = Journal::open(journal_options(path.clone())).unwrap();
    assert!(
        reopened.quarantine().is_none(),
        "the journal is intact after a disk-full episode"
    );
    let rows = reopened
        .reader()
        .unwrap()
        .events_from(0, usize::MAX >> 1)
        .unwrap();
    assert_eq!(rows.len(), acked.len() + 16);
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert!(ids.contains("after-15"));
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_journal_on_a_full_filesystem_returns_a_clear_error_and_works_once_space_is_freed()
 {
    let fs = tmpfs_or_skip!("8m");
    let filled = fill_up(fs.path());
    assert!(filled > 7 << 20, "filled only {filled} bytes");
    let path = fs.path().join("journal.db");

    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Journal::open(journal_options(path.clone()))
    }));
    let result = match opened {
        Ok(r) => r,
        Err(_) => panic!("Journal::open panicked on a full filesystem"),
    };
    let err = match result {
        Ok(_) => panic!("Journal::open succeeded on a filesystem without one free byte"),
        Err(e) => e,
    };
    eprintln!("open on a full filesystem: {err}");
    let text = err.to_string();
    assert!(
        text.contains(path.to_str().unwrap()),
        "names the path: {text}"
    );
    assert!(
        matches!(err, JournalError::DiskFull { .. }) || text.contains("No space left"),
        "says the disk is full: {err:?}"
    );

    // Space back: the same path opens cleanly (no quarantine of whatever the
    // failed open left behind) and takes appends.
    for e in std::fs::read_dir(fs.path()).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("fill-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let journal = Journal::open(journal_options(path.clone()))
        .expect("the journal opens once there is space again");
    assert!(
        journal.quarantine().is_none(),
        "a journal that could not be created is not treated as damaged: {:?}",
        journal.quarantine()
    );
    let out = journal.append(vec![ev("first".into(), 10)]).await.unwrap();
    assert_eq!(
        out,
        [AppendOutcome::Stored {
            seq: 1,
            stream_seq: 1
        }]
    );
    journal.close().await;
}

// ------------------------------------------------------- the real binary ---

/// A `plantrelay run` process whose state is on a tmpfs, killed on drop
/// (before the tmpfs goes).
struct DiskAgent {
    child: std::process::Child,
    log: PathBuf,
    url: String,
}

impl DiskAgent {
    /// Starts the agent with its state on `fs` and waits until it listens.
    async fn start(fs: &Tmpfs, h: &Harness) -> DiskAgent {
        DiskAgent::start_with(fs, h, "").await
    }

    /// [`DiskAgent::start`] with `journal` lines in `[journal]`.
    async fn start_with(fs: &Tmpfs, h: &Harness, journal: &str) -> DiskAgent {
        let state = fs.path().join("state");
        let port = support::free_port();
        let text = h
            .config_text(
                &format!("127.0.0.1:{port}"),
                &h.receiver.url(),
                "batch_max_events = 500\ncompression = \"none\"",
                "",
            )
            .replace(h.state_dir().to_str().unwrap(), state.to_str().unwrap())
            .replace(
                "sync = \"normal\"",
                &format!("sync = \"normal\"\nmax_size = \"1GiB\"\n{journal}"),
            );
        let config = h.write_config(&text);
        let log = h.dir.path().join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_plantrelay"))
            .args(["run", "-c", config.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env("PLANTRELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut a = DiskAgent {
            child,
            log,
            url: format!("http://127.0.0.1:{port}/v1/events"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                a.child.try_wait().unwrap().is_none(),
                "agent exited:\n{}",
                a.read_log()
            );
            assert!(
                Instant::now() < deadline,
                "agent did not listen:\n{}",
                a.read_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Posts batches of 50 padded events until one is refused; returns how
    /// many were accepted and the refusal.
    async fn fill_until_refused(&self) -> (usize, (u16, Value)) {
        let client = http_client();
        let mut accepted = 0usize;
        let started = Instant::now();
        for round in 0.. {
            let mut batch = mes_events(&format!("df{round}"), 50, 4);
            for e in &mut batch {
                e["data"]["pad"] = Value::String("p".repeat(1000));
            }
            let (status, body) = post(&client, &self.url, &batch).await;
            if status != 202 {
                eprintln!(
                    "agent refused after {accepted} accepted events ({:?}): {status} {body}",
                    started.elapsed()
                );
                return (accepted, (status, body));
            }
            accepted += 50;
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the filesystem never filled after {accepted} events"
            );
        }
        unreachable!()
    }

    /// SIGTERM; asserts a clean exit and returns the log.
    async fn stop(mut self) -> String {
        support::signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.read_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let text = self.read_log();
        eprintln!(
            "agent log: {} lines, {} commit failures, {} journal reopens",
            text.lines().count(),
            text.matches("journal commit failed").count(),
            text.matches("journal reopened").count()
        );
        assert_eq!(status.code(), Some(0), "{status}\n{text}");
        assert!(!text.contains("panicked"), "{text}");
        text
    }
}

impl Drop for DiskAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_503_on_a_full_disk_keeps_running_and_accepts_again_once_space_is_freed()
{
    let fs = tmpfs_or_skip!("40m");
    let h = Harness::new().await;
    let filler = fs.path().join("filler");
    write_filler(&filler, 20 << 20).unwrap();
    let mut a = DiskAgent::start(&fs, &h).await;
    let started = Instant::now();

    // The upstream is down while the disk fills (as in a WAN outage, which
    // is when a plant's journal grows): the test's 2 cores go to ingest.
    h.receiver.set_fail(503, Some(1), 1.0);
    let (mut accepted, refusal) = a.fill_until_refused().await;
    assert_eq!(
        refusal.0, 503,
        "a full disk is a retryable refusal: {refusal:?}"
    );
    let message = refusal.1["error"].as_str().unwrap_or_default();
    assert!(message.contains("disk full"), "{refusal:?}");
    assert!(a.running(), "the agent is still running:\n{}", a.read_log());

    // Free space: the same agent accepts again, once its maintenance (each
    // second) has set the reserve aside again.
    std::fs::remove_file(&filler).unwrap();
    let mut batch = mes_events("back", 5, 1);
    for e in &mut batch {
        e["data"]["pad"] = Value::String("p".repeat(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post(&http_client(), &a.url, &batch).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "still refused after space was freed: {body}\n{}",
            a.read_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    accepted += 5;

    // The WAN is back: everything acknowledged reaches the upstream.
    h.receiver.clear_faults();
    let delivered = h.receiver.wait_for(accepted, Duration::from_secs(60)).await;
    assert!(delivered, "{:?} of {accepted}", h.receiver.stats());
    eprintln!("all {accepted} delivered ({:?})", started.elapsed());

    let text = a.stop().await;
    assert!(text.contains("disk full"), "the log says why: {text}");
    let v = h.receiver.verdict();
    assert_eq!((v.out_of_order, v.missing), (0, 0), "{v:?}");
}

/// The upstream comes back while the disk is still full, and nobody frees
/// anything: delivering must be what frees the disk. Before the journal
/// kept a reserve, the forwarder sent a batch, could not store its cursor
/// (no room for the WAL to grow) and sent the same batch again, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drains_by_itself_once_the_upstream_is_back() {
    let fs = tmpfs_or_skip!("24m");
    let h = Harness::new().await;
    write_filler(&fs.path().join("filler"), 4 << 20).unwrap();
    let a = DiskAgent::start(&fs, &h).await;
    h.receiver.set_fail(503, Some(1), 1.0);
    let (accepted, refusal) = a.fill_until_refused().await;
    assert_eq!(refusal.0, 503, "{refusal:?}");

    h.receiver.clear_faults();
    let delivered = h.receiver.wait_for(accepted, Duration::from_secs(60)).await;
    let keys = h.receiver.idempotency_keys();
    let mut sent: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for k in keys.into_iter().flatten() {
        *sent.entry(k).or_default() += 1;
    }
    let most = sent.values().copied().max().unwrap_or(0);
    assert!(
        delivered,
        "{:?} of {accepted} delivered; a batch was sent {most} times\n{}",
        h.receiver.stats(),
        a.read_log()
    );
    assert!(most <= 3, "a batch was sent {most} times");
    // Delivering freed room: the agent takes new events again, on the same
    // full filesystem.
    let mut batch = mes_events("after", 50, 4);
    for e in &mut batch {
        e["data"]["pad"] = Value::String("p".repeat(1000));
    }
    let (status, body) = post(&http_client(), &a.url, &batch).await;
    assert_eq!(status, 202, "{body}");
    assert!(
        h.receiver
            .wait_for(accepted + 50, Duration::from_secs(30))
            .await,
        "{:?}",
        h.receiver.stats()
    );
    let text = a.stop().await;
    let v = h.receiver.verdict();
    assert_eq!((v.out_of_order, v.missing), (0, 0), "{v:?}");
    assert!(
        text.contains("reserve"),
        "the log tells of the reserve: {text}"
    );
}

/// `when_full = "drop_oldest"` on a disk that fills long before
/// `max_size`: the journal holds at its size, the oldest undelivered events
/// make way for new ones behind gap events, and once the upstream is back
/// every stream sequence it did not receive is announced by a gap event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_drop_oldest_takes_new_events_and_announces_every_evicted_one() {
    let fs = tmpfs_or_skip!("24m");
    let h = Harness::new().await;
    write_filler(&fs.path().join("filler"), 4 << 20).unwrap();
    let mut a = DiskAgent::start_with(&fs, &h, "when_full = \"drop_oldest\"").await;

    // The upstream is down while the disk fills: nothing can be delivered,
    // so only eviction makes room.
    h.receiver.set_fail(503, Some(1), 1.0);
    let (filled, refusal) = a.fill_until_refused().await;
    assert_eq!(refusal.0, 503, "{refusal:?}");
    assert!(a.running(), "{}", a.read_log());

    // Three times as many again (more than the disk reserve, which the
    // first disk-full error gives back, could hold): each batch is taken,
    // at most after a refusal or two while an eviction runs.
    let client = http_client();
    let mut posted = filled;
    let mut refusals = 0;
    let rounds = 3 * filled / 50;
    for round in 0..rounds {
        let mut batch = mes_events(&format!("more{round}"), 50, 4);
        for e in &mut batch {
            e["data"]["pad"] = Value::String("p".repeat(1000));
        }
        let mut tries = 0;
        loop {
            let (status, body) = post(&client, &a.url, &batch).await;
            if status == 202 {
                break;
            }
            assert_eq!(status, 503, "{body}");
            tries += 1;
            refusals += 1;
            assert!(
                tries < 20,
                "a batch refused 20 times on a full disk under drop_oldest: {body}\n{}",
                a.read_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        posted += 50;
    }
    eprintln!(
        "{filled} events filled the disk; {posted} posted in all, {refusals} refusals after that"
    );

    // The WAN is back: every stream sequence arrives or is announced.
    h.receiver.clear_faults();
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        let v = h.receiver.verdict();
        let accounted: u64 = v
            .per_stream
            .values()
            .map(|s| s.unique + s.gap_covered)
            .sum();
        if accounted as usize >= posted || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let received: u64 = v.per_stream.values().map(|s| s.unique).sum();
    assert_eq!(
        (received + v.gap_covered) as usize,
        posted,
        "every event arrives or is announced: {v:?}"
    );
    assert_eq!((v.missing, v.out_of_order), (0, 0), "{v:?}");
    assert!(v.gap_covered > 0, "the full disk evicted nothing: {v:?}");
    // The newest events were kept.
    let ids: HashSet<String> = h.receiver.ids().into_iter().map(|(_, id)| id).collect();
    let last = rounds - 1;
    assert!(
        (0..50).all(|i| ids.contains(&format!("more{last}-{i}"))),
        "the last batch was delivered"
    );
    let text = a.stop().await;
    assert!(text.contains("drop_oldest"), "the log says why: {text}");
}

/// An MQTT source on a disk that fills (`when_full = "block"`): the source
/// holds its acknowledgements and retries, the broker keeps what it
/// acknowledged to the publisher, and once the upstream is back (delivered
/// events are then deleted at once) every message arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_source_on_a_full_disk_holds_its_acks_and_loses_nothing() {
    use plantrelay::demo::machines::EmbeddedBroker;
    use support::mqtt::source_toml;

    support::logs::start();
    let fs = tmpfs_or_skip!("24m");
    write_filler(&fs.path().join("filler"), 4 << 20).unwrap();
    let broker = EmbeddedBroker::start().await.unwrap();
    let h = Harness::new().await;
    h.receiver.stop().await;
    let state = fs.path().join("state");
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "",
            &source_toml("line", &broker.url(), &["full/+/state"], ""),
        )
        .replace(h.state_dir().to_str().unwrap(), state.to_str().unwrap())
        .replace(
            "sync = \"normal\"",
            "sync = \"normal\"\nmax_size = \"1GiB\"\nretain_acked = \"1h\"",
        );
    let a = plantrelay::agent::start(
        &plantrelay::config::Config::load(&h.write_config(&text)).unwrap(),
    )
    .await
    .unwrap();
    // 1,500 messages of 16 KiB: more than the 20 MiB the filesystem has.
    // Once the upstream is back nobody frees anything: delivering frees
    // the disk.
    let (stored_while_full, total) =
        support::mqtt::fill_hold_and_drain(&h, &a, broker.addr(), "disk full").await;
    eprintln!(
        "disk full: {stored_while_full} of {total} stored before the disk filled; all {total} delivered once the upstream was back"
    );
    a.shutdown().await;
}

/// ENOSPC at a checkpoint: the WAL holds 6 MiB of acknowledged events that
/// `journal.db` has yet to take (a reader's snapshot held them back) when
/// the disk fills, so copying them in needs room the disk no longer has.
/// No reserve here, so nothing else makes room. Every acknowledged event
/// stays readable, an append is refused as disk full (the WAL cannot be
/// restarted, nor grow), and once space is freed the appends go on, the
/// checkpoint completes and a reopen finds an intact journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_on_a_full_disk_loses_nothing_and_completes_once_space_is_freed() {
    use rusqlite::{Connection, OpenFlags};

    let fs = tmpfs_or_skip!("24m");
    let path = fs.path().join("journal.db");
    let wal = fs.path().join("journal.db-wal");
    let mut opts = journal_options(path.clone());
    opts.disk_reserve = 0;
    let journal = Journal::open(opts.clone()).unwrap();
    journal.append(vec![ev("first".into(), 100)]).await.unwrap();

    // A snapshot from before the appends: no checkpoint can copy them.
    let pin = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    pin.execute_batch("BEGIN").unwrap();
    let _: i64 = pin
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    let mut acked = 1usize;
    for b in 0..375 {
        let batch: Vec<NewEvent> = (0..16).map(|i| ev(format!("w{b}-{i}"), 1000)).collect();
        journal.append(batch).await.unwrap();
        acked += 16;
    }
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let (wal_before, db_before) = (len(&wal), len(&path));
    assert!(
        wal_before > 6 << 20 && db_before < 1 << 20,
        "the appends stay in the WAL: wal {wal_before}, db {db_before}"
    );
    let filled = fill_up(fs.path());
    pin.execute_batch("COMMIT").unwrap();
    drop(pin);

    // The checkpoint cannot copy the frames: the disk is full.
    let probe = Connection::open(&path).unwrap();
    let r: rusqlite::Result<(i64, i64, i64)> =
        probe.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        });
    match &r {
        Err(e) => assert!(e.to_string().contains("full"), "{e}"),
        Ok((_, log, done)) => assert!(done < log, "the checkpoint found room: {r:?}"),
    }
    drop(probe);
    eprintln!("disk filled with {filled} bytes; checkpoint on the full disk: {r:?}");

    // The journal answers, refuses what does not fit, and keeps the rest.
    let refused = journal
        .append((0..16).map(|i| ev(format!("full-{i}"), 1000)).collect())
        .await;
    match refused {
        Err(JournalError::DiskFull { .. }) => {}
        Ok(_) => acked += 16,
        Err(other) => panic!("expected DiskFull, got {other:?}"),
    }
    assert!(journal.stats().writer_alive.load(Ordering::Relaxed));
    let rows = Reader::open(&path)
        .unwrap()
        .events_from(0, usize::MAX >> 1)
        .unwrap();
    assert_eq!(rows.len(), acked, "every acknowledged event is readable");

    // Space back: appends go on and the checkpoint completes.
    for i in 0.. {
        if std::fs::remove_file(fs.path().join(format!("fill-{i}"))).is_err() {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match journal
            .append((0..16).map(|i| ev(format!("after-{i}"), 1000)).collect())
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no append after freeing space: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    acked += 16;
    journal.close().await;
    drop(journal);
    assert!(
        len(&path) > 6 << 20,
        "the checkpoint copied the WAL into journal.db: db {}",
        len(&path)
    );

    let reopened = Journal::open(opts).unwrap();
    assert!(reopened.quarantine().is_none(), "intact after the episode");
    let rows = reopened
        .reader()
        .unwrap()
        .events_from(0, usize::MAX >> 1)
        .unwrap();
    assert_eq!(rows.len(), acked);
    assert_eq!(rows[0].id, "first");
    assert_eq!(rows.last().unwrap().id, "after-15");
}
