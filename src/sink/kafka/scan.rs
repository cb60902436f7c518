//! The restart scan (see the module docs of [`super`]): reading back the
//! end of the partitions a batch is about to write, and the read-permission
//! probe it needs.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::error::Result;
use crate::{EventId, OutboxEntry, StoreId};

use super::options::valid_topic;
use super::{KafkaSink, SEQ_HEADER, broker};

/// State of the restart scan.
#[derive(Default)]
pub(super) struct Recovery {
    /// A scan is due before the next publish.
    pub(super) due: bool,
    /// The scan covers seqs in `from..until`.
    pub(super) from: u64,
    pub(super) until: u64,
    /// Topics already scanned for this range.
    pub(super) scanned: HashSet<String>,
    /// Event ids found in the topics, with their position.
    pub(super) found: HashMap<EventId, String>,
}

impl KafkaSink {
    /// With a fixed topic and the restart scan on: checks that the scan may
    /// read the topic (see "Read permission" in the module documentation).
    pub(super) async fn check_read_permission(&self) -> Result<()> {
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

    /// Runs the restart scan if one is due and returns the seqs of `batch`
    /// already in Kafka, with their positions.
    /// `alone`: no other publish was in flight when this one was made. Only
    /// such a publish starts a due scan: one made behind others would start
    /// it at its own first seq, above the entries the relay is about to
    /// send again (from the first that failed), and they would never be
    /// looked for.
    pub(super) async fn already_delivered(
        &self,
        batch: &[OutboxEntry],
        topics: &[Option<String>],
        alone: bool,
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
            if r.due && alone {
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
    let consumer: BaseConsumer = config.create().map_err(|e| {
        ScanError::Other(format!(
            "create restart-scan consumer: {}",
            crate::broker::kafka::client_error(&e, &crate::broker::kafka::secrets_of(&config))
        ))
    })?;
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
pub(super) struct Unfinished<'a>(pub(super) &'a Mutex<Recovery>, pub(super) bool);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.lock().due = true;
        }
    }
}

/// Why a restart scan failed.
#[derive(Debug)]
pub(super) enum ScanError {
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
    let consumer: BaseConsumer = config.create().map_err(|e| {
        crate::broker::kafka::client_error(&e, &crate::broker::kafka::secrets_of(&config))
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreId;
    use rdkafka::message::{Header, OwnedHeaders};

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
