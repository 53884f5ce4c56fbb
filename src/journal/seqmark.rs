//! The seq mark: a small file beside the journal (`<journal>.seq`) that says,
//! outside SQLite and its WAL, how far seqs may have been handed out. It is
//! what keeps a seq from ever naming two different events.
//!
//! A seq names an event on the wire (`sequence`, and the batch
//! `Idempotency-Key: <agent>:<first>-<last>`). When the WAL loses its last
//! commits (power lost under `sync = "normal"`, a cut or damaged WAL, an
//! older copy of the file put back), the journal's own high-water mark goes
//! with them, and counting on from the rows that are left would give new
//! events the seqs of lost ones, which an upstream may already hold and
//! drop as duplicates. So the writer reserves seqs here, fsynced, before
//! any commit that uses them; at start the next seq is past both the
//! journal's head and the reservation. A clean stop writes the exact head,
//! so only a crash leaves unused seqs behind: at most a block, a quarter
//! second's worth of the rate between [`MIN_BLOCK`] and [`MAX_BLOCK`], and
//! never more than 1/64 of `dedup_max_ids`. The bound matters beyond tidy
//! numbers: the dedup index's count limit is a span of seqs (the newest
//! `dedup_max_ids`), so every seq skipped shortens what it remembers.
//!
//! The file has two fixed slots written in turn, each a line with a
//! generation and a checksum: a write torn by power loss spoils only the
//! slot being written, and the other still holds the previous reservation,
//! which nothing used beyond (a reservation is written before its seqs are
//! committed). Writes go in place, so a full disk does not stop them.
//!
//! This module must never let a commit use a seq the file does not cover,
//! and never lowers a reservation except at a clean stop.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::JournalError;

/// The fewest seqs one reservation covers.
pub(crate) const MIN_BLOCK: u64 = 1024;
/// The most: at saturation (~200k events/s) about 25 reservations a
/// second, each one small write and one `fdatasync`.
pub(crate) const MAX_BLOCK: u64 = 8192;
/// Bytes per slot; a slot is well within one disk sector's worth of
/// alignment so a torn write spoils at most the slot it was writing.
const SLOT: usize = 256;
const MAGIC: &str = "plantrelay-seq-mark v1";

/// What the file said at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MarkRecord {
    /// No seq beyond this was ever handed out.
    pub through: u64,
    /// Written by a clean stop: `through` is the exact head then.
    pub clean: bool,
}

pub(crate) struct SeqMark {
    file: File,
    path: PathBuf,
    generation: u64,
    through: u64,
    /// When and at which seq the last reservation was written: the rate
    /// that sizes the next one.
    reserved_at: Instant,
    reserved_from: u64,
    /// The largest block (see the module docs).
    max_block: u64,
}

/// The mark's path for the journal at `journal`.
pub fn mark_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".seq");
    PathBuf::from(p)
}

impl SeqMark {
    /// Opens (creating if needed) the mark beside `journal`, and what it
    /// held: `None` for a new file, or one with no readable slot.
    pub(crate) fn open(journal: &Path) -> Result<(SeqMark, Option<MarkRecord>), JournalError> {
        let path = mark_path(journal);
        let io = |what: &str, e: std::io::Error| JournalError::Io {
            path: journal.to_path_buf(),
            what: format!("{what} {}", path.display()),
            detail: e.to_string(),
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(super::JOURNAL_FILE_MODE);
        }
        let mut file = opts
            .open(&path)
            .map_err(|e| io("cannot open the seq mark", e))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| io("cannot read the seq mark", e))?;
        if buf.is_empty() {
            same_owner_as(&file, journal);
        }
        let (generation, record) = match best_slot(&buf) {
            Some((g, r)) => (g, Some(r)),
            None => (0, None),
        };
        let mark = SeqMark {
            file,
            path,
            generation,
            through: record.map_or(0, |r| r.through),
            reserved_at: Instant::now(),
            reserved_from: record.map_or(0, |r| r.through),
            max_block: MAX_BLOCK,
        };
        Ok((mark, record))
    }

    /// Keeps every block within 1/64 of the dedup index's count limit.
    pub(crate) fn fit_dedup(mut self, dedup_max_ids: usize) -> SeqMark {
        self.max_block = (dedup_max_ids as u64 / 64).clamp(MIN_BLOCK, MAX_BLOCK);
        self
    }

    /// Whether a commit whose highest seq is `seq` may go ahead.
    pub(crate) fn covers(&self, seq: u64) -> bool {
        seq <= self.through
    }

    /// Reserves seqs through `head` and a block beyond it, sized to a
    /// quarter second of the rate since the last reservation. Durable on
    /// return.
    pub(crate) fn reserve(&mut self, head: u64) -> Result<(), JournalError> {
        let used = head.saturating_sub(self.reserved_from);
        let secs = self.reserved_at.elapsed().as_secs_f64().max(0.001);
        let block =
            ((used as f64 / secs) / 4.0).clamp(MIN_BLOCK as f64, self.max_block as f64) as u64;
        let through = head.saturating_add(block).max(self.through);
        self.write(through, false)?;
        self.reserved_at = Instant::now();
        self.reserved_from = head;
        Ok(())
    }

    /// At a clean stop: `head` is the last seq handed out.
    pub(crate) fn close(&mut self, head: u64) -> Result<(), JournalError> {
        self.write(head, true)
    }

    fn write(&mut self, through: u64, clean: bool) -> Result<(), JournalError> {
        let generation = self.generation + 1;
        let line = format_slot(generation, through, clean);
        let at = if generation.is_multiple_of(2) {
            0
        } else {
            SLOT as u64
        };
        let r = write_at(&self.file, &line, at).and_then(|_| self.file.sync_data());
        r.map_err(|e| JournalError::Io {
            path: self.path.clone(),
            what: format!("cannot reserve seqs through {through} in the seq mark"),
            detail: e.to_string(),
        })?;
        self.generation = generation;
        self.through = through;
        Ok(())
    }
}

