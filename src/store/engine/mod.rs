//! The engine layer: everything that knows how the store sits in RocksDB
//! and on the file system, and nothing about commits.
//!
//! - this module: the column families, the `meta` keys, the seq keys and
//!   the RocksDB options every store is opened with;
//! - [`file`]: the store's own files (`OUTBOXKV`, atomic replacement,
//!   directory fsyncs);
//! - [`lock`]: the `LOCK` files that keep one owner per store and one relay
//!   per store;
//! - [`scan`]: raw reads of the outbox and dead-letter families, shared by
//!   the owning [`Store`](crate::Store) and the read-only
//!   [`StoreReader`](crate::StoreReader);
//! - [`medium`]: the seam every write and write-ahead-log fsync of the store
//!   core goes through (and where the `failpoints` feature injects faults).
//!
//! The layouts are described in `docs/design.md` ("Column families");
//! this module is where they are defined. It calls down only: into the
//! record formats (`crate::outbox`, `super::meta`) and RocksDB.

pub(crate) mod file;
pub(crate) mod lock;
pub(crate) mod medium;
pub(crate) mod scan;

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    DBRecoveryMode,
};

use super::options::{StoreOptions, WalRecovery};
use crate::error::{Error, Result};

/// Every typed table, keys prefixed by `table name + 0x00`.
pub(crate) const CF_TABLES: &str = "tables";
/// `seq` ([`seq_key`]) → outbox entry (`crate::outbox::entry`).
pub(crate) const CF_OUTBOX: &str = "outbox";
/// The store's own records ([`META_STORE_ID`], [`META_PRUNED_THROUGH`]).
pub(crate) const CF_META: &str = "meta";
/// Original seq ([`seq_key`]) → dead letter (`crate::outbox::dead`).
pub(crate) const CF_DEAD: &str = "dead_letters";
/// Every column family, in the order they are opened.
pub(crate) const ALL_CFS: [&str; 4] = [CF_TABLES, CF_OUTBOX, CF_META, CF_DEAD];

/// `meta` key: the 16-byte store id, cross-checked with `OUTBOXKV`.
pub(crate) const META_STORE_ID: &[u8] = b"store_id";
/// `meta` key: the seq the outbox is pruned through ([`seq_key`] bytes), so
/// seqs continue after everything was pruned.
pub(crate) const META_PRUNED_THROUGH: &[u8] = b"outbox.pruned_through";

/// The key of outbox (and dead-letter) seq `seq`: 8 bytes big-endian, so
/// RocksDB's byte order is seq order.
pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Reads a seq key ([`seq_key`]); a key of another length is damage.
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

/// The RocksDB options and column families a store is opened (and
/// checkpointed) with.
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
    // Left at RocksDB's default, `avoid_flush_during_recovery = false`
    // (the crate has no setter): an open replays the log into memtables and
    // writes them to fsynced table files before it returns, so everything
    // recovered is on disk, which `Pipeline::new` counts on (the durable
    // head starts at the head). Pinned by a test that reads the OPTIONS
    // file RocksDB writes.

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
