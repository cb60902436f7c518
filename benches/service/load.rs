//! The load generator: `connections` keep-alive HTTP/1.1 connections, each
//! in a closed loop of create, pay, get for a fixed time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::AnyResult;

/// What one run of the load measured.
#[derive(Default)]
pub struct Measured {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests answered otherwise (or failed on the wire).
    pub failed: u64,
    /// Successful requests that changed state (create, pay): one event each.
    pub changes: u64,
    /// Latency of every successful request, in microseconds.
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
}

struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> AnyResult<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(s),
        })
    }

    /// One request; the status and the body.
    async fn request(&mut self, method: &str, path: &str, body: &str) -> AnyResult<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .ok_or("no status line")?
            .parse()?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err("connection closed mid-response".into());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, String::from_utf8(body)?))
    }
}

fn id_of(body: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("id")?
        .as_u64()
}

/// Drives `connections` connections against `addr` for `duration`.
pub async fn run(addr: SocketAddr, connections: usize, duration: Duration) -> AnyResult<Measured> {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            tokio::spawn(async move {
                let mut m = Measured::default();
                let mut conn = Conn::open(addr).await?;
                let mut i = 0u64;
                while Instant::now() < deadline {
                    i += 1;
                    let body = format!(r#"{{"customer":"c{c}","total_cents":{}}}"#, 100 + i % 900);
                    let t = Instant::now();
                    let (status, created) = conn.request("POST", "/orders", &body).await?;
                    let Some(id) = id_of(&created).filter(|_| status == 201) else {
                        m.failed += 1;
                        continue;
                    };
                    m.ok += 1;
                    m.changes += 1;
                    m.latencies_us.push(t.elapsed().as_micros() as u64);
                    let t = Instant::now();
                    let (status, _) = conn
                        .request("POST", &format!("/orders/{id}/pay"), "")
                        .await?;
                    if status == 200 {
                        m.ok += 1;
                        m.changes += 1;
                        m.latencies_us.push(t.elapsed().as_micros() as u64);
                    } else {
                        m.failed += 1;
                    }
                    let t = Instant::now();
                    let (status, _) = conn.request("GET", &format!("/orders/{id}"), "").await?;
                    if status == 200 {
                        m.ok += 1;
                        m.latencies_us.push(t.elapsed().as_micros() as u64);
                    } else {
                        m.failed += 1;
                    }
                }
                AnyResult::Ok(m)
            })
        })
        .collect();
    let mut all = Measured::default();
    for t in tasks {
        let m = t.await??;
        all.ok += m.ok;
        all.failed += m.failed;
        all.changes += m.changes;
        all.latencies_us.extend(m.latencies_us);
    }
    all.elapsed = started.elapsed();
    Ok(all)
}
