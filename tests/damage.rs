//! Damaged files: a torn or bit-flipped write-ahead log, a damaged SST, a
//! damaged relay cursor, a missing `CURRENT`, a MANIFEST that lost its end.
//! Each gives a clear error or is recovered as `WalRecovery` documents;
//! acknowledged commits are never dropped silently.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use outboxkv::{Error, Event, Store, Table, WalRecovery};

use common::TestResult;

const DOCS: Table<u64, Vec<u8>> = Table::new("docs");

/// Doc `i`: 1 KiB that does not compress, so the SSTs hold real data blocks.
fn doc(i: u64) -> Vec<u8> {
    common::incompressible(i, 1024)
}

/// Commits `n` transactions: doc i (a 1 KiB value) and one event for it.
fn fill(path: &Path, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::options().relay_cursor_poll(None).open(path)?;
    for i in 1..=n {
        store.write(|tx| {
            tx.put(&DOCS, &i, &doc(i))?;
            tx.emit(Event::bytes(
                "docs.saved",
                i.to_string(),
                i.to_be_bytes().to_vec(),
            ))
        })?;
    }
    Ok(())
}

/// Checks the store holds exactly docs 1..=n, each with its event at seq i.
fn assert_exactly(store: &Store, n: u64) -> TestResult {
    let mut count = 0;
    for row in store.range(&DOCS, ..)? {
        let (i, v) = row?;
        assert_eq!(v, doc(i), "doc {i}");
        count += 1;
        assert_eq!(i, count, "docs are 1..=n");
    }
    assert_eq!(count, n, "docs");
    let outbox = store.outbox();
    assert_eq!(outbox.head(), n, "events");
    for (k, e) in outbox.read(1, usize::MAX)?.iter().enumerate() {
        assert_eq!(e.seq, k as u64 + 1);
        assert_eq!(e.key, e.seq.to_string(), "the event of doc {}", e.seq);
    }
    Ok(())
}

fn files_with(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    Ok(out)
}

/// The write-ahead log holding the commits (the largest `.log`).
fn wal(path: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    files_with(&path.join("db"), "log")?
        .pop()
        .ok_or_else(|| "no WAL file".into())
}

fn flip_byte(file: &Path, at: u64) -> TestResult {
    let mut f = OpenOptions::new().read(true).write(true).open(file)?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    std::io::Read::read_exact(&mut f, &mut b)?;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&[b[0] ^ 0x5a])?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn a_torn_last_wal_record_is_dropped_whole() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    fill(&path, 100)?;
    let log = wal(&path)?;
    let len = fs::metadata(&log)?.len();
    // Cut into the last commit's record, as a crash during its write would.
    OpenOptions::new()
        .write(true)
        .open(&log)?
        .set_len(len - 100)?;
    let store = Store::open(&path)?;
    // Commit 100 was never acknowledged in this story: gone whole (no doc
    // without event or event without doc); 1..=99 intact and gap-free.
    assert_exactly(&store, 99)?;
    store.write(|tx| {
        tx.put(&DOCS, &100, &doc(100))?;
        tx.emit(Event::bytes(
            "docs.saved",
            "100",
            100u64.to_be_bytes().to_vec(),
        ))
    })?;
    assert_exactly(&store, 100)?;
    Ok(())
}

#[test]
fn a_bit_flip_inside_the_wal_fails_the_open_until_salvage_is_asked_for() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    fill(&path, 100)?;
    let log = wal(&path)?;
    let len = fs::metadata(&log)?.len();
    flip_byte(&log, len / 2)?;

    match Store::open(&path) {
        Err(Error::Corruption { reason, .. }) => {
            assert!(!reason.is_empty());
        }
        Err(other) => return Err(format!("expected Corruption, got {other}").into()),
        Ok(_) => return Err("a damaged WAL opened silently".into()),
    }
    // Salvage: everything before the damage, nothing torn, gap-free.
    let store = Store::options()
        .wal_recovery(WalRecovery::PointInTime)
        .open(&path)?;
    let survived = store.outbox().head();
    assert!(
        survived > 10 && survived < 100,
        "{survived} commits survived"
    );
    assert_exactly(&store, survived)?;
    Ok(())
}

