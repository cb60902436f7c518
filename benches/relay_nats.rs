//! Relay throughput and latency against a real nats-server (started through
//! scripts/nats.sh), side by side with a raw async-nats publisher.
//!
//! Run: `cargo bench --all-features --bench relay_nats` (add `-- --quick` for a
//! short run). Prints a markdown table.
//!
//! - Throughput: N events already committed, then shipped by the relay with
//!   batches of 1, 100 and 1000; the raw publisher sends the same 300-byte
//!   payloads with a Nats-Msg-Id, 1000 acks in flight, every ack awaited.
//! - Latency: after one warm-up event, commits at a steady 5,000 events/s
//!   (Sync durability) for a few seconds; commit-to-ack time of every event
//!   (p50, p99, max).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/sinks.rs"]
mod sinks;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::NatsServer;
use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};

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
        let (_dir, store) = sinks::filled_store("orders.changed", n, PAYLOAD)?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let t = sinks::drain_time(&store, sink, batch).await?;
        let rate = n as f64 / t.as_secs_f64();
        println!(
            "| outboxkv relay, batch {batch} | {n} | {:.3} | {rate:.0} | {:.2} |",
            t.as_secs_f64(),
            rate / raw_rate
        );
    }
    {
        // The same backlog, recovered by a reopen (what a relay drains after
        // a restart): before the fix of issue 15, every batch of recovered
        // entries paid its own fsync.
        reset_stream(&js).await?;
        let (dir, store) = sinks::filled_store("orders.changed", n, PAYLOAD)?;
        drop(store);
        let store = outboxkv::Store::open(dir.path())?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let t = sinks::drain_time(&store, sink, 100).await?;
        let rate = n as f64 / t.as_secs_f64();
        println!(
            "| outboxkv relay, batch 100, backlog recovered by a reopen | {n} | {:.3} | {rate:.0} | {:.2} |",
            t.as_secs_f64(),
            rate / raw_rate
        );
    }
    {
        // Memory while draining a backlog of 1 KiB events with the default
        // settings: the process's peak RSS is reset (Linux clear_refs) once
        // the store is filled, so the peak printed is the drain's own.
        reset_stream(&js).await?;
        let big = if quick { 2_000 } else { 200_000 };
        let (_dir, store) = sinks::filled_store("orders.changed", big, 1024)?;
        let before = common::proc_status_kib("VmRSS:");
        common::reset_peak_rss()?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let start = Instant::now();
        let relay = outboxkv::relay::Relay::builder(&store).sink(sink).start()?;
        relay
            .wait_delivered(big as u64, Duration::from_secs(600))
            .await?;
        let t = start.elapsed();
        relay.shutdown(outboxkv::relay::Shutdown::Now).await?;
        let peak = common::proc_status_kib("VmHWM:");
        println!(
            "| outboxkv relay, default settings, {big} x 1 KiB backlog: RSS {} MiB before the drain, peak {} MiB during it | {big} | {:.3} | {:.0} | |",
            before / 1024,
            peak / 1024,
            t.as_secs_f64(),
            big as f64 / t.as_secs_f64()
        );
    }
    reset_stream(&js).await?;
    let secs = if quick { 1 } else { 5 };
    let sink = NatsSink::connect(options(&server.url)).await?;
    let (count, p50, p99, max) =
        sinks::latency_run(sink, "orders.changed", PAYLOAD, 5_000, secs).await?;
    println!();
    println!(
        "commit-to-ack at 5,000 events/s for {secs} s (Sync commits): {count} events, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    for catch_up_ms in [20u64, 5] {
        reset_stream(&js).await?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let (count, p50, p99, max) = sinks::latency_run_with(
            sink,
            "orders.changed",
            PAYLOAD,
            5_000,
            secs,
            Some(Duration::from_millis(catch_up_ms)),
        )
        .await?;
        println!(
            "the same through a sidecar source catching up every {catch_up_ms} ms: {count} events, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        );
    }
    Ok(())
}
