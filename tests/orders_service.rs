//! The example HTTP service (`examples/orders_service.rs`), run as its own
//! process on a loopback port: the API and its errors, concurrent
//! requests, `/metrics` through promtool, the shipped events through the
//! CloudEvents SDK, and a SIGTERM that drains the relay and exits 0.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{TestResult, cloudevents_parse, promtool_check};

/// The example's binary, built beside this test by `cargo test --all-targets`.
fn example_binary() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("no target directory")?;
    let bin = profile_dir.join("examples").join("orders_service");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: build it with `cargo test --release --all-targets` \
             (or `cargo build --release --example orders_service`)",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

struct Service {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &std::path::Path) -> Result<Service, Box<dyn std::error::Error>> {
    let mut child = Command::new(example_binary()?)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or("the service exited before it listened")??;
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.parse()?;
        }
    };
    // Keep reading its output so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(Service { child, addr })
}

/// One HTTP/1.1 request (`Connection: close`); the status and the body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no header end")?;
    // Bodies come whole, with their length (never chunked).
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    if body.len() != length {
        return Err(format!("body of {} bytes, Content-Length {length}", body.len()).into());
    }
    let status = head.split_whitespace().nth(1).ok_or("no status")?.parse()?;
    Ok((status, body.to_string()))
}

fn json_of(body: &str) -> Result<Value, Box<dyn std::error::Error>> {
    serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body:?}").into())
}

