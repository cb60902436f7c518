//! The Apache Kafka sink (feature `kafka`).
//!
//! # Records
//!
//! One record per outbox entry, on the topic rendered from the event type
//! ([`KafkaOptions::topic_template`]), with the event key as the record key:
//! Kafka keeps the order of records with the same key inside their partition,
//! so per-key order is per-partition order. The partitioner defaults to
//! `murmur2_random`, the Java client's, so Java producers and consumers agree
//! on which partition a key lives in. Headers:
//!
//! | header | value |
//! |---|---|
//! | `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_subject`, `ce_time` | CloudEvents binary mode (Kafka protocol binding) |
//! | `content-type` | the entry's content type |
//! | `outboxkv_seq` | the outbox seq the entry was shipped from (decimal) |
//! | the event's own headers | as added, `traceparent` and `tracestate` among them |
//!
//! `ce_id` is the event id, `<store id>-<seq at commit>`: the key for
//! consumer-side deduplication.
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
//! and reports those entries as delivered (duplicates) instead of sending
//! them again. It reads back until it meets one of this store's records with
//! a lower seq, or the start of the partition, or
//! [`KafkaOptions::restart_scan_limit`] records.
//!
//! Why that is exact: the relay publishes a batch only after the previous
//! one has settled, and the producer keeps each partition in send order, so
//! in every partition this store's records for seqs below the relay's cursor
//! come before every record at or above it. The scan skips only what it has
//! read in the topic, so it can never lose an entry. What it does not
//! cover: topics first written more than [`KafkaOptions::restart_span`] seqs
//! after the cursor (keep the span above the relay's batch size), a scan
//! cut short by the limit, and a record another process wrote after the
//! scan: in those cases a consumer sees a duplicate, which `ce_id` detects.
//!
//! # Ordering after a failure
//!
//! When one record of a batch fails and later records of the batch succeed,
//! the relay publishes again from the failed one; the restart scan then
//! skips the later ones that were stored. The failed record then lands after
//! later records of its key in the same partition (the same corner case as
//! every pipelined producer without transactions).
//!
//! # Oversized records
//!
//! A record the broker refuses as too large is sent once more on its own
//! (the producer may have packed small records together into a batch the
//! topic refuses); refused again, it is a permanent rejection and the relay
//! dead-letters it with the broker's error.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
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
#[derive(Debug, Clone)]
#[must_use]
pub struct KafkaOptions {
    bootstrap: String,
    template: String,
    partitioner: String,
    window: usize,
    delivery_timeout: Duration,
    restart_dedup: bool,
    restart_span: u64,
    restart_scan_limit: u64,
    extra: BTreeMap<String, String>,
}

