//! The Apache Kafka sink (feature `kafka`).
//!
//! # Records
//!
//! One record per outbox entry, on the topic rendered from the event type
//! ([`KafkaOptions::topic_template`]), with the event key as the record key
//! (an empty key is a null record key):
//! Kafka keeps the order of records with the same key inside their partition,
//! so per-key order is per-partition order. The partitioner defaults to
//! `murmur2_random`, the Java client's, so Java producers and consumers agree
//! on which partition a key lives in. Headers:
//!
//! | header | value |
//! |---|---|
//! | `ce_<attribute>` | CloudEvents binary mode (Kafka protocol binding): every attribute and extension of [`cloudevents`] but `datacontenttype` (`ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_subject`, `ce_time`, `ce_partitionkey`, `ce_outboxseq`, `ce_traceparent`, ...) |
//! | `content-type` | the entry's content type (`datacontenttype`; left out when empty) |
//! | `outboxkv_seq` | the outbox seq the entry was shipped from (decimal; what the restart scan reads) |
//! | the event's own headers | as added, `traceparent` and `tracestate` among them (they never clash with the names above: [`Event`](crate::Event) refuses `ce_*`, `content-type` and `outboxkv*`) |
//!
//! An empty payload is a record with a null value. `ce_id` is the event id,
//! `<store id>-<seq at commit>`: the key for consumer-side deduplication.
//!
//! # Delivery and duplicates
//!
//! The producer is idempotent (`enable.idempotence=true`, `acks=all`): its
//! own retries inside one producer session never write a record twice and
//! never reorder a partition. Every delivery future is awaited. A fatal
//! producer error (fenced epoch, broken sequence) rebuilds the producer.
//!
//! Kafka cannot deduplicate across producer sessions, and a relay can stop
//! after the broker stored a batch but before it recorded that in the
//! outbox; a delivery that timed out may also have been written. The sink
//! closes both gaps with a **restart scan** ([`KafkaOptions::restart_dedup`],
//! on by default): before its first publish, and before the next publish
//! after any delivery whose outcome was not an acknowledgement, it reads back
//! the end of every partition of the topics it is about to write, collects
//! the records this store wrote for seqs at or above the batch's first seq,
//! and reports an entry as delivered (a duplicate) instead of sending it
//! again only when a record with its exact event id (`ce_id`) is there. It
//! reads back until it meets a record of one of the batch's event-id stores
//! with a lower `outboxkv_seq`, or the start of the partition, or
//! [`KafkaOptions::restart_scan_limit`] records.
//!
//! Why that is exact: the relay publishes a batch only after the previous
//! one has settled, and the producer keeps each partition in send order, so
//! in every partition this store's records for seqs below the relay's cursor
//! come before every record at or above it. The scan skips only entries
//! whose event id it has read in the topic, so it can never lose an entry:
//! a copy restored from [`Store::checkpoint`](crate::Store::checkpoint)
//! holds the original's unshipped entries (the original's ids) and then its
//! own (its own ids, at seqs the original may have shipped entries of its
//! own at); only the original's ids are taken for duplicates. What it does not
//! cover: topics first written more than [`KafkaOptions::restart_span`] seqs
//! after the cursor (keep the span above the relay's batch size), a scan
//! cut short by the limit, and a record another process wrote after the
//! scan: in those cases a consumer sees a duplicate, which `ce_id` detects.
//! What it cannot tell apart: a store copied at the file level (a volume
//! snapshot restored, a folder copied) keeps its store id, so its new
//! commits reuse event ids the original may already have written, and the
//! scan takes them for duplicates. Copy a store with `Store::checkpoint`,
//! which gives the copy an id of its own.
//!
//! # Order
//!
//! The idempotent producer keeps every partition in send order through its
//! own retries, and the relay re-sends from the first entry that failed, so
//! per-key order holds. The one way a broker could still store a later
//! record of a key before an earlier one is a produce batch the topic
//! refuses as too large (its `max.message.bytes` below the batch) while a
//! later, smaller batch of the partition is accepted. The sink prevents
//! that: before it first writes a topic it reads the topic's
//! `max.message.bytes` and keeps the producer's `batch.size` below the
//! smallest limit seen, so a batch can be refused only for a record that is
//! too large on its own.
//!
//! # Oversized records
//!
//! A record larger than its topic's `max.message.bytes` is a permanent
//! rejection: the relay dead-letters it with the broker's error. Had a
//! record been refused as part of a too-large batch anyway (the topic's
//! limit lowered meanwhile), it is retried instead, and the topic's limit
//! read again.
//!
//! # Read permission
//!
//! The restart scan reads the topics it writes. A principal that may write
//! but not read fails [`KafkaSink::connect`] when the topic template names
//! one fixed topic (it is checked there), and otherwise stops the relay at
//! the first scan ([`Outcome::Fatal`]), with an error saying what to
//! grant, unless [`KafkaOptions::restart_scan_without_read`] says to ship
//! without the scan for such topics (then a relay restart can duplicate
//! records; consumers deduplicate on `ce_id`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::cloudevents;
use crate::error::{Error, Result};
use crate::outbox::entry::{EventId, OutboxEntry, StoreId};
use crate::relay::{BoxFuture, Outcome, Sink};

