//! How the relay treats failures (with sinks scripted to fail the way
//! brokers do; the NATS and Kafka tests show the same against real
//! brokers): only an entry's own rejections count toward `max_attempts`,
//! entries waiting behind a failing one are not charged, broker-wide
//! failures never dead-letter, a dead-letter storm is held back, and
//! entries acknowledged beyond a failing one are not published again.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboxkv::relay::{Backoff, BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::{Event, OutboxEntry, Store};

use common::TestResult;

fn fast() -> Backoff {
    Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(5),
        factor: 2.0,
        jitter: 0.0,
    }
}

/// A scripted sink: `decide(seq, times this seq was published before)`.
struct Scripted {
    seen: Arc<Mutex<HashMap<u64, u32>>>,
    decide: fn(u64, u32) -> Outcome,
}

impl Scripted {
    fn new(decide: fn(u64, u32) -> Outcome) -> (Scripted, Arc<Mutex<HashMap<u64, u32>>>) {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        (
            Scripted {
                seen: seen.clone(),
                decide,
            },
            seen,
        )
    }
}

impl Sink for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        let mut seen = self.seen.lock().expect("lock");
        let out = batch
            .iter()
            .map(|e| {
                let n = seen.entry(e.seq).or_insert(0);
                let o = (self.decide)(e.seq, *n);
                *n += 1;
                o
            })
            .collect();
        Box::pin(async move { out })
    }
}

fn store_with(dir: &tempfile::TempDir, n: u8) -> outboxkv::Result<Store> {
    let store = Store::open(dir.path())?;
    store.write(|tx| {
        (0..n).try_for_each(|i| tx.emit(Event::bytes("e", format!("k{i}"), vec![i])))
    })?;
    Ok(store)
}

fn rejected(error: &str) -> Outcome {
    Outcome::Rejected {
        error: error.into(),
        permanent: false,
    }
}

/// Entry 1 is refused (a message-specific rejection) every time; the
/// entries behind it are refused too while it blocks them (as a broker
/// refuses a batch). Only entry 1 is dead-lettered: the others never were
/// the entry that blocked, so their rounds do not count.
#[tokio::test]
async fn only_the_blocking_entry_is_charged_for_rejections() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store_with(&dir, 10)?;
    let (sink, _) = Scripted::new(|seq, _| {
        if seq == 1 {
            rejected("entry 1 is refused")
        } else {
            rejected("refused with the batch")
        }
    });
    // Entries 2.. are refused only while entry 1 is in their batch: once it
    // is gone, the batch starts at 2 and the scripted "broker" accepts.
    struct Behind(Scripted);
    impl Sink for Behind {
        fn name(&self) -> &str {
            "behind"
        }
        fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
            if batch.first().map(|e| e.seq) == Some(1) {
                self.0.publish(batch)
            } else {
                Box::pin(async move { batch.iter().map(|_| Outcome::acked()).collect() })
            }
        }
    }
    let relay = Relay::builder(&store)
        .backoff(fast())
        .max_attempts(5)
        .sink(Behind(sink))
        .start()?;
    relay.wait_delivered(10, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    let dead: Vec<u64> = store
        .outbox()
        .dead_letters()
        .list(0, 100)?
        .iter()
        .map(|d| d.entry.seq)
        .collect();
    assert_eq!(dead, vec![1], "only the entry that was refused itself");
    Ok(())
}

/// Broker-wide failures (a full stream, 503, insufficient resources,
/// refused authorization: the sinks report them as `Retry`) never
/// dead-letter, however long they last.
#[tokio::test]
async fn broker_wide_failures_never_dead_letter() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store_with(&dir, 20)?;
    let (sink, seen) = Scripted::new(|_, n| {
        if n < 30 {
            Outcome::Retry {
                error: "maximum messages exceeded".into(),
            }
        } else {
            Outcome::acked()
        }
    });
    let relay = Relay::builder(&store)
        .backoff(fast())
        .max_attempts(2)
        .sink(sink)
        .start()?;
    relay.wait_delivered(20, Duration::from_secs(30)).await?;
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(store.outbox().dead_letters().count()?, 0);
    assert!(
        seen.lock().map_err(|_| "lock")?[&1] > 2,
        "retried past max_attempts"
    );
    Ok(())
}

/// Every entry refused for good: after 20 in a row the relay stops
/// dead-lettering, raises the storm gauge and holds; once the "broker"
/// accepts again, the rest is delivered.
#[tokio::test]
async fn a_dead_letter_storm_is_held_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store_with(&dir, 100)?;
    static ACCEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let (sink, _) = Scripted::new(|_, _| {
        if ACCEPT.load(std::sync::atomic::Ordering::SeqCst) {
            Outcome::acked()
        } else {
            Outcome::Rejected {
                error: "schema registry down: everything is invalid".into(),
                permanent: true,
            }
        }
    });
    let relay = Relay::builder(&store)
        .backoff(fast())
        .dead_letter_storm_limit(20)
        .sink(sink)
        .start()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relay.metrics().dead_letter_storm.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "no storm detected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.outbox().dead_letters().count()?,
        20,
        "stopped at the limit"
    );
    assert_eq!(relay.delivered(), 20);
    assert_eq!(
        relay.metrics().sink_up.get(),
        0,
        "the storm counts as the broker's"
    );
    ACCEPT.store(true, std::sync::atomic::Ordering::SeqCst);
    relay.wait_delivered(100, Duration::from_secs(10)).await?;
    assert_eq!(relay.metrics().dead_letter_storm.get(), 0);
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(store.outbox().dead_letters().count()?, 20);
    Ok(())
}

