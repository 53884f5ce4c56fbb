//! The in-memory deduplication index of the journal's dedup window.
//!
//! Event ids are random (UUIDs from an MES, hashes for derived ids), and a
//! UNIQUE index on random keys makes SQLite inserts ~10× slower (each commit
//! rewrites scattered B-tree pages). So the `(source, id)` uniqueness check
//! lives here, in memory, and the journal keeps only its integer primary key
//! on disk. The index is rebuilt at start-up from the retained rows inside the
//! window, so it survives restarts.
//!
//! Layout: a ring of `(key hash, seq)` in insertion (= seq) order, a
//! `HashTable` of ring positions keyed by the hash, and a short list of time
//! checkpoints (one per second of arrivals) for expiry. About 26 bytes per id:
//! 1M ids in the window take ~27 MiB.
//!
//! A hash hit is only a candidate: the journal confirms it against the stored
//! row (a primary-key lookup) before calling an event a duplicate. This module
//! must never touch SQLite itself.

use std::collections::VecDeque;

use hashbrown::HashTable;
use xxhash_rust::xxh3::Xxh3;

/// 64-bit key of `(source, id)`; the separator keeps `("a","bc")` and
/// `("ab","c")` apart.
pub fn key_hash(source: &str, id: &str) -> u64 {
    let mut h = Xxh3::new();
    h.update(source.as_bytes());
    h.update(&[0xff]);
    h.update(id.as_bytes());
    h.digest()
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: u64,
    seq: u64,
}

/// What the journal found when it looked at a candidate's stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The row holds the same `(source, id)`: a duplicate.
    Same,
    /// The row holds another key (a hash collision): not a duplicate.
    Different,
    /// The row is gone (evicted or retained-out); the hash is all we have.
    Gone,
}

pub struct DedupIndex {
    ring: VecDeque<Entry>,
    /// Absolute position of `ring[0]`; positions only grow.
    head_pos: u64,
    /// Ring positions, truncated to u32: the ring never holds 2^32 entries
    /// (`max_ids` is far smaller), so truncation is unambiguous.
    table: HashTable<u32>,
    /// `(first position, arrival time µs)`: the entries from that position to
    /// the next checkpoint arrived in `[time, time + 1 s)`.
    checkpoints: VecDeque<(u64, i64)>,
    window_us: i64,
    max_ids: usize,
    /// Entries dropped for the count limit while still inside the window,
    /// since the last `take_capped`.
    capped: u64,
}

const CHECKPOINT_US: i64 = 1_000_000;