/// The header carrying the outbox seq an entry was shipped from.
pub const SEQ_HEADER: &str = "outboxkv_seq";

/// Options for [`KafkaSink::connect`].
///
/// ```
/// use outboxkv::sink::kafka::KafkaOptions;
/// let opts = KafkaOptions::new("127.0.0.1:9092")
///     .topic_template("events.{type}")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512");
/// assert_eq!(opts.topic_for("orders.paid"), "events.orders.paid");
/// ```
#[derive(Clone)]
#[must_use]
pub struct KafkaOptions {
    bootstrap: String,
    template: String,
    partitioner: String,
    window: usize,
    delivery_timeout: Option<Duration>,
    restart_dedup: bool,
    restart_span: u64,
    restart_scan_limit: u64,
    scan_without_read: bool,
    extra: BTreeMap<String, String>,
}

/// Secret settings (`sasl.password`, `ssl.key.password`, ...) show as
/// `<redacted>`.
impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOptions")
            .field("bootstrap", &self.bootstrap)
            .field("template", &self.template)
            .field("partitioner", &self.partitioner)
            .field("window", &self.window)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("restart_dedup", &self.restart_dedup)
            .field("restart_span", &self.restart_span)
            .field("restart_scan_limit", &self.restart_scan_limit)
            .field("scan_without_read", &self.scan_without_read)
            .field("extra", &crate::redact::redact_settings(&self.extra))
            .finish()
    }
}

impl KafkaOptions {
    /// Options for the brokers at `bootstrap` (`host:port[,host:port...]`).
    pub fn new(bootstrap: impl Into<String>) -> KafkaOptions {
        KafkaOptions {
            bootstrap: bootstrap.into(),
            template: "{type}".into(),
            partitioner: "murmur2_random".into(),
            window: 10_000,
            delivery_timeout: None,
            restart_dedup: true,
            restart_span: 10_000,
            restart_scan_limit: 100_000,
            scan_without_read: false,
            extra: BTreeMap::new(),
        }
    }

    /// Topic template; `{type}` and `{key}` are replaced by the event type and
    /// key. Default: `{type}`.
    pub fn topic_template(mut self, template: impl Into<String>) -> Self {
        self.template = template.into();
        self
    }

    /// librdkafka's partitioner. Default: `murmur2_random` (what Java
    /// clients use); librdkafka's own default is `consistent_random`.
    pub fn partitioner(mut self, partitioner: impl Into<String>) -> Self {
        self.partitioner = partitioner.into();
        self
    }

    /// Most records awaiting their delivery report at once. Default: 10,000.
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// How long the producer tries to deliver one record before it reports a
    /// timeout (`message.timeout.ms`); the relay then retries the entry.
    ///
    /// Default: none (`message.timeout.ms=0`): the producer keeps trying
    /// until the broker takes the record, and a broker that is down shows
    /// as a publish that waits (`outbox-relay`'s `/healthz` reports it). A
    /// timeout breaks per-key order: records that time out in the
    /// producer's queue leave a gap that later records of the partition
    /// fill once the broker is back, and the relay's re-send of the
    /// timed-out one lands after them (librdkafka documents the gap). Set
    /// one only where order does not matter.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = Some(timeout);
        self
    }

    /// Whether to run the restart scan (see the module documentation).
    /// Default: on.
    pub fn restart_dedup(mut self, on: bool) -> Self {
        self.restart_dedup = on;
        self
    }

    /// How many seqs past the relay's cursor a restart scan covers: entries
    /// beyond it are sent without looking. Keep it above the relay's batch
    /// size. Default: 10,000.
    pub fn restart_span(mut self, seqs: u64) -> Self {
        self.restart_span = seqs.max(1);
        self
    }

    /// The most records a restart scan reads back per partition. Default:
    /// 100,000.
    pub fn restart_scan_limit(mut self, records: u64) -> Self {
        self.restart_scan_limit = records.max(1);
        self
    }

    /// What to do when the restart scan may not read a topic (the relay's
    /// principal has WRITE but not READ): `false` fails (see the module
    /// documentation); `true` ships to such topics without the scan,
    /// logging a warning once per topic: after a relay restart, records
    /// that were already written can be written again. Default: `false`.
    pub fn restart_scan_without_read(mut self, allow: bool) -> Self {
        self.scan_without_read = allow;
        self
    }

    /// Any other librdkafka setting, passed through to the producer and to
    /// the restart scan's consumer: `security.protocol`, `sasl.*`, `ssl.*`,
    /// `compression.type`, ... The sink sets `linger.ms=1` (librdkafka: 5)
    /// and `queue.buffering.max.messages` to twice the window unless given
    /// here. Settings the sink depends on (`enable.idempotence`, `acks`)
    /// cannot be overridden.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The topic an event of `event_type` is published to (key `""`).
    pub fn topic_for(&self, event_type: &str) -> String {
        self.render(event_type, "")
    }

    fn render(&self, event_type: &str, key: &str) -> String {
        self.template
            .replace("{type}", event_type)
            .replace("{key}", key)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    fn producer_config(&self, batch_cap: Option<usize>) -> ClientConfig {
        let mut c = self.client_config();
        if let Some(cap) = batch_cap {
            // Below the smallest `max.message.bytes` of the topics written
            // (see "Order" in the module documentation).
            let asked = self
                .extra
                .get("batch.size")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1_000_000);
            c.set("batch.size", asked.min(cap).max(1).to_string());
        }
        c.set("client.id", "outboxkv-relay")
            .set("partitioner", &self.partitioner)
            .set(
                "message.timeout.ms",
                self.delivery_timeout
                    .map_or(0, |t| t.as_millis().max(1))
                    .to_string(),
            );
        if !self.extra.contains_key("linger.ms") {
            // The relay already hands over whole batches; librdkafka's own
            // 5 ms default would add that much to every batch's latency.
            c.set("linger.ms", "1");
        }
        if !self.extra.contains_key("queue.buffering.max.messages") {
            c.set(
                "queue.buffering.max.messages",
                (self.window * 2).max(1000).to_string(),
            );
        }
        c.set("enable.idempotence", "true").set("acks", "all");
        c
    }
}