impl KafkaOptions {
    /// Options for the brokers at `bootstrap` (`host:port[,host:port...]`).
    pub fn new(bootstrap: impl Into<String>) -> KafkaOptions {
        KafkaOptions {
            bootstrap: bootstrap.into(),
            template: "{type}".into(),
            partitioner: "murmur2_random".into(),
            window: 10_000,
            delivery_timeout: Duration::from_secs(30),
            restart_dedup: true,
            restart_span: 10_000,
            restart_scan_limit: 100_000,
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
    /// Default: 30 s.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
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

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("client.id", "outboxkv-relay")
            .set("partitioner", &self.partitioner)
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().max(1).to_string(),
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
}

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
    fn create_producer(&self, last_error: &LastError) -> rdkafka::error::KafkaResult<SinkProducer> {
        self.producer_config().create_with_context(SinkContext {
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
    /// Seqs found in the topics, with their position.
    found: HashMap<u64, String>,
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
            .create_producer(&last_error)
            .map_err(|e| broker(format!("create producer for {}: {e}", opts.bootstrap)))?;
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
        Ok(KafkaSink {
            opts,
            producer: Mutex::new(producer),
            recovery: Mutex::new(recovery),
        })
    }

    /// Waits up to `timeout` for every queued record to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let p = self.producer.lock().clone();
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .map_err(|e| broker(format!("flush task failed: {e}")))?
            .map_err(|e| broker(format!("flush: {e}")))
    }

    fn headers(entry: &OutboxEntry, id: &str) -> OwnedHeaders {
        let seq = entry.seq.to_string();
        let source = cloudevents::source(entry);
        let time = cloudevents::rfc3339_micros(entry.created_at_micros);
        let mut h = OwnedHeaders::new_with_capacity(9 + entry.headers.len());
        for (key, value) in [
            ("ce_specversion", cloudevents::SPEC_VERSION),
            ("ce_id", id),
            ("ce_source", source.as_str()),
            ("ce_type", entry.event_type.as_str()),
            ("ce_subject", entry.key.as_str()),
            ("ce_time", time.as_str()),
            ("content-type", entry.content_type.as_str()),
            (SEQ_HEADER, seq.as_str()),
        ] {
            h = h.insert(Header {
                key,
                value: Some(value),
            });
        }
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
        let id = entry.id.to_string();
        loop {
            let record = FutureRecord::to(topic)
                .key(entry.key.as_bytes())
                .payload(entry.payload.as_slice())
                .headers(Self::headers(entry, &id))
                .timestamp((entry.created_at_micros / 1000) as i64);
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
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::InvalidRecord,
            ) => Outcome::Rejected {
                error,
                permanent: true,
            },
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::UnsupportedForMessageFormat,
            ) => Outcome::Rejected {
                error,
                permanent: false,
            },
            // Timeouts, a broker that is down, a topic being created, leader
            // changes: nothing wrong with the entry; retry until it works.
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
            match self.opts.create_producer(&LastError::default()) {
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

    /// Runs the restart scan if one is due and returns the seqs of `batch`
    /// already in Kafka, with their positions.
    async fn already_delivered(
        &self,
        batch: &[OutboxEntry],
        topics: &[Option<String>],
    ) -> std::result::Result<HashMap<u64, String>, String> {
        let Some(first) = batch.first() else {
            return Ok(HashMap::new());
        };
        let (from, to_scan) = {
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
        if !to_scan.is_empty() {
            let config = self.opts.client_config();
            let store = first.id.store;
            let limit = self.opts.restart_scan_limit;
            let topics = to_scan.clone();
            let started = Instant::now();
            let found =
                tokio::task::spawn_blocking(move || scan(&config, &topics, store, from, limit))
                    .await
                    .map_err(|e| format!("restart scan task failed: {e}"));
            let found = match found {
                Ok(Ok(found)) => found,
                Ok(Err(e)) | Err(e) => {
                    self.recovery.lock().due = true;
                    return Err(e);
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
            .filter_map(|e| r.found.get(&e.seq).map(|p| (e.seq, p.clone())))
            .collect())
    }
}

/// Reads back the end of every partition of `topics` and returns the outbox
/// seqs `>= from` that `store` wrote there, with their positions.
fn scan(
    config: &ClientConfig,
    topics: &[String],
    store: StoreId,
    from: u64,
    limit: u64,
) -> std::result::Result<HashMap<u64, String>, String> {
    let timeout = Duration::from_secs(10);
    let mut config = config.clone();
    config
        .set("group.id", "outboxkv-relay-restart-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_uncommitted");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| format!("create restart-scan consumer: {e}"))?;
    let mut found = HashMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("metadata for topic {topic}: {e}"))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        if t.error().is_some() {
            // Most likely the topic does not exist yet: nothing to find.
            continue;
        }
        for p in t.partitions() {
            scan_partition(&consumer, topic, p.id(), store, from, limit, &mut found)?;
        }
    }
    Ok(found)
}

fn scan_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    store: StoreId,
    from: u64,
    limit: u64,
    found: &mut HashMap<u64, String>,
) -> std::result::Result<(), String> {
    let timeout = Duration::from_secs(10);
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|e| format!("watermarks of {topic}/{partition}: {e}"))?;
    let mut end = high;
    let mut chunk: i64 = 256;
    let mut read: u64 = 0;
    while end > low {
        let start = end.saturating_sub(chunk).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(|e| format!("assign {topic}/{partition}: {e}"))?;
        consumer
            .assign(&tpl)
            .map_err(|e| format!("assign {topic}/{partition}: {e}"))?;
        let mut older = false;
        let mut next = start;
        let deadline = Instant::now() + Duration::from_secs(30);
        while next < end {
            if Instant::now() > deadline {
                return Err(format!(
                    "reading back {topic}/{partition} from offset {start} timed out at {next}"
                ));
            }
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message.map_err(|e| format!("reading back {topic}/{partition}: {e}"))?;
            if message.offset() >= end {
                break;
            }
            next = message.offset() + 1;
            read += 1;
            let Some((id, seq)) = message.headers().and_then(record_ids) else {
                continue;
            };
            if id.store != store {
                continue;
            }
            if seq >= from {
                found.insert(seq, format!("{topic}/{partition}@{}", message.offset()));
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

/// The event id and outbox seq headers of a record, if it has both.
fn record_ids<H: Headers>(headers: &H) -> Option<(EventId, u64)> {
    let mut id = None;
    let mut seq = None;
    for h in headers.iter() {
        let Some(value) = h.value.and_then(|v| std::str::from_utf8(v).ok()) else {
            continue;
        };
        match h.key {
            "ce_id" => id = value.parse::<EventId>().ok(),
            SEQ_HEADER => seq = value.parse::<u64>().ok(),
            _ => {}
        }
    }
    Some((id?, seq?))
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
            let delivered = match self.already_delivered(batch, &topics).await {
                Ok(d) => d,
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
            for (i, (entry, topic)) in batch.iter().zip(&topics).enumerate() {
                if let Some(position) = delivered.get(&entry.seq) {
                    outcomes[i] = Some(Outcome::Acked {
                        position: Some(position.clone()),
                        duplicate: true,
                    });
                    continue;
                }
                if topic.is_none() {
                    outcomes[i] = Some(Outcome::Rejected {
                        error: format!(
                            "invalid Kafka topic {:?}",
                            self.opts.render(&entry.event_type, &entry.key)
                        ),
                        permanent: true,
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
                    Err(e) => outcomes[i] = Some(self.classify(&e)),
                }
            }
            // Every delivery future is awaited: a dropped one would hide its error.
            while let Some((j, d)) = inflight.pop_front() {
                outcomes[j] = Some(self.await_delivery(topic_of(&topics, j), d).await);
            }
            let mut outcomes: Vec<Outcome> = outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or(Outcome::Retry {
                        error: "no outcome recorded".into(),
                    })
                })
                .collect();
            self.resend_oversized_alone(batch, &topics, &producer, &mut outcomes)
                .await;
            if outcomes.iter().any(|o| {
                !matches!(
                    o,
                    Outcome::Acked { .. }
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
    /// Records refused as too large are sent once more each on its own: the
    /// producer may have packed them with others into a batch the topic
    /// refuses. Refused alone, the refusal stands.
    async fn resend_oversized_alone(
        &self,
        batch: &[OutboxEntry],
        topics: &[Option<String>],
        producer: &SinkProducer,
        outcomes: &mut [Outcome],
    ) {
        for i in 0..batch.len() {
            let Outcome::Rejected {
                permanent: true,
                error,
            } = &outcomes[i]
            else {
                continue;
            };
            if !error.contains("too large") || batch.len() == 1 {
                continue;
            }
            let mut none = VecDeque::new();
            let mut scratch = vec![None; batch.len()];
            outcomes[i] = match self
                .send(producer, topics, i, &batch[i], &mut none, &mut scratch)
                .await
            {
                Ok(d) => self.await_delivery(topic_of(topics, i), d).await,
                Err(e) => self.classify(&e),
            };
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
    fn sink_settings_win_over_pass_through() {
        let o = KafkaOptions::new("127.0.0.1:1")
            .set("enable.idempotence", "false")
            .set("acks", "1")
            .set("security.protocol", "SASL_SSL");
        let c = o.producer_config();
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
