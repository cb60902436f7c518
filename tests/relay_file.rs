//! The relay with the embedded sinks: ordering, dead letters, backoff,
//! shutdown. Runs without a broker.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outboxkv::relay::{Backoff, BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::sink::FileSink;
use outboxkv::{Durability, Event, OutboxEntry, Store, Table};

use common::TestResult;

const T: Table<u64, u64> = Table::new("t");

fn store(dir: &tempfile::TempDir) -> outboxkv::Result<Store> {
    Store::options()
        .durability(Durability::Buffered)
        .open(dir.path().join("store"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_gets_every_event_once_in_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let path = dir.path().join("events.jsonl");
    let relay = Relay::builder(&store)
        .batch_size(64)
        .sink(FileSink::open(&path)?)
        .start()?;
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || -> outboxkv::Result<()> {
                for i in 0..500u64 {
                    store.write(|tx| {
                        tx.put(&T, &(w * 1000 + i), &i)?;
                        tx.emit(Event::json(
                            "t.put",
                            format!("k{}", i % 10),
                            &serde_json::json!({ "w": w, "i": i }),
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
    let head = store.outbox().head();
    assert_eq!(head, 2000);
    relay.wait_delivered(head, Duration::from_secs(30)).await?;
    assert_eq!(store.outbox().depth(), 0, "delivered entries are pruned");
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;

    let text = std::fs::read_to_string(&path)?;
    let mut ids = HashSet::new();
    let mut last_seq = 0;
    for line in text.lines() {
        let ev: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(ev["specversion"], "1.0");
        assert_eq!(ev["type"], "t.put");
        assert!(
            ev["data"]["i"].is_u64(),
            "JSON payloads are embedded as data: {line}"
        );
        let seq = ev["outboxseq"].as_u64().ok_or("no outboxseq")?;
        assert_eq!(seq, last_seq + 1, "lines are in seq order without gaps");
        last_seq = seq;
        assert!(
            ids.insert(ev["id"].as_str().ok_or("no id")?.to_string()),
            "duplicate id"
        );
    }
    assert_eq!(ids.len(), 2000);
    Ok(())
}

/// Rejects entries whose payload starts with `bad`, permanently; counts calls.
struct Picky {
    calls: Arc<AtomicUsize>,
}

impl Sink for Picky {
    fn name(&self) -> &str {
        "picky"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            batch
                .iter()
                .map(|e| {
                    if e.payload.starts_with(b"bad") {
                        Outcome::Rejected {
                            error: "message too large".into(),
                            permanent: true,
                        }
                    } else {
                        Outcome::acked()
                    }
                })
                .collect()
        })
    }
}

#[tokio::test]
async fn rejected_entries_are_dead_lettered_and_can_be_replayed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let relay = Relay::builder(&store)
        .sink(Picky {
            calls: Arc::new(AtomicUsize::new(0)),
        })
        .start()?;
    let c = store.write(|tx| {
        tx.emit(Event::bytes("e", "k", b"ok-1".to_vec()))?;
        tx.emit(Event::bytes("e", "k", b"bad-2".to_vec()))?;
        tx.emit(Event::bytes("e", "k", b"ok-3".to_vec()))
    })?;
    relay.wait_delivered(3, Duration::from_secs(10)).await?;
    let dlq = store.outbox().dead_letters();
    let dead = dlq.list(0, 10)?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].entry.seq, 2);
    assert_eq!(dead[0].entry.id, c.event_ids().nth(1).ok_or("no id")?);
    assert_eq!(dead[0].error, "message too large");
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(relay.metrics().dead_lettered.get(), 1);
    assert_eq!(relay.metrics().acked.get(), 2);

    // Replayed: back in the outbox with the same id (and still rejected).
    let replayed = dlq.replay(&[2])?;
    assert_eq!(replayed, 4..5);
    relay.wait_delivered(4, Duration::from_secs(10)).await?;
    let again = dlq.list(0, 10)?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].entry.seq, 4);
    assert_eq!(
        again[0].entry.id, dead[0].entry.id,
        "replay keeps the event id"
    );
    dlq.purge(&[4])?;
    assert_eq!(dlq.count()?, 0);
    assert!(matches!(
        dlq.replay(&[99]),
        Err(outboxkv::Error::InvalidArgument(_))
    ));
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// Fails (retryably) until `until` calls were made.
struct Flaky {
    calls: Arc<AtomicUsize>,
    until: usize,
}

impl Sink for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let ok = n >= self.until;
        Box::pin(async move {
            batch
                .iter()
                .map(|_| {
                    if ok {
                        Outcome::acked()
                    } else {
                        Outcome::Retry {
                            error: "broker down".into(),
                        }
                    }
                })
                .collect()
        })
    }
}

