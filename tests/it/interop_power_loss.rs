//! The power-loss model: a child process appends to a journal (commit
//! window on, a sink's cursor moving with relaxed, unsynced commits) under
//! `strace`, which records every write, fsync and truncation of its files
//! and every acknowledgement it prints. Replaying the trace gives, at the
//! moment of each acknowledgement, the files as a power cut would leave
//! them: each as of its last fsync. With `sync = "full"` every acknowledged
//! event must be in that state under the seq it was given, and the seq mark
//! must cover every seq in it. With `sync = "normal"` the same model finds
//! acknowledged events missing: what the README says of it, and the proof
//! that the check can fail.
//!
//! Needs the system `strace` (`.ci/run` installs it): `cargo test
//! --features interop --test it interop_power_loss::`.

#![cfg(feature = "interop")]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use plantrelay::event::{Class, NewEvent};
use plantrelay::journal::{
    AppendOutcome, Journal, JournalOptions, SyncMode, read_seq_mark, seq_mark_path,
};

use crate::support::journal::child_runtime;

const CHILD_ENV: &str = "PLANTRELAY_POWER_CHILD_DIR";
const SYNC_ENV: &str = "PLANTRELAY_POWER_CHILD_SYNC";
const TASKS: u32 = 4;
const APPENDS: u32 = 50;

