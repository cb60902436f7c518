//! An orders service over HTTP/JSON (axum) on an embedded outboxkv store:
//! every change and its event go in one commit (`write_async`, which
//! waits for the disk without blocking the runtime), and an in-process
//! relay ships the events.
//!
//! ```text
//! cargo run --release --example orders_service -- [--data DIR] [--listen ADDR] [--sink SINK]
//!   --data DIR      the store (default: a fresh temporary directory)
//!   --listen ADDR   default 127.0.0.1:8080 (port 0 picks a free one)
//!   --sink SINK     file:PATH (default: file:<DIR>/events.jsonl, JSON Lines),
//!                   nats:URL (feature nats), kafka:BOOTSTRAP (feature kafka)
//! ```
//!
//! The API:
//!
//! | request | does | answers |
//! |---|---|---|
//! | `POST /orders` `{"customer": "ann", "total_cents": 2500}` | creates an order, emits `orders.created` | 201, the order |
//! | `POST /orders/{id}/pay` | `created` → `paid`, emits `orders.paid` | 200, or 404, 409 |
//! | `POST /orders/{id}/ship` | `paid` → `shipped`, emits `orders.shipped` | 200, or 404, 409 |
//! | `GET /orders/{id}` | | 200, or 404 |
//! | `GET /customers/{customer}/orders` | the customer's first 1,000 orders, by id | 200, or 400 |
//! | `GET /metrics` | store and relay metrics, Prometheus text | 200 |
//! | `GET /healthz` | 200 while the sink is up and no event waits over 30 s, else 503 | |
//!
//! Bad requests get a 4xx with `{"error": "..."}` (a body over 64 KiB:
//! 413; a wrong method: 405; an order changed concurrently past the
//! retries: 409). SIGTERM (or Ctrl-C) stops accepting connections, gives
//! the requests in flight up to 10 s, drains the relay (up to 10 s) and
//! exits 0; it also stops, and exits 1 with the relay's error, when the
//! relay stops by itself. It prints `listening on ADDR` once it serves.

mod app;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outboxkv::Store;
use outboxkv::relay::{Relay, RelayMetrics, Shutdown, Sink};
use outboxkv::sink::FileSink;

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    data: Option<PathBuf>,
    listen: SocketAddr,
    sink: Option<String>,
}

fn args() -> AnyResult<Args> {
    let mut out = Args {
        data: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        sink: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => out.data = Some(value()?.into()),
            "--listen" => out.listen = value()?.parse()?,
            "--sink" => out.sink = Some(value()?),
            other => {
                return Err(format!("unknown argument {other:?} (see the example's docs)").into());
            }
        }
    }
    Ok(out)
}

async fn sink(spec: &str) -> AnyResult<Arc<dyn Sink>> {
    let (kind, target) = spec.split_once(':').ok_or_else(|| {
        format!("--sink {spec:?}: expected file:PATH, nats:URL or kafka:BOOTSTRAP")
    })?;
    match kind {
        "file" => Ok(Arc::new(FileSink::open(target)?)),
        #[cfg(feature = "nats")]
        "nats" => {
            use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
            let opts = NatsOptions::new(target).prefix("orders");
            let stream = StreamSetup::for_template("ORDERS", &opts)?;
            Ok(Arc::new(NatsSink::connect(opts.create_stream(stream)).await?))
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
            Ok(Arc::new(KafkaSink::connect(KafkaOptions::new(target)).await?))
        }
        other => Err(format!(
            "--sink {other}:...: not a sink of this build (file; nats and kafka need their features)"
        )
        .into()),
    }
}

/// A future that resolves on SIGTERM or Ctrl-C. The handlers are installed
/// here, before the service says it listens: a SIGTERM from then on is
/// never the default (kill) action.
fn terminated() -> AnyResult<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = ctrl_c => {}
        }
        #[cfg(not(unix))]
        ctrl_c.await;
    })
}

/// How long requests in flight get after SIGTERM before the service drains
/// the relay anyway.
const GRACE: Duration = Duration::from_secs(10);

/// What `--sink` names, without a URL's user info (a password).
fn shown(spec: &str) -> String {
    match spec.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => spec.to_string(),
        },
        None => spec.to_string(),
    }
}

#[tokio::main]
async fn main() -> AnyResult {
    // The library reports through `tracing` (a poisoned store, a sink down,
    // a relay that stopped): show it on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let args = args()?;
    let tmp;
    let data = match args.data {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("orders")
        }
    };
    let store = Store::open(&data)?;
    let spec = args
        .sink
        .unwrap_or_else(|| format!("file:{}", data.join("events.jsonl").display()));
    let metrics = RelayMetrics::new();
    let relay = Relay::builder(&store)
        .sink_arc(sink(&spec).await?)
        .metrics(metrics.clone())
        .start()?;
    let router = app::router(Arc::new(app::App::new(store.clone(), metrics)?));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let signal = terminated()?;
    println!("store {} at {}", store.id(), data.display());
    println!("events to {}", shown(&spec));
    println!("listening on {}", listener.local_addr()?);
    // Stop on SIGTERM, or when the relay stops by itself (it can no longer
    // ship: a poisoned store, a fatal sink error); then the server stops
    // accepting and finishes the requests in flight (up to `GRACE`), and
    // the relay drains.
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopping.wait_for(|s| *s).await;
            })
            .into_future(),
    );
    let ended_early = tokio::select! {
        _ = signal => None,
        _ = relay.stopped() => {
            eprintln!("the relay stopped; shutting down");
            None
        }
        served = &mut server => Some(served),
    };
    let _ = stopping_tx.send(true);
    let served = match ended_early {
        Some(served) => Some(served),
        None => match tokio::time::timeout(GRACE, &mut server).await {
            Ok(served) => Some(served),
            Err(_) => {
                eprintln!("requests still in flight after {GRACE:?}; draining anyway");
                server.abort();
                None
            }
        },
    };
    if let Some(served) = served {
        served??;
    }
    println!("stopping: draining the relay");
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(10)))
        .await?;
    println!(
        "stopped; outbox depth {} (delivered through seq {})",
        store.outbox().depth(),
        store.outbox().tail() - 1
    );
    Ok(())
}
