//! `outbox-relay run`: the sidecar beside a running service, or with
//! `--drain` alone on a closed store.

use std::sync::Arc;
use std::time::Duration;

use outboxkv::Store;
use outboxkv::relay::SidecarSource;
use outboxkv::relay::{
    Backoff, OutboxSource, Relay, RelayMetricFamilies, RelayMetrics, Shutdown, Sink,
};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;

use crate::serve::Health;
use crate::settings::{self, RunConfig};
use crate::sinks::{self, ConnectError};
use crate::{Fail, RunArgs};

pub(crate) fn run(args: RunArgs) -> Result<(), Fail> {
    let config = settings::load(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Fail(format!("start runtime: {e}"), 1))?;
    runtime.block_on(run_async(config))
}

/// Where the relay reads: the sidecar's source, or the store itself.
enum Source {
    Sidecar(SidecarSource),
    Drain(Store),
}

/// SIGTERM and SIGINT, listened for from the start of the run: a signal
/// that arrives while the sink connects is not lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, Fail> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen =
            |kind, name| signal(kind).map_err(|e| Fail(format!("install {name} handler: {e}"), 1));
        Ok(Signals {
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            int: listen(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT (or one that came already).
    async fn terminated(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Connects the sink. A sidecar retries broker failures (unreachable,
/// refused credentials, a missing or mismatched stream) with backoff until
/// the sink connects (or the process is told to stop: `None`), and health
/// reports why meanwhile; `--drain` fails at the first.
async fn connect_until_up(
    config: &RunConfig,
    health: &Health,
    metrics: &RelayMetrics,
    signals: &mut Signals,
) -> Result<Option<Arc<dyn Sink>>, Fail> {
    let backoff = Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        factor: 2.0,
        jitter: 0.2,
    };
    let mut attempt = 0u32;
    loop {
        let connected = tokio::select! {
            c = sinks::connect(&config.sink) => c,
            signal = signals.terminated() => {
                tracing::info!("{signal}: stopping before the sink was connected");
                return Ok(None);
            }
        };
        match connected {
            Ok(sink) => {
                *health.connecting.lock() = None;
                metrics.sink_up.set(1);
                return Ok(Some(sink));
            }
            Err(ConnectError::Final(fail)) => return Err(fail),
            // --drain is one attempt at shipping: it says why and exits.
            Err(ConnectError::Broker(why)) if config.drain => return Err(Fail(why, 1)),
            Err(ConnectError::Broker(why)) => {
                attempt = attempt.saturating_add(1);
                let delay = backoff.delay(attempt, 0.5);
                tracing::error!(
                    sink = config.sink.name(),
                    error = %why,
                    retry_in = ?delay,
                    "cannot connect the sink; retrying"
                );
                *health.connecting.lock() = Some(why);
                metrics.sink_up.set(0);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    signal = signals.terminated() => {
                        tracing::info!("{signal}: stopping before the sink was connected");
                        return Ok(None);
                    }
                }
            }
        }
    }
}

async fn run_async(config: RunConfig) -> Result<(), Fail> {
    let mut signals = Signals::install()?;
    // Open (and so check) the store, and take the relay lock, before
    // anything is connected.
    let source = if config.drain {
        let store = Store::options()
            .create_if_missing(false)
            .relay_cursor_poll(None)
            .open(&config.db)?;
        // The relay applies a sidecar's cursor (if one ran) once it holds
        // the relay lock: nothing a sidecar delivered is shipped again.
        Source::Drain(store)
    } else {
        // The service may be creating the store right now (its column
        // families appear just after its CURRENT file): retry storage errors
        // for a while. Anything else (not a store, newer format, a damaged
        // cursor, another relay) fails at once.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let source = loop {
            match SidecarSource::open(&config.db, config.catch_up) {
                Err(e @ outboxkv::Error::Storage { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    tracing::warn!(error = %e, "cannot open the store yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        tracing::info!(
            store = %config.db.display(),
            store_id = %source.reader().id(),
            cursor = source.delivered_through(),
            "sidecar relay opened the store"
        );
        Source::Sidecar(source)
    };

    let families = RelayMetricFamilies::new();
    let mut registry = Registry::default();
    families.register(&mut registry);
    let metrics = families.relay(&[("sink", config.sink.name())]);
    let health = Arc::new(Health {
        metrics: metrics.clone(),
        registry,
        max_lag: config.max_lag,
        connecting: Mutex::new(Some("connecting".into())),
        catch_up: Mutex::new(match &source {
            Source::Sidecar(s) => Some(s.catch_up_health()),
            Source::Drain(_) => None,
        }),
    });
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Fail(format!("metrics endpoint {addr}: {e}"), 1))?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        tokio::spawn(crate::serve::serve(listener, health.clone()));
    }

    let Some(sink) = connect_until_up(&config, &health, &metrics, &mut signals).await? else {
        if config.drain {
            return Err(Fail(
                "stopped by a signal before the sink was connected; nothing was shipped".into(),
                1,
            ));
        }
        return Ok(());
    };
    let (builder, store, sidecar) = match source {
        Source::Drain(store) => (Relay::builder(&store), Some(store), None),
        Source::Sidecar(source) => {
            let source = Arc::new(source);
            (Relay::builder_for(source.clone()), None, Some(source))
        }
    };
    let relay = builder
        .sink_arc(sink)
        .batch_size(config.batch_size)
        .metrics(metrics.clone())
        .start()?;
    if let Some(store) = store {
        tokio::select! {
            result = relay.shutdown(Shutdown::Drain(config.drain_timeout)) => result?,
            // A second way out of a drain: stop at once (the relay stops
            // when its handle is dropped; what it was sending stays in the
            // outbox).
            signal = signals.terminated() => {
                return Err(Fail(
                    format!(
                        "{signal}: drain stopped; {} entries left in the outbox",
                        store.outbox().depth()
                    ),
                    1,
                ));
            }
        }
        let left = store.outbox().depth();
        if left > 0 {
            return Err(Fail(
                format!(
                    "{left} entries still undelivered after the drain timeout of {:?}",
                    config.drain_timeout
                ),
                1,
            ));
        }
        tracing::info!("drained; the outbox is empty");
        return Ok(());
    }
    tokio::select! {
        signal = signals.terminated() => tracing::info!("{signal}: draining"),
        _ = relay.stopped() => {}
    }
    relay
        .shutdown(Shutdown::Drain(config.drain_timeout))
        .await?;
    let left = match &sidecar {
        Some(source) => (source.head()? + 1).saturating_sub(source.tail()?),
        None => 0,
    };
    if left > 0 {
        return Err(Fail(
            format!(
                "{left} entries still undelivered after the drain timeout of {:?}",
                config.drain_timeout
            ),
            1,
        ));
    }
    Ok(())
}
