//! Opening a store: directory checks, identity, locking, RocksDB set-up.
//!
//! # Directory layout
//!
//! ```text
//! <path>/OUTBOXKV   identity and format version (see `store::meta`)
//! <path>/LOCK       held (flock) by the one Store that has the store open
//! <path>/db/        the RocksDB database
//! ```
//!
//! # RocksDB layout
//!
//! Four column families, all opened at start-up (so handles never have to
//! be created while the store is in use):
//!
//! - `tables`: every typed table, keys prefixed by `table name + 0x00`. One
//!   family for all tables means tables need no registry and no column
//!   family creation at run time, and a state change touching several tables
//!   is still one atomic batch.
//! - `outbox`: `seq` as 8 big-endian bytes → entry (see `outbox::entry`).
//!   Kept apart so its range-delete tombstones never slow table scans and
//!   its short-lived data can be tuned separately.
//! - `meta`: `store_id` (cross-checked with `OUTBOXKV`) and
//!   `outbox.pruned_through` (so seqs continue after everything was pruned).
//! - `dead_letters`: original seq (8 bytes big-endian) → dead letter (see
//!   `outbox::dead`).
//!
//! The write-ahead log is recovered in RocksDB's
//! `TolerateCorruptedTailRecords` mode by default (see
//! [`WalRecovery`](crate::WalRecovery)): after a crash the database holds
//! every acknowledged commit and never a torn batch; damage in the middle of
//! the log fails the open.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    DBRecoveryMode, WriteOptions,
};

use super::commit::Pipeline;
use super::conflict::Limits;
use super::meta::{FORMAT_VERSION, META_FILE, MetaError, StoreMeta};
use super::options::{Durability, StoreOptions, WalRecovery};
use crate::error::{Error, Result};
use crate::outbox::entry::{MAX_SEQ, StoreId};
use crate::outbox::notify::Notifier;

pub(crate) const CF_TABLES: &str = "tables";
pub(crate) const CF_OUTBOX: &str = "outbox";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_DEAD: &str = "dead_letters";
pub(crate) const META_STORE_ID: &[u8] = b"store_id";
pub(crate) const META_PRUNED_THROUGH: &[u8] = b"outbox.pruned_through";
const LOCK_FILE: &str = "LOCK";
pub(crate) const DB_DIR: &str = "db";

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
    pub(crate) inner: Arc<Inner>,
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
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) key_hasher: RandomState,
    pub(crate) write_sync: WriteOptions,
    pub(crate) write_buffered: WriteOptions,
    pub(crate) prune_lock: Mutex<()>,
    pub(crate) replay_lock: Mutex<()>,
    _lock: File,
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

/// Maps a RocksDB error: damaged data is [`Error::Corruption`], anything
/// else [`Error::Storage`].
pub(crate) fn storage(op: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
    move |e| match e.kind() {
        rocksdb::ErrorKind::Corruption => Error::Corruption {
            location: format!("database ({op})"),
            reason: e.into_string(),
        },
        _ => Error::Storage {
            op,
            source: Box::new(e),
        },
    }
}

impl Store {
    /// Opens the store at `path` with default options, creating it if the
    /// path does not exist or is an empty directory.
    ///
    /// Fails with [`Error::NotAStore`] for a non-empty directory without an
    /// `OUTBOXKV` file, [`Error::UnsupportedFormat`] for a newer format and
    /// [`Error::Locked`] when another `Store` has it open, and
    /// [`Error::Corruption`] for a database folder with data files but no
    /// `CURRENT` file; in each case nothing is written. It also fails with
    /// [`Error::Corruption`] when RocksDB's files are damaged, including when
    /// the oldest outbox entries are missing although they were never pruned
    /// (table files lost, say with the end of a MANIFEST).
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        StoreOptions::default().open(path)
    }

    /// Options for [`StoreOptions::open`].
    pub fn options() -> StoreOptions {
        StoreOptions::default()
    }

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
    /// Fails with [`Error::Poisoned`] on a poisoned store, and poisons the
    /// store when a flush fails (the files' state is then unknown).
    pub fn flush(&self) -> Result<()> {
        let inner = &self.inner;
        inner.pipeline.check_poisoned()?;
        inner.db.flush_wal(true).map_err(|e| {
            inner
                .pipeline
                .poison(format!("write-ahead log fsync failed: {e}"))
        })?;
        for cf in [CF_TABLES, CF_OUTBOX, CF_META, CF_DEAD] {
            inner
                .db
                .flush_cf(inner.cf(cf)?)
                .map_err(|e| inner.pipeline.poison(format!("memtable flush failed: {e}")))?;
        }
        Ok(())
    }
}

