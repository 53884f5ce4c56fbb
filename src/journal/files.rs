//! The journal's files on disk: the state directory it creates, the
//! modes of its files, and the lock file that keeps a second agent (or a
//! `plantrelay replay`) off a journal in use.
//!
//! Must never: widen the mode of an existing state directory (systemd's
//! `StateDirectoryMode` or plant IT chose it), leave a journal file
//! readable by others than the agent's user and group, or take the lock
//! any way that blocks (a second agent must fail at once, saying so).

use std::path::{Path, PathBuf};

use super::JournalError;

/// Mode of the state directory when the journal creates it: the agent's
/// user and its group (plant IT's readers), nobody else.
pub const STATE_DIR_MODE: u32 = 0o750;
/// Mode of the journal's files (db, -wal, -shm, .lock): events hold
/// production data, readable by the agent's group for `plantrelay journal`,
/// by no one else.
pub const JOURNAL_FILE_MODE: u32 = 0o640;

/// Creates the state directory (and its parents) if it is missing; the
/// directory itself gets [`STATE_DIR_MODE`] whatever the umask. An existing
/// directory is left as it is (systemd's `StateDirectoryMode` or plant IT
/// decided its mode).
pub(super) fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
}

/// Creates an empty journal file with [`JOURNAL_FILE_MODE`] before SQLite
/// does (SQLite would use 0644 less the umask, and gives -wal and -shm the
/// mode of the database file). An empty file is an empty database to it.
pub(super) fn create_private_file(path: &Path) -> Result<(), JournalError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(JOURNAL_FILE_MODE)
            .open(path)
        {
            // umask-proof, and before SQLite creates -wal and -shm from it.
            Ok(_) => restrict_journal_files(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(JournalError::Io {
                path: path.to_path_buf(),
                what: "cannot create the journal file".into(),
                detail: e.to_string(),
            }),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Sets [`JOURNAL_FILE_MODE`] on the journal's files that exist, whatever
/// the umask or an older release left them with.
pub(super) fn restrict_journal_files(path: &Path) -> Result<(), JournalError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for suffix in ["", "-wal", "-shm", ".lock", ".seq"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            let file = PathBuf::from(file);
            let mode = match std::fs::metadata(&file) {
                Ok(m) => m.permissions().mode() & 0o7777,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(JournalError::Io {
                        path: path.to_path_buf(),
                        what: format!("cannot read the mode of {}", file.display()),
                        detail: e.to_string(),
                    });
                }
            };
            if mode != JOURNAL_FILE_MODE {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(JOURNAL_FILE_MODE))
                    .map_err(|e| JournalError::Io {
                        path: path.to_path_buf(),
                        what: format!("cannot set mode 0640 on {}", file.display()),
                        detail: e.to_string(),
                    })?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Opens and locks `<journal>.lock` without waiting: held for as long as
/// the journal is open, by this process alone.
pub(super) fn lock_file(path: &Path) -> Result<std::fs::File, JournalError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| JournalError::Io {
            path: path.to_path_buf(),
            what: format!("cannot open lock file {}", lock_path.display()),
            detail: e.to_string(),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked {
            path: path.to_path_buf(),
            lock: lock_path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(JournalError::Io {
            path: path.to_path_buf(),
            what: format!("cannot lock {}", lock_path.display()),
            detail: e.to_string(),
        }),
    }
}

/// True if an agent holds the journal at `path` open right now.
pub fn is_locked(path: &Path) -> bool {
    matches!(lock_file(path), Err(JournalError::Locked { .. }))
}
