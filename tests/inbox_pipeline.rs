//! `Inbox::submit`: a batch is ordered and visible before its fsync, so the
//! next one is handled and ordered while that fsync runs; the next
//! handler sees the earlier batch's writes without a conflict re-run, and
//! a failed fsync fails every batch not yet on disk.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::TestResult;
use outboxkv::inbox::{Inbox, InboxTx, Message, Outcome};
use outboxkv::{Durability, Error, Event, Failpoint, Store, Table};

const EFFECTS: Table<u64, u64> = Table::new("effects");

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Each message adds one to its own row and one to the row of the message
/// before it (so a handler that did not see the earlier batch's write
/// would leave that row short), and emits an event.
fn handler(runs: &AtomicU64) -> impl FnMut(&mut InboxTx<'_, '_>) -> outboxkv::Result<()> + '_ {
    move |tx| {
        runs.fetch_add(1, Ordering::SeqCst);
        let n = tx.message().position;
        let mine = tx.get_for_update(&EFFECTS, &n)?.unwrap_or(0);
        tx.put(&EFFECTS, &n, &(mine + 1))?;
        if n > 0 {
            let before = tx.get_for_update(&EFFECTS, &(n - 1))?.unwrap_or(0);
            tx.put(&EFFECTS, &(n - 1), &(before + 1))?;
        }
        tx.emit(Event::bytes("effect", n.to_string(), vec![1]))
    }
}

/// 50 batches, each submitted while the one before waits for its (slowed)
/// fsync and (slowed) write: every submit returns before its commit is
/// durable, every handler runs once, and every row ends at exactly 2
/// (its own message and the next one), the last at 1.
#[test]
fn the_next_batch_is_handled_while_the_last_one_is_fsynced() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Sync)
        .open(dir.path())?;
    let inbox = Inbox::new(&store, "c")?;
    let rt = runtime()?;
    let runs = AtomicU64::new(0);
    const N: u64 = 50;
    store.delay_fsyncs(Duration::from_millis(5));
    store.delay_at(Failpoint::CommitWrite, Duration::from_millis(2));
    let outbox = store.outbox();
    let mut ahead = 0u32;
    rt.block_on(async {
        let mut in_flight = None;
        for n in 0..N {
            let m = Message::new("S", 0, n, vec![]);
            let applying = inbox.submit(&[m], handler(&runs)).await?;
            if outbox.durable_head() < n + 1 {
                ahead += 1;
            }
            if let Some(earlier) = in_flight.replace(applying) {
                let earlier: outboxkv::inbox::Applying = earlier;
                assert_eq!(earlier.durable().await?, vec![Outcome::Applied]);
            }
        }
        if let Some(last) = in_flight {
            assert_eq!(last.durable().await?, vec![Outcome::Applied]);
        }
        Ok::<_, Error>(())
    })?;
    assert_eq!(runs.load(Ordering::SeqCst), N, "a handler ran again");
    for n in 0..N {
        let want = if n == N - 1 { 1 } else { 2 };
        assert_eq!(store.get(&EFFECTS, &n)?, Some(want), "row {n}");
    }
    assert_eq!(outbox.head(), N);
    assert_eq!(outbox.durable_head(), N);
    assert_eq!(inbox.position("S", 0)?.map(|p| p.next), Some(N));
    // Not a timing assertion: with every fsync slowed to 5 ms, a submit
    // that waited for its fsync would find its event durable every time.
    assert!(
        ahead >= N as u32 / 2,
        "only {ahead} of {N} submits returned before their fsync"
    );
    assert_eq!(inbox.metrics().applied(), N);
    Ok(())
}

/// An fsync that fails fails the `durable` of the batch it was for and of
/// the one ordered behind it: neither may be acknowledged.
#[test]
fn a_failed_fsync_fails_every_batch_not_yet_on_disk() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let inbox = Inbox::new(&store, "c")?;
    let rt = runtime()?;
    let runs = AtomicU64::new(0);
    store.delay_fsyncs(Duration::from_millis(20));
    store.fail_fsyncs_after(0);
    let (first, second) = rt.block_on(async {
        let first = inbox
            .submit(&[Message::new("S", 0, 0, vec![])], handler(&runs))
            .await?;
        let second = inbox
            .submit(&[Message::new("S", 0, 1, vec![])], handler(&runs))
            .await?;
        Ok::<_, Error>((first.durable().await, second.durable().await))
    })?;
    assert!(
        matches!(first, Err(Error::Poisoned { .. })),
        "first: {first:?}"
    );
    assert!(
        matches!(second, Err(Error::Poisoned { .. })),
        "second: {second:?}"
    );
    assert_eq!(inbox.metrics().applied(), 0, "counted as applied");
    // The second handler read the first batch's writes (visible before
    // the fsync failed) without a conflict re-run.
    assert_eq!(runs.load(Ordering::SeqCst), 2, "a handler ran again");
    Ok(())
}
