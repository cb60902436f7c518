//! Small-commit latency beside very large commits.
//!
//! Four threads commit small transactions (one ~200-byte put, one ~300-byte
//! event) for a few seconds. In the second row a fifth thread commits 10 MiB
//! transactions beside them, in a loop: ten 1 MiB events each (events are
//! what the pipeline used to encode under its lock). The table gives the
//! small commits' throughput and latency percentiles with and without the
//! large ones, in one run, alternating rows, so both see the same machine.
//!
//! Run: `cargo bench --bench large_commit` (about 40 s), or
//! `cargo bench --bench large_commit -- --secs 2 --rounds 1` for a quick
//! look; `--durability buffered` for Buffered commits (default: sync).

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use outboxkv::{Durability, Event, Store, Table};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const STATE: Table<u64, Vec<u8>> = Table::new("state");
const SMALL_THREADS: u64 = 4;
const LARGE_EVENTS: usize = 10;
const LARGE_EVENT_BYTES: usize = 1 << 20;

struct Args {
    secs: f64,
    rounds: usize,
    durability: Durability,
}

fn args() -> AnyResult<Args> {
    let mut a = Args {
        secs: 4.0,
        rounds: 3,
        durability: Durability::Sync,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--secs" => a.secs = it.next().ok_or("--secs N")?.parse()?,
            "--rounds" => a.rounds = it.next().ok_or("--rounds N")?.parse()?,
            "--durability" => {
                a.durability = match it.next().as_deref() {
                    Some("sync") => Durability::Sync,
                    Some("buffered") => Durability::Buffered,
                    _ => return Err("--durability sync|buffered".into()),
                }
            }
            // cargo bench passes --bench.
            _ => {}
        }
    }
    Ok(a)
}

struct Row {
    small_per_sec: f64,
    latencies: Vec<Duration>,
    large: u64,
}

fn run(store: &Store, secs: f64, with_large: bool, durability: Durability) -> AnyResult<Row> {
    let stop = AtomicBool::new(false);
    let large_done = AtomicU64::new(0);
    let start = Barrier::new(SMALL_THREADS as usize + 1 + usize::from(with_large));
    let payload = vec![9u8; 300];
    let state = vec![7u8; 200];
    let big = vec![5u8; LARGE_EVENT_BYTES - 1024];
    let (lat, elapsed) = thread::scope(|s| -> AnyResult<(Vec<Duration>, Duration)> {
        let smalls: Vec<_> = (0..SMALL_THREADS)
            .map(|t| {
                let (stop, start, payload, state) = (&stop, &start, &payload, &state);
                s.spawn(move || -> AnyResult<Vec<Duration>> {
                    let mut lat = Vec::with_capacity(100_000);
                    start.wait();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = t * 1_000_000_000 + i;
                        let t0 = Instant::now();
                        store.write(|tx| {
                            tx.set_durability(durability);
                            tx.put(&STATE, &(key % 10_000), state)?;
                            tx.emit(Event::bytes("small", "k", payload.clone()))
                        })?;
                        lat.push(t0.elapsed());
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        let large = with_large.then(|| {
            let (stop, start, big, large_done) = (&stop, &start, &big, &large_done);
            s.spawn(move || -> AnyResult {
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    store.write(|tx| {
                        tx.set_durability(durability);
                        for i in 0..LARGE_EVENTS {
                            tx.emit(Event::bytes("large", format!("big-{i}"), big.clone()))?;
                        }
                        Ok(())
                    })?;
                    large_done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        });
        start.wait();
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for h in smalls {
            all.extend(h.join().map_err(|_| "small committer panicked")??);
        }
        let elapsed = t0.elapsed();
        if let Some(h) = large {
            h.join().map_err(|_| "large committer panicked")??;
        }
        Ok((all, elapsed))
    })?;
    // Keep the outbox from growing without bound between rows.
    let outbox = store.outbox();
    outbox.prune_through(outbox.head())?;
    Ok(Row {
        small_per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        latencies: lat,
        large: large_done.load(Ordering::Relaxed),
    })
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn main() -> AnyResult {
    let a = args()?;
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_event_size(2 << 20)
        .relay_cursor_poll(None)
        .open(dir.path())?;
    let mut rows: [Vec<Row>; 2] = [Vec::new(), Vec::new()];
    for round in 0..a.rounds {
        // Alternate which row goes first.
        for k in 0..2 {
            let with_large = (k + round) % 2 == 1;
            rows[usize::from(with_large)].push(run(&store, a.secs, with_large, a.durability)?);
        }
    }
    println!(
        "small commits ({SMALL_THREADS} threads, 200 B put + 300 B event, {:?}), {} s x {} rounds per row",
        a.durability, a.secs, a.rounds
    );
    println!("| row | small commits/s | p50 ms | p99 ms | p99.9 ms | max ms | 10 MiB commits/s |");
    println!("|---|---|---|---|---|---|---|");
    for (i, name) in ["small only", "beside 10 MiB commits"].iter().enumerate() {
        let mut lat: Vec<Duration> = rows[i]
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        lat.sort_unstable();
        let per_sec: f64 = rows[i].iter().map(|r| r.small_per_sec).sum::<f64>() / a.rounds as f64;
        let large: u64 = rows[i].iter().map(|r| r.large).sum();
        println!(
            "| {name} | {per_sec:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} |",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 0.999),
            pct(&lat, 1.0),
            large as f64 / (a.secs * a.rounds as f64)
        );
    }
    Ok(())
}
