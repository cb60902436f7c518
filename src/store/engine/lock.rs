//! `LOCK` files: one owning [`Store`](crate::Store) per store folder, and
//! one relay per store (`<store>/relay/LOCK`).
//!
//! A lock is an advisory `flock` on the file, held while the returned
//! [`File`] is open and released by the kernel when the process dies, so a
//! crash never leaves a stale lock behind. The file itself stays.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::error::{Error, Result};

/// The lock file's name inside the folder it guards.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// Takes `<dir>/LOCK` (creating it), or fails with [`Error::Locked`] when
/// another open file description holds it.
pub(crate) fn lock(dir: &Path) -> Result<File> {
    let lock_path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("open lock file", &lock_path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: dir.to_path_buf(),
            lock: lock_path,
        }),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", lock_path, e)),
    }
}

/// Whether `<dir>/LOCK` is held now, by this process or another. Creates
/// nothing: a missing lock file is not held.
pub(crate) fn is_locked(dir: &Path) -> Result<bool> {
    let path = dir.join(LOCK_FILE);
    let file = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("open lock file", &path, e)),
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            Ok(false)
        }
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", path, e)),
    }
}
