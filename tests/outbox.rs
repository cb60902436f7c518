//! The outbox API: batches, pruning, waiting, backpressure and size limits.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use outboxkv::{Durability, Error, Event, Store, Table};

use common::TestResult;

const T: Table<u32, u32> = Table::new("t");

fn emit_n(store: &Store, n: usize) -> outboxkv::Result<()> {
    store.write(|tx| {
        (0..n).try_for_each(|i| tx.emit(Event::bytes("e", format!("k{}", i % 3), vec![0u8; 100])))
    })?;
    Ok(())
}

#[test]
fn entries_carry_what_was_emitted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let before = std::time::SystemTime::now();
    let c = store.write(|tx| {
        tx.emit(
            Event::json("orders.paid", "order-42", &serde_json::json!({"id": 42}))?
                .with_header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .with_header("x-tenant", "acme"),
        )?;
        tx.emit(
            Event::bytes("blobs", "b", vec![0, 159, 146, 150])
                .with_content_type("application/x-thing"),
        )
    })?;
    let ids: Vec<_> = c.event_ids().collect();
    let entries = store.outbox().read(1, 10)?;
    assert_eq!(entries.len(), 2);
    let e = &entries[0];
    assert_eq!((e.seq, e.id), (1, ids[0]));
    assert_eq!(e.id.store, store.id());
    assert_eq!(e.event_type, "orders.paid");
    assert_eq!(e.key, "order-42");
    assert_eq!(e.content_type, "application/json");
    assert_eq!(e.payload, br#"{"id":42}"#);
    assert_eq!(e.header("x-tenant"), Some("acme"));
    assert!(e.header("traceparent").is_some());
    assert!(e.created_at() >= before - Duration::from_secs(1));
    assert_eq!(entries[1].content_type, "application/x-thing");
    assert_eq!(entries[1].payload, vec![0, 159, 146, 150]);
    assert_eq!(store.outbox().get(2)?.map(|e| e.id), Some(ids[1]));
    Ok(())
}

#[test]
fn reads_in_batches_and_prunes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    emit_n(&store, 25)?;
    let outbox = store.outbox();
    let first = outbox.read(1, 10)?;
    assert_eq!(
        first.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    let by_bytes = outbox.read_limited(11, 100, 1)?;
    assert_eq!(
        by_bytes.len(),
        1,
        "at least one entry, then the byte limit stops"
    );
    let by_bytes = outbox.read_limited(11, 100, 3 * 150)?;
    assert!(
        by_bytes.len() >= 2 && by_bytes.len() <= 4,
        "{}",
        by_bytes.len()
    );

    assert_eq!(outbox.prune_through(10)?, 11);
    assert_eq!((outbox.tail(), outbox.head(), outbox.depth()), (11, 25, 15));
    assert_eq!(outbox.read(1, 5)?[0].seq, 11, "reads start at the tail");
    assert_eq!(outbox.get(3)?, None);
    assert_eq!(
        outbox.prune_through(4)?,
        11,
        "pruning below the tail is a no-op"
    );
    assert_eq!(outbox.prune_through(1_000)?, 26, "clamped to the head");
    assert!(outbox.read(0, 100)?.is_empty());
    Ok(())
}

#[test]
fn a_blocked_reader_wakes_on_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let outbox = store.outbox();
    let waiter = thread::spawn(move || {
        let start = Instant::now();
        let head = outbox.wait_beyond(0, Duration::from_secs(30));
        (head, start.elapsed())
    });
    thread::sleep(Duration::from_millis(50));
    emit_n(&store, 1)?;
    let (head, waited) = waiter.join().map_err(|_| "waiter panicked")?;
    assert_eq!(head, 1);
    assert!(
        waited < Duration::from_secs(30),
        "woken by the commit, not the timeout"
    );
    // Nothing new: the wait ends at the timeout with the same head.
    assert_eq!(store.outbox().wait_beyond(1, Duration::from_millis(10)), 1);
    Ok(())
}

