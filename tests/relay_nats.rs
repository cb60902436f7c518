//! The relay against a real nats-server with JetStream (started through
//! scripts/nats.sh): exactly-once by Nats-Msg-Id, per-key order, restarts,
//! a server outage, and oversized messages.

mod common;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/sinks.rs"]
mod sinks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use common::NatsServer;
use outboxkv::relay::{Backoff, BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
use outboxkv::{Durability, Event, OutboxEntry, Store};
use sinks::{PublishThenHang, wait_published};

use common::TestResult;

const STREAM: &str = "EVENTS";

fn options(server: &NatsServer) -> NatsOptions {
    NatsOptions::new(server.url.clone())
        .prefix("events")
        .ack_timeout(Duration::from_secs(2))
        .create_stream(StreamSetup {
            name: STREAM.into(),
            subjects: vec!["events.>".into()],
            duplicate_window: Duration::from_secs(120),
        })
}

struct Received {
    /// Stream sequence → (event id, key, outbox seq)
    messages: BTreeMap<u64, (String, String, u64)>,
}

/// Reads the whole stream back, message by message.
async fn read_stream(js: &jetstream::Context) -> Result<Received, Box<dyn std::error::Error>> {
    let mut stream = js.get_stream(STREAM).await?;
    let info = stream.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut messages = BTreeMap::new();
    for seq in first..=last {
        let m = stream.get_raw_message(seq).await?;
        let h = m.headers;
        let id = h.get("Nats-Msg-Id").ok_or("no Nats-Msg-Id")?.to_string();
        // Structured mode (the default): the event is the payload.
        let event: serde_json::Value = serde_json::from_slice(&m.payload)?;
        assert_eq!(event["id"].as_str(), Some(id.as_str()));
        assert_eq!(event["specversion"].as_str(), Some("1.0"));
        assert_eq!(
            h.get("content-type").map(|v| v.to_string()).as_deref(),
            Some(outboxkv::sink::cloudevents::STRUCTURED_JSON)
        );
        let key = event["subject"].as_str().ok_or("no subject")?.to_string();
        let outbox_seq: u64 = id.rsplit('-').next().ok_or("bad id")?.parse()?;
        messages.insert(seq, (id, key, outbox_seq));
    }
    Ok(Received { messages })
}

fn commit_from_threads(store: &Store, threads: u64, per_thread: u64, keys: u64) -> TestResult {
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || -> outboxkv::Result<()> {
                for i in 0..per_thread {
                    let key = format!("key-{}", (t * per_thread + i) % keys);
                    store.write(|tx| {
                        tx.emit(Event::json(
                            "orders.changed",
                            key.clone(),
                            &serde_json::json!({"t": t, "i": i}),
                        )?)
                    })?;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| "writer panicked")??;
    }
    Ok(())
}

fn assert_exactly_once_in_key_order(received: &Received, expected: u64) {
    let ids: HashSet<&String> = received.messages.values().map(|(id, _, _)| id).collect();
    assert_eq!(
        received.messages.len() as u64,
        expected,
        "stream message count"
    );
    assert_eq!(ids.len() as u64, expected, "distinct Nats-Msg-Ids");
    let mut last_by_key: HashMap<&String, u64> = HashMap::new();
    for (stream_seq, (_, key, seq)) in &received.messages {
        if let Some(prev) = last_by_key.insert(key, *seq) {
            assert!(
                prev < *seq,
                "key {key}: seq {seq} at stream seq {stream_seq} after {prev}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_once_in_key_order() -> TestResult {
    let server = NatsServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let sink = NatsSink::connect(options(&server)).await?;
    let js = sink.jetstream().clone();
    let relay = Relay::builder(&store).sink(sink).start()?;
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        commit_from_threads(&s, 4, 2500, 50).map_err(|e| e.to_string())
    })
    .await??;
    assert_eq!(store.outbox().head(), 10_000);
    relay
        .wait_delivered(10_000, Duration::from_secs(60))
        .await?;
    assert_exactly_once_in_key_order(&read_stream(&js).await?, 10_000);
    assert_eq!(relay.metrics().duplicates.get(), 0);
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_before_the_cursor_is_recorded_is_deduplicated_by_jetstream() -> TestResult {
    let server = NatsServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        (0..200).try_for_each(|i| {
            tx.emit(Event::bytes(
                "orders.changed",
                format!("k{}", i % 7),
                vec![i as u8],
            ))
        })
    })?;

    let published = Arc::new(AtomicUsize::new(0));
    let first = Relay::builder(&store)
        .sink(PublishThenHang {
            inner: NatsSink::connect(options(&server)).await?,
            published: published.clone(),
        })
        .start()?;
    assert_eq!(
        wait_published(&published, 200).await,
        200,
        "the first relay published everything"
    );
    first.shutdown(Shutdown::Now).await?;
    assert_eq!(store.outbox().depth(), 200, "but recorded nothing");

    let sink = NatsSink::connect(options(&server)).await?;
    let js = sink.jetstream().clone();
    let second = Relay::builder(&store).sink(sink).start()?;
    second.wait_delivered(200, Duration::from_secs(30)).await?;
    assert_eq!(
        second.metrics().duplicates.get(),
        200,
        "JetStream reported every re-sent entry as a duplicate"
    );
    assert_exactly_once_in_key_order(&read_stream(&js).await?, 200);
    second.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// Counts publish calls (rounds) of the wrapped sink.
struct Counting {
    inner: NatsSink,
    rounds: Arc<AtomicUsize>,
}

impl Sink for Counting {
    fn name(&self) -> &str {
        "nats-counting"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        self.inner.publish(batch)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outage_loses_nothing_and_backs_off() -> TestResult {
    let server = NatsServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let sink = NatsSink::connect(options(&server).ack_timeout(Duration::from_millis(500))).await?;
    let js = sink.jetstream().clone();
    let rounds = Arc::new(AtomicUsize::new(0));
    let relay = Relay::builder(&store)
        .batch_size(100)
        .backoff(Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            factor: 2.0,
            jitter: 0.2,
        })
        .sink(Counting {
            inner: sink,
            rounds: rounds.clone(),
        })
        .start()?;

    let s = store.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<(), String> {
        for i in 0..3000u64 {
            s.write(|tx| {
                tx.emit(Event::bytes(
                    "orders.changed",
                    format!("k{}", i % 13),
                    i.to_be_bytes().to_vec(),
                ))
            })
            .map_err(|e| e.to_string())?;
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.stop()?;
    let rounds_before = rounds.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rounds_during = rounds.load(Ordering::SeqCst) - rounds_before;
    server.restart()?;
    writer.await??;
    relay.wait_delivered(3000, Duration::from_secs(60)).await?;
    // Ack timeouts of 0.5 s plus backoff growing to 1 s: a handful of rounds
    // in 4 s, not a busy loop.
    assert!(
        rounds_during <= 12,
        "{rounds_during} publish rounds during a 4 s outage"
    );
    assert!(relay.metrics().failed.get() > 0, "the outage was noticed");
    assert_exactly_once_in_key_order(&read_stream(&js).await?, 3000);
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_dead_lettered_with_the_brokers_error() -> TestResult {
    let server = NatsServer::start_with_config("max_payload: 4096")?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let sink = NatsSink::connect(options(&server)).await?;
    let js = sink.jetstream().clone();
    let relay = Relay::builder(&store).sink(sink).start()?;
    store.write(|tx| {
        tx.emit(Event::bytes("orders.changed", "k", vec![1; 100]))?;
        tx.emit(Event::bytes("orders.changed", "k", vec![2; 10_000]))?;
        tx.emit(Event::bytes("orders.changed", "k", vec![3; 100]))
    })?;
    relay.wait_delivered(3, Duration::from_secs(30)).await?;
    let dead = store.outbox().dead_letters().list(0, 10)?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].entry.seq, 2);
    assert!(dead[0].error.contains("max payload"), "{}", dead[0].error);
    let received = read_stream(&js).await?;
    let seqs: Vec<u64> = received.messages.values().map(|(_, _, s)| *s).collect();
    assert_eq!(seqs, vec![1, 3], "later entries are still delivered");
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// Options for a sink connecting through `proxy`, with a short ack timeout.
fn through_proxy(proxy: &proxy::Proxy) -> NatsOptions {
    NatsOptions::new(proxy.url())
        .prefix("events")
        .ack_timeout(Duration::from_secs(1))
        .create_stream(StreamSetup {
            name: STREAM.into(),
            subjects: vec!["events.>".into()],
            duplicate_window: Duration::from_secs(120),
        })
}

/// Has the proxy cut the connection five times, each in the middle of
/// whatever is being sent, until `done` (at most 90 s, else it fails with
/// `progress`); checks that it did cut at least three times.
async fn cut_until(proxy: &proxy::Proxy, done: impl Fn() -> bool, progress: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut n = 0u64;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", progress());
        if proxy.cuts.load(Ordering::SeqCst) < 5 && !proxy.armed() {
            n += 1;
            proxy.cut_after(20_000 + n * 7_919);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 3,
        "the proxy cut too rarely"
    );
}

/// A connection lost in the middle of a batch: the proxy cuts the relay's
/// connection after a number of bytes, again and again, while the relay
/// ships 10,000 events of 20 keys. Every event arrives once, and every
/// key's events in seq order (a publish lost in the cut cannot be overtaken
/// by a later one of its key, which the client sends after reconnecting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_batch_keep_per_key_order() -> TestResult {
    let server = NatsServer::start(&[])?;
    let proxy = proxy::Proxy::start(server.port).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let opts = through_proxy(&proxy);
    let sink = NatsSink::connect(opts).await?;
    let relay = Relay::builder(&store)
        .backoff(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
            factor: 2.0,
            jitter: 0.0,
        })
        .sink(sink)
        .start()?;
    let s = store.clone();
    let writers = tokio::task::spawn_blocking(move || {
        commit_from_threads(&s, 4, 2500, 20).map_err(|e| e.to_string())
    });
    cut_until(
        &proxy,
        || relay.delivered() >= 10_000,
        || format!("delivered {}", relay.delivered()),
    )
    .await;
    writers.await??;
    // Read back directly, not through the proxy.
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client);
    assert_exactly_once_in_key_order(&read_stream(&js).await?, 10_000);
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// One sink shared by two relays (two stores, the same key names), with the
/// connection cut again and again: each relay sends its failed entries again
/// while the other has publishes in flight, and neither waits for its own
/// earlier attempt (the sink once held such an entry back for as long as
/// the other relay was busy). Everything arrives once, every store's keys
/// in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_a_sink_through_cuts_keep_per_key_order() -> TestResult {
    let server = NatsServer::start(&[])?;
    let proxy = proxy::Proxy::start(server.port).await?;
    let opts = through_proxy(&proxy);
    let sink: Arc<dyn Sink> = Arc::new(NatsSink::connect(opts).await?);
    let backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
        factor: 2.0,
        jitter: 0.0,
    };
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut stores = Vec::new();
    let mut relays = Vec::new();
    let mut writers = Vec::new();
    for dir in [&dir_a, &dir_b] {
        let store = Store::options()
            .durability(Durability::Buffered)
            .open(dir.path())?;
        relays.push(
            Relay::builder(&store)
                .backoff(backoff.clone())
                .sink_arc(sink.clone())
                .start()?,
        );
        let s = store.clone();
        writers.push(tokio::task::spawn_blocking(move || {
            commit_from_threads(&s, 2, 1500, 20).map_err(|e| e.to_string())
        }));
        stores.push(store);
    }
    cut_until(
        &proxy,
        || relays.iter().all(|r| r.delivered() >= 3_000),
        || {
            format!(
                "delivered {} and {}",
                relays[0].delivered(),
                relays[1].delivered()
            )
        },
    )
    .await;
    for w in writers {
        w.await??;
    }
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client);
    let received = read_stream(&js).await?;
    assert_eq!(received.messages.len(), 6_000, "stream message count");
    let ids: HashSet<&String> = received.messages.values().map(|(id, _, _)| id).collect();
    assert_eq!(ids.len(), 6_000, "distinct Nats-Msg-Ids");
    let mut last: HashMap<(&str, &str), u64> = HashMap::new();
    for (stream_seq, (id, key, seq)) in &received.messages {
        let store = id.rsplit_once('-').map_or("", |(s, _)| s);
        if let Some(prev) = last.insert((store, key.as_str()), *seq) {
            assert!(
                prev < *seq,
                "store {store} key {key}: seq {seq} at stream seq {stream_seq} after {prev}"
            );
        }
    }
    for r in relays {
        r.shutdown(Shutdown::Now).await?;
    }
    drop(stores);
    Ok(())
}