/// The child: appends from four tasks and prints one `ACK <id> <seq>` line
/// per stored event after each append returns; one task moves the sink's
/// cursor every few appends. Returns at once without the env var.
#[test]
fn power_loss_child() {
    let Some((dir, rt)) = child_runtime(CHILD_ENV) else {
        return;
    };
    let sync = match std::env::var(SYNC_ENV).as_deref() {
        Ok("normal") => SyncMode::Normal,
        _ => SyncMode::Full,
    };
    rt.block_on(async move {
        let mut o = JournalOptions::new(dir.join("journal.db"));
        o.sinks = vec!["central".into()];
        o.sync = sync;
        let journal = Journal::open(o).unwrap();
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    for i in 0..APPENDS {
                        let batch: Vec<NewEvent> = (0..1 + (i + task) % 3)
                            .map(|k| event(&format!("t{task}-{i}-{k}")))
                            .collect();
                        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
                        let out = journal.append(batch).await.unwrap();
                        let mut lines = String::new();
                        let mut last = 0;
                        for (id, o) in ids.iter().zip(out) {
                            if let AppendOutcome::Stored { seq, .. } = o {
                                lines.push_str(&format!("ACK {id} {seq}\n"));
                                last = seq;
                            }
                        }
                        // One write per append: the trace shows it whole.
                        {
                            let mut out = std::io::stdout().lock();
                            out.write_all(lines.as_bytes()).unwrap();
                            out.flush().unwrap();
                        }
                        if task == 0 && i % 4 == 3 {
                            journal.advance("central", None, last).await.unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        journal.close().await;
    });
}

fn event(id: &str) -> NewEvent {
    NewEvent {
        source: "mes".into(),
        id: id.into(),
        stream: format!("line{}", id.len() % 3),
        class: Class::Critical,
        event_type: "test.power".into(),
        source_time: None,
        data: format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(150)).into_bytes(),
        attrs: None,
    }
}

/// One file of the journal, as the kernel has it and as the disk has it.
#[derive(Default, Clone)]
struct FileModel {
    current: Vec<u8>,
    /// As of its last fsync; `None` until the first.
    durable: Option<Vec<u8>>,
}

/// The files the model follows, by name.
const FILES: [&str; 4] = [
    "journal.db",
    "journal.db-wal",
    "journal.db-journal",
    "journal.db.seq",
];

#[derive(Default)]
struct Outcome {
    acks: usize,
    checks: usize,
    syncs: usize,
    /// Of `syncs`, those by `fsync` (the rest by `fdatasync`).
    fsyncs: usize,
    /// Acknowledged events absent from the durable state, at the first
    /// check that found any.
    missing: Vec<String>,
}

/// The quoted `\xHH…` string of a syscall's arguments.
fn hex_arg(args: &str) -> Vec<u8> {
    let start = args.find('"').unwrap() + 1;
    let end = start + args[start..].find('"').unwrap();
    unhex(&args[start..end])
}

/// `\xHH…` as strace `-xx` writes strings and paths, decoded.
fn unhex(hex: &str) -> Vec<u8> {
    hex.split("\\x")
        .filter(|h| !h.is_empty())
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

/// The name of a file from its path's bytes.
fn file_name(path: &[u8]) -> Option<String> {
    let path = String::from_utf8_lossy(path).into_owned();
    Some(Path::new(&path).file_name()?.to_string_lossy().into_owned())
}

/// `5</tmp/x/journal.db-wal>` at the start of `args` (the path in `\xHH`
/// form): the file's name.
fn fd_name(args: &str) -> Option<String> {
    let open = args.find('<')?;
    let close = open + args[open..].find('>')?;
    file_name(&unhex(&args[open + 1..close]))
}

/// The last argument of a call, `…, 4096) = 4120`: an offset or a length.
fn last_int_arg(args: &str) -> usize {
    let (_, last) = args.rsplit_once(", ").unwrap();
    last.split(')').next().unwrap().trim().parse().unwrap()
}

/// Replays `trace` and checks the durable state at every acknowledgement.
fn replay(trace: &str, scratch: &Path) -> Outcome {
    let mut files: HashMap<String, FileModel> = HashMap::new();
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut unfinished: HashMap<String, String> = HashMap::new();
    let mut out = Outcome::default();
    // The durable rows (id → seq) as of the last check, and whether the
    // durable state changed since.
    let mut durable_rows: HashMap<String, u64> = HashMap::new();
    let mut stale = true;
    let mut checked_acks = 0;
    for raw in trace.lines() {
        let (pid, rest) = raw.split_once(' ').unwrap_or(("", raw));
        let rest = rest.trim_start();
        // Join a call strace split around another thread's.
        let line = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid.to_string(), head.to_string());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let tail = &tail[tail.find("resumed>").unwrap() + "resumed>".len()..];
            format!("{}{tail}", unfinished.remove(pid).unwrap_or_default())
        } else {
            rest.to_string()
        };
        let Some((call, args)) = line.split_once('(') else {
            continue;
        };
        let name = fd_name(args);
        let ours = name.as_deref().is_some_and(|n| FILES.contains(&n));
        match call {
            "pwrite64" if ours => {
                let bytes = hex_arg(args);
                let offset = last_int_arg(args);
                let f = files.entry(name.unwrap()).or_default();
                if f.current.len() < offset + bytes.len() {
                    f.current.resize(offset + bytes.len(), 0);
                }
                f.current[offset..offset + bytes.len()].copy_from_slice(&bytes);
            }
            "ftruncate" if ours => {
                let len = last_int_arg(args);
                files
                    .entry(name.unwrap())
                    .or_default()
                    .current
                    .resize(len, 0);
            }
            "fsync" | "fdatasync" if ours => {
                let f = files.entry(name.unwrap()).or_default();
                f.durable = Some(f.current.clone());
                out.syncs += 1;
                out.fsyncs += usize::from(call == "fsync");
                stale = true;
            }
            "write" if ours => panic!("a write the model does not place: {line}"),
            // SQLite deletes its rollback journal at commit (before the
            // journal turns to WAL): taken as durable at once.
            "unlink" | "unlinkat" => {
                if let Some(n) = file_name(&hex_arg(args)).filter(|n| FILES.contains(&n.as_str())) {
                    files.remove(&n);
                    stale = true;
                }
            }
            "write" if args.starts_with("1<") => {
                let text = String::from_utf8(hex_arg(args)).unwrap();
                for l in text.lines() {
                    if let ["ACK", id, seq] = l.split(' ').collect::<Vec<_>>().as_slice() {
                        acked.push((id.to_string(), seq.parse().unwrap()));
                    }
                }
                if acked.len() == checked_acks {
                    continue;
                }
                // A new durable state must hold every event acknowledged so
                // far (a checkpoint must not lose what the WAL had); an
                // unchanged one, the events acknowledged since.
                let from = if stale {
                    durable_rows = durable_state(&files, scratch);
                    stale = false;
                    out.checks += 1;
                    0
                } else {
                    checked_acks
                };
                let missing: Vec<String> = acked[from..]
                    .iter()
                    .filter(|(id, seq)| durable_rows.get(id) != Some(seq))
                    .map(|(id, seq)| format!("{id} (seq {seq})"))
                    .collect();
                if out.missing.is_empty() && !missing.is_empty() {
                    out.missing = missing;
                }
                checked_acks = acked.len();
            }
            _ => {}
        }
    }
    out.acks = acked.len();
    out
}