/// Whether `t` is a valid Kafka topic name: 1 to 249 of `[A-Za-z0-9._-]`,
/// not `.` or `..`.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Publishes to Apache Kafka through an idempotent producer (see the module
/// documentation for records, headers and the duplicate strategy).
///
/// ```no_run
/// use outboxkv::Store;
/// use outboxkv::relay::{Relay, Shutdown};
/// use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Store::open("data/orders")?;
/// let sink = KafkaSink::connect(KafkaOptions::new("127.0.0.1:9092")).await?;
/// let relay = Relay::builder(&store).sink(sink).start()?;
/// // ... the service commits; the relay ships and prunes ...
/// relay.shutdown(Shutdown::Drain(Duration::from_secs(10))).await?;
/// # Ok(()) }
/// ```
pub struct KafkaSink {
    opts: KafkaOptions,
    producer: Mutex<Arc<SinkProducer>>,
    recovery: Mutex<Recovery>,
    limits: Mutex<TopicLimits>,
    admin: AdminClient<DefaultClientContext>,
}

/// What the sink knows of its topics' limits.
#[derive(Default)]
struct TopicLimits {
    /// `max.message.bytes` per topic written (`None`: could not be read).
    known: HashMap<String, Option<usize>>,
    /// The producer's `batch.size` cap now in force.
    cap: Option<usize>,
    /// Topics the restart scan may not read (skipped, with
    /// `restart_scan_without_read`).
    unreadable: HashSet<String>,
    /// Entries refused as too large once already and retried: refused
    /// again, the refusal stands (bounded: cleared when it grows large).
    retried_too_large: HashSet<EventId>,
}

/// Bytes kept below a topic's `max.message.bytes` for the record batch's
/// own framing.
const BATCH_MARGIN: usize = 256;

type SinkProducer = FutureProducer<SinkContext>;
type LastError = Arc<Mutex<Option<String>>>;

/// Logs librdkafka's error reports through `tracing` and keeps the last
/// one: a failed login, for one, reaches the caller only this way (the
/// request that fails meanwhile just says "broker transport failure").
struct SinkContext {
    last_error: LastError,
}

impl ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        *self.last_error.lock() = Some(format!("{error}: {reason}"));
    }
}

impl KafkaOptions {
    fn create_producer(
        &self,
        last_error: &LastError,
        batch_cap: Option<usize>,
    ) -> rdkafka::error::KafkaResult<SinkProducer> {
        self.producer_config(batch_cap)
            .create_with_context(SinkContext {
                last_error: last_error.clone(),
            })
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// State of the restart scan.
#[derive(Default)]
struct Recovery {
    /// A scan is due before the next publish.
    due: bool,
    /// The scan covers seqs in `from..until`.
    from: u64,
    until: u64,
    /// Topics already scanned for this range.
    scanned: HashSet<String>,
    /// Event ids found in the topics, with their position.
    found: HashMap<EventId, String>,
}

fn broker(message: String) -> Error {
    Error::Broker {
        sink: "kafka".into(),
        message,
    }
}

impl KafkaSink {
    /// Creates the producer and checks that a broker answers (metadata
    /// request, 10 s). Fails with [`Error::Broker`] otherwise.
    pub async fn connect(opts: KafkaOptions) -> Result<KafkaSink> {
        let last_error = LastError::default();
        let producer = opts
            .create_producer(&last_error, None)
            .map_err(|e| broker(format!("create producer for {}: {e}", opts.bootstrap)))?;
        let admin: AdminClient<DefaultClientContext> = opts
            .client_config()
            .create()
            .map_err(|e| broker(format!("create admin client for {}: {e}", opts.bootstrap)))?;
        let producer = Arc::new(producer);
        let p = producer.clone();
        let bootstrap = opts.bootstrap.clone();
        let reported = last_error.clone();
        tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
                .map_err(|e| {
                    // The client's own report (a failed login, say) is
                    // delivered by its polling thread: give it a moment.
                    let mut report = None;
                    for _ in 0..10 {
                        report = reported.lock().take();
                        if report.is_some() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let cause = match report {
                        Some(r) => format!("{e}; the client reported: {r}"),
                        None => e.to_string(),
                    };
                    broker(format!("no Kafka broker answered at {bootstrap}: {cause}"))
                })
        })
        .await
        .map_err(|e| broker(format!("metadata task failed: {e}")))??;
        let recovery = Recovery {
            due: opts.restart_dedup,
            ..Recovery::default()
        };
        let sink = KafkaSink {
            opts,
            producer: Mutex::new(producer),
            recovery: Mutex::new(recovery),
            limits: Mutex::new(TopicLimits::default()),
            admin,
        };
        sink.check_read_permission().await?;
        Ok(sink)
    }

    /// With a fixed topic and the restart scan on: checks that the scan may
    /// read the topic (see "Read permission" in the module documentation).
    async fn check_read_permission(&self) -> Result<()> {
        let topic = &self.opts.template;
        if !self.opts.restart_dedup || topic.contains('{') || !valid_topic(topic) {
            return Ok(());
        }
        let config = self.opts.client_config();
        let probe_topic = topic.clone();
        let probe = tokio::task::spawn_blocking(move || probe_read(&config, &probe_topic))
            .await
            .map_err(|e| broker(format!("read-permission check failed: {e}")))?;
        match probe {
            Ok(()) => Ok(()),
            Err(e) if self.opts.scan_without_read => {
                tracing::warn!(
                    topic,
                    error = %e,
                    "the Kafka restart scan may not read this topic: shipping without it \
                     (a relay restart can duplicate records)"
                );
                self.limits.lock().unreadable.insert(topic.clone());
                Ok(())
            }
            Err(e) => Err(broker(unreadable_message(topic, &e))),
        }
    }

    /// Waits up to `timeout` for every queued record to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let p = self.producer.lock().clone();
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .map_err(|e| broker(format!("flush task failed: {e}")))?
            .map_err(|e| broker(format!("flush: {e}")))
    }

