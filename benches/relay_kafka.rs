//! Relay throughput and latency against a real Apache Kafka broker (started
//! through scripts/kafka.sh), side by side with a raw rdkafka producer.
//!
//! Run: `cargo bench --all-features --bench relay_kafka` (add `-- --quick`
//! for a short run). Prints a markdown table.
//!
//! - Throughput: N events already committed, then shipped by the relay with
//!   batches of 100, 500 (the default settings: four batches in flight),
//!   1000 and 5000, and with one batch in flight (as before the relay
//!   pipelined batches), to a 4-partition topic; the raw producer
//!   sends the same records (300-byte payload, key, `ce_id` header) with the
//!   same producer settings (idempotent, acks=all, murmur2_random,
//!   linger.ms=1), 10,000
//!   deliveries in flight, every delivery awaited, after a warm-up run of
//!   the same size.
//! - Latency: after one warm-up event, commits at a steady 5,000 events/s
//!   (Sync durability) for a few seconds; commit-to-ack time of every event
//!   (p50, p99, max), with the sink's default linger.ms=1 and librdkafka's 5.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/kafka.rs"]
mod kafka;
#[path = "../tests/common/sinks.rs"]
mod sinks;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::KafkaBroker;
use kafka::create_topic;
use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const PAYLOAD: usize = 300;
const PARTITIONS: i32 = 4;

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

async fn raw(bootstrap: &str, topic: &str, n: usize) -> BenchResult<Duration> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "20000")
        .create()?;
    let payload = vec![7u8; PAYLOAD];
    let start = Instant::now();
    let mut inflight = VecDeque::new();
    for i in 0..n {
        if inflight.len() >= 10_000
            && let Some(d) = inflight.pop_front()
        {
            wait(d).await?;
        }
        let key = format!("k{}", i % 50);
        let id = format!("raw-{i}");
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_slice())
            .headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            }));
        inflight.push_back(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    while let Some(d) = inflight.pop_front() {
        wait(d).await?;
    }
    Ok(start.elapsed())
}

async fn wait(d: rdkafka::producer::DeliveryFuture) -> BenchResult {
    d.await?.map_err(|(e, _)| e)?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> BenchResult {
    // `cargo test --benches` runs bench binaries without `--bench`: keep that quick.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let n = if quick { 2_000 } else { 50_000 };
    let broker = KafkaBroker::start(&[])?;
    let bootstrap = broker.bootstrap.as_str();

    println!("| run | events | seconds | events/s | vs raw |");
    println!("|---|---:|---:|---:|---:|");
    // Warm the broker up (JIT, log segments) before anything is measured.
    create_topic(bootstrap, "bench.warmup", PARTITIONS, &[]).await?;
    raw(bootstrap, "bench.warmup", n).await?;
    create_topic(bootstrap, "bench.raw", PARTITIONS, &[]).await?;
    let raw_time = raw(bootstrap, "bench.raw", n).await?;
    let raw_rate = n as f64 / raw_time.as_secs_f64();
    println!(
        "| raw rdkafka, idempotent, 10000 in flight | {n} | {:.3} | {raw_rate:.0} | 1.00 |",
        raw_time.as_secs_f64()
    );
    // (label, batch size, in-flight entries; `None`: the defaults)
    type Run = (&'static str, Option<usize>, Option<usize>);
    let runs: [Run; 6] = [
        ("batch 100", Some(100), None),
        ("default", None, None),
        (
            "default settings, one batch in flight (as before pipelining)",
            None,
            Some(1),
        ),
        ("batch 1000", Some(1000), None),
        ("batch 1000, one batch in flight", Some(1000), Some(1)),
        ("batch 5000", Some(5000), None),
    ];
    for (i, (label, batch, in_flight)) in runs.into_iter().enumerate() {
        let topic = format!("bench.relay{i}");
        create_topic(bootstrap, &topic, PARTITIONS, &[]).await?;
        let (_dir, store) = sinks::filled_store(&topic, n, PAYLOAD)?;
        let sink = KafkaSink::connect(KafkaOptions::new(bootstrap)).await?;
        let t = sinks::drain_time_of(&store, sink, batch, in_flight).await?;
        let rate = n as f64 / t.as_secs_f64();
        println!(
            "| outboxkv relay, {label} | {n} | {:.3} | {rate:.0} | {:.2} |",
            t.as_secs_f64(),
            rate / raw_rate
        );
    }
    let secs = if quick { 1 } else { 5 };
    println!();
    for linger in ["1", "5"] {
        let topic = format!("bench.latency{linger}");
        create_topic(bootstrap, &topic, PARTITIONS, &[]).await?;
        let sink =
            KafkaSink::connect(KafkaOptions::new(bootstrap).set("linger.ms", linger)).await?;
        let (count, p50, p99, max) = sinks::latency_run(sink, &topic, PAYLOAD, 5_000, secs).await?;
        println!(
            "commit-to-ack at 5,000 events/s for {secs} s (Sync commits, linger.ms={linger}): {count} events, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        );
    }
    Ok(())
}
