//! The relay against a real Apache Kafka broker (KRaft, started through
//! scripts/kafka.sh): per-key order by partition offsets, the restart scan
//! against duplicates, a broker outage, and oversized records.

mod common;
#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/sinks.rs"]
mod sinks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::KafkaBroker;
use kafka::{create_topic, create_topic_as};
use outboxkv::relay::{Relay, Shutdown};
use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
use outboxkv::{Durability, Event, Store};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sinks::{PublishThenHang, wait_published};

use common::TestResult;
type BoxError = Box<dyn std::error::Error>;

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
struct Record {
    partition: i32,
    offset: i64,
    key: String,
    headers: HashMap<String, String>,
}

impl Record {
    fn id(&self) -> &str {
        self.headers.get("ce_id").map(String::as_str).unwrap_or("")
    }
    fn seq(&self) -> u64 {
        self.headers
            .get("outboxkv_seq")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Reads every partition of `topic` from the beginning until `expected`
/// records arrived and no more came for a moment (or `timeout`).
fn read_topic(broker: &KafkaBroker, topic: &str, expected: usize) -> Result<Vec<Record>, BoxError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "outboxkv-test-reader")
        .set("enable.auto.commit", "false");
    for (k, v) in &broker.client {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or("topic not in metadata")?;
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(m) => {
                let m = m?;
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for h in h.iter() {
                        let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                        headers.insert(h.key.to_string(), v.unwrap_or_default());
                    }
                }
                records.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    headers,
                });
                quiet_since = Instant::now();
            }
            None => {
                // A little past the expected count, so extra records show up.
                if records.len() >= expected && quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

/// Kafka's Java client partitioner: murmur2 of the key bytes, positive,
/// modulo the partition count.
fn java_partition(key: &[u8], partitions: u32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let chunks = key.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions) as i32
}

fn options(broker: &KafkaBroker) -> KafkaOptions {
    KafkaOptions::new(broker.bootstrap.clone())
        .delivery_timeout(Duration::from_secs(20))
        .set("linger.ms", "5")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_from_four_threads_arrive_once_in_key_order() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    create_topic(&broker.bootstrap, "orders.changed", 4, &[]).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(options(&broker)).await?)
        .start()?;

    // seq -> key, as committed.
    let s = store.clone();
    let committed: BTreeMap<u64, String> = tokio::task::spawn_blocking(move || {
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let store = s.clone();
                std::thread::spawn(move || -> outboxkv::Result<Vec<(u64, String)>> {
                    let mut mine = Vec::new();
                    for i in 0..2500u64 {
                        let key = format!("order-{}", (t * 2500 + i) % 50);
                        let c = store.write(|tx| {
                            tx.emit(Event::json(
                                "orders.changed",
                                key.clone(),
                                &serde_json::json!({"t": t, "i": i}),
                            )?)
                        })?;
                        mine.push((c.seqs.start, key));
                    }
                    Ok(mine)
                })
            })
            .collect();
        let mut all = BTreeMap::new();
        for w in writers {
            let mine = w.join().map_err(|_| "writer panicked".to_string())?;
            all.extend(mine.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(all)
    })
    .await??;
    assert_eq!(committed.len(), 10_000);
    relay
        .wait_delivered(10_000, Duration::from_secs(120))
        .await?;
    assert_eq!(relay.metrics().duplicates.get(), 0);
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;

    let records = read_topic(&broker, "orders.changed", 10_000)?;
    assert_eq!(records.len(), 10_000, "record count");
    let ids: HashSet<&str> = records.iter().map(Record::id).collect();
    assert_eq!(ids.len(), 10_000, "distinct ce_id");
    // Every record is the entry it claims to be, in the partition Java's
    // partitioner picks for its key, and each key's records are in seq order
    // by offset.
    let mut last: HashMap<&str, (i32, i64, u64)> = HashMap::new();
    for r in &records {
        let seq = r.seq();
        assert_eq!(committed.get(&seq), Some(&r.key), "seq {seq} key");
        assert_eq!(r.headers.get("ce_subject"), Some(&r.key));
        assert_eq!(
            r.headers.get("ce_type").map(String::as_str),
            Some("orders.changed")
        );
        assert_eq!(
            r.headers.get("ce_specversion").map(String::as_str),
            Some("1.0")
        );
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert!(r.id().ends_with(&format!("-{seq}")), "{} vs {seq}", r.id());
        assert_eq!(
            r.partition,
            java_partition(r.key.as_bytes(), 4),
            "key {}",
            r.key
        );
        if let Some((p, offset, prev)) = last.insert(&r.key, (r.partition, r.offset, seq)) {
            assert_eq!(p, r.partition, "key {} moved partitions", r.key);
            assert!(
                prev < seq && offset < r.offset,
                "key {}: seq {seq} at offset {} after seq {prev} at {offset}",
                r.key,
                r.offset
            );
        }
    }
    assert_eq!(last.len(), 50);
    Ok(())
}