#[test]
fn orders_service_end_to_end() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("orders");
    let mut svc = start(&data)?;
    let addr = svc.addr;
    let post = |path: &str, body: &str| http(addr, "POST", path, Some(body));
    let get = |path: &str| http(addr, "GET", path, None);

    let (status, body) = post("/orders", r#"{"customer":"ann","total_cents":2500}"#)?;
    assert_eq!(status, 201, "{body}");
    let ann1 = json_of(&body)?;
    assert_eq!(ann1["status"], "created");
    let id1 = ann1["id"].as_u64().ok_or("no id")?;
    let (status, body) = post("/orders", r#"{"customer":"bob","total_cents":990}"#)?;
    assert_eq!(status, 201, "{body}");
    let id2 = json_of(&body)?["id"].as_u64().ok_or("no id")?;
    let (status, body) = post("/orders", r#"{"customer":"ann","total_cents":12000}"#)?;
    assert_eq!(status, 201, "{body}");
    let id3 = json_of(&body)?["id"].as_u64().ok_or("no id")?;

    let (status, body) = post(&format!("/orders/{id1}/pay"), "")?;
    assert_eq!(
        (status, json_of(&body)?["status"].clone()),
        (200, json!("paid"))
    );
    let (status, body) = post(&format!("/orders/{id1}/ship"), "")?;
    assert_eq!(
        (status, json_of(&body)?["status"].clone()),
        (200, json!("shipped"))
    );
    let (status, body) = get(&format!("/orders/{id1}"))?;
    assert_eq!(
        (status, json_of(&body)?["status"].clone()),
        (200, json!("shipped"))
    );

    // Errors: 4xx with a JSON error, nothing changed, nothing emitted.
    let errors = [
        post(&format!("/orders/{id2}/ship"), "")?, // not paid
        post(&format!("/orders/{id1}/pay"), "")?,  // shipped already
        post("/orders/999999/pay", "")?,
        get("/orders/999999")?,
        get("/orders/abc")?,
        post("/orders", "{not json")?,
        post("/orders", r#"{"customer":"ann"}"#)?,
        post("/orders", r#"{"customer":"ann","total_cents":-5}"#)?,
        post("/orders", r#"{"customer":"","total_cents":1}"#)?,
        post("/orders", r#"{"customer":"ann","total_cents":1,"x":1}"#)?,
        post(
            "/orders",
            &format!(r#"{{"customer":"{}","total_cents":1}}"#, "a".repeat(101)),
        )?,
        get(&format!("/customers/{}/orders", "a".repeat(101)))?,
        get("/no/such/route")?,
        get("/orders")?, // POST only
        http(addr, "DELETE", &format!("/orders/{id1}"), None)?,
        get("/orders/%FF")?, // not UTF-8
        get("/orders/+5")?,
        post(
            "/orders",
            &format!(
                r#"{{"customer":"ann","total_cents":1,"pad":"{}"}}"#,
                "x".repeat(70_000)
            ),
        )?,
    ];
    let statuses: Vec<u16> = errors.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses,
        [
            409, 409, 404, 404, 400, 400, 400, 400, 422, 400, 422, 400, 404, 405, 405, 400, 400,
            413
        ]
    );
    // The refused transitions changed nothing.
    let (_, body) = get(&format!("/orders/{id2}"))?;
    assert_eq!(json_of(&body)?["status"], "created");
    for (_, body) in &errors {
        let e = json_of(body)?;
        assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }

    let (status, body) = get("/customers/ann/orders")?;
    assert_eq!(status, 200);
    let ids: Vec<u64> = json_of(&body)?
        .as_array()
        .ok_or("not a list")?
        .iter()
        .filter_map(|o| o["id"].as_u64())
        .collect();
    assert_eq!(ids, [id1, id3]);

    // Concurrent creates: every one answered 201 with its own id.
    let created: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|t| {
                s.spawn(move || -> Result<Vec<u64>, String> {
                    let mut ids = Vec::new();
                    for i in 0..20 {
                        let body = format!(r#"{{"customer":"c{t}","total_cents":{}}}"#, i + 1);
                        let (status, body) = http(addr, "POST", "/orders", Some(&body))
                            .map_err(|e| e.to_string())?;
                        if status != 201 {
                            return Err(format!("{status}: {body}"));
                        }
                        let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
                        ids.push(v["id"].as_u64().ok_or("no id")?);
                    }
                    Ok(ids)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "panicked".to_string())?)
            .collect::<Result<Vec<Vec<u64>>, String>>()
            .map(|v| v.into_iter().flatten().collect())
    })?;
    let mut unique = created.clone();
    unique.extend([id1, id2, id3]);
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 323, "ids are unique");
    // The index has every concurrent order under its customer.
    for t in 0..16 {
        let (status, body) = get(&format!("/customers/c{t}/orders"))?;
        assert_eq!(status, 200);
        let listed = json_of(&body)?.as_array().map_or(0, Vec::len);
        assert_eq!(listed, 20, "customer c{t}: {body}");
    }

    let (status, health) = get("/healthz")?;
    assert_eq!(status, 200, "{health}");
    let (status, metrics) = get("/metrics")?;
    assert_eq!(status, 200);
    let (ok, printed) = promtool_check(&metrics)?;
    assert!(ok, "promtool: {printed}\n{metrics}");
    assert!(
        metrics.contains("outboxkv_relay_delivered_seq"),
        "{metrics}"
    );
    assert!(metrics.contains("outboxkv_store_"), "{metrics}");

    // SIGTERM: it drains the relay and exits 0.
    let term = Command::new("kill")
        .args(["-TERM", &svc.child.id().to_string()])
        .status()?;
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = svc.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            return Err("the service did not stop within 60 s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");

    // Every successful change's event was shipped, once, in commit order.
    let events = std::fs::read_to_string(data.join("events.jsonl"))?;
    let lines: Vec<&str> = events.lines().collect();
    assert_eq!(lines.len(), 3 + 2 + 320, "{events}");
    let messages: Vec<Value> = lines
        .iter()
        .map(|l| json!({ "mode": "structured", "body": l }))
        .collect();
    let parsed = cloudevents_parse(&messages)?;
    let mut types = Vec::new();
    for p in &parsed {
        assert_eq!(p["ok"], true, "{p}");
        types.push(
            p["attributes"]["type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(
        &types[..5],
        [
            "orders.created",
            "orders.created",
            "orders.created",
            "orders.paid",
            "orders.shipped"
        ]
    );
    assert!(types[5..].iter().all(|t| t == "orders.created"));

    // A restart goes on from the highest id.
    let svc2 = start(&data)?;
    let (status, body) = http(
        svc2.addr,
        "POST",
        "/orders",
        Some(r#"{"customer":"dan","total_cents":1}"#),
    )?;
    assert_eq!(status, 201, "{body}");
    let max = created
        .iter()
        .copied()
        .chain([id1, id2, id3])
        .max()
        .unwrap_or(0);
    assert_eq!(json_of(&body)?["id"].as_u64(), Some(max + 1));
    Ok(())
}