/// A stream full with `discard: new` refuses every publish ("maximum
/// messages exceeded"): a broker-wide condition. The relay backs off and
/// dead-letters nothing (it once dead-lettered whole batches within a
/// second); once there is room, everything arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_discard_new_stream_backs_off_without_dead_lettering() -> TestResult {
    let server = NatsServer::start(&[])?;
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client);
    let mut config = jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["events.>".into()],
        max_messages: 10,
        discard: jetstream::stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.create_stream(config.clone()).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        (0..30u8)
            .try_for_each(|i| tx.emit(Event::bytes("orders.paid", format!("k{}", i % 3), vec![i])))
    })?;
    let relay = Relay::builder(&store)
        .max_attempts(2)
        .backoff(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            factor: 2.0,
            jitter: 0.0,
        })
        .sink(NatsSink::connect(options(&server)).await?)
        .start()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while relay.metrics().failed.get() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.outbox().dead_letters().count()?,
        0,
        "a full stream dead-letters nothing"
    );
    assert_eq!(relay.metrics().sink_up.get(), 0);
    config.max_messages = -1;
    js.update_stream(config).await?;
    relay.wait_delivered(30, Duration::from_secs(20)).await?;
    assert_exactly_once_in_key_order(&read_stream(&js).await?, 30);
    assert_eq!(store.outbox().dead_letters().count()?, 0);
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// An existing stream is checked at connect: one that does not capture the
/// template's subjects ("no responders" for every publish) or deduplicates
/// over a shorter window than configured is refused, saying which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_that_does_not_fit_is_refused_at_connect() -> TestResult {
    let server = NatsServer::start(&[])?;
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["other.>".into()],
        ..Default::default()
    })
    .await?;
    match NatsSink::connect(options(&server)).await {
        Err(outboxkv::Error::Broker { message, .. }) => {
            assert!(
                message.starts_with("stream:") && message.contains("captures"),
                "{message}"
            )
        }
        other => return Err(format!("expected a stream error, got {other:?}").into()),
    }
    js.create_stream(jetstream::stream::Config {
        name: "SHORT".into(),
        subjects: vec!["short.>".into()],
        duplicate_window: Duration::from_secs(10),
        ..Default::default()
    })
    .await?;
    let short = NatsOptions::new(server.url.clone())
        .prefix("short")
        .create_stream(StreamSetup {
            name: "SHORT".into(),
            subjects: vec!["short.>".into()],
            duplicate_window: Duration::from_secs(120),
        });
    match NatsSink::connect(short).await {
        Err(outboxkv::Error::Broker { message, .. }) => {
            assert!(message.contains("deduplicates over"), "{message}")
        }
        other => return Err(format!("expected a window error, got {other:?}").into()),
    }
    // A template without a fixed first token cannot name a stream's subjects.
    let bare = NatsOptions::new(server.url.clone()).subject_template("{type}");
    assert!(StreamSetup::for_template("ANY", &bare).is_err());
    // One whose stream is derived from the template works at once.
    let derived = NatsOptions::new(server.url.clone()).subject_template("svc.{type}");
    let setup = StreamSetup::for_template("SVC", &derived)?;
    let sink = NatsSink::connect(derived.create_stream(setup)).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| tx.emit(Event::bytes("orders.paid", "k", vec![1])))?;
    let relay = Relay::builder(&store).sink(sink).start()?;
    relay.wait_delivered(1, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// An entry stored before the emit checks (a forged key, a reserved
/// header) is rejected by the sink for good, not sent: nothing reaches the
/// stream, and no forged `Nats-Msg-Id` makes JetStream answer "duplicate".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_stored_entries_are_rejected_not_sent() -> TestResult {
    let server = NatsServer::start(&[])?;
    let sink = NatsSink::connect(options(&server)).await?;
    let good = OutboxEntry {
        seq: 1,
        id: outboxkv::EventId {
            store: outboxkv::StoreId([1; 16]),
            seq: 1,
        },
        event_type: "orders.paid".into(),
        key: "k".into(),
        content_type: "application/octet-stream".into(),
        headers: Vec::new(),
        payload: vec![1],
        created_at_micros: 0,
    };
    let mut forged_key = good.clone();
    forged_key.key = "k\r\nNats-Msg-Id: 01010101010101010101010101010101-1".into();
    let mut reserved = good.clone();
    reserved.headers.push(("Nats-Rollup".into(), "all".into()));
    let outcomes = sink.publish(&[forged_key, reserved]).await;
    for o in &outcomes {
        assert!(
            matches!(
                o,
                Outcome::Rejected {
                    permanent: true,
                    ..
                }
            ),
            "{o:?}"
        );
    }
    let info = sink
        .jetstream()
        .get_stream(STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(info, 0, "nothing was sent");
    Ok(())
}
