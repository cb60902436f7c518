//! The sidecar relay's source in-process: it ships only what it has made
//! durable itself (the owner's log is fsynced after each catch-up).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboxkv::relay::{
    BoxFuture, OutboxSource, Outcome, Relay, Shutdown, SidecarSource, Sink, read_sidecar_cursor,
    sidecar_cursor_path,
};
use outboxkv::{Durability, Error, OutboxEntry, Store};
use parking_lot::Mutex;

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

/// Records the seq of every entry it is given, and acknowledges it.
struct Collect(Arc<Mutex<Vec<u64>>>);

impl Sink for Collect {
    fn name(&self) -> &str {
        "collect"
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        self.0.lock().extend(batch.iter().map(|e| e.seq));
        Box::pin(async move { batch.iter().map(|_| Outcome::acked()).collect() })
    }
}

async fn cursor_reaches(path: &Path, seq: u64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if read_sidecar_cursor(path)?.map(|c| c.delivered_through) == Some(seq) {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "the cursor file never said {seq}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The sidecar writes its cursor file off the relay loop. A write that
/// fails stops the relay with an error naming the file (reported by the
/// next settle, or by the stop), and loses nothing: the store prunes only
/// what the file names, and the next sidecar ships everything after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_file_that_cannot_be_written_stops_the_relay_and_loses_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    common::emit_each(&store, 0..10)?;
    let relay = Relay::builder_for(SidecarSource::open(&path, Duration::from_millis(5))?)
        .sink(Collect(seen.clone()))
        .start()?;
    relay.wait_delivered(10, Duration::from_secs(30)).await?;
    cursor_reaches(&path, 10).await?;

    // A folder where the cursor's temporary file goes: writes fail.
    let mut tmp = sidecar_cursor_path(&path).into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::create_dir(&tmp)?;
    common::emit_each(&store, 10..20)?;
    // The next cursor write fails on the writer's thread; a later settle
    // says so.
    let mut n = 20u8;
    while tokio::time::timeout(Duration::from_millis(100), relay.stopped())
        .await
        .is_err()
    {
        assert!(n < 200, "the relay never reported the failed write");
        common::emit_each(&store, n..n + 1)?;
        n += 1;
    }
    assert!(
        relay.delivered() < u64::from(n),
        "the failed settle is not counted"
    );
    // Once `stopped` answers, the relay lock is free: another sidecar
    // opens (and closes again) while the stopped relay's handle lives.
    drop(SidecarSource::open(&path, Duration::from_millis(5))?);
    match relay.shutdown(Shutdown::Now).await {
        Err(Error::Io { path, .. }) => assert_eq!(path, tmp),
        other => panic!("expected the cursor write's error, got {other:?}"),
    }
    assert_eq!(
        read_sidecar_cursor(&path)?.map(|c| c.delivered_through),
        Some(10),
        "the file keeps the last cursor written"
    );
    store.outbox().apply_relay_cursor()?;
    assert_eq!(store.outbox().tail(), 11, "pruned only what the file names");

    // The same failure when it is the last settle: the stop reports it.
    std::fs::remove_dir(&tmp)?;
    let second = Arc::new(Mutex::new(Vec::new()));
    let relay = Relay::builder_for(SidecarSource::open(&path, Duration::from_millis(5))?)
        .sink(Collect(second.clone()))
        .start()?;
    let all = u64::from(n);
    relay.wait_delivered(all, Duration::from_secs(30)).await?;
    cursor_reaches(&path, all).await?;
    let shipped = second.lock().clone();
    for seq in 11..=all {
        assert!(
            shipped.contains(&seq),
            "{seq} is after the file's cursor and was not shipped again: {shipped:?}"
        );
    }
    assert!(!shipped.contains(&10), "10 is in the file's cursor");
    std::fs::create_dir(&tmp)?;
    common::emit_each(&store, n..n + 1)?;
    relay
        .wait_delivered(all + 1, Duration::from_secs(30))
        .await?;
    assert!(
        matches!(relay.shutdown(Shutdown::Now).await, Err(Error::Io { .. })),
        "the stop reports the last cursor's failed write"
    );
    assert_eq!(
        read_sidecar_cursor(&path)?.map(|c| c.delivered_through),
        Some(all)
    );

    std::fs::remove_dir(&tmp)?;
    let relay = Relay::builder_for(SidecarSource::open(&path, Duration::from_millis(5))?)
        .sink(Collect(seen.clone()))
        .start()?;
    relay
        .wait_delivered(all + 1, Duration::from_secs(30))
        .await?;
    relay.shutdown(Shutdown::Now).await?;
    assert!(
        seen.lock().contains(&(all + 1)),
        "shipped again after the failed stop"
    );
    assert_eq!(
        read_sidecar_cursor(&path)?.map(|c| c.delivered_through),
        Some(all + 1),
        "written before the stop returned"
    );
    let mut seen = seen.lock().clone();
    seen.extend(second.lock().iter());
    for seq in 1..=all + 1 {
        assert!(seen.contains(&seq), "{seq} was never shipped: {seen:?}");
    }
    Ok(())
}
