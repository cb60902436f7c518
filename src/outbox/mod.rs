//! The outbox: entries, event ids, events, and the API the relay reads with.
//!
//! The entry codec ([`entry`]) and [`event`] builder compile without RocksDB.

pub mod cursor;
pub mod dead;
pub mod entry;
pub mod event;
#[cfg(feature = "rocksdb")]
pub(crate) mod notify;

#[cfg(feature = "rocksdb")]
pub(crate) mod api;
#[cfg(feature = "rocksdb")]
pub mod handoff;

#[cfg(feature = "rocksdb")]
pub use api::{DeadLetters, Outbox};
#[cfg(feature = "rocksdb")]
pub use notify::HeadChanged;
