//! `/metrics` and `/healthz`, served with axum.
//!
//! `/metrics` answers in the Prometheus text format (0.0.4), or in
//! OpenMetrics when the scraper asks for it (`Accept:
//! application/openmetrics-text`), each with its own content type.
//!
//! `/healthz` is 200 when the relay can do its work: the sink is connected
//! and its last round did not fail (or nothing has needed it yet), no
//! dead-letter storm is held back, catch-ups with the service work, the
//! oldest undelivered entry is younger than `--max-lag-secs` and no publish
//! has waited that long. Otherwise 503, with the reason in the body.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use outboxkv::relay::CatchUpHealth;
use outboxkv::relay::RelayMetrics;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;

/// What the health check and the metrics endpoint read.
pub(crate) struct Health {
    pub(crate) metrics: RelayMetrics,
    pub(crate) registry: Registry,
    pub(crate) max_lag: Duration,
    /// `Some(why)` while the sink is not connected yet.
    pub(crate) connecting: Mutex<Option<String>>,
    /// The sidecar's catch-ups (none with `--drain`).
    pub(crate) catch_up: Mutex<Option<CatchUpHealth>>,
}

/// How long catch-ups may fail before the relay counts as unhealthy.
const CATCH_UP_GRACE: Duration = Duration::from_secs(5);

impl Health {
    /// `Ok` when healthy, else why not.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some(why) = self.connecting.lock().as_ref() {
            return Err(format!("sink not connected: {why}"));
        }
        if self.metrics.sink_up.get() != 1 {
            return Err("sink down: the last round could not deliver".into());
        }
        if self.metrics.dead_letter_storm.get() != 0 {
            return Err("a dead-letter storm is held back".into());
        }
        if let Some(health) = self.catch_up.lock().as_ref()
            && let Some((error, for_how_long)) = health.failing()
            && for_how_long > CATCH_UP_GRACE
        {
            return Err(format!(
                "catch-ups with the store have failed for {:.1} s: {error}",
                for_how_long.as_secs_f64()
            ));
        }
        let lag = self.metrics.oldest_undelivered_age_seconds.get();
        if lag > self.max_lag.as_secs_f64() {
            return Err(format!(
                "lag: the oldest undelivered entry is {lag:.3} s old (limit {} s)",
                self.max_lag.as_secs()
            ));
        }
        if let Some(waited) = self.metrics.publishing_for()
            && waited > self.max_lag
        {
            return Err(format!(
                "a publish has waited {:.1} s for the sink",
                waited.as_secs_f64()
            ));
        }
        Ok(())
    }
}

async fn metrics(State(health): State<Arc<Health>>, headers: HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    let (content_type, encoded) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            prometheus_client::encoding::text::encode(&mut body, &health.registry),
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::encode(&mut body, &health.registry),
        )
    };
    match encoded {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "could not encode the metrics\n".to_string(),
        ),
    }
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    match health.check() {
        Ok(()) => (StatusCode::OK, plain, "ok\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            plain,
            format!("unhealthy: {why}\n"),
        ),
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the process ends.
pub(crate) async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(health);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics endpoint stopped");
    }
}
