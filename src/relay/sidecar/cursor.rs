//! Writing the sidecar's cursor file off the relay loop.
//!
//! Every settle of a sidecar relay changes its cursor, and writing the file
//! costs two fsyncs (the file, then its folder, see `write_file_atomic`).
//! Done in the relay loop, they held up the next publish by those fsyncs.
//! A [`CursorWriter`] takes the newest cursor and writes it on its own
//! thread; cursors handed over while a write runs are replaced by the
//! newest (only the last one matters: each contains everything before it).
//!
//! A write that fails is tried again (after 10 ms, doubling up to 1 s)
//! until it or a newer cursor's write succeeds; while writes fail, the next
//! settle and the relay's stop (`flush`) report the error.
//!
//! What this changes for a crash: the file may lag the relay's settles by
//! up to two writes' worth (the one running and the one waiting) more than
//! before. The store prunes only what the file names,
//! so nothing is lost; a sidecar started after a crash publishes again from
//! the file's cursor, and the broker's de-duplication (NATS message ids,
//! the Kafka sink's restart scan) absorbs the repeats, as it does for
//! acknowledgements the file had not recorded yet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::relay::Backoff;
use crate::store::engine::file::write_file_atomic;

/// Writes cursors handed to it into one file on a thread of its own, newest
/// last; while writes fail, [`submit`](Self::submit) and
/// [`flush`](Self::flush) report it. Dropping it tries what is pending
/// once more, then ends the thread.
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
    /// The last write failed (and no write succeeded since): its error,
    /// until it is reported. While it is set or was reported, `pending`
    /// holds the failed cursor (or a newer one), except after the last try.
    failed: Option<Error>,
    /// The writer thread ended (it panicked): nothing is written any more.
    dead: bool,
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
    /// written yet. Fails, without handing it over, with the error of the
    /// last write while writes fail (each error is reported once).
    pub(super) fn submit(&self, cursor: Vec<u8>) -> Result<()> {
        let mut slot = self.shared.slot.lock();
        if let Some(error) = slot.failed.take() {
            return Err(error);
        }
        if slot.dead {
            return Err(writer_ended());
        }
        slot.pending = Some(cursor);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until every cursor handed over is written, or the write
    /// fails (its error; while writes keep failing, the next flush waits
    /// for the next attempt).
    pub(super) fn flush(&self) -> Result<()> {
        let mut slot = self.shared.slot.lock();
        while (slot.pending.is_some() || slot.writing) && slot.failed.is_none() && !slot.dead {
            self.shared.changed.wait(&mut slot);
        }
        if let Some(error) = slot.failed.take() {
            return Err(error);
        }
        if slot.dead && slot.pending.is_some() {
            return Err(writer_ended());
        }
        Ok(())
    }
}

/// Waits before a failed write is tried again: 10 ms, doubling up to 1 s.
const RETRY: Backoff = Backoff {
    initial: Duration::from_millis(10),
    max: Duration::from_secs(1),
    factor: 2.0,
    jitter: 0.0,
};

fn writer_ended() -> Error {
    Error::RelayStopped("the sidecar's cursor writer thread ended (it panicked)".into())
}

impl Shared {
    fn run(&self, file: &Path) {
        // A panic (not expected: the write returns errors) must not leave
        // `flush` waiting for a thread that is gone.
        let ended = EndGuard(self);
        let mut slot = self.slot.lock();
        let mut failures = 0u32;
        loop {
            if let Some(cursor) = slot.pending.take() {
                let last_try = slot.stop;
                slot.writing = true;
                drop(slot);
                let written = write_file_atomic(file, &cursor);
                slot = self.slot.lock();
                slot.writing = false;
                match written {
                    Ok(()) => {
                        // This cursor holds everything before it.
                        slot.failed = None;
                        failures = 0;
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let retry = RETRY.delay(failures, 0.0);
                        tracing::warn!(%error, retry_in = ?retry,
                            "sidecar could not write its cursor file");
                        slot.failed = Some(error);
                        if !last_try {
                            // Tried again, unless a newer cursor came.
                            slot.pending.get_or_insert(cursor);
                            self.changed.notify_all();
                            let _ = self.changed.wait_for(&mut slot, retry);
                            continue;
                        }
                    }
                }
                self.changed.notify_all();
                continue;
            }
            if slot.stop {
                drop(slot);
                std::mem::forget(ended);
                return;
            }
            self.changed.wait(&mut slot);
        }
    }
}

/// Marks the writer dead if its thread unwinds.
struct EndGuard<'a>(&'a Shared);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        let mut slot = self.0.slot.lock();
        slot.dead = true;
        slot.writing = false;
        self.0.changed.notify_all();
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
            // Tries what is pending once more, then ends.
            if thread.join().is_err() {
                tracing::error!("the sidecar's cursor writer thread panicked");
            }
        }
        // The last try failed (it sets `failed`), or there was none.
        let slot = self.shared.slot.lock();
        if slot.failed.is_some() || slot.dead {
            tracing::warn!(
                "sidecar stopped without writing its last cursor; a sidecar started later \
                 publishes again from the one in the file"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_cursor_is_written_and_a_failed_write_is_retried() -> Result<()> {
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
        // Tried again: the next flush reports the next attempt's failure.
        assert!(matches!(writer.flush(), Err(Error::Io { .. })));
        // A hand-over while writes fail reports the failure.
        while writer.shared.slot.lock().failed.is_none() {
            std::thread::yield_now();
        }
        assert!(matches!(writer.submit(vec![3; 8]), Err(Error::Io { .. })));
        assert_eq!(std::fs::read(&file).ok(), Some(vec![99u8; 8]));
        // The cause gone, the retry writes the cursor without a new one.
        std::fs::remove_dir(&tmp).map_err(|e| Error::io("rmdir", &tmp, e))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read(&file).ok() != Some(vec![1u8; 8]) {
            assert!(std::time::Instant::now() < deadline, "never retried");
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.flush()?;
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