/// A new mark gets the journal's owner, as SQLite gives its `-wal` and
/// `-shm` files: a command run as root beside the service (which runs as
/// its own user) must not leave a file the service cannot write. Only
/// root can change an owner; for anyone else this does nothing.
fn same_owner_as(file: &File, journal: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(journal) {
            let _ = std::os::unix::fs::fchown(file, Some(m.uid()), Some(m.gid()));
        }
    }
    #[cfg(not(unix))]
    let _ = (file, journal);
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, at)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(at))?;
    file.write_all(bytes)
}

/// What the seq mark beside `journal` holds, read without opening the
/// journal: `(through, clean)`, or `None` when it is absent or unreadable.
pub fn read_mark(journal: &Path) -> Option<(u64, bool)> {
    let bytes = std::fs::read(mark_path(journal)).ok()?;
    best_slot(&bytes).map(|(_, r)| (r.through, r.clean))
}

/// The readable slot of the newest generation in the file's bytes.
fn best_slot(bytes: &[u8]) -> Option<(u64, MarkRecord)> {
    [0, SLOT]
        .iter()
        .filter_map(|&at| parse_slot(bytes.get(at..(at + SLOT).min(bytes.len()))?))
        .max_by_key(|s| s.0)
}

fn check(text: &str) -> u64 {
    // FNV-1a: enough to tell a whole line from a torn or flipped one.
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn format_slot(generation: u64, through: u64, clean: bool) -> Vec<u8> {
    let text = format!(
        "{MAGIC} generation={generation} through={through} clean={}",
        u8::from(clean)
    );
    let mut line = format!("{text} check={:016x}\n", check(&text)).into_bytes();
    line.resize(SLOT, b' ');
    line
}

fn parse_slot(bytes: &[u8]) -> Option<(u64, MarkRecord)> {
    let line = std::str::from_utf8(bytes).ok()?.lines().next()?;
    let (text, sum) = line.rsplit_once(" check=")?;
    if u64::from_str_radix(sum.trim_end(), 16).ok()? != check(text) {
        return None;
    }
    let mut fields = text.strip_prefix(MAGIC)?.split_whitespace();
    let mut field = |name: &str| -> Option<u64> {
        fields
            .next()?
            .strip_prefix(name)?
            .strip_prefix('=')?
            .parse()
            .ok()
    };
    let generation = field("generation")?;
    let through = field("through")?;
    let clean = field("clean")? == 1;
    Some((generation, MarkRecord { through, clean }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_new_mark_holds_nothing_and_covers_nothing() {
        let d = dir();
        let (m, rec) = SeqMark::open(&d.path().join("j.db")).unwrap();
        assert_eq!(rec, None);
        assert!(!m.covers(1));
        assert!(m.covers(0));
    }

    #[test]
    fn a_reservation_covers_a_block_beyond_the_head_and_survives_reopening() {
        let d = dir();
        let j = d.path().join("j.db");
        let (mut m, _) = SeqMark::open(&j).unwrap();
        m.reserve(10).unwrap();
        assert!(m.covers(10 + MIN_BLOCK));
        let (_, rec) = SeqMark::open(&j).unwrap();
        let rec = rec.unwrap();
        assert!(rec.through >= 10 + MIN_BLOCK, "{rec:?}");
        assert!(!rec.clean);
    }

    #[test]
    fn a_clean_stop_writes_the_exact_head() {
        let d = dir();
        let j = d.path().join("j.db");
        let (mut m, _) = SeqMark::open(&j).unwrap();
        m.reserve(10).unwrap();
        m.close(17).unwrap();
        let (_, rec) = SeqMark::open(&j).unwrap();
        assert_eq!(
            rec,
            Some(MarkRecord {
                through: 17,
                clean: true
            })
        );
    }

    #[test]
    fn a_torn_or_flipped_slot_leaves_the_previous_reservation() {
        let d = dir();
        let j = d.path().join("j.db");
        let (mut m, _) = SeqMark::open(&j).unwrap();
        m.reserve(100).unwrap();
        let first = m.through;
        m.reserve(first + 5).unwrap();
        let second = m.through;
        assert!(second > first);
        // The second write went to slot 0 (generation 2): spoil one byte of
        // it, then cut it short.
        let p = mark_path(&j);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[40] ^= 0x04;
        std::fs::write(&p, &bytes).unwrap();
        let (_, rec) = SeqMark::open(&j).unwrap();
        assert_eq!(rec.unwrap().through, first);
        std::fs::write(&p, &bytes[..SLOT / 3]).unwrap();
        let (_, rec) = SeqMark::open(&j).unwrap();
        assert_eq!(rec, None, "slot 1 is gone with the cut");
    }

    #[test]
    fn the_block_grows_with_the_rate_and_never_shrinks_a_reservation() {
        let d = dir();
        let j = d.path().join("j.db");
        let (mut m, _) = SeqMark::open(&j).unwrap();
        m.reserve(0).unwrap();
        // 500,000 seqs in (at most) a few milliseconds: the block is capped.
        m.reserve(500_000).unwrap();
        assert_eq!(m.through, 500_000 + MAX_BLOCK);
        m.reserve(10).unwrap();
        assert_eq!(m.through, 500_000 + MAX_BLOCK, "never lowered");
        // A small dedup count limit keeps the blocks small.
        let (m, _) = SeqMark::open(&j).unwrap();
        let mut m = m.fit_dedup(100_000);
        m.reserve(1_000_000).unwrap();
        assert_eq!(m.through, 1_000_000 + 100_000 / 64);
    }
}
