//! The store: opening, typed tables, codecs, reads and transactions.
//!
//! The codecs ([`key`], [`value`], [`meta`]) compile without RocksDB so that
//! the fuzz crate can exercise them without building the engine.

pub mod key;
pub mod meta;
pub mod options;
pub mod table;
pub mod value;

#[cfg(feature = "rocksdb")]
mod checkpoint;
#[cfg(feature = "rocksdb")]
mod commit;
#[cfg(feature = "rocksdb")]
mod conflict;
#[cfg(feature = "rocksdb")]
pub(crate) mod open;
#[cfg(feature = "rocksdb")]
mod read;
#[cfg(feature = "rocksdb")]
pub(crate) mod reader;
#[cfg(feature = "rocksdb")]
mod tx;

#[cfg(feature = "rocksdb")]
pub use open::Store;
#[cfg(feature = "rocksdb")]
pub(crate) use open::{CF_DEAD, CF_META, CF_OUTBOX};
#[cfg(feature = "rocksdb")]
pub use read::{Range, Snapshot};
#[cfg(feature = "rocksdb")]
pub use reader::StoreReader;
#[cfg(feature = "rocksdb")]
pub use tx::{Batch, Committed, TransactionStats, WriteTx};
