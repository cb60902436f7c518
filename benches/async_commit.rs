//! Async commits against blocking ones, in one run (issue 17).
//!
//! Every commit is one `store.write`-style transaction with a ~200-byte
//! state put and a ~300-byte event, `Durability::Sync`, on one store.
//! Rows, run in alternating rounds (A B C D, A B C D, ...) so that all see
//! the same machine, and reported as the median round:
//!
//! - `16 threads`: 16 OS threads calling `store.write`;
//! - `256 threads`: 256 OS threads calling `store.write` (the same number
//!   of commits in flight as the task rows);
//! - `256 tasks, write`: 256 tokio tasks on a 2-worker runtime calling the
//!   blocking `store.write` directly, as a naive async handler would;
//! - `spawn_blocking`: the same 256 tasks, each commit through
//!   `tokio::task::spawn_blocking` (tokio's default pool, at most 512
//!   threads);
//! - `async`: the same 256 tasks calling `store.write_async(..).await`.
//!
//! Columns: commits/s, the ratio against the `spawn_blocking` row, the
//! process's peak OS thread count during the row (from
//! `/proc/self/status`; each task row has a runtime of its own, shut down
//! after it, and the count includes RocksDB's background threads, the
//! runtime's two workers and, once started, the store's two commit
//! threads), and the p50/p99 latency of one commit from the moment its
//! task or thread started it (for `256 tasks, write` that leaves out the
//! time a task waited for a worker, so its latencies are not shown).
//! Targets: `async` >= 1.0x `spawn_blocking` and >= 1.5x `16 threads`,
//! with a handful of threads.
//!
//! Run: `cargo bench --bench async_commit` (about a minute), or
//! `cargo bench --bench async_commit -- --rounds 1 --commits 5000`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use outboxkv::{Durability, Event, Store, StoreOptions, Table};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const STATE: Table<u64, Vec<u8>> = Table::new("state");
const STATE_BYTES: usize = 200;
const EVENT_BYTES: usize = 300;
const KEYS: u64 = 10_000;
const TASKS: usize = 256;
const THREADS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Threads,
    Threads256,
    TasksBlocking,
    SpawnBlocking,
    Async,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Threads => "16 threads",
            Mode::Threads256 => "256 threads",
            Mode::TasksBlocking => "256 tasks, write",
            Mode::SpawnBlocking => "spawn_blocking",
            Mode::Async => "async",
        }
    }
}

struct Round {
    rate: f64,
    peak_threads: usize,
    latencies: Vec<Duration>,
}

/// One commit: a state put and an event, both about their sizes.
fn commit_tx(
    tx: &mut outboxkv::WriteTx<'_>,
    i: u64,
    state: &[u8],
    event: &[u8],
) -> outboxkv::Result<()> {
    let key = i % KEYS;
    tx.put(&STATE, &key, &state.to_vec())?;
    tx.emit(Event::bytes(
        "state.changed",
        key.to_string(),
        event.to_vec(),
    ))
}

fn os_threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Samples the process's thread count every millisecond until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    handle: thread::JoinHandle<()>,
}

impl Sampler {
    fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(os_threads()));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(os_threads(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        });
        Sampler { stop, peak, handle }
    }

    /// The peak, not counting the sampler itself.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        self.peak.load(Ordering::Relaxed).saturating_sub(1)
    }
}