    fn headers(entry: &OutboxEntry) -> OwnedHeaders {
        let attributes = cloudevents::binary_attributes(entry);
        let mut h = OwnedHeaders::new_with_capacity(attributes.len() + 2 + entry.headers.len());
        for (name, value) in &attributes {
            let key = format!("ce_{name}");
            let value = value.to_header_value();
            h = h.insert(Header {
                key: &key,
                value: Some(value.as_str()),
            });
        }
        if let Some(ct) = cloudevents::content_type(entry) {
            h = h.insert(Header {
                key: "content-type",
                value: Some(ct),
            });
        }
        let seq = entry.seq.to_string();
        h = h.insert(Header {
            key: SEQ_HEADER,
            value: Some(seq.as_str()),
        });
        for (key, value) in &entry.headers {
            h = h.insert(Header {
                key: key.as_str(),
                value: Some(value.as_str()),
            });
        }
        h
    }

    /// Sends one record; a send the local queue refuses for being full waits
    /// for the oldest delivery in `inflight` and tries again.
    async fn send(
        &self,
        producer: &SinkProducer,
        topics: &[Option<String>],
        i: usize,
        entry: &OutboxEntry,
        inflight: &mut VecDeque<(usize, DeliveryFuture)>,
        outcomes: &mut [Option<Outcome>],
    ) -> std::result::Result<DeliveryFuture, KafkaError> {
        let topic = topic_of(topics, i);
        loop {
            // No record timestamp: the producer stamps the time of sending.
            // The event's own time is `ce_time`; a commit time as the
            // record's could be refused for good by a topic's
            // `message.timestamp.*` limits after a long outage or a replay.
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(Self::headers(entry));
            if !entry.key.is_empty() {
                // No key, no record key (a null key): an empty one would be
                // an empty CloudEvents `partitionkey`.
                record = record.key(entry.key.as_bytes());
            }
            if !entry.payload.is_empty() {
                // An empty payload stays a null value.
                record = record.payload(entry.payload.as_slice());
            }
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match inflight.pop_front() {
                        Some((j, d)) => {
                            outcomes[j] = Some(self.await_delivery(topic_of(topics, j), d).await)
                        }
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    async fn await_delivery(&self, topic: &str, delivery: DeliveryFuture) -> Outcome {
        match delivery.await {
            Ok(Ok(d)) => Outcome::Acked {
                position: Some(format!("{topic}/{}@{}", d.partition, d.offset)),
                duplicate: false,
            },
            Ok(Err((e, _))) => self.classify(&e),
            Err(_) => Outcome::Retry {
                error: "the producer dropped the delivery report".into(),
            },
        }
    }

    fn classify(&self, e: &KafkaError) -> Outcome {
        let error = e.to_string();
        let code = e.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::Fatal) || self.fatal().is_some() {
            return Outcome::Retry { error };
        }
        match code {
            // What is wrong with this record itself.
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::InvalidRecord,
            ) => Outcome::Rejected {
                error,
                permanent: true,
            },
            // Timeouts, a broker that is down, a topic being created, leader
            // changes, refused authorization, a broker policy, a record
            // damaged on the way (`InvalidMessage`: a CRC mismatch, the
            // network's doing): nothing wrong with the entry; retry (with
            // backoff) until it works.
            _ => Outcome::Retry { error },
        }
    }

    fn fatal(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.producer.lock().client().fatal_error()
    }

    /// After a fatal error the producer cannot continue: make a new one.
    fn rebuild_if_fatal(&self) {
        let mut producer = self.producer.lock();
        if let Some((code, reason)) = producer.client().fatal_error() {
            // Only `connect` reads a client's reports; a rebuilt one logs them.
            let cap = self.limits.lock().cap;
            match self.opts.create_producer(&LastError::default(), cap) {
                Ok(p) => {
                    tracing::warn!(?code, %reason, "Kafka producer hit a fatal error; rebuilt it");
                    *producer = Arc::new(p);
                    self.recovery.lock().due = self.opts.restart_dedup;
                }
                Err(e) => {
                    tracing::error!(?code, %reason, error = %e, "Kafka producer hit a fatal error and could not be rebuilt");
                }
            }
        }
    }

    /// Reads `max.message.bytes` of the topics not seen yet and, when one
    /// is below the producer's batch cap, rebuilds the producer with a
    /// smaller cap (no delivery is in flight between publishes).
    async fn learn_limits(&self, topics: &[Option<String>]) {
        let new: Vec<String> = {
            let l = self.limits.lock();
            let mut new: Vec<String> = topics
                .iter()
                .flatten()
                .filter(|t| !l.known.contains_key(*t))
                .cloned()
                .collect();
            new.sort();
            new.dedup();
            new
        };
        if new.is_empty() {
            return;
        }
        let specs: Vec<ResourceSpecifier<'_>> =
            new.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = self.admin.describe_configs(&specs, &opts).await;
        let mut limits = self.limits.lock();
        if limits.known.len() > 10_000 {
            // Topics per key: forget the limits (the cap stays in force).
            limits.known.clear();
        }
        match results {
            Ok(results) => {
                for (topic, r) in new.iter().zip(results) {
                    let limit = r.ok().and_then(|c| {
                        c.get("max.message.bytes")
                            .and_then(|e| e.value.as_deref())
                            .and_then(|v| v.parse::<usize>().ok())
                    });
                    limits.known.insert(topic.clone(), limit);
                }
            }
            Err(e) => {
                // Not asked again for these topics (the principal may lack
                // DESCRIBE_CONFIGS): without their limits the producer's
                // batches stay as they are.
                tracing::warn!(error = %e, "could not read the topics' max.message.bytes");
                for topic in new {
                    limits.known.insert(topic, None);
                }
                return;
            }
        }
        let smallest = limits
            .known
            .values()
            .flatten()
            .min()
            .map(|l| l.saturating_sub(BATCH_MARGIN).max(1));
        if smallest.is_some() && smallest < limits.cap.or(Some(usize::MAX)) {
            match self.opts.create_producer(&LastError::default(), smallest) {
                Ok(p) => {
                    tracing::info!(batch_size = ?smallest, "Kafka producer batches capped below the topics' max.message.bytes");
                    *self.producer.lock() = Arc::new(p);
                    limits.cap = smallest;
                }
                Err(e) => tracing::error!(error = %e, "could not rebuild the Kafka producer"),
            }
        }
    }

    /// Runs the restart scan if one is due and returns the seqs of `batch`
    /// already in Kafka, with their positions.
    async fn already_delivered(
        &self,
        batch: &[OutboxEntry],
        topics: &[Option<String>],
    ) -> std::result::Result<HashMap<u64, String>, ScanError> {
        let Some(first) = batch.first() else {
            return Ok(HashMap::new());
        };
        let stores: Vec<StoreId> = {
            let mut s: Vec<StoreId> = batch.iter().map(|e| e.id.store).collect();
            s.sort_unstable();
            s.dedup();
            s
        };
        let (from, mut to_scan) = {
            let mut r = self.recovery.lock();
            if r.due {
                r.due = false;
                r.from = first.seq;
                r.until = first.seq.saturating_add(self.opts.restart_span);
                r.scanned.clear();
                r.found.clear();
            }
            if first.seq >= r.until {
                r.found.clear();
                return Ok(HashMap::new());
            }
            let mut to_scan = Vec::new();
            for (entry, topic) in batch.iter().zip(topics) {
                if entry.seq < r.until
                    && let Some(t) = topic
                    && !r.scanned.contains(t)
                    && !to_scan.contains(t)
                {
                    to_scan.push(t.clone());
                }
            }
            (r.from, to_scan)
        };
        {
            let l = self.limits.lock();
            to_scan.retain(|t| !l.unreadable.contains(t));
        }
        if !to_scan.is_empty() {
            let config = self.opts.client_config();
            let limit = self.opts.restart_scan_limit;
            let topics = to_scan.clone();
            let started = Instant::now();
            let found =
                tokio::task::spawn_blocking(move || scan(&config, &topics, &stores, from, limit))
                    .await
                    .map_err(|e| format!("restart scan task failed: {e}"));
            let found = match found {
                Ok(Ok(found)) => found,
                Ok(Err(ScanError::Unreadable { topic, error })) if self.opts.scan_without_read => {
                    tracing::warn!(
                        topic,
                        %error,
                        "the Kafka restart scan may not read this topic: shipping without it \
                         (a relay restart can duplicate records)"
                    );
                    self.limits.lock().unreadable.insert(topic);
                    // Scan again (the other topics) at the next publish.
                    self.recovery.lock().due = true;
                    return Err(ScanError::Again);
                }
                Ok(Err(e)) => {
                    self.recovery.lock().due = true;
                    return Err(e);
                }
                Err(e) => {
                    self.recovery.lock().due = true;
                    return Err(ScanError::Other(e));
                }
            };
            tracing::info!(
                topics = ?to_scan,
                from,
                found = found.len(),
                elapsed = ?started.elapsed(),
                "Kafka restart scan done"
            );
            let mut r = self.recovery.lock();
            r.scanned.extend(to_scan);
            r.found.extend(found);
        }
        let r = self.recovery.lock();
        Ok(batch
            .iter()
            .filter_map(|e| r.found.get(&e.id).map(|p| (e.seq, p.clone())))
            .collect())
    }
}

/// Reads back the end of every partition of `topics` and returns the event
/// ids of the records shipped from seqs `>= from` whose id belongs to one
/// of `stores`, with their positions.
fn scan(
    config: &ClientConfig,
    topics: &[String],
    stores: &[StoreId],
    from: u64,
    limit: u64,
) -> std::result::Result<HashMap<EventId, String>, ScanError> {
    let timeout = Duration::from_secs(10);
    let mut config = config.clone();
    config
        .set("group.id", "outboxkv-relay-restart-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // Records deleted by retention during the scan: go on from the
        // oldest left, never jump to the end.
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| ScanError::Other(format!("create restart-scan consumer: {e}")))?;
    let mut found = HashMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| ScanError::Other(format!("metadata for topic {topic}: {e}")))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        match t.error() {
            None => {}
            Some(e) if is_authorization(RDKafkaErrorCode::from(e)) => {
                return Err(ScanError::Unreadable {
                    topic: topic.clone(),
                    error: format!("{:?}", RDKafkaErrorCode::from(e)),
                });
            }
            // Most likely the topic does not exist yet: nothing to find.
            Some(_) => continue,
        }
        for p in t.partitions() {
            scan_partition(&consumer, topic, p.id(), stores, from, limit, &mut found)?;
        }
    }
    Ok(found)
}