#[tokio::test]
async fn retryable_failures_back_off_and_lose_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let calls = Arc::new(AtomicUsize::new(0));
    let relay = Relay::builder(&store)
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            factor: 2.0,
            jitter: 0.0,
        })
        .sink(Flaky {
            calls: calls.clone(),
            until: 6,
        })
        .start()?;
    let start = Instant::now();
    store.write(|tx| (0..10).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    relay.wait_delivered(10, Duration::from_secs(10)).await?;
    let took = start.elapsed();
    // Five failed rounds wait 20 + 40 + 80 + 160 + 200 ms = 500 ms: a relay
    // that spun would have made thousands of calls in that time.
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert_eq!(relay.metrics().failed.get(), 50);
    assert_eq!(store.outbox().depth(), 0);
    assert_eq!(
        store.outbox().dead_letters().count()?,
        0,
        "retryable failures never dead-letter"
    );
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

/// Never answers.
struct Hang;

impl Sink for Hang {
    fn name(&self) -> &str {
        "hang"
    }
    fn publish<'a>(&'a self, _batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn stopping_now_leaves_unacknowledged_entries_in_the_outbox() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let relay = Relay::builder(&store).sink(Hang).start()?;
    store.write(|tx| tx.emit(Event::bytes("e", "k", vec![1])))?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    relay
        .shutdown(Shutdown::Drain(Duration::from_millis(100)))
        .await?;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "drain honours its timeout"
    );
    assert_eq!(
        store.outbox().depth(),
        1,
        "nothing unacknowledged was pruned"
    );

    // A second relay delivers it.
    let path = dir.path().join("events.jsonl");
    let relay = Relay::builder(&store)
        .sink(FileSink::open(&path)?)
        .start()?;
    relay.wait_delivered(1, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(std::fs::read_to_string(&path)?.lines().count(), 1);
    Ok(())
}

#[test]
fn a_relay_runs_without_an_async_runtime() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let path = dir.path().join("events.jsonl");
    let relay = Relay::builder(&store)
        .sink(FileSink::open(&path)?)
        .start()?;
    store.write(|tx| tx.emit(Event::bytes("e", "k", vec![1])))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.delivered() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(relay.delivered(), 1);
    relay.shutdown_blocking(Shutdown::Drain(Duration::from_secs(5)))?;
    assert_eq!(std::fs::read_to_string(&path)?.lines().count(), 1);
    Ok(())
}

#[tokio::test]
async fn metrics_show_depth_and_latency() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let path = dir.path().join("events.jsonl");
    let relay = Relay::builder(&store)
        .sink(FileSink::open(&path)?)
        .start()?;
    store.write(|tx| (0..5).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    relay.wait_delivered(5, Duration::from_secs(10)).await?;
    let text = relay.metrics().encode_text();
    assert!(text.contains("outboxkv_relay_acked_total 5"), "{text}");
    assert!(
        text.contains("outboxkv_relay_commit_to_ack_seconds_count 5"),
        "{text}"
    );
    assert!(text.contains("outboxkv_relay_delivered_seq 5"), "{text}");
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

#[test]
fn draining_right_after_start_ships_everything() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    store.write(|tx| (0..50).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    let path = dir.path().join("events.jsonl");
    // Outside a runtime: the relay runs on its own thread.
    let relay = Relay::builder(&store)
        .batch_size(7)
        .sink(FileSink::open(&path)?)
        .start()?;
    relay.shutdown_blocking(Shutdown::Drain(Duration::from_secs(10)))?;
    assert_eq!(store.outbox().depth(), 0);
    assert_eq!(std::fs::read_to_string(&path)?.lines().count(), 50);

    // Inside a runtime, through the async shutdown.
    store.write(|tx| (0..50).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let relay = Relay::builder(&store)
            .batch_size(7)
            .sink(FileSink::open(&path)?)
            .start()?;
        relay
            .shutdown(Shutdown::Drain(Duration::from_secs(10)))
            .await
    })?;
    assert_eq!(store.outbox().depth(), 0);
    assert_eq!(std::fs::read_to_string(&path)?.lines().count(), 100);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_cut_when_the_file_sink_opens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("events.jsonl");
    // Two records of the sink's format, then one a crash cut short.
    std::fs::write(
        &path,
        "{\"specversion\":\"1.0\",\"id\":\"a\"}\n{\"specversion\":\"1.0\",\"id\":\"b\"}\n\
         {\"specversion\":\"1.0\",\"id\":\"c\",\"da",
    )?;
    let store = store(&dir)?;
    store.write(|tx| tx.emit(Event::bytes("t", "k", b"x".to_vec())))?;
    let relay = Relay::builder(&store)
        .sink(FileSink::open(&path)?)
        .start()?;
    relay.wait_delivered(1, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    let text = std::fs::read_to_string(&path)?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[1]["id"], "b");
    assert_eq!(lines[2]["outboxseq"], 1);
    Ok(())
}

