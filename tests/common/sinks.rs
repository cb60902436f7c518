//! Sink wrappers and relay runs shared by the broker tests and the relay
//! benchmarks (feature `relay`).
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outboxkv::relay::SidecarSource;
use outboxkv::relay::{BoxFuture, Outcome, Relay, RelayBuilder, Shutdown, Sink};
use outboxkv::{Durability, Event, OutboxEntry, Store};
use parking_lot::Mutex;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Publishes through the real sink, then never returns: the relay is
/// "killed" after the broker has the batch but before it records its cursor.
pub struct PublishThenHang<S> {
    pub inner: S,
    /// How many entries the broker acknowledged.
    pub published: Arc<AtomicUsize>,
}

impl<S: Sink> Sink for PublishThenHang<S> {
    fn name(&self) -> &str {
        "publish-then-hang"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let outcomes = self.inner.publish(batch).await;
            let acked = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Acked { .. }))
                .count();
            self.published.fetch_add(acked, Ordering::SeqCst);
            std::future::pending::<()>().await;
            outcomes
        })
    }
}

/// Waits (up to 10 s) until `published` reaches `n`.
pub async fn wait_published(published: &AtomicUsize, n: usize) -> usize {
    for _ in 0..400 {
        if published.load(Ordering::SeqCst) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    published.load(Ordering::SeqCst)
}

/// Records the commit-to-ack latency (µs) of every acknowledged entry.
pub struct Timed<S> {
    pub inner: S,
    pub latencies: Arc<Mutex<Vec<u64>>>,
}

impl<S: Sink> Sink for Timed<S> {
    fn name(&self) -> &str {
        "timed"
    }
    fn max_concurrent_publishes(&self) -> usize {
        self.inner.max_concurrent_publishes()
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let outcomes = self.inner.publish(batch).await;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            let mut l = self.latencies.lock();
            for (e, o) in batch.iter().zip(&outcomes) {
                if matches!(o, Outcome::Acked { .. }) {
                    l.push(now.saturating_sub(e.created_at_micros));
                }
            }
            outcomes
        })
    }
}

/// A Buffered store with `n` events of `payload` bytes already committed
/// (keys `k0`..`k49`), in commits of 1000.
pub fn filled_store(
    event_type: &str,
    n: usize,
    payload: usize,
) -> AnyResult<(tempfile::TempDir, Store)> {
    filled_store_keys(event_type, n, payload, 50)
}

/// Like [`filled_store`], with keys `k0`..`k{keys - 1}` in turn.
pub fn filled_store_keys(
    event_type: &str,
    n: usize,
    payload: usize,
    keys: usize,
) -> AnyResult<(tempfile::TempDir, Store)> {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let payload = vec![7u8; payload];
    for chunk in 0..n.div_ceil(1000) {
        store.write(|tx| {
            (0..1000.min(n - chunk * 1000)).try_for_each(|i| {
                tx.emit(Event::bytes(
                    event_type,
                    format!("k{}", (chunk * 1000 + i) % keys.max(1)),
                    payload.clone(),
                ))
            })
        })?;
    }
    Ok((dir, store))
}

/// How long a relay with `batch` takes to ship all of `store`'s outbox.
pub async fn drain_time<S: Sink>(store: &Store, sink: S, batch: usize) -> AnyResult<Duration> {
    drain_time_with(store, sink, |b| b.batch_size(batch)).await
}

/// How long a relay takes to ship all of `store`'s outbox with `batch`
/// entries per batch and `in_flight` entries in flight (`None`: the
/// defaults).
pub async fn drain_time_of<S: Sink>(
    store: &Store,
    sink: S,
    batch: Option<usize>,
    in_flight: Option<usize>,
) -> AnyResult<Duration> {
    drain_time_with(store, sink, |mut b| {
        if let Some(batch) = batch {
            b = b.batch_size(batch);
        }
        if let Some(entries) = in_flight {
            b = b.in_flight_entries(entries);
        }
        b
    })
    .await
}

/// How long a relay built by `configure` takes to ship all of `store`'s
/// outbox.
pub async fn drain_time_with<S: Sink>(
    store: &Store,
    sink: S,
    configure: impl FnOnce(RelayBuilder) -> RelayBuilder,
) -> AnyResult<Duration> {
    let n = store.outbox().head();
    let start = Instant::now();
    let relay = configure(Relay::builder(store)).sink(sink).start()?;
    relay.wait_delivered(n, Duration::from_secs(300)).await?;
    let took = start.elapsed();
    relay.shutdown(Shutdown::Now).await?;
    Ok(took)
}

/// Commit-to-ack latency at a steady `rate` of Sync commits for `secs`,
/// after one warm-up event: (events, p50 ms, p99 ms, max ms).
pub async fn latency_run<S: Sink>(
    sink: S,
    event_type: &str,
    payload: usize,
    rate: u64,
    secs: u64,
) -> AnyResult<(usize, f64, f64, f64)> {
    latency_run_with(sink, event_type, payload, rate, secs, None).await
}

/// Like [`latency_run`]; with `sidecar: Some(interval)` the relay reads
/// through a [`SidecarSource`] catching up every `interval` (in this
/// process, as a sidecar process would), and the store applies its cursor.
pub async fn latency_run_with<S: Sink>(
    sink: S,
    event_type: &str,
    payload: usize,
    rate: u64,
    secs: u64,
    sidecar: Option<Duration>,
) -> AnyResult<(usize, f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Sync)
        .open(dir.path())?;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let sink = Timed {
        inner: sink,
        latencies: latencies.clone(),
    };
    let relay = match sidecar {
        None => Relay::builder(&store),
        Some(interval) => Relay::builder_for(SidecarSource::open(dir.path(), interval)?),
    }
    .sink(sink)
    .start()?;
    // Steady state: the first publish (connection set-up, metadata, a
    // restart scan) is not part of the measurement.
    store.write(|tx| tx.emit(Event::bytes(event_type, "warm-up", vec![0u8; payload])))?;
    relay.wait_delivered(1, Duration::from_secs(30)).await?;
    latencies.lock().clear();
    let s = store.clone();
    let total = rate * secs;
    let event_type = event_type.to_string();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let start = Instant::now();
        let payload = vec![7u8; payload];
        for i in 0..total {
            let due = start + Duration::from_micros(i * 1_000_000 / rate);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            s.write(|tx| {
                tx.emit(Event::bytes(
                    event_type.as_str(),
                    format!("k{}", i % 50),
                    payload.clone(),
                ))
            })
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await??;
    relay
        .wait_delivered(total + 1, Duration::from_secs(60))
        .await?;
    relay.shutdown(Shutdown::Now).await?;
    let l = std::mem::take(&mut *latencies.lock());
    Ok(percentiles(l))
}

/// (count, p50 ms, p99 ms, max ms) of latencies in microseconds.
pub fn percentiles(mut l: Vec<u64>) -> (usize, f64, f64, f64) {
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    (l.len(), pct(0.5), pct(0.99), pct(1.0))
}
