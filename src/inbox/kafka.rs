//! [`KafkaReader`]: feeds an [`Inbox`] from a Kafka consumer group whose
//! positions come from the store.
//!
//! - On every assignment (the group's rebalance callback), each assigned
//!   partition is positioned at the store's position for it; a partition
//!   the store has no position for starts at the group's committed offset
//!   (else `auto.offset.reset`, default `earliest`). If the store cannot be
//!   read, nothing is assigned and [`KafkaReader::run`] fails at once, and
//!   again on every later call (drop the reader and connect a new one): the
//!   reader never starts from a place the store did not choose.
//! - When [`KafkaReader::run`] fails with messages taken from the consumer
//!   but not settled, the next call first seeks their partitions back to
//!   the lowest of them, so calling it again loses nothing. Consumer
//!   errors librdkafka reports as non-fatal (a broker down for a while) are
//!   logged and waited out; fatal ones end the run.
//! - Messages are taken in batches of what has arrived (up to
//!   [`KafkaReaderOptions::batch`]) and applied in one commit; partitions are
//!   applied in offset order. After the commit, the offsets are stored for
//!   the group's auto-commit: **for monitoring only** (lag in
//!   `kafka-consumer-groups.sh`); the store's positions decide.
//! - A handler failure with attempts left seeks its partition back to the
//!   message and tries again after [`KafkaReaderOptions::retry_delay`]
//!   (attempts are counted by the reader); on the last attempt the message
//!   is dead-lettered and the partition goes on.
//! - A partition that moves to a member with another store is exactly-once
//!   per store, not across stores (see the [inbox documentation](super)).
//!
//! librdkafka settings the reader owns: `group.id`, `enable.auto.commit`
//! (true), `enable.auto.offset.store` (false), `statistics.interval.ms`
//! (1000, for the lag metric). `auto.offset.reset` defaults to `earliest`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message as _};

use super::message::Message;
use super::{Inbox, InboxTx, Outcome};
use crate::broker::kafka::KafkaConnection;
use crate::error::{Error, Result};

const ROLE: &str = "kafka inbox";

/// Options of a [`KafkaReader`].
///
/// ```
/// use outboxkv::broker::kafka::KafkaConnection;
/// use outboxkv::inbox::kafka::KafkaReaderOptions;
/// let opts = KafkaReaderOptions::new(KafkaConnection::new("127.0.0.1:9092"), "billing", ["orders.placed"])
///     .batch(500);
/// assert_eq!(opts.group(), "billing");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct KafkaReaderOptions {
    conn: KafkaConnection,
    group: String,
    topics: Vec<String>,
    batch: usize,
    retry_delay: Duration,
}

impl KafkaReaderOptions {
    /// Consumes `topics` in consumer group `group`. Defaults: batches of up
    /// to 256, retries after 200 ms.
    pub fn new<T: Into<String>>(
        conn: KafkaConnection,
        group: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        KafkaReaderOptions {
            conn,
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            batch: 256,
            retry_delay: Duration::from_millis(200),
        }
    }

    /// Most messages applied in one commit (at least 1). Default: 256.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The wait before a failed message is tried again. Default: 200 ms.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }
}

/// The consumer's context: positions partitions from the store on
/// assignment, keeps librdkafka's errors, and reads the lag from its
/// statistics.
pub(crate) struct InboxContext {
    inbox: Inbox,
    failure: Arc<Mutex<Option<String>>>,
    /// Wakes [`KafkaReader::run`] when `failure` is set.
    wake: Arc<tokio::sync::Notify>,
    /// Secret setting values, scrubbed from librdkafka's reports.
    secrets: Vec<String>,
}

impl ClientContext for InboxContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let report = crate::broker::kafka::client_report(&error, reason, &self.secrets);
        tracing::warn!(%report, "Kafka inbox client error");
    }

    fn stats(&self, statistics: Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.inbox.metrics().lag.set(lag);
    }
}

