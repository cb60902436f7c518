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
//! | `GET /customers/{customer}/orders` | the customer's orders, by id | 200 |
//! | `GET /metrics` | store and relay metrics, Prometheus text | 200 |
//! | `GET /healthz` | 200 while the relay delivers, else 503 | |
//!
//! Bad requests get a 4xx with `{"error": "..."}`. SIGTERM (or Ctrl-C)
//! stops accepting connections, finishes the requests in flight, drains
//! the relay (up to 10 s) and exits 0. It prints `listening on ADDR` once
//! it serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outboxkv::relay::{Relay, RelayMetrics, Shutdown, Sink, register_store_metrics};
use outboxkv::sink::FileSink;
use outboxkv::{Error, Event, Store, Table};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Created,
    Paid,
    Shipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    total_cents: u64,
    status: Status,
}

/// Orders by id.
const ORDERS: Table<u64, Order> = Table::new("orders");
/// Secondary index: (customer, order id).
const BY_CUSTOMER: Table<(String, u64), ()> = Table::new("orders.by_customer");

/// The longest customer name accepted, in bytes.
const MAX_CUSTOMER: usize = 100;
/// The most orders one listing returns.
const MAX_LISTED: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    customer: String,
    total_cents: u64,
}

struct App {
    store: Store,
    next_id: AtomicU64,
    registry: Registry,
    metrics: RelayMetrics,
}

/// An answer with a JSON error body.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.0, &serde_json::json!({ "error": self.1 }))
    }
}

/// Store errors: aborts carry the answer; anything else is a 500 (the
/// details go to the log, not to the client).
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Aborted(inner) => match inner.downcast::<ApiAbort>() {
                Ok(a) => ApiError(a.0, a.1),
                Err(other) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
            },
            Error::OutboxFull { .. } => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the outbox is full; retry later".into(),
            ),
            other => {
                eprintln!("store error: {other}");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        }
    }
}

/// Why a transaction gave up, as the answer to send.
#[derive(Debug)]
struct ApiAbort(StatusCode, String);

impl std::fmt::Display for ApiAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

impl std::error::Error for ApiAbort {}

fn abort(status: StatusCode, message: String) -> Error {
    Error::abort(ApiAbort(status, message))
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("order id {raw:?} is not a number"),
        )
    })
}

async fn create(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let new: NewOrder = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad order: {e}")))?;
    if new.customer.is_empty() || new.customer.len() > MAX_CUSTOMER {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("customer must be 1 to {MAX_CUSTOMER} bytes"),
        ));
    }
    if new.total_cents == 0 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "total_cents must be positive".into(),
        ));
    }
    let order = Order {
        id: app.next_id.fetch_add(1, Ordering::Relaxed),
        customer: new.customer,
        total_cents: new.total_cents,
        status: Status::Created,
    };
    app.store
        .write_async(|tx| {
            tx.put(&ORDERS, &order.id, &order)?;
            tx.put(&BY_CUSTOMER, &(order.customer.clone(), order.id), &())?;
            tx.emit(Event::json(
                "orders.created",
                format!("order-{}", order.id),
                &order,
            )?)
        })
        .await?;
    Ok(json(StatusCode::CREATED, &order))
}

/// Moves an order from `from` to `to`, with its event, in one commit.
async fn advance(app: &App, raw_id: &str, from: Status, to: Status) -> Result<Response, ApiError> {
    let id = parse_id(raw_id)?;
    let committed = app
        .store
        .write_async(|tx| {
            let mut order = tx
                .get_for_update(&ORDERS, &id)?
                .ok_or_else(|| abort(StatusCode::NOT_FOUND, format!("no order {id}")))?;
            if order.status != from {
                return Err(abort(
                    StatusCode::CONFLICT,
                    format!("order {id} is {:?}, not {from:?}", order.status).to_lowercase(),
                ));
            }
            order.status = to;
            tx.put(&ORDERS, &id, &order)?;
            let event_type = match to {
                Status::Paid => "orders.paid",
                _ => "orders.shipped",
            };
            tx.emit(Event::json(
                event_type,
                format!("order-{id}"),
                &serde_json::json!({ "id": id, "status": to }),
            )?)?;
            Ok(order)
        })
        .await?;
    Ok(json(StatusCode::OK, &committed.value))
}

async fn pay(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    advance(&app, &id, Status::Created, Status::Paid).await
}

async fn ship(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    advance(&app, &id, Status::Paid, Status::Shipped).await
}

async fn get_order(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match app.store.get(&ORDERS, &id)? {
        Some(order) => Ok(json(StatusCode::OK, &order)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no order {id}"))),
    }
}

async fn list(
    State(app): State<Arc<App>>,
    Path(customer): Path<String>,
) -> Result<Response, ApiError> {
    if customer.len() > MAX_CUSTOMER {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("customer must be at most {MAX_CUSTOMER} bytes"),
        ));
    }
    // One snapshot: the index and the orders it points at agree.
    let snapshot = app.store.snapshot();
    let mut orders = Vec::new();
    for row in snapshot
        .prefix(&BY_CUSTOMER, &(customer,))?
        .take(MAX_LISTED)
    {
        let ((_, id), ()) = row?;
        if let Some(order) = snapshot.get(&ORDERS, &id)? {
            orders.push(order);
        }
    }
    Ok(json(StatusCode::OK, &orders))
}

async fn serve_metrics(State(app): State<Arc<App>>) -> Response {
    use prometheus_client::encoding::prometheus_text;
    let mut body = String::new();
    match prometheus_text::encode(&mut body, &app.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let age = app.metrics.oldest_undelivered_age_seconds.get();
    if app.metrics.sink_up.get() != 1 {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "status": "sink down", "oldest_undelivered_secs": age }),
        )
    } else {
        json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "oldest_undelivered_secs": age }),
        )
    }
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such route".into())
}

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

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = ctrl_c => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

#[tokio::main]
async fn main() -> AnyResult {
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
    // Ids go on from the highest one stored.
    let next_id = match store.range(&ORDERS, ..)?.next_back() {
        Some(row) => row?.0 + 1,
        None => 1,
    };
    let spec = args
        .sink
        .unwrap_or_else(|| format!("file:{}", data.join("events.jsonl").display()));
    let metrics = RelayMetrics::new();
    let relay = Relay::builder(&store)
        .sink_arc(sink(&spec).await?)
        .metrics(metrics.clone())
        .start()?;
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    register_store_metrics(&mut registry, &store);
    let app = Arc::new(App {
        store: store.clone(),
        next_id: AtomicU64::new(next_id),
        registry,
        metrics,
    });
    let router = Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/pay", post(pay))
        .route("/orders/{id}/ship", post(ship))
        .route("/customers/{customer}/orders", get(list))
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("store {} at {}", store.id(), data.display());
    println!("events to {spec}");
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(terminated())
        .await?;
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
