//! A relay in another process than the service: reads the store through a
//! RocksDB secondary instance and records its cursor in a file the owning
//! store applies (a [`RelayCursor`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{BoxFuture, OutboxSource};
use crate::error::{Error, Result};
use crate::outbox::cursor::MAX_DEAD;
use crate::store::engine::file::{DB_DIR, RELAY_DIR, check_store, cursor_path, read_cursor};
use crate::{CursorDead, DeadLetter, OutboxEntry, RelayCursor, StoreReader};

mod cursor;
mod watch;

use cursor::CursorWriter;
use watch::LogWatch;

/// Where the sidecar relay of the store at `store` keeps its cursor
/// (`<store>/relay/cursor`, in the format of [`RelayCursor`]).
pub fn sidecar_cursor_path(store: impl AsRef<Path>) -> PathBuf {
    cursor_path(store.as_ref())
}

/// Reads the sidecar relay's cursor of the store at `store`; `Ok(None)` when
/// no sidecar ever delivered from it, [`Error::Corruption`] for a damaged
/// file. Reads only.
pub fn read_sidecar_cursor(store: impl AsRef<Path>) -> Result<Option<RelayCursor>> {
    read_cursor(&cursor_path(store.as_ref()))
}

/// The outbox of a store another process owns, as a relay source.
///
/// Opening it takes the relay lock (`<store>/relay/LOCK`: one relay of any
/// kind per store, a second gets [`Error::RelayLocked`]), reads the cursor
/// file, and opens
/// the store as a RocksDB secondary (its files in `<store>/relay/secondary`).
/// It catches up with the owner when the owner writes its log (on Linux it
/// watches the database folder with inotify; a burst of writes is caught up
/// in one go at most once a millisecond), and every `catch_up_interval` in
/// any case (the only trigger elsewhere, or when inotify is unavailable).
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
/// use outboxkv::relay::SidecarSource;
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
    /// Writes `state` into the cursor file, off the relay loop. Declared
    /// before `_lock`: dropped (its last write done) before the lock is
    /// released, so the next sidecar reads the last cursor.
    cursor: CursorWriter,
    state: Mutex<RelayCursor>,
    interval: Duration,
    /// Signalled when the owner writes to its database folder.
    wake: Arc<Notify>,
    _watch: LogWatch,
    _lock: File,
    health: CatchUpHealth,
}

/// Whether a sidecar's catch-ups with the owner work: for a health check
/// (`outbox-relay`'s `/healthz`). Cheap to clone (clones share the state).
#[derive(Debug, Clone, Default)]
pub struct CatchUpHealth(Arc<Mutex<Option<Failing>>>);

/// Catch-ups failing: the last error, since when, and when it was last
/// logged.
#[derive(Debug)]
struct Failing {
    error: String,
    since: std::time::Instant,
    logged: std::time::Instant,
}

/// How often a catch-up failure that goes on is logged again (every
/// attempt, 50 a second, would flood the log).
const LOG_AGAIN_AFTER: Duration = Duration::from_secs(10);

impl CatchUpHealth {
    /// The last catch-up error and how long catch-ups have failed, while
    /// they fail; `None` once one succeeds.
    pub fn failing(&self) -> Option<(String, Duration)> {
        self.0
            .lock()
            .as_ref()
            .map(|f| (f.error.clone(), f.since.elapsed()))
    }

