//! Publishing a batch: records and headers, delivery outcomes, the topics'
//! size limits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer};

use crate::relay::{BoxFuture, Outcome, Sink};
use crate::sink::cloudevents;
use crate::{EventId, OutboxEntry};

use super::context::{LastError, SinkProducer};
use super::options::valid_topic;
use super::order::Ticket;
use super::scan::{ScanError, Unfinished};
use super::{KafkaSink, SEQ_HEADER};

/// What the sink knows of its topics' limits.
#[derive(Default)]
pub(super) struct TopicLimits {
    /// `max.message.bytes` per topic written (`None`: could not be read).
    pub(super) known: HashMap<String, Option<usize>>,
    /// The producer's `batch.size` cap now in force.
    pub(super) cap: Option<usize>,
    /// Topics the restart scan may not read (skipped, with
    /// `restart_scan_without_read`).
    pub(super) unreadable: HashSet<String>,
    /// Entries refused as too large once already and retried: refused
    /// again, the refusal stands (bounded: cleared when it grows large).
    pub(super) retried_too_large: HashSet<EventId>,
}

/// How many publishes the relay may have in flight at once (the relay's
/// in-flight limits bound what is read).
const CONCURRENT_PUBLISHES: usize = 8;

/// Keys remembered as refused before later publishes hold back new ones
/// (until the relay publishes alone and they are forgotten).
const MAX_REFUSED_KEYS: usize = 10_000;

/// Bytes kept below a topic's `max.message.bytes` for the record batch's
/// own framing.
const BATCH_MARGIN: usize = 256;

impl KafkaSink {
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
    /// Only a call made alone does: the records of calls in flight before
    /// it fail with the producer and are sent again, so a later call's
    /// records must not go out first. `false`: send nothing.
    async fn rebuild_if_fatal(&self, ticket: &Ticket<'_>) -> bool {
        if self.fatal().is_none() {
            return true;
        }
        if !ticket.alone() {
            return false;
        }
        ticket.alone_with_deliveries().await;
        let mut producer = self.producer.lock();
        if let Some((code, reason)) = producer.client().fatal_error() {
            // Only `connect` reads a client's reports; a rebuilt one logs them.
            let cap = self.limits.lock().cap;
            match self.opts.create_producer(&LastError::default(), cap) {
                Ok(p) => {
                    let secrets = crate::broker::kafka::secrets_of(&self.opts.client_config());
                    let reason = crate::redact::scrub(&reason, &secrets);
                    tracing::warn!(?code, %reason, "Kafka producer hit a fatal error; rebuilt it");
                    *producer = Arc::new(p);
                    self.recovery.lock().due = self.opts.restart_dedup;
                }
                Err(e) => {
                    let secrets = crate::broker::kafka::secrets_of(&self.opts.client_config());
                    let error = crate::broker::kafka::client_error(&e, &secrets);
                    let reason = crate::redact::scrub(&reason, &secrets);
                    tracing::error!(?code, %reason, %error, "Kafka producer hit a fatal error and could not be rebuilt");
                }
            }
        }
        true
    }

