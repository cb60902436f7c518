//! A two-service saga: **orders** and **payments**, each its own process
//! with its own store, talking over NATS JetStream or Kafka through their
//! outboxes (publish) and inboxes (consume, exactly-once effect).
//!
//! An order is placed; payments reserves the amount or refuses it
//! (insufficient funds); orders confirms it (stock left) or cancels it;
//! a cancellation after a reservation is compensated (payments releases
//! the money). See `flow.rs` for the events and the handlers.
//!
//! ```text
//! nats-server -js -a 127.0.0.1 -p 4222 &
//! cargo run --release --features nats --example saga -- payments --dir /tmp/saga --broker nats:nats://127.0.0.1:4222 &
//! cargo run --release --features nats --example saga -- orders --dir /tmp/saga --broker nats:nats://127.0.0.1:4222 --orders 1000 &
//! cargo run --release --features nats --example saga -- check --dir /tmp/saga
//! ```
//!
//! `check` prints both stores' state as one JSON object (run it with the
//! services stopped). `kafka:BOOTSTRAP` (feature `kafka`) uses one topic
//! per event type instead. SIGTERM stops a service after the batch in hand
//! (SIGKILL is fine too: that is what the saga test does).

mod flow;

use std::sync::Arc;
use std::time::Duration;

use flow::{BALANCES, HANDLED, ORDERS, RESERVATIONS};
use outboxkv::Store;
use outboxkv::inbox::{Inbox, InboxOptions, InboxTx};
use outboxkv::relay::{Relay, Shutdown, Sink};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    role: String,
    dir: std::path::PathBuf,
    broker: String,
    orders: u64,
    /// JetStream's wait for an acknowledgement before it delivers again.
    ack_wait: Duration,
    /// A pause between each commit and its acknowledgements (crash tests:
    /// kills then land in that gap, and the messages come again).
    pause_before_ack: Duration,
    /// The pause after placing each order (default: none).
    place_every: Duration,
}

fn args() -> AnyResult<Args> {
    let mut it = std::env::args().skip(1);
    let role = it.next().ok_or("usage: saga orders|payments|check --dir DIR [--broker nats:URL|kafka:BOOTSTRAP] [--orders N] [--place-every-ms MS] [--ack-wait-ms MS] [--pause-before-ack-ms MS]")?;
    let (mut dir, mut broker, mut orders) = (None, None, 0);
    let (mut ack_wait, mut pause_before_ack) = (Duration::from_secs(30), Duration::ZERO);
    let mut place_every = Duration::ZERO;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => dir = Some(value.into()),
            "--broker" => broker = Some(value),
            "--orders" => orders = value.parse()?,
            "--place-every-ms" => place_every = Duration::from_millis(value.parse()?),
            "--ack-wait-ms" => ack_wait = Duration::from_millis(value.parse()?),
            "--pause-before-ack-ms" => pause_before_ack = Duration::from_millis(value.parse()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(Args {
        role,
        dir: dir.ok_or("--dir is required")?,
        broker: broker.unwrap_or_default(),
        orders,
        ack_wait,
        pause_before_ack,
        place_every,
    })
}

/// The sink for this service's outbox.
async fn sink(broker: &str) -> AnyResult<Arc<dyn Sink>> {
    match broker.split_once(':') {
        #[cfg(feature = "nats")]
        Some(("nats", url)) => {
            use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
            let opts = NatsOptions::new(url).prefix("saga");
            let stream = StreamSetup::for_template("SAGA", &opts)?;
            Ok(Arc::new(
                NatsSink::connect(opts.create_stream(stream)).await?,
            ))
        }
        #[cfg(feature = "kafka")]
        Some(("kafka", bootstrap)) => {
            use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
            Ok(Arc::new(
                KafkaSink::connect(KafkaOptions::new(bootstrap)).await?,
            ))
        }
        _ => Err(format!(
            "--broker {broker:?}: expected nats:URL or kafka:BOOTSTRAP (with its feature)"
        )
        .into()),
    }
}

/// Consumes the other service's events into `inbox` with `handler` until
/// `stop`.
async fn consume(
    inbox: Inbox,
    args: &Args,
    handler: fn(&mut InboxTx<'_, '_>) -> outboxkv::Result<()>,
    stop: impl std::future::Future<Output = ()>,
) -> AnyResult {
    let (broker, role) = (args.broker.as_str(), args.role.as_str());
    let other = if role == "orders" {
        "payments"
    } else {
        "orders"
    };
    match broker.split_once(':') {
        #[cfg(feature = "nats")]
        Some(("nats", url)) => {
            use outboxkv::broker::nats::NatsConnection;
            use outboxkv::inbox::nats::{NatsReader, NatsReaderOptions};
            let opts = NatsReaderOptions::new(NatsConnection::new(url), "SAGA", role)
                .filter_subject(format!("saga.{other}.>"))
                .ack_wait(args.ack_wait)
                .pause_before_ack(args.pause_before_ack);
            let mut reader = NatsReader::connect(inbox, opts).await?;
            reader.run(handler, stop).await?;
            Ok(())
        }
        #[cfg(feature = "kafka")]
        Some(("kafka", bootstrap)) => {
            use outboxkv::broker::kafka::KafkaConnection;
            use outboxkv::inbox::kafka::{KafkaReader, KafkaReaderOptions};
            let topics: &[&str] = if role == "orders" {
                &["payments.reserved", "payments.refused"]
            } else {
                &["orders.placed", "orders.confirmed", "orders.cancelled"]
            };
            let opts = KafkaReaderOptions::new(
                KafkaConnection::new(bootstrap).set("allow.auto.create.topics", "true"),
                role,
                topics.iter().copied(),
            );
            let mut reader = KafkaReader::connect(inbox, opts)?;
            reader.run(handler, stop).await?;
            Ok(())
        }
        _ => Err(format!("--broker {broker:?}: not a broker of this build").into()),
    }
}

async fn terminated() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn service(args: &Args) -> AnyResult {
    let store = Store::open(args.dir.join(&args.role))?;
    let relay = Relay::builder(&store)
        .sink_arc(sink(&args.broker).await?)
        .start()?;
    let inbox = Inbox::with_options(
        &store,
        args.role.as_str(),
        InboxOptions::new().max_attempts(5),
    )?;
    let handler = match args.role.as_str() {
        "orders" => flow::orders_handler,
        _ => flow::payments_handler,
    };
    if args.role == "orders" {
        // Place the orders not placed yet (a restart goes on where the
        // last run stopped: placing is idempotent).
        let s = store.clone();
        let (n, every) = (args.orders, args.place_every);
        tokio::spawn(async move {
            for i in 1..=n {
                match s.write_async(|tx| flow::place(tx, i)).await {
                    Ok(c) if c.value && !every.is_zero() => tokio::time::sleep(every).await,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("placing order {i}: {e}");
                        return;
                    }
                }
            }
            println!("placed {n} orders");
        });
    }
    println!("{} running", args.role);
    consume(inbox, args, handler, terminated()).await?;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(5)))
        .await?;
    Ok(())
}

