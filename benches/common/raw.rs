//! The raw RocksDB side of the write-path benchmarks (`commit.rs`,
//! `commit_ratio.rs`): a database with the column families and compression
//! outboxkv's store uses, so that both sides write the same way.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, DBCompressionType, Options};

/// Opens (creating) a raw RocksDB at `path` with `tables`, `outbox` and
/// `meta` column families, LZ4-compressed, as outboxkv's store has.
pub fn open_raw(path: &Path) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cf = |n: &str| {
        let mut o = Options::default();
        o.set_compression_type(DBCompressionType::Lz4);
        ColumnFamilyDescriptor::new(n, o)
    };
    DB::open_cf_descriptors(&opts, path, [cf("tables"), cf("outbox"), cf("meta")])
}
