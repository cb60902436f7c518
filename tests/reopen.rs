//! Reopening: data survives in both durability modes, seqs continue, and the
//! store's identity, format version and lock are checked before anything is
//! written.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use outboxkv::{Durability, Error, Event, Store, Table};

use common::TestResult;

const T: Table<u32, String> = Table::new("t");

fn listing(path: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let content = if entry.file_type()?.is_file() {
            fs::read(entry.path())?
        } else {
            Vec::new()
        };
        out.insert(entry.file_name().to_string_lossy().into_owned(), content);
    }
    Ok(out)
}

fn reopen_keeps_everything(durability: Durability) -> TestResult {
    let dir = tempfile::tempdir()?;
    let id;
    {
        let store = Store::options().durability(durability).open(dir.path())?;
        id = store.id();
        for i in 0..50u32 {
            store.write(|tx| {
                tx.put(&T, &i, &format!("v{i}"))?;
                tx.emit(Event::bytes(
                    "t.put",
                    i.to_string(),
                    i.to_be_bytes().to_vec(),
                ))
            })?;
        }
    }
    let store = Store::options().durability(durability).open(dir.path())?;
    assert_eq!(store.id(), id, "identity is persisted");
    assert_eq!(store.range(&T, ..)?.count(), 50);
    assert_eq!(store.get(&T, &49)?.as_deref(), Some("v49"));
    let outbox = store.outbox();
    assert_eq!((outbox.tail(), outbox.head()), (1, 50));
    let c = store.write(|tx| tx.emit(Event::bytes("t.put", "x", Vec::new())))?;
    assert_eq!(c.seqs, 51..52, "seqs continue after reopen");
    Ok(())
}

#[test]
fn reopen_sync() -> TestResult {
    reopen_keeps_everything(Durability::Sync)
}

#[test]
fn reopen_buffered() -> TestResult {
    reopen_keeps_everything(Durability::Buffered)
}

#[test]
fn seqs_continue_after_everything_was_pruned() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = Store::open(dir.path())?;
        store.write(|tx| (0..5).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
        assert_eq!(store.outbox().prune_through(5)?, 6);
        assert_eq!(store.outbox().depth(), 0);
    }
    let store = Store::open(dir.path())?;
    assert_eq!((store.outbox().tail(), store.outbox().head()), (6, 5));
    let c = store.write(|tx| tx.emit(Event::bytes("e", "k", Vec::new())))?;
    assert_eq!(
        c.seqs,
        6..7,
        "a seq is never reused, even after a full prune"
    );
    Ok(())
}

#[test]
fn a_directory_that_is_not_a_store_is_left_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    fs::write(dir.path().join("notes.txt"), b"precious")?;
    let before = listing(dir.path())?;
    match Store::open(dir.path()) {
        Err(Error::NotAStore { reason, .. }) => assert!(reason.contains("OUTBOXKV"), "{reason}"),
        other => panic!("expected NotAStore, got {other:?}"),
    }
    assert_eq!(listing(dir.path())?, before, "nothing was written");

    let file = dir.path().join("notes.txt");
    assert!(matches!(Store::open(&file), Err(Error::NotAStore { .. })));

    let missing = dir.path().join("missing");
    let r = Store::options().create_if_missing(false).open(&missing);
    assert!(matches!(r, Err(Error::NotAStore { .. })), "{r:?}");
    assert!(!missing.exists());
    Ok(())
}

#[test]
fn a_newer_format_is_refused_without_writing() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(Store::open(dir.path())?);
    let meta = dir.path().join("OUTBOXKV");
    let mut bytes = fs::read(&meta)?;
    bytes[8] = 2; // format version 2, little-endian
    fs::write(&meta, &bytes)?;
    let before = listing(dir.path())?;
    match Store::open(dir.path()) {
        Err(Error::UnsupportedFormat {
            found: 2,
            supported: 1,
            ..
        }) => {}
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    assert_eq!(listing(dir.path())?, before);
    Ok(())
}

#[test]
fn a_damaged_identity_file_is_corruption() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(Store::open(dir.path())?);
    let meta = dir.path().join("OUTBOXKV");
    let mut bytes = fs::read(&meta)?;
    bytes[20] ^= 0xFF;
    fs::write(&meta, &bytes)?;
    assert!(matches!(
        Store::open(dir.path()),
        Err(Error::Corruption { .. })
    ));
    Ok(())
}

#[test]
fn a_second_open_in_this_process_is_locked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    assert!(matches!(Store::open(dir.path()), Err(Error::Locked { .. })));
    drop(store);
    // Another test in this process spawns `flock`: a child between fork and
    // exec holds a copy of every descriptor, our lock's included, for a
    // moment (see `Error::Locked`). The lock must be free soon, not at once.
    for attempt in 0.. {
        match Store::open(dir.path()) {
            Err(Error::Locked { .. }) if attempt < 100 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => {
                other?;
                break;
            }
        }
    }
    Ok(())
}

#[test]
fn an_open_in_another_process_is_locked_not_a_hang() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(Store::open(dir.path())?);
    // util-linux `flock` holds the same kind of lock Store takes, from another process.
    let mut holder = Command::new("flock")
        .args(["--exclusive", "--no-fork"])
        .arg(dir.path().join("LOCK"))
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .spawn()?;
    let mut result = None;
    for _ in 0..100 {
        match Store::open(dir.path()) {
            Err(Error::Locked { .. }) => {
                result = Some(());
                break;
            }
            // The child may not hold the lock yet.
            Ok(s) => drop(s),
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    holder.kill()?;
    holder.wait()?;
    assert!(result.is_some(), "the other process's lock was never seen");
    Store::open(dir.path())?;
    Ok(())
}
