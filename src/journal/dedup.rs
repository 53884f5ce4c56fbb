//! The in-memory deduplication index of the journal's dedup window.
//!
//! Event ids are random (UUIDs from an MES, hashes for derived ids), and a
//! UNIQUE index on random keys makes SQLite inserts ~10× slower (each commit
//! rewrites scattered B-tree pages). So the `(source, id)` uniqueness check
//! lives here, in memory, and the journal keeps only its integer primary key
//! on disk. The index is rebuilt at start-up from the retained rows inside the
//! window, so it survives restarts.
//!
//! Layout: one open-addressing table (linear probing) of 64-bit words, sized
//! once from `dedup_max_ids` and never grown. A word packs the high bits of
//! the key hash (which also give its home slot) and the low bits of the
//! event's seq; the seq is recovered against the newest seq in the index,
//! which is unambiguous because the table never holds seqs further apart than
//! its seq bits cover. Expiry needs no per-id list: ids below the window's
//! first seq are skipped by lookups and removed in place by a sweep every
//! eighth of `dedup_max_ids` inserts. A short list of time checkpoints (one per
//! second of arrivals) maps the time window to that first seq.
//!
//! Memory is fixed at 12 bytes per `dedup_max_ids` (1M ids: 11.4 MiB),
//! allocated at construction, so the agent's footprint does not depend on how
//! many ids the window happens to hold.
//!
//! A hash hit is only a candidate: the journal confirms it against the stored
//! row (a primary-key lookup) before calling an event a duplicate. This module
//! must never touch SQLite itself.

use std::collections::VecDeque;

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

/// What the journal found when it looked at a candidate's stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The row holds the same `(source, id)`: a duplicate.
    Same,
    /// The row holds another key (a hash collision): not a duplicate.
    Different,
    /// The row is gone (evicted or retained-out); the hash is all we have:
    /// the bits of it a word keeps, 43 at the default `dedup_max_ids`.
    Gone,
}

/// The table could not be allocated.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot allocate room for {ids} ids ({mib} MiB): out of memory; lower journal.dedup_max_ids"
)]
pub struct AllocError {
    ids: usize,
    mib: usize,
}

/// Inserts between sweeps, as a fraction of `max_ids`: the table holds up to
/// `max_ids + max_ids / SWEEP_FRACTION` words.
const SWEEP_FRACTION: usize = 8;
/// Highest share of occupied slots, as `LOAD_NUM / LOAD_DEN`. Linear probing
/// at 3/4 load misses after ~8 slots, one or two cache lines.
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;
/// The empty slot. Words are never zero (see `word`).
const EMPTY: u64 = 0;
const CHECKPOINT_US: i64 = 1_000_000;

/// Start of a second of arrivals: the ids from `seq` (the `ordinal`-th insert
/// since construction) to the next checkpoint arrived in `[time, time + 1 s)`.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    seq: u64,
    ordinal: u64,
    time_us: i64,
}

pub struct DedupIndex {
    /// Empty until allocated by `new` (see `unloaded`).
    slots: Vec<u64>,
    /// Low bits of a word that hold the seq.
    seq_bits: u32,
    /// Newest seq inserted; words' seqs are recovered against it.
    head: u64,
    /// Ids before this seq left the time window.
    time_lo: u64,
    /// `head` when the table was last swept.
    swept_at: u64,
    /// Inserts since construction, less the rolled-back ones.
    inserted: u64,
    checkpoints: VecDeque<Checkpoint>,
    /// Words inserted since `begin`, and `head` before them; nothing is
    /// logged before the first `begin` (the start-up rebuild).
    batch: Vec<u64>,
    logging: bool,
    batch_head: u64,
    window_us: i64,
    max_ids: usize,
    /// Seqs that left the index for the count limit while still inside the
    /// time window, since the last `take_capped`.
    capped: u64,
    /// Highest seq counted in `capped` so far.
    capped_through: u64,
}