/// An entry refused before sending (its type is no valid topic) and held by
/// the dead-letter storm guard (limit 1, the second refusal in a row) must
/// not be overtaken by its key's later entries, in its batch or in the
/// batches in flight behind it (batches of 10, several in flight); the
/// other keys' entries in those batches are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_entry_held_back_holds_its_key_in_the_batches_behind_it() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    create_topic(&broker.bootstrap, "orders.changed", 4, &[]).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    store.write(|tx| {
        tx.emit(Event::bytes("bad:type", "k", b"first".to_vec()))?;
        tx.emit(Event::bytes("bad:type", "k", b"second".to_vec()))
    })?;
    for i in 0..400u64 {
        let key = if i % 4 == 0 {
            "k".to_string()
        } else {
            format!("other-{}", i % 7)
        };
        store.write(|tx| tx.emit(Event::bytes("orders.changed", key.as_str(), vec![1u8; 10])))?;
    }
    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(options(&broker)).await?)
        .batch_size(10)
        .dead_letter_storm_limit(1)
        .backoff(outboxkv::relay::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            factor: 2.0,
            jitter: 0.0,
        })
        .start()?;
    // The relay never settles past the held entry, so it ships what it
    // had read behind it (the batches in flight with the first) and then
    // sends the held one again and again: wait until the count stands.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = (0, Instant::now());
    loop {
        let acked = relay.metrics().acked.get();
        if acked != seen.0 {
            seen = (acked, Instant::now());
        } else if acked > 0 && seen.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(Instant::now() < deadline, "acked {acked}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.metrics().dead_letter_storm.get(), 1);
    assert_eq!(relay.delivered(), 1, "held at seq 2");
    let acked = relay.metrics().acked.get() as usize;
    relay.shutdown(Shutdown::Now).await?;
    let records = read_topic(&broker, "orders.changed", acked)?;
    assert_eq!(records.len(), acked);
    let overtaking: Vec<u64> = records
        .iter()
        .filter(|r| r.key == "k")
        .map(Record::seq)
        .collect();
    assert!(
        overtaking.is_empty(),
        "entries of key k overtook the held seq 2: {overtaking:?}"
    );
    assert!(
        records.iter().any(|r| r.seq() > 11),
        "nothing behind the first batch was shipped: no batches were in flight behind it"
    );
    Ok(())
}

/// A relay publishes the first 150 of 300 entries, then dies before it
/// records its cursor. With the restart scan (the default) the next relay
/// skips what is already in Kafka: a consumer sees every event once. Without
/// it, the consumer sees the 150 again, with the same ce_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_before_the_cursor_is_recorded_skips_what_kafka_has() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    for (topic, restart_dedup) in [("with.scan", true), ("without.scan", false)] {
        create_topic(&broker.bootstrap, topic, 3, &[]).await?;
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.write(|tx| {
            (0..300).try_for_each(|i| {
                tx.emit(Event::bytes(topic, format!("k{}", i % 7), vec![i as u8]))
            })
        })?;

        let published = Arc::new(AtomicUsize::new(0));
        let first = Relay::builder(&store)
            .batch_size(150)
            .sink(PublishThenHang {
                inner: KafkaSink::connect(options(&broker)).await?,
                published: published.clone(),
            })
            .start()?;
        assert_eq!(
            wait_published(&published, 150).await,
            150,
            "{topic}: first relay"
        );
        first.shutdown(Shutdown::Now).await?;
        assert_eq!(store.outbox().depth(), 300, "{topic}: nothing recorded");

        let second = Relay::builder(&store)
            .sink(KafkaSink::connect(options(&broker).restart_dedup(restart_dedup)).await?)
            .start()?;
        second.wait_delivered(300, Duration::from_secs(60)).await?;
        let duplicates_reported = second.metrics().duplicates.get();
        second
            .shutdown(Shutdown::Drain(Duration::from_secs(5)))
            .await?;

        let records = read_topic(&broker, topic, 300)?;
        let ids: HashSet<&str> = records.iter().map(Record::id).collect();
        assert_eq!(ids.len(), 300, "{topic}: every event arrived");
        if restart_dedup {
            assert_eq!(records.len(), 300, "{topic}: each exactly once");
            assert_eq!(duplicates_reported, 150, "{topic}: skipped as duplicates");
        } else {
            assert_eq!(records.len(), 450, "{topic}: the first 150 twice");
            assert_eq!(duplicates_reported, 0);
        }
        // Per key, the first occurrence of each event is in seq order.
        let mut seen = HashSet::new();
        let mut last: HashMap<&str, u64> = HashMap::new();
        for r in &records {
            if !seen.insert(r.id()) {
                continue;
            }
            if let Some(prev) = last.insert(&r.key, r.seq()) {
                assert!(prev < r.seq(), "{topic}: key {} out of order", r.key);
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    create_topic(&broker.bootstrap, "stock.moved", 2, &[]).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(options(&broker)).await?)
        .start()?;

    let s = store.clone();
    let writer = tokio::task::spawn_blocking(move || -> outboxkv::Result<()> {
        for i in 0..2000u64 {
            s.write(|tx| {
                tx.emit(Event::bytes(
                    "stock.moved",
                    format!("sku-{}", i % 13),
                    i.to_be_bytes().to_vec(),
                ))
            })?;
            std::thread::sleep(Duration::from_micros(2500));
        }
        Ok(())
    });
    // Let some flow, stop the broker for a while, start it again.
    relay.wait_delivered(300, Duration::from_secs(30)).await?;
    let b = tokio::task::spawn_blocking(move || -> Result<KafkaBroker, String> {
        broker.stop().map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(3));
        broker.restart().map_err(|e| e.to_string())?;
        Ok(broker)
    });
    let broker = b.await??;
    writer.await??;
    relay.wait_delivered(2000, Duration::from_secs(120)).await?;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;

    let records = read_topic(&broker, "stock.moved", 2000)?;
    let ids: HashSet<&str> = records.iter().map(Record::id).collect();
    assert_eq!(ids.len(), 2000, "every event arrived");
    let seqs: HashSet<u64> = records.iter().map(Record::seq).collect();
    assert_eq!(seqs, (1..=2000).collect::<HashSet<u64>>());
    assert_eq!(records.len(), 2000, "no duplicates");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_max_message_bytes_is_dead_lettered_with_the_broker_error() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    create_topic(
        &broker.bootstrap,
        "docs.saved",
        1,
        &[("max.message.bytes", "2000")],
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        tx.emit(Event::bytes("docs.saved", "d", vec![1; 100]))?;
        tx.emit(Event::bytes("docs.saved", "d", vec![2; 10_000]))?;
        tx.emit(Event::bytes("docs.saved", "d", vec![3; 100]))
    })?;
    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(options(&broker)).await?)
        .start()?;
    relay.wait_delivered(3, Duration::from_secs(60)).await?;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;

    let dead = store.outbox().dead_letters().list(0, 10)?;
    let dead_seqs: Vec<u64> = dead.iter().map(|d| d.entry.seq).collect();
    assert_eq!(
        dead_seqs,
        vec![2],
        "only the oversized entry is dead-lettered"
    );
    assert_eq!(dead[0].entry.payload.len(), 10_000);
    assert!(
        dead[0].error.to_lowercase().contains("too large"),
        "broker error kept: {}",
        dead[0].error
    );
    let records = read_topic(&broker, "docs.saved", 2)?;
    let seqs: Vec<u64> = records.iter().map(Record::seq).collect();
    assert_eq!(seqs, vec![1, 3]);
    Ok(())
}

