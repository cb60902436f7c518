//! Concurrent transactions: serializable increments, gap-free seqs in
//! commit order, conflicts surfaced when retries are off.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use outboxkv::{Durability, Error, Event, Store, Table};

use common::TestResult;

const COUNTER: Table<str, u64> = Table::new("counter");

fn run_counter(durability: Durability, threads: usize, per_thread: usize) -> TestResult {
    run_counter_with(durability, true, threads, per_thread)
}

/// `durability` is the store's default; `Durability::Sync` here makes every
/// other transaction of each thread `Buffered`, so both kinds share groups.
fn run_counter_with(
    durability: Durability,
    pipelined: bool,
    threads: usize,
    per_thread: usize,
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(durability)
        .pipelined_fsync(pipelined)
        .max_conflict_retries(10_000)
        .open(dir.path())?;
    let conflicts = Arc::new(AtomicU64::new(0));
    // Every thread's first transaction reads, then waits for all the others
    // to have read too: all read 0, one commits, the others must conflict.
    let all_read = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let store = store.clone();
            let conflicts = conflicts.clone();
            let all_read = all_read.clone();
            thread::spawn(move || -> outboxkv::Result<()> {
                for i in 0..per_thread {
                    let mut attempts = 0;
                    let committed = store.write(|tx| {
                        attempts += 1;
                        if durability == Durability::Sync && i % 2 == 1 {
                            tx.set_durability(Durability::Buffered);
                        }
                        let n = tx.get_for_update(&COUNTER, "n")?.unwrap_or(0) + 1;
                        if i == 0 && attempts == 1 {
                            all_read.wait();
                        }
                        tx.put(&COUNTER, "n", &n)?;
                        tx.emit(Event::json("counter.incremented", "n", &n)?)?;
                        Ok(())
                    })?;
                    // A returned commit's event is already announced to the
                    // relay (for Sync: only after its fsync, but before the
                    // commit returns).
                    let head = store.outbox().head();
                    assert!(
                        head >= committed.seqs.end - 1,
                        "commit of seq {} returned while the head was {head}",
                        committed.seqs.end - 1
                    );
                    conflicts.fetch_add(attempts - 1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "writer thread panicked")??;
    }
    let total = (threads * per_thread) as u64;
    assert_eq!(store.get(&COUNTER, "n")?, Some(total), "lost update");
    let outbox = store.outbox();
    assert_eq!((outbox.tail(), outbox.head()), (1, total));
    let entries = outbox.read(1, usize::MAX)?;
    assert_eq!(entries.len() as u64, total);
    for (i, e) in entries.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(e.seq, seq, "seqs must be exactly 1..=N");
        let value: u64 = serde_json::from_slice(&e.payload)?;
        // The value written by the commit that got seq N is N: seqs follow commit order.
        assert_eq!(value, seq, "event at seq {seq} carries {value}");
    }
    // The first round alone makes threads - 1 conflicts; if there were
    // fewer, a stale read-modify-write was let through or not retried.
    let conflicts = conflicts.load(Ordering::Relaxed);
    assert!(
        conflicts >= threads as u64 - 1,
        "{conflicts} conflicts detected, expected at least {}",
        threads - 1
    );
    Ok(())
}

#[test]
fn eight_threads_increment_one_counter_buffered() -> TestResult {
    run_counter(Durability::Buffered, 8, 400)
}

#[test]
fn sixteen_threads_increment_one_counter_sync() -> TestResult {
    run_counter(Durability::Sync, 16, 40)
}

#[test]
fn sixteen_threads_increment_one_counter_sync_not_pipelined() -> TestResult {
    run_counter_with(Durability::Sync, false, 16, 40)
}

/// Independent Sync commits from many threads: every commit returns with
/// its event announced and its write readable, seqs stay 1..=N.
#[test]
fn many_threads_sync_commits_on_their_own_keys() -> TestResult {
    const ROWS: Table<u64, u64> = Table::new("rows");
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let (threads, per_thread) = (16u64, 100u64);
    thread::scope(|s| -> TestResult {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = &store;
                s.spawn(move || -> outboxkv::Result<()> {
                    for i in 0..per_thread {
                        let id = t * per_thread + i;
                        let c = store.write(|tx| {
                            tx.put(&ROWS, &id, &i)?;
                            tx.emit(Event::bytes("row", id.to_string(), Vec::new()))
                        })?;
                        assert!(store.outbox().head() >= c.seqs.start);
                        assert_eq!(store.get(&ROWS, &id)?, Some(i));
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "writer thread panicked")??;
        }
        Ok(())
    })?;
    let n = threads * per_thread;
    assert_eq!(store.range(&ROWS, ..)?.count() as u64, n);
    let seqs: Vec<u64> = store
        .outbox()
        .read(1, usize::MAX)?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn conflict_is_returned_when_retries_are_exhausted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options().max_conflict_retries(0).open(dir.path())?;
    let mut interfered = false;
    let r = store.write(|tx| {
        let n = tx.get_for_update(&COUNTER, "n")?.unwrap_or(0);
        if !interfered {
            interfered = true;
            // Another committer changes the key between our read and our commit.
            let other = store.clone();
            thread::spawn(move || other.write(|t| t.put(&COUNTER, "n", &100)))
                .join()
                .map_err(|_| Error::abort("interfering thread panicked"))??;
        }
        tx.put(&COUNTER, "n", &(n + 1))?;
        tx.emit(Event::bytes("counter.incremented", "n", Vec::new()))
    });
    match r {
        Err(Error::Conflict { table, key }) => {
            assert_eq!(table, "counter");
            assert_eq!(key, "\"n\"");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.get(&COUNTER, "n")?, Some(100));
    assert_eq!(
        store.outbox().head(),
        0,
        "the failed commit emitted nothing"
    );
    Ok(())
}

#[test]
fn disjoint_keys_do_not_conflict() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options().max_conflict_retries(0).open(dir.path())?;
    let mut a = store.begin();
    let mut b = store.begin();
    a.get_for_update(&COUNTER, "a")?;
    b.get_for_update(&COUNTER, "b")?;
    a.put(&COUNTER, "a", &1)?;
    b.put(&COUNTER, "b", &1)?;
    a.commit()?;
    b.commit()?;
    Ok(())
}
