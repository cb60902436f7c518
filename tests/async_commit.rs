//! The async commit path (`Store::write_async`, `commit_async`): it waits
//! for the disk without blocking the runtime, many tasks share an fsync,
//! a dropped future still commits, a closing store waits for its commit
//! threads, and failures reach the futures instead of hanging them.
//! (The history checker in `tests/serializable.rs` mixes async commits with
//! blocking ones for the isolation guarantees.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outboxkv::{Durability, Error, Event, Failpoint, Fault, Store, Table, WriteOutcome};

use common::TestResult;

const COUNTERS: Table<str, u64> = Table::new("counters");
const CELLS: Table<u32, u32> = Table::new("cells");

fn sync_store(dir: &std::path::Path) -> outboxkv::Result<Store> {
    Store::options()
        .durability(Durability::Sync)
        .relay_cursor_poll(None)
        .open(dir)
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `f` on `rt`, failing (not hanging) after a minute: a lost wake-up
/// shows as an error.
fn run<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    f: F,
) -> Result<F::Output, Box<dyn std::error::Error>> {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), f).await })
        .map_err(|_| "timed out after 60 s: a future was never woken".into())
}

/// Counts 5 ms ticks on the runtime until the returned counter is read.
fn ticker() -> Arc<AtomicU64> {
    let ticks = Arc::new(AtomicU64::new(0));
    let t = ticks.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            t.fetch_add(1, Ordering::Relaxed);
        }
    });
    ticks
}

/// A `Sync` commit whose fsync takes 400 ms: while it waits, the other
/// task on the same (single) runtime thread keeps running. A commit that
/// blocked the thread would leave the ticker at 0 or 1.
#[test]
fn a_waiting_commit_leaves_a_current_thread_runtime_running() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = sync_store(dir.path())?;
    store.delay_fsyncs(Duration::from_millis(400));
    let rt = current_thread()?;
    let (ticks, waited, committed) = run(&rt, async {
        let ticks = ticker();
        // Let the ticker start.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = ticks.load(Ordering::Relaxed);
        let started = Instant::now();
        let committed = store
            .write_async(|tx| {
                tx.put(&COUNTERS, "a", &1)?;
                tx.emit(Event::bytes("t", "a", b"1".to_vec()))
            })
            .await?;
        let during = ticks.load(Ordering::Relaxed) - before;
        Ok::<_, outboxkv::Error>((during, started.elapsed(), committed))
    })??;
    assert_eq!(committed.seqs, 1..2);
    assert!(
        waited >= Duration::from_millis(400),
        "a Sync commit resolves after its fsync: {waited:?}"
    );
    assert!(
        ticks >= 20,
        "the runtime's only thread was blocked: {ticks} ticks in {waited:?}"
    );
    assert_eq!(store.get(&COUNTERS, "a")?, Some(1));
    Ok(())
}

/// 256 tasks on one runtime thread commit `Sync` at once, with a slow
/// fsync (100 ms): they all wait for the same few fsyncs. The store fails
/// every fsync after the fourth (the failpoint), so a pipeline that needed
/// one fsync per commit, or one waiting thread per commit, fails the test.
#[test]
fn many_tasks_share_a_few_fsyncs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = sync_store(dir.path())?;
    store.delay_fsyncs(Duration::from_millis(100));
    store.inject(Failpoint::WalSync, 4, Some(Fault::Fail));
    let rt = current_thread()?;
    let results = run(&rt, async {
        let tasks: Vec<_> = (0..256u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write_async(|tx| {
                            tx.put(&CELLS, &i, &i)?;
                            tx.emit(Event::bytes("cell", i.to_string(), Vec::new()))
                        })
                        .await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(tokio::time::timeout(Duration::from_secs(60), t).await);
        }
        out
    })?;
    let mut seqs = Vec::new();
    for r in results {
        seqs.push(r???.seqs.start);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=256).collect::<Vec<u64>>());
    assert_eq!(store.outbox().head(), 256);
    for i in 0..256u32 {
        assert_eq!(store.get(&CELLS, &i)?, Some(i));
    }
    Ok(())
}