impl StoreOptions {
    /// Opens (or creates) the store at `path` with these options.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        open(path.as_ref(), self)
    }
}

fn not_a_store(path: &Path, reason: impl Into<String>) -> Error {
    Error::NotAStore {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

pub(crate) fn read_meta(path: &Path) -> Result<Option<StoreMeta>> {
    let file = path.join(META_FILE);
    let bytes = match fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", file, e)),
    };
    match StoreMeta::decode(&bytes) {
        Ok(m) => Ok(Some(m)),
        Err(MetaError::Version(found)) if found > FORMAT_VERSION => Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        }),
        Err(e @ (MetaError::BadMagic | MetaError::Version(_))) => {
            Err(not_a_store(path, e.to_string()))
        }
        Err(e) => Err(Error::corruption(file.display().to_string(), e.to_string())),
    }
}

pub(crate) fn write_meta(path: &Path, meta: &StoreMeta) -> Result<()> {
    write_file_atomic(&path.join(META_FILE), &meta.encode())
}

/// Replaces `file` with `bytes` so that a reader (or a crash) sees the old
/// or the new content, never a mix: a temporary file written and fsynced,
/// renamed over `file`, then the directory fsynced.
pub(crate) fn write_file_atomic(file: &Path, bytes: &[u8]) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut tmp_name = file.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    fs::rename(&tmp, file).map_err(|e| Error::io("rename", file, e))?;
    sync_dir(dir)
}

/// Fsyncs the directory `dir`, so the files created or renamed in it are
/// durable under their names.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

fn is_empty_dir(path: &Path) -> Result<bool> {
    let entries = fs::read_dir(path).map_err(|e| Error::io("list", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", path, e))?;
        // A LOCK file alone is left by a creation that stopped half-way.
        if entry.file_name() != LOCK_FILE {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(crate) fn lock(path: &Path) -> Result<File> {
    let lock_path = path.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("open lock file", &lock_path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
            lock: lock_path,
        }),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", lock_path, e)),
    }
}

pub(crate) fn rocksdb_options(
    opts: &StoreOptions,
) -> (rocksdb::Options, Vec<ColumnFamilyDescriptor>) {
    let mut db = rocksdb::Options::default();
    db.create_if_missing(true);
    db.create_missing_column_families(true);
    db.set_wal_recovery_mode(match opts.wal_recovery {
        WalRecovery::PointInTime => DBRecoveryMode::PointInTime,
        WalRecovery::AbsoluteConsistency => DBRecoveryMode::AbsoluteConsistency,
        _ => DBRecoveryMode::TolerateCorruptedTailRecords,
    });
    db.set_max_background_jobs(2);
    db.set_keep_log_file_num(3);
    db.set_max_log_file_size(4 << 20);
    // A WAL file is deleted only when every column family has flushed what
    // it holds, and `meta` / `dead_letters` are written rarely: without a cap
    // the WAL grew toward RocksDB's default limit (4 x all write buffers,
    // ~2 GiB here) before the quiet families were flushed. Measured: 400 MiB
    // on disk after 3 s of 1 KiB commits, against 31 MiB for raw RocksDB.
    db.set_max_total_wal_size(128 << 20);

    let cache = Cache::new_lru_cache(opts.block_cache_bytes);
    let mut table_opts = BlockBasedOptions::default();
    table_opts.set_block_cache(&cache);
    table_opts.set_bloom_filter(10.0, false);
    table_opts.set_cache_index_and_filter_blocks(true);

    let mut tables = rocksdb::Options::default();
    tables.set_block_based_table_factory(&table_opts);
    tables.set_compression_type(DBCompressionType::Lz4);
    tables.set_bottommost_compression_type(DBCompressionType::Zstd);

    let mut outbox = rocksdb::Options::default();
    outbox.set_block_based_table_factory(&table_opts);
    outbox.set_compression_type(DBCompressionType::Lz4);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_TABLES, tables),
        ColumnFamilyDescriptor::new(CF_OUTBOX, outbox),
        ColumnFamilyDescriptor::new(CF_META, rocksdb::Options::default()),
        ColumnFamilyDescriptor::new(CF_DEAD, rocksdb::Options::default()),
    ];
    (db, cfs)
}