impl ConsumerContext for InboxContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                match self.position_from_store(tpl) {
                    Ok(()) if cooperative => consumer.incremental_assign(tpl),
                    Ok(()) => consumer.assign(tpl),
                    Err(e) => {
                        self.fail(format!("read the store's positions on assignment: {e}"));
                        return;
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if cooperative => {
                consumer.incremental_unassign(tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => consumer.unassign(),
            other => {
                tracing::warn!(error = ?other, "Kafka inbox rebalance error");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            self.fail(format!("rebalance: {e}"));
        }
    }
}

impl InboxContext {
    fn fail(&self, message: String) {
        *self.failure.lock() = Some(message);
        self.wake.notify_one();
    }

    fn position_from_store(&self, tpl: &mut TopicPartitionList) -> Result<()> {
        let assigned: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in assigned {
            let Ok(p) = u32::try_from(partition) else {
                continue;
            };
            if let Some(pos) = self.inbox.position(&topic, p)? {
                let offset = i64::try_from(pos.next).map_err(|_| {
                    Error::corruption(
                        format!("inbox position of {topic}/{partition}"),
                        format!("offset {} beyond i64", pos.next),
                    )
                })?;
                tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                    .map_err(|e| Error::Broker {
                        sink: ROLE.into(),
                        message: format!("position {topic}/{partition}: {e}"),
                    })?;
                tracing::debug!(%topic, partition, offset, "Kafka inbox partition positioned from the store");
            }
        }
        Ok(())
    }
}

/// Feeds an [`Inbox`] from a Kafka consumer group (see the
/// [module documentation](self)).
///
/// ```no_run
/// use outboxkv::broker::kafka::KafkaConnection;
/// use outboxkv::inbox::{Inbox, kafka::{KafkaReader, KafkaReaderOptions}};
/// # async fn run(store: outboxkv::Store) -> outboxkv::Result<()> {
/// let inbox = Inbox::new(&store, "billing")?;
/// let opts = KafkaReaderOptions::new(KafkaConnection::new("127.0.0.1:9092"), "billing", ["orders.placed"]);
/// let mut reader = KafkaReader::connect(inbox, opts)?;
/// reader.run(|_tx| Ok(()), std::future::pending()).await
/// # }
/// ```
pub struct KafkaReader {
    inbox: Inbox,
    opts: KafkaReaderOptions,
    consumer: StreamConsumer<InboxContext>,
    failure: Arc<Mutex<Option<String>>>,
    wake: Arc<tokio::sync::Notify>,
    /// The reader's own attempt count per (topic, partition, offset) being
    /// retried.
    attempts: HashMap<(String, u32, u64), u32>,
    /// Per partition, the lowest offset taken from the consumer and not
    /// settled yet: where a run that failed mid-batch resumes.
    unsettled: HashMap<(String, u32), u64>,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl KafkaReader {
    /// Creates the consumer and subscribes. Fails with [`Error::Broker`].
    pub fn connect(inbox: Inbox, opts: KafkaReaderOptions) -> Result<KafkaReader> {
        let broker = |message: String| Error::Broker {
            sink: ROLE.into(),
            message,
        };
        let mut config = opts.conn.client_config();
        if !opts.conn.settings.contains_key("auto.offset.reset") {
            config.set("auto.offset.reset", "earliest");
        }
        config
            .set("group.id", &opts.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("statistics.interval.ms", "1000")
            .set("client.id", "outboxkv-inbox");
        let failure = Arc::new(Mutex::new(None));
        let wake = Arc::new(tokio::sync::Notify::new());
        let consumer: StreamConsumer<InboxContext> = config
            .create_with_context(InboxContext {
                inbox: inbox.clone(),
                failure: failure.clone(),
                wake: wake.clone(),
                secrets: crate::broker::kafka::secrets_of(&config),
            })
            .map_err(|e| {
                broker(format!(
                    "create consumer for {}: {}",
                    opts.conn.bootstrap,
                    crate::broker::kafka::client_error(
                        &e,
                        &crate::broker::kafka::secrets_of(&opts.conn.client_config())
                    )
                ))
            })?;
        let topics: Vec<&str> = opts.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| broker(format!("subscribe to {topics:?}: {e}")))?;
        Ok(KafkaReader {
            inbox,
            opts,
            consumer,
            failure,
            wake,
            attempts: HashMap::new(),
            unsettled: HashMap::new(),
        })
    }

    /// The inbox fed.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    fn check(&self) -> Result<()> {
        // Kept: a reader whose assignment failed stays failed.
        match self.failure.lock().clone() {
            Some(message) => Err(Error::Broker {
                sink: ROLE.into(),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Applies messages with `handler` until `shutdown` completes (then
    /// returns `Ok` after the batch in hand is settled) or the store or
    /// the consumer fails.
    pub async fn run<F, S>(&mut self, mut handler: F, shutdown: S) -> Result<()>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
        S: std::future::Future<Output = ()>,
    {
        self.check()?;
        self.resume()?;
        let topics = self.opts.topics.clone();
        self.inbox
            .replay_queued_of(|topic| topics.iter().any(|t| t == topic), &mut handler)
            .await?;
        let mut shutdown = std::pin::pin!(shutdown);
        let wake = self.wake.clone();
        loop {
            self.check()?;
            let batch = {
                let first = tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(()),
                    () = wake.notified() => continue,
                    m = self.consumer.recv() => m,
                };
                let Some(first) = take(&self.attempts, &mut self.unsettled, first)? else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut batch = vec![first];
                while batch.len() < self.opts.batch {
                    let Some(next) = self.consumer.recv().now_or_never() else {
                        break;
                    };
                    match take(&self.attempts, &mut self.unsettled, next)? {
                        Some(m) => batch.push(m),
                        None => break,
                    }
                }
                batch
            };
            self.check()?;
            let outcomes = self.inbox.apply(&batch, &mut handler).await?;
            let mut retry = false;
            // Per partition: the offset to store, the offset to seek back to.
            let mut done: HashMap<(&str, u32), u64> = HashMap::new();
            let mut back: HashMap<(&str, u32), u64> = HashMap::new();
            for (m, outcome) in batch.iter().zip(&outcomes) {
                let key = (m.stream.as_str(), m.partition);
                if outcome.settled() {
                    self.attempts
                        .remove(&(m.stream.clone(), m.partition, m.position));
                    if !back.contains_key(&key) {
                        done.insert(key, m.position + 1);
                    }
                } else {
                    if matches!(outcome, Outcome::Retry { .. }) {
                        *self
                            .attempts
                            .entry((m.stream.clone(), m.partition, m.position))
                            .or_insert(m.attempt) += 1;
                    }
                    retry = true;
                    back.entry(key).or_insert(m.position);
                }
            }
            for ((topic, partition), next) in done {
                // Monitoring only: a failure here loses nothing.
                if let Err(e) = self
                    .consumer
                    .store_offset(topic, partition as i32, next as i64)
                {
                    tracing::debug!(%topic, partition, error = %e, "Kafka inbox could not store an offset");
                }
            }
            for ((topic, partition), offset) in back {
                self.seek_back(topic, partition, offset)?;
            }
            for m in &batch {
                self.unsettled.remove(&(m.stream.clone(), m.partition));
            }
            if retry {
                tokio::time::sleep(self.opts.retry_delay).await;
            }
            // Bounded: entries are removed when settled, and only messages
            // of assigned partitions being retried are here.
            if self.attempts.len() > 100_000 {
                self.attempts.clear();
            }
        }
    }

    /// Seeks `topic`/`partition` back to `offset`. A partition that is not
    /// fetching (revoked meanwhile, by a rebalance served while the batch
    /// was taken, or assigned with its fetch not started) is left alone:
    /// its fetch starts where the rebalance callback put it, the store's
    /// position, which is at or below `offset`.
    fn seek_back(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        let Err(e) = self.consumer.seek(
            topic,
            partition as i32,
            Offset::Offset(offset as i64),
            Duration::from_secs(10),
        ) else {
            return Ok(());
        };
        let text = e.to_string();
        let assigned = self
            .consumer
            .assignment()
            .map(|a| a.find_partition(topic, partition as i32).is_some())
            .unwrap_or(true);
        if !assigned
            || text.contains("Erroneous state")
            || text.contains("Previous operation in progress")
        {
            tracing::debug!(%topic, partition, offset, error = %text, "Kafka inbox partition not fetching: not sought back");
            return Ok(());
        }
        Err(Error::Broker {
            sink: ROLE.into(),
            message: format!("seek {topic}/{partition} back to {offset}: {text}"),
        })
    }

    /// Seeks back the partitions of messages a failed run took and did
    /// not settle (those still assigned: a partition revoked since is
    /// positioned from the store when it comes back).
    fn resume(&mut self) -> Result<()> {
        if self.unsettled.is_empty() {
            return Ok(());
        }
        let assigned = self.consumer.assignment().map_err(|e| Error::Broker {
            sink: ROLE.into(),
            message: format!("read the assignment: {e}"),
        })?;
        let mut pending: Vec<((String, u32), u64)> = self.unsettled.drain().collect();
        while let Some(((topic, partition), offset)) = pending.pop() {
            if assigned.find_partition(&topic, partition as i32).is_none() {
                continue;
            }
            if let Err(e) = self.seek_back(&topic, partition, offset) {
                // Kept for the next call.
                self.unsettled.insert((topic, partition), offset);
                self.unsettled.extend(pending);
                return Err(e);
            }
            tracing::debug!(%topic, partition, offset, "Kafka inbox resumes a partition after a failed run");
        }
        Ok(())
    }
}

/// Converts what the consumer gave, noting it in `unsettled`: `None` for a
/// non-fatal consumer error (logged; the caller waits a little), an error
/// for a fatal one.
fn take(
    attempts: &HashMap<(String, u32, u64), u32>,
    unsettled: &mut HashMap<(String, u32), u64>,
    m: std::result::Result<BorrowedMessage<'_>, KafkaError>,
) -> Result<Option<Message>> {
    match m {
        Ok(m) => {
            let m = to_message(attempts, &m)?;
            let at = unsettled
                .entry((m.stream.clone(), m.partition))
                .or_insert(m.position);
            *at = (*at).min(m.position);
            Ok(Some(m))
        }
        Err(e @ KafkaError::MessageConsumptionFatal(_)) => Err(Error::Broker {
            sink: ROLE.into(),
            message: format!("receive: {e}"),
        }),
        Err(e @ KafkaError::PartitionEOF(_)) => {
            // Only with `enable.partition.eof`: nothing wrong.
            tracing::trace!(error = %e, "Kafka inbox partition end");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "Kafka inbox consumer error; waiting it out");
            Ok(None)
        }
    }
}

fn to_message(
    attempts: &HashMap<(String, u32, u64), u32>,
    m: &BorrowedMessage<'_>,
) -> Result<Message> {
    let (Ok(partition), Ok(offset)) = (u32::try_from(m.partition()), u64::try_from(m.offset()))
    else {
        return Err(Error::Broker {
            sink: ROLE.into(),
            message: format!(
                "message with partition {} offset {}",
                m.partition(),
                m.offset()
            ),
        });
    };
    let topic = m.topic().to_string();
    let attempt = attempts
        .get(&(topic.clone(), partition, offset))
        .copied()
        .unwrap_or(1);
    let mut msg = Message::new(
        topic,
        partition,
        offset,
        m.payload().unwrap_or_default().to_vec(),
    )
    .with_attempt(attempt);
    if let Some(k) = m.key() {
        msg = msg.with_key(k.to_vec());
    }
    if let Some(h) = m.headers() {
        msg.headers = h
            .iter()
            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
            .collect();
    }
    msg.decode();
    Ok(msg)
}
