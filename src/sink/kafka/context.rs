//! The librdkafka client context: its error reports reach `tracing` and the
//! caller.

use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

pub(super) type SinkProducer = FutureProducer<SinkContext>;
pub(super) type LastError = Arc<Mutex<Option<String>>>;

/// Logs librdkafka's error reports through `tracing` and keeps the last
/// one: a failed login, for one, reaches the caller only this way (the
/// request that fails meanwhile just says "broker transport failure").
pub(super) struct SinkContext {
    pub(super) last_error: LastError,
    /// Secret setting values, scrubbed from librdkafka's reports.
    pub(super) secrets: Vec<String>,
}

impl ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let report = crate::broker::kafka::client_report(&error, reason, &self.secrets);
        tracing::warn!(%report, "Kafka client error");
        *self.last_error.lock() = Some(report);
    }
}