/// Most production clusters require a login. The relay ships through a
/// SASL/PLAIN listener with the right password; with a wrong one the sink
/// refuses to start with a broker error and nothing leaves the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_logins_ship_and_a_wrong_password_is_refused() -> TestResult {
    let broker = KafkaBroker::start_sasl_plain(&[("relay", "relay-secret")])?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        (0..100u8).try_for_each(|i| tx.emit(Event::bytes("orders.paid", format!("o{i}"), vec![i])))
    })?;

    let login = |password: &str| {
        options(&broker)
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "relay")
            .set("sasl.password", password)
    };
    match KafkaSink::connect(login("wrong").delivery_timeout(Duration::from_secs(5))).await {
        Err(outboxkv::Error::Broker { sink, message }) => {
            assert_eq!(sink, "kafka");
            assert!(message.contains(&broker.bootstrap), "{message}");
            // The cause, not only "broker transport failure".
            assert!(
                message.to_lowercase().contains("authentication"),
                "{message}"
            );
        }
        Err(other) => return Err(format!("expected a Broker error, got {other}").into()),
        Ok(_) => return Err("a wrong password was accepted".into()),
    }
    assert_eq!(store.outbox().depth(), 100, "nothing shipped or pruned");

    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(login("relay-secret")).await?)
        .start()?;
    relay.wait_delivered(100, Duration::from_secs(60)).await?;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;
    let records = read_topic(&broker, "orders.paid", 100)?;
    let ids: HashSet<&str> = records.iter().map(Record::id).collect();
    assert_eq!((records.len(), ids.len()), (100, 100), "each event once");
    assert_eq!(store.outbox().depth(), 0);
    Ok(())
}

