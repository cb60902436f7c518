//! Side by side, in one run on one machine: raw RocksDB (the limit),
//! outboxkv, a SQLite outbox and a PostgreSQL outbox, on the same workload.
//!
//! Each commit reads one order, updates it, and appends one event (an
//! outbox row), from 1, 4 or 16 writer threads, with 100-byte or 1 KiB
//! event payloads, durable (an fsync per commit group) or crash-safe
//! without fsync:
//!
//! | system | durable | no fsync |
//! |---|---|---|
//! | raw RocksDB | WriteBatch, `sync` | WriteBatch, no sync |
//! | outboxkv | `Durability::Sync` | `Durability::Buffered` |
//! | SQLite (bundled, WAL) | `synchronous=FULL` | `synchronous=NORMAL` |
//! | PostgreSQL (local, scripts/postgres.sh) | `synchronous_commit=on` | `synchronous_commit=off` |
//!
//! Run: `cargo bench --bench compare` (full matrix, ~3 min), or
//! `cargo bench --bench compare -- --quick` (under a minute); add
//! `--json FILE` for one JSON object per (system, mode, writers, payload).
//! See BENCHMARKS.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/postgres.rs"]
mod pg_server;
#[path = "../tests/common/sinks.rs"]
mod sinks;
use pg_server::Postgres;

use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
use outboxkv::{Durability, Event, Store, Table};
use rocksdb::{DB, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Orders a writer picks from.
const ORDERS: u64 = 10_000;

#[derive(Serialize, Deserialize, Default, Clone)]
struct Order {
    id: u64,
    version: u64,
    status: String,
    note: String,
}

const ORDER_TABLE: Table<u64, Order> = Table::new("orders");

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum System {
    RawRocksDb,
    Outboxkv,
    Sqlite,
    Postgres,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::RawRocksDb => "raw RocksDB",
            System::Outboxkv => "outboxkv",
            System::Sqlite => "SQLite",
            System::Postgres => "PostgreSQL",
        }
    }
}

#[derive(Serialize, Clone)]
struct Row {
    system: &'static str,
    mode: &'static str,
    writers: usize,
    payload: usize,
    commits: u64,
    seconds: f64,
    commits_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    disk_bytes: u64,
    /// Peak RSS of this (client) process during the run; a PostgreSQL
    /// server's own memory is not included.
    peak_rss_bytes: u64,
}

fn order(id: u64) -> Order {
    Order {
        id,
        version: 0,
        status: "placed".into(),
        note: "x".repeat(64),
    }
}

