//! [`Store`], the handle a service holds, and [`Inner`], the state every
//! clone of it shares.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use rocksdb::{ColumnFamily, DB, WriteOptions};

use super::commit::Pipeline;
use super::engine::medium::Medium;
use super::engine::{ALL_CFS, CF_OUTBOX, column_family, scan};
use super::meta::StoreMeta;
use super::notify::Notifier;
use super::options::{Durability, StoreOptions};
use crate::error::Result;
use crate::outbox::entry::{OutboxEntry, StoreId};

/// An open outboxkv store: typed tables plus an outbox, in one RocksDB
/// database.
///
/// `Store` is a cheap handle (`Clone` shares it; the database closes when the
/// last clone is dropped) and is `Send + Sync`: share it between threads.
/// Only one `Store` may have a given path open at a time, in any process.
///
/// ```
/// use outboxkv::{Event, Store, Table};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
/// struct Order { status: String }
/// const ORDERS: Table<u64, Order> = Table::new("orders");
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let committed = store.write(|tx| {
///     let mut order = tx.get_for_update(&ORDERS, &42)?.unwrap_or_default();
///     order.status = "paid".into();
///     tx.put(&ORDERS, &42, &order)?;
///     tx.emit(Event::json("orders.paid", "order-42", &serde_json::json!({"id": 42}))?)?;
///     Ok(())
/// })?;
/// assert_eq!(committed.seqs, 1..2);
/// assert_eq!(store.get(&ORDERS, &42)?.unwrap().status, "paid");
/// assert_eq!(store.outbox().read(1, 10)?[0].event_type, "orders.paid");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Handle>,
}

/// What every clone of a [`Store`] shares: the store's [`Inner`], and the
/// duty to stop its commit threads when the last clone goes. The commit
/// threads (started by the first async commit) hold `Inner` themselves, so
/// the database closes only after they stopped, on the thread that drops
/// the last `Store`: a reopen right after that finds the store closed.
/// (One exception: if an executor drops the last `Store` inside a waker that
/// a commit thread runs, that thread cannot wait for itself; the threads
/// then stop by themselves and the database closes on one of them, a
/// moment later.)
pub(crate) struct Handle {
    inner: Arc<Inner>,
}

impl Handle {
    pub(crate) fn new(inner: Inner) -> Handle {
        Handle {
            inner: Arc::new(inner),
        }
    }

    /// The shared `Inner` (for the commit threads).
    pub(crate) fn arc(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl std::ops::Deref for Handle {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.pipeline.stop_drivers();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("id", &self.inner.meta.store_id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    // Field order is drop order: the database closes before the lock is released.
    pub(crate) db: DB,
    pub(crate) path: PathBuf,
    pub(crate) meta: StoreMeta,
    pub(crate) opts: StoreOptions,
    pub(crate) pipeline: Pipeline,
    /// Every write and WAL fsync after opening goes through it.
    pub(crate) medium: Medium,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) key_hasher: RandomState,
    pub(crate) write_sync: WriteOptions,
    pub(crate) write_buffered: WriteOptions,
    pub(crate) prune_lock: Mutex<()>,
    pub(crate) replay_lock: Mutex<()>,
    /// The store folder's `LOCK` (held while the store is open).
    pub(crate) _owner_lock: File,
}

impl Inner {
    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        column_family(&self.db, &self.path, name)
    }

    pub(crate) fn write_options(&self, durability: Durability) -> &WriteOptions {
        match durability {
            Durability::Buffered => &self.write_buffered,
            _ => &self.write_sync,
        }
    }
}

impl Store {
    /// The store's identity (from its `OUTBOXKV` file).
    pub fn id(&self) -> StoreId {
        self.inner.meta.store_id
    }

    /// The on-disk format version of the open store.
    pub fn format_version(&self) -> u32 {
        self.inner.meta.format_version
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Flushes memtables to SST files and syncs the write-ahead log, so that a
    /// reopen replays little. Not needed for durability.
    ///
    /// Fails with [`Error::Poisoned`](crate::Error::Poisoned) on a poisoned store, and poisons the
    /// store when a flush fails (the files' state is then unknown).
    pub fn flush(&self) -> Result<()> {
        let inner = &self.inner;
        inner.pipeline.check_poisoned()?;
        inner
            .medium
            .sync_wal(&inner.db)
            .map_err(|cause| inner.pipeline.poison(cause))?;
        for cf in ALL_CFS {
            inner
                .db
                .flush_cf(inner.cf(cf)?)
                .map_err(|e| inner.pipeline.poison(format!("memtable flush failed: {e}")))?;
        }
        Ok(())
    }
}

impl Store {
    /// Up to `max_entries` committed entries from seq `from` on (stopping
    /// after about `max_bytes`), in seq order, contiguous (INV-CONTIG).
    pub(crate) fn read_outbox(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let inner = &self.inner;
        scan::read_entries(
            &inner.db,
            inner.cf(CF_OUTBOX)?,
            scan::Window {
                from,
                tail: inner.pipeline.tail(),
                head: inner.notifier.head(),
            },
            max_entries,
            max_bytes,
            || inner.pipeline.tail(),
        )
    }

    /// The outbox entry with seq `seq`, if it is still in the outbox.
    pub(crate) fn outbox_entry(&self, seq: u64) -> Result<Option<OutboxEntry>> {
        Ok(self
            .read_outbox(seq, 1, usize::MAX)?
            .into_iter()
            .find(|e| e.seq == seq))
    }

    /// A handle that does not keep the store open (for collectors that
    /// outlive it).
    pub(crate) fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.inner))
    }
}