/// How many distinct events a service's handler applied, and the most
/// times one was applied.
fn handled(store: &Store) -> AnyResult<(u64, u64)> {
    let (mut n, mut most) = (0, 0);
    for row in store.range(&HANDLED, ..)? {
        let (_, times) = row?;
        n += 1;
        most = most.max(times);
    }
    Ok((n, most))
}

/// Both stores' state, as JSON.
fn check(args: &Args) -> AnyResult {
    let mut out = serde_json::Map::new();
    let path = args.dir.join("orders");
    if path.exists() {
        let store = Store::open(&path)?;
        let orders: serde_json::Map<String, serde_json::Value> = store
            .range(&ORDERS, ..)?
            .map(|r| {
                r.map(|(id, o)| {
                    (
                        id.to_string(),
                        serde_json::json!([format!("{:?}", o.status), o.amount, o.customer]),
                    )
                })
            })
            .collect::<outboxkv::Result<_>>()?;
        out.insert("orders".into(), orders.into());
        out.insert("orders_outbox_head".into(), store.outbox().head().into());
        out.insert("stock".into(), flow::STOCK.into());
        let left = store
            .get(&flow::STOCK_LEFT, "units")?
            .unwrap_or(flow::STOCK);
        out.insert("stock_left".into(), left.into());
        let (n, most) = handled(&store)?;
        out.insert("orders_handled".into(), n.into());
        out.insert("orders_handled_most".into(), most.into());
    }
    let path = args.dir.join("payments");
    if path.exists() {
        let store = Store::open(&path)?;
        let reservations: serde_json::Map<String, serde_json::Value> = store
            .range(&RESERVATIONS, ..)?
            .map(|r| {
                r.map(|(id, h)| {
                    (
                        id.to_string(),
                        serde_json::json!([format!("{:?}", h.hold), h.amount, h.customer]),
                    )
                })
            })
            .collect::<outboxkv::Result<_>>()?;
        let balances: serde_json::Map<String, serde_json::Value> = store
            .range(&BALANCES, ..)?
            .map(|r| r.map(|(c, b)| (c.to_string(), b.into())))
            .collect::<outboxkv::Result<_>>()?;
        out.insert("reservations".into(), reservations.into());
        out.insert("balances".into(), balances.into());
        let initial: Vec<i64> = (0..flow::CUSTOMERS).map(flow::initial_balance).collect();
        out.insert("initial_balances".into(), initial.into());
        out.insert("customers".into(), flow::CUSTOMERS.into());
        let (n, most) = handled(&store)?;
        out.insert("payments_handled".into(), n.into());
        out.insert("payments_handled_most".into(), most.into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> AnyResult {
    let args = args()?;
    match args.role.as_str() {
        "orders" | "payments" => service(&args).await,
        "check" => check(&args),
        other => Err(format!("unknown role {other}: orders, payments or check").into()),
    }
}
