//! A relay in another process than the service: reads the store through a
//! RocksDB secondary instance and records its cursor in a file the owning
//! store applies (see [`crate::outbox::cursor`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::{BoxFuture, OutboxSource};
use crate::error::{Error, Result};
use crate::outbox::cursor::{CursorDead, MAX_DEAD, RelayCursor};
use crate::outbox::dead::DeadLetter;
use crate::outbox::entry::OutboxEntry;
use crate::outbox::handoff::{RELAY_DIR, check_owner, cursor_path, read_cursor};
use crate::store::StoreReader;
use crate::store::open::{lock, write_file_atomic};
use crate::store::reader::check_store;

/// The outbox of a store another process owns, as a relay source.
///
/// Opening it takes the sidecar lock (`<store>/relay/LOCK`: one sidecar per
/// store, a second gets [`Error::Locked`]), reads the cursor file, and opens
/// the store as a RocksDB secondary (its files in `<store>/relay/secondary`).
/// It catches up with the owner every `catch_up_interval` while idle.
///
/// Durability: a secondary reads the owner's write-ahead log as the
/// operating system has it, which can be ahead of the disk (a `Buffered`
/// commit, or a `Sync` commit whose fsync is still running). So after each
/// catch-up the sidecar fsyncs the log itself ([`StoreReader::sync_wal`])
/// and ships only entries read before that fsync: an event it ships
/// survives a power loss together with the state committed with it, in
/// both durability modes. [`head`](OutboxSource::head) is the last seq made
/// durable that way; a caller that catches the [`reader`](Self::reader) up
/// itself sees further, but the sidecar does not ship it before its next
/// catch-up. Costs two fsyncs (log and folder) per catch-up that found new
/// entries.
///
/// ```no_run
/// use outboxkv::relay::Relay;
/// use outboxkv::relay::sidecar::SidecarSource;
/// use outboxkv::sink::FileSink;
/// use std::time::Duration;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let source = SidecarSource::open("data/orders", Duration::from_millis(20))?;
/// let relay = Relay::builder_for(source).sink(FileSink::open("events.jsonl")?).start()?;
/// # Ok(()) }
/// ```
pub struct SidecarSource {
    reader: Arc<StoreReader>,
    /// Last seq read before a successful [`StoreReader::sync_wal`].
    durable: Arc<AtomicU64>,
    cursor_file: PathBuf,
    state: Mutex<RelayCursor>,
    interval: Duration,
    _lock: File,
}

impl std::fmt::Debug for SidecarSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarSource")
            .field("store", &self.reader.path())
            .field("cursor", &self.state.lock().delivered_through)
            .finish_non_exhaustive()
    }
}

impl SidecarSource {
    /// Opens the store at `path` as a sidecar relay's source. Everything
    /// that can reject it (not a store, newer format, a damaged cursor file,
    /// a cursor of another store, another sidecar) is checked before
    /// anything is written.
    pub fn open(path: impl AsRef<Path>, catch_up_interval: Duration) -> Result<SidecarSource> {
        let path = path.as_ref();
        let meta = check_store(path)?;
        let cursor_file = cursor_path(path);
        let cursor = read_cursor(&cursor_file)?;
        if let Some(c) = &cursor {
            check_owner(c, &cursor_file, meta.store_id)?;
        }
        let dir = path.join(RELAY_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let lock_file = lock(&dir)?;
        let reader = StoreReader::open(path, dir.join("secondary"))?;
        let durable = Arc::new(AtomicU64::new(0));
        make_durable(&reader, &durable)?;
        let floor = reader.tail()?.saturating_sub(1);
        let mut state = cursor.unwrap_or(RelayCursor {
            store: meta.store_id,
            delivered_through: 0,
            dead: Vec::new(),
        });
        state.delivered_through = state.delivered_through.max(floor);
        Ok(SidecarSource {
            reader: Arc::new(reader),
            durable,
            cursor_file,
            state: Mutex::new(state),
            interval: catch_up_interval,
            _lock: lock_file,
        })
    }

    /// The read-only view of the store.
    pub fn reader(&self) -> &StoreReader {
        &self.reader
    }

    /// The last seq this sidecar has delivered (or dead-lettered).
    pub fn delivered_through(&self) -> u64 {
        self.state.lock().delivered_through
    }
}

impl OutboxSource for SidecarSource {
    fn tail(&self) -> Result<u64> {
        Ok((self.state.lock().delivered_through + 1).max(self.reader.tail()?))
    }

    fn head(&self) -> Result<u64> {
        Ok(self.durable.load(Ordering::Acquire))
    }

    fn read(&self, from: u64, max_entries: usize, max_bytes: usize) -> Result<Vec<OutboxEntry>> {
        let from = from.max(self.tail()?);
        let through = self.durable.load(Ordering::Acquire);
        self.reader
            .read_through(from, through, max_entries, max_bytes)
    }

    fn settle(&self, through: u64, dead: &[DeadLetter]) -> Result<()> {
        let applied = self.reader.tail()?;
        let mut state = self.state.lock();
        let mut next = state.clone();
        next.delivered_through = next.delivered_through.max(through);
        // Dead entries stay listed until the store has pruned past them.
        next.dead.retain(|d| d.seq >= applied);
        next.dead.extend(dead.iter().map(|d| CursorDead {
            seq: d.entry.seq,
            attempts: d.attempts,
            first_failed_micros: d.first_failed_micros,
            dead_at_micros: d.dead_at_micros,
            error: d.error.clone(),
        }));
        if next.dead.len() > MAX_DEAD {
            return Err(Error::InvalidArgument(format!(
                "{} dead entries wait for the store to apply them (at most {MAX_DEAD}); is the service running?",
                next.dead.len()
            )));
        }
        write_file_atomic(&self.cursor_file, &next.encode())?;
        *state = next;
        Ok(())
    }

    fn changed(&self, head: u64) -> BoxFuture<'static, ()> {
        let reader = self.reader.clone();
        let durable = self.durable.clone();
        let interval = self.interval;
        Box::pin(async move {
            loop {
                tokio::time::sleep(interval).await;
                let (r, d) = (reader.clone(), durable.clone());
                let moved = tokio::task::spawn_blocking(move || -> Result<bool> {
                    r.catch_up()?;
                    Ok(make_durable(&r, &d)? > head)
                })
                .await;
                match moved {
                    Ok(Ok(true)) => return,
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "sidecar could not catch up with the store or fsync its log");
                    }
                    Err(_) => return,
                }
            }
        })
    }
}

/// Fsyncs the owner's log for what `reader` has read and raises `durable` to
/// the last seq it saw; returns the new durable seq.
fn make_durable(reader: &StoreReader, durable: &AtomicU64) -> Result<u64> {
    // Read the head first: the fsync then covers it.
    let head = reader.head()?;
    reader.sync_wal()?;
    Ok(durable.fetch_max(head, Ordering::AcqRel).max(head))
}