fn open(path: &Path, opts: StoreOptions) -> Result<Store> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(not_a_store(path, "it is not a directory")),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if !opts.create_if_missing {
                return Err(not_a_store(
                    path,
                    "it does not exist (create_if_missing is off)",
                ));
            }
            fs::create_dir_all(path).map_err(|e| Error::io("create directory", path, e))?;
        }
        Err(e) => return Err(Error::io("stat", path, e)),
    }

    // Everything that can reject the directory runs before anything is written.
    let existing = read_meta(path)?;
    if existing.is_none() {
        if !is_empty_dir(path)? {
            return Err(not_a_store(
                path,
                format!("the directory is not empty and has no {META_FILE} file"),
            ));
        }
        if !opts.create_if_missing {
            return Err(not_a_store(
                path,
                format!("it has no {META_FILE} file (create_if_missing is off)"),
            ));
        }
    }
    let lock_file = lock(path)?;
    // Re-read under the lock: another process may have created the store meanwhile.
    let meta = match read_meta(path)? {
        Some(m) => m,
        None => {
            let m = new_meta(path)?;
            write_meta(path, &m)?;
            m
        }
    };

    let db_path = path.join(DB_DIR);
    if existing.is_some() {
        check_current(&db_path)?;
    }
    let (db_opts, cfs) = rocksdb_options(&opts);
    let db = DB::open_cf_descriptors(&db_opts, &db_path, cfs).map_err(storage("open database"))?;

    let recovered = recover(&db, path, &meta)?;
    let mut write_sync = WriteOptions::default();
    write_sync.set_sync(true);
    let mut write_buffered = WriteOptions::default();
    write_buffered.set_sync(false);

    tracing::debug!(
        path = %path.display(),
        store_id = %meta.store_id,
        head = recovered.next_seq - 1,
        tail = recovered.first_seq,
        "opened outboxkv store"
    );
    let inner = Inner {
        db,
        path: path.to_path_buf(),
        meta,
        pipeline: Pipeline::new(
            recovered.next_seq,
            recovered.first_seq,
            Limits {
                max_age: opts.max_transaction_age,
                max_records: opts.max_conflict_index_keys,
            },
        ),
        notifier: Notifier::new(recovered.next_seq - 1),
        opts,
        key_hasher: RandomState::new(),
        write_sync,
        write_buffered,
        prune_lock: Mutex::new(()),
        replay_lock: Mutex::new(()),
        _lock: lock_file,
    };
    let store = Store {
        inner: Arc::new(inner),
    };
    if let Some(every) = store.inner.opts.relay_cursor_poll {
        crate::outbox::handoff::watch_relay_cursor(&store, every)?;
    }
    Ok(store)
}

