//! The relay's linger: it waits up to the linger for a batch to fill, and
//! no longer than it takes to fill. With a 30 s linger, a full batch (or one
//! that fills while the relay waits) must be delivered well before the
//! linger ends; a batch that never fills goes when the linger ends.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboxkv::relay::{BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::{Event, OutboxEntry, Store};

use common::TestResult;

/// Acknowledges everything and records the size of every batch.
struct Recording(Arc<Mutex<Vec<usize>>>);

impl Sink for Recording {
    fn name(&self) -> &str {
        "recording"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        if let Ok(mut sizes) = self.0.lock() {
            sizes.push(batch.len());
        }
        let acks = batch
            .iter()
            .map(|_| Outcome::Acked {
                position: None,
                duplicate: false,
            })
            .collect();
        Box::pin(async move { acks })
    }
}

fn emit(store: &Store, n: usize) -> outboxkv::Result<()> {
    store
        .write(|tx| (0..n).try_for_each(|i| tx.emit(Event::bytes("t", format!("k{i}"), vec![]))))?;
    Ok(())
}

/// Waits until the relay has seen `depth` entries waiting (it sets the
/// gauge right before it lingers), so that what follows happens while it
/// lingers.
async fn lingering(relay: &Relay, depth: i64) -> TestResult {
    for _ in 0..1000 {
        if relay.metrics().depth.get() == depth {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(format!("the relay never saw {depth} entries waiting").into())
}

fn sizes(s: &Arc<Mutex<Vec<usize>>>) -> Vec<usize> {
    s.lock().map(|v| v.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fills_while_the_relay_lingers_goes_at_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let recorded = Arc::new(Mutex::new(Vec::new()));
    emit(&store, 4)?;
    let relay = Relay::builder(&store)
        .batch_size(10)
        .linger(Duration::from_secs(30))
        .sink(Recording(recorded.clone()))
        .start()?;
    lingering(&relay, 4).await?;
    assert!(
        sizes(&recorded).is_empty(),
        "a part batch went before the linger"
    );
    emit(&store, 6)?;
    // Without waking on commits the relay would sleep out its 30 s.
    relay.wait_delivered(10, Duration::from_secs(10)).await?;
    assert_eq!(sizes(&recorded), vec![10]);
    // A full batch waiting when the relay looks goes without lingering.
    emit(&store, 10)?;
    relay.wait_delivered(20, Duration::from_secs(10)).await?;
    assert_eq!(sizes(&recorded), vec![10, 10]);
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_does_not_fill_goes_when_the_linger_ends() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let recorded = Arc::new(Mutex::new(Vec::new()));
    emit(&store, 3)?;
    let started = std::time::Instant::now();
    let relay = Relay::builder(&store)
        .batch_size(10)
        .linger(Duration::from_millis(200))
        .sink(Recording(recorded.clone()))
        .start()?;
    relay.wait_delivered(3, Duration::from_secs(10)).await?;
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "went after {:?}, before the linger ended",
        started.elapsed()
    );
    assert_eq!(sizes(&recorded), vec![3]);
    relay.shutdown(Shutdown::Now).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_the_linger_is_not_held_up_by_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    // A linger that would end in 30 years: no overflow, no panic.
    for (mode, shipped) in [
        (Shutdown::Now, Vec::<usize>::new()),
        (Shutdown::Drain(Duration::from_secs(10)), vec![6]),
    ] {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        emit(&store, 3)?;
        let relay = Relay::builder(&store)
            .batch_size(10)
            .linger(Duration::MAX)
            .sink(Recording(recorded.clone()))
            .start()?;
        let waiting = store.outbox().depth() as i64;
        lingering(&relay, waiting).await?;
        tokio::time::timeout(Duration::from_secs(10), relay.shutdown(mode))
            .await
            .map_err(|_| "shutdown waited for the linger")??;
        // Stop now ships nothing; a drain ships what waits (3 left by the
        // first round, 3 more).
        assert_eq!(sizes(&recorded), shipped);
    }
    Ok(())
}