    /// Reads `max.message.bytes` of the topics not seen yet and, when one
    /// is below the producer's batch cap, rebuilds the producer with a
    /// smaller cap, once no other publish has deliveries outstanding.
    /// `false`: the producer failed meanwhile under earlier publishes; send
    /// nothing (see [`rebuild_if_fatal`](Self::rebuild_if_fatal)).
    async fn learn_limits(&self, topics: &[Option<String>], ticket: &Ticket<'_>) -> bool {
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
            return true;
        }
        let specs: Vec<ResourceSpecifier<'_>> =
            new.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let results = self.admin.describe_configs(&specs, &opts).await;
        // The cap to rebuild the producer with, if a smaller one is needed
        // (the lock is not held across the wait below).
        let smaller = {
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
                    let smallest = limits
                        .known
                        .values()
                        .flatten()
                        .min()
                        .map(|l| l.saturating_sub(BATCH_MARGIN).max(1));
                    (smallest.is_some() && smallest < limits.cap.or(Some(usize::MAX)))
                        .then_some(smallest)
                }
                Err(e) => {
                    // Not asked again for these topics (the principal may
                    // lack DESCRIBE_CONFIGS): without their limits the
                    // producer's batches stay as they are.
                    tracing::warn!(error = %e, "could not read the topics' max.message.bytes");
                    for topic in new {
                        limits.known.insert(topic, None);
                    }
                    None
                }
            }
        };
        let Some(smallest) = smaller else {
            return true;
        };
        ticket.alone_with_deliveries().await;
        let fatal = self.fatal().is_some();
        if fatal && !ticket.alone() {
            // Earlier publishes' records failed with the producer and are
            // sent again first: the next publish made alone rebuilds it.
            return false;
        }
        if fatal {
            // The capped producer below replaces the failed one.
            self.recovery.lock().due = self.opts.restart_dedup;
        }
        match self.opts.create_producer(&LastError::default(), smallest) {
            Ok(p) => {
                tracing::info!(batch_size = ?smallest, "Kafka producer batches capped below the topics' max.message.bytes");
                *self.producer.lock() = Arc::new(p);
                self.limits.lock().cap = smallest;
            }
            Err(e) => {
                let secrets = crate::broker::kafka::secrets_of(&self.opts.client_config());
                let error = crate::broker::kafka::client_error(&e, &secrets);
                tracing::error!(%error, "could not rebuild the Kafka producer");
            }
        }
        true
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        "kafka"
    }

    /// Several batches may be in flight at once: their records are handed
    /// to the producer in call order (see the module documentation).
    fn max_concurrent_publishes(&self) -> usize {
        CONCURRENT_PUBLISHES
    }

    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        // The place in line is taken now, in call order.
        let mut ticket = self.line.enter();
        Box::pin(async move {
            ticket.turn().await;
            if ticket.alone() {
                // Nothing else in flight: the relay has taken in every
                // earlier outcome and publishes again from the first entry
                // that failed.
                self.refused_keys.lock().clear();
            }
            let too_many_refused =
                !ticket.alone() && self.refused_keys.lock().len() >= MAX_REFUSED_KEYS;
            if ticket.halted() || too_many_refused || !self.rebuild_if_fatal(&ticket).await {
                // An earlier batch in flight failed as a whole, or the
                // producer failed under earlier batches: send nothing that
                // could overtake what they will send again. (Or many keys
                // wait behind refused entries: let the relay drain, so the
                // next publish is made alone and forgets them.)
                ticket.halt();
                let reason = "held back: an earlier batch in flight failed".into();
                return vec![Outcome::Held { reason }; batch.len()];
            }
            let topics: Vec<Option<String>> = batch
                .iter()
                .map(|e| Some(self.opts.render(&e.event_type, &e.key)).filter(|t| valid_topic(t)))
                .collect();
            if !self.learn_limits(&topics, &ticket).await {
                ticket.halt();
                let reason = "held back: the producer failed under an earlier batch in flight";
                return vec![
                    Outcome::Held {
                        reason: reason.into()
                    };
                    batch.len()
                ];
            }
            let delivered = match self.already_delivered(batch, &topics, ticket.alone()).await {
                Ok(d) => d,
                Err(e @ ScanError::Unreadable { .. }) => {
                    ticket.halt();
                    let error = e.to_string();
                    return vec![Outcome::Fatal { error }; batch.len()];
                }
                Err(error) => {
                    ticket.halt();
                    let error = format!("restart scan: {error}");
                    return vec![Outcome::Retry { error }; batch.len()];
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
                        self.refused_before(entry);
                    }
                    continue;
                }
                if refused.contains(entry.key.as_str()) || self.was_refused_before(entry) {
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
                            self.refused_before(entry);
                        }
                    }
                }
            }
            // Every record is with the producer: the next call may send.
            ticket.pass();
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

impl KafkaSink {
    /// Records that `entry` was refused before sending: the later entries
    /// of its key, in later calls too, are held back until the relay
    /// publishes it again.
    fn refused_before(&self, entry: &OutboxEntry) {
        let mut keys = self.refused_keys.lock();
        let seq = keys.entry(entry.key.clone()).or_insert(entry.seq);
        *seq = (*seq).min(entry.seq);
    }

    /// Whether an earlier entry of `entry`'s key (in an earlier call) was
    /// refused before sending. The refused entry itself, published again,
    /// is judged again (and its key forgotten until then).
    fn was_refused_before(&self, entry: &OutboxEntry) -> bool {
        if entry.key.is_empty() {
            return false;
        }
        let mut keys = self.refused_keys.lock();
        match keys.get(&entry.key) {
            Some(&seq) if seq == entry.seq => {
                keys.remove(&entry.key);
                false
            }
            Some(&seq) => seq < entry.seq,
            None => false,
        }
    }
}

pub(super) fn topic_of(topics: &[Option<String>], i: usize) -> &str {
    topics.get(i).and_then(|t| t.as_deref()).unwrap_or("")
}
