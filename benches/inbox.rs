//! Consuming with the inbox against a real nats-server (started through
//! scripts/nats.sh), side by side with a raw consumer that only
//! acknowledges, and with the store's single-writer Sync commit rate.
//!
//! Run: `cargo bench --all-features --bench inbox` (add `-- --quick` for a
//! short run). Prints markdown tables.
//!
//! - Throughput: N messages (300 bytes) already in a stream; a durable pull
//!   consumer reads them all. The raw consumer acknowledges each message
//!   (flushing once per batch of what has arrived); the inbox rows use
//!   `NatsReader`, whose handler writes one row per message, batched (up to
//!   256 per commit) and one message per commit, Sync.
//! - The single-writer row: one thread committing the same one-row write,
//!   Sync, in a loop (what one message per commit is compared with).
//! - Latency: messages published at a steady 5,000/s; the time from a
//!   message reaching the consumer to its durable commit (p50, p99, max),
//!   through `Inbox::apply` fed by the same pull loop as `NatsReader`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use common::NatsServer;
use futures_util::{FutureExt, StreamExt};
use outboxkv::broker::nats::NatsConnection;
use outboxkv::inbox::nats::{NatsReader, NatsReaderOptions};
use outboxkv::inbox::{Inbox, InboxTx, Message};
use outboxkv::{Store, Table};

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const STREAM: &str = "IN";
const PAYLOAD: usize = 300;
const ROWS: Table<u64, u64> = Table::new("rows");

async fn fill(js: &jetstream::Context, n: usize) -> BenchResult {
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["in.>".into()],
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let mut acks = std::collections::VecDeque::new();
    for _ in 0..n {
        acks.push_back(js.publish("in.msg", payload.clone()).await?);
        if acks.len() >= 1000
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

fn consumer_config(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        max_ack_pending: 1000,
        ..Default::default()
    }
}

/// The raw consumer: read and acknowledge `n` messages.
async fn raw(
    client: &async_nats::Client,
    js: &jetstream::Context,
    n: usize,
) -> BenchResult<Duration> {
    let stream = js.get_stream(STREAM).await?;
    let c: consumer::PullConsumer = stream.create_consumer(consumer_config("raw")).await?;
    let mut messages = c.stream().max_messages_per_batch(256).messages().await?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let first = messages.next().await.ok_or("stream ended")??;
        let mut batch = vec![first];
        while batch.len() < 256 {
            match messages.next().now_or_never() {
                Some(Some(m)) => batch.push(m?),
                _ => break,
            }
        }
        for m in &batch {
            m.ack().await?;
        }
        client.flush().await?;
        got += batch.len();
    }
    Ok(start.elapsed())
}

fn put_row(tx: &mut InboxTx<'_, '_>) -> outboxkv::Result<()> {
    let p = tx.message().position;
    tx.put(&ROWS, &p, &p)
}

/// `NatsReader` over `n` messages with batches of `batch`, `in_flight`
/// commits not yet durable at most.
async fn with_reader(
    url: &str,
    n: usize,
    batch: usize,
    in_flight: usize,
    name: &str,
) -> BenchResult<Duration> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let inbox = Inbox::new(&store, name)?;
    let opts = NatsReaderOptions::new(NatsConnection::new(url), STREAM, name)
        .batch(batch)
        .commits_in_flight(in_flight);
    let mut reader = NatsReader::connect(inbox.clone(), opts).await?;
    let i = inbox.clone();
    let start = Instant::now();
    let done = async move {
        while (i.metrics().applied() as usize) < n {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    };
    reader.run(put_row, done).await?;
    Ok(start.elapsed())
}

/// One thread committing the one-row write, Sync, `n` times.
fn single_writer(n: usize) -> BenchResult<Duration> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let start = Instant::now();
    for i in 0..n as u64 {
        store.write(|tx| tx.put(&ROWS, &i, &i))?;
    }
    Ok(start.elapsed())
}

