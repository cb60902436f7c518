//! The README's examples, written out in full: the API a user writes
//! against. The embedded example runs; the broker examples are compiled
//! only (the relay tests run them against real brokers), so a change of a
//! path or a signature they use fails this file's build.

mod common;

#[cfg(any(feature = "nats", feature = "kafka"))]
use std::time::Duration;

use common::TestResult;
use outboxkv::{Event, Store, Table};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq)]
enum Status {
    #[default]
    New,
    Paid,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
struct Order {
    status: Status,
}

#[derive(Serialize)]
struct OrderPaid {
    id: u64,
}

const ORDERS: Table<u64, Order> = Table::new("orders");

/// The first example of the README, on a temporary store.
#[test]
fn the_readme_store_example_runs_as_written() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("orders"))?;
    let committed = store.write(|tx| {
        let mut order = tx.get_for_update(&ORDERS, &42)?.unwrap_or_default();
        order.status = Status::Paid;
        tx.put(&ORDERS, &42, &order)?;
        tx.emit(Event::json(
            "orders.paid",
            "order-42",
            &OrderPaid { id: 42 },
        )?)?;
        Ok(())
    })?;
    assert_eq!(committed.seqs, 1..2);
    let order: Option<Order> = store.get(&ORDERS, &42)?;
    assert_eq!(order.map(|o| o.status), Some(Status::Paid));
    let mut ids = Vec::new();
    for row in store.range(&ORDERS, 10..20)? {
        let (id, _order) = row?;
        ids.push(id);
    }
    assert!(ids.is_empty(), "order 42 is outside 10..20: {ids:?}");
    let around: Vec<u64> = store
        .range(&ORDERS, 40..50)?
        .map(|row| row.map(|(id, _)| id))
        .collect::<Result<_, _>>()?;
    assert_eq!(around, vec![42]);
    let batch = store.outbox().read(store.outbox().tail(), 100)?;
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].event_type, "orders.paid");
    Ok(())
}

/// The README's NATS example (compiled, not run here).
#[allow(dead_code)]
#[cfg(feature = "nats")]
async fn readme_nats_example(store: &Store, seq: u64) -> TestResult {
    use outboxkv::relay::{Relay, Shutdown};
    use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};

    let sink = NatsSink::connect(
        NatsOptions::new("nats://127.0.0.1:4222")
            .subject_template("{prefix}.{type}")
            .prefix("events")
            .create_stream(StreamSetup {
                name: "EVENTS".into(),
                subjects: vec!["events.>".into()],
                duplicate_window: Duration::from_secs(120),
            }),
    )
    .await?;
    let relay = Relay::builder(store).sink(sink).start()?;
    relay.wait_delivered(seq, Duration::from_secs(5)).await?;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(10)))
        .await?;
    Ok(())
}

/// The README's Kafka example (compiled, not run here).
#[allow(dead_code)]
#[cfg(feature = "kafka")]
async fn readme_kafka_example(store: &Store) -> TestResult {
    use outboxkv::relay::{Relay, Shutdown};
    use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};

    let sink =
        KafkaSink::connect(KafkaOptions::new("127.0.0.1:9092").topic_template("{type}")).await?;
    let relay = Relay::builder(store).sink(sink).start()?;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(10)))
        .await?;
    Ok(())
}
