//! Model-based test: random transactions, failures, prunes, reopens and
//! injected storage faults (failed fsyncs, failed writes, crashes right
//! after a write) against an in-memory model (a BTreeMap for the table, a
//! Vec for the outbox, and the durable head apart from the head). After
//! every step the store must equal the model exactly.
//!
//! The faults go through the store's storage seam (`Store::inject`): a
//! `Fail` leaves the medium untouched, a `CrashAfter` lets the write (or
//! fsync) reach it and then behaves as a process that died right after.
//! Either poisons the store; the model then reopens it and expects the
//! commit (or prune) present exactly when its write reached the medium. A
//! crash here is a process crash: what was written but not fsynced is still
//! in the page cache, so it survives; a power loss is not simulated.

use std::collections::BTreeMap;
use std::path::Path;

use outboxkv::{Durability, Error, Event, Store, Table};
#[cfg(feature = "failpoints")]
use outboxkv::{Failpoint, Fault, WriteOutcome};
use proptest::prelude::*;

const T: Table<u16, u32> = Table::new("model");

#[derive(Debug, Clone)]
enum Action {
    Put(u16, u32),
    Delete(u16),
    Emit(u16, Vec<u8>),
}

#[derive(Debug, Clone)]
enum Step {
    /// Run the actions in `Store::write` and commit.
    Commit(Vec<Action>, bool),
    /// Run the actions, then abort from inside the closure.
    Abort(Vec<Action>),
    /// Read a key for update, let another commit change it, then commit:
    /// must fail with `Conflict` and write nothing of its own.
    Conflict(u16, Vec<Action>),
    /// The same actions through a blind-write batch.
    Batch(Vec<Action>),
    /// Prune the outbox through `head - keep`.
    Prune(u8),
    /// Reopen, with the fsync pipelined or not.
    Reopen(bool),
    /// `Outbox::make_durable` through the head (what the relay does before
    /// it ships).
    MakeDurable,
    /// An injected storage fault (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    Fault(FaultStep),
}

#[cfg(feature = "failpoints")]
#[derive(Debug, Clone)]
enum FaultStep {
    /// A `Sync` commit whose write-ahead-log fsync gets `Fault`.
    Fsync(Vec<Action>, Fault),
    /// A commit whose group write gets `Fault`, with `Sync` durability or not.
    Commit(Vec<Action>, bool, Fault),
    /// A prune through `head - keep` whose write gets `Fault`.
    Prune(u8, Fault),
}

#[cfg(feature = "failpoints")]
fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![Just(Fault::Fail), Just(Fault::CrashAfter)]
}

#[cfg(feature = "failpoints")]
fn fault_step() -> impl Strategy<Value = Step> {
    let actions = || prop::collection::vec(action(), 0..6);
    prop_oneof![
        (actions(), fault()).prop_map(|(a, f)| FaultStep::Fsync(a, f)),
        (actions(), any::<bool>(), fault()).prop_map(|(a, sync, f)| FaultStep::Commit(a, sync, f)),
        (any::<u8>(), fault()).prop_map(|(k, f)| FaultStep::Prune(k % 8, f)),
    ]
    .prop_map(Step::Fault)
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0u16..24, any::<u32>()).prop_map(|(k, v)| Action::Put(k, v)),
        1 => (0u16..24).prop_map(Action::Delete),
        2 => (0u16..24, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, p)| Action::Emit(k, p)),
    ]
}

fn step() -> BoxedStrategy<Step> {
    let actions = || prop::collection::vec(action(), 0..6);
    let steps = prop_oneof![
        6 => (actions(), any::<bool>()).prop_map(|(a, sync)| Step::Commit(a, sync)),
        1 => actions().prop_map(Step::Abort),
        1 => (0u16..24, actions()).prop_map(|(k, a)| Step::Conflict(k, a)),
        2 => actions().prop_map(Step::Batch),
        1 => any::<u8>().prop_map(|k| Step::Prune(k % 8)),
        1 => any::<bool>().prop_map(Step::Reopen),
        1 => Just(Step::MakeDurable),
    ];
    #[cfg(feature = "failpoints")]
    let steps = prop_oneof![13 => steps, 3 => fault_step()];
    steps.boxed()
}

#[derive(Default, Debug)]
struct Model {
    table: BTreeMap<u16, u32>,
    /// Every event ever committed, index i = seq i + 1.
    events: Vec<(u16, Vec<u8>)>,
    pruned_through: u64,
    /// The durable head: every seq up to it was covered by an fsync (the
    /// head after a reopen: the open fsyncs what it recovered). `Buffered`
    /// commits never move it.
    durable: u64,
    /// Whether the store open now pipelines its fsyncs.
    pipelined: bool,
}

impl Model {
    fn apply(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Put(k, v) => {
                    self.table.insert(*k, *v);
                }
                Action::Delete(k) => {
                    self.table.remove(k);
                }
                Action::Emit(k, p) => self.events.push((*k, p.clone())),
            }
        }
    }
}

