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
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Registers the relay metrics (one value each, or one family each) in
/// `$r`, in the order and with the names and help texts below.
macro_rules! register_all {
    ($r:expr, $depth:expr, $oldest:expr, $delivered:expr, $latency:expr, $published:expr,
     $acked:expr, $failed:expr, $dead:expr, $duplicates:expr, $up:expr, $storm:expr) => {{
        let r = $r;
        r.register("outbox_depth", "Entries in the outbox", $depth.clone());
        r.register(
            "oldest_undelivered_age_seconds",
            "Age of the oldest undelivered outbox entry",
            $oldest.clone(),
        );
        r.register(
            "delivered_seq",
            "Last delivered and pruned seq",
            $delivered.clone(),
        );
        r.register(
            "commit_to_ack_seconds",
            "Time from commit to broker acknowledgement",
            $latency.clone(),
        );
        r.register(
            "published",
            "Entries handed to the sink",
            $published.clone(),
        );
        r.register("acked", "Entries acknowledged by the sink", $acked.clone());
        r.register("failed", "Failed delivery attempts", $failed.clone());
        r.register(
            "dead_lettered",
            "Entries moved to the dead-letter table",
            $dead.clone(),
        );
        r.register(
            "duplicates",
            "Acknowledgements reporting a duplicate",
            $duplicates.clone(),
        );
        r.register(
            "sink_up",
            "1 while the sink accepts entries, 0 while delivery fails",
            $up.clone(),
        );
        r.register(
            "dead_letter_storm",
            "1 while the relay holds back a dead-letter storm",
            $storm.clone(),
        );
    }};
}

/// The constant labels of one relay's metrics in a [`RelayMetricFamilies`].
type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 18))
}

/// The relay metrics as label families, for a registry several relays
/// share: register the families once, then give each relay its own
/// [`RelayMetrics`] with [`relay`](RelayMetricFamilies::relay) (`sink`,
/// `relay` name, ...). Each metric is then one family with one series per
/// relay, as the Prometheus and OpenMetrics formats require (two metrics of
/// one name would be two families, which parsers refuse).
///
/// ```
/// use outboxkv::relay::RelayMetricFamilies;
/// use prometheus_client::registry::Registry;
/// let families = RelayMetricFamilies::new();
/// let mut registry = Registry::default();
/// families.register(&mut registry);
/// let orders = families.relay(&[("relay", "orders")]);
/// let payments = families.relay(&[("relay", "payments")]);
/// orders.acked.inc();
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry)?;
/// assert!(text.contains(r#"outboxkv_relay_acked_total{relay="orders"} 1"#), "{text}");
/// assert!(text.contains(r#"outboxkv_relay_acked_total{relay="payments"} 0"#), "{text}");
/// # Ok::<(), std::fmt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RelayMetricFamilies {
    depth: Family<Labels, Gauge>,
    oldest: Family<Labels, Gauge<f64, AtomicU64>>,
    delivered_seq: Family<Labels, Gauge>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    published: Family<Labels, Counter>,
    acked: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    dead_lettered: Family<Labels, Counter>,
    duplicates: Family<Labels, Counter>,
    sink_up: Family<Labels, Gauge>,
    dead_letter_storm: Family<Labels, Gauge>,
}

impl Default for RelayMetricFamilies {
    fn default() -> Self {
        RelayMetricFamilies {
            depth: Family::default(),
            oldest: Family::default(),
            delivered_seq: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            published: Family::default(),
            acked: Family::default(),
            failed: Family::default(),
            dead_lettered: Family::default(),
            duplicates: Family::default(),
            sink_up: Family::default(),
            dead_letter_storm: Family::default(),
        }
    }
}

impl RelayMetricFamilies {
    /// Empty families.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the families in `registry` under the prefix `outboxkv_relay`.
    pub fn register(&self, registry: &mut Registry) {
        register_all!(
            registry.sub_registry_with_prefix("outboxkv_relay"),
            self.depth,
            self.oldest,
            self.delivered_seq,
            self.latency,
            self.published,
            self.acked,
            self.failed,
            self.dead_lettered,
            self.duplicates,
            self.sink_up,
            self.dead_letter_storm
        );
    }