/// Delivery-to-commit latency at `rate` messages/s for `secs` seconds.
async fn latency(
    js: &jetstream::Context,
    client: &async_nats::Client,
    rate: u64,
    secs: u64,
) -> BenchResult<Vec<Duration>> {
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["in.>".into()],
        ..Default::default()
    })
    .await?;
    let stream = js.get_stream(STREAM).await?;
    let c: consumer::PullConsumer = stream.create_consumer(consumer_config("lat")).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let inbox = Inbox::new(&store, "lat")?;
    let total = rate * secs;
    let js2 = js.clone();
    let publisher = tokio::spawn(async move {
        let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
        let start = Instant::now();
        let mut acks = std::collections::VecDeque::new();
        for i in 0..total {
            let due = start + Duration::from_micros(i * 1_000_000 / rate);
            tokio::time::sleep_until(due.into()).await;
            acks.push_back(js2.publish("in.msg", payload.clone()).await?);
            while acks.len() > 500 {
                if let Some(a) = acks.pop_front() {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        Ok::<_, async_nats::Error>(())
    });
    let mut messages = c.stream().max_messages_per_batch(256).messages().await?;
    let mut latencies = Vec::with_capacity(total as usize);
    while (latencies.len() as u64) < total {
        let first = messages.next().await.ok_or("stream ended")??;
        let mut batch = vec![(first, Instant::now())];
        while batch.len() < 256 {
            match messages.next().now_or_never() {
                Some(Some(m)) => batch.push((m?, Instant::now())),
                _ => break,
            }
        }
        let msgs: Vec<Message> = batch
            .iter()
            .map(|(m, _)| {
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                Message::new(STREAM, 0, seq, m.message.payload.to_vec())
            })
            .collect();
        inbox.apply(&msgs, put_row).await?;
        let committed = Instant::now();
        for (m, at) in &batch {
            latencies.push(committed - *at);
            m.ack().await?;
        }
        client.flush().await?;
    }
    publisher.await??;
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> BenchResult {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let n = if quick { 5_000 } else { 300_000 };
    let n_one = if quick { 500 } else { 10_000 };
    let server = NatsServer::start(&[]).map_err(|e| e.to_string())?;
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client.clone());

    println!("| run | messages | seconds | messages/s | ratio |");
    println!("|---|---:|---:|---:|---:|");
    fill(&js, n).await?;
    let t = raw(&client, &js, n).await?;
    let raw_rate = n as f64 / t.as_secs_f64();
    println!(
        "| raw consumer, ack only | {n} | {:.3} | {raw_rate:.0} | 1.00 |",
        t.as_secs_f64()
    );
    for (in_flight, label) in [
        (4, "`default`: 4 commits in flight"),
        (1, "1 commit in flight"),
    ] {
        let t = with_reader(
            &server.url,
            n,
            256,
            in_flight,
            &format!("batched{in_flight}"),
        )
        .await?;
        let rate = n as f64 / t.as_secs_f64();
        println!(
            "| inbox, up to 256 per commit, Sync, {label} | {n} | {:.3} | {rate:.0} | {:.2} vs raw (target >= 0.80) |",
            t.as_secs_f64(),
            rate / raw_rate
        );
    }
    let t = single_writer(n_one)?;
    let single = n_one as f64 / t.as_secs_f64();
    println!(
        "| single-writer Sync commits (no broker) | {n_one} | {:.3} | {single:.0} | 1.00 |",
        t.as_secs_f64()
    );
    for (in_flight, label) in [
        (4, "4 commits in flight (default)"),
        (2, "2 commits in flight"),
        (1, "1 commit in flight"),
    ] {
        let t = with_reader(&server.url, n_one, 1, in_flight, &format!("one{in_flight}")).await?;
        let rate = n_one as f64 / t.as_secs_f64();
        println!(
            "| inbox, one message per commit, Sync, {label} | {n_one} | {:.3} | {rate:.0} | {:.2} vs single writer (target >= 0.90) |",
            t.as_secs_f64(),
            rate / single
        );
    }

    let secs = if quick { 2 } else { 10 };
    let mut l = latency(&js, &client, 5_000, secs).await?;
    l.sort();
    println!();
    println!(
        "| delivery to durable commit, 5,000 messages/s, {secs} s | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| inbox, Sync, batches of what has arrived | {:.2} | {:.2} (target <= 5) | {:.2} |",
        percentile(&l, 0.5),
        percentile(&l, 0.99),
        percentile(&l, 1.0)
    );
    Ok(())
}
