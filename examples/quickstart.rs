//! A small orders service: creates and updates orders, emitting an event in
//! the same atomic commit as each state change; shows the outbox; then a relay
//! ships the events to a JSON Lines file (CloudEvents) and prunes them.
//!
//! Run: `cargo run --release --example quickstart [DATA_DIR]`
//! (without DATA_DIR it uses a fresh temporary directory).

use std::time::Duration;

use outboxkv::relay::{Relay, Shutdown};
use outboxkv::sink::FileSink;
use outboxkv::{Error, Event, Store, Table};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum Status {
    Created,
    Paid,
    Shipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    customer: String,
    total_cents: u64,
    status: Status,
}

/// Orders by id.
const ORDERS: Table<u64, Order> = Table::new("orders");
/// Secondary index: (customer, order id).
const BY_CUSTOMER: Table<(String, u64), ()> = Table::new("orders.by_customer");

fn create(store: &Store, id: u64, customer: &str, total_cents: u64) -> outboxkv::Result<()> {
    let order = Order {
        customer: customer.to_string(),
        total_cents,
        status: Status::Created,
    };
    store.write(|tx| {
        if tx.get_for_update(&ORDERS, &id)?.is_some() {
            return Err(Error::abort(format!("order {id} already exists")));
        }
        tx.put(&ORDERS, &id, &order)?;
        tx.put(&BY_CUSTOMER, &(order.customer.clone(), id), &())?;
        tx.emit(Event::json(
            "orders.created",
            format!("order-{id}"),
            &order,
        )?)
    })?;
    Ok(())
}

fn advance(store: &Store, id: u64, to: Status) -> outboxkv::Result<()> {
    store.write(|tx| {
        let mut order = tx
            .get_for_update(&ORDERS, &id)?
            .ok_or_else(|| Error::abort(format!("no order {id}")))?;
        order.status = to.clone();
        tx.put(&ORDERS, &id, &order)?;
        let event_type = match to {
            Status::Created => "orders.created",
            Status::Paid => "orders.paid",
            Status::Shipped => "orders.shipped",
        };
        tx.emit(Event::json(
            event_type,
            format!("order-{id}"),
            &serde_json::json!({ "id": id }),
        )?)
    })?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp;
    let path = match std::env::args_os().nth(1) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("orders")
        }
    };
    let store = Store::open(&path)?;
    println!("store {} at {}", store.id(), path.display());

    let base = store.outbox().head() * 10 + 1; // distinct ids when re-run on the same dir
    create(&store, base, "ann", 2_500)?;
    create(&store, base + 1, "bob", 990)?;
    create(&store, base + 2, "ann", 12_000)?;
    advance(&store, base, Status::Paid)?;
    advance(&store, base, Status::Shipped)?;
    advance(&store, base + 2, Status::Paid)?;
    if let Err(e) = create(&store, base + 1, "eve", 1) {
        println!("rejected as expected: {e}");
    }

    println!("\norders:");
    for row in store.range(&ORDERS, ..)? {
        let (id, o) = row?;
        println!(
            "  {id:>4}  {:<5} {:>8.2}  {:?}",
            o.customer,
            o.total_cents as f64 / 100.0,
            o.status
        );
    }
    let anns: Vec<u64> = store
        .prefix(&BY_CUSTOMER, &("ann".to_string(),))?
        .map(|r| r.map(|((_, id), ())| id))
        .collect::<Result<_, _>>()?;
    println!("ann's orders: {anns:?}");

    let outbox = store.outbox();
    println!(
        "\noutbox: seqs {}..={} ({} entries)",
        outbox.tail(),
        outbox.head(),
        outbox.depth()
    );
    for e in outbox.read(outbox.tail(), 100)? {
        println!(
            "  seq {:>3}  {:<15} key {:<9} id {}  {}",
            e.seq,
            e.event_type,
            e.key,
            e.id,
            String::from_utf8_lossy(&e.payload)
        );
    }
    // The relay ships the outbox (here to a file; the NATS sink works the
    // same way) and prunes what the sink acknowledged.
    let events_path = path.with_extension("events.jsonl");
    let relay = Relay::builder(&store)
        .sink(FileSink::open(&events_path)?)
        .start()?;
    relay.shutdown_blocking(Shutdown::Drain(Duration::from_secs(10)))?;
    println!(
        "\nrelay delivered through seq {}; outbox depth now {}; {}:",
        outbox.tail() - 1,
        outbox.depth(),
        events_path.display()
    );
    for line in std::fs::read_to_string(&events_path)?.lines().take(3) {
        println!("  {line}");
    }
    Ok(())
}
