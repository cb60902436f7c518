//! The sidecar wakes on the owner's log writes (Linux, inotify). Its own
//! test binary: it counts the process's watch and cursor-writer threads,
//! which other tests' sidecars would add to.
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use outboxkv::Store;
use outboxkv::relay::OutboxSource;
use outboxkv::relay::SidecarSource;

use common::TestResult;

/// On Linux the sidecar wakes on the owner's log writes: with a one-minute
/// catch-up interval it still sees a commit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_wakes_on_the_owners_writes_not_only_on_its_timer() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::open(&path)?;
    common::emit_each(&store, 0..1)?;
    let source = SidecarSource::open(&path, Duration::from_secs(60))?;
    assert_eq!(source.head()?, 1);
    for round in 0..3u8 {
        let head = source.head()?;
        let changed = tokio::spawn(source.changed(head));
        tokio::time::sleep(Duration::from_millis(20)).await;
        common::emit_each(&store, round..round + 1)?;
        tokio::time::timeout(Duration::from_secs(10), changed)
            .await
            .map_err(|_| format!("round {round}: no wake-up within 10 s"))??;
        assert_eq!(source.head()?, head + 1);
    }
    assert_eq!(threads_named(WATCH)?, 1);
    assert_eq!(threads_named(CURSOR)?, 1);
    // Close the owner first: nothing writes to the folder any more, so only
    // the sidecar's own shutdown can end its watching thread.
    drop(store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(source);
    // Its cursor writer and watching threads end with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while threads_named(CURSOR)? > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cursor writer outlived its sidecar"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while threads_named(WATCH)? > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the watch thread outlived its sidecar"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A new sidecar can take over (the first one's lock and watch are gone).
    let again = SidecarSource::open(&path, Duration::from_secs(60))?;
    assert_eq!(again.head()?, 4);
    Ok(())
}

/// The sidecar's log watcher and cursor writer threads, by name (Linux
/// truncates thread names to 15 bytes).
const WATCH: &str = "outboxkv-sideca";
const CURSOR: &str = "outboxkv-cfile";

/// Threads of this process named `name`.
fn threads_named(name: &str) -> std::io::Result<usize> {
    let mut n = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            n += 1;
        }
    }
    Ok(n)
}