/// Records, for every entry it is handed, whether the store already had it
/// on disk.
struct CheckDurable {
    outbox: outboxkv::Outbox,
    shipped: Arc<AtomicUsize>,
    ahead_of_disk: Arc<AtomicUsize>,
}

impl Sink for CheckDurable {
    fn name(&self) -> &str {
        "check-durable"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        let durable = self.outbox.durable_head();
        for e in batch {
            if e.seq > durable {
                self.ahead_of_disk.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.shipped.fetch_add(batch.len(), Ordering::SeqCst);
        Box::pin(async move { batch.iter().map(|_| Outcome::acked()).collect() })
    }
}

/// `Buffered` commits are not on disk when they return; the relay must not
/// hand their events to a broker before an fsync covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_events_are_on_disk_before_the_relay_ships_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store(&dir)?;
    let (shipped, ahead) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let relay = Relay::builder(&store)
        .batch_size(16)
        .sink(CheckDurable {
            outbox: store.outbox(),
            shipped: shipped.clone(),
            ahead_of_disk: ahead.clone(),
        })
        .start()?;
    for i in 0..300u32 {
        store.write(|tx| tx.emit(Event::bytes("e", "k", i.to_be_bytes().to_vec())))?;
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    relay.wait_delivered(300, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(shipped.load(Ordering::SeqCst), 300);
    assert_eq!(
        ahead.load(Ordering::SeqCst),
        0,
        "entries shipped ahead of the disk"
    );
    assert!(store.outbox().durable_head() >= 300);

    // Sync commits are on disk when they return: nothing left to do.
    store.write(|tx| {
        tx.set_durability(outboxkv::Durability::Sync);
        tx.emit(Event::bytes("e", "k", vec![]))
    })?;
    assert_eq!(store.outbox().durable_head(), 301);
    Ok(())
}

/// The file sink never damages a file that is not its own: a TOML file, a
/// JSON file, text without a final line break are refused untouched (it
/// once truncated any file lacking a final newline, to nothing if it had
/// none). A new file is created private (0600).
#[test]
fn the_file_sink_refuses_files_that_are_not_its_own_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    for (name, content) in [
        ("relay.toml", "db = \"data/orders\"\nsink = \"file\""),
        ("notes.txt", "no newline at all"),
        ("config.json", "{\"a\": 1}"),
        ("lines.jsonl", "{\"id\":\"a\"}\n{\"id\":\"b\""),
        (
            "events.jsonl",
            "{\"specversion\":\"1.0\",\"id\":\"a\"}\nnot json at the end",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content)?;
        match FileSink::open(&path) {
            Err(outboxkv::Error::InvalidArgument(msg)) => {
                assert!(msg.contains("refusing"), "{name}: {msg}")
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(&path)?,
            content,
            "{name} was changed"
        );
    }
    let fresh = dir.path().join("new.jsonl");
    let _sink = FileSink::open(&fresh)?;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&fresh)?.permissions().mode() & 0o777,
        0o600
    );
    Ok(())
}

/// One sink per file: a second `FileSink` on a file another one holds
/// (another relay) is refused, and the first keeps working.
#[tokio::test]
async fn a_second_file_sink_on_one_file_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("events.jsonl");
    let first = FileSink::open(&path)?;
    match FileSink::open(&path) {
        Err(outboxkv::Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::WouldBlock)
        }
        other => return Err(format!("expected a WouldBlock refusal, got {other:?}").into()),
    }
    drop(first);
    FileSink::open(&path)?;
    Ok(())
}

/// A huge file without a line break (here a sparse 1 GiB one) is not read
/// whole into memory: the check looks at most 400 MiB back (in 64 KiB
/// reads) for the last line, refuses the file, and leaves it as it was.
#[test]
fn a_huge_file_without_a_line_break_is_refused_untouched() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.bin");
    std::fs::File::create(&path)?.set_len(1 << 30)?;
    match FileSink::open(&path) {
        Err(outboxkv::Error::InvalidArgument(msg)) => {
            assert!(msg.contains("longer than any record"), "{msg}")
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    assert_eq!(std::fs::metadata(&path)?.len(), 1 << 30);
    Ok(())
}
