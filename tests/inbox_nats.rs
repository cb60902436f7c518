//! The inbox against a real nats-server (started through scripts/nats.sh):
//! events published by an outboxkv relay (plus copies re-published past
//! JetStream's deduplication) consumed with transient failures (naks, out
//! of order), a poison message, and a consumer process SIGKILLed at random
//! moments, including between its commit and its acknowledgements.

mod common;
#[path = "common/inbox.rs"]
mod inbox_common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{NatsServer, TestResult};
use inbox_common::{EFFECTS, check, handler};
use outboxkv::broker::nats::NatsConnection;
use outboxkv::inbox::nats::{NatsReader, NatsReaderOptions};
use outboxkv::inbox::{Inbox, InboxOptions};
use outboxkv::relay::{Relay, Shutdown};
use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
use outboxkv::{Event, Store, Table};

const STREAM: &str = "ORDERS";
/// Publishes `n` events through an outboxkv store and relay, then
/// re-publishes `copies` of them (every 25th) without `Nats-Msg-Id`, as a
/// relay past the duplicate window would: the same CloudEvent at another
/// stream sequence. Returns the ids of the distinct events.
async fn produce(url: &str, n: u64) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    for i in 1..=n {
        store.write(|tx| {
            tx.emit(Event::json(
                "orders.placed",
                format!("order-{i}"),
                &serde_json::json!({ "n": i }),
            )?)
        })?;
    }
    let sink = NatsSink::connect(NatsOptions::new(url).prefix("orders").create_stream(
        StreamSetup {
            name: STREAM.into(),
            subjects: vec!["orders.>".into()],
            duplicate_window: Duration::from_secs(120),
        },
    ))
    .await?;
    let js = sink.jetstream().clone();
    let relay = Relay::builder(&store).sink(sink).start()?;
    relay.wait_delivered(n, Duration::from_secs(60)).await?;
    relay.shutdown(Shutdown::Now).await?;
    let mut stream = js.get_stream(STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut ids = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await?;
        let event: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let id = event["id"].as_str().ok_or("no id")?.to_string();
        let n = event["data"]["n"].as_u64().ok_or("no n")?;
        if seq % 25 == 0 {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("content-type", outboxkv::sink::cloudevents::STRUCTURED_JSON);
            js.publish_with_headers(m.subject.to_string(), headers, m.payload.clone())
                .await?
                .await?;
        }
        ids.push((n, id));
    }
    // In `n` order (the relay's batches in flight may reach the stream in
    // another order).
    ids.sort();
    Ok(ids.into_iter().map(|(_, id)| id).collect())
}

fn reader_options(url: &str) -> NatsReaderOptions {
    NatsReaderOptions::new(NatsConnection::new(url), STREAM, "payments")
        .filter_subject("orders.>")
        .max_ack_pending(64)
        .batch(32)
        .retry_delay(Duration::from_millis(50))
        .ack_wait(Duration::from_secs(2))
}

/// Runs a reader in-process until every event is settled or `limit`.
async fn consume_all(
    store: &Store,
    url: &str,
    ids: &[String],
    limit: Duration,
) -> Result<Inbox, Box<dyn std::error::Error>> {
    let poison = ids.len() / 97;
    let want = ids.len() - poison;
    consume_until(store, url, limit, move |s, _| {
        let applied = s.range(&EFFECTS, ..).map(|r| r.count()).unwrap_or(0);
        let dead = Inbox::new(s, "payments")
            .and_then(|i| i.dead_letters())
            .map(|d| d.len())
            .unwrap_or(0);
        applied >= want && dead >= poison
    })
    .await
}

