//! Relay throughput and latency against a real nats-server (started through
//! scripts/nats.sh), side by side with a raw async-nats publisher.
//!
//! Run: `cargo bench --all-features --bench relay_nats` (add `-- --quick` for a
//! short run). Prints a markdown table.
//!
//! - Throughput: N events already committed (keys `k0`..`k49` in turn,
//!   unless the row says otherwise), then shipped by the relay with batches
//!   of 1, 100 and 1000, and with the default settings (batch 500, four
//!   batches in flight), also with one batch in flight (what the relay did
//!   before it pipelined batches). The raw publisher sends 1000 acks in
//!   flight, every ack awaited, once freely and once with at most one ack
//!   in flight per key (the guarantee the relay keeps; see the NATS sink's
//!   order section), of two kinds of message: the same 300-byte payloads
//!   with a Nats-Msg-Id, and exactly the messages the relay sent (subject,
//!   headers, CloudEvents body, about 2.5 times the bytes), captured from
//!   the stream after one untimed drain. Each relay row is compared with
//!   both free-running raw rows.
//!
//!   `-- only=TEXT` runs the raw rows and the relay rows whose label
//!   contains TEXT, nothing else (to profile one row); `-- events=N` sets
//!   the events per row (default 50,000).
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

/// A message to publish: subject, headers, body.
type Message = (async_nats::Subject, HeaderMap, bytes::Bytes);

/// The raw publisher's own message `i`: a 300-byte body with a Nats-Msg-Id.
fn raw_message(payload: &bytes::Bytes, i: usize) -> Message {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("raw-{i}").as_str());
    (
        async_nats::Subject::from_static("bench.raw"),
        h,
        payload.clone(),
    )
}

/// Messages captured from the stream, kept in one buffer (two allocations
/// in all, given back when dropped, so that they do not weigh on the
/// memory row).
struct Captured {
    buf: bytes::Bytes,
    /// Per message: where its subject, headers (`name\0value\0` pairs) and
    /// body are in `buf`.
    spans: Vec<[std::ops::Range<usize>; 3]>,
}

impl Captured {
    fn message(&self, i: usize) -> Message {
        let [subject, headers, body] = self.spans[i].clone();
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&self.buf[r]).into_owned();
        let mut h = HeaderMap::new();
        let mut parts = self.buf[headers].split(|b| *b == 0);
        while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
            h.append(
                String::from_utf8_lossy(name).as_ref(),
                String::from_utf8_lossy(value).as_ref(),
            );
        }
        (
            async_nats::Subject::from(text(subject)),
            h,
            self.buf.slice(body),
        )
    }
}

/// Bytes of subject, headers (name, value and two bytes a pair) and body,
/// per message on average over `message(0)` to `message(n - 1)`.
fn mean_size(n: usize, message: &dyn Fn(usize) -> Message) -> usize {
    let total: usize = (0..n)
        .map(|i| {
            let (subject, headers, body) = message(i);
            let headers: usize = headers
                .iter()
                .map(|(name, values)| {
                    let name: &str = name.as_ref();
                    values
                        .iter()
                        .map(|v| name.len() + v.as_str().len() + 2)
                        .sum::<usize>()
                })
                .sum();
            subject.len() + headers + body.len()
        })
        .sum();
    total / n.max(1)
}

