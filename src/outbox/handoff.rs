//! The owning store's side of a sidecar relay: reading its cursor file and
//! pruning what it delivered.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::api::Outbox;
use super::cursor::RelayCursor;
use super::dead::DeadLetter;
use super::entry::{OutboxEntry, StoreId};
use crate::error::{Error, Result};
use crate::store::Store;

/// The sidecar relay's folder inside a store.
pub const RELAY_DIR: &str = "relay";
/// The cursor file inside [`RELAY_DIR`].
pub const CURSOR_FILE: &str = "cursor";

/// Where the sidecar relay of the store at `store_path` keeps its cursor.
pub fn cursor_path(store_path: &Path) -> PathBuf {
    store_path.join(RELAY_DIR).join(CURSOR_FILE)
}

/// Reads and checks a cursor file; `Ok(None)` when there is none.
pub fn read_cursor(path: &Path) -> Result<Option<RelayCursor>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read relay cursor", path, e)),
    };
    decode_cursor(path, &bytes).map(Some)
}

fn decode_cursor(path: &Path, bytes: &[u8]) -> Result<RelayCursor> {
    RelayCursor::decode(bytes).map_err(|e| Error::corruption(path.display().to_string(), e.0))
}

/// Refuses a cursor (read from `path`) that belongs to another store than `store`.
pub(crate) fn check_owner(cursor: &RelayCursor, path: &Path, store: StoreId) -> Result<()> {
    if cursor.store == store {
        return Ok(());
    }
    Err(Error::corruption(
        path.display().to_string(),
        format!(
            "the cursor belongs to store {}, not to this store ({store})",
            cursor.store
        ),
    ))
}

impl Outbox {
    /// Applies the sidecar relay's cursor file (`<store>/relay/cursor`), if
    /// there is one: prunes every entry it delivered and moves the entries it
    /// dead-lettered into the dead-letter table, in one atomic write. Returns
    /// the new tail, or `None` when there is no cursor file.
    ///
    /// The store does this on its own every
    /// [`relay_cursor_poll`](crate::StoreOptions::relay_cursor_poll). A
    /// damaged cursor file, or one of another store, is an
    /// [`Error::Corruption`] and prunes nothing.
    pub fn apply_relay_cursor(&self) -> Result<Option<u64>> {
        let path = cursor_path(self.store().path());
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read relay cursor", &path, e)),
        };
        self.apply_cursor_bytes(&path, &bytes).map(Some)
    }

    fn apply_cursor_bytes(&self, path: &Path, bytes: &[u8]) -> Result<u64> {
        let store = self.store();
        let cursor = decode_cursor(path, bytes)?;
        check_owner(&cursor, path, store.id())?;
        let tail = self.tail();
        check_history(&cursor, path, self.head(), tail, |seq| self.get(seq))?;
        let through = cursor.delivered_through;
        if through < tail {
            return Ok(tail);
        }
        let mut dead = Vec::new();
        for d in cursor
            .dead
            .iter()
            .filter(|d| d.seq >= tail && d.seq <= through)
        {
            if let Some(entry) = self.get(d.seq)? {
                dead.push(DeadLetter {
                    entry,
                    error: d.error.clone(),
                    attempts: d.attempts,
                    first_failed_micros: d.first_failed_micros,
                    dead_at_micros: d.dead_at_micros,
                });
            }
        }
        self.complete_through(through, &dead)
    }
}

/// Refuses a cursor that is not the history of the store whose last seq
/// is `head` and whose first unsettled seq is `tail` (`entry_at` reads the
/// store's entry at a seq): one past the store's last seq, or one whose last
/// delivered entry has another commit time than the store's entry at that
/// seq. A sidecar ships only what is durable in the store, so either means
/// the store was rolled back (restored from an older copy of itself);
/// applying the cursor would prune the store's next commits unsent.
pub(crate) fn check_history(
    cursor: &RelayCursor,
    path: &Path,
    head: u64,
    tail: u64,
    entry_at: impl FnOnce(u64) -> Result<Option<OutboxEntry>>,
) -> Result<()> {
    let through = cursor.delivered_through;
    let refuse = |what: String| {
        Err(Error::corruption(
            path.display().to_string(),
            format!(
                "{what}: the store was restored from an older copy of itself, or the cursor \
                 was; if the store is right, remove the cursor file (events it delivered may \
                 then be delivered again)"
            ),
        ))
    };
    if through > head {
        return refuse(format!(
            "the relay cursor says seq {through} was delivered, but the store's last seq is {head}"
        ));
    }
    if cursor.through_created_micros == 0 || through < tail {
        return Ok(());
    }
    match entry_at(through)? {
        Some(e) if e.seq == through && e.created_at_micros != cursor.through_created_micros => {
            refuse(format!(
                "the relay cursor's last delivered entry (seq {through}) is not the store's \
                 entry at that seq (another commit time)"
            ))
        }
        _ => Ok(()),
    }
}

/// Starts a thread that applies the cursor file whenever its content
/// changes, for as long as the store is open. It holds the store only while
/// applying. (Content, not a stat stamp: the file is replaced by rename, and
/// two replacements within one timestamp tick can reuse the inode and size.)
pub(crate) fn watch_relay_cursor(store: &Store, every: Duration) -> Result<()> {
    let weak = Arc::downgrade(&store.inner);
    let path = cursor_path(store.path());
    std::thread::Builder::new()
        .name("outboxkv-cursor".into())
        .spawn(move || {
            let mut applied: Option<Vec<u8>> = None;
            let mut reported: Option<Vec<u8>> = None;
            loop {
                std::thread::sleep(every);
                if weak.strong_count() == 0 {
                    return;
                }
                let Ok(bytes) = fs::read(&path) else { continue };
                if applied.as_ref() == Some(&bytes) {
                    continue;
                }
                let Some(inner) = weak.upgrade() else { return };
                let outbox = Store { inner }.outbox();
                match outbox.apply_cursor_bytes(&path, &bytes) {
                    Ok(_) => applied = Some(bytes),
                    Err(e @ Error::Corruption { .. }) => {
                        // Damaged, of another store, or ahead of the store:
                        // never applied, not even once the store's head
                        // passes it (that would prune commits unsent).
                        // Only a new cursor content is looked at again.
                        tracing::error!(error = %e, "refusing the sidecar relay's cursor");
                        applied = Some(bytes);
                    }
                    Err(e) => {
                        // Tried again next time; reported once per content.
                        if reported.as_ref() != Some(&bytes) {
                            tracing::warn!(error = %e, "could not apply the sidecar relay's cursor");
                            reported = Some(bytes);
                        }
                    }
                }
            }
        })
        .map_err(|e| Error::io("start cursor watcher", store.path(), e))?;
    Ok(())
}
