//! A TCP proxy on loopback that can cut its connections mid-stream: for
//! tests of what a lost connection does to a batch in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards 127.0.0.1:`port` to `target`. [`Proxy::cut_after`] makes the
/// connections open at that moment drop once `bytes` more bytes went from
/// the client to the server (in the middle of whatever is being sent);
/// later connections pass normally.
pub struct Proxy {
    pub port: u16,
    /// Bytes still to pass before the cut (u64::MAX: no cut armed).
    budget: Arc<AtomicU64>,
    pub cuts: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(target: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let budget = Arc::new(AtomicU64::new(u64::MAX));
        let (cut, cut_rx) = watch::channel(0u64);
        let cuts = Arc::new(AtomicU64::new(0));
        let (b, c, n) = (budget.clone(), cut.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let generation = *cut_rx.borrow();
                tokio::spawn(pipe(
                    client,
                    server,
                    b.clone(),
                    c.clone(),
                    cut_rx.clone(),
                    generation,
                    n.clone(),
                ));
            }
        });
        Ok(Proxy { port, budget, cuts })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Cuts the open connections once `bytes` more bytes went upstream.
    pub fn cut_after(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::SeqCst);
    }

    /// Whether a cut is armed and has not happened yet.
    pub fn armed(&self) -> bool {
        self.budget.load(Ordering::SeqCst) != u64::MAX
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    budget: Arc<AtomicU64>,
    cut: watch::Sender<u64>,
    mut cut_rx: watch::Receiver<u64>,
    generation: u64,
    cuts: Arc<AtomicU64>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let left = budget.load(Ordering::SeqCst);
            if left != u64::MAX {
                if (n as u64) >= left {
                    // Forward part of this read, then cut everything.
                    let _ = sw.write_all(&buf[..left as usize]).await;
                    budget.store(u64::MAX, Ordering::SeqCst);
                    cuts.fetch_add(1, Ordering::SeqCst);
                    cut.send_modify(|g| *g += 1);
                    return;
                }
                budget.fetch_sub(n as u64, Ordering::SeqCst);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let cut_here = async {
        while *cut_rx.borrow_and_update() == generation {
            if cut_rx.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut_here => {}
    }
}
