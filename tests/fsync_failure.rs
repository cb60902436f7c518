//! A failing fsync or write under concurrent `Sync` commits (feature
//! `failpoints`): no commit hangs, nothing fails silently, the relay is never
//! told about a commit that failed, and what was acknowledged survives a
//! reopen.

mod common;

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use outboxkv::{Error, Event, Store, Table, WriteOutcome};

use common::TestResult;

const ROWS: Table<u64, u64> = Table::new("rows");

/// What one writer thread saw: the ids and seqs of its acknowledged
/// commits, then the id whose commit failed and the error.
struct Seen {
    acked: Vec<(u64, u64)>,
    failed: u64,
    error: Error,
}

#[test]
fn fsync_failure_poisons_without_hanging_or_announcing_failed_commits() -> TestResult {
    run_into_failure(|store| store.fail_fsyncs_after(150))
}

/// A failing group write leaves the commits queued behind it (they were
/// ordered, given seqs, and wait for the next leader) to be failed too.
#[test]
fn write_failure_poisons_without_hanging_or_announcing_failed_commits() -> TestResult {
    run_into_failure(|store| store.fail_writes_after(300))
}

fn run_into_failure(inject: impl FnOnce(&Store)) -> TestResult {
    const THREADS: u64 = 16;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    inject(&store);

    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (store, tx) = (store.clone(), tx.clone());
        handles.push(thread::spawn(move || {
            let mut acked = Vec::new();
            let (failed, error) = (0..)
                .map(|i| t * 1_000_000 + i)
                .find_map(|id| {
                    let r = store.write(|w| {
                        w.put(&ROWS, &id, &id)?;
                        w.emit(Event::bytes("row", id.to_string(), Vec::new()))
                    });
                    match r {
                        Ok(c) => {
                            acked.push((id, c.seqs.start));
                            None
                        }
                        Err(e) => Some((id, e)),
                    }
                })
                .unwrap_or_else(|| (u64::MAX, Error::abort("unreachable")));
            let _ = tx.send(Seen {
                acked,
                failed,
                error,
            });
        }));
    }
    drop(tx);

    let mut acked = Vec::new();
    let mut not_written = Vec::new();
    let mut unknown = 0;
    for _ in 0..THREADS {
        // A commit left waiting for an fsync that failed would hang here.
        let seen = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "a committer hung after the injected failure")?;
        match &seen.error {
            Error::Poisoned { cause, outcome } if cause.contains("injected") => match outcome {
                WriteOutcome::NotWritten => not_written.push(seen.failed),
                _ => unknown += 1,
            },
            other => panic!("unexpected error: {other:?}"),
        }
        acked.extend(seen.acked);
    }
    // The commit(s) whose own write or fsync failed are in doubt; the
    // others were refused (behind the failure, or after it).
    assert!(unknown >= 1, "no commit reported its outcome as unknown");
    for h in handles {
        h.join().map_err(|_| "writer thread panicked")?;
    }
    assert!(
        acked.len() > 100,
        "only {} commits before the failure",
        acked.len()
    );

    // Poisoned for good: later commits fail at once.
    let late = store.write(|w| w.put(&ROWS, &u64::MAX, &0));
    assert!(
        matches!(
            late,
            Err(Error::Poisoned {
                outcome: WriteOutcome::NotWritten,
                ..
            })
        ),
        "{late:?}"
    );
    // Every other write path refuses too, and says nothing was written.
    for (what, r) in [
        ("flush", store.flush()),
        ("prune", store.outbox().prune_through(1).map(|_| ())),
        ("purge", store.outbox().dead_letters().purge(&[1])),
    ] {
        assert!(
            matches!(
                r,
                Err(Error::Poisoned {
                    outcome: WriteOutcome::NotWritten,
                    ..
                })
            ),
            "{what} on a poisoned store: {r:?}"
        );
    }

    // The relay was told exactly about the acknowledged commits: their seqs
    // are 1..=head, and no failed commit's seq is at or below the head.
    let head = store.outbox().head();
    let seqs: BTreeSet<u64> = acked.iter().map(|&(_, seq)| seq).collect();
    assert_eq!(seqs.len(), acked.len());
    let announced: BTreeSet<u64> = (1..=head).collect();
    let not_announced: Vec<_> = seqs.difference(&announced).take(5).collect();
    let not_acked: Vec<_> = announced.difference(&seqs).take(5).collect();
    assert!(
        not_announced.is_empty() && not_acked.is_empty(),
        "head {head}: acked but not announced {not_announced:?}, announced but failed {not_acked:?}"
    );

    // Everything acknowledged survives a reopen (in-doubt commits may too);
    // the reopened store is writable and its seqs stay gap-free.
    drop(store);
    let store = Store::open(dir.path())?;
    for &(id, seq) in &acked {
        assert_eq!(
            store.get(&ROWS, &id)?,
            Some(id),
            "row {id} (seq {seq}) lost"
        );
    }
    for &id in &not_written {
        assert_eq!(
            store.get(&ROWS, &id)?,
            None,
            "row {id} was reported as not written, but is there after the reopen"
        );
    }
    let entries = store.outbox().read(1, usize::MAX)?;
    assert!(entries.len() as u64 >= head);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    let after = store.write(|w| w.emit(Event::bytes("row", "after", Vec::new())))?;
    assert_eq!(after.seqs.start, entries.len() as u64 + 1);
    Ok(())
}