struct ThreadWaker(thread::Thread);
impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A minimal executor: polls, parks until woken.
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        thread::park();
    }
}

#[test]
fn the_head_changed_future_resolves_on_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let writer = store.clone();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        emit_n(&writer, 3)
    });
    let head = block_on(store.outbox().changed(0));
    assert_eq!(
        head, 3,
        "all three events of the commit are visible at once"
    );
    t.join().map_err(|_| "writer panicked")??;
    Ok(())
}

#[test]
fn a_full_outbox_rejects_the_commit_and_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_outbox_depth(Some(3))
        .open(dir.path())?;
    emit_n(&store, 3)?;
    let r = store.write(|tx| {
        tx.put(&T, &1, &1)?;
        tx.emit(Event::bytes("e", "k", Vec::new()))
    });
    match r {
        Err(Error::OutboxFull {
            depth: 3,
            adding: 1,
            limit: 3,
        }) => {}
        other => panic!("expected OutboxFull, got {other:?}"),
    }
    assert_eq!(
        store.get(&T, &1)?,
        None,
        "state of the rejected commit is not written"
    );
    // State-only commits still work while the outbox is full.
    store.write(|tx| tx.put(&T, &2, &2))?;
    store.outbox().prune_through(1)?;
    store.write(|tx| tx.emit(Event::bytes("e", "k", Vec::new())))?;
    assert_eq!(store.outbox().head(), 4);
    Ok(())
}

#[test]
fn size_limits_are_enforced_with_typed_errors() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_key_size(8)
        .max_value_size(64)
        .max_event_size(128)
        .open(dir.path())?;
    const S: Table<str, Vec<u8>> = Table::new("s");
    let r = store.write(|tx| tx.put(&S, "a-much-too-long-key", &Vec::new()));
    assert!(
        matches!(r, Err(Error::TooLarge { what: "key", .. })),
        "{r:?}"
    );
    let r = store.write(|tx| tx.put(&S, "k", &vec![7u8; 100]));
    match r {
        Err(Error::TooLarge {
            what: "value",
            location,
            limit: 64,
            ..
        }) => assert!(location.contains("\"s\"")),
        other => panic!("expected TooLarge value, got {other:?}"),
    }
    let r = store.write(|tx| tx.emit(Event::bytes("e", "k", vec![0u8; 200])));
    assert!(
        matches!(r, Err(Error::TooLarge { what: "event", .. })),
        "{r:?}"
    );
    let r = store.write(|tx| tx.emit(Event::bytes("", "k", Vec::new())));
    assert!(matches!(r, Err(Error::InvalidEvent { .. })), "{r:?}");
    let r = store.write(|tx| tx.emit(Event::bytes("has space", "k", Vec::new())));
    assert!(matches!(r, Err(Error::InvalidEvent { .. })), "{r:?}");
    assert_eq!(store.outbox().head(), 0);
    assert_eq!(store.range(&S, ..)?.count(), 0);
    Ok(())
}

#[test]
fn long_and_short_prunes_leave_exactly_the_rest() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(outboxkv::Durability::Buffered)
        .open(dir.path())?;
    emit_n(&store, 1000)?;
    let outbox = store.outbox();
    // 600 entries: one range delete; then 3: point deletes; then the rest.
    for (through, next) in [(600u64, 601u64), (603, 604), (1000, 1001)] {
        assert_eq!(outbox.prune_through(through)?, next);
        let rest = outbox.read(0, usize::MAX)?;
        assert_eq!(rest.len() as u64, 1000 - through);
        assert_eq!(
            rest.first().map(|e| e.seq),
            (through < 1000).then_some(next)
        );
    }
    drop(outbox);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!((store.outbox().tail(), store.outbox().head()), (1001, 1000));
    Ok(())
}