    /// The metrics of one relay, whose series carry `labels`. Asking twice
    /// with the same labels gives metrics that share their values.
    pub fn relay(&self, labels: &[(&str, &str)]) -> RelayMetrics {
        let l: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let m = RelayMetrics {
            depth: self.depth.get_or_create(&l).clone(),
            oldest_undelivered_age_seconds: self.oldest.get_or_create(&l).clone(),
            delivered_seq: self.delivered_seq.get_or_create(&l).clone(),
            commit_to_ack_seconds: self.latency.get_or_create(&l).clone(),
            published: self.published.get_or_create(&l).clone(),
            acked: self.acked.get_or_create(&l).clone(),
            failed: self.failed.get_or_create(&l).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&l).clone(),
            duplicates: self.duplicates.get_or_create(&l).clone(),
            sink_up: self.sink_up.get_or_create(&l).clone(),
            dead_letter_storm: self.dead_letter_storm.get_or_create(&l).clone(),
            publishing_since: Default::default(),
        };
        m.sink_up.set(1);
        m
    }
}

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
    /// 1 while the relay holds back a dead-letter storm (see
    /// [`RelayBuilder::dead_letter_storm_limit`](crate::relay::RelayBuilder::dead_letter_storm_limit)).
    pub dead_letter_storm: Gauge,
    /// When the publish in progress began (µs since the epoch; 0: none).
    publishing_since: std::sync::Arc<AtomicU64>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        RelayMetrics {
            depth: Gauge::default(),
            oldest_undelivered_age_seconds: Gauge::default(),
            delivered_seq: Gauge::default(),
            commit_to_ack_seconds: latency_histogram(),
            published: Counter::default(),
            acked: Counter::default(),
            failed: Counter::default(),
            dead_lettered: Counter::default(),
            duplicates: Counter::default(),
            // Up until a round fails: a relay with nothing to ship yet is
            // not down.
            sink_up: {
                let g = Gauge::default();
                g.set(1);
                g
            },
            dead_letter_storm: Gauge::default(),
            publishing_since: Default::default(),
        }
    }
}

impl RelayMetrics {
    /// Fresh metrics, all zero.
    pub fn new() -> RelayMetrics {
        RelayMetrics::default()
    }

    /// How long the publish in progress has been waiting for the sink
    /// (`None` when no publish is in progress): a hung broker shows here.
    pub fn publishing_for(&self) -> Option<std::time::Duration> {
        match self
            .publishing_since
            .load(std::sync::atomic::Ordering::Acquire)
        {
            0 => None,
            since => Some(std::time::Duration::from_micros(
                crate::outbox::entry::now_micros().saturating_sub(since),
            )),
        }
    }

    pub(crate) fn publish_started(&self) {
        self.publishing_since.store(
            crate::outbox::entry::now_micros().max(1),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// A publish in progress since `micros` (Unix time).
    pub(crate) fn publish_started_at(&self, micros: u64) {
        self.publishing_since
            .store(micros.max(1), std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn publish_ended(&self) {
        self.publishing_since
            .store(0, std::sync::atomic::Ordering::Release);
    }

    /// Registers every metric in `registry` under the prefix
    /// `outboxkv_relay`, without labels: for a registry with one relay. For
    /// several, see [`RelayMetricFamilies`].
    pub fn register(&self, registry: &mut Registry) {
        register_all!(
            registry.sub_registry_with_prefix("outboxkv_relay"),
            self.depth,
            self.oldest_undelivered_age_seconds,
            self.delivered_seq,
            self.commit_to_ack_seconds,
            self.published,
            self.acked,
            self.failed,
            self.dead_lettered,
            self.duplicates,
            self.sink_up,
            self.dead_letter_storm
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
            store: store.downgrade(),
        }));
}

struct StoreCollector {
    store: crate::store::WeakStore,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCollector").finish_non_exhaustive()
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.upgrade() else {
            return Ok(());
        };
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
