//! A read-only view of a store that another process has open: the outbox,
//! the dead letters and the identity, through a RocksDB secondary instance.

use std::fs;
use std::path::{Path, PathBuf};

use rocksdb::DB;

use super::engine::file::{DB_DIR, check_store, sync_dir};
use super::engine::scan::{self, outbox_bounds};
use super::engine::{ALL_CFS, CF_DEAD, CF_OUTBOX, column_family, storage};
use super::meta::StoreMeta;
use crate::error::{Error, Result};
use crate::outbox::dead::DeadLetter;
use crate::outbox::entry::{OutboxEntry, StoreId};

/// A read-only, catch-up view of a store, safe to use while the owning
/// service has the store open (a RocksDB secondary instance).
///
/// It sees what the primary had written when it was opened or last caught
/// up ([`catch_up`](StoreReader::catch_up)); it never writes to the store's
/// files. Its own small state (RocksDB's info log) goes to a folder of the
/// caller's choosing.
///
/// ```
/// use outboxkv::{Event, Store};
/// use outboxkv::StoreReader;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("s"))?;
/// store.write(|tx| tx.emit(Event::bytes("t", "k", b"x".to_vec())))?;
///
/// let scratch = tempfile::tempdir()?;
/// let reader = StoreReader::open(dir.path().join("s"), scratch.path())?;
/// assert_eq!(reader.head()?, 1);
/// store.write(|tx| tx.emit(Event::bytes("t", "k", b"y".to_vec())))?;
/// reader.catch_up()?;
/// assert_eq!(reader.read(1, 10)?.len(), 2);
/// # Ok(()) }
/// ```
pub struct StoreReader {
    db: DB,
    path: PathBuf,
    meta: StoreMeta,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("path", &self.path)
            .field("store_id", &self.meta.store_id)
            .finish_non_exhaustive()
    }
}

impl StoreReader {
    /// Opens the store at `path` read-only. `scratch` is a folder for the
    /// secondary instance's own files (created if missing).
    ///
    /// Fails with [`Error::NotAStore`] (a missing path, a folder that is not
    /// a store) or [`Error::UnsupportedFormat`] before touching anything.
    pub fn open(path: impl AsRef<Path>, scratch: impl AsRef<Path>) -> Result<StoreReader> {
        let path = path.as_ref();
        let scratch = scratch.as_ref();
        let meta = check_store(path)?;
        fs::create_dir_all(scratch).map_err(|e| Error::io("create directory", scratch, e))?;
        let mut opts = rocksdb::Options::default();
        // Keep every file open: a secondary must not lose files the primary
        // deletes while it reads them.
        opts.set_max_open_files(-1);
        // Every catch-up loads the table handlers of what changed with this
        // many threads per column family, created and ended each time:
        // with RocksDB's default (16) an idle catch-up took ~5 ms, all of it
        // thread start-up. Table files are opened once each anyway.
        opts.set_max_file_opening_threads(1);
        let db =
            DB::open_cf_as_secondary(&opts, &path.join(DB_DIR), &scratch.to_path_buf(), ALL_CFS)
                .map_err(storage("open database as secondary"))?;
        Ok(StoreReader {
            db,
            path: path.to_path_buf(),
            meta,
        })
    }

    /// Catches up with what the owning process has written since.
    pub fn catch_up(&self) -> Result<()> {
        self.db
            .try_catch_up_with_primary()
            .map_err(storage("catch up with primary"))
    }

    /// The store's identity.
    pub fn id(&self) -> StoreId {
        self.meta.store_id
    }

    /// The store's on-disk format version.
    pub fn format_version(&self) -> u32 {
        self.meta.format_version
    }

    /// The store's folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        column_family(&self.db, &self.path, name)
    }

    /// The last committed seq (0 when nothing was ever committed).
    pub fn head(&self) -> Result<u64> {
        Ok(outbox_bounds(&self.db, &self.path)?.next_seq - 1)
    }

    /// The first seq not yet pruned by the owning store.
    pub fn tail(&self) -> Result<u64> {
        Ok(outbox_bounds(&self.db, &self.path)?.tail)
    }

    /// Up to `max_entries` entries from seq `from` on.
    pub fn read(&self, from: u64, max_entries: usize) -> Result<Vec<OutboxEntry>> {
        self.read_limited(from, max_entries, usize::MAX)
    }

    /// Like [`read`](StoreReader::read), stopping after about `max_bytes`.
    pub fn read_limited(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEntry>> {
        self.read_through(from, u64::MAX, max_entries, max_bytes)
    }

    /// Like [`read_limited`](StoreReader::read_limited), but no entry above
    /// seq `through`.
    pub(crate) fn read_through(
        &self,
        from: u64,
        through: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let bounds = outbox_bounds(&self.db, &self.path)?;
        let tail = bounds.tail;
        scan::read_entries(
            &self.db,
            self.cf(CF_OUTBOX)?,
            scan::Window {
                from,
                tail,
                head: (bounds.next_seq - 1).min(through),
            },
            max_entries,
            max_bytes,
            || tail,
        )
    }

    /// Makes what this reader has read durable: fsyncs the owner's
    /// write-ahead log files and the database folder.
    ///
    /// A reader sees the owner's writes as the operating system has them,
    /// which includes writes not fsynced yet: `Durability::Buffered`
    /// commits, and `Sync` commits whose fsync is still running. Whatever it
    /// read before this call returned `Ok` survives a power loss. A relay in
    /// another process calls it before it ships what it read
    /// ([`SidecarSource`](crate::relay::SidecarSource) does).
    ///
    /// A log file the owner deletes meanwhile is skipped: RocksDB deletes a
    /// log only after its contents are in fsynced table files.
    pub fn sync_wal(&self) -> Result<()> {
        let dir = self.path.join(DB_DIR);
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("list directory", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list directory", &dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "log") {
                continue;
            }
            match fs::File::open(&path) {
                Ok(f) => f
                    .sync_data()
                    .map_err(|e| Error::io("fsync write-ahead log", &path, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("open write-ahead log", &path, e)),
            }
        }
        // A log file the owner created is durable only with its folder entry.
        sync_dir(&dir)
    }

    /// Up to `limit` dead letters with seq `>= from`.
    pub fn dead_letters(&self, from: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        scan::list_dead(&self.db, self.cf(CF_DEAD)?, from, limit)
    }

    /// Number of dead letters.
    pub fn dead_letter_count(&self) -> Result<u64> {
        scan::count_keys(&self.db, self.cf(CF_DEAD)?)
    }
}
