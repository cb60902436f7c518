//! The `Sink` trait: where a relay publishes outbox entries.

use std::future::Future;
use std::pin::Pin;

use crate::OutboxEntry;

/// A boxed future, as sinks return them (so `Sink` stays object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What happened to one entry of a published batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The broker has the entry (durably, as far as the broker promises).
    Acked {
        /// The broker's position for it (stream sequence, partition/offset,
        /// file line), for logs and inspection.
        position: Option<String>,
        /// The broker recognised the event id and did not store it again.
        duplicate: bool,
    },
    /// Not delivered for a reason that says nothing about the entry itself
    /// (connection lost, timeout, broker unavailable). Retried with backoff,
    /// for as long as it takes: a broker that is down loses nothing.
    Retry {
        /// What went wrong.
        error: String,
    },
    /// The broker refused this entry. A `permanent` refusal (too large,
    /// invalid subject) dead-letters it at once; otherwise it is retried and
    /// dead-lettered after the relay's `max_attempts`.
    Rejected {
        /// The broker's error.
        error: String,
        /// Whether retrying cannot help.
        permanent: bool,
    },
    /// The sink did not try this entry this round: an earlier entry of
    /// the same key failed in this batch, and sending this one could put it
    /// before that one at the broker. Nothing is counted against the entry
    /// and the sink does not count as down; the relay publishes it again
    /// (after the earlier one settles) without escalating its backoff.
    Held {
        /// Why it was held back.
        reason: String,
    },
    /// The sink cannot go on at all (a setting it needs is refused, say the
    /// restart scan's read permission): the relay stops, returning
    /// [`Error::Broker`](crate::Error::Broker) with this error, and
    /// settles nothing from this entry on.
    Fatal {
        /// What is wrong, for the operator.
        error: String,
    },
}

impl Outcome {
    /// An acknowledgement without a position.
    pub fn acked() -> Outcome {
        Outcome::Acked {
            position: None,
            duplicate: false,
        }
    }
}

/// A destination for outbox entries: a broker, a file, stdout.
///
/// `publish` receives a batch in seq order and returns exactly one
/// [`Outcome`] per entry, in the same order. It must not return before every
/// entry it reports as `Acked` is acknowledged by the broker; it may publish
/// the batch pipelined. A sink should use the entry's `id` as the broker's
/// deduplication key where the broker has one.
///
/// ```
/// use outboxkv::OutboxEntry;
/// use outboxkv::relay::{BoxFuture, Outcome, Sink};
///
/// /// Accepts everything (a sink for tests).
/// struct Discard;
///
/// impl Sink for Discard {
///     fn name(&self) -> &str {
///         "discard"
///     }
///     fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
///         Box::pin(async move { batch.iter().map(|_| Outcome::acked()).collect() })
///     }
/// }
/// ```
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs and metrics labels ("file", "nats").
    fn name(&self) -> &str;

    /// Publishes `batch`; see the trait documentation for the contract.
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>>;

    /// How many publishes the relay may have in flight at once. Default: 1
    /// (the relay awaits each batch before it reads the next).
    ///
    /// A sink that returns more than 1 accepts a call to `publish` while the
    /// futures of earlier calls are still pending, and keeps per-key order
    /// across them. What the relay promises such a sink:
    ///
    /// - The calls are made in seq order, and each call to `publish` (and
    ///   the first poll of its future) is made before the next batch is
    ///   read: a sink takes its place in the order (per key, per partition)
    ///   in the body of `publish` or in that first poll.
    /// - The futures are polled concurrently, and their outcomes taken in
    ///   in call order (or all futures dropped, when the relay stops).
    /// - Once the relay has taken in an outcome that holds it back (one
    ///   other than `Acked` that does not dead-letter the entry), it makes
    ///   no new call until every call in flight has returned; it then
    ///   publishes again from the first entry that failed. A call that
    ///   returns a failure while an earlier one is still pending is not
    ///   known to the relay yet, so calls may still follow it; but a call
    ///   made while none is in flight comes after the relay took in every
    ///   outcome before it, and starts at the first entry not settled
    ///   (leaving out only entries acknowledged beyond a failure). So a sink
    ///   may forget earlier failures then.
    /// - Seqs grow from call to call, except when the relay publishes again
    ///   after a failure, from the first failed entry: an entry of the same
    ///   key with a seq at or above one being published is then an earlier
    ///   attempt, never one to wait for. (A sink shared by several relays,
    ///   with [`RelayBuilder::sink_arc`](crate::relay::RelayBuilder::sink_arc),
    ///   sees each relay's seqs, unrelated to the others'.)
    ///
    /// What the sink must do in turn: an entry of a key reaches the broker
    /// only after every earlier entry of that key, from this call or an
    /// earlier one, is acknowledged; an entry whose earlier entry of the
    /// same key failed (or was held, or refused) is [`Outcome::Held`].
    fn max_concurrent_publishes(&self) -> usize {
        1
    }
}