#[test]
fn a_damaged_sst_block_reads_as_corruption_never_as_garbage() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    fill(&path, 300)?;
    Store::open(&path)?.flush()?;
    let sst = files_with(&path.join("db"), "sst")?
        .pop()
        .ok_or("no SST file")?;
    let len = fs::metadata(&sst)?.len();
    for at in [len / 5, len / 3, len / 2] {
        flip_byte(&sst, at)?;
    }
    let store = match Store::open(&path) {
        Ok(s) => s,
        // Also acceptable: refused at open, clearly.
        Err(Error::Corruption { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut corrupt = 0;
    for i in 1..=300u64 {
        match store.get(&DOCS, &i) {
            Ok(Some(v)) => assert_eq!(v, doc(i), "doc {i} is garbage"),
            Ok(None) => return Err(format!("doc {i} vanished without an error").into()),
            Err(Error::Corruption { .. }) => corrupt += 1,
            Err(e) => return Err(format!("doc {i}: expected Corruption, got {e}").into()),
        }
    }
    assert!(corrupt > 0, "three flipped bytes in the SST went unnoticed");
    Ok(())
}

#[test]
fn a_damaged_relay_cursor_prunes_nothing_and_says_why() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    fill(&path, 10)?;
    fs::create_dir_all(path.join("relay"))?;
    let cursor = outboxkv::RelayCursor {
        store: Store::options().relay_cursor_poll(None).open(&path)?.id(),
        delivered_through: 10,
        through_created_micros: 0,
        dead: vec![],
    };
    let mut bytes = cursor.encode();
    bytes[30] ^= 1;
    fs::write(path.join("relay/cursor"), &bytes)?;
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    match store.outbox().apply_relay_cursor() {
        Err(Error::Corruption { location, reason }) => {
            assert!(location.contains("cursor"), "{location}");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => return Err(format!("expected Corruption, got {other:?}").into()),
    }
    assert_eq!(store.outbox().depth(), 10, "nothing pruned");
    // A good cursor of another store is refused too.
    let other = outboxkv::RelayCursor {
        store: outboxkv::StoreId([7; 16]),
        ..cursor
    };
    fs::write(path.join("relay/cursor"), other.encode())?;
    assert!(matches!(
        store.outbox().apply_relay_cursor(),
        Err(Error::Corruption { .. })
    ));
    assert_eq!(store.outbox().depth(), 10, "nothing pruned");
    Ok(())
}

/// Names of the files in the database folder, without RocksDB's info logs.
fn db_files(path: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut names: Vec<String> = fs::read_dir(path.join("db"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.retain(|n| !n.starts_with("LOG"));
    names.sort();
    Ok(names)
}

/// Without `CURRENT`, RocksDB would create a new, empty database over the
/// old files and delete them (it did: the store opened empty).
#[test]
fn a_missing_current_file_is_refused_and_the_data_files_are_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    fill(&path, 100)?;
    Store::open(&path)?.flush()?;
    let db = path.join("db");
    let current = fs::read(db.join("CURRENT"))?;
    fs::remove_file(db.join("CURRENT"))?;
    // The logs hold nothing after the flush; without them RocksDB itself
    // does not object.
    for log in files_with(&db, "log")? {
        fs::remove_file(log)?;
    }
    let before = db_files(&path)?;
    assert!(before.iter().any(|n| n.ends_with(".sst")), "{before:?}");
    for _ in 0..2 {
        match Store::open(&path) {
            Err(Error::Corruption { location, reason }) => {
                assert!(location.ends_with("db"), "{location}");
                assert!(reason.contains("no CURRENT file"), "{reason}");
            }
            Err(other) => return Err(format!("expected Corruption, got {other}").into()),
            Ok(_) => return Err("opened without CURRENT".into()),
        }
        assert_eq!(db_files(&path)?, before, "nothing created or deleted");
    }
    fs::write(db.join("CURRENT"), current)?;
    assert_exactly(&Store::open(&path)?, 100)?;
    Ok(())
}

/// The MANIFEST loses the records of a flush (its end cut off, as in a store
/// copied while it was written): RocksDB opens the older state, and the
/// flushed outbox entries and table rows are gone. The outbox tells: its
/// oldest entries are missing but were never pruned.
#[test]
fn outbox_entries_missing_at_the_old_end_fail_the_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let db = path.join("db");
    let (manifest, len) = {
        let store = Store::options().relay_cursor_poll(None).open(&path)?;
        let name = fs::read_to_string(db.join("CURRENT"))?;
        let manifest = db.join(name.trim());
        let len = fs::metadata(&manifest)?.len();
        for i in 1..=110u64 {
            if i == 101 {
                store.flush()?;
            }
            store.write(|tx| {
                tx.put(&DOCS, &i, &doc(i))?;
                tx.emit(Event::bytes("docs.saved", i.to_string(), vec![]))
            })?;
        }
        (manifest, len)
    };
    assert!(
        fs::metadata(&manifest)?.len() > len,
        "the flush was recorded"
    );
    OpenOptions::new()
        .write(true)
        .open(&manifest)?
        .set_len(len)?;
    // Refused, and on the next open too: it does not heal by itself.
    for _ in 0..2 {
        match Store::open(&path) {
            Err(Error::Corruption { location, reason }) => {
                assert_eq!(location, "outbox seq 1");
                assert!(reason.contains("1..=100 are missing"), "{reason}");
            }
            Err(other) => return Err(format!("expected Corruption, got {other}").into()),
            Ok(s) => {
                return Err(format!(
                    "opened with outbox {}..={}",
                    s.outbox().tail(),
                    s.outbox().head()
                )
                .into());
            }
        }
    }
    Ok(())
}
