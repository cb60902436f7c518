//! Model-based test: random transactions, failures, prunes and reopens
//! against an in-memory model (a BTreeMap for the table, a Vec for the
//! outbox). After every step the store must equal the model exactly.

use std::collections::BTreeMap;
use std::path::Path;

use outboxkv::{Durability, Error, Event, Store, Table};
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
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0u16..24, any::<u32>()).prop_map(|(k, v)| Action::Put(k, v)),
        1 => (0u16..24).prop_map(Action::Delete),
        2 => (0u16..24, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, p)| Action::Emit(k, p)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let actions = || prop::collection::vec(action(), 0..6);
    prop_oneof![
        6 => (actions(), any::<bool>()).prop_map(|(a, sync)| Step::Commit(a, sync)),
        1 => actions().prop_map(Step::Abort),
        1 => (0u16..24, actions()).prop_map(|(k, a)| Step::Conflict(k, a)),
        2 => actions().prop_map(Step::Batch),
        1 => any::<u8>().prop_map(|k| Step::Prune(k % 8)),
        1 => Just(Step::Reopen),
    ]
}

#[derive(Default, Debug)]
struct Model {
    table: BTreeMap<u16, u32>,
    /// Every event ever committed, index i = seq i + 1.
    events: Vec<(u16, Vec<u8>)>,
    pruned_through: u64,
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

fn open(path: &Path) -> Result<Store, TestCaseError> {
    Store::options()
        .durability(Durability::Buffered)
        .max_conflict_retries(0)
        .open(path)
        .map_err(|e| TestCaseError::fail(e.to_string()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let fail = |e: Error| TestCaseError::fail(e.to_string());
        let mut store = open(dir.path())?;
        let mut model = Model::default();
        for step in steps {
            match step {
                Step::Commit(actions, sync) => {
                    let c = store.write(|tx| {
                        if sync { tx.set_durability(Durability::Sync); }
                        stage(tx, &actions)
                    }).map_err(fail)?;
                    let before = model.events.len() as u64;
                    model.apply(&actions);
                    let emitted = model.events.len() as u64 - before;
                    if emitted > 0 {
                        prop_assert_eq!(c.seqs, before + 1..before + 1 + emitted);
                    } else {
                        prop_assert!(c.seqs.is_empty());
                    }
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
                Step::Reopen => {
                    drop(store);
                    store = open(dir.path())?;
                }
            }
            check(&store, &model)?;
        }
    }
}