/// A copy restored from `Store::checkpoint` holds the original's unshipped
/// entries (the original's ids) and then its own, at seqs the original
/// later shipped entries of its own at. The restart scan matches full event
/// ids: it skips the original's entries it finds in Kafka and still ships
/// the copy's own (matching on seq alone, it took them for the original's
/// and pruned them unsent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_checkpoint_ships_its_own_events_at_seqs_the_original_used() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    create_topic(&broker.bootstrap, "orders", 1, &[]).await?;
    let dir = tempfile::tempdir()?;
    let original = Store::open(dir.path().join("original"))?;
    original
        .write(|tx| (0..3u8).try_for_each(|i| tx.emit(Event::bytes("orders", "k", vec![i]))))?;
    let copy_id = original.checkpoint(dir.path().join("copy"))?;
    // The original ships 1..=3, then commits and ships 4..=6 of its own.
    original
        .write(|tx| (3..6u8).try_for_each(|i| tx.emit(Event::bytes("orders", "k", vec![i]))))?;
    let relay = Relay::builder(&original)
        .sink(KafkaSink::connect(options(&broker).topic_template("orders")).await?)
        .start()?;
    relay.wait_delivered(6, Duration::from_secs(60)).await?;
    relay.shutdown(Shutdown::Now).await?;
    let original_id = original.id();
    drop(original);

    // The copy: the original's 1..=3, then 4..=6 of its own.
    let copy = Store::open(dir.path().join("copy"))?;
    assert_eq!(copy.id(), copy_id);
    copy.write(|tx| (10..13u8).try_for_each(|i| tx.emit(Event::bytes("orders", "k", vec![i]))))?;
    let relay = Relay::builder(&copy)
        .sink(KafkaSink::connect(options(&broker).topic_template("orders")).await?)
        .start()?;
    relay.wait_delivered(6, Duration::from_secs(60)).await?;
    let duplicates = relay.metrics().duplicates.get();
    relay.shutdown(Shutdown::Now).await?;

    let records = read_topic(&broker, "orders", 9)?;
    let ids: Vec<&str> = records.iter().map(Record::id).collect();
    for seq in 1..=6 {
        let id = format!("{original_id}-{seq}");
        assert_eq!(
            ids.iter().filter(|i| **i == id).count(),
            1,
            "{id} once: {ids:?}"
        );
    }
    for seq in 4..=6 {
        let id = format!("{copy_id}-{seq}");
        assert_eq!(
            ids.iter().filter(|i| **i == id).count(),
            1,
            "the copy's {id} shipped: {ids:?}"
        );
    }
    assert_eq!(records.len(), 9);
    assert_eq!(
        duplicates, 3,
        "the original's three were skipped as duplicates"
    );
    Ok(())
}