fn scan_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    stores: &[StoreId],
    from: u64,
    limit: u64,
    found: &mut HashMap<EventId, String>,
) -> std::result::Result<(), ScanError> {
    let timeout = Duration::from_secs(10);
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|e| {
            ScanError::from_kafka(topic, format!("watermarks of {topic}/{partition}"), e)
        })?;
    let mut end = high;
    let mut chunk: i64 = 256;
    let mut read: u64 = 0;
    while end > low {
        let start = end.saturating_sub(chunk).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(|e| ScanError::Other(format!("assign {topic}/{partition}: {e}")))?;
        consumer
            .assign(&tpl)
            .map_err(|e| ScanError::Other(format!("assign {topic}/{partition}: {e}")))?;
        let mut older = false;
        let mut next = start;
        // Fails only when nothing comes for 30 s, however long the chunk.
        let mut deadline = Instant::now() + Duration::from_secs(30);
        while next < end {
            if Instant::now() > deadline {
                return Err(ScanError::Other(format!(
                    "reading back {topic}/{partition} from offset {start} timed out at {next}"
                )));
            }
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = match message {
                Ok(m) => m,
                // The end of the partition: nothing left before `end` (the
                // offsets left are ones the consumer skips, such as a
                // transaction marker, which are never delivered).
                Err(KafkaError::PartitionEOF(_)) => break,
                Err(e) => {
                    return Err(ScanError::from_kafka(
                        topic,
                        format!("reading back {topic}/{partition}"),
                        e,
                    ));
                }
            };
            deadline = Instant::now() + Duration::from_secs(30);
            if message.offset() >= end {
                break;
            }
            next = message.offset() + 1;
            read += 1;
            let Some((id, seq)) = message.headers().and_then(record_ids) else {
                continue;
            };
            if !stores.contains(&id.store) {
                continue;
            }
            if seq >= from {
                found.insert(id, format!("{topic}/{partition}@{}", message.offset()));
            } else {
                older = true;
            }
        }
        if older || start == low || read >= limit {
            if !older && start != low {
                tracing::warn!(
                    topic,
                    partition,
                    read,
                    "Kafka restart scan stopped at its limit; duplicates are possible"
                );
            }
            break;
        }
        end = start;
        chunk = chunk.saturating_mul(2);
    }
    Ok(())
}

