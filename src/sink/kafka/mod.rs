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
//! | `ce_<attribute>` | CloudEvents binary mode (Kafka protocol binding): every attribute and extension of [`cloudevents`](crate::sink::cloudevents) but `datacontenttype` (`ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_subject`, `ce_time`, `ce_partitionkey`, `ce_outboxseq`, `ce_traceparent`, ...) |
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
//! Why that is exact: the sink hands records to the producer in seq order
//! (with several batches in flight, one batch's records after the previous
//! one's; see "Order"), and the producer keeps each partition in send
//! order, so in every partition this store's records for seqs below the
//! relay's cursor come before every record at or above it (apart from an
//! entry sent again after one acknowledged beyond it: the scan may then
//! stop early, and a consumer sees a duplicate). The scan skips only entries
//! whose event id it has read in the topic, so it can never lose an entry:
//! a copy restored from [`Store::checkpoint`](crate::Store::checkpoint)
//! holds the original's unshipped entries (the original's ids) and then its
//! own (its own ids, at seqs the original may have shipped entries of its
//! own at); only the original's ids are taken for duplicates. What it does not
//! cover: topics first written more than [`KafkaOptions::restart_span`] seqs
//! after the cursor (keep the span above what the relay has in flight), a scan
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
//! per-key order holds. The relay may have several batches in flight: the
//! sink hands their records to the producer in call order (a batch's
//! records all before the next batch's; their deliveries overlap), replaces
//! the producer (after a fatal error, for a smaller batch cap) only when no
//! other batch has deliveries outstanding, and holds back an entry whose
//! earlier entry of the same key was refused before sending, in an earlier
//! batch too. The one way a broker could still store a later
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
//! the first scan ([`Outcome::Fatal`](crate::relay::Outcome::Fatal)), with an error saying what to
//! grant, unless [`KafkaOptions::restart_scan_without_read`] says to ship
//! without the scan for such topics (then a relay restart can duplicate
//! records; consumers deduplicate on `ce_id`).

mod context;
mod options;
mod order;
mod publish;
mod scan;

pub use options::{KafkaOptions, valid_topic};

use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::Producer;
use std::sync::Arc;

use crate::broker::kafka::{client_error, secrets_of};
use crate::error::{Error, Result};
use context::{LastError, SinkProducer};
use publish::TopicLimits;
use scan::Recovery;

/// The header carrying the outbox seq an entry was shipped from.
pub const SEQ_HEADER: &str = "outboxkv_seq";

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
    /// Send phases of the publishes in flight, in call order.
    line: order::Turnstile,
    /// Keys with an entry refused before sending, and the lowest such seq.
    refused_keys: Mutex<std::collections::HashMap<String, u64>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
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
        let producer = opts.create_producer(&last_error, None).map_err(|e| {
            broker(format!(
                "create producer for {}: {}",
                opts.conn.bootstrap,
                client_error(&e, &secrets_of(&opts.client_config()))
            ))
        })?;
        let admin: AdminClient<DefaultClientContext> =
            opts.client_config().create().map_err(|e| {
                broker(format!(
                    "create admin client for {}: {}",
                    opts.conn.bootstrap,
                    client_error(&e, &secrets_of(&opts.client_config()))
                ))
            })?;
        let producer = Arc::new(producer);
        let p = producer.clone();
        let bootstrap = opts.conn.bootstrap.clone();
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
            line: order::Turnstile::default(),
            refused_keys: Mutex::new(std::collections::HashMap::new()),
        };
        sink.check_read_permission().await?;
        Ok(sink)
    }

    /// Waits up to `timeout` for every queued record to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let p = self.producer.lock().clone();
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .map_err(|e| broker(format!("flush task failed: {e}")))?
            .map_err(|e| broker(format!("flush: {e}")))
    }
}