/// Refuses a database folder that holds data files but no `CURRENT` file:
/// RocksDB (`create_if_missing`) would start a new, empty database there and
/// delete the old files as obsolete. A folder with no data files is an
/// interrupted creation and may be created again.
fn check_current(db_path: &Path) -> Result<()> {
    if db_path.join("CURRENT").exists() {
        return Ok(());
    }
    let entries = match fs::read_dir(db_path) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list directory", db_path, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list directory", db_path, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".sst") || name.ends_with(".log") {
            return Err(Error::corruption(
                db_path.display().to_string(),
                format!(
                    "the database has data files ({name}, ...) but no CURRENT file; \
                     refusing to create a new database over them"
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) struct Recovered {
    pub(crate) next_seq: u64,
    pub(crate) first_seq: u64,
    /// Seq the store recorded as pruned through (0: never pruned).
    pub(crate) pruned_through: u64,
    /// Oldest entry present above `pruned_through`, if any.
    pub(crate) oldest: Option<u64>,
}

pub(crate) fn decode_seq(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        Error::corruption(
            "outbox",
            format!("outbox key is {} bytes, expected 8", key.len()),
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// The column family `name` of `db`, the database of the store at `path`.
pub(crate) fn column_family<'a>(db: &'a DB, path: &Path, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| {
        Error::corruption(
            format!("database {}", path.display()),
            format!("column family {name:?} is missing"),
        )
    })
}

/// A new identity, in this build's format, for a store created at `path`.
pub(crate) fn new_meta(path: &Path) -> Result<StoreMeta> {
    Ok(StoreMeta {
        format_version: FORMAT_VERSION,
        store_id: StoreId::random().map_err(|e| Error::io("generate store id", path, e))?,
    })
}

/// Records `id` as the store id of `db` (the store at `path`), fsynced; it
/// must match the store's `OUTBOXKV` file when the store opens.
pub(crate) fn write_store_id(db: &DB, path: &Path, id: StoreId) -> Result<()> {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    db.put_cf_opt(column_family(db, path, CF_META)?, META_STORE_ID, id.0, &w)
        .map_err(storage("write store id"))
}

/// Finds where the outbox stands and checks the database belongs to `meta`.
fn recover(db: &DB, path: &Path, meta: &StoreMeta) -> Result<Recovered> {
    let cf_meta = column_family(db, path, CF_META)?;
    match db
        .get_cf(cf_meta, META_STORE_ID)
        .map_err(storage("read store id"))?
    {
        Some(id) if id == meta.store_id.0 => {}
        Some(id) => {
            return Err(Error::corruption(
                path.display().to_string(),
                format!(
                    "database belongs to store {:02x?}, but {META_FILE} says {}",
                    id, meta.store_id
                ),
            ));
        }
        None => write_store_id(db, path, meta.store_id)?,
    }
    let bounds = outbox_bounds(db, path)?;
    // Pruning deletes entries and records how far it went in one write, so
    // every seq above `pruned_through` is present. Entries missing at the
    // old end mean table files were lost (say, a MANIFEST that lost its
    // tail, or a store copied while it was written): opening would hide
    // them as "pruned", and the tables lost with them, so refuse.
    if let Some(oldest) = bounds.oldest
        && oldest > bounds.pruned_through + 1
    {
        return Err(Error::corruption(
            format!("outbox seq {}", bounds.pruned_through + 1),
            format!(
                "entries {}..={} are missing but were never pruned (pruned through {}); \
                 database files were lost or damaged",
                bounds.pruned_through + 1,
                oldest - 1,
                bounds.pruned_through
            ),
        ));
    }
    Ok(bounds)
}

/// Where the outbox stands in `db`: the next seq to assign and the first
/// seq not pruned. Shared by opening a store and by read-only views of it.
pub(crate) fn outbox_bounds(db: &DB, path: &Path) -> Result<Recovered> {
    let cf_meta = column_family(db, path, CF_META)?;
    let pruned = match db
        .get_cf(cf_meta, META_PRUNED_THROUGH)
        .map_err(storage("read outbox state"))?
    {
        Some(v) => decode_seq(&v)?,
        None => 0,
    };
    let cf_outbox = column_family(db, path, CF_OUTBOX)?;
    let mut it = db.raw_iterator_cf(cf_outbox);
    it.seek_to_last();
    let last = match it.key() {
        Some(k) => decode_seq(k)?,
        None => {
            it.status().map_err(storage("scan outbox"))?;
            0
        }
    };
    // Seqs read from disk are checked before any arithmetic: a damaged
    // `u64::MAX` must be reported, not wrap around.
    for (what, seq) in [
        ("last outbox entry", last),
        ("outbox.pruned_through", pruned),
    ] {
        if seq > MAX_SEQ {
            return Err(Error::corruption(
                format!("database {} ({what})", path.display()),
                format!("seq {seq} is beyond the highest seq a store assigns ({MAX_SEQ})"),
            ));
        }
    }
    it.seek((pruned + 1).to_be_bytes());
    let oldest = match it.key() {
        Some(k) => Some(decode_seq(k)?),
        None => {
            it.status().map_err(storage("scan outbox"))?;
            None
        }
    };
    let next_seq = last.max(pruned) + 1;
    let first = oldest.unwrap_or(next_seq);
    Ok(Recovered {
        next_seq,
        first_seq: first.max(pruned + 1).min(next_seq),
        pruned_through: pruned,
        oldest,
    })
}

#[cfg(feature = "failpoints")]
impl Store {
    /// Fault injection for tests (feature `failpoints`, not for production):
    /// the write-ahead-log fsyncs of `Sync` commit groups after the next `n`
    /// fail, as an fsync error from the disk would. Only the pipelined fsync
    /// ([`StoreOptions::pipelined_fsync`](crate::StoreOptions::pipelined_fsync),
    /// the default) goes through this point.
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
        self.inner
            .pipeline
            .fsyncs_before_failure
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// Fault injection for tests (feature `failpoints`, not for production):
    /// the commit-group writes to RocksDB after the next `n` fail, as a
    /// write error (a full disk) would, each 2 ms late (as from a stalled
    /// disk, so that commits queue up behind it).
    pub fn fail_writes_after(&self, n: u64) {
        self.inner
            .pipeline
            .writes_before_failure
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// Slow-disk simulation for tests and benchmarks (feature `failpoints`,
    /// not for production): every write-ahead-log fsync of a `Sync` commit
    /// group first sleeps `delay` (on top of the real fsync), as a disk with
    /// slower syncs would. `Duration::ZERO` turns it off. Like
    /// [`fail_fsyncs_after`](Store::fail_fsyncs_after), only the pipelined
    /// fsync goes through this point.
    pub fn delay_fsyncs(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.inner
            .pipeline
            .fsync_delay_micros
            .store(micros, std::sync::atomic::Ordering::Release);
    }
}
