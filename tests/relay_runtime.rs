//! The in-process relay never blocks its runtime's workers: its reads, the
//! fsync that makes what it read durable, and its prunes run on the
//! runtime's blocking pool. Here every fsync and every prune write takes
//! 400 ms, on a current-thread runtime whose one thread also runs a ticker
//! task.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outboxkv::relay::{BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::{Durability, Event, Failpoint, OutboxEntry, Store};

use common::TestResult;

struct Acking;

impl Sink for Acking {
    fn name(&self) -> &str {
        "acking"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
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

#[test]
fn relay_fsyncs_and_prunes_off_the_runtime_thread() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Buffered commits: the relay fsyncs what it read before it ships it.
    let store = Store::options()
        .durability(Durability::Buffered)
        .relay_cursor_poll(None)
        .open(dir.path())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ticks, waited) = rt.block_on(async {
        let relay = Relay::builder(&store).sink(Acking).start()?;
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.delay_fsyncs(Duration::from_millis(400));
        store.delay_at(Failpoint::PruneWrite, Duration::from_millis(400));
        let before = ticks.load(Ordering::Relaxed);
        let started = Instant::now();
        let c = store.write(|tx| tx.emit(Event::bytes("t", "k", b"x".to_vec())))?;
        relay
            .wait_delivered(c.seqs.end - 1, Duration::from_secs(30))
            .await?;
        let waited = started.elapsed();
        let during = ticks.load(Ordering::Relaxed) - before;
        store.delay_fsyncs(Duration::ZERO);
        store.delay_at(Failpoint::PruneWrite, Duration::ZERO);
        relay.shutdown(Shutdown::Now).await?;
        Ok::<_, outboxkv::Error>((during, waited))
    })?;
    // Delivered is reported after the prune: both delays passed.
    assert!(
        waited >= Duration::from_millis(800),
        "the relay reported delivery before its fsync and prune: {waited:?}"
    );
    assert!(
        ticks >= 60,
        "the relay blocked the runtime's only thread: {ticks} ticks in {waited:?}"
    );
    // Delivered and pruned.
    assert_eq!(store.outbox().tail(), 2);
    Ok(())
}
