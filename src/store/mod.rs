//! The store: the engine a service embeds.
//!
//! Read it bottom-up; each layer calls only the ones below it:
//!
//! 1. formats and definitions, without RocksDB: [`key`] (the
//!    order-preserving key encoding), [`value`] (the value frame),
//!    [`meta`] (the `OUTBOXKV` file), [`table`], [`options`];
//! 2. the engine layer, [`engine`]: column families, `meta` keys, seq keys,
//!    raw scans, the store's files and locks, and the medium every write
//!    goes through;
//! 3. the store core: [`handle`] (`Store`), [`open`] (opening and recovery),
//!    [`commit`] (the commit pipeline) with [`conflict`] (the conflict
//!    index), [`tx`] (transactions and batches), [`future`] (async
//!    commits), [`read`] (reads and
//!    snapshots), [`prune`], [`notify`] (head notifications), [`handoff`]
//!    (the sidecar-cursor watcher), [`checkpoint`];
//! 4. views on top of it: [`outbox`] (`Outbox`, `DeadLetters`) and
//!    [`reader`] (`StoreReader`, read-only from another process).
//!
//! The outbox's record formats live below all of this, in `crate::outbox`.
//! Every public type is re-exported at the crate root, its one public path.

pub(crate) mod key;
pub(crate) mod meta;
pub(crate) mod options;
pub(crate) mod table;
pub(crate) mod value;

#[cfg(feature = "rocksdb")]
pub(crate) mod engine;

#[cfg(feature = "rocksdb")]
mod checkpoint;
#[cfg(feature = "rocksdb")]
mod commit;
#[cfg(feature = "rocksdb")]
mod conflict;
#[cfg(feature = "rocksdb")]
mod future;
#[cfg(feature = "rocksdb")]
mod handle;
#[cfg(feature = "rocksdb")]
mod handoff;
#[cfg(feature = "rocksdb")]
mod notify;
#[cfg(feature = "rocksdb")]
mod open;
#[cfg(feature = "rocksdb")]
mod outbox;
#[cfg(feature = "rocksdb")]
mod prune;
#[cfg(feature = "rocksdb")]
mod read;
#[cfg(feature = "rocksdb")]
mod reader;
#[cfg(feature = "rocksdb")]
mod tx;

#[cfg(feature = "rocksdb")]
pub(crate) use options::Durability;

#[cfg(feature = "rocksdb")]
pub use future::CommitFuture;
#[cfg(feature = "rocksdb")]
pub use handle::Store;
#[cfg(feature = "rocksdb")]
pub(crate) use handle::WeakStore;
#[cfg(feature = "rocksdb")]
pub use notify::HeadChanged;
#[cfg(feature = "rocksdb")]
pub use outbox::{DeadLetters, Outbox};
#[cfg(feature = "rocksdb")]
pub use read::{Range, Snapshot};
#[cfg(feature = "rocksdb")]
pub use reader::StoreReader;
#[cfg(feature = "rocksdb")]
pub use tx::{Batch, Committed, TransactionStats, WriteTx};