fn stage(tx: &mut outboxkv::WriteTx<'_>, actions: &[Action]) -> outboxkv::Result<()> {
    for a in actions {
        match a {
            Action::Put(k, v) => tx.put(&T, k, v)?,
            Action::Delete(k) => tx.delete(&T, k)?,
            Action::Emit(k, p) => {
                tx.emit(Event::bytes("model.changed", k.to_string(), p.clone()))?
            }
        }
    }
    Ok(())
}

fn check(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let fail = |e: Error| TestCaseError::fail(e.to_string());
    let table: BTreeMap<u16, u32> = store
        .range(&T, ..)
        .map_err(fail)?
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    prop_assert_eq!(&table, &model.table);
    let outbox = store.outbox();
    prop_assert_eq!(outbox.head(), model.events.len() as u64);
    // Durable and buffered commits apart: the durable head is what the
    // open and the `Sync` commits since made durable, never more.
    prop_assert_eq!(outbox.durable_head(), model.durable, "durable head");
    prop_assert_eq!(outbox.tail(), model.pruned_through + 1);
    let entries = outbox.read(0, usize::MAX).map_err(fail)?;
    let expected = &model.events[model.pruned_through as usize..];
    prop_assert_eq!(entries.len(), expected.len());
    for (i, (entry, (key, payload))) in entries.iter().zip(expected).enumerate() {
        let seq = model.pruned_through + 1 + i as u64;
        prop_assert_eq!(entry.seq, seq);
        prop_assert_eq!(entry.id.seq, seq);
        prop_assert_eq!(entry.id.store, store.id());
        prop_assert_eq!(&entry.key, &key.to_string());
        prop_assert_eq!(&entry.payload, payload);
    }
    Ok(())
}

fn open(path: &Path, pipelined: bool) -> Result<Store, TestCaseError> {
    Store::options()
        .durability(Durability::Buffered)
        .pipelined_fsync(pipelined)
        .max_conflict_retries(0)
        .open(path)
        .map_err(|e| TestCaseError::fail(e.to_string()))
}

/// Commits `actions` (with `Sync` durability if `sync`); returns what
/// `Store::write` returned, the commit's seqs on success.
fn commit(store: &Store, actions: &[Action], sync: bool) -> outboxkv::Result<std::ops::Range<u64>> {
    store
        .write(|tx| {
            if sync {
                tx.set_durability(Durability::Sync);
            }
            stage(tx, actions)
        })
        .map(|c| c.seqs)
}

/// What a commit that ran into an injected fault must leave: poisoned,
/// with an unknown outcome (the write may have reached the log).
#[cfg(feature = "failpoints")]
fn expect_poisoned<T: std::fmt::Debug>(r: &outboxkv::Result<T>) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(
            r,
            Err(Error::Poisoned {
                outcome: WriteOutcome::Unknown,
                ..
            })
        ),
        "expected a poisoned store with an unknown outcome, got {:?}",
        r
    );
    Ok(())
}

