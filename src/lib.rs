//! # outboxkv
//!
//! An embedded storage engine for microservices: typed key-value tables on
//! RocksDB plus a transactional **outbox**. A service changes its state and
//! appends the events that describe the change in one atomic commit, so
//! state and events can never disagree; a relay then ships the outbox to a
//! broker.
//!
//! ```
//! use outboxkv::{Durability, Event, Store, Table};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq)]
//! enum Status { #[default] New, Paid }
//!
//! #[derive(Serialize, Deserialize, Default, Debug, Clone)]
//! struct Order { status: Status, total_cents: u64 }
//!
//! #[derive(Serialize)]
//! struct OrderPaid { id: u64 }
//!
//! const ORDERS: Table<u64, Order> = Table::new("orders");
//!
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("orders");
//! let store = Store::open(&path)?; // or Store::options().durability(Durability::Buffered).open(&path)
//! let committed = store.write(|tx| {
//!     let mut order = tx.get_for_update(&ORDERS, &42)?.unwrap_or_default();
//!     order.status = Status::Paid;
//!     tx.put(&ORDERS, &42, &order)?;
//!     tx.emit(Event::json("orders.paid", "order-42", &OrderPaid { id: 42 })?)?;
//!     Ok(())
//! })?; // one atomic commit
//! assert_eq!(committed.seqs, 1..2);
//!
//! let order: Option<Order> = store.get(&ORDERS, &42)?;
//! assert_eq!(order.unwrap().status, Status::Paid);
//! for row in store.range(&ORDERS, 10..20)? {
//!     let (id, order) = row?;
//!     println!("{id}: {order:?}");
//! }
//! let events = store.outbox().read(1, 100)?;
//! assert_eq!(events[0].event_type, "orders.paid");
//! assert_eq!(events[0].payload, br#"{"id":42}"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! In async code, [`Store::write_async`] (and [`WriteTx::commit_async`],
//! [`Batch::commit_async`]) commit the same way, with the wait for the disk
//! as a [`CommitFuture`] that blocks no runtime thread.
//!
//! ## Guarantees
//!
//! - **Atomicity**: a commit's table writes and outbox events are one RocksDB
//!   write batch: after any crash, all of it is there or none of it.
//! - **Serializable read-modify-write**: keys read with
//!   [`WriteTx::get_for_update`] are validated at commit; a concurrent change
//!   makes the commit fail with [`Error::Conflict`], and [`Store::write`]
//!   re-runs the closure.
//! - **Gap-free outbox order**: seqs are assigned in commit order, without
//!   gaps, and become visible in that order, including across restarts.
//! - **Durability**: [`Durability::Sync`] (default) fsyncs before returning,
//!   sharing one fsync among concurrent committers; [`Durability::Buffered`]
//!   survives a process crash but not a power loss. The relay ships only
//!   events that are on disk (it fsyncs first when needed), so a power loss
//!   never leaves the broker with an event whose state is gone.
//!
//! ## Crate features
//!
//! - `relay`: the [`relay`] (on Tokio), its metrics, and the file and
//!   stdout [`sink`]s.
//! - `nats`: the NATS JetStream sink. `kafka`: the Apache Kafka sink.
//! - `config`: the relay configuration file (`outboxkv::config`). `cli`:
//!   the `outbox-relay` binary.
//! - `rocksdb` (default): the storage engine. Without it only the record
//!   formats and the [`Event`] builder are built; the fuzz crate uses that.
//! - `failpoints` (tests only): `Store::inject` and the named
//!   `Failpoint`s. `invariants`: checks the engine's invariants in release
//!   builds too.
//!
//! ## Layout
//!
//! Every public item has one path: the crate root for the store and the
//! outbox, `relay` for the shipping loop, `sink` for the brokers, `config`
//! for the relay's configuration file and [`redact`] for keeping secrets
//! out of logs. The
//! modules behind them call only down: the record formats (`outbox`, and
//! `store`'s key, value and meta codecs) at the bottom, then the engine
//! layer (`store::engine`: column families, scans, files, locks, the
//! storage medium), the store core (`store`: commit, prune, the
//! sidecar-cursor watcher), the views on it ([`Outbox`], [`StoreReader`]),
//! and the [`relay`] and [`sink`]s on top. `docs/design.md` describes the
//! on-disk formats and names the invariants the code checks.

#![deny(missing_docs)]
#![cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

#[cfg(any(feature = "nats", feature = "kafka"))]
pub mod broker;
#[cfg(feature = "config")]
pub mod config;
mod error;
pub mod inbox;
mod invariant;
mod outbox;
pub mod redact;
#[cfg(feature = "relay")]
pub mod relay;
#[cfg(feature = "relay")]
pub mod sink;
mod store;

pub use error::{BoxError, Error, Result, WriteOutcome};
pub use outbox::cursor::{CursorDead, CursorDecodeError, RelayCursor};
pub use outbox::dead::DeadLetter;
pub use outbox::entry::{EventId, OutboxEntry, ParseIdError, StoreId};
pub use outbox::event::Event;
pub use store::key::{Key, KeyDecodeError, KeyPrefix, KeyRange};
pub use store::options::{Durability, StoreOptions, WalRecovery};
pub use store::table::Table;

#[cfg(feature = "rocksdb")]
pub use store::{
    Batch, CommitFuture, Committed, DeadLetters, HeadChanged, Outbox, Range, Snapshot, Store,
    StoreReader, TransactionStats, WriteTx,
};

#[cfg(feature = "failpoints")]
pub use store::engine::medium::{Failpoint, Fault};

/// The record codecs, for the fuzz crate and the format tests: not a
/// stable API (hidden from the docs; the formats are described in
/// `docs/design.md`).
#[doc(hidden)]
pub mod codec {
    pub use crate::inbox::message::decode_cloudevent;
    pub use crate::outbox::cursor::{CURSOR_MAGIC, CURSOR_VERSION, MAX_DEAD};
    pub use crate::outbox::dead::{DeadLetterDecodeError, decode_dead_letter};
    pub use crate::outbox::entry::{EntryDecodeError, decode_entry};
    pub use crate::store::key::decode_exact;
    pub use crate::store::meta::{FORMAT_VERSION, META_FILE, MetaError, StoreMeta};
    pub use crate::store::value::{FrameError, decode_value, encode_value};
}