/// Marks a restart scan due when dropped armed (`.1`): a publish that did
/// not run to its end.
struct Unfinished<'a>(&'a Mutex<Recovery>, bool);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.lock().due = true;
        }
    }
}

/// Why a restart scan failed.
#[derive(Debug)]
enum ScanError {
    /// The principal may not read `topic`.
    Unreadable {
        topic: String,
        error: String,
    },
    /// A topic was taken out of the scan: scan the rest at the next publish.
    Again,
    Other(String),
}

impl ScanError {
    fn from_kafka(topic: &str, what: String, e: KafkaError) -> ScanError {
        match e.rdkafka_error_code() {
            Some(code) if is_authorization(code) => ScanError::Unreadable {
                topic: topic.to_string(),
                error: format!("{what}: {e}"),
            },
            _ => ScanError::Other(format!("{what}: {e}")),
        }
    }
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Unreadable { topic, error } => {
                f.write_str(&unreadable_message(topic, error))
            }
            ScanError::Again => {
                f.write_str("a topic the scan may not read was taken out; scanning again")
            }
            ScanError::Other(e) => f.write_str(e),
        }
    }
}

fn is_authorization(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

fn unreadable_message(topic: &str, error: &str) -> String {
    format!(
        "refused: the restart scan may not read topic {topic} ({error}); grant the relay's \
         principal READ (and DESCRIBE) on it, or set restart_scan_without_read \
         (--kafka-restart-scan-without-read) to ship without the scan and accept duplicates \
         after a restart"
    )
}

/// Reads one record at the end of each partition of `topic` (if it has
/// any), to see that the restart scan may read it.
fn probe_read(config: &ClientConfig, topic: &str) -> std::result::Result<(), String> {
    let mut config = config.clone();
    config
        .set("group.id", "outboxkv-relay-restart-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(());
    };
    if let Some(e) = t.error() {
        let code = RDKafkaErrorCode::from(e);
        return if is_authorization(code) {
            Err(format!("{code:?}"))
        } else {
            Ok(())
        };
    }
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), timeout)
            .map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p.id(), Offset::Offset((high - 1).max(low)))
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        // An empty partition answers nothing, but a refused fetch answers
        // with an error.
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(_)) => break,
                Some(Err(e)) => {
                    return match e.rdkafka_error_code() {
                        Some(code) if is_authorization(code) => Err(e.to_string()),
                        _ => Ok(()),
                    };
                }
                // An empty partition: half the time is enough for a refusal
                // to come back.
                None if high <= low
                    && deadline.saturating_duration_since(Instant::now()) < timeout / 2 =>
                {
                    break;
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// The event id and outbox seq headers of a record, if it has both.
fn record_ids<H: Headers>(headers: &H) -> Option<(EventId, u64)> {
    let mut id = None;
    let mut seq = None;
    for h in headers.iter() {
        let Some(value) = h.value.and_then(|v| std::str::from_utf8(v).ok()) else {
            continue;
        };
        match h.key {
            // The sink writes its own headers first: the first of each
            // name is the sink's.
            "ce_id" if id.is_none() => id = Some(value.parse::<EventId>().ok()),
            SEQ_HEADER if seq.is_none() => seq = Some(value.parse::<u64>().ok()),
            _ => {}
        }
    }
    Some((id??, seq??))
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            self.rebuild_if_fatal();
            let topics: Vec<Option<String>> = batch
                .iter()
                .map(|e| Some(self.opts.render(&e.event_type, &e.key)).filter(|t| valid_topic(t)))
                .collect();
            self.learn_limits(&topics).await;
            let delivered = match self.already_delivered(batch, &topics).await {
                Ok(d) => d,
                Err(e @ ScanError::Unreadable { .. }) => {
                    let error = e.to_string();
                    return batch
                        .iter()
                        .map(|_| Outcome::Fatal {
                            error: error.clone(),
                        })
                        .collect();
                }
                Err(error) => {
                    let error = format!("restart scan: {error}");
                    return batch
                        .iter()
                        .map(|_| Outcome::Retry {
                            error: error.clone(),
                        })
                        .collect();
                }
            };
            let producer = self.producer.lock().clone();
            let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
            let mut inflight: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
            // Keys with an entry refused before sending: their later
            // entries wait for the next round (the refusal may be held
            // back by the storm guard, and must not be overtaken).
            let mut refused: HashSet<&str> = HashSet::new();
            // A publish dropped half-way (a relay stopping) leaves records
            // that may or may not be in Kafka: look before the next one.
            let mut unfinished = Unfinished(&self.recovery, self.opts.restart_dedup);
            for (i, (entry, topic)) in batch.iter().zip(&topics).enumerate() {
                // Entries refused on their own are judged first: a run of
                // them settles in one round.
                let refusal = cloudevents::unsafe_for_headers(entry)
                    .map(|why| format!("not published: {why}"))
                    .or_else(|| {
                        topic.is_none().then(|| {
                            format!(
                                "invalid Kafka topic {:?}",
                                self.opts.render(&entry.event_type, &entry.key)
                            )
                        })
                    });
                if let Some(error) = refusal {
                    outcomes[i] = Some(Outcome::Rejected {
                        error,
                        permanent: true,
                    });
                    if !entry.key.is_empty() {
                        refused.insert(entry.key.as_str());
                    }
                    continue;
                }
                if refused.contains(entry.key.as_str()) {
                    outcomes[i] = Some(Outcome::Held {
                        reason: "held back: an earlier entry of the same key was not sent".into(),
                    });
                    continue;
                }
                if let Some(position) = delivered.get(&entry.seq) {
                    outcomes[i] = Some(Outcome::Acked {
                        position: Some(position.clone()),
                        duplicate: true,
                    });
                    continue;
                }
                if inflight.len() >= self.opts.window
                    && let Some((j, d)) = inflight.pop_front()
                {
                    outcomes[j] = Some(self.await_delivery(topic_of(&topics, j), d).await);
                }
                match self
                    .send(&producer, &topics, i, entry, &mut inflight, &mut outcomes)
                    .await
                {
                    Ok(d) => inflight.push_back((i, d)),
                    Err(e) => {
                        outcomes[i] = Some(self.classify(&e));
                        if !entry.key.is_empty() {
                            refused.insert(entry.key.as_str());
                        }
                    }
                }
            }
            // Every delivery future is awaited: a dropped one would hide its error.
            while let Some((j, d)) = inflight.pop_front() {
                outcomes[j] = Some(self.await_delivery(topic_of(&topics, j), d).await);
            }
            unfinished.1 = false;
            let mut outcomes: Vec<Outcome> = outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or(Outcome::Retry {
                        error: "no outcome recorded".into(),
                    })
                })
                .collect();
            self.sort_out_too_large(batch, &topics, &mut outcomes);
            if outcomes.iter().any(|o| {
                !matches!(
                    o,
                    // Held entries were not sent: nothing to look for.
                    Outcome::Acked { .. }
                        | Outcome::Held { .. }
                        | Outcome::Rejected {
                            permanent: true,
                            ..
                        }
                )
            }) {
                // Some records may or may not be in Kafka: look before the
                // next attempt.
                self.recovery.lock().due = self.opts.restart_dedup;
            }
            outcomes
        })
    }
}