impl DedupIndex {
    pub fn new(window: std::time::Duration, max_ids: usize) -> DedupIndex {
        DedupIndex {
            ring: VecDeque::new(),
            head_pos: 0,
            table: HashTable::new(),
            checkpoints: VecDeque::new(),
            window_us: i64::try_from(window.as_micros()).unwrap_or(i64::MAX),
            max_ids: max_ids.clamp(1, u32::MAX as usize / 2),
            capped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Bytes held by the index's allocations.
    pub fn memory_bytes(&self) -> usize {
        self.ring.capacity() * std::mem::size_of::<Entry>()
            + self.table.allocation_size()
            + self.checkpoints.capacity() * std::mem::size_of::<(u64, i64)>()
    }

    fn entry_at(&self, pos: u32) -> Option<&Entry> {
        let offset = pos.wrapping_sub(self.head_pos as u32) as usize;
        self.ring.get(offset)
    }

    /// The seq of an earlier event with this key, if `verify` confirms one.
    /// Candidates are tried newest first is not guaranteed; every candidate
    /// with the same hash is offered until one is confirmed.
    pub fn find(&self, hash: u64, mut verify: impl FnMut(u64) -> Verified) -> Option<u64> {
        let mut found = None;
        // HashTable::find stops at the first `true`; returning false for a
        // collision keeps it probing for the real match.
        self.table.find(hash, |&pos| match self.entry_at(pos) {
            Some(e) if e.hash == hash => match verify(e.seq) {
                Verified::Same | Verified::Gone => {
                    found = Some(e.seq);
                    true
                }
                Verified::Different => false,
            },
            _ => false,
        });
        found
    }

    /// Records a newly stored event. `time_us` must not decrease between
    /// calls (the journal clamps its receive clock).
    pub fn insert(&mut self, hash: u64, seq: u64, time_us: i64) {
        let pos = self.head_pos + self.ring.len() as u64;
        match self.checkpoints.back() {
            Some(&(_, t)) if time_us - t < CHECKPOINT_US => {}
            _ => self.checkpoints.push_back((pos, time_us)),
        }
        self.ring.push_back(Entry { hash, seq });
        let (ring, head) = (&self.ring, self.head_pos);
        self.table.insert_unique(hash, pos as u32, |&p| {
            ring.get(p.wrapping_sub(head as u32) as usize)
                .map_or(0, |e| e.hash)
        });
        if self.ring.len() > self.max_ids {
            self.pop_front();
            self.capped += 1;
        }
    }

    /// Forgets the `n` newest entries: the batch that inserted them did not
    /// commit.
    pub fn rollback(&mut self, n: usize) {
        for _ in 0..n {
            let Some(e) = self.ring.pop_back() else { break };
            let pos = (self.head_pos + self.ring.len() as u64) as u32;
            if let Ok(entry) = self.table.find_entry(e.hash, |&p| p == pos) {
                entry.remove();
            }
            while let Some(&(cp, _)) = self.checkpoints.back() {
                if cp >= self.head_pos + self.ring.len() as u64 {
                    self.checkpoints.pop_back();
                } else {
                    break;
                }
            }
        }
    }

    /// How many ids were forgotten for the count limit (not the window)
    /// since the last call, and the arrival time (µs) of the oldest id still
    /// remembered.
    pub fn take_capped(&mut self) -> (u64, Option<i64>) {
        let n = std::mem::take(&mut self.capped);
        (n, self.checkpoints.front().map(|c| c.1))
    }

    fn pop_front(&mut self) {
        let Some(e) = self.ring.pop_front() else {
            return;
        };
        let pos = self.head_pos as u32;
        if let Ok(entry) = self.table.find_entry(e.hash, |&p| p == pos) {
            entry.remove();
        }
        self.head_pos += 1;
        while self.checkpoints.len() > 1 && self.checkpoints[1].0 <= self.head_pos {
            self.checkpoints.pop_front();
        }
        if self.ring.is_empty() {
            self.checkpoints.clear();
        } else if let Some(front) = self.checkpoints.front_mut() {
            front.0 = front.0.max(self.head_pos);
        }
    }

    /// Drops every entry that arrived before `now_us - window`.
    pub fn expire(&mut self, now_us: i64) {
        let cutoff = now_us.saturating_sub(self.window_us);
        loop {
            // A segment holds arrivals in [t, t + 1 s): it is expired whole
            // once that interval is before the cutoff.
            let expired_until = match self.checkpoints.front() {
                Some(&(_, t)) if t + CHECKPOINT_US <= cutoff => match self.checkpoints.get(1) {
                    Some(&(next_pos, _)) => next_pos,
                    None => self.head_pos + self.ring.len() as u64,
                },
                _ => break,
            };
            while self.head_pos < expired_until && !self.ring.is_empty() {
                self.pop_front();
            }
            if self.ring.is_empty() {
                self.checkpoints.clear();
                break;
            }
        }
        if self.ring.capacity() > 1024 && self.ring.len() < self.ring.capacity() / 4 {
            self.ring.shrink_to(self.ring.len() * 2);
            let (ring, head) = (&self.ring, self.head_pos);
            self.table.shrink_to(self.ring.len() * 2, |&p| {
                ring.get(p.wrapping_sub(head as u32) as usize)
                    .map_or(0, |e| e.hash)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn same(_: u64) -> Verified {
        Verified::Same
    }

    #[test]
    fn finds_an_inserted_key_and_not_another() {
        let mut d = DedupIndex::new(Duration::from_secs(3600), 1000);
        d.insert(key_hash("mes", "a"), 1, 0);
        d.insert(key_hash("mes", "b"), 2, 0);
        assert_eq!(d.find(key_hash("mes", "a"), same), Some(1));
        assert_eq!(d.find(key_hash("mes", "b"), same), Some(2));
        assert_eq!(d.find(key_hash("mes", "c"), same), None);
        assert_eq!(d.find(key_hash("other", "a"), same), None);
    }

    #[test]
    fn a_collision_rejected_by_verification_is_not_a_duplicate() {
        let mut d = DedupIndex::new(Duration::from_secs(3600), 1000);
        d.insert(42, 1, 0);
        d.insert(42, 2, 0);
        assert_eq!(d.find(42, |_| Verified::Different), None);
        assert_eq!(
            d.find(42, |s| if s == 2 {
                Verified::Same
            } else {
                Verified::Different
            }),
            Some(2)
        );
        assert!(d.find(42, |_| Verified::Gone).is_some());
    }

    #[test]
    fn entries_expire_after_the_window_and_not_before() {
        let s = 1_000_000;
        let mut d = DedupIndex::new(Duration::from_secs(10), 1000);
        d.insert(key_hash("m", "old"), 1, 0);
        d.insert(key_hash("m", "mid"), 2, 5 * s);
        d.insert(key_hash("m", "new"), 3, 9 * s);
        d.expire(10 * s);
        assert_eq!(d.len(), 3, "nothing is older than the window yet");
        d.expire(12 * s);
        assert_eq!(d.find(key_hash("m", "old"), same), None);
        assert_eq!(d.find(key_hash("m", "mid"), same), Some(2));
        d.expire(20 * s);
        assert_eq!(d.len(), 0);
        assert_eq!(d.find(key_hash("m", "new"), same), None);
        d.insert(key_hash("m", "again"), 4, 21 * s);
        assert_eq!(d.find(key_hash("m", "again"), same), Some(4));
    }

    #[test]
    fn the_count_bound_drops_the_oldest() {
        let mut d = DedupIndex::new(Duration::from_secs(3600), 3);
        for i in 0..5u64 {
            d.insert(key_hash("m", &i.to_string()), i + 1, (i as i64) * 1_000_000);
        }
        assert_eq!(d.len(), 3);
        // Two forgotten for the count; the oldest remembered arrived at 2 s.
        assert_eq!(d.take_capped(), (2, Some(2_000_000)));
        assert_eq!(d.take_capped().0, 0);
        assert_eq!(d.find(key_hash("m", "0"), same), None);
        assert_eq!(d.find(key_hash("m", "1"), same), None);
        assert_eq!(d.find(key_hash("m", "4"), same), Some(5));
    }

    #[test]
    fn rollback_forgets_exactly_the_newest_entries() {
        let mut d = DedupIndex::new(Duration::from_secs(3600), 100);
        d.insert(key_hash("m", "kept"), 1, 0);
        d.insert(key_hash("m", "x"), 2, 2_000_000);
        d.insert(key_hash("m", "y"), 3, 3_000_000);
        d.rollback(2);
        assert_eq!(d.len(), 1);
        assert_eq!(d.find(key_hash("m", "kept"), same), Some(1));
        assert_eq!(d.find(key_hash("m", "x"), same), None);
        d.insert(key_hash("m", "x"), 2, 2_000_000);
        assert_eq!(d.find(key_hash("m", "x"), same), Some(2));
    }

    #[test]
    fn one_million_ids_fit_in_32_mib() {
        let mut d = DedupIndex::new(Duration::from_secs(3600), 2_000_000);
        for i in 0..1_000_000u64 {
            d.insert(
                key_hash("mes", &format!("{i:032x}")),
                i + 1,
                (i as i64) * 10,
            );
        }
        assert_eq!(d.len(), 1_000_000);
        assert!(d.memory_bytes() <= 32 << 20, "{} bytes", d.memory_bytes());
        assert_eq!(
            d.find(key_hash("mes", &format!("{:032x}", 777_777)), same),
            Some(777_778)
        );
    }
}
