//! The consuming side: an **inbox** that applies broker messages with
//! exactly-once effect.
//!
//! A handler gets a write transaction and the message; its table writes,
//! the events it emits, and the consumer's position in the message's
//! partition commit in **one atomic, fsynced write**. The broker is
//! acknowledged only after that commit is durable. A message delivered
//! again (a crash between the commit and the acknowledgement, a
//! redelivery, a rebalance) finds its position done and is skipped: its
//! effect happens once.
//!
//! ```text
//! broker ──▶ reader (nats.rs / kafka.rs) ──▶ Inbox::apply ──▶ one commit:
//!                                              handler writes + emits
//!                                              + position (+ producer window)
//!            ◀── acknowledge after the commit is durable
//! ```
//!
//! [`Inbox::submit`] splits `apply` in two: it returns once the batch's
//! commit is ordered and visible, and [`Applying::durable`] waits for its
//! fsync. A reader can so handle and order the next batch while the last
//! one is fsynced, and acknowledge each once it is durable, oldest first
//! ([`nats::NatsReader`] keeps up to 4 commits in flight; the Kafka reader
//! still applies one batch at a time).
//!
//! # What is exactly-once, and what is not
//!
//! - Exactly once: the handler's writes and emits through its [`InboxTx`],
//!   **per store**. The handler itself may run more than once for one
//!   message (a conflict re-runs it; a crash before the commit runs it
//!   again after the restart): it should have no other side effects.
//! - Positions are kept per (consumer name, stream, partition): the space
//!   is one record per partition, with no cleanup job. A source that
//!   completes a partition out of order (JetStream with several messages
//!   unacknowledged, or one retried while later ones are applied) keeps a
//!   low watermark plus ranges done above it ([`Position`]): the reader's
//!   acknowledgement floor raises the watermark, and the stretches it knows
//!   hold nothing for the consumer join the ranges, so the record stays
//!   about one range per unfinished message.
//! - A partition that moves to a consumer with **another store** (two
//!   service instances, each with its own store, in one Kafka group, or
//!   sharing one durable JetStream consumer) is exactly-once in each store,
//!   not across them: the new owner starts from its own store's position
//!   (or the broker's, when it has none) and may apply what the old owner
//!   applied. Give each store its own consumer name (and, for JetStream, its
//!   own durable consumer), or move state with the partition.
//! - Producer duplicates: an outboxkv relay may send one event twice, at two
//!   broker positions (a Kafka relay restart, JetStream past its duplicate
//!   window). With [`InboxOptions::producer_window`] (default 4096) the inbox
//!   also keeps, per producing store, which of its last seqs were applied,
//!   and skips a second copy. Seqs older than the window are applied (the
//!   window never drops a message it has not seen). Events of other
//!   producers are deduplicated by position only.
//!
//! # Failures
//!
//! A handler error that is about the message ([`Error::Aborted`](crate::Error::Aborted) from
//! [`Error::abort`](crate::Error::abort), an invalid event, a too-large write, a conflict that
//! kept failing) is retried by the reader up to [`InboxOptions::max_attempts`]
//! times; then the message is written to the inbox dead-letter table
//! ([`InboxDeadLetter`]) in the same commit that moves the position past it,
//! and the partition goes on. A store failure (I/O, a poisoned store, a full
//! outbox) is returned from [`Inbox::apply`] and nothing is acknowledged.
//!
//! ```
//! use outboxkv::inbox::{Inbox, Message, Outcome};
//! use outboxkv::{Event, Store, Table};
//! const BALANCES: Table<str, i64> = Table::new("balances");
//!
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let inbox = Inbox::new(&store, "payments")?;
//! let deposit = Message::new("deposits", 0, 7, b"alice:100".to_vec());
//! let handler = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
//!     let body = std::str::from_utf8(tx.message().data()).map_err(outboxkv::Error::abort)?.to_string();
//!     let (who, amount) = body.split_once(':').ok_or_else(|| outboxkv::Error::abort("no ':'"))?;
//!     let amount: i64 = amount.parse().map_err(outboxkv::Error::abort)?;
//!     let balance = tx.get_for_update(&BALANCES, who)?.unwrap_or(0);
//!     tx.put(&BALANCES, who, &(balance + amount))?;
//!     tx.emit(Event::bytes("balance.changed", who, Vec::new()))
//! };
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! let first = rt.block_on(inbox.apply(&[deposit.clone()], handler))?;
//! let again = rt.block_on(inbox.apply(&[deposit], handler))?; // a redelivery
//! assert_eq!((first[0].clone(), again[0].clone()), (Outcome::Applied, Outcome::Duplicate));
//! assert_eq!(store.get(&BALANCES, "alice")?, Some(100));
//! assert_eq!(store.outbox().head(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod message;

#[cfg(feature = "relay")]
mod dead;
#[cfg(feature = "relay")]
mod metrics;
#[cfg(feature = "relay")]
pub(crate) mod position;
#[cfg(feature = "relay")]
mod tx;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;

pub use message::{CloudEvent, Message};

#[cfg(feature = "relay")]
pub use dead::InboxDeadLetter;
#[cfg(feature = "relay")]
pub use metrics::InboxMetrics;
#[cfg(feature = "relay")]
pub use position::{Position, Seen};
#[cfg(feature = "relay")]
pub use tx::InboxTx;

#[cfg(feature = "relay")]
pub use apply::{Applying, Inbox, InboxOptions, Outcome};

#[cfg(feature = "relay")]
mod apply;