fn pick(writer: usize, i: u64) -> u64 {
    (writer as u64 * 1_000_003 + i * 7_919) % ORDERS
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn peak_rss() -> u64 {
    common::proc_status_kib("VmHWM:") * 1024
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Runs `writers` threads for `duration`, each calling `commit(writer, i)`;
/// returns (commits, elapsed, sorted latencies in µs).
fn drive<F>(writers: usize, duration: Duration, commit: F) -> AnyResult<(u64, Duration, Vec<u64>)>
where
    F: Fn(usize, u64) -> AnyResult + Send + Sync + 'static,
{
    let commit = Arc::new(commit);
    let barrier = Arc::new(Barrier::new(writers + 1));
    let stop = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (commit, barrier, stop) = (commit.clone(), barrier.clone(), stop.clone());
            std::thread::spawn(move || -> AnyResult<Vec<u64>> {
                let mut lat = Vec::with_capacity(1 << 16);
                barrier.wait();
                let mut i = 0;
                while stop.load(Ordering::Relaxed) == 0 {
                    let t = Instant::now();
                    commit(w, i)?;
                    lat.push(t.elapsed().as_micros() as u64);
                    i += 1;
                }
                Ok(lat)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(duration);
    stop.store(1, Ordering::Relaxed);
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| "writer panicked")??);
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    Ok((all.len() as u64, elapsed, all))
}

struct Case {
    system: System,
    durable: bool,
    writers: usize,
    payload: usize,
}

/// Sets a system up in `dir`, runs the workload, reports.
fn run_case(case: &Case, dir: &Path, pg: Option<&str>, duration: Duration) -> AnyResult<Row> {
    let payload = vec![b'p'; case.payload];
    let _ = common::reset_peak_rss();
    let (commits, elapsed, lat, data_dir): (u64, Duration, Vec<u64>, PathBuf) = match case.system {
        System::RawRocksDb => {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            let db = Arc::new(DB::open(&opts, dir)?);
            for id in 0..ORDERS {
                db.put(
                    id.to_be_bytes(),
                    bincode::serde::encode_to_vec(order(id), bincode::config::standard())?,
                )?;
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(case.durable);
            let wo = Arc::new(wo);
            let seq = Arc::new(AtomicU64::new(0));
            let d = db.clone();
            let r = drive(case.writers, duration, move |w, i| {
                let id = pick(w, i);
                let mut o: Order = match d.get(id.to_be_bytes())? {
                    Some(v) => {
                        bincode::serde::decode_from_slice(&v, bincode::config::standard())?.0
                    }
                    None => order(id),
                };
                o.version += 1;
                let mut b = WriteBatch::default();
                b.put(
                    id.to_be_bytes(),
                    bincode::serde::encode_to_vec(&o, bincode::config::standard())?,
                );
                let s = seq.fetch_add(1, Ordering::Relaxed);
                let mut key = vec![b'o'];
                key.extend_from_slice(&s.to_be_bytes());
                b.put(key, &payload);
                d.write_opt(b, &wo)?;
                Ok(())
            })?;
            (r.0, r.1, r.2, dir.to_path_buf())
        }
        System::Outboxkv => {
            let store = Store::options()
                .durability(if case.durable {
                    Durability::Sync
                } else {
                    Durability::Buffered
                })
                .relay_cursor_poll(None)
                .open(dir)?;
            for chunk in 0..ORDERS / 1000 {
                let mut b = store.batch();
                for id in chunk * 1000..(chunk + 1) * 1000 {
                    b.put(&ORDER_TABLE, &id, &order(id))?;
                }
                b.commit()?;
            }
            let s = store.clone();
            let r = drive(case.writers, duration, move |w, i| {
                let id = pick(w, i);
                s.write(|tx| {
                    let mut o = tx
                        .get_for_update(&ORDER_TABLE, &id)?
                        .unwrap_or_else(|| order(id));
                    o.version += 1;
                    tx.put(&ORDER_TABLE, &id, &o)?;
                    tx.emit(Event::bytes(
                        "orders.updated",
                        id.to_string(),
                        payload.clone(),
                    ))
                })?;
                Ok(())
            })?;
            (r.0, r.1, r.2, dir.to_path_buf())
        }
        System::Sqlite => {
            let file = dir.join("bench.sqlite");
            let sync = if case.durable { "FULL" } else { "NORMAL" };
            let open = move |file: &Path| -> AnyResult<rusqlite::Connection> {
                let c = rusqlite::Connection::open(file)?;
                c.busy_timeout(Duration::from_secs(30))?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", sync)?;
                Ok(c)
            };
            let c = open(&file)?;
            c.execute_batch(
                "CREATE TABLE orders (id INTEGER PRIMARY KEY, state BLOB NOT NULL);
                 CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL,
                   key TEXT NOT NULL, payload BLOB NOT NULL, created_at INTEGER NOT NULL);",
            )?;
            {
                let tx = c.unchecked_transaction()?;
                for id in 0..ORDERS {
                    tx.execute(
                        "INSERT INTO orders (id, state) VALUES (?1, ?2)",
                        (id as i64, serde_json::to_vec(&order(id))?),
                    )?;
                }
                tx.commit()?;
            }
            drop(c);
            let conns: Vec<parking_lot::Mutex<rusqlite::Connection>> = (0..case.writers)
                .map(|_| open(&file).map(parking_lot::Mutex::new))
                .collect::<AnyResult<_>>()?;
            let conns = Arc::new(conns);
            let r = drive(case.writers, duration, move |w, i| {
                let id = pick(w, i) as i64;
                let mut c = conns[w].lock();
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let state: Vec<u8> =
                    tx.query_row("SELECT state FROM orders WHERE id = ?1", [id], |r| r.get(0))?;
                let mut o: Order = serde_json::from_slice(&state)?;
                o.version += 1;
                tx.execute(
                    "UPDATE orders SET state = ?1 WHERE id = ?2",
                    (serde_json::to_vec(&o)?, id),
                )?;
                tx.execute(
                    "INSERT INTO outbox (type, key, payload, created_at) VALUES ('orders.updated', ?1, ?2, ?3)",
                    (id.to_string(), &payload, now_micros()),
                )?;
                tx.commit()?;
                Ok(())
            })?;
            (r.0, r.1, r.2, dir.to_path_buf())
        }
        System::Postgres => {
            let conn_str = pg.ok_or("no PostgreSQL server")?.to_string();
            let mut c = postgres::Client::connect(&conn_str, postgres::NoTls)?;
            c.batch_execute(
                "DROP TABLE IF EXISTS orders; DROP TABLE IF EXISTS outbox;
                 CREATE TABLE orders (id BIGINT PRIMARY KEY, state BYTEA NOT NULL);
                 CREATE TABLE outbox (seq BIGSERIAL PRIMARY KEY, type TEXT NOT NULL, key TEXT NOT NULL,
                   payload BYTEA NOT NULL, created_at BIGINT NOT NULL);",
            )?;
            let mut tx = c.transaction()?;
            let ins = tx.prepare("INSERT INTO orders (id, state) VALUES ($1, $2)")?;
            for id in 0..ORDERS {
                tx.execute(&ins, &[&(id as i64), &serde_json::to_vec(&order(id))?])?;
            }
            tx.commit()?;
            c.batch_execute("CHECKPOINT")?;
            let sync = if case.durable { "on" } else { "off" };
            let conns: Vec<parking_lot::Mutex<postgres::Client>> = (0..case.writers)
                .map(|_| -> AnyResult<_> {
                    let mut c = postgres::Client::connect(&conn_str, postgres::NoTls)?;
                    c.batch_execute(&format!("SET synchronous_commit = {sync}"))?;
                    Ok(parking_lot::Mutex::new(c))
                })
                .collect::<AnyResult<_>>()?;
            let conns = Arc::new(conns);
            let r = drive(case.writers, duration, move |w, i| {
                let id = pick(w, i) as i64;
                let mut c = conns[w].lock();
                let mut tx = c.transaction()?;
                let row =
                    tx.query_one("SELECT state FROM orders WHERE id = $1 FOR UPDATE", &[&id])?;
                let mut o: Order = serde_json::from_slice(row.get::<_, &[u8]>(0))?;
                o.version += 1;
                tx.execute(
                    "UPDATE orders SET state = $1 WHERE id = $2",
                    &[&serde_json::to_vec(&o)?, &id],
                )?;
                tx.execute(
                    "INSERT INTO outbox (type, key, payload, created_at) VALUES ('orders.updated', $1, $2, $3)",
                    &[&id.to_string(), &payload, &now_micros()],
                )?;
                tx.commit()?;
                Ok(())
            })?;
            // The server's data folder is measured by the caller.
            (r.0, r.1, r.2, PathBuf::new())
        }
    };
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    Ok(Row {
        system: case.system.name(),
        mode: if case.durable { "durable" } else { "no fsync" },
        writers: case.writers,
        payload: case.payload,
        commits,
        seconds: elapsed.as_secs_f64(),
        commits_per_s: commits as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        disk_bytes: dir_size(&data_dir),
        peak_rss_bytes: peak_rss(),
    })
}

/// End to end: commit-to-broker-ack latency at a steady `rate` for `secs`,
/// with the outboxkv relay, a PostgreSQL polling relay (100 ms) and a
/// PostgreSQL LISTEN/NOTIFY relay, all shipping to the same JetStream.
#[derive(Serialize)]
struct E2eRow {
    system: &'static str,
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn nats_options(url: &str, stream: &str) -> NatsOptions {
    NatsOptions::new(url)
        .prefix(stream.to_lowercase())
        .create_stream(StreamSetup {
            name: stream.into(),
            subjects: vec![format!("{}.>", stream.to_lowercase())],
            duplicate_window: Duration::from_secs(120),
        })
}

/// The PostgreSQL side: a writer committing at `rate`, and a relay that
/// finds new rows by polling every 100 ms or on NOTIFY, publishes them to
/// JetStream (acks awaited), deletes them, and records commit-to-ack.
fn pg_relay_run(
    pg: &str,
    nats_url: &str,
    listen: bool,
    rate: u64,
    secs: u64,
) -> AnyResult<Vec<u64>> {
    let mut c = postgres::Client::connect(pg, postgres::NoTls)?;
    c.batch_execute(
        "DROP TABLE IF EXISTS e2e_outbox;
         CREATE TABLE e2e_outbox (seq BIGSERIAL PRIMARY KEY, key TEXT NOT NULL,
           payload BYTEA NOT NULL, created_at BIGINT NOT NULL);",
    )?;
    let total = rate * secs;
    let pg_w = pg.to_string();
    let writer = std::thread::spawn(move || -> AnyResult {
        let mut c = postgres::Client::connect(&pg_w, postgres::NoTls)?;
        let payload = vec![7u8; 300];
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_micros(i * 1_000_000 / rate);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO e2e_outbox (key, payload, created_at) VALUES ($1, $2, $3)",
                &[&format!("k{}", i % 50), &payload, &now_micros()],
            )?;
            if listen {
                tx.batch_execute("NOTIFY e2e_outbox")?;
            }
            tx.commit()?;
        }
        Ok(())
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = if listen { "PGLISTEN" } else { "PGPOLL" };
    let js = rt.block_on(async {
        let client = async_nats::connect(nats_url).await?;
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(stream).await;
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.into(),
            subjects: vec![format!("{}.>", stream.to_lowercase())],
            ..Default::default()
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(js)
    })?;
    let mut listener = postgres::Client::connect(pg, postgres::NoTls)?;
    if listen {
        listener.batch_execute("LISTEN e2e_outbox")?;
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut last: i64 = 0;
    let subject = format!("{}.orders", stream.to_lowercase());
    while (latencies.len() as u64) < total {
        if listen {
            // Wake on the first notification (or after 100 ms), then drain
            // whatever else queued up.
            use postgres::fallible_iterator::FallibleIterator;
            let mut n = listener.notifications();
            let mut it = n.timeout_iter(Duration::from_millis(100));
            it.next()?;
            drop(it);
            n.iter().count()?;
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
        let rows = c.query(
            "SELECT seq, key, payload, created_at FROM e2e_outbox WHERE seq > $1 ORDER BY seq LIMIT 5000",
            &[&last],
        )?;
        if rows.is_empty() {
            continue;
        }
        let created: Vec<i64> = rt.block_on(async {
            let mut acks = std::collections::VecDeque::new();
            let mut created = Vec::with_capacity(rows.len());
            for r in &rows {
                let seq: i64 = r.get(0);
                let payload: Vec<u8> = r.get(2);
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", seq.to_string().as_str());
                if acks.len() >= 1000
                    && let Some(a) = acks.pop_front()
                {
                    let _: async_nats::jetstream::publish::PublishAck = a.await?;
                }
                acks.push_back(
                    js.publish_with_headers(subject.clone(), h, payload.into())
                        .await?,
                );
                created.push(r.get::<_, i64>(3));
            }
            while let Some(a) = acks.pop_front() {
                let _: async_nats::jetstream::publish::PublishAck = a.await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(created)
        })?;
        let now = now_micros();
        latencies.extend(created.iter().map(|&t| (now - t).max(0) as u64));
        last = rows.last().map(|r| r.get::<_, i64>(0)).unwrap_or(last);
        c.execute("DELETE FROM e2e_outbox WHERE seq <= $1", &[&last])?;
    }
    writer.join().map_err(|_| "writer panicked")??;
    Ok(latencies)
}

fn e2e(pg: &str, rate: u64, secs: u64) -> AnyResult<Vec<E2eRow>> {
    let server = common::NatsServer::start(&[]).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (n, p50, p99, max) = rt.block_on(async {
        let sink = NatsSink::connect(nats_options(&server.url, "OKV"))
            .await
            .map_err(|e| e.to_string())?;
        sinks::latency_run(sink, "orders.changed", 300, rate, secs)
            .await
            .map_err(|e| e.to_string())
    })?;
    let mut rows = vec![E2eRow {
        system: "outboxkv relay (Sync commits)",
        events: n,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
    }];
    for (listen, name) in [
        (false, "PostgreSQL, 100 ms polling relay"),
        (true, "PostgreSQL, LISTEN/NOTIFY relay"),
    ] {
        let (n, p50, p99, max) =
            sinks::percentiles(pg_relay_run(pg, &server.url, listen, rate, secs)?);
        rows.push(E2eRow {
            system: name,
            events: n,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
        });
    }
    Ok(rows)
}

fn main() -> AnyResult {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this without `--bench`: keep that tiny.
    let tiny = !args.iter().any(|a| a == "--bench");
    let quick = tiny || args.iter().any(|a| a == "--quick");
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let (writers, payloads, duration): (&[usize], &[usize], Duration) = if tiny {
        (&[1, 4], &[100], Duration::from_millis(200))
    } else if quick {
        (&[1, 16], &[100], Duration::from_millis(1000))
    } else {
        (&[1, 4, 16], &[100, 1024], Duration::from_secs(3))
    };
    // Filters for profiling one case: --only SYSTEM (raw, outboxkv, sqlite,
    // postgres), --mode durable|nofsync, --writers N, --payload N, --no-e2e.
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let only = arg("--only");
    let only_mode = arg("--mode");
    let only_writers: Option<usize> = arg("--writers").and_then(|v| v.parse().ok());
    let only_payload: Option<usize> = arg("--payload").and_then(|v| v.parse().ok());
    let pg = Postgres::start()?;

    let mut rows = Vec::new();
    for &durable in &[true, false] {
        for &payload in payloads {
            for &w in writers {
                for system in [
                    System::RawRocksDb,
                    System::Outboxkv,
                    System::Sqlite,
                    System::Postgres,
                ] {
                    let short = match system {
                        System::RawRocksDb => "raw",
                        System::Outboxkv => "outboxkv",
                        System::Sqlite => "sqlite",
                        System::Postgres => "postgres",
                    };
                    if only.as_deref().is_some_and(|o| o != short)
                        || only_mode
                            .as_deref()
                            .is_some_and(|m| (m == "durable") != durable)
                        || only_writers.is_some_and(|n| n != w)
                        || only_payload.is_some_and(|n| n != payload)
                    {
                        continue;
                    }
                    let dir = tempfile::tempdir()?;
                    let case = Case {
                        system,
                        durable,
                        writers: w,
                        payload,
                    };
                    let mut row = run_case(&case, dir.path(), Some(&pg.conn), duration)?;
                    if system == System::Postgres {
                        row.disk_bytes = dir_size(&pg.dir.path().join("data"));
                    }
                    eprintln!(
                        "{:>12} {:>8} {:>2} writers {:>5} B: {:>9.0} commits/s",
                        row.system, row.mode, row.writers, row.payload, row.commits_per_s
                    );
                    rows.push(row);
                }
            }
        }
    }
    print_table(&rows);
    if args.iter().any(|a| a == "--no-e2e") {
        return Ok(());
    }
    let (rate, secs) = if tiny {
        (1000, 1)
    } else {
        (5000, if quick { 2 } else { 5 })
    };
    let e2e_rows = e2e(&pg.conn, rate, secs)?;
    println!();
    println!(
        "End to end, {rate} events/s for {secs} s, 300 B, to JetStream (commit to broker ack):"
    );
    println!();
    println!("| relay | events | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for r in &e2e_rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            r.system, r.events, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    if let Some(path) = json_out {
        let mut lines: Vec<String> = rows
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        for r in &e2e_rows {
            lines.push(serde_json::to_string(r)?);
        }
        std::fs::write(&path, lines.join("\n") + "\n")?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    let mut base: BTreeMap<(&str, usize, usize), f64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.system == "outboxkv") {
        base.insert((r.mode, r.writers, r.payload), r.commits_per_s);
    }
    println!(
        "| mode | writers | payload | system | commits/s | vs outboxkv | p50 µs | p99 µs | disk MiB | peak RSS MiB |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let ratio = base
            .get(&(r.mode, r.writers, r.payload))
            .map_or(0.0, |b| r.commits_per_s / b);
        println!(
            "| {} | {} | {} B | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.0} |",
            r.mode,
            r.writers,
            r.payload,
            r.system,
            r.commits_per_s,
            ratio,
            r.p50_us,
            r.p99_us,
            r.disk_bytes as f64 / (1 << 20) as f64,
            r.peak_rss_bytes as f64 / (1 << 20) as f64
        );
    }
}
