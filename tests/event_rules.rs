//! What an event may carry into a broker's headers is checked when it is
//! emitted: control characters in the key, content type or header values
//! (a CR/LF could forge `Nats-Msg-Id`), malformed header names and the names
//! the sinks set themselves are refused with `Error::InvalidEvent`, and
//! nothing of the commit is written.

mod common;

use outboxkv::{Error, Event, Store, Table};

use common::TestResult;

const T: Table<u32, u32> = Table::new("t");

#[test]
fn forged_headers_are_refused_at_emit_and_nothing_is_written() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let refused = [
        Event::bytes("orders.paid", "k\r\nNats-Msg-Id: forged", Vec::new()),
        Event::bytes("orders.paid", "k\0", Vec::new()),
        Event::bytes("orders.paid", "k", Vec::new())
            .with_content_type("text/plain\r\nNats-Rollup: all"),
        Event::bytes("orders.paid", "k", Vec::new()).with_header("x-note", "a\nb"),
        Event::bytes("orders.paid", "k", Vec::new()).with_header("has space", "v"),
        Event::bytes("orders.paid", "k", Vec::new()).with_header("a:b", "v"),
        Event::bytes("orders.paid", "k", Vec::new()).with_header("", "v"),
    ];
    let reserved = [
        "Nats-Msg-Id",
        "nats-rollup",
        "Nats-TTL",
        "Nats-Expected-Last-Sequence",
        "NATS-EXPECTED-STREAM",
        "ce_id",
        "ce-type",
        "CE_SOURCE",
        "Content-Type",
        "content-type",
        "outboxkv_seq",
        "OutboxKV-anything",
    ];
    let events = refused.into_iter().chain(
        reserved
            .iter()
            .map(|name| Event::bytes("orders.paid", "k", Vec::new()).with_header(*name, "x")),
    );
    for event in events {
        let shown = format!("{:?}", event.headers());
        let r = store.write(|tx| {
            tx.put(&T, &1, &1)?;
            tx.emit(event.clone())
        });
        match r {
            Err(Error::InvalidEvent {
                event_type, reason, ..
            }) => {
                assert_eq!(event_type, "orders.paid");
                assert!(!reason.is_empty());
            }
            other => panic!(
                "{shown} key {:?}: expected InvalidEvent, got {other:?}",
                event.key()
            ),
        }
    }
    assert_eq!(store.outbox().head(), 0, "nothing emitted");
    assert_eq!(store.get(&T, &1)?, None, "nothing of the commits written");

    // What is fine: tracing headers, ordinary names, spaces in keys and
    // values, an empty key.
    store.write(|tx| {
        tx.emit(
            Event::bytes("orders.paid", "order 42", Vec::new())
                .with_header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .with_header("tracestate", "a=1")
                .with_header("X-Tenant", "acme corp")
                .with_content_type("application/json; charset=utf-8"),
        )?;
        tx.emit(Event::bytes("pings", "", Vec::new()))
    })?;
    assert_eq!(store.outbox().head(), 2);
    Ok(())
}
