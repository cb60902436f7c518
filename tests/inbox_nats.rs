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

/// A reader with a steady flow of messages waiting still stops when its
/// shutdown completes (it looks at it on every turn, not only when it
/// waits), applies and acknowledges what it took in, and leaves the rest.
#[test]
fn shutdown_under_a_steady_flow_stops_and_acknowledges_what_it_applied() -> TestResult {
    const ROWS: Table<u64, u64> = Table::new("rows");
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = async_nats::connect(&server.url).await?;
        let js = jetstream::new(client);
        let total = 3000u64;
        plain_stream(&js, "FLOW", total).await?;
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let inbox = Inbox::new(&store, "flow")?;
        let opts = NatsReaderOptions::new(NatsConnection::new(&server.url), "FLOW", "flow")
            .batch(1)
            .commits_in_flight(4);
        let mut reader = NatsReader::connect(inbox.clone(), opts).await?;
        let i = inbox.clone();
        let stop = async move {
            while i.metrics().applied() < 50 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        // Spawned: `run`'s future is `Send`, as a multi-thread runtime
        // needs.
        tokio::spawn(async move {
            reader
                .run(
                    |tx| {
                        let p = tx.message().position;
                        tx.put(&ROWS, &p, &p)
                    },
                    stop,
                )
                .await
        })
        .await??;
        let applied = inbox.metrics().applied();
        assert!(
            (50..total / 2).contains(&applied),
            "stopped after {applied} of {total}"
        );
        assert_eq!(store.range(&ROWS, ..)?.count() as u64, applied);
        assert_eq!(
            inbox.position("FLOW/flow", 0)?.map(|p| p.next),
            Some(applied + 1)
        );
        // Everything applied was acknowledged: the consumer's floor
        // reaches it (acks from another connection arrive in their time).
        let stream = js.get_stream("FLOW").await?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer("flow")
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let floor = consumer.info().await?.ack_floor.stream_sequence;
            if floor == applied {
                break;
            }
            assert!(
                floor < applied && Instant::now() < deadline,
                "ack floor {floor}, applied {applied}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// A stream `name` on subjects `<name lowercased>.>` holding `n` messages
/// (payload: their index), published with up to 500 acks outstanding.
async fn plain_stream(
    js: &jetstream::Context,
    name: &str,
    n: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let subject = name.to_lowercase();
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{subject}.>")],
        ..Default::default()
    })
    .await?;
    let mut acks = std::collections::VecDeque::new();
    for i in 0..n {
        acks.push_back(
            js.publish(format!("{subject}.m"), i.to_string().into())
                .await?,
        );
        if acks.len() >= 500
            && let Some(a) = acks.pop_front()
        {
            a.await?;
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// The acknowledgement floor of durable `durable` on `stream` once it has
/// stopped moving (acks sent from another connection arrive in their
/// time): read until two reads 200 ms apart agree.
async fn settled_floor(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<u64, Box<dyn std::error::Error>> {
    let stream = js.get_stream(stream).await?;
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer(durable)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = consumer.info().await?.ack_floor.stream_sequence;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = consumer.info().await?.ack_floor.stream_sequence;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
}

/// `commits_in_flight(n)` bounds how far handlers run ahead of the disk:
/// with slow fsyncs and a backlog, each handler (one message per commit,
/// one event each) sees at most n - 1 earlier commits not yet durable, and
/// with n above 1 it does see them (the fsyncs are overlapped).
#[test]
fn commits_in_flight_bounds_how_far_handlers_run_ahead_of_the_disk() -> TestResult {
    const ROWS: Table<u64, u64> = Table::new("rows");
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let js = jetstream::new(async_nats::connect(&server.url).await?);
        let total = 120u64;
        plain_stream(&js, "AHEAD", total).await?;
        for n in [1u64, 3] {
            let dir = tempfile::tempdir()?;
            let store = Store::open(dir.path())?;
            store.delay_fsyncs(Duration::from_millis(5));
            let inbox = Inbox::new(&store, "ahead")?;
            let durable = format!("ahead{n}");
            let opts = NatsReaderOptions::new(NatsConnection::new(&server.url), "AHEAD", &durable)
                .batch(1)
                .commits_in_flight(n as usize);
            let mut reader = NatsReader::connect(inbox.clone(), opts).await?;
            let (mut handled, mut most_ahead) = (0u64, 0u64);
            let i = inbox.clone();
            let done = async move {
                while i.metrics().applied() < total {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            let s = store.clone();
            reader
                .run(
                    |tx| {
                        // Each earlier handler's commit emitted one event,
                        // seqs 1..=handled.
                        most_ahead = most_ahead.max(handled - s.outbox().durable_head());
                        handled += 1;
                        let p = tx.message().position;
                        tx.put(&ROWS, &p, &p)?;
                        tx.emit(Event::bytes("row", p.to_string(), Vec::new()))
                    },
                    done,
                )
                .await?;
            assert_eq!(handled, total, "{n} in flight: a handler ran again");
            assert_eq!(
                most_ahead,
                n - 1,
                "{n} in flight: a handler saw {most_ahead} commits not yet durable"
            );
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// An fsync failing under commits in flight: the reader fails with
/// `Error::Poisoned`, acknowledges no message whose commit did not reach
/// the disk, and a reader on the reopened store applies every message
/// exactly once.
///
/// The failed fsync is simulated: the writes it was for are still in the
/// page cache and survive the reopen here, so this checks what is
/// acknowledged, not a loss of what a later handler read (that a crash
/// takes back a later commit with an earlier one rests on the log's
/// order).
#[test]
fn a_failed_fsync_is_never_acknowledged() -> TestResult {
    const ROWS: Table<u64, u64> = Table::new("rows");
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let js = jetstream::new(async_nats::connect(&server.url).await?);
        let total = 400u64;
        plain_stream(&js, "FAIL", total).await?;
        let dir = tempfile::tempdir()?;
        let opts = || {
            NatsReaderOptions::new(NatsConnection::new(&server.url), "FAIL", "fail")
                .batch(8)
                .commits_in_flight(4)
                .ack_wait(Duration::from_secs(1))
        };
        let add = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
            let p = tx.message().position;
            let had = tx.get_for_update(&ROWS, &p)?.unwrap_or(0);
            tx.put(&ROWS, &p, &(had + 1))
        };
        let durable_applied = {
            let store = Store::open(dir.path())?;
            store.delay_fsyncs(Duration::from_millis(2));
            store.fail_fsyncs_after(6);
            let inbox = Inbox::new(&store, "fail")?;
            let mut reader = NatsReader::connect(inbox.clone(), opts()).await?;
            let failed = reader.run(add, std::future::pending()).await;
            assert!(
                matches!(failed, Err(outboxkv::Error::Poisoned { .. })),
                "{failed:?}"
            );
            inbox.metrics().applied()
        };
        assert!(durable_applied < total, "{durable_applied}");
        let floor = settled_floor(&js, "FAIL", "fail").await?;
        assert!(
            floor <= durable_applied,
            "acknowledged through {floor}, but only {durable_applied} were durable"
        );
        let store = Store::open(dir.path())?;
        let inbox = Inbox::new(&store, "fail")?;
        let mut reader = NatsReader::connect(inbox.clone(), opts()).await?;
        let (s, i) = (store.clone(), inbox.clone());
        let done = async move {
            while s.range(&ROWS, ..).map(|r| r.count()).unwrap_or(0) < total as usize
                || i.position("FAIL/fail", 0).ok().flatten().map(|p| p.next) != Some(total + 1)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), reader.run(add, done)).await??;
        for p in 1..=total {
            assert_eq!(store.get(&ROWS, &p)?, Some(1), "message {p}");
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// The broker going away under commits in flight: a shutdown asked for
/// then returns (an error, within the settle wait) instead of waiting for
/// the broker forever; after a restart of the broker a new reader
/// applies every message exactly once.
#[test]
fn a_broker_gone_under_commits_in_flight_neither_hangs_nor_doubles() -> TestResult {
    const ROWS: Table<u64, u64> = Table::new("rows");
    let server = NatsServer::start(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let total = 600u64;
        {
            let js = jetstream::new(async_nats::connect(&server.url).await?);
            plain_stream(&js, "GONE", total).await?;
        }
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store.delay_fsyncs(Duration::from_millis(20));
        let inbox = Inbox::new(&store, "gone")?;
        let opts = || {
            NatsReaderOptions::new(NatsConnection::new(&server.url), "GONE", "gone")
                .batch(4)
                .commits_in_flight(4)
                .ack_wait(Duration::from_secs(1))
                .settle_wait(Duration::from_secs(2))
        };
        let add = |tx: &mut outboxkv::inbox::InboxTx<'_, '_>| {
            let p = tx.message().position;
            let had = tx.get_for_update(&ROWS, &p)?.unwrap_or(0);
            tx.put(&ROWS, &p, &(had + 1))
        };
        let mut reader = NatsReader::connect(inbox.clone(), opts()).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            reader
                .run(add, async {
                    let _ = stopped.await;
                })
                .await
        });
        while inbox.metrics().applied() < 40 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.stop()?;
        let _ = stop.send(());
        let asked = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .map_err(|_| "the reader did not return 30 s after its shutdown")??;
        assert!(
            matches!(
                ended,
                Err(outboxkv::Error::Broker { .. } | outboxkv::Error::Timeout(_))
            ),
            "{ended:?}"
        );
        assert!(
            inbox.metrics().applied() < total,
            "all applied before the stop"
        );
        eprintln!(
            "returned {:?} after the shutdown: {ended:?}",
            asked.elapsed()
        );
        server.restart()?;
        let mut reader = NatsReader::connect(inbox.clone(), opts()).await?;
        let (s, i) = (store.clone(), inbox.clone());
        let done = async move {
            while s.range(&ROWS, ..).map(|r| r.count()).unwrap_or(0) < total as usize
                || i.position("GONE/gone", 0).ok().flatten().map(|p| p.next) != Some(total + 1)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), reader.run(add, done)).await??;
        for p in 1..=total {
            assert_eq!(store.get(&ROWS, &p)?, Some(1), "message {p}");
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