impl KafkaSink {
    /// A record refused as too large is a permanent rejection if it is
    /// larger than its topic's `max.message.bytes` on its own; otherwise it
    /// may have been refused in a batch that outgrew a limit the sink did
    /// not know (lowered meanwhile): it is retried once, after the topic's
    /// limit is read again, and refused again the refusal stands.
    fn sort_out_too_large(
        &self,
        batch: &[OutboxEntry],
        topics: &[Option<String>],
        outcomes: &mut [Outcome],
    ) {
        for (i, outcome) in outcomes.iter_mut().enumerate() {
            let Outcome::Rejected {
                permanent: true,
                error,
            } = outcome
            else {
                continue;
            };
            if !error.to_lowercase().contains("too large") {
                continue;
            }
            let topic = topic_of(topics, i);
            let mut limits = self.limits.lock();
            let limit = limits.known.get(topic).copied().flatten();
            let id = batch[i].id;
            // Fits on its own, or the limit is unknown (not readable): the
            // refusal may be the batch's; retry once, reading the limit again.
            let maybe_batch = limit.is_none_or(|l| batch[i].size_hint() + BATCH_MARGIN <= l);
            if maybe_batch && !limits.retried_too_large.contains(&id) {
                if limits.retried_too_large.len() >= 10_000 {
                    limits.retried_too_large.clear();
                }
                limits.retried_too_large.insert(id);
                limits.known.remove(topic);
                limits.cap = None;
                *outcome = Outcome::Retry {
                    error: format!(
                        "{error} (maybe in a batch over the topic's limit; retrying once)"
                    ),
                };
            }
        }
    }
}

