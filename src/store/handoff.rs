//! The owning store's side of a sidecar relay: the watcher that applies
//! the sidecar's cursor file (`<store>/relay/cursor`, a
//! [`RelayCursor`]) by completing the outbox through what it delivered.
//! Part of the store core;
//! [`Outbox::apply_relay_cursor`](crate::Outbox::apply_relay_cursor) is its
//! public face.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::engine::file::{cursor_path, decode_cursor, read_cursor_bytes};
use super::handle::Store;
use crate::error::{Error, Result};
use crate::outbox::dead::DeadLetter;

#[cfg(doc)]
use crate::RelayCursor;

impl Store {
    /// Applies the sidecar's cursor file if there is one (see
    /// [`Outbox::apply_relay_cursor`](crate::Outbox::apply_relay_cursor)).
    pub(crate) fn apply_relay_cursor(&self) -> Result<Option<u64>> {
        let path = cursor_path(self.path());
        read_cursor_bytes(&path)?
            .map(|bytes| self.apply_cursor_bytes(&path, &bytes))
            .transpose()
    }

    /// Applies the cursor `bytes` read from `path`: checks it is this
    /// store's and its history, then completes through what it delivered.
    fn apply_cursor_bytes(&self, path: &Path, bytes: &[u8]) -> Result<u64> {
        let cursor = decode_cursor(path, bytes)?;
        cursor.check_owner(path, self.id())?;
        let tail = self.inner.pipeline.tail();
        let head = self.inner.notifier.head();
        cursor.check_history(path, head, tail, |seq| self.outbox_entry(seq))?;
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
            if let Some(entry) = self.outbox_entry(d.seq)? {
                dead.push(DeadLetter {
                    entry,
                    error: d.error.clone(),
                    attempts: d.attempts,
                    first_failed_micros: d.first_failed_micros,
                    dead_at_micros: d.dead_at_micros,
                });
            }
        }
        self.complete(through, &dead)
    }
}

/// Starts a thread that applies the cursor file whenever its content
/// changes, for as long as the store is open. It holds the store only while
/// applying. (Content, not a stat stamp: the file is replaced by rename, and
/// two replacements within one timestamp tick can reuse the inode and size.)
pub(crate) fn watch_relay_cursor(store: &Store, every: Duration) -> Result<()> {
    let weak = store.downgrade();
    let path = cursor_path(store.path());
    std::thread::Builder::new()
        .name("outboxkv-cursor".into())
        .spawn(move || {
            let mut applied: Option<Vec<u8>> = None;
            let mut reported: Option<Vec<u8>> = None;
            loop {
                std::thread::sleep(every);
                if !weak.is_open() {
                    return;
                }
                let Ok(bytes) = fs::read(&path) else { continue };
                if applied.as_ref() == Some(&bytes) {
                    continue;
                }
                let Some(store) = weak.upgrade() else { return };
                let applying = store.apply_cursor_bytes(&path, &bytes);
                drop(store);
                match applying {
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