/// A storm is not forgotten by a restart (a liveness probe killing an
/// unhealthy sidecar, a redeploy): the count of entries dead-lettered in a
/// row is rebuilt from the dead-letter table, in-process and in a sidecar,
/// so a restarted relay holds at once instead of dead-lettering 20 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_storm_survives_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store_with(&dir, 100)?;
    let refuse = || {
        Scripted::new(|_, _| Outcome::Rejected {
            error: "schema registry down: everything is invalid".into(),
            permanent: true,
        })
        .0
    };
    let wait_storm = |relay: &Relay| {
        let gauge = relay.metrics().dead_letter_storm.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while gauge.get() == 0 {
                assert!(std::time::Instant::now() < deadline, "no storm detected");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // A sidecar first (the service's store stays open, its cursor watcher
    // off: the sidecar's dead entries wait in the sidecar's cursor), then
    // in-process relays once the cursor is applied.
    drop(store);
    let store = Store::options().relay_cursor_poll(None).open(dir.path())?;
    for _ in 0..2 {
        let source = outboxkv::relay::SidecarSource::open(dir.path(), Duration::from_millis(5))?;
        let relay = Relay::builder_for(source)
            .backoff(fast())
            .dead_letter_storm_limit(20)
            .sink(refuse())
            .start()?;
        wait_storm(&relay).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(relay.delivered(), 20, "nothing more dead-lettered");
        relay.shutdown(Shutdown::Now).await?;
    }
    assert_eq!(
        store.outbox().dead_letters().count()?,
        0,
        "still in the cursor"
    );
    store.outbox().apply_relay_cursor()?;
    assert_eq!(store.outbox().dead_letters().count()?, 20);
    for _ in 0..2 {
        let relay = Relay::builder(&store)
            .backoff(fast())
            .dead_letter_storm_limit(20)
            .sink(refuse())
            .start()?;
        wait_storm(&relay).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        relay.shutdown(Shutdown::Now).await?;
        assert_eq!(store.outbox().dead_letters().count()?, 20);
    }
    assert_eq!(store.outbox().tail(), 21);
    Ok(())
}

/// Entry 1 is refused for good and dead-lettered; entry 2 (same key) was
/// held back by the sink behind it (`Outcome::Held`). That is not the
/// broker failing: the sink stays up, nothing else is counted, and entry 2
/// goes out next round without a growing backoff.
#[tokio::test]
async fn an_entry_held_behind_its_key_does_not_count_as_a_broker_failure() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store.write(|tx| (0..3u8).try_for_each(|i| tx.emit(Event::bytes("e", "same-key", vec![i]))))?;
    let (sink, seen) = Scripted::new(|seq, n| match (seq, n) {
        (1, _) => Outcome::Rejected {
            error: "invalid subject".into(),
            permanent: true,
        },
        (_, 0) => Outcome::Held {
            reason: "held back behind entry 1".into(),
        },
        _ => Outcome::acked(),
    });
    let relay = Relay::builder(&store)
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_secs(30),
            factor: 100.0,
            jitter: 0.0,
        })
        .sink(sink)
        .start()?;
    relay.wait_delivered(3, Duration::from_secs(5)).await?;
    assert_eq!(relay.metrics().sink_up.get(), 1);
    assert_eq!(relay.metrics().failed.get(), 1, "only entry 1's refusal");
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(seen.lock().map_err(|_| "lock")?[&2], 2);
    assert_eq!(store.outbox().dead_letters().count()?, 1);
    Ok(())
}

/// Entry 1 fails (retry) for a few rounds; entries 2..=50 are acknowledged
/// at the first try and never published again while the relay retries 1
/// (re-publishing them every round would store them twice on a broker
/// whose duplicate window has passed).
#[tokio::test]
async fn acknowledged_entries_are_not_published_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = store_with(&dir, 50)?;
    let (sink, seen) = Scripted::new(|seq, n| {
        if seq == 1 && n < 5 {
            Outcome::Retry {
                error: "timed out".into(),
            }
        } else {
            Outcome::acked()
        }
    });
    let relay = Relay::builder(&store).backoff(fast()).sink(sink).start()?;
    relay.wait_delivered(50, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    let seen = seen.lock().map_err(|_| "lock")?;
    assert_eq!(seen[&1], 6);
    for seq in 2..=50 {
        assert_eq!(seen[&seq], 1, "seq {seq} published {} times", seen[&seq]);
    }
    assert_eq!(store.outbox().depth(), 0);
    Ok(())
}
