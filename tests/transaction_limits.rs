//! Limits on what transactions may hold: open transactions expire instead
//! of growing the conflict index without bound, no path leaves one
//! registered, oversized commits are refused whole, and seqs read from disk
//! are checked before any arithmetic.

mod common;

use std::time::Duration;

use outboxkv::{Error, Event, Key, Store, Table};

use common::TestResult;

const T: Table<u64, u64> = Table::new("t");

fn fill(store: &Store, from: u64, n: u64) -> outboxkv::Result<()> {
    for k in from..from + n {
        store.write(|tx| tx.put(&T, &k, &k))?;
    }
    Ok(())
}

#[test]
fn a_transaction_open_past_the_age_limit_fails_and_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_transaction_age(Duration::from_millis(50))
        .open(dir.path())?;
    let mut old = store.begin();
    assert_eq!(old.get_for_update(&T, &1)?, None);
    old.put(&T, &1, &1)?;
    old.emit(Event::bytes("t", "1", Vec::new()))?;
    let stats = store.transaction_stats();
    assert_eq!(stats.open, 1);
    std::thread::sleep(Duration::from_millis(80));
    assert!(store.transaction_stats().oldest_open_for >= Some(Duration::from_millis(80)));
    // Other commits go on meanwhile; one of them trims and expires `old`.
    fill(&store, 100, 5)?;
    let stats = store.transaction_stats();
    assert_eq!(stats.expired, 1);
    assert_eq!(stats.open, 1, "expired, but still open: it shows");
    assert_eq!(stats.conflict_index_keys, 0, "and holds no history");
    match old.commit() {
        Err(Error::TransactionExpired { open_for, limit }) => {
            assert!(open_for >= Duration::from_millis(80), "{open_for:?}");
            assert_eq!(limit, "max_transaction_age");
        }
        other => panic!("expected TransactionExpired, got {other:?}"),
    }
    assert_eq!(store.get(&T, &1)?, None);
    assert_eq!(store.outbox().head(), 0, "its event was not written");
    assert_eq!(store.transaction_stats().open, 0, "it ended");

    // Without any commit in between, the age is checked at commit too.
    let mut idle = store.begin();
    idle.get_for_update(&T, &2)?;
    idle.put(&T, &2, &2)?;
    std::thread::sleep(Duration::from_millis(80));
    assert!(matches!(
        idle.commit(),
        Err(Error::TransactionExpired { .. })
    ));

    // A transaction without reads to validate is not limited.
    let mut plain = store.begin();
    plain.get(&T, &3)?;
    plain.put(&T, &3, &3)?;
    std::thread::sleep(Duration::from_millis(80));
    plain.commit()?;
    assert_eq!(store.get(&T, &3)?, Some(3));
    Ok(())
}

#[test]
fn the_conflict_index_stays_bounded_while_a_transaction_is_left_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_conflict_index_keys(1_000)
        .open(dir.path())?;
    let mut forgotten = store.begin();
    forgotten.get_for_update(&T, &0)?;
    forgotten.put(&T, &0, &0)?;
    let mut peak = 0;
    for round in 0..20 {
        fill(&store, 1 + round * 500, 500)?;
        peak = peak.max(store.transaction_stats().conflict_index_keys);
    }
    assert!(peak <= 1_000, "the index held {peak} records (limit 1,000)");
    match forgotten.commit() {
        Err(Error::TransactionExpired { limit, .. }) => {
            assert_eq!(limit, "max_conflict_index_keys")
        }
        other => panic!("expected TransactionExpired, got {other:?}"),
    }
    assert_eq!(store.get(&T, &0)?, None);
    assert_eq!(store.transaction_stats().conflict_index_keys, 0);
    Ok(())
}

/// A key whose encoding panics on demand.
#[derive(Debug)]
struct Grumpy(bool);

impl Key for Grumpy {
    type Owned = Grumpy;
    fn encode_key(&self, out: &mut Vec<u8>) {
        assert!(!self.0, "grumpy key refuses to encode");
        out.push(1);
    }
    fn decode_key(input: &mut &[u8]) -> Result<Grumpy, outboxkv::KeyDecodeError> {
        let (_, rest) = input
            .split_first()
            .ok_or(outboxkv::KeyDecodeError("empty"))?;
        *input = rest;
        Ok(Grumpy(false))
    }
}