/// Async and blocking read-modify-writes of the same hot counters, from
/// tasks on a 2-worker runtime and from threads beside it: no update is
/// lost, and every increment's event is in the outbox once.
#[test]
fn async_and_blocking_increments_lose_nothing() -> TestResult {
    const TASKS: u64 = 64;
    const THREADS: u64 = 4;
    const EACH: u64 = 50;
    const KEYS: [&str; 3] = ["x", "y", "z"];
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_conflict_retries(100_000)
        .relay_cursor_poll(None)
        .open(dir.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let increment = |tx: &mut outboxkv::WriteTx<'_>, i: u64| -> outboxkv::Result<()> {
        let key = KEYS[(i % 3) as usize];
        let n = tx.get_for_update(&COUNTERS, key)?.unwrap_or(0);
        tx.put(&COUNTERS, key, &(n + 1))?;
        tx.set_durability(if i.is_multiple_of(2) {
            Durability::Sync
        } else {
            Durability::Buffered
        });
        tx.emit(Event::bytes("inc", key, i.to_le_bytes().to_vec()))
    };
    std::thread::scope(|s| -> TestResult {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                s.spawn(move || -> outboxkv::Result<()> {
                    for j in 0..EACH {
                        store.write(|tx| increment(tx, t * EACH + j))?;
                    }
                    Ok(())
                })
            })
            .collect();
        run(&rt, async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        for j in 0..EACH {
                            let i = (THREADS + t) * EACH + j;
                            store.write_async(|tx| increment(tx, i)).await?;
                        }
                        Ok::<_, outboxkv::Error>(())
                    })
                })
                .collect();
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(120), t).await???;
            }
            TestResult::Ok(())
        })??;
        for t in threads {
            t.join().map_err(|_| "a thread panicked")??;
        }
        Ok(())
    })?;
    let total = (TASKS + THREADS) * EACH;
    let sum: u64 = KEYS
        .iter()
        .map(|k| store.get(&COUNTERS, *k).map(|v| v.unwrap_or(0)))
        .sum::<outboxkv::Result<u64>>()?;
    assert_eq!(sum, total, "lost updates");
    let events = store.outbox().read(1, total as usize + 10)?;
    assert_eq!(events.len() as u64, total);
    let mut ids: Vec<u64> = events
        .iter()
        .map(|e| u64::from_le_bytes(e.payload[..8].try_into().unwrap_or_default()))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..total).collect::<Vec<_>>());
    Ok(())
}

/// A commit whose future is dropped unpolled is still made, and one whose
/// store is dropped before it is awaited still resolves, fsynced: dropping
/// the last `Store` waits for the commit threads to finish the queue (each
/// fsync takes 200 ms), so the store can be reopened at once, and has both.
#[test]
fn dropped_futures_and_stores_still_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = sync_store(dir.path())?;
    store.delay_fsyncs(Duration::from_millis(200));
    let mut tx = store.begin();
    tx.put(&COUNTERS, "dropped", &7)?;
    tx.emit(Event::bytes("t", "dropped", Vec::new()))?;
    drop(tx.commit_async());
    let mut tx = store.begin();
    tx.put(&COUNTERS, "kept", &8)?;
    tx.emit(Event::bytes("t", "kept", Vec::new()))?;
    let kept = tx.commit_async();
    drop(store);
    let rt = current_thread()?;
    let committed = run(&rt, kept)??;
    assert_eq!(committed.seqs, 2..3);
    let store = sync_store(dir.path())?;
    assert_eq!(store.get(&COUNTERS, "dropped")?, Some(7));
    assert_eq!(store.get(&COUNTERS, "kept")?, Some(8));
    assert_eq!(store.outbox().head(), 2);
    Ok(())
}

