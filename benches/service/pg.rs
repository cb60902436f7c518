//! The same orders API on PostgreSQL, as a service would write it today:
//! each change updates the `orders` table and inserts its event into an
//! `outbox` table in one transaction (`synchronous_commit=on`: durable like
//! outboxkv's `Sync`), with a `NOTIFY`; a LISTEN/NOTIFY relay moves the
//! outbox to a JSON Lines file (written and fsynced per batch, like
//! outboxkv's file sink) and deletes what it wrote, in one transaction.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore};
use tokio_postgres::{Client, NoTls, Statement};

use super::AnyResult;

const SCHEMA: &str = "
    DROP TABLE IF EXISTS orders, outbox;
    CREATE TABLE orders (
        id BIGSERIAL PRIMARY KEY,
        customer TEXT NOT NULL,
        total_cents BIGINT NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX orders_by_customer ON orders (customer, id);
    CREATE TABLE outbox (
        seq BIGSERIAL PRIMARY KEY,
        type TEXT NOT NULL,
        key TEXT NOT NULL,
        payload TEXT NOT NULL
    );
";

#[derive(Serialize)]
struct Order {
    id: i64,
    customer: String,
    total_cents: i64,
    status: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    customer: String,
    total_cents: u64,
}

/// One pooled connection with its prepared statements.
struct Conn {
    client: Client,
    insert_order: Statement,
    insert_event: Statement,
    lock_order: Statement,
    set_status: Statement,
    get_order: Statement,
}

impl Conn {
    async fn connect(conn_str: &str) -> AnyResult<Conn> {
        let (client, connection) = tokio_postgres::connect(conn_str, NoTls).await?;
        tokio::spawn(connection);
        Ok(Conn {
            insert_order: client
                .prepare(
                    "INSERT INTO orders (customer, total_cents, status) VALUES ($1, $2, 'created') \
                     RETURNING id",
                )
                .await?,
            insert_event: client
                .prepare("INSERT INTO outbox (type, key, payload) VALUES ($1, $2, $3)")
                .await?,
            lock_order: client
                .prepare(
                    "SELECT customer, total_cents, status FROM orders WHERE id = $1 FOR UPDATE",
                )
                .await?,
            set_status: client
                .prepare("UPDATE orders SET status = $2 WHERE id = $1")
                .await?,
            get_order: client
                .prepare("SELECT customer, total_cents, status FROM orders WHERE id = $1")
                .await?,
            client,
        })
    }
}

/// A fixed pool of connections.
pub struct Pg {
    conns: Mutex<Vec<Conn>>,
    free: Semaphore,
}

impl Pg {
    async fn take(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, Conn), ApiError> {
        let permit = self
            .free
            .acquire()
            .await
            .map_err(|_| internal("pool closed"))?;
        let conn = self
            .conns
            .lock()
            .await
            .pop()
            .ok_or_else(|| internal("pool empty"))?;
        Ok((permit, conn))
    }

    async fn give(&self, conn: Conn) {
        self.conns.lock().await.push(conn);
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.0, &serde_json::json!({ "error": self.1 }))
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    eprintln!("postgres service: {e}");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("order id {raw:?} is not a number"),
        )
    })
}

async fn create(State(pg): State<Arc<Pg>>, body: Bytes) -> Result<Response, ApiError> {
    let new: NewOrder = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad order: {e}")))?;
    if new.customer.is_empty() || new.customer.len() > 100 || new.total_cents == 0 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad order".into(),
        ));
    }
    let total = i64::try_from(new.total_cents)
        .map_err(|_| ApiError(StatusCode::UNPROCESSABLE_ENTITY, "too large".into()))?;
    let (_permit, mut conn) = pg.take().await?;
    let result = async {
        let tx = conn.client.transaction().await.map_err(internal)?;
        let row = tx
            .query_one(&conn.insert_order, &[&new.customer, &total])
            .await
            .map_err(internal)?;
        let order = Order {
            id: row.get(0),
            customer: new.customer,
            total_cents: total,
            status: "created".into(),
        };
        let payload = serde_json::to_string(&order).map_err(internal)?;
        tx.execute(
            &conn.insert_event,
            &[&"orders.created", &format!("order-{}", order.id), &payload],
        )
        .await
        .map_err(internal)?;
        tx.batch_execute("NOTIFY outbox").await.map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(json(StatusCode::CREATED, &order))
    }
    .await;
    pg.give(conn).await;
    result
}