#[test]
fn no_path_leaves_a_transaction_registered() -> TestResult {
    const G: Table<Grumpy, u64> = Table::new("g");
    let dir = tempfile::tempdir()?;
    let store = Store::options().max_conflict_retries(0).open(dir.path())?;
    let open = || store.transaction_stats().open;

    // The closure returns an error after reading.
    let r = store.write(|tx| {
        tx.get_for_update(&T, &1)?;
        Err::<(), _>(Error::abort("no"))
    });
    assert!(matches!(r, Err(Error::Aborted(_))));
    assert_eq!(open(), 0, "after an aborting closure");

    // A `Key` impl panics in the middle of a transaction.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.write(|tx| {
            tx.get_for_update(&T, &1)?;
            tx.get_for_update(&G, &Grumpy(true))?;
            Ok(())
        })
    }));
    assert!(r.is_err(), "the key's panic propagates");
    assert_eq!(open(), 0, "after a panicking Key impl");

    // A conflict returned (no retries left).
    let mut a = store.begin();
    a.get_for_update(&T, &7)?;
    a.put(&T, &7, &1)?;
    store.write(|tx| tx.put(&T, &7, &2))?;
    assert!(matches!(a.commit(), Err(Error::Conflict { .. })));
    assert_eq!(open(), 0, "after a conflict");

    // A commit refused for size, and a transaction merely dropped.
    let mut b = Store::begin(&store);
    b.get_for_update(&T, &8)?;
    drop(b);
    assert_eq!(open(), 0, "after a drop");

    // An error from a commit with reads (too large).
    let small = tempfile::tempdir()?;
    let limited = Store::options()
        .max_transaction_bytes(4 << 10)
        .open(small.path())?;
    let r = limited.write(|tx| {
        tx.get_for_update(&T, &1)?;
        tx.emit(Event::bytes("big", "k", vec![0; 8 << 10]))
    });
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                what: "transaction",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(limited.transaction_stats().open, 0, "after TooLarge");
    assert_eq!(limited.outbox().head(), 0, "nothing of it was written");
    Ok(())
}

/// Seqs and bounds read from disk are checked: a stored `u64::MAX` is
/// corruption, not an overflow or a wrap.
#[test]
fn a_stored_seq_at_the_end_of_the_range_is_corruption() -> TestResult {
    use rocksdb::{ColumnFamilyDescriptor, DB, Options};
    for (cf, key, value) in [
        (
            "meta",
            b"outbox.pruned_through".to_vec(),
            u64::MAX.to_be_bytes().to_vec(),
        ),
        ("outbox", u64::MAX.to_be_bytes().to_vec(), vec![1, 2, 3]),
    ] {
        let dir = tempfile::tempdir()?;
        drop(Store::open(dir.path())?);
        {
            let cfs = ["tables", "outbox", "meta", "dead_letters"]
                .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
            let db = DB::open_cf_descriptors(&Options::default(), dir.path().join("db"), cfs)?;
            db.put_cf(db.cf_handle(cf).ok_or("cf")?, key, value)?;
        }
        match Store::open(dir.path()) {
            Err(Error::Corruption { reason, .. }) => {
                assert!(reason.contains("beyond the highest seq"), "{reason}")
            }
            other => panic!("{cf}: expected Corruption, got {other:?}"),
        }
    }
    Ok(())
}

/// One commit with more keys than `max_conflict_index_keys` expires the
/// transactions open across it, however young: `Store::write` retries
/// those (on a fresh snapshot) instead of failing an unrelated request.
#[test]
fn a_bulk_import_expires_a_store_write_which_is_retried() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_conflict_index_keys(100)
        .open(dir.path())?;
    let mut runs = 0;
    let r = store.write(|tx| {
        runs += 1;
        let v = tx.get_for_update(&T, &1)?.unwrap_or(0);
        if runs == 1 {
            // Elsewhere in the service (the same thread here, to be
            // deterministic): an import of 1,000 unrelated rows.
            let mut b = store.batch();
            for k in 1_000..2_000u64 {
                b.put(&T, &k, &k)?;
            }
            b.commit()?;
        }
        tx.put(&T, &1, &(v + 1))
    });
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(runs, 2, "the first attempt expired and was retried");
    assert_eq!(store.transaction_stats().expired, 1);
    assert_eq!(store.get(&T, &1)?, Some(1));
    Ok(())
}