/// After a reopen the durable head is the head (what RocksDB recovered is
/// on disk, see `the_open_flushes_what_it_recovers`), and draining the
/// recovered backlog needs no fsync (with failpoints: every later fsync
/// fails, yet `make_durable` of the backlog succeeds).
#[test]
fn a_reopened_store_starts_with_what_it_recovered_durable() -> TestResult {
    for pipelined in [true, false] {
        let dir = tempfile::tempdir()?;
        let open = || {
            Store::options()
                .durability(Durability::Buffered)
                .pipelined_fsync(pipelined)
                .open(dir.path())
        };
        {
            let store = open()?;
            for i in 0..50u8 {
                store.write(|tx| tx.emit(Event::bytes("e", "k", vec![i])))?;
            }
            assert_eq!(store.outbox().durable_head(), 0, "pipelined {pipelined}");
        }
        let store = open()?;
        let outbox = store.outbox();
        assert_eq!(outbox.head(), 50);
        assert_eq!(outbox.durable_head(), 50, "pipelined {pipelined}");
        #[cfg(feature = "failpoints")]
        store.fail_fsyncs_after(0);
        for through in [1, 25, 50] {
            outbox.make_durable(through)?;
        }
        assert_eq!(outbox.durable_head(), 50);
        // What comes after the reopen is not durable until an fsync.
        store.write(|tx| tx.emit(Event::bytes("e", "k", vec![])))?;
        assert_eq!(outbox.durable_head(), 50, "pipelined {pipelined}");
        #[cfg(feature = "failpoints")]
        assert!(
            outbox.make_durable(51).is_err(),
            "the fsync failpoint is armed: a new fsync must fail"
        );
        #[cfg(not(feature = "failpoints"))]
        {
            outbox.make_durable(51)?;
            assert_eq!(outbox.durable_head(), 51);
        }
    }
    Ok(())
}

/// What makes a recovered backlog durable is RocksDB's recovery flush
/// (`avoid_flush_during_recovery` false): the store starts its durable
/// head at the head on the strength of it. Pinned here from the OPTIONS
/// file RocksDB writes, so a change of that option cannot go unnoticed.
#[test]
fn the_open_flushes_what_it_recovers() -> TestResult {
    let dir = tempfile::tempdir()?;
    drop(Store::open(dir.path())?);
    let mut newest = None;
    for e in std::fs::read_dir(dir.path().join("db"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("OPTIONS-") {
            let n: u64 = n.parse()?;
            if newest.as_ref().is_none_or(|(m, _)| n > *m) {
                newest = Some((n, name));
            }
        }
    }
    let (_, name) = newest.ok_or("RocksDB wrote no OPTIONS file")?;
    let text = std::fs::read_to_string(dir.path().join("db").join(name))?;
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("avoid_flush_during_recovery="))
        .ok_or("no avoid_flush_during_recovery in the OPTIONS file")?;
    assert_eq!(value, "false", "the open must flush what it recovers");
    Ok(())
}

#[test]
fn durable_head_follows_the_fsyncs() -> TestResult {
    for pipelined in [true, false] {
        let dir = tempfile::tempdir()?;
        let store = Store::options()
            .durability(Durability::Buffered)
            .pipelined_fsync(pipelined)
            .open(dir.path())?;
        let outbox = store.outbox();
        let emit = |d: Durability| {
            store.write(|tx| {
                tx.set_durability(d);
                tx.emit(Event::bytes("e", "k", vec![]))
            })
        };
        emit(Durability::Buffered)?;
        emit(Durability::Buffered)?;
        assert_eq!(outbox.durable_head(), 0, "pipelined {pipelined}");
        // One fsync covers every commit written before it.
        emit(Durability::Sync)?;
        assert_eq!(outbox.durable_head(), 3, "pipelined {pipelined}");
        emit(Durability::Buffered)?;
        assert_eq!(outbox.durable_head(), 3);
        outbox.make_durable(4)?;
        assert_eq!(outbox.durable_head(), 4);
        // Already durable: no fsync needed, nothing changes.
        outbox.make_durable(2)?;
        assert_eq!(outbox.durable_head(), 4);
    }
    Ok(())
}
