//! Relay metrics, in Prometheus' data model.
//!
//! Built on `prometheus-client`: it needs no global recorder (a library
//! should not install one), has native histograms and counters, and encodes
//! the OpenMetrics/Prometheus text format itself, so the `outbox-relay`
//! binary can serve `/metrics` without an exporter crate, and a service can
//! add these metrics to its own `Registry`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The relay's metrics. Cheap to clone (clones share the values).
///
/// ```
/// let metrics = outboxkv::relay::RelayMetrics::new();
/// let text = metrics.encode_text();
/// assert!(text.contains("outboxkv_relay_acked_total"));
/// ```
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    /// Entries in the outbox (committed, not yet delivered or dead-lettered).
    pub depth: Gauge,
    /// Age of the oldest undelivered entry, seconds.
    pub oldest_undelivered_age_seconds: Gauge<f64, AtomicU64>,
    /// Last seq delivered (or dead-lettered) and pruned.
    pub delivered_seq: Gauge,
    /// Time from commit to broker acknowledgement, seconds.
    pub commit_to_ack_seconds: Histogram,
    /// Entries handed to the sink (each attempt counts).
    pub published: Counter,
    /// Entries acknowledged by the sink.
    pub acked: Counter,
    /// Failed attempts (retryable or rejected).
    pub failed: Counter,
    /// Entries moved to the dead-letter table.
    pub dead_lettered: Counter,
    /// Acknowledgements in which the broker reported a duplicate.
    pub duplicates: Counter,
    /// 1 while the sink accepts entries, 0 after a round that could not
    /// deliver (broker unreachable, timeouts), until one succeeds.
    pub sink_up: Gauge,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        RelayMetrics {
            depth: Gauge::default(),
            oldest_undelivered_age_seconds: Gauge::default(),
            delivered_seq: Gauge::default(),
            commit_to_ack_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 18)),
            published: Counter::default(),
            acked: Counter::default(),
            failed: Counter::default(),
            dead_lettered: Counter::default(),
            duplicates: Counter::default(),
            sink_up: Gauge::default(),
        }
    }
}

impl RelayMetrics {
    /// Fresh metrics, all zero.
    pub fn new() -> RelayMetrics {
        RelayMetrics::default()
    }

    /// Registers every metric in `registry` under the prefix `outboxkv_relay`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outboxkv_relay");
        r.register("outbox_depth", "Entries in the outbox", self.depth.clone());
        r.register(
            "oldest_undelivered_age_seconds",
            "Age of the oldest undelivered outbox entry",
            self.oldest_undelivered_age_seconds.clone(),
        );
        r.register(
            "delivered_seq",
            "Last delivered and pruned seq",
            self.delivered_seq.clone(),
        );
        r.register(
            "commit_to_ack_seconds",
            "Time from commit to broker acknowledgement",
            self.commit_to_ack_seconds.clone(),
        );
        r.register(
            "published",
            "Entries handed to the sink",
            self.published.clone(),
        );
        r.register(
            "acked",
            "Entries acknowledged by the sink",
            self.acked.clone(),
        );
        r.register("failed", "Failed delivery attempts", self.failed.clone());
        r.register(
            "dead_lettered",
            "Entries moved to the dead-letter table",
            self.dead_lettered.clone(),
        );
        r.register(
            "duplicates",
            "Acknowledgements reporting a duplicate",
            self.duplicates.clone(),
        );
        r.register(
            "sink_up",
            "1 while the sink accepts entries, 0 while delivery fails",
            self.sink_up.clone(),
        );
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode_text(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}
