//! One relay per store: an in-process relay, a sidecar source and
//! `outbox-relay run --drain` all take `<store>/relay/LOCK`; the second gets
//! `Error::RelayLocked` and changes nothing. (Before, only the sidecar took
//! it, and an in-process relay and a sidecar pruned each other's entries.)

mod common;

use std::time::Duration;

use outboxkv::relay::SidecarSource;
use outboxkv::relay::{Relay, Shutdown};
use outboxkv::sink::FileSink;
use outboxkv::{Error, Event, Store};

use common::TestResult;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_of_any_kind_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::open(&path)?;
    store.write(|tx| tx.emit(Event::bytes("e", "k", vec![1])))?;
    let relay = Relay::builder(&store)
        .sink(FileSink::open(dir.path().join("a.jsonl"))?)
        .start()?;
    relay.wait_delivered(1, Duration::from_secs(10)).await?;

    // A sidecar beside the in-process relay.
    match SidecarSource::open(&path, Duration::from_millis(20)) {
        Err(Error::RelayLocked { lock, .. }) => assert!(lock.ends_with("relay/LOCK")),
        Err(e) => return Err(format!("expected RelayLocked, got {e}").into()),
        Ok(_) => return Err("a sidecar started beside an in-process relay".into()),
    }
    // A second in-process relay.
    let second = Relay::builder(&store)
        .sink(FileSink::open(dir.path().join("b.jsonl"))?)
        .start();
    assert!(
        matches!(second, Err(Error::RelayLocked { .. })),
        "{second:?}"
    );

    // Once the first stops, the lock is free again.
    relay.shutdown(Shutdown::Now).await?;
    drop(store);
    let source = SidecarSource::open(&path, Duration::from_millis(20))?;
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    let beside = Relay::builder(&store)
        .sink(FileSink::open(dir.path().join("c.jsonl"))?)
        .start();
    assert!(
        matches!(beside, Err(Error::RelayLocked { .. })),
        "an in-process relay beside a sidecar: {beside:?}"
    );
    // A relay built on the store's outbox directly takes the lock too.
    let bypass = Relay::builder_for(store.outbox())
        .sink(FileSink::open(dir.path().join("d.jsonl"))?)
        .start();
    assert!(
        matches!(bypass, Err(Error::RelayLocked { .. })),
        "builder_for(store.outbox()) beside a sidecar: {bypass:?}"
    );
    drop(source);
    Ok(())
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// A sidecar delivered entries 1..=3 and stopped; an in-process relay
/// started right after (before the store's cursor watcher ran) applies the
/// sidecar's cursor first and sends only what came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_relay_after_a_sidecar_does_not_send_its_work_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    store.write(|tx| (0..3u8).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    let source = SidecarSource::open(&path, Duration::from_millis(5))?;
    let sidecar = Relay::builder_for(source)
        .sink(FileSink::open(dir.path().join("sidecar.jsonl"))?)
        .start()?;
    sidecar.wait_delivered(3, Duration::from_secs(10)).await?;
    sidecar.shutdown(Shutdown::Now).await?;
    assert_eq!(
        store.outbox().tail(),
        1,
        "the watcher is off: not applied yet"
    );

    let relay = Relay::builder(&store)
        .sink(FileSink::open(dir.path().join("in-process.jsonl"))?)
        .start()?;
    store.write(|tx| tx.emit(Event::bytes("e", "k", vec![9])))?;
    relay.wait_delivered(4, Duration::from_secs(10)).await?;
    relay.shutdown(Shutdown::Now).await?;
    assert_eq!(lines(&dir.path().join("sidecar.jsonl")), 3);
    assert_eq!(lines(&dir.path().join("in-process.jsonl")), 1, "only seq 4");
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// A store whose database was backed up after seq 1, then shipped through
/// seq 5 by a sidecar (its cursor says 5), then restored from the backup
/// with the cursor kept: its last seq is 1 again.
async fn rolled_back_store()
-> Result<(tempfile::TempDir, std::path::PathBuf), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::open(&path)?;
    store.write(|tx| tx.emit(Event::bytes("e", "k", vec![0])))?;
    drop(store);
    copy_dir(&path.join("db"), &dir.path().join("backup"))?;

    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    store.write(|tx| (1..5u8).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    let source = SidecarSource::open(&path, Duration::from_millis(5))?;
    let sidecar = Relay::builder_for(source)
        .sink(FileSink::open(dir.path().join("out.jsonl"))?)
        .start()?;
    sidecar.wait_delivered(5, Duration::from_secs(10)).await?;
    sidecar.shutdown(Shutdown::Now).await?;
    drop(store);

    std::fs::remove_dir_all(path.join("db"))?;
    copy_dir(&dir.path().join("backup"), &path.join("db"))?;
    Ok((dir, path))
}

/// The store's database is restored from an older copy but the sidecar's
/// cursor is kept: the cursor is ahead of the store's last seq. Applying it
/// would prune the store's next commits unsent; it is refused as
/// corruption instead, and nothing is pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_of_the_store_is_refused() -> TestResult {
    let (dir, path) = rolled_back_store().await?;
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    assert_eq!(store.outbox().head(), 1);
    store.write(|tx| tx.emit(Event::bytes("e", "k", vec![7])))?;
    match store.outbox().apply_relay_cursor() {
        Err(Error::Corruption { reason, .. }) => {
            assert!(reason.contains("restored from an older copy"), "{reason}")
        }
        other => return Err(format!("expected Corruption, got {other:?}").into()),
    }
    let relay = Relay::builder(&store)
        .sink(FileSink::open(dir.path().join("again.jsonl"))?)
        .start();
    assert!(matches!(relay, Err(Error::Corruption { .. })), "{relay:?}");
    assert_eq!(store.outbox().depth(), 2, "nothing pruned");
    Ok(())
}

/// The same restore, but the service commits past the cursor's seq before
/// anything looks at the cursor: the seqs now hold other entries. The
/// cursor records the commit time of its last delivered entry, so the
/// store (and a sidecar) still see that it is not their history, and
/// nothing is pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_store_written_past_the_cursor_is_refused() -> TestResult {
    let (dir, path) = rolled_back_store().await?;
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    store.write(|tx| (0..7u8).try_for_each(|i| tx.emit(Event::bytes("e", "k", vec![i]))))?;
    assert_eq!(store.outbox().head(), 8, "past the cursor's seq 5");
    match store.outbox().apply_relay_cursor() {
        Err(Error::Corruption { reason, .. }) => {
            assert!(reason.contains("restored from an older copy"), "{reason}")
        }
        other => return Err(format!("expected Corruption, got {other:?}").into()),
    }
    let relay = Relay::builder(&store)
        .sink(FileSink::open(dir.path().join("again.jsonl"))?)
        .start();
    assert!(matches!(relay, Err(Error::Corruption { .. })), "{relay:?}");
    assert_eq!(store.outbox().depth(), 8, "nothing pruned");
    match SidecarSource::open(&path, Duration::from_millis(5)) {
        Err(Error::Corruption { .. }) => {}
        other => return Err(format!("a sidecar opened: {:?}", other.map(|_| ())).into()),
    }
    Ok(())
}
