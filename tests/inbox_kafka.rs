//! The inbox against a real Kafka broker (started through scripts/kafka.sh):
//! a consumer group whose positions come from the store, fed by an outboxkv
//! relay (plus copies produced again at other offsets), with transient
//! failures (seek back and retry), a poison message, a consumer restarted
//! from a new group (the store decides), and a consumer process SIGKILLed
//! at random moments.

mod common;
#[path = "common/inbox.rs"]
mod inbox_common;
#[path = "common/kafka.rs"]
mod kafka;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{KafkaBroker, TestResult};
use inbox_common::{EFFECTS, check, handler};
use outboxkv::broker::kafka::KafkaConnection;
use outboxkv::inbox::kafka::{KafkaReader, KafkaReaderOptions};
use outboxkv::inbox::{Inbox, InboxOptions};
use outboxkv::relay::{Relay, Shutdown};
use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
use outboxkv::{Event, Store};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const TOPIC: &str = "orders.placed";

/// Publishes `n` events through an outboxkv store and relay to a topic of
/// 4 partitions, then produces every 25th again (same key, headers and
/// body: the same CloudEvent at a later offset). Returns the distinct ids
/// in `n` order.
async fn produce(bootstrap: &str, n: u64) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    kafka::create_topic(bootstrap, TOPIC, 4, &[]).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut ids = Vec::new();
    for i in 1..=n {
        let c = store.write(|tx| {
            tx.emit(Event::json(
                "orders.placed",
                format!("order-{i}"),
                &serde_json::json!({ "n": i }),
            )?)
        })?;
        ids.extend(c.event_ids().map(|id| id.to_string()));
    }
    let relay = Relay::builder(&store)
        .sink(KafkaSink::connect(KafkaOptions::new(bootstrap)).await?)
        .start()?;
    relay.wait_delivered(n, Duration::from_secs(60)).await?;
    relay.shutdown(Shutdown::Now).await?;
    // Read the topic back and produce every 25th event again.
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "copier")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    let reader: BaseConsumer = config.create()?;
    reader.subscribe(&[TOPIC])?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < n && Instant::now() < deadline {
        let Some(m) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        seen += 1;
        if seen % 25 == 0 {
            let mut headers = OwnedHeaders::new();
            for h in m.headers().into_iter().flat_map(|h| h.iter()) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
            let record = FutureRecord::to(TOPIC)
                .key(m.key().unwrap_or_default())
                .payload(m.payload().unwrap_or_default())
                .partition(m.partition())
                .headers(headers);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    assert_eq!(seen, n, "the relay's events read back");
    Ok(ids)
}

fn reader_options(bootstrap: &str, group: &str) -> KafkaReaderOptions {
    KafkaReaderOptions::new(
        KafkaConnection::new(bootstrap)
            .set("group.instance.id", format!("{group}-member"))
            .set("session.timeout.ms", "10000"),
        group,
        [TOPIC],
    )
    .batch(32)
    .retry_delay(Duration::from_millis(20))
}

/// Runs a reader in-process until `done` or `limit`.
async fn consume_until(
    store: &Store,
    bootstrap: &str,
    group: &str,
    limit: Duration,
    done: impl Fn(&Store, &Inbox) -> bool,
) -> Result<Inbox, Box<dyn std::error::Error>> {
    let inbox = Inbox::with_options(store, "payments", InboxOptions::new().max_attempts(3))?;
    let mut reader = KafkaReader::connect(inbox.clone(), reader_options(bootstrap, group))?;
    let (s, i) = (store.clone(), inbox.clone());
    let deadline = Instant::now() + limit;
    let done = async move {
        while !done(&s, &i) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    reader.run(handler, done).await?;
    Ok(inbox)
}

fn all_settled(ids: &[String]) -> impl Fn(&Store, &Inbox) -> bool + '_ {
    move |s, i| {
        let poison = ids.len() / 97;
        let applied = s.range(&EFFECTS, ..).map(|r| r.count()).unwrap_or(0);
        let dead = i.dead_letters().map(|d| d.len()).unwrap_or(0);
        applied >= ids.len() - poison && dead >= poison
    }
}

#[test]
fn positions_come_from_the_store_and_each_event_takes_effect_once() -> TestResult {
    let broker = KafkaBroker::start(&["group.initial.rebalance.delay.ms=0"])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ids = produce(&broker.bootstrap, 600).await?;
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let inbox = consume_until(
            &store,
            &broker.bootstrap,
            "payments",
            Duration::from_secs(90),
            all_settled(&ids),
        )
        .await?;
        check(&store, &ids)?;
        let m = inbox.metrics();
        assert_eq!(m.dead_lettered(), 6);
        assert!(m.producer_duplicates() >= 20, "{}", m.producer_duplicates());
        // One position per partition; no done set (Kafka is in order).
        let positions = inbox.positions()?;
        assert_eq!(positions.len(), 4, "{positions:?}");
        assert!(positions.iter().all(|(_, _, p)| p.done.is_empty()));
        // A new group (no committed offsets, `earliest`): the store's
        // positions decide, so nothing is delivered again; one new record
        // shows the reader was assigned and reading.
        let before = store.outbox().head();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .create()?;
        let id = "0123456789abcdef0123456789abcdef-100003";
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(id),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("test"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("orders.placed"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .key("order-100003")
                    .payload(r#"{"n":100003}"#)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        let fresh = consume_until(
            &store,
            &broker.bootstrap,
            "payments-2",
            Duration::from_secs(60),
            |_, i| i.metrics().duplicates() > 0 || i.metrics().applied() > 0,
        )
        .await?;
        assert_eq!(
            fresh.metrics().duplicates(),
            0,
            "the store's positions were used"
        );
        assert_eq!(fresh.metrics().applied(), 1, "the new record");
        assert_eq!(store.get(&EFFECTS, id)?, Some(1));
        assert_eq!(store.outbox().head(), before + 1);
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn cycles() -> u32 {
    std::env::var("OUTBOXKV_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The child: consumes forever, printing how many messages it applied.
#[test]
#[ignore = "the child process of the SIGKILL test, run by it"]
fn inbox_kafka_child() -> TestResult {
    let bootstrap = std::env::var("OUTBOXKV_INBOX_URL")?;
    let path = std::env::var("OUTBOXKV_INBOX_STORE")?;
    let store = Store::open(&path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let inbox = Inbox::with_options(&store, "payments", InboxOptions::new().max_attempts(3))?;
        let mut reader = KafkaReader::connect(inbox.clone(), reader_options(&bootstrap, "killed"))?;
        let metrics = inbox.metrics().clone();
        tokio::spawn(async move {
            loop {
                println!("APPLIED {}", metrics.applied());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        // Slow enough that the kills land while it applies.
        let slow = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
            std::thread::sleep(Duration::from_millis(8));
            handler(tx)
        };
        reader.run(slow, std::future::pending()).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

#[test]
fn sigkilled_consumer_applies_each_event_once() -> TestResult {
    let broker = KafkaBroker::start(&["group.initial.rebalance.delay.ms=0"])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ids = rt.block_on(produce(&broker.bootstrap, 1500))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("consumer");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut killed_while_applying = 0;
    for _ in 0..cycles() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "inbox_kafka_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OUTBOXKV_INBOX_URL", &broker.bootstrap)
            .env("OUTBOXKV_INBOX_STORE", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let last = Arc::new(Mutex::new(0u64));
        let l = last.clone();
        let lines = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("APPLIED ").and_then(|n| n.parse().ok())
                    && let Ok(mut last) = l.lock()
                {
                    *last = n;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(1500 + seed % 1500));
        child.kill()?;
        child.wait()?;
        lines.join().map_err(|_| "reader thread panicked")?;
        if *last.lock().map_err(|_| "poisoned")? > 0 {
            killed_while_applying += 1;
        }
    }
    let store = Store::open(&path)?;
    let applied_before = store.range(&EFFECTS, ..)?.count();
    let inbox = rt.block_on(consume_until(
        &store,
        &broker.bootstrap,
        "killed",
        Duration::from_secs(120),
        all_settled(&ids),
    ))?;
    check(&store, &ids)?;
    println!(
        "{} kill cycles ({killed_while_applying} while applying): {applied_before} events applied by the killed consumers, {} after; each once",
        cycles(),
        inbox.metrics().applied()
    );
    assert!(
        killed_while_applying > 0,
        "no kill landed while the consumer applied"
    );
    assert!(applied_before > 0);
    Ok(())
}

/// `run` failing mid-batch (here: the handler reports a store-side
/// failure, not one about the message) with messages taken from the
/// consumer and not settled; calling `run` again on the same reader
/// resumes from them: every event takes effect once.
#[test]
fn a_run_that_fails_mid_batch_loses_nothing_when_called_again() -> TestResult {
    let broker = KafkaBroker::start(&["group.initial.rebalance.delay.ms=0"])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ids = produce(&broker.bootstrap, 400).await?;
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let inbox = Inbox::with_options(&store, "payments", InboxOptions::new().max_attempts(3))?;
        let mut reader =
            KafkaReader::connect(inbox.clone(), reader_options(&broker.bootstrap, "failing"))?;
        let calls = std::sync::atomic::AtomicU64::new(0);
        for round in 0..3 {
            let failing = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(50) {
                    return Err(outboxkv::Error::Timeout(format!(
                        "store-side failure {round}"
                    )));
                }
                handler(tx)
            };
            let result = reader.run(failing, std::future::pending()).await;
            assert!(
                matches!(result, Err(outboxkv::Error::Timeout(_))),
                "round {round}: {result:?}"
            );
        }
        let (s, i) = (store.clone(), inbox.clone());
        let settled = all_settled(&ids);
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = async move {
            while !settled(&s, &i) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        reader.run(handler, done).await?;
        check(&store, &ids)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
