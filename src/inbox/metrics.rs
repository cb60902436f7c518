//! Inbox metrics, in Prometheus' data model (`prometheus-client`, like the
//! relay's).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The metrics of one [`Inbox`](super::Inbox) (and of the reader feeding
/// it). Cheap to clone: clones share the values.
///
/// | name | kind | what |
/// |---|---|---|
/// | `outboxkv_inbox_applied_total` | counter | messages applied (their handler's writes committed) |
/// | `outboxkv_inbox_duplicates_total` | counter | messages skipped: their position was done already |
/// | `outboxkv_inbox_producer_duplicates_total` | counter | messages skipped: the producing store's event was applied already |
/// | `outboxkv_inbox_dead_lettered_total` | counter | messages moved to the inbox dead-letter table |
/// | `outboxkv_inbox_failed_attempts_total` | counter | handler failures (each attempt) |
/// | `outboxkv_inbox_commits_total` | counter | inbox commits (a batch is one) |
/// | `outboxkv_inbox_lag` | gauge | messages in the broker not yet delivered to this consumer, as the reader last saw it |
/// | `outboxkv_inbox_delivery_to_commit_seconds` | histogram | from the reader receiving a message to its commit being durable |
/// | `outboxkv_inbox_commit_to_ack_seconds` | histogram | from the durable commit to its acknowledgements being sent and flushed (`NatsReader` only; not confirmed by the server: the Kafka reader acknowledges nothing, its positions are in the store) |
///
/// ```
/// let metrics = outboxkv::inbox::InboxMetrics::new();
/// let mut registry = prometheus_client::registry::Registry::default();
/// metrics.register(&mut registry);
/// assert!(metrics.encode_text().contains("outboxkv_inbox_applied_total"));
/// ```
#[derive(Clone, Debug)]
pub struct InboxMetrics {
    pub(crate) applied: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) producer_duplicates: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) failed: Counter,
    pub(crate) commits: Counter,
    pub(crate) lag: Gauge,
    pub(crate) delivery_to_commit: Histogram,
    pub(crate) commit_to_ack: Histogram,
}

impl Default for InboxMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

impl InboxMetrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        InboxMetrics {
            applied: Counter::default(),
            duplicates: Counter::default(),
            producer_duplicates: Counter::default(),
            dead_lettered: Counter::default(),
            failed: Counter::default(),
            commits: Counter::default(),
            lag: Gauge::default(),
            delivery_to_commit: latency(),
            commit_to_ack: latency(),
        }
    }

    /// Registers every metric in `registry` (add a label with
    /// `Registry::sub_registry_with_label` for several consumers), under
    /// the prefix `outboxkv_inbox`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("outboxkv_inbox");
        registry.register("applied", "Messages applied", self.applied.clone());
        registry.register(
            "duplicates",
            "Messages skipped because their position was done",
            self.duplicates.clone(),
        );
        registry.register(
            "producer_duplicates",
            "Messages skipped because their producer's event was applied",
            self.producer_duplicates.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages moved to the inbox dead-letter table",
            self.dead_lettered.clone(),
        );
        registry.register("failed_attempts", "Handler failures", self.failed.clone());
        registry.register("commits", "Inbox commits", self.commits.clone());
        registry.register(
            "lag",
            "Messages not yet delivered to this consumer",
            self.lag.clone(),
        );
        registry.register(
            "delivery_to_commit_seconds",
            "Time from receiving a message to its durable commit",
            self.delivery_to_commit.clone(),
        );
        registry.register(
            "commit_to_ack_seconds",
            "Time from the durable commit to the broker acknowledgement",
            self.commit_to_ack.clone(),
        );
    }

    /// These metrics alone, in the OpenMetrics text format.
    pub fn encode_text(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    /// Messages applied so far.
    pub fn applied(&self) -> u64 {
        self.applied.get()
    }

    /// Messages skipped as duplicates (by position or by producer) so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.get() + self.producer_duplicates.get()
    }

    /// Messages skipped because their producer's event was applied, so far.
    pub fn producer_duplicates(&self) -> u64 {
        self.producer_duplicates.get()
    }

    /// Handler failures (each retried or dead-lettered attempt) so far.
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }

    /// Messages dead-lettered so far.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.get()
    }

    pub(crate) fn observe_commit_to_ack(&self, took: Duration) {
        self.commit_to_ack.observe(took.as_secs_f64());
    }
}