impl DedupIndex {
    /// An index that allocates its table for `max_ids` ids now: 12 bytes per
    /// id.
    pub fn new(window: std::time::Duration, max_ids: usize) -> Result<DedupIndex, AllocError> {
        let max_ids = max_ids.max(1);
        let most = max_ids + max_ids.div_ceil(SWEEP_FRACTION);
        let len = (most * LOAD_DEN).div_ceil(LOAD_NUM).max(64);
        let mut slots = Vec::new();
        slots.try_reserve_exact(len).map_err(|_| AllocError {
            ids: max_ids,
            mib: (len * 8) >> 20,
        })?;
        slots.resize(len, EMPTY);
        let mut index = DedupIndex::unloaded(window, max_ids);
        index.slots = slots;
        // Two seqs in the table are never `most` or more apart (see
        // `insert`), so this many low bits identify a seq.
        index.seq_bits = (most as u64 + 1).next_power_of_two().trailing_zeros();
        Ok(index)
    }

    /// A placeholder without a table, for the writer until the index is
    /// read: it finds nothing and ignores inserts.
    pub fn unloaded(window: std::time::Duration, max_ids: usize) -> DedupIndex {
        DedupIndex {
            slots: Vec::new(),
            seq_bits: 0,
            head: 0,
            time_lo: 0,
            swept_at: 0,
            inserted: 0,
            checkpoints: VecDeque::new(),
            batch: Vec::new(),
            logging: false,
            batch_head: 0,
            window_us: i64::try_from(window.as_micros()).unwrap_or(i64::MAX),
            max_ids: max_ids.max(1),
            capped: 0,
            capped_through: 0,
        }
    }

    /// First seq whose id is remembered: inside the time window and among the
    /// newest `max_ids` seqs.
    fn lo(&self) -> u64 {
        self.time_lo
            .max((self.head + 1).saturating_sub(self.max_ids as u64))
    }

    /// Ids remembered (inside the window). Exact unless the journal left
    /// seqs out (gap events) just before the window's start, which makes it
    /// count a few too few.
    pub fn len(&self) -> usize {
        let lo = self.lo();
        let Some(first) = self.checkpoints.front() else {
            return 0;
        };
        if lo > self.head {
            return 0;
        }
        let i = self.checkpoints.partition_point(|c| c.seq <= lo);
        let before = if i == 0 {
            first.ordinal
        } else {
            let c = self.checkpoints[i - 1];
            let next = self.checkpoints.get(i).map_or(self.inserted, |n| n.ordinal);
            c.ordinal + (lo - c.seq).min(next - c.ordinal)
        };
        (self.inserted - before) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the index's allocations.
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * 8
            + self.batch.capacity() * 8
            + self.checkpoints.capacity() * std::mem::size_of::<Checkpoint>()
    }

    fn seq_mask(&self) -> u64 {
        (1u64 << self.seq_bits) - 1
    }

    /// The word for `hash` and `seq`: the hash's high bits over the seq's
    /// low bits. A zero tag is made 1 so that no word is `EMPTY`.
    fn word(&self, hash: u64, seq: u64) -> u64 {
        let tag = (hash >> self.seq_bits).max(1);
        (tag << self.seq_bits) | (seq & self.seq_mask())
    }

    fn tag_of(&self, word: u64) -> u64 {
        word >> self.seq_bits
    }

    /// Home slot of a tag: the tag as a fraction of the table length.
    fn home(&self, tag: u64) -> usize {
        let frac = tag << self.seq_bits;
        ((u128::from(frac) * self.slots.len() as u128) >> 64) as usize
    }

