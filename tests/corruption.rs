//! Damaged values and outbox entries are reported as `Error::Corruption`
//! naming the table and key (or seq), never returned as garbage.

mod common;

use outboxkv::{Error, Event, Store, Table};
use rocksdb::{ColumnFamilyDescriptor, DB, Options};

use common::TestResult;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Order {
    status: String,
    total_cents: u64,
}

const ORDERS: Table<u64, Order> = Table::new("orders");

/// Flips one byte of every value in a column family, through raw RocksDB.
fn flip_last_byte(path: &std::path::Path, cf_name: &str) -> TestResult {
    let cfs = ["tables", "outbox", "meta", "dead_letters"]
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = DB::open_cf_descriptors(&Options::default(), path.join("db"), cfs)?;
    let cf = db.cf_handle(cf_name).ok_or("missing column family")?;
    let mut changed = Vec::new();
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    while let Some((k, v)) = it.item() {
        let mut v = v.to_vec();
        if let Some(last) = v.last_mut() {
            *last ^= 0x01;
        }
        changed.push((k.to_vec(), v));
        it.next();
    }
    drop(it);
    for (k, v) in changed {
        db.put_cf(cf, k, v)?;
    }
    Ok(())
}

#[test]
fn a_flipped_value_byte_is_corruption_naming_table_and_key() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = Store::open(dir.path())?;
        store.write(|tx| {
            tx.put(
                &ORDERS,
                &42,
                &Order {
                    status: "paid".into(),
                    total_cents: 1999,
                },
            )
        })?;
    }
    flip_last_byte(dir.path(), "tables")?;
    let store = Store::open(dir.path())?;
    match store.get(&ORDERS, &42) {
        Err(Error::Corruption { location, reason }) => {
            assert!(
                location.contains("\"orders\"") && location.contains("42"),
                "{location}"
            );
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let items: Vec<_> = store.range(&ORDERS, ..)?.collect();
    assert_eq!(items.len(), 1);
    assert!(matches!(items[0], Err(Error::Corruption { .. })));
    // The damaged value can be overwritten (repair), and reads work again.
    store.write(|tx| {
        tx.put(
            &ORDERS,
            &42,
            &Order {
                status: "repaired".into(),
                total_cents: 0,
            },
        )
    })?;
    assert_eq!(
        store.get(&ORDERS, &42)?.map(|o| o.status),
        Some("repaired".into())
    );
    Ok(())
}

#[test]
fn a_value_of_another_type_is_corruption_not_garbage() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    const AS_TEXT: Table<u64, String> = Table::new("orders");
    store.write(|tx| tx.put(&AS_TEXT, &1, &"x".repeat(3)))?;
    assert!(matches!(
        store.get(&ORDERS, &1),
        Err(Error::Corruption { .. })
    ));
    Ok(())
}

#[test]
fn a_flipped_outbox_byte_is_corruption_naming_the_seq() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = Store::open(dir.path())?;
        store.write(|tx| tx.emit(Event::bytes("e", "k", b"payload".to_vec())))?;
    }
    flip_last_byte(dir.path(), "outbox")?;
    let store = Store::open(dir.path())?;
    match store.outbox().read(1, 10) {
        Err(Error::Corruption { location, .. }) => assert_eq!(location, "outbox seq 1"),
        other => panic!("expected corruption, got {other:?}"),
    }
    Ok(())
}