fn run(mode: Mode, store: &Store, commits: u64, next: &Arc<AtomicU64>) -> AnyResult<Round> {
    let sampler = Sampler::start();
    // A runtime per row, shut down after it: the threads a row starts
    // (spawn_blocking's pool) are not counted in the next row.
    let rt = match mode {
        Mode::Threads | Mode::Threads256 => None,
        _ => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
        ),
    };
    let started = Instant::now();
    let latencies = match (mode, &rt) {
        (Mode::Threads | Mode::Threads256, _) | (_, None) => {
            let threads = if mode == Mode::Threads {
                THREADS
            } else {
                TASKS
            };
            let per = commits / threads as u64;
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (store, next) = (store.clone(), next.clone());
                    thread::spawn(move || -> AnyResult<Vec<Duration>> {
                        let (state, event) = (vec![7u8; STATE_BYTES], vec![9u8; EVENT_BYTES]);
                        let mut lat = Vec::with_capacity(per as usize);
                        for _ in 0..per {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let t = Instant::now();
                            store.write(|tx| commit_tx(tx, i, &state, &event))?;
                            lat.push(t.elapsed());
                        }
                        Ok(lat)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in handles {
                all.extend(h.join().map_err(|_| "commit thread panicked")??);
            }
            all
        }
        (_, Some(rt)) => rt.block_on(async {
            let per = commits / TASKS as u64;
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let (store, next) = (store.clone(), next.clone());
                    tokio::spawn(async move {
                        let (state, event) = (
                            Arc::new(vec![7u8; STATE_BYTES]),
                            Arc::new(vec![9u8; EVENT_BYTES]),
                        );
                        let mut lat = Vec::with_capacity(per as usize);
                        for _ in 0..per {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let t = Instant::now();
                            match mode {
                                Mode::TasksBlocking => {
                                    store.write(|tx| commit_tx(tx, i, &state, &event))?;
                                }
                                Mode::SpawnBlocking => {
                                    let (store, state, event) =
                                        (store.clone(), state.clone(), event.clone());
                                    tokio::task::spawn_blocking(move || {
                                        store.write(|tx| commit_tx(tx, i, &state, &event))
                                    })
                                    .await??;
                                }
                                _ => {
                                    store
                                        .write_async(|tx| commit_tx(tx, i, &state, &event))
                                        .await?;
                                }
                            }
                            lat.push(t.elapsed());
                        }
                        AnyResult::Ok(lat)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            AnyResult::Ok(all)
        })?,
    };
    let elapsed = started.elapsed();
    if let Some(rt) = rt {
        rt.shutdown_timeout(Duration::from_secs(10));
    }
    Ok(Round {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        peak_threads: sampler.finish(),
        latencies,
    })
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> AnyResult {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = arg("--rounds", 3) as usize;
    let commits = arg("--commits", 40_960);
    let dir = tempfile::tempdir()?;
    let store = StoreOptions::default()
        .durability(Durability::Sync)
        .open(dir.path())?;
    let next = Arc::new(AtomicU64::new(0));
    let modes = [
        Mode::Threads,
        Mode::Threads256,
        Mode::TasksBlocking,
        Mode::SpawnBlocking,
        Mode::Async,
    ];
    // Warm up (the async row starts the store's commit threads).
    for mode in modes {
        run(mode, &store, 2_048, &next)?;
    }
    let at_rest = os_threads();
    let mut results: Vec<Vec<Round>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            // The blocking-in-tasks row collapses; give it fewer commits.
            let n = if *mode == Mode::TasksBlocking {
                commits / 4
            } else {
                commits
            };
            results[i].push(run(*mode, &store, n, &next)?);
        }
    }
    let median_round = |rounds: &mut Vec<Round>| -> Round {
        rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        rounds.swap_remove(rounds.len() / 2)
    };
    let mut rows: Vec<(Mode, Round)> = modes
        .iter()
        .zip(results.iter_mut())
        .map(|(m, r)| (*m, median_round(r)))
        .collect();
    let base = rows
        .iter()
        .find(|(m, _)| *m == Mode::SpawnBlocking)
        .map(|(_, r)| r.rate)
        .unwrap_or(1.0);
    let threads16 = rows
        .iter()
        .find(|(m, _)| *m == Mode::Threads)
        .map(|(_, r)| r.rate)
        .unwrap_or(1.0);
    println!(
        "\nasync_commit: {commits} Sync commits per round ({STATE_BYTES} B state + {EVENT_BYTES} B event), \
         {rounds} rounds, median round; runtime with 2 workers"
    );
    println!(
        "OS threads between rows: {at_rest} (main, RocksDB's, the store's two commit threads); \
         a row adds its own 2-worker runtime and whatever it starts"
    );
    println!(
        "| run | commits/s | x spawn_blocking | x 16 threads | OS threads (peak) | p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (mode, r) in rows.iter_mut() {
        r.latencies.sort();
        let latency = |q: f64| {
            if *mode == Mode::TasksBlocking {
                "-".to_string()
            } else {
                format!("{:.2} ms", quantile(&r.latencies, q).as_secs_f64() * 1e3)
            }
        };
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            mode.label(),
            r.rate,
            r.rate / base,
            r.rate / threads16,
            r.peak_threads,
            latency(0.5),
            latency(0.99),
        );
    }
    Ok(())
}