/// A topic whose `max.message.bytes` is below the producer's batch size:
/// many small records of one key would be packed into batches the topic
/// refuses. The sink caps its batches below the topic's limit, so all
/// arrive, in order, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_below_the_topics_max_message_bytes() -> TestResult {
    let broker = KafkaBroker::start(&[])?;
    create_topic(
        &broker.bootstrap,
        "small.batches",
        1,
        &[("max.message.bytes", "20000")],
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        (0..400u32).try_for_each(|i| {
            tx.emit(Event::bytes(
                "small.batches",
                "one-key",
                vec![(i % 251) as u8; 900],
            ))
        })
    })?;
    let relay = Relay::builder(&store)
        .batch_size(400)
        .sink(KafkaSink::connect(options(&broker)).await?)
        .start()?;
    relay.wait_delivered(400, Duration::from_secs(60)).await?;
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(store.outbox().dead_letters().count()?, 0);
    let records = read_topic(&broker, "small.batches", 400)?;
    let seqs: Vec<u64> = records.iter().map(Record::seq).collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>(), "each once, in order");
    Ok(())
}

/// A relay principal that may write but not read: the restart scan could
/// never run, and the relay once retried it forever, delivering nothing. A
/// fixed topic is checked at connect (a clear error); with a topic template
/// the relay stops at its first scan with the same error; with
/// `restart_scan_without_read` it ships without the scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_without_read_permission_fails_clearly_or_ships_without_the_scan() -> TestResult
{
    let broker = KafkaBroker::start_with_acls(&[("writer", "writer-secret")])?;
    create_topic_as(&broker.bootstrap, &broker.client, "orders", 1, &[]).await?;
    for op in ["WRITE", "DESCRIBE"] {
        broker.allow("User:writer", op, "orders")?;
    }
    let writer = || {
        options(&broker)
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "writer")
            .set("sasl.password", "writer-secret")
    };
    // A fixed topic: refused at connect, saying what to grant.
    match KafkaSink::connect(writer().topic_template("orders")).await {
        Err(outboxkv::Error::Broker { message, .. }) => {
            assert!(message.contains("may not read topic orders"), "{message}");
            assert!(!message.contains("writer-secret"), "{message}");
        }
        Err(e) => return Err(format!("expected a Broker error, got {e}").into()),
        Ok(_) => return Err("a principal without READ passed the check".into()),
    }
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        (0..10u8).try_for_each(|i| tx.emit(Event::bytes("orders", format!("k{i}"), vec![i])))
    })?;

    // Allowed to ship without the scan: it does.
    let relay = Relay::builder(&store)
        .sink(
            KafkaSink::connect(
                writer()
                    .topic_template("{type}")
                    .restart_scan_without_read(true),
            )
            .await?,
        )
        .start()?;
    relay.wait_delivered(10, Duration::from_secs(60)).await?;
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(read_topic(&broker, "orders", 10)?.len(), 10);

    // Without that, a template: the relay stops at its first scan (the
    // topic now has records to read back) with the same error.
    store.write(|tx| {
        (10..15u8).try_for_each(|i| tx.emit(Event::bytes("orders", format!("k{i}"), vec![i])))
    })?;
    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(writer().topic_template("{type}")).await?)
        .start()?;
    tokio::time::timeout(Duration::from_secs(60), relay.stopped()).await?;
    match relay.shutdown(Shutdown::Now).await {
        Err(outboxkv::Error::Broker { message, .. }) => {
            assert!(message.contains("may not read topic orders"), "{message}")
        }
        other => {
            return Err(
                format!("expected the relay to stop on a Broker error, got {other:?}").into(),
            );
        }
    }
    assert_eq!(store.outbox().depth(), 5, "nothing more settled");
    assert_eq!(store.outbox().dead_letters().count()?, 0);
    Ok(())
}
