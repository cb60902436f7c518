//! Relay metrics, in Prometheus' data model.
//!
//! Built on `prometheus-client`: it needs no global recorder (a library
//! should not install one), has native histograms and counters, and encodes
//! the OpenMetrics/Prometheus text format itself, so the `outbox-relay`
//! binary can serve `/metrics` without an exporter crate, and a service can
//! add these metrics to its own `Registry`.

use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
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

/// Registers the store's own gauges in `registry`, read at each scrape
/// (under the prefix `outboxkv_store`, labelled `store="<store id>"` so
/// that several stores share a registry): `open_transactions`,
/// `oldest_transaction_age_seconds` (0 when none is open),
/// `conflict_index_keys` and the counter `transactions_expired`. The
/// registry holds the store weakly: once the store is dropped they report
/// nothing.
///
/// ```
/// use prometheus_client::registry::Registry;
/// use outboxkv::{Store, Table};
/// const T: Table<u32, u32> = Table::new("t");
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let mut registry = Registry::default();
/// outboxkv::relay::register_store_metrics(&mut registry, &store);
/// let mut tx = store.begin();
/// tx.get_for_update(&T, &1)?;
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry)?;
/// let line = format!("outboxkv_store_open_transactions{{store=\"{}\"}} 1", store.id());
/// assert!(text.contains(&line), "{text}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn register_store_metrics(registry: &mut Registry, store: &crate::Store) {
    registry
        .sub_registry_with_prefix("outboxkv_store")
        .register_collector(Box::new(StoreCollector {
            store: std::sync::Arc::downgrade(&store.inner),
        }));
}

struct StoreCollector {
    store: std::sync::Weak<crate::store::open::Inner>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCollector").finish_non_exhaustive()
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(inner) = self.store.upgrade() else {
            return Ok(());
        };
        let store = crate::Store { inner };
        let stats = store.transaction_stats();
        let labels = [("store", store.id().to_string())];
        let counts: [(&str, &str, usize); 2] = [
            (
                "open_transactions",
                "Transactions that have read and not yet ended",
                stats.open,
            ),
            (
                "conflict_index_keys",
                "Write records the conflict index holds for open transactions",
                stats.conflict_index_keys,
            ),
        ];
        for (name, help, value) in counts {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(
                encoder
                    .encode_descriptor(name, help, None, gauge.metric_type())?
                    .encode_family(&labels)?,
            )?;
        }
        let age = ConstGauge::new(stats.oldest_open_for.map_or(0.0, |d| d.as_secs_f64()));
        age.encode(
            encoder
                .encode_descriptor(
                    "oldest_transaction_age_seconds",
                    "How long the oldest open transaction has been open",
                    None,
                    age.metric_type(),
                )?
                .encode_family(&labels)?,
        )?;
        let expired = ConstCounter::new(stats.expired);
        expired.encode(
            encoder
                .encode_descriptor(
                    "transactions_expired",
                    "Transactions expired by max_transaction_age or max_conflict_index_keys",
                    None,
                    expired.metric_type(),
                )?
                .encode_family(&labels)?,
        )?;
        Ok(())
    }
}