    /// Records a catch-up's outcome and logs a failure when it starts and
    /// every `LOG_AGAIN_AFTER` while it lasts (with the error of the
    /// moment), and the recovery.
    fn record(&self, outcome: std::result::Result<(), String>) {
        let mut state = self.0.lock();
        let now = std::time::Instant::now();
        match (outcome, state.as_mut()) {
            (Ok(()), None) => {}
            (Ok(()), Some(f)) => {
                tracing::info!(failed_for = ?f.since.elapsed(), "sidecar catch-ups work again");
                *state = None;
            }
            (Err(error), Some(f)) => {
                if now.duration_since(f.logged) >= LOG_AGAIN_AFTER {
                    tracing::warn!(%error, failing_for = ?f.since.elapsed(), "sidecar could not catch up with the store or fsync its log");
                    f.logged = now;
                }
                f.error = error;
            }
            (Err(error), None) => {
                tracing::warn!(%error, "sidecar could not catch up with the store or fsync its log");
                *state = Some(Failing {
                    error,
                    since: now,
                    logged: now,
                });
            }
        }
    }
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
        // Checked before the lock file is written (a damaged cursor or one
        // of another store leaves everything as it was) ...
        if let Some(c) = read_cursor(&cursor_file)? {
            c.check_owner(&cursor_file, meta.store_id)?;
        }
        let lock_file = super::take_relay_lock(path)?;
        // ... and read again under the lock: the one in force is the last
        // one the previous relay wrote, not one it was about to replace.
        let cursor = read_cursor(&cursor_file)?;
        if let Some(c) = &cursor {
            c.check_owner(&cursor_file, meta.store_id)?;
        }
        let dir = path.join(RELAY_DIR);
        let reader = StoreReader::open(path, dir.join("secondary"))?;
        let durable = Arc::new(AtomicU64::new(0));
        make_durable(&reader, &durable)?;
        let wake = Arc::new(Notify::new());
        let watch = LogWatch::start(&path.join(DB_DIR), wake.clone());
        let floor = reader.tail()?.saturating_sub(1);
        if let Some(c) = &cursor {
            // Everything a sidecar ships is in the store's log: a cursor
            // past it, or naming another entry at its seq, means the store
            // was rolled back.
            c.check_history(&cursor_file, reader.head()?, reader.tail()?, |seq| {
                Ok(reader
                    .read_through(seq, seq, 1, usize::MAX)?
                    .into_iter()
                    .next())
            })?;
        }
        let mut state = cursor.unwrap_or(RelayCursor {
            store: meta.store_id,
            delivered_through: 0,
            through_created_micros: 0,
            dead: Vec::new(),
        });
        if floor > state.delivered_through {
            state.delivered_through = floor;
            state.through_created_micros = 0;
        }
        Ok(SidecarSource {
            reader: Arc::new(reader),
            durable,
            cursor: CursorWriter::start(cursor_file)?,
            state: Mutex::new(state),
            interval: catch_up_interval,
            wake,
            _watch: watch,
            _lock: lock_file,
            health: CatchUpHealth::default(),
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

    /// Whether its catch-ups with the owner work (a handle that stays
    /// valid after the source is handed to a relay).
    pub fn catch_up_health(&self) -> CatchUpHealth {
        self.health.clone()
    }
}

impl OutboxSource for SidecarSource {
    /// Counts both the dead entries of the cursor that the service has not
    /// moved yet and those already in the store's dead-letter table.
    fn dead_in_a_row(&self, limit: u32) -> Result<u32> {
        let tail = self.tail()?;
        let from = tail.saturating_sub(u64::from(limit)).max(1);
        // Entries below the store's tail were moved to its table already
        // (an operator may have purged or replayed them since).
        let applied = self.reader.tail()?;
        let pending: Vec<u64> = self
            .state
            .lock()
            .dead
            .iter()
            .map(|d| d.seq)
            .filter(|&seq| seq >= applied)
            .collect();
        let stored = self.reader.dead_letters(from, limit as usize)?;
        Ok(super::count_dead_below(
            tail,
            pending
                .into_iter()
                .chain(stored.iter().map(|d| d.entry.seq)),
            limit,
        ))
    }

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
        if through > next.delivered_through {
            next.delivered_through = through;
            // The commit time of the entry at `through`: how the store
            // tells its own history from a rolled-back copy's.
            next.through_created_micros = self
                .reader
                .read_through(through, through, 1, usize::MAX)?
                .first()
                .map_or(0, |e| e.created_at_micros);
        }
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
            return Err(Error::RelayStopped(format!(
                "{} dead entries wait for the store to apply them (at most {MAX_DEAD}); is the service running?",
                next.dead.len()
            )));
        }
        // Written on the writer's thread; a write that failed is reported
        // by the next settle (or the flush when the relay stops).
        self.cursor.submit(next.encode())?;
        *state = next;
        Ok(())
    }

    /// Waits until the cursor file holds the last settle.
    fn flush(&self) -> Result<()> {
        self.cursor.flush()
    }

    fn changed(&self, head: u64) -> BoxFuture<'static, ()> {
        let reader = self.reader.clone();
        let durable = self.durable.clone();
        let interval = self.interval;
        let wake = self.wake.clone();
        let health = self.health.clone();
        Box::pin(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = wake.notified() => {
                        // Let a burst of writes settle into one catch-up
                        // (each costs two fsyncs).
                        tokio::time::sleep(WAKE_GAP).await;
                    }
                }
                let (r, d) = (reader.clone(), durable.clone());
                let moved = tokio::task::spawn_blocking(move || -> Result<bool> {
                    r.catch_up()?;
                    Ok(make_durable(&r, &d)? > head)
                })
                .await;
                match moved {
                    Ok(Ok(true)) => {
                        health.record(Ok(()));
                        return;
                    }
                    Ok(Ok(false)) => health.record(Ok(())),
                    Ok(Err(e)) => {
                        health.record(Err(e.to_string()));
                        // Wake-ups come every millisecond under load: do
                        // not retry a failing catch-up that often.
                        tokio::time::sleep(FAILED_CATCH_UP_PAUSE).await;
                    }
                    Err(_) => return,
                }
            }
        })
    }
}

/// Fsyncs the owner's log for what `reader` has read and raises `durable` to
/// the last seq it saw; returns the new durable seq. Nothing to do (no
/// fsync) when the reader has no entry beyond `durable`.
fn make_durable(reader: &StoreReader, durable: &AtomicU64) -> Result<u64> {
    // Read the head first: the fsync then covers it.
    let head = reader.head()?;
    let known = durable.load(Ordering::Acquire);
    if head <= known {
        return Ok(known);
    }
    reader.sync_wal()?;
    Ok(durable.fetch_max(head, Ordering::AcqRel).max(head))
}

/// The least time between a failed catch-up and the next attempt.
const FAILED_CATCH_UP_PAUSE: Duration = Duration::from_millis(100);

/// Shortest wait between a wake-up and the catch-up it triggers.
const WAKE_GAP: Duration = Duration::from_millis(1);
