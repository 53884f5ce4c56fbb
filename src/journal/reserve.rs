//! The disk reserve: a file of real blocks beside the journal that the
//! writer gives back to the filesystem when a commit finds the disk full.
//!
//! Without it a full disk livelocks the drain: the upstream takes a batch,
//! but storing the cursor needs the WAL to grow (or a checkpoint to grow the
//! database file), so the batch is sent again and again while nothing can
//! free space behind a cursor that cannot move. With the reserve released,
//! cursor moves, the checkpoint and retention (which deletes delivered
//! events early while the disk is short: [`super::writer`]) go through, and
//! delivering is what frees room for new events.
//!
//! This module owns the file and nothing else: it never decides when to
//! release (the writer does, on a failed commit) and never deletes anything
//! but its own file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use crate::warn_limit::WarnLimiter;

/// Bytes kept in reserve: room for the WAL of a checkpoint interval (1,000
/// pages, 4 MiB) and the cursor, retention and checkpoint writes that
/// follow, twice over.
pub const DEFAULT_DISK_RESERVE: u64 = 8 << 20;

pub(crate) struct Reserve {
    path: PathBuf,
    size: u64,
    held: bool,
    warnings: WarnLimiter,
}

impl Reserve {
    /// The reserve of the journal at `journal` (`journal.reserve` beside
    /// it), made now if there is room; `size` 0 keeps none.
    pub(crate) fn open(journal: &Path, size: u64) -> Reserve {
        let mut r = Reserve {
            path: journal.with_extension("reserve"),
            size,
            held: false,
            warnings: WarnLimiter::default(),
        };
        if size > 0 {
            match r.make() {
                Ok(()) => r.held = true,
                Err(e) => {
                    warn!(reserve = %r.path.display(), bytes = size, error = %e, "cannot set aside the disk reserve; a full disk may then need an operator to free space before deliveries can resume");
                }
            }
        }
        r
    }

    #[cfg(test)]
    fn held(&self) -> bool {
        self.held
    }

    /// Gives the reserve back to the filesystem; true if it was held.
    pub(crate) fn release(&mut self) -> bool {
        if !self.held {
            return false;
        }
        self.held = false;
        match fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(e) => {
                warn!(reserve = %self.path.display(), error = %e, "cannot remove the disk reserve");
                false
            }
        }
    }

    /// Sets the reserve aside again once the filesystem has room for it and
    /// as much again; true when the disk is no longer short: the reserve is
    /// held (again), or none is kept.
    pub(crate) fn restore(&mut self) -> bool {
        if self.held || self.size == 0 {
            return true;
        }
        let free = free_bytes(&self.path);
        if free.is_none_or(|f| f < self.size.saturating_mul(2)) {
            return false;
        }
        match self.make() {
            Ok(()) => {
                self.held = true;
                info!(reserve = %self.path.display(), bytes = self.size, "disk reserve set aside again");
                true
            }
            Err(e) => {
                // Tried every second while the disk is short.
                match self.warnings.check("restore") {
                    Some(suppressed) => {
                        warn!(reserve = %self.path.display(), error = %e, suppressed_since_last_warning = suppressed, "cannot set aside the disk reserve again; will retry (further failures are logged at debug for a minute)")
                    }
                    None => {
                        debug!(reserve = %self.path.display(), error = %e, "cannot set aside the disk reserve again")
                    }
                }
                false
            }
        }
    }

    /// Writes the file with real blocks (a sparse file would reserve nothing).
    fn make(&self) -> io::Result<()> {
        let result = (|| {
            let mut f = File::create(&self.path)?;
            if rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, self.size).is_err()
            {
                // Filesystems without fallocate: write the zeros.
                let chunk = vec![0u8; 1 << 20];
                let mut left = self.size;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    f.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
            }
            f.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.path);
        }
        result
    }
}

/// Bytes available to unprivileged writers on the filesystem of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = path.parent()?;
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_real_blocks_given_back_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal.db");
        let mut r = Reserve::open(&journal, 1 << 20);
        let file = dir.path().join("journal.reserve");
        assert!(r.held());
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 1 << 20, "not sparse");
        assert!(r.release());
        assert!(!file.exists());
        assert!(!r.release(), "only once");
        assert!(r.restore());
        assert!(r.restore(), "held already");
        assert!(file.exists() && r.held());
        let none = Reserve::open(&dir.path().join("other.db"), 0);
        assert!(!none.held());
        assert!(!dir.path().join("other.reserve").exists());
    }
}
