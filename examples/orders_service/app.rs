//! The orders service's HTTP API on an outboxkv store: the state, the
//! handlers and the router. `main.rs` runs it; `benches/service` drives it
//! beside the same API on PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outboxkv::relay::{RelayMetrics, register_store_metrics};
use outboxkv::{Error, Event, Store, Table};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

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

/// What the handlers share.
pub struct App {
    store: Store,
    next_id: AtomicU64,
    registry: Registry,
    metrics: RelayMetrics,
}

impl App {
    /// The service on `store`, whose relay reports to `metrics`. Order ids
    /// go on from the highest one stored.
    pub fn new(store: Store, metrics: RelayMetrics) -> outboxkv::Result<App> {
        let next_id = match store.range(&ORDERS, ..)?.next_back() {
            Some(row) => row?
                .0
                .checked_add(1)
                .ok_or_else(|| Error::InvalidArgument("order ids are used up".into()))?,
            None => 1,
        };
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        register_store_metrics(&mut registry, &store);
        Ok(App {
            store,
            next_id: AtomicU64::new(next_id),
            registry,
            metrics,
        })
    }
}

/// The API's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/pay", post(pay))
        .route("/orders/{id}/ship", post(ship))
        .route("/customers/{customer}/orders", get(list))
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
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
                Err(other) => {
                    eprintln!("transaction aborted: {other}");
                    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
                }
            },
            // Retries used up on a very hot order: the client may retry.
            Error::Conflict { .. } | Error::TransactionExpired { .. } => ApiError(
                StatusCode::CONFLICT,
                "the order is being changed concurrently; retry".into(),
            ),
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

/// A rejected extraction (a path segment that is not UTF-8, a body over
/// the limit, ...) as a JSON error with the rejection's status.
fn rejected(status: StatusCode, text: String) -> ApiError {
    ApiError(status, text)
}

fn path_of(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|r| rejected(r.status(), r.body_text()))
}

fn body_of(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|r| rejected(r.status(), r.body_text()))
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    // Digits only (`u64::from_str` would take "+5" too).
    let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| raw.parse().ok()).flatten().ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("order id {raw:?} is not a number"),
        )
    })
}

async fn create(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
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

type PathArg = Result<Path<String>, PathRejection>;

async fn pay(State(app): State<Arc<App>>, id: PathArg) -> Result<Response, ApiError> {
    advance(&app, &path_of(id)?, Status::Created, Status::Paid).await
}

async fn ship(State(app): State<Arc<App>>, id: PathArg) -> Result<Response, ApiError> {
    advance(&app, &path_of(id)?, Status::Paid, Status::Shipped).await
}

async fn get_order(State(app): State<Arc<App>>, id: PathArg) -> Result<Response, ApiError> {
    let id = parse_id(&path_of(id)?)?;
    match app.store.get(&ORDERS, &id)? {
        Some(order) => Ok(json(StatusCode::OK, &order)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no order {id}"))),
    }
}

async fn list(State(app): State<Arc<App>>, customer: PathArg) -> Result<Response, ApiError> {
    let customer = path_of(customer)?;
    if customer.len() > MAX_CUSTOMER {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("customer must be at most {MAX_CUSTOMER} bytes"),
        ));
    }
    // Up to 1,001 reads: on the blocking pool, not a runtime worker. One
    // snapshot: the index and the orders it points at agree.
    let store = app.store.clone();
    let orders = tokio::task::spawn_blocking(move || -> outboxkv::Result<Vec<Order>> {
        let snapshot = store.snapshot();
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
        Ok(orders)
    })
    .await
    .map_err(|e| {
        eprintln!("list failed: {e}");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    })??;
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

/// Events older than this undelivered make the service unhealthy.
const MAX_LAG_SECS: f64 = 30.0;

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let age = app.metrics.oldest_undelivered_age_seconds.get();
    let down = if app.metrics.sink_up.get() != 1 {
        Some("sink down")
    } else if age > MAX_LAG_SECS {
        Some("events wait too long for the relay")
    } else {
        None
    };
    if let Some(status) = down {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "status": status, "oldest_undelivered_secs": age }),
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

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route".into(),
    )
}

/// The largest request body taken, in bytes.
const MAX_BODY: usize = 64 << 10;