/// Every message of the stream, as stored (what the relay sent: subject,
/// headers and CloudEvents body), in stream order.
async fn stored_messages(js: &jetstream::Context, n: usize) -> BenchResult<Captured> {
    use futures_util::StreamExt;
    let stream = js.get_stream(STREAM).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let (mut buf, mut spans) = (Vec::with_capacity(n * 1024), Vec::with_capacity(n));
    let put = |buf: &mut Vec<u8>, bytes: &[u8]| {
        let start = buf.len();
        buf.extend_from_slice(bytes);
        start..buf.len()
    };
    while spans.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| {
                format!(
                    "captured {} of {n} messages, then none for 30 s",
                    spans.len()
                )
            })?
            .ok_or("the stream ended early")??;
        let m = m.split().0;
        let subject = put(&mut buf, m.subject.as_bytes());
        let start = buf.len();
        for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
            for value in values {
                let name: &str = name.as_ref();
                buf.extend_from_slice(name.as_bytes());
                buf.push(0);
                buf.extend_from_slice(value.as_str().as_bytes());
                buf.push(0);
            }
        }
        let headers = start..buf.len();
        let body = put(&mut buf, &m.payload);
        spans.push([subject, headers, body]);
    }
    Ok(Captured {
        buf: bytes::Bytes::from(buf),
        spans,
    })
}

/// Publishes `message(0)` to `message(n - 1)`, 1000 acks in flight; with
/// `keys: Some(k)`, message `i` is of key `i % k` and waits until the
/// previous one of its key is acknowledged (the order guarantee the relay
/// keeps through reconnects).
async fn raw(
    js: &jetstream::Context,
    n: usize,
    message: &dyn Fn(usize) -> Message,
    keys: Option<usize>,
) -> BenchResult<Duration> {
    let start = Instant::now();
    let mut inflight = VecDeque::new();
    let mut busy = vec![false; keys.unwrap_or(0)];
    for i in 0..n {
        let (subject, headers, body) = message(i);
        let key = keys.map(|k| i % k);
        while inflight.len() >= 1000 || key.is_some_and(|k| busy[k]) {
            let Some((k, ack)) = inflight.pop_front() else {
                break;
            };
            ack_await(ack).await?;
            if let Some(k) = k {
                busy[k] = false;
            }
        }
        let ack = js.publish_with_headers(subject, headers, body).await?;
        if let Some(k) = key {
            busy[k] = true;
        }
        inflight.push_back((key, ack));
    }
    while let Some((_, ack)) = inflight.pop_front() {
        ack_await(ack).await?;
    }
    Ok(start.elapsed())
}

