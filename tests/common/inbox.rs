//! The handler and the check the inbox broker tests share.
#![allow(dead_code)]

use std::collections::BTreeMap;

use outboxkv::inbox::{Inbox, InboxTx};
use outboxkv::{Error, Event, Store, Table};

use super::common::TestResult;

/// CloudEvents id of the consumed event -> times its effect was applied.
pub const EFFECTS: Table<str, u64> = Table::new("effects");

/// The handler: an event whose `n` is a multiple of 97 is poison; a
/// multiple of 7 fails on its first delivery (a nak, redelivered later and
/// out of order).
pub fn handler(tx: &mut InboxTx<'_, '_>) -> outboxkv::Result<()> {
    let event =
        tx.message().event.clone().ok_or_else(|| {
            Error::abort(format!("not a CloudEvent: {:?}", tx.message().event_error))
        })?;
    let body: serde_json::Value = serde_json::from_slice(&event.data).map_err(Error::abort)?;
    let n = body["n"].as_u64().ok_or_else(|| Error::abort("no n"))?;
    if n % 97 == 0 {
        return Err(Error::abort(format!("poison order {n}")));
    }
    if n % 7 == 0 && tx.message().attempt == 1 {
        return Err(Error::abort(format!("order {n}: try again")));
    }
    let count = tx.get_for_update(&EFFECTS, &event.id)?.unwrap_or(0);
    tx.put(&EFFECTS, &event.id, &(count + 1))?;
    tx.emit(Event::json("payment.reserved", n.to_string(), &body)?)
}

/// Checks the store: each distinct event applied once, each poison one
/// dead-lettered once, one emitted event per applied one.
pub fn check(store: &Store, ids: &[String]) -> TestResult {
    let effects: BTreeMap<String, u64> = store
        .range(&EFFECTS, ..)?
        .collect::<outboxkv::Result<_>>()?;
    let inbox = Inbox::new(store, "payments")?;
    let dead = inbox.dead_letters()?;
    let mut dead_ids: BTreeMap<String, usize> = BTreeMap::new();
    for d in &dead {
        let m = d.message();
        *dead_ids
            .entry(m.event.ok_or("dead letter is not a CloudEvent")?.id)
            .or_default() += 1;
        assert!(d.error.contains("poison order"), "{}", d.error);
    }
    for (i, id) in ids.iter().enumerate() {
        let n = i + 1;
        if n % 97 == 0 {
            assert_eq!(effects.get(id), None, "poison {n} applied");
            assert_eq!(dead_ids.get(id), Some(&1), "poison {n} dead letters");
        } else {
            assert_eq!(effects.get(id), Some(&1), "order {n} ({id})");
        }
    }
    assert_eq!(effects.len(), ids.len() - ids.len() / 97);
    assert_eq!(
        store.outbox().head(),
        effects.len() as u64,
        "one event per effect"
    );
    // The emitted events name what caused them.
    for e in store.outbox().read(1, 20)? {
        let cause = e.header("causationid").ok_or("no causationid")?;
        assert!(effects.contains_key(cause), "{cause}");
        assert_eq!(e.header("correlationid"), Some(cause));
    }
    Ok(())
}
