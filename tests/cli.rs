//! The `outbox-relay` binary, run as a process: the sidecar beside a writer
//! process (file sink and NATS), status / inspect / dlq output, SIGTERM,
//! `--drain`, and bad input that must leave the store untouched.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::NatsServer;
use outboxkv::codec::StoreMeta;
use outboxkv::{DeadLetter, Event, Store};
use serde_json::Value;

use common::TestResult;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn relay_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("OUTBOXKV_DB")
        .env("OUTBOXKV_LOG", "warn");
    c
}

fn run_cli(args: &[&str]) -> Result<Output, Box<dyn std::error::Error>> {
    Ok(relay_cmd(args).output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// This test binary, run again as the writer process (see `writer_child`).
fn spawn_writer(store: &Path, events: u64) -> Result<Child, Box<dyn std::error::Error>> {
    Ok(Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("OUTBOXKV_WRITER_STORE", store)
        .env("OUTBOXKV_WRITER_EVENTS", events.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// A child that has exited already (a placeholder).
fn spawn_dummy() -> Result<Child, Box<dyn std::error::Error>> {
    Ok(Command::new("true").spawn()?)
}

/// The writer process: commits events one by one (Sync), then waits until
/// its own store has pruned everything the sidecar delivered. Not a test of
/// its own: the sidecar tests run it in a child process.
#[test]
#[ignore = "the writer process of the sidecar tests, run by them as a child"]
fn writer_child() -> TestResult {
    let path = std::env::var("OUTBOXKV_WRITER_STORE")?;
    let events: u64 = std::env::var("OUTBOXKV_WRITER_EVENTS")?.parse()?;
    let store = Store::open(&path)?;
    for i in 0..events {
        store.write(|tx| {
            tx.emit(Event::json(
                "orders.changed",
                format!("order-{}", i % 17),
                &serde_json::json!({ "i": i }),
            )?)
        })?;
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.outbox().depth() > 0 {
        assert!(
            Instant::now() < deadline,
            "the sidecar's deliveries were not pruned: depth {}",
            store.outbox().depth()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(store.outbox().tail(), store.outbox().head() + 1);
    println!("WRITER-PRUNED-ALL");
    Ok(())
}

/// The `outboxseq` of every line of a file sink's output, in order.
fn file_seqs(path: &Path) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let mut seqs = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        seqs.push(v["outboxseq"].as_u64().ok_or("no outboxseq")?);
    }
    Ok(seqs)
}

fn wait_for_file(path: &Path) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn wait_child(child: &mut Child, timeout: Duration) -> Result<Output, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("child did not exit in time".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait()?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_end(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_end(&mut err)?;
    }
    Ok(Output {
        status,
        stdout: out,
        stderr: err,
    })
}

fn sigterm(child: &Child) -> TestResult {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    Ok(())
}

/// Runs a writer process and an `outbox-relay run` sidecar with `sink_args`;
/// returns once the writer saw its store pruned and the sidecar exited 0 on
/// SIGTERM.
fn writer_and_sidecar(store: &Path, events: u64, sink_args: &[&str]) -> TestResult {
    let mut writer = spawn_writer(store, events)?;
    wait_for_file(&store.join("OUTBOXKV"))?;
    wait_for_file(&store.join("db").join("CURRENT"))?;
    let db = store.to_string_lossy().into_owned();
    let mut args = vec![
        "run",
        "--db",
        &db,
        "--metrics-addr",
        "off",
        "--catch-up-ms",
        "10",
    ];
    args.extend_from_slice(sink_args);
    let mut sidecar = relay_cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let w = wait_child(&mut writer, Duration::from_secs(120))?;
    if !(w.status.success() && stdout(&w).contains("WRITER-PRUNED-ALL")) {
        sigterm(&sidecar)?;
        let s = wait_child(&mut sidecar, Duration::from_secs(30))?;
        panic!(
            "writer: {}\n{}\nsidecar: {:?}\n{}",
            stdout(&w),
            stderr(&w),
            s.status,
            stderr(&s)
        );
    }
    sigterm(&sidecar)?;
    let s = wait_child(&mut sidecar, Duration::from_secs(30))?;
    assert!(s.status.success(), "sidecar: {:?} {}", s.status, stderr(&s));
    Ok(())
}

#[test]
fn the_sidecar_ships_a_live_writers_events_once_to_a_file_and_the_writer_prunes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let out = dir.path().join("events.jsonl");
    let out_s = out.to_string_lossy().into_owned();
    writer_and_sidecar(&store, 1500, &["--sink", "file", "--file", &out_s])?;

    let text = std::fs::read_to_string(&out)?;
    let mut ids = HashSet::new();
    let mut seqs = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        ids.insert(v["id"].as_str().ok_or("no id")?.to_string());
        seqs.push(v["outboxseq"].as_u64().ok_or("no outboxseq")?);
    }
    assert_eq!(
        seqs,
        (1..=1500).collect::<Vec<u64>>(),
        "once each, in order"
    );
    assert_eq!(ids.len(), 1500);
    // The cursor file says the same.
    let status = run_cli(&["status", "--db", &store.to_string_lossy(), "--json"])?;
    let v: Value = serde_json::from_str(&stdout(&status))?;
    assert_eq!(v["sidecar_cursor"]["delivered_through"], 1500);
    assert_eq!(v["depth"], 0);
    Ok(())
}

/// A secondary instance can go stale when its primary restarts
/// (facebook/rocksdb#13297, #12190): the writer runs, exits, and runs again
/// while one sidecar keeps going.
#[test]
fn the_sidecar_follows_the_writer_across_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let out = dir.path().join("events.jsonl");
    let mut first = spawn_writer(&store, 300)?;
    wait_for_file(&store.join("db").join("CURRENT"))?;
    let mut sidecar = relay_cmd(&[
        "run",
        "--db",
        &store.to_string_lossy(),
        "--sink",
        "file",
        "--file",
        &out.to_string_lossy(),
        "--metrics-addr",
        "off",
        "--catch-up-ms",
        "10",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    for run in 0..2 {
        let mut writer = if run == 0 {
            std::mem::replace(&mut first, spawn_dummy()?)
        } else {
            spawn_writer(&store, 300)?
        };
        let w = wait_child(&mut writer, Duration::from_secs(120))?;
        assert!(
            w.status.success() && stdout(&w).contains("WRITER-PRUNED-ALL"),
            "writer: {}\n{}",
            stdout(&w),
            stderr(&w)
        );
    }
    sigterm(&sidecar)?;
    let s = wait_child(&mut sidecar, Duration::from_secs(30))?;
    assert!(s.status.success(), "sidecar: {}", stderr(&s));
    let seqs: Vec<u64> = file_seqs(&out)?;
    assert_eq!(seqs, (1..=600).collect::<Vec<u64>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_ships_a_live_writers_events_once_to_nats() -> TestResult {
    let server = NatsServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let url = server.url.clone();
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        writer_and_sidecar(
            &s,
            1000,
            &[
                "--sink",
                "nats",
                "--nats-url",
                &url,
                "--nats-stream",
                "EVENTS",
            ],
        )
        .map_err(|e| e.to_string())
    })
    .await??;

    let js = async_nats::jetstream::new(async_nats::connect(server.url.as_str()).await?);
    let mut stream = js.get_stream("EVENTS").await?;
    let info = stream.info().await?;
    assert_eq!(info.state.messages, 1000);
    let mut ids = HashSet::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = stream.get_raw_message(seq).await?;
        ids.insert(m.headers.get("Nats-Msg-Id").ok_or("no id")?.to_string());
    }
    assert_eq!(ids.len(), 1000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_authenticates_to_nats_with_a_token_from_the_environment() -> TestResult {
    let server = NatsServer::start(&["--auth", "s3cret-token"])?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(known_store(&path)?);
    let o = relay_cmd(&[
        "run",
        "--drain",
        "--db",
        &path.to_string_lossy(),
        "--sink",
        "nats",
        "--nats-url",
        &server.url,
        "--nats-stream",
        "EVENTS",
        "--metrics-addr",
        "off",
    ])
    .env("OUTBOXKV_NATS_TOKEN", "s3cret-token")
    .output()?;
    assert!(o.status.success(), "{}", stderr(&o));
    let client = async_nats::ConnectOptions::with_token("s3cret-token".into())
        .connect(server.url.as_str())
        .await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EVENTS").await?;
    assert_eq!(stream.info().await?.state.messages, 4);
    // A wrong token is said to be one, at once, not a timeout.
    let store = Store::open(&path)?;
    store.write(|tx| tx.emit(Event::bytes("more", "k", b"1".to_vec())))?;
    drop(store);
    let o = relay_cmd(&[
        "run",
        "--drain",
        "--db",
        &path.to_string_lossy(),
        "--sink",
        "nats",
        "--nats-url",
        &server.url,
        "--metrics-addr",
        "off",
    ])
    .env("OUTBOXKV_NATS_TOKEN", "wrong")
    .output()?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).to_lowercase().contains("authorization"),
        "{}",
        stderr(&o)
    );
    assert_eq!(Store::open(&path)?.outbox().depth(), 1, "nothing shipped");
    Ok(())
}

/// A store with 4 entries (seqs 3..=6 after two were pruned) and two dead
/// letters (seqs 1 and 2).
fn known_store(path: &Path) -> Result<Store, Box<dyn std::error::Error>> {
    let store = Store::open(path)?;
    for (ty, key, body) in [
        ("orders.placed", "k1", r#"{"n":1}"#),
        ("orders.placed", "k2", r#"{"n":2}"#),
        ("orders.paid", "k1", r#"{"n":3}"#),
        ("orders.paid", "k2", r#"{"n":4}"#),
        ("orders.shipped", "k1", r#"{"n":5}"#),
    ] {
        store.write(|tx| {
            tx.emit(
                Event::bytes(ty, key, body.as_bytes().to_vec())
                    .with_content_type("application/json"),
            )
        })?;
    }
    store.write(|tx| tx.emit(Event::bytes("blobs.saved", "k3", vec![0xff, 0x00, 0x80])))?;
    let outbox = store.outbox();
    let dead: Vec<DeadLetter> = outbox
        .read(1, 2)?
        .into_iter()
        .map(|entry| DeadLetter {
            entry,
            error: "broker said no".into(),
            attempts: 3,
            first_failed_micros: 1,
            dead_at_micros: 2,
        })
        .collect();
    outbox.complete_through(2, &dead)?;
    Ok(store)
}

#[test]
fn status_inspect_and_dlq_report_a_known_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let id = known_store(&path)?.id();
    let db = path.to_string_lossy().into_owned();

    let o = run_cli(&["status", "--db", &db, "--json"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o))?;
    assert_eq!(v["store_id"], id.to_string());
    assert_eq!(v["format_version"], 1);
    assert_eq!((v["head"].as_u64(), v["tail"].as_u64()), (Some(6), Some(3)));
    assert_eq!(v["depth"], 4);
    assert_eq!(v["undelivered"], 4);
    assert_eq!(v["dead_letters"], 2);
    assert!(v["oldest_undelivered_age_seconds"].as_f64().is_some());
    assert!(v["sidecar_cursor"].is_null());

    let o = run_cli(&["status", "--db", &db])?;
    let table = stdout(&o);
    assert!(
        table.contains("outbox depth") && table.contains(&id.to_string()),
        "{table}"
    );

    let o = run_cli(&["inspect", "--db", &db, "--json"])?;
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let seqs: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    assert_eq!(lines[0]["payload"], serde_json::json!({"n": 3}));
    assert_eq!(lines[0]["type"], "orders.paid");
    assert_eq!(lines[3]["payload"]["base64"], "/wCA");

    let o = run_cli(&["inspect", "--db", &db, "--key", "k1", "--json"])?;
    let seqs: Vec<u64> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).map(|v| v["seq"].as_u64()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(seqs, vec![3, 5]);
    let o = run_cli(&[
        "inspect",
        "--db",
        &db,
        "--type",
        "orders.paid",
        "--from",
        "4",
    ])?;
    let text = stdout(&o);
    assert!(
        text.contains("seq 4") && !text.contains("seq 3") && text.contains("(1 entries)"),
        "{text}"
    );

    let o = run_cli(&["dlq", "list", "--db", &db, "--json"])?;
    let dead: Vec<Value> = stdout(&o)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["seq"], 1);
    assert_eq!(dead[0]["error"], "broker said no");
    assert_eq!(dead[0]["payload"], serde_json::json!({"n": 1}));

    let o = run_cli(&["dlq", "replay", "--db", &db, "--seq", "2"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_cli(&["dlq", "purge", "--db", &db, "--seq", "9"])?;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no dead letter with seq 9"),
        "{}",
        stderr(&o)
    );
    let o = run_cli(&["dlq", "purge", "--db", &db, "--all"])?;
    assert!(o.status.success(), "{}", stderr(&o));

    let store = Store::open(&path)?;
    assert_eq!(store.outbox().dead_letters().count()?, 0);
    assert_eq!(store.outbox().head(), 7);
    let replayed = store.outbox().get(7)?.ok_or("replayed entry missing")?;
    assert_eq!(replayed.id.to_string(), format!("{id}-2"), "same event id");
    Ok(())
}

#[test]
fn dlq_replay_refuses_a_store_the_service_holds() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let held = known_store(&path)?;
    let db = path.to_string_lossy().into_owned();
    let o = run_cli(&["dlq", "replay", "--db", &db, "--all"])?;
    // Held by the service: a run-time refusal, not bad input.
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("open in another process"),
        "{}",
        stderr(&o)
    );
    // Reading works while the service holds the store, and sees its commits.
    held.write(|tx| tx.emit(Event::bytes("late", "k9", b"late".to_vec())))?;
    let o = run_cli(&["status", "--db", &db, "--json"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o))?;
    assert_eq!(v["head"], 7);
    assert_eq!(
        run_cli(&["dlq", "list", "--db", &db])?.status.code(),
        Some(0)
    );
    Ok(())
}

#[test]
fn a_second_sidecar_on_the_same_store_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(known_store(&path)?);
    let db = path.to_string_lossy().into_owned();
    let out = dir.path().join("out.jsonl");
    let out_s = out.to_string_lossy().into_owned();
    let args = [
        "run",
        "--db",
        &db,
        "--sink",
        "file",
        "--file",
        &out_s,
        "--metrics-addr",
        "off",
    ];
    let mut first = relay_cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The first one is running once it has shipped the 4 entries.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&out)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 4
    {
        assert!(
            Instant::now() < deadline,
            "the first sidecar shipped nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run_cli(&args)?;
    // A held lock is not bad input (exit 2) but a run-time refusal (1).
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("LOCK"), "{}", stderr(&o));
    assert!(stderr(&o).contains("another relay"), "{}", stderr(&o));
    sigterm(&first)?;
    assert!(
        wait_child(&mut first, Duration::from_secs(30))?
            .status
            .success()
    );
    assert_eq!(
        std::fs::read_to_string(&out)?.lines().count(),
        4,
        "shipped once"
    );
    Ok(())
}

/// A minimal HTTP GET. `write!` sends the request in several pieces, which
/// the server must put together (it once answered the first piece alone).
fn http_get(addr: &str, path: &str) -> Result<String, Box<dyn std::error::Error>> {
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn http_get_accept(
    addr: &str,
    path: &str,
    accept: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn free_port() -> Result<u16, Box<dyn std::error::Error>> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn sigterm_drains_and_exits_zero_and_metrics_are_served() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    {
        let store = Store::open(&path)?;
        for i in 0..300u32 {
            store.write(|tx| tx.emit(Event::bytes("pings", "k", i.to_be_bytes().to_vec())))?;
        }
    }
    let out = dir.path().join("out.jsonl");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut sidecar = relay_cmd(&[
        "run",
        "--db",
        &path.to_string_lossy(),
        "--sink",
        "file",
        "--file",
        &out.to_string_lossy(),
        "--metrics-addr",
        &addr,
        "--log-format",
        "json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    // Metrics show the cursor reaching the head; /healthz is then healthy.
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        if let Ok(m) = http_get(&addr, "/metrics")
            && m.contains(r#"outboxkv_relay_delivered_seq{sink="file"} 300"#)
        {
            break m;
        }
        assert!(Instant::now() < deadline, "metrics never showed seq 300");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(r#"outboxkv_relay_acked_total{sink="file"} 300"#),
        "{metrics}"
    );
    // Served as the Prometheus text format it is, which promtool accepts;
    // OpenMetrics when asked for (it was OpenMetrics labelled as text 0.0.4,
    // and promtool put the counter types on the wrong names).
    assert!(
        metrics
            .to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{metrics}"
    );
    let body = metrics.split("\r\n\r\n").nth(1).ok_or("no body")?;
    let (ok, printed) = common::promtool_check(body)?;
    assert!(ok, "promtool: {printed}\n{body}");
    let open = http_get_accept(
        &addr,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )?;
    assert!(
        open.to_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{open}"
    );
    assert!(open.trim_end().ends_with("# EOF"), "{open}");
    let health = http_get(&addr, "/healthz")?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(http_get(&addr, "/nope")?.starts_with("HTTP/1.1 404"));

    sigterm(&sidecar)?;
    let o = wait_child(&mut sidecar, Duration::from_secs(30))?;
    assert!(o.status.success(), "{:?}: {}", o.status, stderr(&o));
    assert_eq!(std::fs::read_to_string(&out)?.lines().count(), 300);
    // The owner prunes what the sidecar delivered when it next opens.
    let store = Store::open(&path)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.outbox().depth() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(store.outbox().depth(), 0);
    Ok(())
}

#[test]
fn drain_mode_ships_everything_then_exits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(known_store(&path)?);
    let out = dir.path().join("out.jsonl");
    let o = run_cli(&[
        "run",
        "--drain",
        "--db",
        &path.to_string_lossy(),
        "--sink",
        "file",
        "--file",
        &out.to_string_lossy(),
        "--metrics-addr",
        "off",
    ])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let seqs: Vec<u64> = file_seqs(&out)?;
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    assert_eq!(Store::open(&path)?.outbox().depth(), 0);
    Ok(())
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

fn assert_refused(args: &[&str], expect: &str, dir: &Path) -> TestResult {
    assert_refused_with(2, args, expect, dir)
}

/// Like `assert_refused`, with exit code `code` (1: not bad input, but
/// damage found or a refusal at run time).
fn assert_refused_with(code: i32, args: &[&str], expect: &str, dir: &Path) -> TestResult {
    let before = snapshot(dir);
    let o = run_cli(args)?;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in {err}"
    );
    assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout");
    assert_eq!(snapshot(dir), before, "{args:?} changed files");
    Ok(())
}

#[test]
fn bad_input_is_a_one_line_error_and_leaves_everything_unchanged() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let missing = root.join("missing");
    let other = root.join("other");
    std::fs::create_dir_all(&other)?;
    std::fs::write(other.join("notes.txt"), "not a store")?;
    let good = root.join("good");
    drop(known_store(&good)?);
    let newer = root.join("newer");
    drop(known_store(&newer)?);
    let mut meta = StoreMeta::decode(&std::fs::read(newer.join("OUTBOXKV"))?)?;
    meta.format_version = 99;
    std::fs::write(newer.join("OUTBOXKV"), meta.encode())?;
    let damaged = root.join("damaged");
    drop(known_store(&damaged)?);
    std::fs::create_dir_all(damaged.join("relay"))?;
    std::fs::write(
        damaged.join("relay/cursor"),
        b"OKVCURSR garbage garbage garbage garbage garbage",
    )?;
    let bad_toml = root.join("bad.toml");
    std::fs::write(&bad_toml, "batch_size = \"many\"\n")?;
    let unknown_toml = root.join("unknown.toml");
    std::fs::write(&unknown_toml, "batchsize = 5\n")?;
    let out = root.join("out.jsonl");
    let (out, good_s) = (
        out.to_string_lossy().into_owned(),
        good.to_string_lossy().into_owned(),
    );
    let p = |p: &Path| p.to_string_lossy().into_owned();

    for (db, expect, code) in [
        (p(&missing), "does not exist", 2),
        (p(&other), "not an outboxkv store", 2),
        (p(&newer), "format", 2),
        // Damage is not bad input: exit 1, still one line, nothing changed.
        (p(&damaged), "cursor", 1),
    ] {
        assert_refused_with(code, &["status", "--db", &db], expect, root)?;
        assert_refused_with(
            code,
            &[
                "run",
                "--db",
                &db,
                "--sink",
                "file",
                "--file",
                &out,
                "--metrics-addr",
                "off",
            ],
            expect,
            root,
        )?;
    }
    for (db, expect) in [
        (p(&missing), "does not exist"),
        (p(&other), "not an outboxkv store"),
        (p(&newer), "format"),
    ] {
        assert_refused(&["inspect", "--db", &db], expect, root)?;
        assert_refused(&["dlq", "list", "--db", &db], expect, root)?;
        assert_refused(&["dlq", "purge", "--db", &db, "--all"], expect, root)?;
    }
    assert_refused(
        &["run", "--db", &good_s, "--sink", "carrier-pigeon"],
        "unknown sink",
        root,
    )?;
    assert_refused(
        &[
            "run",
            "--db",
            &good_s,
            "--sink",
            "kafka",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--kafka-option",
            "acks",
        ],
        "expected KEY=VALUE",
        root,
    )?;
    assert_refused(
        &[
            "run",
            "--db",
            &good_s,
            "--sink",
            "nats",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nats-user",
            "me",
        ],
        "go together",
        root,
    )?;
    assert_refused(
        &["run", "--db", &good_s, "--config", &p(&bad_toml)],
        "batch_size",
        root,
    )?;
    assert_refused(
        &["run", "--db", &good_s, "--config", &p(&unknown_toml)],
        "unknown field",
        root,
    )?;
    assert_refused(
        &[
            "run",
            "--db",
            &good_s,
            "--sink",
            "file",
            "--file",
            &out,
            "--metrics-addr",
            "everywhere",
        ],
        "metrics_addr",
        root,
    )?;
    Ok(())
}

#[test]
fn flags_win_over_environment_and_environment_over_the_config_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(known_store(&path)?);
    let from_file = dir.path().join("from-file.jsonl");
    let from_env = dir.path().join("from-env.jsonl");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "db = {:?}\nsink = \"file\"\nfile = {:?}\nmetrics_addr = \"off\"\n",
            path.to_string_lossy(),
            from_file.to_string_lossy()
        ),
    )?;
    // The file alone.
    let o = relay_cmd(&["run", "--drain", "--config", &config.to_string_lossy()]).output()?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&from_file)?.lines().count(), 4);
    // The environment over the file, a flag over the environment.
    let store = Store::open(&path)?;
    store.write(|tx| tx.emit(Event::bytes("more", "k", b"1".to_vec())))?;
    drop(store);
    let o = relay_cmd(&["run", "--drain", "--config", &config.to_string_lossy()])
        .env("OUTBOXKV_FILE", &from_env)
        .env("OUTBOXKV_SINK", "carrier-pigeon")
        .arg("--sink")
        .arg("file")
        .output()?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&from_env)?.lines().count(), 1);
    assert_eq!(std::fs::read_to_string(&from_file)?.lines().count(), 4);
    Ok(())
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `status` reports the relay lock, the cursor's age and store, and exits
/// 1 when unhealthy; `dlq` selects by type and key, refuses a repeated
/// seq, lists with a limit; `inspect --follow` prints what is committed.
#[test]
fn operator_commands_select_report_and_follow() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let id = known_store(&path)?.id();
    let db = path.to_string_lossy().into_owned();

    // Unhealthy: undelivered entries older than the limit (0 s here).
    let o = run_cli(&["status", "--db", &db, "--json", "--max-lag-secs", "0"])?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o))?;
    assert_eq!(
        (v["healthy"].as_bool(), v["relay_running"].as_bool()),
        (Some(false), Some(false))
    );
    assert!(stderr(&o).contains("unhealthy"), "{}", stderr(&o));

    // A sidecar running: status says so, and reports its cursor.
    let out = dir.path().join("out.jsonl");
    let out_s = out.to_string_lossy().into_owned();
    let mut sidecar = relay_cmd(&[
        "run",
        "--db",
        &db,
        "--sink",
        "file",
        "--file",
        &out_s,
        "--metrics-addr",
        "off",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    wait_for("the sidecar's cursor", Duration::from_secs(30), || {
        path.join("relay/cursor").exists().then_some(())
    })?;
    let o = run_cli(&["status", "--db", &db, "--json"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o))?;
    assert_eq!(v["relay_running"], true);
    assert_eq!(v["sidecar_cursor"]["store_id"], id.to_string());
    assert!(v["sidecar_cursor"]["age_seconds"].as_f64().is_some(), "{v}");
    sigterm(&sidecar)?;
    assert!(
        wait_child(&mut sidecar, Duration::from_secs(30))?
            .status
            .success()
    );

    // dlq: a repeated seq is refused (it once replayed one event twice).
    let o = run_cli(&["dlq", "replay", "--db", &db, "--seq", "1,1"])?;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("more than once"), "{}", stderr(&o));
    let o = run_cli(&["dlq", "list", "--db", &db, "--limit", "1", "--json"])?;
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    // By type and key: seq 2 is (orders.placed, k2).
    let o = run_cli(&[
        "dlq",
        "purge",
        "--db",
        &db,
        "--type",
        "orders.placed",
        "--key",
        "k2",
    ])?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("purged 1 dead letters"),
        "{}",
        stdout(&o)
    );
    let o = run_cli(&["dlq", "list", "--db", &db, "--json"])?;
    let left: Vec<Value> = stdout(&o)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["seq"], 1);

    // inspect --follow prints a commit made while it runs.
    let mut follow = relay_cmd(&["inspect", "--db", &db, "--json", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(follow.stdout.take().ok_or("stdout")?);
    std::thread::sleep(Duration::from_millis(500));
    let store = Store::open(&path)?;
    let c = store.write(|tx| tx.emit(Event::bytes("followed", "kf", b"{}".to_vec())))?;
    let seen = std::thread::spawn(move || -> Result<Value, String> {
        use std::io::BufRead;
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("inspect --follow ended".into());
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            if v["type"] == "followed" {
                return Ok(v);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let v = seen.join().map_err(|_| "reader panicked")??;
    assert_eq!(v["seq"], c.seqs.start);
    Ok(())
}

/// An idle sidecar is healthy (it once answered 503 forever, so a liveness
/// probe killed it). With its broker down at start it keeps running,
/// unhealthy and `sink_up 0`, saying why, and delivers once the broker is
/// there (it once exited 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sidecar_is_healthy_and_a_missing_broker_is_waited_for() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(Store::open(&path)?);
    let db = path.to_string_lossy().into_owned();
    let out = dir.path().join("out.jsonl").to_string_lossy().into_owned();
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut idle = relay_cmd(&[
        "run",
        "--db",
        &db,
        "--sink",
        "file",
        "--file",
        &out,
        "--metrics-addr",
        &addr,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let health = wait_for(
        "an idle sidecar to be healthy",
        Duration::from_secs(30),
        || {
            http_get(&addr, "/healthz")
                .ok()
                .filter(|h| h.starts_with("HTTP/1.1 200"))
        },
    )?;
    assert!(health.ends_with("ok\n"), "{health}");
    // And it stays so while idle.
    std::thread::sleep(Duration::from_millis(500));
    assert!(http_get(&addr, "/healthz")?.starts_with("HTTP/1.1 200"));
    sigterm(&idle)?;
    assert!(
        wait_child(&mut idle, Duration::from_secs(30))?
            .status
            .success()
    );

    // The broker is not there yet.
    let store = Store::open(&path)?;
    store.write(|tx| {
        (0..5u8).try_for_each(|i| tx.emit(Event::bytes("orders.paid", "k", vec![i])))
    })?;
    let nats_port = free_port()?;
    let url = format!("nats://127.0.0.1:{nats_port}");
    let mut sidecar = relay_cmd(&[
        "run",
        "--db",
        &db,
        "--sink",
        "nats",
        "--nats-url",
        &url,
        "--nats-stream",
        "EVENTS",
        "--metrics-addr",
        &addr,
        "--max-lag-secs",
        "1",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    // "connecting" first, then (after the first attempt) why it is not up.
    let health = match wait_for(
        "an unhealthy answer naming the cause",
        Duration::from_secs(40),
        || {
            http_get(&addr, "/healthz")
                .ok()
                .filter(|h| h.contains("unreachable"))
        },
    ) {
        Ok(h) => h,
        Err(e) => {
            let _ = sidecar.kill();
            let o = wait_child(&mut sidecar, Duration::from_secs(5))?;
            return Err(format!("{e}: {}", stderr(&o)).into());
        }
    };
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    let metrics = http_get(&addr, "/metrics")?;
    assert!(
        metrics.contains(r#"outboxkv_relay_sink_up{sink="nats"} 0"#),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        sidecar.try_wait()?.is_none(),
        "the sidecar exited while the broker was down"
    );

    let server = NatsServer::start_on_port(nats_port)?;
    wait_for(
        "delivery once the broker is up",
        Duration::from_secs(60),
        || {
            http_get(&addr, "/metrics")
                .ok()
                .filter(|m| m.contains(r#"outboxkv_relay_delivered_seq{sink="nats"} 5"#))
        },
    )?;
    let health = http_get(&addr, "/healthz")?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // A broker that hangs (stopped, not gone): the publish waits, and the
    // sidecar is unhealthy while it does (it once stayed 200 while a
    // publish hung).
    let pid = std::fs::read_to_string(server.dir.path().join("nats.pid"))?
        .trim()
        .to_string();
    Command::new("kill").args(["-STOP", &pid]).status()?;
    store.write(|tx| tx.emit(Event::bytes("orders.paid", "k", vec![9])))?;
    let hung = wait_for(
        "an unhealthy answer while the broker hangs",
        Duration::from_secs(30),
        || {
            http_get(&addr, "/healthz")
                .ok()
                .filter(|h| h.starts_with("HTTP/1.1 503"))
        },
    );
    Command::new("kill").args(["-CONT", &pid]).status()?;
    let hung = hung?;
    assert!(
        hung.contains("publish has waited") || hung.contains("lag"),
        "{hung}"
    );
    wait_for(
        "health once the broker answers again",
        Duration::from_secs(60),
        || {
            http_get(&addr, "/healthz")
                .ok()
                .filter(|h| h.starts_with("HTTP/1.1 200"))
        },
    )?;
    drop(store);
    sigterm(&sidecar)?;
    let o = wait_child(&mut sidecar, Duration::from_secs(30))?;
    assert!(o.status.success(), "{}", stderr(&o));
    let client = async_nats::connect(server.url.as_str()).await?;
    let js = async_nats::jetstream::new(client);
    assert_eq!(
        js.get_stream("EVENTS").await?.info().await?.state.messages,
        6
    );
    Ok(())
}

/// Passwords, tokens and `sasl.password` never reach stderr: not in a config
/// error, not in a connection error, not in the logs.
#[test]
fn secrets_never_reach_errors_or_logs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(known_store(&path)?);
    let db = path.to_string_lossy().into_owned();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, "nats_password = 98765432\n")?;
    let o = run_cli(&["run", "--db", &db, "--config", &cfg.to_string_lossy()])?;
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("98765432"), "{}", stderr(&o));
    assert!(stderr(&o).contains("nats_password"), "{}", stderr(&o));

    let secret_file = dir.path().join("kafka.pw");
    std::fs::write(&secret_file, "file-secret-777\n")?;
    for args in [
        vec![
            "--sink",
            "nats",
            "--nats-url",
            "nats://alice:url-secret-123@127.0.0.1:1",
            "--nats-stream",
            "S",
        ],
        vec![
            "--sink",
            "nats",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nats-user",
            "bob",
            "--nats-password",
            "flag-secret-456",
        ],
        vec![
            "--sink",
            "kafka",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--kafka-option",
            "security.protocol=SASL_PLAINTEXT",
            "--kafka-option",
            "sasl.mechanism=PLAIN",
            "--kafka-option",
            "sasl.username=u",
            "--kafka-option-file",
        ],
    ] {
        let mut full = vec!["run", "--drain", "--db", &db, "--metrics-addr", "off"];
        full.extend(args.iter().copied());
        let file_arg = format!("sasl.password={}", secret_file.display());
        if full.last() == Some(&"--kafka-option-file") {
            full.push(&file_arg);
        }
        let o = relay_cmd(&full).env("OUTBOXKV_LOG", "debug").output()?;
        assert_eq!(o.status.code(), Some(1), "{full:?}: {}", stderr(&o));
        let err = stderr(&o);
        for secret in ["url-secret-123", "flag-secret-456", "file-secret-777"] {
            assert!(!err.contains(secret), "{secret} in: {err}");
        }
    }
    Ok(())
}

/// A drain that cannot finish (a full discard-new stream refuses all but
/// one entry) says how many entries are left and exits 1, for `--drain`
/// and for SIGTERM on a sidecar; nothing is dead-lettered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_says_how_many_are_left_and_fails() -> TestResult {
    use async_nats::jetstream;
    let server = NatsServer::start(&[])?;
    let js = jetstream::new(async_nats::connect(server.url.as_str()).await?);
    js.create_stream(jetstream::stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        max_messages: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    drop(known_store(&path)?);
    let db = path.to_string_lossy().into_owned();
    let nats = [
        "--sink",
        "nats",
        "--nats-url",
        server.url.as_str(),
        "--nats-stream",
        "EVENTS",
        "--drain-timeout-secs",
        "2",
        "--metrics-addr",
        "off",
    ];
    let mut args = vec!["run", "--drain", "--db", &db];
    args.extend(nats);
    let started = Instant::now();
    let o = relay_cmd(&args).output()?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("3 entries still undelivered after the drain timeout"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let store = Store::open(&path)?;
    assert_eq!(store.outbox().depth(), 3);
    assert_eq!(store.outbox().dead_letters().count()?, 2, "none added");
    drop(store);

    // The sidecar: SIGTERM starts the same bounded drain.
    let mut args = vec!["run", "--db", &db];
    args.extend(nats);
    let mut sidecar = relay_cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&sidecar)?;
    let o = wait_child(&mut sidecar, Duration::from_secs(30))?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("3 entries still undelivered after the drain timeout"),
        "{}",
        stderr(&o)
    );
    let mut stream = js.get_stream("EVENTS").await?;
    assert_eq!(stream.info().await?.state.messages, 1);

    // SIGTERM during a long `--drain` stops it at once, saying what is
    // left, instead of waiting out the drain timeout.
    let mut args = vec!["run", "--drain", "--db", &db];
    args.extend(nats);
    let at = args
        .iter()
        .position(|a| *a == "2")
        .ok_or("no timeout argument")?;
    args[at] = "120";
    let started = Instant::now();
    let mut drain = relay_cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&drain)?;
    let o = wait_child(&mut drain, Duration::from_secs(30))?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("SIGTERM: drain stopped; 3 entries left"),
        "{}",
        stderr(&o)
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "waited out the drain"
    );
    Ok(())
}

/// Catch-ups with the service that keep failing (the database's `CURRENT`
/// file is gone, so the sidecar cannot find the service's manifest) make
/// `/healthz` answer 503 naming the cause; once it is back the sidecar is
/// healthy again and delivers what was written meanwhile.
#[test]
fn failing_catch_ups_make_the_sidecar_unhealthy_until_they_work() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store");
    let store = Store::open(&path)?;
    store.write(|tx| tx.emit(Event::bytes("orders.paid", "k", vec![1])))?;
    let db = path.to_string_lossy().into_owned();
    let out = dir.path().join("out.jsonl");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut sidecar = relay_cmd(&[
        "run",
        "--db",
        &db,
        "--sink",
        "file",
        "--file",
        &out.to_string_lossy(),
        "--metrics-addr",
        &addr,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let result = (|| -> TestResult {
        wait_for("a healthy sidecar", Duration::from_secs(30), || {
            http_get(&addr, "/healthz")
                .ok()
                .filter(|h| h.starts_with("HTTP/1.1 200"))
        })?;
        wait_for("the first event", Duration::from_secs(30), || {
            file_seqs(&out).ok().filter(|s| s == &[1])
        })?;
        let current = path.join("db").join("CURRENT");
        let saved = std::fs::read(&current)?;
        std::fs::remove_file(&current)?;
        let health = wait_for(
            "an unhealthy answer naming the catch-ups",
            Duration::from_secs(30),
            || {
                http_get(&addr, "/healthz")
                    .ok()
                    .filter(|h| h.starts_with("HTTP/1.1 503"))
            },
        );
        std::fs::write(&current, &saved)?;
        let health = health?;
        assert!(
            health.contains("catch-ups with the store have failed"),
            "{health}"
        );
        store.write(|tx| tx.emit(Event::bytes("orders.paid", "k", vec![2])))?;
        wait_for("delivery after recovery", Duration::from_secs(30), || {
            file_seqs(&out).ok().filter(|s| s == &[1, 2])
        })?;
        wait_for("health after recovery", Duration::from_secs(30), || {
            http_get(&addr, "/healthz")
                .ok()
                .filter(|h| h.starts_with("HTTP/1.1 200"))
        })?;
        Ok(())
    })();
    sigterm(&sidecar)?;
    let o = wait_child(&mut sidecar, Duration::from_secs(30))
        .map_err(|e| format!("{e}; the test had seen: {result:?}"))?;
    result.map_err(|e| format!("{e}; sidecar stderr: {}", stderr(&o)))?;
    assert!(o.status.success(), "{}", stderr(&o));
    Ok(())
}
