//! Online copies of a store: [`Store::checkpoint`].

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use rocksdb::DB;
use rocksdb::checkpoint::Checkpoint;

use super::engine::file::{DB_DIR, write_meta};
use super::engine::{rocksdb_options, storage};
use super::handle::Store;
use super::open::{new_meta, write_store_id};
use crate::error::{Error, Result};
use crate::outbox::entry::StoreId;

impl Store {
    /// Writes a consistent copy of the store to `dest` while the store stays
    /// open and writable, and returns the copy's identity.
    ///
    /// The copy holds whole commits only: every commit acknowledged before
    /// the call, and possibly some that were in flight (a `Sync` commit
    /// whose fsync then fails can be in the copy). Table files are
    /// hard-linked where the file system allows it, so a copy of a large
    /// store is fast and small until the two diverge. Open it with
    /// [`Store::open`] like any store; the relay's sidecar files
    /// (`relay/`) are not copied.
    ///
    /// **The copy gets a new identity.** Its outbox entries keep the event
    /// ids they were committed with, so a broker deduplicates any that are
    /// shipped again, but events committed in the copy get ids of the new
    /// identity. A store restored from an older copy therefore never hands
    /// out an event id the original may already have shipped for another
    /// event (which a deduplicating broker would drop).
    ///
    /// `dest` must not exist; it is created. If this fails part-way, `dest`
    /// may hold a partial copy that [`Store::open`] refuses (no `OUTBOXKV`
    /// file or a database that does not match it): delete it and try again.
    ///
    /// ```
    /// use outboxkv::{Event, Store, Table};
    /// const COUNTS: Table<str, u64> = Table::new("counts");
    /// # let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path().join("live"))?;
    /// store.write(|tx| {
    ///     tx.put(&COUNTS, "a", &1)?;
    ///     tx.emit(Event::bytes("count.changed", "a", vec![1]))
    /// })?;
    /// let id = store.checkpoint(dir.path().join("backup"))?;
    ///
    /// let copy = Store::open(dir.path().join("backup"))?;
    /// assert_eq!(copy.id(), id);
    /// assert_ne!(copy.id(), store.id());
    /// assert_eq!(copy.get(&COUNTS, "a")?, Some(1));
    /// assert_eq!(copy.outbox().head(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn checkpoint(&self, dest: impl AsRef<Path>) -> Result<StoreId> {
        let dest = dest.as_ref();
        match fs::symlink_metadata(dest) {
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint destination {} already exists",
                    dest.display()
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", dest, e)),
        }
        fs::create_dir_all(dest).map_err(|e| Error::io("create directory", dest, e))?;
        let db_path = dest.join(DB_DIR);
        Checkpoint::new(&self.inner.db)
            .and_then(|c| c.create_checkpoint(&db_path))
            .map_err(storage("create checkpoint"))?;

        let meta = new_meta(dest)?;
        {
            let (mut opts, cfs) = rocksdb_options(&self.inner.opts);
            opts.create_if_missing(false);
            let db = DB::open_cf_descriptors(&opts, &db_path, cfs)
                .map_err(storage("open checkpoint"))?;
            write_store_id(&db, dest, meta.store_id)?;
        }
        // Last: until this file exists, the copy is not a store.
        write_meta(dest, &meta)?;
        Ok(meta.store_id)
    }
}