/// Runs a reader in-process until `done` or `limit`.
async fn consume_until(
    store: &Store,
    url: &str,
    limit: Duration,
    done: impl Fn(&Store, &Inbox) -> bool,
) -> Result<Inbox, Box<dyn std::error::Error>> {
    let inbox = Inbox::with_options(store, "payments", InboxOptions::new().max_attempts(3))?;
    let mut reader = NatsReader::connect(inbox.clone(), reader_options(url)).await?;
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

#[test]
fn naks_redeliveries_and_producer_copies_take_effect_once() -> TestResult {
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ids = produce(&server.url, 600).await?;
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let inbox = consume_all(&store, &server.url, &ids, Duration::from_secs(60)).await?;
        check(&store, &ids)?;
        let m = inbox.metrics();
        assert_eq!(m.dead_lettered(), 6);
        assert!(
            m.producer_duplicates() >= 20,
            "re-published copies skipped: {}",
            m.producer_duplicates()
        );
        // The metrics pass promtool (Prometheus text format).
        let mut registry = prometheus_client::registry::Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
        assert!(
            text.contains("outboxkv_inbox_dead_lettered_total 6"),
            "{text}"
        );
        let (ok, out) = common::promtool_check(&text)?;
        assert!(ok, "{out}\n{text}");
        // Everything again from the stream's start (a consumer recreated
        // at the start): all skipped.
        let client = async_nats::connect(&server.url).await?;
        let js = jetstream::new(client);
        let stream = js.get_stream(STREAM).await?;
        stream.delete_consumer("payments").await?;
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("payments".into()),
                filter_subject: "orders.>".into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let total = ids.len() as u64 + ids.len() as u64 / 25;
        let before = store.outbox().head();
        let inbox = consume_until(&store, &server.url, Duration::from_secs(30), |_, i| {
            i.metrics().duplicates() >= total
        })
        .await?;
        assert_eq!(inbox.metrics().duplicates(), total, "every message skipped");
        assert_eq!(store.outbox().head(), before);
        assert_eq!(inbox.metrics().applied(), 0);
        check(&store, &ids)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn cycles() -> u32 {
    std::env::var("OUTBOXKV_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The child: consumes with a pause between each commit and its
/// acknowledgements (so kills land there too), printing its duplicate count.
#[test]
#[ignore = "the child process of the SIGKILL test, run by it"]
fn inbox_nats_child() -> TestResult {
    let url = std::env::var("OUTBOXKV_INBOX_URL")?;
    let path = std::env::var("OUTBOXKV_INBOX_STORE")?;
    let store = Store::open(&path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let inbox = Inbox::with_options(&store, "payments", InboxOptions::new().max_attempts(3))?;
        let opts = reader_options(&url).pause_before_ack(Duration::from_millis(3));
        let mut reader = NatsReader::connect(inbox.clone(), opts).await?;
        let metrics = inbox.metrics().clone();
        tokio::spawn(async move {
            loop {
                println!("DUPLICATES {}", metrics.duplicates());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        // Slow enough that the kills land while it applies.
        let slow = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
            std::thread::sleep(Duration::from_millis(3));
            handler(tx)
        };
        reader.run(slow, std::future::pending()).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

#[test]
fn sigkilled_consumer_applies_each_event_once() -> TestResult {
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ids = rt.block_on(produce(&server.url, 1500))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("consumer");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut duplicates = 0u64;
    for _ in 0..cycles() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "inbox_nats_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OUTBOXKV_INBOX_URL", &server.url)
            .env("OUTBOXKV_INBOX_STORE", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let last = Arc::new(Mutex::new(0u64));
        let l = last.clone();
        let lines = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line
                    .strip_prefix("DUPLICATES ")
                    .and_then(|n| n.parse().ok())
                    && let Ok(mut last) = l.lock()
                {
                    *last = n;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(150 + seed % 400));
        child.kill()?;
        child.wait()?;
        lines.join().map_err(|_| "reader thread panicked")?;
        duplicates += *last.lock().map_err(|_| "poisoned")?;
    }
    // A last, clean run takes what is left; then the store is checked.
    let store = Store::open(&path)?;
    let inbox = rt.block_on(consume_all(
        &store,
        &server.url,
        &ids,
        Duration::from_secs(90),
    ))?;
    duplicates += inbox.metrics().duplicates();
    check(&store, &ids)?;
    let (records, above) = inbox.footprint()?;
    println!(
        "{} kill cycles: {} events applied once each, {duplicates} redeliveries skipped, inbox {records} records / {above} positions above the floor",
        cycles(),
        ids.len()
    );
    assert!(
        duplicates > 0,
        "no kill landed between a commit and its acknowledgement"
    );
    assert!(
        records <= 2,
        "{records} records (a position and a producer window)"
    );
    assert!(above <= 64, "{above} positions above the floor");
    Ok(())
}

/// A filtered consumer (every other stream sequence is another subject's)
/// with one message retried for over a second while the rest are applied
/// behind it: each message takes effect once, and the position keeps a
/// few ranges, not one entry per message applied above the stuck one.
#[test]
fn a_stuck_message_on_a_filtered_consumer_keeps_the_position_small() -> TestResult {
    const APPLIED: Table<str, u64> = Table::new("applied");
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = async_nats::connect(&server.url).await?;
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: "MIXED".into(),
            subjects: vec!["mixed.>".into()],
            ..Default::default()
        })
        .await?;
        const OURS: u64 = 1500;
        for i in 0..2 * OURS {
            let subject = if i % 2 == 0 { "mixed.a" } else { "mixed.b" };
            js.publish(subject, (i / 2).to_string().into_bytes().into())
                .await?
                .await?;
        }
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let inbox = Inbox::with_options(&store, "filtered", InboxOptions::new().max_attempts(10))?;
        let opts = NatsReaderOptions::new(NatsConnection::new(&server.url), "MIXED", "filtered")
            .filter_subject("mixed.a")
            .batch(50)
            .retry_delay(Duration::from_millis(400));
        let mut reader = NatsReader::connect(inbox.clone(), opts).await?;
        let handler = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
            let n = String::from_utf8_lossy(tx.message().data()).to_string();
            if n == "0" && tx.message().attempt < 4 {
                return Err(outboxkv::Error::abort("not yet"));
            }
            let c = tx.get_for_update(&APPLIED, &n)?.unwrap_or(0);
            tx.put(&APPLIED, &n, &(c + 1))
        };
        let (s, i) = (store.clone(), inbox.clone());
        let most = Arc::new(Mutex::new(0usize));
        let m = most.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = async move {
            loop {
                if let Ok(positions) = i.positions() {
                    let ranges = positions.iter().map(|(_, _, p)| p.done.len()).sum();
                    if let Ok(mut most) = m.lock() {
                        *most = (*most).max(ranges);
                    }
                }
                let applied = s.range(&APPLIED, ..).map(|r| r.count()).unwrap_or(0);
                if applied as u64 >= OURS || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        reader.run(handler, done).await?;
        let applied: Vec<(String, u64)> = store
            .range(&APPLIED, ..)?
            .collect::<outboxkv::Result<_>>()?;
        assert_eq!(applied.len() as u64, OURS, "every message applied");
        assert!(applied.iter().all(|(_, c)| *c == 1), "each once");
        assert!(inbox.metrics().failed() >= 3, "the stuck one was retried");
        let most = *most.lock().map_err(|_| "poisoned")?;
        println!("a stuck message, {OURS} applied behind it: at most {most} ranges kept");
        assert!(most <= 8, "{most} ranges kept above the floor");
        // Another filter for the same durable and positions is refused.
        drop(reader);
        let wider = NatsReaderOptions::new(NatsConnection::new(&server.url), "MIXED", "filtered")
            .filter_subject("mixed.>");
        match NatsReader::connect(inbox.clone(), wider).await {
            Err(outboxkv::Error::InvalidArgument(m)) => assert!(m.contains("filter"), "{m}"),
            other => panic!("a changed filter was accepted: {other:?}"),
        }
        // So is the durable recreated with the wider filter: the store
        // remembers the one its positions were kept with.
        js.get_stream("MIXED")
            .await?
            .delete_consumer("filtered")
            .await?;
        let wider = NatsReaderOptions::new(NatsConnection::new(&server.url), "MIXED", "filtered")
            .filter_subject("mixed.>");
        assert!(matches!(
            NatsReader::connect(inbox.clone(), wider).await,
            Err(outboxkv::Error::InvalidArgument(_))
        ));
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
