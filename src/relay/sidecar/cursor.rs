//! Writing the sidecar's cursor file off the relay loop.
//!
//! Every settle of a sidecar relay changes its cursor, and writing the file
//! costs two fsyncs (the file, then its folder, see `write_file_atomic`).
//! Done in the relay loop, they held up the next publish by those fsyncs.
//! A [`CursorWriter`] takes the newest cursor and writes it on its own
//! thread; cursors handed over while a write runs are replaced by the
//! newest (only the last one matters: each contains everything before it).
//!
//! What this changes for a crash: the file may lag the relay's settles by
//! one write more than before. The store prunes only what the file names,
//! so nothing is lost; a sidecar started after a crash publishes again from
//! the file's cursor, and the broker's de-duplication (NATS message ids,
//! the Kafka sink's restart scan) absorbs the repeats, as it does for
//! acknowledgements the file had not recorded yet.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::store::engine::file::write_file_atomic;

/// Writes cursors handed to it into one file on a thread of its own, newest
/// last; a failed write is reported by the next [`submit`](Self::submit)
/// or [`flush`](Self::flush). Dropping it writes what is pending first.
pub(super) struct CursorWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    slot: Mutex<Slot>,
    /// Signalled when a cursor is handed over, a write ends, or on stop.
    changed: Condvar,
}

#[derive(Default)]
struct Slot {
    /// The newest cursor (encoded) not written yet.
    pending: Option<Vec<u8>>,
    /// A write is running.
    writing: bool,
    /// The first write that failed, until it is reported.
    failed: Option<Error>,
    stop: bool,
}

impl CursorWriter {
    /// Starts the thread that writes `file`.
    pub(super) fn start(file: PathBuf) -> Result<CursorWriter> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            changed: Condvar::new(),
        });
        let writer = shared.clone();
        // At most 15 bytes, unlike the first 15 of the other threads'
        // names (Linux keeps 15; tests count the sidecar's threads by name).
        let thread = std::thread::Builder::new()
            .name("outboxkv-cfile".into())
            .spawn(move || writer.run(&file))
            .map_err(|e| Error::io("start the cursor writer thread", "", e))?;
        Ok(CursorWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands `cursor` (encoded) over to be written, replacing one not
    /// written yet. Fails, without handing it over, with the error of an
    /// earlier write that failed (reported once).
    pub(super) fn submit(&self, cursor: Vec<u8>) -> Result<()> {
        let mut slot = self.shared.slot.lock();
        if let Some(error) = slot.failed.take() {
            return Err(error);
        }
        slot.pending = Some(cursor);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until every cursor handed over is written; the error of a
    /// write that failed (reported once).
    pub(super) fn flush(&self) -> Result<()> {
        let mut slot = self.shared.slot.lock();
        while slot.pending.is_some() || slot.writing {
            self.shared.changed.wait(&mut slot);
        }
        slot.failed.take().map_or(Ok(()), Err)
    }
}

impl Shared {
    fn run(&self, file: &std::path::Path) {
        let mut slot = self.slot.lock();
        loop {
            if let Some(cursor) = slot.pending.take() {
                slot.writing = true;
                drop(slot);
                let written = write_file_atomic(file, &cursor);
                slot = self.slot.lock();
                slot.writing = false;
                if let Err(error) = written {
                    tracing::warn!(%error, "sidecar could not write its cursor file");
                    // The first failure is the one reported; a later
                    // cursor is still written (and may succeed).
                    slot.failed.get_or_insert(error);
                }
                self.changed.notify_all();
                continue;
            }
            if slot.stop {
                return;
            }
            self.changed.wait(&mut slot);
        }
    }
}

impl Drop for CursorWriter {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.slot.lock();
            slot.stop = true;
            self.shared.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            // Writes what is pending, then ends. A failure was logged.
            let _ = thread.join();
        }
        if let Some(error) = self.shared.slot.lock().failed.take() {
            tracing::warn!(%error, "sidecar stopped without writing its last cursor");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_cursor_is_written_and_a_failure_is_reported_once() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", "", e))?;
        let file = dir.path().join("cursor");
        let writer = CursorWriter::start(file.clone())?;
        for i in 0..100u8 {
            writer.submit(vec![i; 8])?;
        }
        writer.flush()?;
        assert_eq!(std::fs::read(&file).ok(), Some(vec![99u8; 8]));
        // A folder where the temporary file goes: the write fails.
        let tmp = dir.path().join("cursor.tmp");
        std::fs::create_dir(&tmp).map_err(|e| Error::io("mkdir", &tmp, e))?;
        writer.submit(vec![1; 8])?;
        assert!(matches!(writer.flush(), Err(Error::Io { .. })));
        assert!(writer.flush().is_ok(), "reported once");
        writer.submit(vec![2; 8])?;
        // The failure of that write comes with the next hand-over.
        while writer.shared.slot.lock().failed.is_none() {
            std::thread::yield_now();
        }
        assert!(matches!(writer.submit(vec![3; 8]), Err(Error::Io { .. })));
        std::fs::remove_dir(&tmp).map_err(|e| Error::io("rmdir", &tmp, e))?;
        writer.submit(vec![4; 8])?;
        drop(writer);
        assert_eq!(
            std::fs::read(&file).ok(),
            Some(vec![4u8; 8]),
            "written on drop"
        );
        Ok(())
    }
}