/// An expiry found at commit (no trim expired the transaction before) is
/// counted like the others.
#[test]
fn an_expiry_found_at_commit_is_counted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_transaction_age(Duration::from_millis(20))
        .open(dir.path())?;
    let mut idle = store.begin();
    idle.get_for_update(&T, &2)?;
    idle.put(&T, &2, &2)?;
    std::thread::sleep(Duration::from_millis(40));
    assert!(matches!(
        idle.commit(),
        Err(Error::TransactionExpired {
            limit: "max_transaction_age",
            ..
        })
    ));
    assert_eq!(store.transaction_stats().expired, 1);
    Ok(())
}

/// A dead-letter replay is held to `max_transaction_bytes` like any commit
/// (an event with many headers counts them).
#[test]
fn a_replay_is_held_to_max_transaction_bytes_like_a_commit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut event = Event::bytes("t", "k", Vec::new());
    for _ in 0..64 {
        event = event.with_header("h", "v");
    }
    {
        let store = Store::open(dir.path())?;
        store.write(|tx| tx.emit(event.clone()))?;
        let outbox = store.outbox();
        let entry = outbox.read(1, 1)?.remove(0);
        assert_eq!(entry.encode().len(), 597);
        outbox.complete_through(
            1,
            &[outboxkv::DeadLetter {
                entry,
                error: "rejected".into(),
                attempts: 1,
                first_failed_micros: 0,
                dead_at_micros: 0,
            }],
        )?;
    }
    let store = Store::options()
        .max_transaction_bytes(300)
        .open(dir.path())?;
    let r = store.write(|tx| tx.emit(event.clone()));
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                what: "transaction",
                ..
            })
        ),
        "{r:?}"
    );
    let r = store.outbox().dead_letters().replay(&[1]);
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                what: "transaction",
                ..
            })
        ),
        "a 597-byte entry replayed under a 300-byte limit: {r:?}"
    );
    assert_eq!(
        store.outbox().dead_letters().count()?,
        1,
        "still a dead letter"
    );
    Ok(())
}

/// A waker may hold the last reference to a task that owns a transaction
/// (an executor that went away, a task holding one across
/// `outbox.changed().await`); dropping it takes the pipeline's lock, so
/// commits must not run wakers while they hold it (they once did, and
/// such a commit deadlocked itself and everyone behind it).
#[test]
fn a_waker_that_owns_a_transaction_does_not_deadlock_commits() -> TestResult {
    // Buffered commits announce their seqs from the leader, Sync ones from
    // the fsyncer: both paths.
    waker_owns_a_transaction(outboxkv::Durability::Buffered)?;
    waker_owns_a_transaction(outboxkv::Durability::Sync)
}

fn waker_owns_a_transaction(durability: outboxkv::Durability) -> TestResult {
    use std::future::Future;
    use std::sync::{Arc, Mutex, mpsc};
    use std::task::{Context, Wake, Waker};

    struct OwnsTx(#[allow(dead_code)] Mutex<Option<outboxkv::WriteTx<'static>>>);
    impl Wake for OwnsTx {
        fn wake(self: Arc<Self>) {} // drops `self`: the last reference
    }

    let dir = tempfile::tempdir()?;
    let store: &'static Store = Box::leak(Box::new(Store::open(dir.path())?));
    let mut tx = store.begin();
    tx.get_for_update(&T, &1)?; // registered as a reader
    let waker = Waker::from(Arc::new(OwnsTx(Mutex::new(Some(tx)))));
    let mut fut = Box::pin(store.outbox().changed(0));
    assert!(
        fut.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );
    drop(fut);
    drop(waker); // the notifier's clone is now the only one

    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || {
        let r = store.write(|w| {
            w.set_durability(durability);
            w.emit(Event::bytes("t", "k", Vec::new()))
        });
        let _ = done.send(r.map(|_| ()));
    });
    wait.recv_timeout(Duration::from_secs(10))
        .map_err(|_| "commit hung: the waker dropped a WriteTx under the pipeline lock")??;
    // And the store still commits.
    store.write(|w| w.put(&T, &2, &2))?;
    Ok(())
}