fn topic_of(topics: &[Option<String>], i: usize) -> &str {
    topics.get(i).and_then(|t| t.as_deref()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(valid_topic("orders.paid"));
        assert!(valid_topic("a-b_c.1"));
        for bad in ["", ".", "..", "a b", "a/b", "ü", &"x".repeat(250)] {
            assert!(!valid_topic(bad), "{bad}");
        }
        let o = KafkaOptions::new("x").topic_template("svc.{type}.{key}");
        assert_eq!(o.render("orders.paid", "k1"), "svc.orders.paid.k1");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let o = KafkaOptions::new("127.0.0.1:1")
            .set("sasl.password", "hunter22")
            .set("ssl.key.password", "p4ss")
            .set("sasl.username", "relay");
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("hunter22") && !dbg.contains("p4ss"), "{dbg}");
        assert!(dbg.contains("relay"), "{dbg}");
    }

    #[test]
    fn sink_settings_win_over_pass_through() {
        let o = KafkaOptions::new("127.0.0.1:1")
            .set("enable.idempotence", "false")
            .set("acks", "1")
            .set("security.protocol", "SASL_SSL");
        let c = o.producer_config(None);
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
    }

    #[test]
    fn record_ids_need_both_headers() {
        let id = EventId {
            store: StoreId([7; 16]),
            seq: 3,
        };
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(id.to_string().as_str()),
            })
            .insert(Header {
                key: SEQ_HEADER,
                value: Some("9"),
            });
        assert_eq!(record_ids(&h), Some((id, 9)));
        let only_id = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(id.to_string().as_str()),
        });
        assert_eq!(record_ids(&only_id), None);
        // A record whose event headers repeat the sink's names (written
        // before those names were refused at emit): the sink's own, first,
        // count.
        let forged = EventId {
            store: StoreId([7; 16]),
            seq: 5,
        };
        let repeated = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(id.to_string().as_str()),
            })
            .insert(Header {
                key: SEQ_HEADER,
                value: Some("9"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(forged.to_string().as_str()),
            })
            .insert(Header {
                key: SEQ_HEADER,
                value: Some("5"),
            });
        assert_eq!(record_ids(&repeated), Some((id, 9)));
        let garbage = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some("not-an-id"),
            })
            .insert(Header {
                key: SEQ_HEADER,
                value: Some("x"),
            });
        assert_eq!(record_ids(&garbage), None);
    }
}