/// A [`Store`] that does not keep it open: [`Store::downgrade`].
pub(crate) struct WeakStore(Weak<Handle>);

impl WeakStore {
    /// The store, while some clone of it is still open.
    pub(crate) fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }

    /// Whether some clone of the store is still open.
    pub(crate) fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }
}

#[cfg(feature = "failpoints")]
impl Store {
    /// Fault injection for tests (feature `failpoints`, not for production):
    /// arms the failpoint `point` so that its next `passes` calls go through
    /// and every later one gets `fault`; `None` disarms it.
    ///
    /// A fault poisons the store (see [`Error::Poisoned`](crate::Error::Poisoned));
    /// reopen it to go on. With [`Fault::CrashAfter`](crate::Fault::CrashAfter)
    /// the write reached the log before the "crash", so the reopened store
    /// has it.
    ///
    /// ```
    /// use outboxkv::{Error, Event, Failpoint, Fault, Store};
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// store.inject(Failpoint::CommitWrite, 0, Some(Fault::CrashAfter));
    /// let r = store.write(|tx| tx.emit(Event::bytes("t", "k", Vec::new())));
    /// assert!(matches!(r, Err(Error::Poisoned { .. })));
    /// drop(store);
    /// let store = Store::open(dir.path())?;
    /// assert_eq!(store.outbox().head(), 1); // written before the "crash"
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn inject(&self, point: crate::Failpoint, passes: u64, fault: Option<crate::Fault>) {
        self.inner.medium.faults.arm(point, passes, fault);
    }

    /// Fault injection for tests (feature `failpoints`, not for production):
    /// the write-ahead-log fsyncs ([`Failpoint::WalSync`](crate::Failpoint::WalSync))
    /// after the next `n` fail, as an fsync error from the disk would. With
    /// [`StoreOptions::pipelined_fsync`](crate::StoreOptions::pipelined_fsync)
    /// off, a `Sync` group is fsynced by its write instead (see
    /// [`fail_writes_after`](Store::fail_writes_after)).
    ///
    /// ```
    /// use outboxkv::{Error, Event, Store};
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// store.fail_fsyncs_after(0);
    /// let r = store.write(|tx| tx.emit(Event::bytes("t", "k", Vec::new())));
    /// assert!(matches!(r, Err(Error::Poisoned { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn fail_fsyncs_after(&self, n: u64) {
        self.inject(crate::Failpoint::WalSync, n, Some(crate::Fault::Fail));
    }

    /// Fault injection for tests (feature `failpoints`, not for production):
    /// the commit-group writes to RocksDB
    /// ([`Failpoint::CommitWrite`](crate::Failpoint::CommitWrite)) after the
    /// next `n` fail, as a write error (a full disk) would, each 2 ms late
    /// (as from a stalled disk, so that commits queue up behind it).
    pub fn fail_writes_after(&self, n: u64) {
        let stall = crate::Fault::Stall(std::time::Duration::from_millis(2));
        self.inject(crate::Failpoint::CommitWrite, n, Some(stall));
    }

    /// Slow-disk simulation for tests and benchmarks (feature `failpoints`,
    /// not for production): every write-ahead-log fsync
    /// ([`Failpoint::WalSync`](crate::Failpoint::WalSync)) first sleeps
    /// `delay` (on top of the real fsync), as a disk with slower syncs
    /// would. `Duration::ZERO` turns it off.
    pub fn delay_fsyncs(&self, delay: std::time::Duration) {
        self.delay_at(crate::Failpoint::WalSync, delay);
    }

    /// Slow-disk simulation for tests and benchmarks (feature
    /// `failpoints`, not for production): every call at `point` first
    /// sleeps `delay` (`Duration::ZERO` turns it off), whether or not a
    /// fault is armed there.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use outboxkv::{Event, Failpoint, Store};
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// store.delay_at(Failpoint::CommitWrite, Duration::from_millis(50));
    /// let started = Instant::now();
    /// store.write(|tx| tx.emit(Event::bytes("t", "k", Vec::new())))?;
    /// assert!(started.elapsed() >= Duration::from_millis(50));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn delay_at(&self, point: crate::Failpoint, delay: std::time::Duration) {
        self.inner.medium.faults.delay(point, delay);
    }
}
