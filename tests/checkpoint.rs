//! `Store::checkpoint`: an online, consistent copy with its own identity.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use outboxkv::{Durability, Error, Event, Store, Table};

use common::TestResult;

const ROWS: Table<u64, String> = Table::new("rows");

fn commit(store: &Store, i: u64, durability: Durability) -> outboxkv::Result<()> {
    store.write(|tx| {
        tx.set_durability(durability);
        tx.put(&ROWS, &i, &format!("row {i}"))?;
        tx.emit(Event::bytes(
            "row.saved",
            i.to_string(),
            i.to_be_bytes().to_vec(),
        ))
    })?;
    Ok(())
}

fn rows(store: &Store) -> outboxkv::Result<BTreeMap<u64, String>> {
    store.range(&ROWS, ..)?.collect()
}

#[test]
fn a_checkpoint_is_the_same_data_under_a_new_identity() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("live"))?;
    for i in 1..=20 {
        let d = if i % 2 == 0 {
            Durability::Sync
        } else {
            Durability::Buffered
        };
        commit(&store, i, d)?;
    }
    store.outbox().prune_through(5)?;

    let dest = dir.path().join("copy");
    let id = store.checkpoint(&dest)?;
    // The original goes on; the copy does not see it.
    commit(&store, 21, Durability::Sync)?;

    let copy = Store::open(&dest)?;
    assert_eq!(copy.id(), id);
    assert_ne!(id, store.id(), "a new identity");
    let expected: BTreeMap<u64, String> = (1..=20).map(|i| (i, format!("row {i}"))).collect();
    assert_eq!(rows(&copy)?, expected);
    let (out, orig) = (copy.outbox(), store.outbox());
    assert_eq!((out.tail(), out.head()), (6, 20));
    let copied = out.read(1, 100)?;
    assert_eq!(copied, orig.read(1, 15)?, "entries 6..=20, ids included");
    assert!(copied.iter().all(|e| e.id.store == store.id()));

    // New events in the copy get ids of its own identity, seqs go on.
    commit(&copy, 22, Durability::Sync)?;
    let new = out.read(21, 10)?;
    assert_eq!(new.len(), 1);
    assert_eq!((new[0].seq, new[0].id.store, new[0].id.seq), (21, id, 21));
    assert_ne!(
        new[0].id,
        orig.read(21, 1)?[0].id,
        "the original's seq 21 has another id"
    );
    Ok(())
}

#[test]
fn a_checkpoint_under_concurrent_commits_holds_whole_commits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("live"))?;
    let stop = AtomicBool::new(false);
    let dest = dir.path().join("copy");
    let (before, after) =
        std::thread::scope(|s| -> Result<(u64, u64), Box<dyn std::error::Error>> {
            let writers: Vec<_> = (0..4u64)
                .map(|t| {
                    let (store, stop) = (&store, &stop);
                    s.spawn(move || -> outboxkv::Result<u64> {
                        let mut n = 0;
                        while !stop.load(Ordering::Relaxed) || n < 50 {
                            n += 1;
                            let d = if n % 3 == 0 {
                                Durability::Sync
                            } else {
                                Durability::Buffered
                            };
                            commit(store, t * 1_000_000 + n, d)?;
                        }
                        Ok(n)
                    })
                })
                .collect();
            while store.outbox().head() < 100 {
                std::thread::yield_now();
            }
            let before = store.outbox().head();
            store.checkpoint(&dest)?;
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.join().map_err(|_| "writer panicked")??;
            }
            Ok((before, store.outbox().head()))
        })?;

    let copy = Store::open(&dest)?;
    let head = copy.outbox().head();
    // Everything acknowledged before the call (and maybe commits in flight).
    assert!(
        before <= head && head <= after,
        "{before} <= {head} <= {after}"
    );
    let entries = copy.outbox().read(1, usize::MAX)?;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "gap-free");
    // Every event's row is there and every row's event: no torn commit.
    let from_events: BTreeMap<u64, String> = entries
        .iter()
        .map(|e| {
            let i: u64 = e.key.parse().unwrap_or(0);
            (i, format!("row {i}"))
        })
        .collect();
    assert_eq!(rows(&copy)?, from_events);
    Ok(())
}

#[test]
fn an_existing_destination_is_refused_and_left_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("live"))?;
    commit(&store, 1, Durability::Sync)?;
    let dest = dir.path().join("taken");
    std::fs::create_dir(&dest)?;
    std::fs::write(dest.join("notes.txt"), "keep me")?;
    match store.checkpoint(&dest) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("already exists"), "{msg}"),
        other => return Err(format!("expected InvalidArgument, got {other:?}").into()),
    }
    let names: Vec<_> = std::fs::read_dir(&dest)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, vec![std::ffi::OsString::from("notes.txt")]);
    assert_eq!(std::fs::read_to_string(dest.join("notes.txt"))?, "keep me");
    Ok(())
}
