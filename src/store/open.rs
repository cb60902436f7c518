//! Opening a store: directory checks, identity, locking, RocksDB set-up
//! and recovery of where the outbox stands.
//!
//! Everything that can reject a folder runs before anything is written to
//! it. The directory and column-family layouts are in `docs/design.md`
//! and defined in [`super::engine`]. The write-ahead log is recovered in
//! RocksDB's `TolerateCorruptedTailRecords` mode by default (see
//! [`WalRecovery`](crate::WalRecovery)): after a crash the database holds
//! every acknowledged commit and never a torn batch; damage in the middle of
//! the log fails the open.

use std::collections::hash_map::RandomState;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rocksdb::{DB, WriteOptions};

use super::commit::Pipeline;
use super::conflict::Limits;
use super::engine::file::{
    DB_DIR, check_current, is_empty_dir, not_a_store, read_meta, write_meta,
};
use super::engine::lock::lock;
use super::engine::medium::Medium;
use super::engine::scan::{Bounds, outbox_bounds};
use super::engine::{CF_META, META_STORE_ID, column_family, rocksdb_options, storage};
use super::handle::{Handle, Inner, Store};
use super::meta::{FORMAT_VERSION, META_FILE, StoreMeta};
use super::notify::Notifier;
use super::options::StoreOptions;
use crate::error::{Error, Result};
use crate::invariant::invariant;
use crate::outbox::entry::StoreId;

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
}

impl StoreOptions {
    /// Opens (or creates) the store at `path` with these options.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        open(path.as_ref(), self)
    }
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
        tail = recovered.tail,
        "opened outboxkv store"
    );
    let inner = Inner {
        db,
        path: path.to_path_buf(),
        meta,
        pipeline: Pipeline::new(
            recovered.next_seq,
            recovered.tail,
            Limits {
                max_age: opts.max_transaction_age,
                max_records: opts.max_conflict_index_keys,
            },
        ),
        medium: Medium::new(),
        notifier: Notifier::new(recovered.next_seq - 1),
        opts,
        key_hasher: RandomState::new(),
        write_sync,
        write_buffered,
        prune_lock: Mutex::new(()),
        replay_lock: Mutex::new(()),
        _owner_lock: lock_file,
    };
    let store = Store {
        inner: Arc::new(Handle::new(inner)),
    };
    if let Some(every) = store.inner.opts.relay_cursor_poll {
        super::handoff::watch_relay_cursor(&store, every)?;
    }
    Ok(store)
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
fn recover(db: &DB, path: &Path, meta: &StoreMeta) -> Result<Bounds> {
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
    // INV-TAIL: established here, kept by every prune.
    invariant!(
        bounds.tail == bounds.pruned_through + 1,
        "INV-TAIL: recovered tail {} is not pruned-through {} + 1",
        bounds.tail,
        bounds.pruned_through
    );
    Ok(bounds)
}
