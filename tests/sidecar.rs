//! The sidecar relay's source in-process: it ships only what it has made
//! durable itself (the owner's log is fsynced after each catch-up).

mod common;

use std::time::Duration;

use outboxkv::relay::OutboxSource;
use outboxkv::relay::SidecarSource;
use outboxkv::{Durability, OutboxEntry, Store};

use common::TestResult;

fn seqs(entries: &[OutboxEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

/// `Buffered` commits are never fsynced by their owner: the sidecar's head
/// must be what it fsynced, not what its reader can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_ships_only_what_it_read_before_its_own_fsync() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(&path)?;
    common::emit_each(&store, 0..5)?;

    let source = SidecarSource::open(&path, Duration::from_millis(5))?;
    assert_eq!(source.head()?, 5, "what open read is made durable");
    assert_eq!(seqs(&source.read(1, 100, usize::MAX)?), vec![1, 2, 3, 4, 5]);

    common::emit_each(&store, 5..8)?;
    // Catching the reader up by hand shows more, but nothing fsynced it.
    source.reader().catch_up()?;
    assert_eq!(source.reader().head()?, 8);
    assert_eq!(source.head()?, 5);
    assert!(source.read(6, 100, usize::MAX)?.is_empty());

    // The sidecar's own catch-up fsyncs the log and moves the head.
    tokio::time::timeout(Duration::from_secs(10), source.changed(5)).await?;
    assert_eq!(source.head()?, 8);
    let entries = source.read(6, 100, usize::MAX)?;
    assert_eq!(seqs(&entries), vec![6, 7, 8]);
    assert_eq!(entries[2].payload, vec![7]);
    Ok(())
}

/// The reader's own `sync_wal` works while the owner writes and rolls its
/// log over (a log deleted between listing and fsync is skipped).
#[test]
fn sync_wal_runs_while_the_owner_writes_and_flushes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::open(&path)?;
    common::emit_each(&store, 0..3)?;
    let reader = outboxkv::StoreReader::open(&path, dir.path().join("scratch"))?;
    let mut logs = std::collections::BTreeSet::new();
    std::thread::scope(|s| -> TestResult {
        let writer = s.spawn(|| -> outboxkv::Result<()> {
            for round in 0..20u8 {
                common::emit_each(&store, 0..20)?;
                if round % 4 == 0 {
                    store.flush()?;
                }
            }
            Ok(())
        });
        while !writer.is_finished() {
            reader.catch_up()?;
            reader.sync_wal()?;
            for e in std::fs::read_dir(path.join("db"))? {
                let name = e?.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") {
                    logs.insert(name);
                }
            }
        }
        writer.join().map_err(|_| "writer panicked")??;
        Ok(())
    })?;
    reader.catch_up()?;
    reader.sync_wal()?;
    assert_eq!(reader.head()?, 3 + 20 * 20);
    assert!(logs.len() >= 2, "the owner rolled its log over: {logs:?}");
    Ok(())
}