    fn seq_of(&self, word: u64) -> u64 {
        self.head - (self.head.wrapping_sub(word) & self.seq_mask())
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// The seq of an earlier event with this key, if `verify` confirms one.
    /// Every candidate with the same hash inside the window is offered until
    /// one is confirmed.
    pub fn find(&self, hash: u64, mut verify: impl FnMut(u64) -> Verified) -> Option<u64> {
        if self.slots.is_empty() {
            return None;
        }
        let tag = self.tag_of(self.word(hash, 0));
        let lo = self.lo();
        let mut i = self.home(tag);
        loop {
            let w = self.slots[i];
            if w == EMPTY {
                return None;
            }
            if self.tag_of(w) == tag {
                let seq = self.seq_of(w);
                if seq >= lo && verify(seq) != Verified::Different {
                    return Some(seq);
                }
            }
            i = self.next(i);
        }
    }

    /// Starts a batch: `rollback` forgets what is inserted from here on.
    pub fn begin(&mut self) {
        self.batch.clear();
        self.batch_head = self.head;
        self.logging = true;
    }

    /// Records a newly stored event. `seq` must be above every seq inserted
    /// before (except after `rollback`), and `time_us` must not decrease
    /// between calls (the journal clamps its receive clock).
    pub fn insert(&mut self, hash: u64, seq: u64, time_us: i64) {
        if self.slots.is_empty() {
            return;
        }
        // Sweeping every `max_ids / SWEEP_FRACTION` seqs keeps the table's
        // seqs within `max_ids + max_ids / SWEEP_FRACTION` of each other, the
        // span its seq bits and its size are made for.
        let every = self.max_ids.div_ceil(SWEEP_FRACTION) as u64;
        if seq >= self.swept_at + every {
            let lo = self
                .time_lo
                .max((seq + 1).saturating_sub(self.max_ids as u64));
            self.sweep(lo);
            self.swept_at = seq;
        }
        if self.inserted == 0 {
            // Seqs before the first insert were never remembered, so they
            // were not forgotten for the count limit either.
            self.capped_through = seq;
        }
        match self.checkpoints.back() {
            Some(c) if time_us - c.time_us < CHECKPOINT_US => {}
            _ => self.checkpoints.push_back(Checkpoint {
                seq,
                ordinal: self.inserted,
                time_us,
            }),
        }
        let word = self.word(hash, seq);
        let mut i = self.home(self.tag_of(word));
        while self.slots[i] != EMPTY {
            i = self.next(i);
        }
        self.slots[i] = word;
        self.inserted += 1;
        self.head = self.head.max(seq);
        if self.logging {
            self.batch.push(word);
        }
    }

    /// Forgets what was inserted since `begin`: the batch did not commit.
    pub fn rollback(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        let mut lowest = None;
        for &word in batch.iter().rev() {
            lowest = Some(self.seq_of(word));
            if let Some(i) = self.slot_of(word) {
                self.remove_at(i);
            }
            self.inserted -= 1;
        }
        self.head = self.batch_head;
        if let Some(lowest) = lowest {
            while self.checkpoints.back().is_some_and(|c| c.seq >= lowest) {
                self.checkpoints.pop_back();
            }
        }
        batch.clear();
        self.batch = batch;
    }

    fn slot_of(&self, word: u64) -> Option<usize> {
        let mut i = self.home(self.tag_of(word));
        loop {
            match self.slots[i] {
                EMPTY => return None,
                w if w == word => return Some(i),
                _ => i = self.next(i),
            }
        }
    }

    /// Empties slot `i` and moves later words of its probe run back, so no
    /// lookup stops at the hole before reaching them (Knuth's algorithm R).
    fn remove_at(&mut self, i: usize) {
        let mut hole = i;
        let mut j = i;
        loop {
            j = self.next(j);
            let w = self.slots[j];
            if w == EMPTY {
                break;
            }
            let home = self.home(self.tag_of(w));
            // `w` may fill the hole unless its home lies cyclically in
            // (hole, j]: then the hole is before its home.
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                home > hole || home <= j
            };
            if !stays {
                self.slots[hole] = w;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
    }

    /// Removes every word whose seq is below `lo`.
    fn sweep(&mut self, lo: u64) {
        let mut i = 0;
        while i < self.slots.len() {
            let w = self.slots[i];
            // `remove_at` may move a later word into `i`: look again.
            if w != EMPTY && self.seq_of(w) < lo {
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }

    /// How many ids were forgotten for the count limit (not the window)
    /// since the last call, and the arrival time (µs) of the oldest id still
    /// remembered. Counted by `expire`.
    pub fn take_capped(&mut self) -> (u64, Option<i64>) {
        let n = std::mem::take(&mut self.capped);
        (n, self.checkpoints.front().map(|c| c.time_us))
    }

    /// Forgets every id that arrived before `now_us - window`.
    pub fn expire(&mut self, now_us: i64) {
        let cutoff = now_us.saturating_sub(self.window_us);
        // A second of arrivals leaves the window whole once it is before
        // the cutoff.
        while let Some(c) = self.checkpoints.front() {
            if c.time_us + CHECKPOINT_US > cutoff {
                break;
            }
            self.checkpoints.pop_front();
            self.time_lo = self
                .checkpoints
                .front()
                .map_or(self.head + 1, |n| n.seq)
                .max(self.time_lo);
        }
        let count_lo = (self.head + 1).saturating_sub(self.max_ids as u64);
        if count_lo > self.time_lo {
            let from = self.time_lo.max(self.capped_through);
            self.capped += count_lo.saturating_sub(from);
            self.capped_through = self.capped_through.max(count_lo);
        }
        // Checkpoints before the count limit only keep `len` exact.
        while self.checkpoints.len() > 1 && self.checkpoints[1].seq <= count_lo {
            self.checkpoints.pop_front();
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

    /// Words in the table, including ones already outside the window.
    fn occupied(d: &DedupIndex) -> usize {
        d.slots.iter().filter(|&&w| w != EMPTY).count()
    }

    fn index(window_s: u64, max_ids: usize) -> DedupIndex {
        DedupIndex::new(Duration::from_secs(window_s), max_ids).unwrap()
    }

    #[test]
    fn finds_an_inserted_key_and_not_another() {
        let mut d = index(3600, 1000);
        d.insert(key_hash("mes", "a"), 1, 0);
        d.insert(key_hash("mes", "b"), 2, 0);
        assert_eq!(d.find(key_hash("mes", "a"), same), Some(1));
        assert_eq!(d.find(key_hash("mes", "b"), same), Some(2));
        assert_eq!(d.find(key_hash("mes", "c"), same), None);
        assert_eq!(d.find(key_hash("other", "a"), same), None);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn the_unloaded_placeholder_finds_nothing() {
        let mut d = DedupIndex::unloaded(Duration::from_secs(3600), 1000);
        d.insert(key_hash("mes", "a"), 1, 0);
        assert_eq!(d.find(key_hash("mes", "a"), same), None);
        assert!(d.is_empty());
        assert_eq!(d.memory_bytes(), 0);
    }

    #[test]
    fn a_collision_rejected_by_verification_is_not_a_duplicate() {
        let mut d = index(3600, 1000);
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
        let mut d = index(10, 1000);
        d.insert(key_hash("m", "old"), 1, 0);
        d.insert(key_hash("m", "mid"), 2, 5 * s);
        d.insert(key_hash("m", "new"), 3, 9 * s);
        d.expire(10 * s);
        assert_eq!(d.len(), 3, "nothing is older than the window yet");
        d.expire(12 * s);
        assert_eq!(d.find(key_hash("m", "old"), same), None);
        assert_eq!(d.find(key_hash("m", "mid"), same), Some(2));
        assert_eq!(d.len(), 2);
        d.expire(20 * s);
        assert_eq!(d.len(), 0);
        assert_eq!(d.find(key_hash("m", "new"), same), None);
        d.insert(key_hash("m", "again"), 4, 21 * s);
        assert_eq!(d.find(key_hash("m", "again"), same), Some(4));
        assert_eq!(d.len(), 1);
        assert_eq!(
            d.take_capped().0,
            0,
            "the window, not the count, expired them"
        );
    }

    #[test]
    fn the_count_bound_drops_the_oldest() {
        let mut d = index(3600, 3);
        for i in 0..5u64 {
            d.insert(key_hash("m", &i.to_string()), i + 1, (i as i64) * 1_000_000);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.find(key_hash("m", "0"), same), None);
        assert_eq!(d.find(key_hash("m", "1"), same), None);
        assert_eq!(d.find(key_hash("m", "2"), same), Some(3));
        assert_eq!(d.find(key_hash("m", "4"), same), Some(5));
        d.expire(5_000_000);
        // Two forgotten for the count; the oldest remembered arrived at 2 s.
        assert_eq!(d.take_capped(), (2, Some(2_000_000)));
        assert_eq!(d.take_capped().0, 0);
    }

    #[test]
    fn rollback_forgets_exactly_the_batch() {
        let mut d = index(3600, 100);
        d.begin();
        d.insert(key_hash("m", "kept"), 1, 0);
        d.begin();
        d.insert(key_hash("m", "x"), 2, 2_000_000);
        d.insert(key_hash("m", "y"), 3, 3_000_000);
        d.rollback();
        assert_eq!(d.len(), 1);
        assert_eq!(d.find(key_hash("m", "kept"), same), Some(1));
        assert_eq!(d.find(key_hash("m", "x"), same), None);
        assert_eq!(d.find(key_hash("m", "y"), same), None);
        d.begin();
        d.insert(key_hash("m", "z"), 2, 2_000_000);
        assert_eq!(d.find(key_hash("m", "z"), same), Some(2));
        assert_eq!(d.len(), 2);
    }

    /// Many ids through a small index: sweeps move words around, and every
    /// id of the newest `max_ids` must still be found, none older.
    #[test]
    fn sweeps_keep_every_id_of_the_window_findable() {
        let max = 1000;
        let mut d = index(3600, max);
        let n = 20_000u64;
        for seq in 1..=n {
            d.insert(key_hash("m", &seq.to_string()), seq, 0);
            assert!(occupied(&d) <= max + max / SWEEP_FRACTION + 1);
        }
        for seq in 1..=n {
            let found = d.find(key_hash("m", &seq.to_string()), same);
            if seq > n - max as u64 {
                assert_eq!(found, Some(seq), "seq {seq} in the window");
            } else {
                assert_eq!(found, None, "seq {seq} before the window");
            }
        }
        assert_eq!(d.len(), max);
    }

    /// Random inserts, seq gaps, rolled-back batches and lookups against a
    /// plain map of what must be remembered: the newest `max` seqs.
    #[test]
    fn agrees_with_a_model_through_sweeps_and_rollbacks() {
        let max = 1000u64;
        let mut d = index(3600, max as usize);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // seq -> hash of what the journal holds.
        let mut stored = std::collections::BTreeMap::new();
        let mut seq = 0u64;
        for _ in 0..3000 {
            d.begin();
            let before = seq;
            let mut added = Vec::new();
            for _ in 0..(next() % 20) {
                // Now and then a seq the index never sees (a gap event).
                seq += 1 + u64::from(next() % 16 == 0);
                let h = next();
                d.insert(h, seq, 0);
                added.push((seq, h));
            }
            if next() % 10 == 0 {
                d.rollback();
                seq = before;
            } else {
                stored.extend(added);
            }
            let lo = (seq + 1).saturating_sub(max);
            let held = &stored;
            let verify = |h: u64| {
                move |s: u64| match held.get(&s) {
                    Some(&x) if x == h => Verified::Same,
                    Some(_) => Verified::Different,
                    None => Verified::Gone,
                }
            };
            for _ in 0..5 {
                let (&s, &h) = stored
                    .range(lo.max(1)..)
                    .nth((next() % max) as usize)
                    .unwrap_or((&0, &0));
                if s > 0 {
                    assert_eq!(d.find(h, verify(h)), Some(s), "seq {s} is remembered");
                }
            }
            if let Some((&s, &h)) = stored.range(..lo).next_back() {
                assert_eq!(d.find(h, verify(h)), None, "seq {s} is forgotten");
            }
            assert!(d.find(next(), verify(0)).is_none());
            assert!(occupied(&d) < d.slots.len() * LOAD_NUM / LOAD_DEN + 1);
        }
        assert!(seq > 20 * max, "many sweeps ran: {seq}");
    }

    /// Seqs the index never saw (gap events) and a long jump ahead.
    #[test]
    fn a_jump_in_seqs_forgets_what_fell_behind() {
        let mut d = index(3600, 1000);
        for seq in 1..=500u64 {
            d.insert(key_hash("m", &seq.to_string()), seq, 0);
        }
        d.insert(key_hash("m", "far"), 10_000_000, 0);
        assert_eq!(d.find(key_hash("m", "far"), same), Some(10_000_000));
        assert_eq!(d.find(key_hash("m", "500"), same), None);
        assert_eq!(occupied(&d), 1, "the sweep removed everything behind");
    }

    #[test]
    fn one_million_ids_take_12_mib() {
        let mut d = index(3600, 1_000_000);
        let before = d.memory_bytes();
        for i in 0..1_000_000u64 {
            d.insert(
                key_hash("mes", &format!("{i:032x}")),
                i + 1,
                (i as i64) * 10,
            );
        }
        assert_eq!(d.len(), 1_000_000);
        assert!(d.memory_bytes() <= 12 << 20, "{} bytes", d.memory_bytes());
        assert!(before >= 11 << 20, "allocated up front: {before} bytes");
        assert_eq!(
            d.find(key_hash("mes", &format!("{:032x}", 777_777)), same),
            Some(777_778)
        );
    }
}