async fn advance(pg: &Pg, raw: &str, from: &str, to: &str) -> Result<Response, ApiError> {
    let id = parse_id(raw)?;
    let (_permit, mut conn) = pg.take().await?;
    let result = async {
        let tx = conn.client.transaction().await.map_err(internal)?;
        let Some(row) = tx
            .query_opt(&conn.lock_order, &[&id])
            .await
            .map_err(internal)?
        else {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no order {id}")));
        };
        let status: String = row.get(2);
        if status != from {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("order {id} is {status}, not {from}"),
            ));
        }
        tx.execute(&conn.set_status, &[&id, &to])
            .await
            .map_err(internal)?;
        let payload = serde_json::json!({ "id": id, "status": to }).to_string();
        tx.execute(
            &conn.insert_event,
            &[&format!("orders.{to}"), &format!("order-{id}"), &payload],
        )
        .await
        .map_err(internal)?;
        tx.batch_execute("NOTIFY outbox").await.map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        let order = Order {
            id,
            customer: row.get(0),
            total_cents: row.get(1),
            status: to.into(),
        };
        Ok(json(StatusCode::OK, &order))
    }
    .await;
    pg.give(conn).await;
    result
}

async fn pay(State(pg): State<Arc<Pg>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    advance(&pg, &id, "created", "paid").await
}

async fn ship(State(pg): State<Arc<Pg>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    advance(&pg, &id, "paid", "shipped").await
}

async fn get_order(
    State(pg): State<Arc<Pg>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let (_permit, conn) = pg.take().await?;
    let row = conn.client.query_opt(&conn.get_order, &[&id]).await;
    pg.give(conn).await;
    match row.map_err(internal)? {
        Some(row) => Ok(json(
            StatusCode::OK,
            &Order {
                id,
                customer: row.get(0),
                total_cents: row.get(1),
                status: row.get(2),
            },
        )),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no order {id}"))),
    }
}

async fn list(
    State(pg): State<Arc<Pg>>,
    Path(customer): Path<String>,
) -> Result<Response, ApiError> {
    let (_permit, conn) = pg.take().await?;
    let rows = conn
        .client
        .query(
            "SELECT id, customer, total_cents, status FROM orders WHERE customer = $1 ORDER BY id LIMIT 1000",
            &[&customer],
        )
        .await;
    pg.give(conn).await;
    let orders: Vec<Order> = rows
        .map_err(internal)?
        .iter()
        .map(|r| Order {
            id: r.get(0),
            customer: r.get(1),
            total_cents: r.get(2),
            status: r.get(3),
        })
        .collect();
    Ok(json(StatusCode::OK, &orders))
}

/// Creates the schema and a pool of `pool` connections; the router.
pub async fn service(conn_str: &str, pool: usize) -> AnyResult<Router> {
    let (client, connection) = tokio_postgres::connect(conn_str, NoTls).await?;
    let driver = tokio::spawn(connection);
    client.batch_execute(SCHEMA).await?;
    drop(client);
    let _ = driver.await;
    let mut conns = Vec::with_capacity(pool);
    for _ in 0..pool {
        conns.push(Conn::connect(conn_str).await?);
    }
    let pg = Arc::new(Pg {
        conns: Mutex::new(conns),
        free: Semaphore::new(pool),
    });
    Ok(Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/pay", post(pay))
        .route("/orders/{id}/ship", post(ship))
        .route("/customers/{customer}/orders", get(list))
        .with_state(pg))
}

/// The LISTEN/NOTIFY relay: on each notification (or every 100 ms), moves
/// up to 500 outbox rows at a time to `file` (one JSON line each, fsynced
/// per batch) and deletes them in the same transaction. Runs until `stop`
/// is set and the outbox is empty; returns the events written.
pub async fn relay(conn_str: String, file: PathBuf, stop: Arc<AtomicBool>) -> AnyResult<u64> {
    let (listener, mut connection) = tokio_postgres::connect(&conn_str, NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = m {
                let _ = tx.send(());
            }
        }
    });
    listener.batch_execute("LISTEN outbox").await?;
    let (mut worker, connection) = tokio_postgres::connect(&conn_str, NoTls).await?;
    tokio::spawn(connection);
    let take = worker
        .prepare(
            "DELETE FROM outbox WHERE seq IN \
             (SELECT seq FROM outbox ORDER BY seq LIMIT 500 FOR UPDATE SKIP LOCKED) \
             RETURNING seq, type, key, payload",
        )
        .await?;
    let out = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)?,
    ));
    let mut written = 0u64;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let tx = worker.transaction().await?;
        let mut rows = tx.query(&take, &[]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            if stopping {
                return Ok(written);
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
            while rx.try_recv().is_ok() {}
            continue;
        }
        rows.sort_by_key(|r| r.get::<_, i64>(0));
        let mut lines = String::new();
        for r in &rows {
            let line = serde_json::json!({
                "seq": r.get::<_, i64>(0),
                "type": r.get::<_, String>(1),
                "key": r.get::<_, String>(2),
                "data": r.get::<_, String>(3),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        let f = out.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = f.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            f.write_all(lines.as_bytes())?;
            f.sync_data()
        })
        .await??;
        tx.commit().await?;
        written += rows.len() as u64;
    }
}