/// Writes the durable files into `scratch` and reads their rows; checks
/// that the seq mark covers every seq there.
fn durable_state(files: &HashMap<String, FileModel>, scratch: &Path) -> HashMap<String, u64> {
    for name in FILES.iter().chain(&["journal.db-shm"]) {
        let _ = std::fs::remove_file(scratch.join(name));
    }
    for (name, f) in files {
        if let Some(d) = &f.durable {
            std::fs::write(scratch.join(name), d).unwrap();
        }
    }
    let db = scratch.join("journal.db");
    if !db.exists() {
        return HashMap::new();
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<(String, u64)> = match conn.prepare("SELECT event_id, seq FROM events") {
        Ok(mut st) => st
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap(),
        // The schema itself is not durable yet.
        Err(_) => Vec::new(),
    };
    drop(conn);
    if let Some(head) = rows.iter().map(|r| r.1).max() {
        let (through, _) = read_seq_mark(&db).unwrap_or((0, false));
        assert!(
            through >= head,
            "the durable seq mark ({through}) does not cover the durable head ({head})"
        );
    }
    rows.into_iter().collect()
}

fn run_traced(sync: &str) -> (Outcome, PathBuf, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = root.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let trace = root.path().join("trace.txt");
    let status = std::process::Command::new("strace")
        .args(["-f", "-y", "-xx", "-s", "1000000", "-qq"])
        .args([
            "-e",
            "trace=pwrite64,write,fsync,fdatasync,ftruncate,unlink,unlinkat",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "interop_power_loss::power_loss_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .env(SYNC_ENV, sync)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("strace (the system package) runs the child");
    assert!(status.success(), "the traced child failed: {status}");
    let text = std::fs::read_to_string(&trace).unwrap();
    let out = replay(&text, &scratch);
    assert!(
        seq_mark_path(&dir.join("journal.db")).exists(),
        "the child wrote its seq mark"
    );
    (out, dir, root)
}

#[test]
fn interop_power_loss_under_sync_full_keeps_every_acknowledged_event() {
    let (out, _, _root) = run_traced("full");
    let expected: u32 = (0..TASKS)
        .map(|t| (0..APPENDS).map(|i| 1 + (i + t) % 3).sum::<u32>())
        .sum();
    assert_eq!(out.acks, expected as usize, "every append was acknowledged");
    assert!(out.syncs > 20, "the model saw the fsyncs: {}", out.syncs);
    // SQLite built with HAVE_FDATASYNC (.cargo/config.toml): an fsync per
    // commit costs a file system journal commit for the file's times.
    assert_eq!(
        out.fsyncs, 0,
        "the journal's files are synced with fdatasync, not fsync ({} of {} syncs were fsync): is LIBSQLITE3_FLAGS=-DHAVE_FDATASYNC=1 from .cargo/config.toml missing from the build?",
        out.fsyncs, out.syncs
    );
    assert!(out.checks > 20, "durable states checked: {}", out.checks);
    assert!(
        out.missing.is_empty(),
        "acknowledged but not durable under sync = full: {:?}",
        out.missing
    );
    eprintln!(
        "power-loss model, sync = full: {} acknowledged events, {} fsyncs, {} durable states checked, 0 missing",
        out.acks, out.syncs, out.checks
    );
}

#[test]
fn interop_power_loss_under_sync_normal_can_lose_the_last_acknowledged_events() {
    let (out, _, _root) = run_traced("normal");
    assert!(out.acks > 0);
    assert!(
        !out.missing.is_empty(),
        "under sync = normal the model finds acknowledged events not yet durable ({} acks, {} checks)",
        out.acks,
        out.checks
    );
    eprintln!(
        "power-loss model, sync = normal: {} acknowledged events; at the first loss {} acknowledged events were not durable yet",
        out.acks,
        out.missing.len()
    );
}
