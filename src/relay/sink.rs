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
}