/// A conflict is known when `commit_async` returns (the future resolves
/// with it at once), and `write_async` retries it.
#[test]
fn commit_async_reports_conflicts_and_write_async_retries_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = sync_store(dir.path())?;
    let rt = current_thread()?;
    run(&rt, async {
        let mut a = store.begin();
        let mut b = store.begin();
        let va = a.get_for_update(&COUNTERS, "c")?.unwrap_or(0);
        let vb = b.get_for_update(&COUNTERS, "c")?.unwrap_or(0);
        a.put(&COUNTERS, "c", &(va + 1))?;
        b.put(&COUNTERS, "c", &(vb + 1))?;
        a.commit_async().await?;
        let refused = b.commit_async().await;
        assert!(
            matches!(refused, Err(Error::Conflict { .. })),
            "{refused:?}"
        );
        // A closure that conflicts once (another commit slips in between
        // its read and its commit) is run again, on a snapshot that has
        // the other commit. That commit's write takes 300 ms: the retry
        // waits for it to become visible without blocking the runtime's
        // only thread (the ticker goes on).
        store.delay_at(Failpoint::CommitWrite, Duration::from_millis(300));
        let ticks = ticker();
        let mut runs = 0;
        let mut other = None;
        let started = Instant::now();
        store
            .write_async(|tx| {
                runs += 1;
                if runs == 2 {
                    // Only the other commit's write was slow: the retry
                    // runs once that write is visible, so it is done.
                    store.delay_at(Failpoint::CommitWrite, Duration::ZERO);
                }
                let n = tx.get_for_update(&COUNTERS, "c")?.unwrap_or(0);
                if runs == 1 {
                    let mut o = store.begin();
                    o.put(&COUNTERS, "c", &(n + 10))?;
                    other = Some(o.commit_async());
                }
                tx.put(&COUNTERS, "c", &(n + 1))
            })
            .await?;
        let (waited, ticked) = (started.elapsed(), ticks.load(Ordering::Relaxed));
        other
            .ok_or(Error::InvalidArgument("no other commit".into()))?
            .await?;
        assert_eq!(runs, 2);
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(
            ticked >= 20,
            "the retry blocked the runtime: {ticked} ticks in {waited:?}"
        );
        Ok::<_, outboxkv::Error>(())
    })??;
    assert_eq!(store.get(&COUNTERS, "c")?, Some(12));
    Ok(())
}

/// An empty commit resolves at once with no seqs, and an error of the
/// closure aborts without committing.
#[test]
fn empty_and_aborted_async_commits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = sync_store(dir.path())?;
    let rt = current_thread()?;
    run(&rt, async {
        let c = store.batch().commit_async().await?;
        assert_eq!(c.seqs, 0..0);
        let r = store
            .write_async(|tx| {
                tx.put(&COUNTERS, "no", &1)?;
                Err::<(), _>(Error::abort("no"))
            })
            .await;
        assert!(matches!(r, Err(Error::Aborted(_))), "{r:?}");
        Ok::<_, outboxkv::Error>(())
    })??;
    assert_eq!(store.get(&COUNTERS, "no")?, None);
    assert_eq!(store.outbox().head(), 0);
    Ok(())
}

/// A failed fsync and a failed write reach the waiting futures as
/// `Poisoned` (the outcome unknown), every one of them, instead of leaving
/// them pending; later commits are refused as not written.
#[test]
fn failures_reach_every_waiting_future() -> TestResult {
    for fail_fsync in [true, false] {
        let dir = tempfile::tempdir()?;
        let store = sync_store(dir.path())?;
        if fail_fsync {
            store.fail_fsyncs_after(0);
        } else {
            store.fail_writes_after(0);
        }
        let rt = current_thread()?;
        let results = run(&rt, async {
            let tasks: Vec<_> = (0..32u32)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .write_async(|tx| tx.emit(Event::bytes("t", i.to_string(), Vec::new())))
                            .await
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(tokio::time::timeout(Duration::from_secs(30), t).await);
            }
            out
        })?;
        let mut unknown = 0;
        for r in results {
            match r?? {
                Err(Error::Poisoned { outcome, .. }) => {
                    if outcome == WriteOutcome::Unknown {
                        unknown += 1;
                    }
                }
                other => return Err(format!("expected Poisoned, got {other:?}").into()),
            }
        }
        assert!(unknown >= 1, "the first group's outcome is unknown");
        let later = run(&rt, store.write_async(|tx| tx.put(&COUNTERS, "later", &1)))?;
        assert!(
            matches!(
                later,
                Err(Error::Poisoned {
                    outcome: WriteOutcome::NotWritten,
                    ..
                })
            ),
            "{later:?}"
        );
    }
    Ok(())
}
