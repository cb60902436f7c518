//! Point reads, ranges in both directions, prefix scans and snapshots.

mod common;

use outboxkv::{Error, Store, Table};

use common::TestResult;

const NUMS: Table<i64, String> = Table::new("nums");
const NAMES: Table<str, u32> = Table::new("names");
const BY_CUSTOMER: Table<(String, u64), u64> = Table::new("orders.by_customer");

fn store() -> Result<(tempfile::TempDir, Store), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    Ok((dir, store))
}

fn keys<I: Iterator<Item = outboxkv::Result<(i64, String)>>>(it: I) -> outboxkv::Result<Vec<i64>> {
    it.map(|r| r.map(|(k, _)| k)).collect()
}

#[test]
fn ranges_forward_backward_and_both_ends() -> TestResult {
    let (_dir, store) = store()?;
    store.write(|tx| (-5i64..=5).try_for_each(|i| tx.put(&NUMS, &i, &format!("v{i}"))))?;

    assert_eq!(keys(store.range(&NUMS, ..)?)?, (-5..=5).collect::<Vec<_>>());
    assert_eq!(
        keys(store.range(&NUMS, ..)?.rev())?,
        (-5..=5).rev().collect::<Vec<_>>()
    );
    assert_eq!(keys(store.range(&NUMS, -2..2)?)?, vec![-2, -1, 0, 1]);
    assert_eq!(
        keys(store.range(&NUMS, -2..=2)?.rev())?,
        vec![2, 1, 0, -1, -2]
    );
    assert_eq!(keys(store.range(&NUMS, 3..)?)?, vec![3, 4, 5]);
    assert_eq!(keys(store.range(&NUMS, ..=-4)?)?, vec![-5, -4]);
    assert_eq!(
        keys(store.range(
            &NUMS,
            (std::ops::Bound::Excluded(0), std::ops::Bound::Excluded(3))
        )?)?,
        vec![1, 2]
    );
    #[allow(clippy::reversed_empty_ranges)]
    let empty = store.range(&NUMS, 4..2)?;
    assert_eq!(keys(empty)?, Vec::<i64>::new());

    // Alternating ends meet in the middle without repeating an item.
    let mut it = store.range(&NUMS, ..)?;
    let mut seen = Vec::new();
    loop {
        match it.next() {
            Some(r) => seen.push(r?.0),
            None => break,
        }
        match it.next_back() {
            Some(r) => seen.push(r?.0),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, (-5..=5).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn tables_do_not_see_each_other() -> TestResult {
    let (_dir, store) = store()?;
    const A: Table<u8, u8> = Table::new("a");
    const AB: Table<u8, u8> = Table::new("ab");
    store.write(|tx| {
        tx.put(&A, &1, &10)?;
        tx.put(&AB, &1, &20)?;
        tx.put(&AB, &2, &30)
    })?;
    assert_eq!(store.range(&A, ..)?.count(), 1);
    assert_eq!(store.range(&AB, ..)?.rev().count(), 2);
    assert_eq!(store.get(&A, &1)?, Some(10));
    assert_eq!(store.get(&A, &2)?, None);
    Ok(())
}

#[test]
fn string_keys_and_prefix_scans() -> TestResult {
    let (_dir, store) = store()?;
    store.write(|tx| {
        for (i, name) in ["bob", "al", "alice", "al\0x", ""].iter().enumerate() {
            tx.put(&NAMES, name, &(i as u32))?;
        }
        for (c, o) in [("ann", 3u64), ("ann", 1), ("annie", 2), ("bob", 4)] {
            tx.put(&BY_CUSTOMER, &(c.to_string(), o), &(o * 100))?;
        }
        Ok(())
    })?;
    let names: Vec<String> = store
        .range(&NAMES, "al".."b")?
        .map(|r| r.map(|(k, _)| k))
        .collect::<Result<_, _>>()?;
    assert_eq!(names, ["al", "al\0x", "alice"]);
    assert_eq!(store.get(&NAMES, "")?, Some(4));
    assert!(store.contains(&NAMES, "bob")?);
    assert!(!store.contains(&NAMES, "bo")?);

    let ann: Vec<(u64, u64)> = store
        .prefix(&BY_CUSTOMER, &("ann".to_string(),))?
        .map(|r| r.map(|((_, o), v)| (o, v)))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        ann,
        [(1, 100), (3, 300)],
        "'annie' must not match prefix 'ann'"
    );
    let last_ann = store
        .prefix(&BY_CUSTOMER, &("ann".to_string(),))?
        .next_back()
        .transpose()?;
    assert_eq!(last_ann.map(|(k, _)| k.1), Some(3));
    Ok(())
}

#[test]
fn snapshots_do_not_move() -> TestResult {
    let (_dir, store) = store()?;
    store.write(|tx| tx.put(&NUMS, &1, &"one".to_string()))?;
    let snap = store.snapshot();
    store.write(|tx| {
        tx.put(&NUMS, &1, &"uno".to_string())?;
        tx.put(&NUMS, &2, &"dos".to_string())?;
        Ok(())
    })?;
    assert_eq!(snap.get(&NUMS, &1)?.as_deref(), Some("one"));
    assert!(!snap.contains(&NUMS, &2)?);
    assert_eq!(keys(snap.range(&NUMS, ..)?)?, vec![1]);
    assert_eq!(keys(store.range(&NUMS, ..)?)?, vec![1, 2]);
    Ok(())
}

#[test]
fn transaction_reads_see_own_writes_and_a_fixed_snapshot() -> TestResult {
    let (_dir, store) = store()?;
    store.write(|tx| tx.put(&NUMS, &1, &"a".to_string()))?;
    let mut tx = store.begin();
    assert_eq!(tx.get(&NUMS, &1)?.as_deref(), Some("a"));
    store.write(|t| t.put(&NUMS, &1, &"b".to_string()))?;
    assert_eq!(
        tx.get(&NUMS, &1)?.as_deref(),
        Some("a"),
        "snapshot taken at first read"
    );
    tx.put(&NUMS, &1, &"c".to_string())?;
    assert_eq!(tx.get(&NUMS, &1)?.as_deref(), Some("c"));
    tx.delete(&NUMS, &1)?;
    assert!(!tx.contains(&NUMS, &1)?);
    drop(tx);
    assert_eq!(
        store.get(&NUMS, &1)?.as_deref(),
        Some("b"),
        "dropped transaction wrote nothing"
    );
    Ok(())
}

#[test]
fn invalid_table_names_are_rejected() -> TestResult {
    let (_dir, store) = store()?;
    const BAD: Table<u8, u8> = Table::new("has space");
    assert!(matches!(
        store.get(&BAD, &1),
        Err(Error::InvalidTableName { .. })
    ));
    let err = store.write(|tx| tx.put(&BAD, &1, &1)).err();
    assert!(matches!(err, Some(Error::InvalidTableName { ref name, .. }) if name == "has space"));
    Ok(())
}
