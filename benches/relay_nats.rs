//! Relay throughput and latency against a real nats-server (started through
//! scripts/nats.sh), side by side with a raw async-nats publisher.
//!
//! Run: `cargo bench --all-features --bench relay_nats` (add `-- --quick` for a
//! short run). Prints a markdown table.
//!
//! - Throughput: N events already committed, then shipped by the relay with
//!   batches of 1, 100 and 1000; the raw publisher sends the same 300-byte
//!   payloads with a Nats-Msg-Id, 1000 acks in flight, every ack awaited.
//! - Latency: commits at a steady 5,000 events/s (Sync durability) for a few
//!   seconds; commit-to-ack time of every event (p50, p99, max).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::NatsServer;
use outboxkv::relay::{BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
use outboxkv::{Durability, Event, OutboxEntry, Store};
use parking_lot::Mutex;

const STREAM: &str = "BENCH";
const PAYLOAD: usize = 300;

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn options(url: &str) -> NatsOptions {
    NatsOptions::new(url)
        .prefix("bench")
        .create_stream(StreamSetup {
            name: STREAM.into(),
            subjects: vec!["bench.>".into()],
            duplicate_window: Duration::from_secs(120),
        })
}

async fn reset_stream(js: &jetstream::Context) -> BenchResult {
    let _ = js.delete_stream(STREAM).await;
    js.get_or_create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["bench.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    Ok(())
}

async fn raw(js: &jetstream::Context, n: usize) -> BenchResult<Duration> {
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD]);
    let start = Instant::now();
    let mut inflight = VecDeque::new();
    for i in 0..n {
        if inflight.len() >= 1000
            && let Some(ack) = inflight.pop_front()
        {
            ack_await(ack).await?;
        }
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("raw-{i}").as_str());
        inflight.push_back(
            js.publish_with_headers("bench.raw", h, payload.clone())
                .await?,
        );
    }
    while let Some(ack) = inflight.pop_front() {
        ack_await(ack).await?;
    }
    Ok(start.elapsed())
}

async fn ack_await(
    ack: jetstream::context::PublishAckFuture,
) -> BenchResult<jetstream::publish::PublishAck> {
    Ok(ack.await?)
}

async fn relay_run(url: &str, n: usize, batch: usize) -> BenchResult<Duration> {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let payload = vec![7u8; PAYLOAD];
    for chunk in 0..n.div_ceil(1000) {
        store.write(|tx| {
            (0..1000.min(n - chunk * 1000)).try_for_each(|i| {
                tx.emit(Event::bytes(
                    "orders.changed",
                    format!("k{}", i % 50),
                    payload.clone(),
                ))
            })
        })?;
    }
    let sink = NatsSink::connect(options(url)).await?;
    let start = Instant::now();
    let relay = Relay::builder(&store)
        .batch_size(batch)
        .sink(sink)
        .start()?;
    relay
        .wait_delivered(n as u64, Duration::from_secs(300))
        .await?;
    let took = start.elapsed();
    relay.shutdown(Shutdown::Now).await?;
    Ok(took)
}

/// Records commit-to-ack latency of every acknowledged entry.
struct Timed {
    inner: NatsSink,
    latencies: Arc<Mutex<Vec<u64>>>,
}

impl Sink for Timed {
    fn name(&self) -> &str {
        "nats-timed"
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

async fn latency_run(url: &str, rate: u64, secs: u64) -> BenchResult<(usize, f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Sync)
        .open(dir.path())?;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let sink = Timed {
        inner: NatsSink::connect(options(url)).await?,
        latencies: latencies.clone(),
    };
    let relay = Relay::builder(&store).sink(sink).start()?;
    let s = store.clone();
    let total = rate * secs;
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let start = Instant::now();
        let payload = vec![7u8; PAYLOAD];
        for i in 0..total {
            let due = start + Duration::from_micros(i * 1_000_000 / rate);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            s.write(|tx| {
                tx.emit(Event::bytes(
                    "orders.changed",
                    format!("k{}", i % 50),
                    payload.clone(),
                ))
            })
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await??;
    relay.wait_delivered(total, Duration::from_secs(60)).await?;
    relay.shutdown(Shutdown::Now).await?;
    let mut l = std::mem::take(&mut *latencies.lock());
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Ok((l.len(), pct(0.5), pct(0.99), pct(1.0)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> BenchResult {
    // `cargo test --benches` runs bench binaries without `--bench`: keep that quick.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let n = if quick { 2_000 } else { 50_000 };
    let server = NatsServer::start(&[])?;
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client);

    println!("| run | events | seconds | events/s | vs raw |");
    println!("|---|---:|---:|---:|---:|");
    reset_stream(&js).await?;
    let raw_time = raw(&js, n).await?;
    let raw_rate = n as f64 / raw_time.as_secs_f64();
    println!(
        "| raw async-nats, 1000 acks in flight | {n} | {:.3} | {raw_rate:.0} | 1.00 |",
        raw_time.as_secs_f64()
    );
    for batch in [1usize, 100, 1000] {
        reset_stream(&js).await?;
        let t = relay_run(&server.url, n, batch).await?;
        let rate = n as f64 / t.as_secs_f64();
        println!(
            "| outboxkv relay, batch {batch} | {n} | {:.3} | {rate:.0} | {:.2} |",
            t.as_secs_f64(),
            rate / raw_rate
        );
    }
    reset_stream(&js).await?;
    let secs = if quick { 1 } else { 5 };
    let (count, p50, p99, max) = latency_run(&server.url, 5_000, secs).await?;
    println!();
    println!(
        "commit-to-ack at 5,000 events/s for {secs} s (Sync commits): {count} events, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    Ok(())
}