/// `threads` writers committing one event each with `Durability::Sync`
/// (keys of their own) for `time` or until `done`: every commit's latency
/// in microseconds.
fn sync_writers(
    store: &outboxkv::Store,
    threads: usize,
    time: Duration,
    done: Option<&std::sync::atomic::AtomicBool>,
) -> BenchResult<Vec<u64>> {
    let end = Instant::now() + time;
    let stop = || {
        Instant::now() >= end || done.is_some_and(|d| d.load(std::sync::atomic::Ordering::Acquire))
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|w| {
                let store = store.clone();
                let stop = &stop;
                scope.spawn(move || -> Result<Vec<u64>, String> {
                    let mut latencies = Vec::new();
                    let key = format!("writer-{w}");
                    while !stop() {
                        let t = Instant::now();
                        store
                            .write(|tx| {
                                tx.set_durability(outboxkv::Durability::Sync);
                                tx.emit(outboxkv::Event::bytes(
                                    "orders.changed",
                                    key.as_str(),
                                    vec![1u8; PAYLOAD],
                                ))
                            })
                            .map_err(|e| e.to_string())?;
                        latencies.push(t.elapsed().as_micros() as u64);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| "writer panicked")??);
        }
        Ok(all)
    })
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
    // `-- only=TEXT`: the raw rows and the throughput rows whose label
    // contains TEXT, nothing else (for profiling one row); `-- events=N`:
    // N events per throughput row.
    let only = args.iter().find_map(|a| a.strip_prefix("only="));
    let n = match args.iter().find_map(|a| a.strip_prefix("events=")) {
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("events={v}: give a number of events above 0").into()),
        },
        None => {
            if quick {
                2_000
            } else {
                50_000
            }
        }
    };
    let server = NatsServer::start(&[])?;
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = jetstream::new(client);

    // `cargo bench --bench relay_nats -- latency`: the latency rows only.
    if args.iter().any(|a| a == "latency") {
        return latency_rows(&js, &server.url, quick).await;
    }
    // The relay's own messages (CloudEvents envelopes, about 2.5 times the
    // raw body's bytes), captured from one untimed drain, for a second raw
    // baseline that sends exactly what the relay sends.
    reset_stream(&js).await?;
    let relay_messages = {
        let (_dir, store) = sinks::filled_store_keys("orders.changed", n, PAYLOAD, 50)?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        sinks::drain_time_of(&store, sink, None, None).await?;
        stored_messages(&js, n).await?
    };
    println!("| run | events | seconds | events/s | vs raw | vs raw, the relay's messages |");
    println!("|---|---:|---:|---:|---:|---:|");
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD]);
    let raw_own = |i| raw_message(&payload, i);
    let relay_own = |i| relay_messages.message(i);
    let own_size = mean_size(n, &raw_own);
    let relay_size = mean_size(n, &relay_own);
    type RawRow<'a> = (&'a str, &'a dyn Fn(usize) -> Message, usize, Option<usize>);
    let raw_rows: [RawRow; 4] = [
        ("1000 acks in flight", &raw_own, own_size, None),
        (
            "1000 acks in flight, at most one per key (50 keys)",
            &raw_own,
            own_size,
            Some(50),
        ),
        (
            "the relay's messages, 1000 acks in flight",
            &relay_own,
            relay_size,
            None,
        ),
        (
            "the relay's messages, 1000 acks in flight, at most one per key (50 keys)",
            &relay_own,
            relay_size,
            Some(50),
        ),
    ];
    let (mut raw_rate, mut same_rate) = (f64::NAN, f64::NAN);
    for (label, message, size, keys) in raw_rows {
        reset_stream(&js).await?;
        let t = raw(&js, n, message, keys).await?;
        let rate = n as f64 / t.as_secs_f64();
        if keys.is_none() {
            if raw_rate.is_nan() {
                raw_rate = rate;
            } else {
                same_rate = rate;
            }
        }
        println!(
            "| raw async-nats, {label} (about {size} B a message) | {n} | {:.3} | {rate:.0} | {:.2} | {} |",
            t.as_secs_f64(),
            rate / raw_rate,
            if same_rate.is_nan() {
                String::new()
            } else {
                format!("{:.2}", rate / same_rate)
            },
        );
    }
    drop(relay_messages);
    // (label, keys, batch size, in-flight entries; `None`: the defaults)
    type Run = (&'static str, usize, Option<usize>, Option<usize>);
    let runs: [Run; 7] = [
        ("batch 1", 50, Some(1), None),
        ("batch 100", 50, Some(100), None),
        ("batch 1000", 50, Some(1000), None),
        ("default", 50, None, None),
        (
            "default settings, one batch in flight (as before pipelining)",
            50,
            None,
            Some(1),
        ),
        ("default settings, 10,000 keys", 10_000, None, None),
        (
            "default settings, 10,000 keys, one batch in flight",
            10_000,
            None,
            Some(1),
        ),
    ];
    let mut matched = 0;
    for (label, keys, batch, in_flight) in runs {
        if only.is_some_and(|only| !label.contains(only)) {
            continue;
        }
        matched += 1;
        reset_stream(&js).await?;
        let (_dir, store) = sinks::filled_store_keys("orders.changed", n, PAYLOAD, keys)?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let t = sinks::drain_time_of(&store, sink, batch, in_flight).await?;
        let rate = n as f64 / t.as_secs_f64();
        let keys = if label.contains("keys") {
            String::new()
        } else {
            format!(", {keys} keys")
        };
        println!(
            "| outboxkv relay, {label}{keys} | {n} | {:.3} | {rate:.0} | {:.2} | {:.2} |",
            t.as_secs_f64(),
            rate / raw_rate,
            rate / same_rate
        );
    }
    if let Some(only) = only {
        if matched == 0 {
            return Err(format!("only={only}: no relay row's label contains it").into());
        }
        return Ok(());
    }
    {
        // The same backlog, recovered by a reopen (what a relay drains after
        // a restart): before the fix of issue 15, every batch of recovered
        // entries paid its own fsync; since issue 16 the drain pays none
        // (the open's recovery flush put them on disk).
        reset_stream(&js).await?;
        let (dir, store) = sinks::filled_store("orders.changed", n, PAYLOAD)?;
        drop(store);
        let store = outboxkv::Store::open(dir.path())?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let t = sinks::drain_time(&store, sink, 100).await?;
        let rate = n as f64 / t.as_secs_f64();
        println!(
            "| outboxkv relay, batch 100, backlog recovered by a reopen | {n} | {:.3} | {rate:.0} | {:.2} | {:.2} |",
            t.as_secs_f64(),
            rate / raw_rate,
            rate / same_rate
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
            "| outboxkv relay, default settings, {big} x 1 KiB backlog: RSS {} MiB before the drain, peak {} MiB during it | {big} | {:.3} | {:.0} | | |",
            before / 1024,
            peak / 1024,
            t.as_secs_f64(),
            big as f64 / t.as_secs_f64()
        );
    }
    {
        // A large backlog drained while 4 writers keep committing (Sync, one
        // event each): the drain's rate against the raw client's, and the
        // writers' commit latency while idle and during the drain.
        reset_stream(&js).await?;
        let big = if quick { 5_000 } else { 1_000_000 };
        let (_dir, store) = sinks::filled_store("orders.changed", big, PAYLOAD)?;
        let idle = sync_writers(
            &store,
            4,
            Duration::from_secs(if quick { 1 } else { 3 }),
            None,
        )?;
        let sink = NatsSink::connect(options(&server.url)).await?;
        let start = Instant::now();
        let relay = outboxkv::relay::Relay::builder(&store).sink(sink).start()?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers = {
            let (store, done) = (store.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                sync_writers(&store, 4, Duration::from_secs(3600), Some(&*done))
                    .map_err(|e| e.to_string())
            })
        };
        relay
            .wait_delivered(big as u64, Duration::from_secs(900))
            .await?;
        let t = start.elapsed();
        done.store(true, std::sync::atomic::Ordering::Release);
        let during = writers.await??;
        relay.shutdown(outboxkv::relay::Shutdown::Now).await?;
        let (_, _, idle_p99, _) = sinks::percentiles(idle);
        let (count, _, during_p99, _) = sinks::percentiles(during);
        let rate = big as f64 / t.as_secs_f64();
        println!(
            "| outboxkv relay, default, {big}-event backlog while 4 Sync writers commit ({count} commits; their p99 {idle_p99:.2} ms idle, {during_p99:.2} ms during the drain, {:.2}x) | {big} | {:.3} | {rate:.0} | {:.2} | {:.2} |",
            during_p99 / idle_p99.max(f64::MIN_POSITIVE),
            t.as_secs_f64(),
            rate / raw_rate,
            rate / same_rate
        );
    }
    latency_rows(&js, &server.url, quick).await
}

/// Commit-to-ack latency at 5,000 events/s: in-process, then through a
/// sidecar source.
async fn latency_rows(js: &jetstream::Context, url: &str, quick: bool) -> BenchResult {
    reset_stream(js).await?;
    let secs = if quick { 1 } else { 5 };
    let sink = NatsSink::connect(options(url)).await?;
    let (count, p50, p99, max) =
        sinks::latency_run(sink, "orders.changed", PAYLOAD, 5_000, secs).await?;
    println!();
    println!(
        "commit-to-ack at 5,000 events/s for {secs} s (Sync commits): {count} events, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    for catch_up_ms in [20u64, 5] {
        reset_stream(js).await?;
        let sink = NatsSink::connect(options(url)).await?;
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
