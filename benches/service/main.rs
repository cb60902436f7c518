//! Service-level benchmark (issue 17): the orders HTTP API of
//! `examples/orders_service` on outboxkv beside the same API on
//! PostgreSQL (state table + outbox table in one transaction, a
//! LISTEN/NOTIFY relay), both shipping to a JSON Lines file, both driven by
//! one load generator at 16, 64 and 256 keep-alive connections, each in a
//! closed loop of create, pay and get.
//!
//! Per row: requests/s, p50 and p99 of one request, and the check that the
//! sink got exactly one event per successful create or pay (after the
//! relay drained). Servers, relays and the load generator share this
//! process and the VM's two cores, the same for both services.
//!
//! Run: `cargo bench --bench service` (about a minute; starts PostgreSQL
//! through scripts/postgres.sh), or `cargo bench --bench service --
//! --secs 2 --connections 64`.

#[path = "../../examples/orders_service/app.rs"]
mod app;
mod load;
mod pg;
#[path = "../common/postgres.rs"]
mod pg_server;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use outboxkv::relay::{Relay, RelayMetrics, Shutdown};
use outboxkv::sink::FileSink;
use outboxkv::{Durability, Store};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Row {
    connections: usize,
    service: &'static str,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    events: u64,
    expected: u64,
}

/// Serves `router` on a free loopback port until the returned sender fires.
async fn serve(
    router: axum::Router,
) -> AnyResult<(
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((addr, stop, task))
}

fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e3
}

/// Lines of `file`, and how many distinct values of `field` they hold.
fn count_events(file: &Path, field: &str) -> AnyResult<(u64, u64)> {
    let text = std::fs::read_to_string(file)?;
    let mut seen = HashSet::new();
    let mut lines = 0;
    for l in text.lines() {
        lines += 1;
        let v: serde_json::Value = serde_json::from_str(l)?;
        seen.insert(v.get(field).map(|f| f.to_string()).unwrap_or_default());
    }
    Ok((lines, seen.len() as u64))
}

fn row(
    connections: usize,
    service: &'static str,
    mut m: load::Measured,
    events: (u64, u64),
) -> AnyResult<Row> {
    if events.0 != events.1 {
        return Err(format!(
            "{service}: {} events shipped, {} distinct",
            events.0, events.1
        )
        .into());
    }
    m.latencies_us.sort_unstable();
    Ok(Row {
        connections,
        service,
        rate: m.ok as f64 / m.elapsed.as_secs_f64(),
        p50_ms: quantile_ms(&m.latencies_us, 0.5),
        p99_ms: quantile_ms(&m.latencies_us, 0.99),
        failed: m.failed,
        events: events.0,
        expected: m.changes,
    })
}

async fn outboxkv_run(connections: usize, secs: Duration) -> AnyResult<Row> {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Sync)
        .open(dir.path().join("orders"))?;
    let events = dir.path().join("events.jsonl");
    let metrics = RelayMetrics::new();
    let relay = Relay::builder(&store)
        .sink(FileSink::open(&events)?)
        .metrics(metrics.clone())
        .start()?;
    let router = app::router(Arc::new(app::App::new(store.clone(), metrics)?));
    let (addr, stop, server) = serve(router).await?;
    let measured = load::run(addr, connections, secs).await?;
    let _ = stop.send(());
    let _ = server.await;
    relay
        .shutdown(Shutdown::Drain(Duration::from_secs(120)))
        .await?;
    if store.outbox().depth() != 0 {
        return Err(format!("outboxkv: {} events not drained", store.outbox().depth()).into());
    }
    row(
        connections,
        "outboxkv",
        measured,
        count_events(&events, "id")?,
    )
}

async fn postgres_run(conn: &str, connections: usize, secs: Duration) -> AnyResult<Row> {
    let dir = tempfile::tempdir()?;
    let events = dir.path().join("events.jsonl");
    let router = pg::service(conn, connections.min(64)).await?;
    let stop_relay = Arc::new(AtomicBool::new(false));
    let relay = tokio::spawn(pg::relay(
        conn.to_string(),
        events.clone(),
        stop_relay.clone(),
    ));
    let (addr, stop, server) = serve(router).await?;
    let measured = load::run(addr, connections, secs).await?;
    let _ = stop.send(());
    let _ = server.await;
    stop_relay.store(true, std::sync::atomic::Ordering::Release);
    relay.await??;
    row(
        connections,
        "PostgreSQL",
        measured,
        count_events(&events, "seq")?,
    )
}

fn main() -> AnyResult {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let secs = Duration::from_secs(value("--secs").and_then(|v| v.parse().ok()).unwrap_or(5));
    let levels: Vec<usize> = value("--connections")
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 64, 256]);
    let pg = pg_server::Postgres::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    rt.block_on(async {
        for &c in &levels {
            rows.push(outboxkv_run(c, secs).await?);
            rows.push(postgres_run(&pg.conn, c, secs).await?);
        }
        AnyResult::Ok(())
    })?;
    println!(
        "\nservice: orders API, closed loop of create + pay + get per connection, {}s per row; \
         both services Sync/synchronous_commit=on, relays to a JSON Lines file",
        secs.as_secs()
    );
    println!(
        "| connections | service | requests/s | x PostgreSQL | p50 | p99 | failed | events shipped / expected |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let pg_rate = rows
            .iter()
            .find(|p| p.connections == r.connections && p.service == "PostgreSQL")
            .map_or(1.0, |p| p.rate);
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} ms | {:.2} ms | {} | {} / {}{} |",
            r.connections,
            r.service,
            r.rate,
            r.rate / pg_rate,
            r.p50_ms,
            r.p99_ms,
            r.failed,
            r.events,
            r.expected,
            if r.events == r.expected {
                " (exactly once)"
            } else {
                " (MISMATCH)"
            },
        );
    }
    if rows.iter().any(|r| r.events != r.expected || r.failed > 0) {
        return Err("a service lost, duplicated or failed requests' events (see the table)".into());
    }
    Ok(())
}
