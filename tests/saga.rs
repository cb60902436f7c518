//! The saga example (`examples/saga/`) as two processes over a real
//! nats-server: 1,000 orders while each service is SIGKILLed and restarted
//! at random moments; afterwards every order is in a terminal state both
//! services agree on, no payment is applied twice, and money is conserved.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NatsServer, TestResult};

const ORDERS: u64 = 1000;

fn example_binary() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or("no target directory")?;
    let bin = profile_dir.join("examples").join("saga");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: build it with `cargo build --release --all-features --examples`",
            bin.display()
        )
        .into());
    }
    // A stale binary would test old code: refuse one older than its sources.
    let built = std::fs::metadata(&bin)?.modified()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("examples/saga"), root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            } else if entry.metadata()?.modified()? > built {
                return Err(format!(
                    "{} is older than {}: rebuild it with `cargo build --release --all-features --examples`",
                    bin.display(),
                    entry.path().display()
                )
                .into());
            }
        }
    }
    Ok(bin)
}

fn start(role: &str, dir: &Path, url: &str) -> Result<Child, Box<dyn std::error::Error>> {
    let mut cmd = Command::new(example_binary()?);
    cmd.arg(role)
        .arg("--dir")
        .arg(dir)
        .arg("--broker")
        .arg(format!("nats:{url}"))
        // Unacknowledged messages of a killed service come again within a
        // second, and kills land between commits and acknowledgements.
        .args(["--ack-wait-ms", "1000", "--pause-before-ack-ms", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if role == "orders" {
        // Spread over the kill cycles, so that kills land while both work.
        cmd.arg("--orders")
            .arg(ORDERS.to_string())
            .args(["--place-every-ms", "8"]);
    }
    Ok(cmd.spawn()?)
}

fn stop(child: &mut Child) -> TestResult {
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// The stores' state, through the example's `check`.
fn state(dir: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let out = Command::new(example_binary()?)
        .arg("check")
        .arg("--dir")
        .arg(dir)
        .output()?;
    if !out.status.success() {
        return Err(format!("check failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Whether every order is decided and every reservation settled.
fn settled(s: &serde_json::Value) -> bool {
    let orders = s["orders"]
        .as_object()
        .map_or(0, |o| o.values().filter(|v| v[0] != "Pending").count());
    let open = s["reservations"]
        .as_object()
        .map_or(1, |r| r.values().filter(|v| v[0] == "Reserved").count());
    orders as u64 == ORDERS && open == 0
}

#[test]
fn saga_survives_sigkills_of_both_services() -> TestResult {
    let server = NatsServer::start(&[])?;
    let dir = tempfile::tempdir()?;
    let mut payments = start("payments", dir.path(), &server.url)?;
    let mut orders = start("orders", dir.path(), &server.url)?;
    let mut seed: u64 = 0x853c_49e6_748f_ea9b;
    let mut kills = [0u32; 2];
    for _ in 0..24 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 600));
        if seed.is_multiple_of(2) {
            stop(&mut orders)?;
            orders = start("orders", dir.path(), &server.url)?;
            kills[0] += 1;
        } else {
            stop(&mut payments)?;
            payments = start("payments", dir.path(), &server.url)?;
            kills[1] += 1;
        }
    }
    // Let both run until the saga settles (checked with both stopped).
    let deadline = Instant::now() + Duration::from_secs(120);
    let s = loop {
        std::thread::sleep(Duration::from_secs(2));
        stop(&mut orders)?;
        stop(&mut payments)?;
        let s = state(dir.path())?;
        if settled(&s) || Instant::now() > deadline {
            break s;
        }
        payments = start("payments", dir.path(), &server.url)?;
        orders = start("orders", dir.path(), &server.url)?;
    };
    let orders = s["orders"].as_object().ok_or("no orders")?;
    let reservations = s["reservations"].as_object().ok_or("no reservations")?;
    assert_eq!(orders.len() as u64, ORDERS, "every order placed once");
    let (mut confirmed, mut cancelled, mut captured) = (0, 0, 0i64);
    for (id, o) in orders {
        let r = reservations
            .get(id)
            .ok_or_else(|| format!("order {id} has no payment decision"))?;
        assert_eq!(o[1], r[1], "order {id}: amounts agree");
        match (o[0].as_str(), r[0].as_str()) {
            (Some("Confirmed"), Some("Captured")) => {
                confirmed += 1;
                captured += r[1].as_i64().ok_or("amount")?;
            }
            (Some("Cancelled"), Some("Released" | "Refused")) => cancelled += 1,
            other => return Err(format!("order {id}: the services disagree: {other:?}").into()),
        }
    }
    assert_eq!(reservations.len(), orders.len(), "one payment per order");
    let initial: Vec<i64> = s["initial_balances"]
        .as_array()
        .ok_or("initial balances")?
        .iter()
        .map(|b| b.as_i64().ok_or("initial balance"))
        .collect::<Result<_, _>>()?;
    let balances = s["balances"].as_object().ok_or("no balances")?;
    let mut total = 0;
    for (c, start) in initial.iter().enumerate() {
        let b = balances
            .get(&c.to_string())
            .and_then(|b| b.as_i64())
            .unwrap_or(*start);
        assert!(b >= 0, "customer {c} overdrawn: {b}");
        total += b;
    }
    assert_eq!(
        total + captured,
        initial.iter().sum::<i64>(),
        "money conserved: balances + captured payments = what customers started with"
    );
    let stock = s["stock"].as_u64().ok_or("stock")?;
    let left = s["stock_left"].as_u64().ok_or("stock left")?;
    assert_eq!(
        confirmed + left,
        stock,
        "each unit sold once: {confirmed} confirmed, {left} left of {stock}"
    );
    let refused = reservations.values().filter(|r| r[0] == "Refused").count();
    let released = reservations.values().filter(|r| r[0] == "Released").count();
    println!(
        "saga: {} orders, {confirmed} confirmed, {cancelled} cancelled ({refused} refused, {released} compensated); kills: orders {}, payments {}",
        orders.len(),
        kills[0],
        kills[1]
    );
    assert!(refused > 0 && released > 0, "both cancellation paths ran");
    // Each consumed event applied by one commit only (the handlers would
    // hide a second application by their state; this count does not).
    for service in ["orders", "payments"] {
        let most = s[format!("{service}_handled_most")]
            .as_u64()
            .ok_or("handled")?;
        let n = s[format!("{service}_handled")].as_u64().ok_or("handled")?;
        println!("{service}: {n} events handled, each at most {most} times");
        assert_eq!(most, 1, "{service}: an event applied {most} times");
        assert!(n >= ORDERS, "{service} handled {n} events");
    }
    Ok(())
}