impl Model {
    /// Applies a successful commit of `actions` that returned `seqs`.
    fn committed(
        &mut self,
        actions: &[Action],
        sync: bool,
        seqs: std::ops::Range<u64>,
    ) -> Result<(), TestCaseError> {
        let before = self.events.len() as u64;
        self.apply(actions);
        let emitted = self.events.len() as u64 - before;
        if emitted > 0 {
            prop_assert_eq!(seqs, before + 1..before + 1 + emitted);
        } else {
            prop_assert!(seqs.is_empty());
        }
        // A `Sync` commit that wrote anything: a pipelined fsync covers
        // every seq written before it; a synced group write (fsync not
        // pipelined) raises the durable head to its own last seq.
        if sync && !actions.is_empty() && (self.pipelined || emitted > 0) {
            self.durable = self.events.len() as u64;
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let fail = |e: Error| TestCaseError::fail(e.to_string());
        let mut pipelined = true;
        let mut store = open(dir.path(), pipelined)?;
        let mut model = Model { pipelined, ..Model::default() };
        for step in steps {
            match step {
                Step::Commit(actions, sync) => {
                    let seqs = commit(&store, &actions, sync).map_err(fail)?;
                    model.committed(&actions, sync, seqs)?;
                }
                Step::Abort(actions) => {
                    let r = store.write(|tx| {
                        stage(tx, &actions)?;
                        Err::<(), _>(Error::abort("changed my mind"))
                    });
                    prop_assert!(matches!(r, Err(Error::Aborted(_))));
                }
                Step::Conflict(key, actions) => {
                    let mut tx = store.begin();
                    let _ = tx.get_for_update(&T, &key).map_err(fail)?;
                    stage(&mut tx, &actions).map_err(fail)?;
                    let other = vec![Action::Put(key, 7)];
                    store.write(|t| stage(t, &other)).map_err(fail)?;
                    model.apply(&other);
                    let r = tx.commit();
                    if actions.is_empty() {
                        // Read-only: nothing to validate, serializable at its snapshot.
                        prop_assert!(r.is_ok(), "{:?}", r);
                    } else {
                        prop_assert!(matches!(r, Err(Error::Conflict { .. })), "{:?}", r);
                    }
                }
                Step::Batch(actions) => {
                    let mut b = store.batch();
                    for a in &actions {
                        match a {
                            Action::Put(k, v) => b.put(&T, k, v).map_err(fail)?,
                            Action::Delete(k) => b.delete(&T, k).map_err(fail)?,
                            Action::Emit(k, p) => b.emit(Event::bytes("model.changed", k.to_string(), p.clone())).map_err(fail)?,
                        }
                    }
                    b.commit().map_err(fail)?;
                    model.apply(&actions);
                }
                Step::Prune(keep) => {
                    let head = model.events.len() as u64;
                    let through = head.saturating_sub(u64::from(keep));
                    store.outbox().prune_through(through).map_err(fail)?;
                    model.pruned_through = model.pruned_through.max(through);
                }
                Step::Reopen(p) => {
                    drop(store);
                    pipelined = p;
                    store = open(dir.path(), pipelined)?;
                    model.durable = model.events.len() as u64;
                    model.pipelined = p;
                }
                Step::MakeDurable => {
                    let head = store.outbox().head();
                    store.outbox().make_durable(head).map_err(fail)?;
                    model.durable = model.durable.max(head);
                }
                #[cfg(feature = "failpoints")]
                Step::Fault(step) => {
                    if run_fault(step, &store, &mut model)? {
                        // Poisoned: what a restarted process finds.
                        drop(store);
                        store = open(dir.path(), pipelined)?;
                        model.durable = model.events.len() as u64;
                    }
                }
            }
            check(&store, &model)?;
        }
    }
}

/// Runs a fault step; `Ok(true)` when it poisoned the store (the caller
/// reopens it). Before that, the poisoned store must refuse every write and
/// must not have published the failed commit (its head and durable head
/// are where the model has them without it).
#[cfg(feature = "failpoints")]
fn run_fault(step: FaultStep, store: &Store, model: &mut Model) -> Result<bool, TestCaseError> {
    let before = (store.outbox().head(), store.outbox().durable_head());
    let poisoned = |store: &Store, model: &Model| -> Result<(), TestCaseError> {
        let again = store.write(|tx| tx.put(&T, &0, &0));
        prop_assert!(
            matches!(
                again,
                Err(Error::Poisoned {
                    outcome: WriteOutcome::NotWritten,
                    ..
                })
            ),
            "a poisoned store took a write: {:?}",
            again
        );
        prop_assert_eq!(
            store.outbox().head(),
            model.events.len() as u64,
            "head after the fault"
        );
        prop_assert_eq!(
            store.outbox().durable_head(),
            model.durable,
            "durable head after the fault"
        );
        Ok(())
    };
    match step {
        FaultStep::Fsync(actions, f) => {
            store.inject(Failpoint::WalSync, 0, Some(f));
            let r = commit(store, &actions, true);
            store.inject(Failpoint::WalSync, 0, None);
            match r {
                Ok(seqs) => {
                    // Nothing to fsync (no writes), or fsynced by the
                    // group's own write (fsync not pipelined).
                    prop_assert!(actions.is_empty() || !model.pipelined, "{:?}", seqs);
                    model.committed(&actions, true, seqs)?;
                    Ok(false)
                }
                Err(_) => {
                    expect_poisoned(&r)?;
                    prop_assert!(!actions.is_empty() && model.pipelined, "{:?}", r);
                    prop_assert_eq!(
                        before,
                        (store.outbox().head(), store.outbox().durable_head())
                    );
                    poisoned(store, model)?;
                    // Written before the fsync (which failed or "crashed"):
                    // the restarted process has it.
                    model.apply(&actions);
                    Ok(true)
                }
            }
        }
        FaultStep::Commit(actions, sync, f) => {
            store.inject(Failpoint::CommitWrite, 0, Some(f));
            let r = commit(store, &actions, sync);
            store.inject(Failpoint::CommitWrite, 0, None);
            match r {
                Ok(seqs) => {
                    // Only a commit without writes skips the group write.
                    prop_assert!(actions.is_empty(), "{:?}", seqs);
                    model.committed(&actions, sync, seqs)?;
                    Ok(false)
                }
                Err(_) => {
                    expect_poisoned(&r)?;
                    poisoned(store, model)?;
                    if f == Fault::CrashAfter {
                        model.apply(&actions);
                    }
                    Ok(true)
                }
            }
        }
        FaultStep::Prune(keep, f) => {
            let head = model.events.len() as u64;
            let through = head.saturating_sub(u64::from(keep));
            store.inject(Failpoint::PruneWrite, 0, Some(f));
            let r = store.outbox().prune_through(through);
            store.inject(Failpoint::PruneWrite, 0, None);
            if through <= model.pruned_through {
                // At or below the tail - 1: nothing to write.
                prop_assert!(r.is_ok(), "{:?}", r);
                return Ok(false);
            }
            prop_assert!(matches!(r, Err(Error::Poisoned { .. })), "{:?}", r);
            // Refused to move the tail on a failed prune.
            prop_assert_eq!(store.outbox().tail(), model.pruned_through + 1);
            poisoned(store, model)?;
            if f == Fault::CrashAfter {
                model.pruned_through = through;
            }
            Ok(true)
        }
    }
}
