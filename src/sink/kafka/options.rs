//! [`KafkaOptions`]: the sink's settings and the librdkafka configuration
//! they become.

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::broker::kafka::KafkaConnection;

use super::context::{LastError, SinkContext, SinkProducer};

#[cfg(doc)]
use super::KafkaSink;

/// Options for [`KafkaSink::connect`].
///
/// ```
/// use outboxkv::sink::kafka::KafkaOptions;
/// let opts = KafkaOptions::new("127.0.0.1:9092")
///     .topic_template("events.{type}")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512");
/// assert_eq!(opts.topic_for("orders.paid"), "events.orders.paid");
/// ```
#[derive(Clone)]
#[must_use]
pub struct KafkaOptions {
    pub(super) conn: KafkaConnection,
    pub(super) template: String,
    pub(super) partitioner: String,
    pub(super) window: usize,
    pub(super) delivery_timeout: Option<Duration>,
    pub(super) restart_dedup: bool,
    pub(super) restart_span: u64,
    pub(super) restart_scan_limit: u64,
    pub(super) scan_without_read: bool,
}

/// Secret settings (`sasl.password`, `ssl.key.password`, ...) show as
/// `<redacted>`.
impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOptions")
            .field("conn", &self.conn)
            .field("template", &self.template)
            .field("partitioner", &self.partitioner)
            .field("window", &self.window)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("restart_dedup", &self.restart_dedup)
            .field("restart_span", &self.restart_span)
            .field("restart_scan_limit", &self.restart_scan_limit)
            .field("scan_without_read", &self.scan_without_read)
            .finish()
    }
}

impl KafkaOptions {
    /// Options for the brokers at `bootstrap` (`host:port[,host:port...]`).
    pub fn new(bootstrap: impl Into<String>) -> KafkaOptions {
        KafkaOptions::with_connection(KafkaConnection::new(bootstrap))
    }

    /// Options for the brokers and client settings of `conn` (the same
    /// [`KafkaConnection`] an inbox reader of these brokers takes).
    pub fn with_connection(conn: KafkaConnection) -> KafkaOptions {
        KafkaOptions {
            conn,
            template: "{type}".into(),
            partitioner: "murmur2_random".into(),
            window: 10_000,
            delivery_timeout: None,
            restart_dedup: true,
            restart_span: 10_000,
            restart_scan_limit: 100_000,
            scan_without_read: false,
        }
    }

    /// Topic template; `{type}` and `{key}` are replaced by the event type and
    /// key. Default: `{type}`.
    pub fn topic_template(mut self, template: impl Into<String>) -> Self {
        self.template = template.into();
        self
    }

    /// librdkafka's partitioner. Default: `murmur2_random` (what Java
    /// clients use); librdkafka's own default is `consistent_random`.
    pub fn partitioner(mut self, partitioner: impl Into<String>) -> Self {
        self.partitioner = partitioner.into();
        self
    }

    /// Most records awaiting their delivery report at once. Default: 10,000.
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// How long the producer tries to deliver one record before it reports a
    /// timeout (`message.timeout.ms`); the relay then retries the entry.
    ///
    /// Default: none (`message.timeout.ms=0`): the producer keeps trying
    /// until the broker takes the record, and a broker that is down shows
    /// as a publish that waits (`outbox-relay`'s `/healthz` reports it). A
    /// timeout breaks per-key order: records that time out in the
    /// producer's queue leave a gap that later records of the partition
    /// fill once the broker is back, and the relay's re-send of the
    /// timed-out one lands after them (librdkafka documents the gap). Set
    /// one only where order does not matter.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = Some(timeout);
        self
    }

    /// Whether to run the restart scan (see the module documentation).
    /// Default: on.
    pub fn restart_dedup(mut self, on: bool) -> Self {
        self.restart_dedup = on;
        self
    }

    /// How many seqs past the relay's cursor a restart scan covers: entries
    /// beyond it are sent without looking. Keep it above what the relay
    /// has in flight ([`in_flight_entries`](crate::relay::RelayBuilder::in_flight_entries),
    /// by default four batches and at least 5,000): a relay that stopped
    /// may have sent that much past its cursor. Default: 10,000.
    pub fn restart_span(mut self, seqs: u64) -> Self {
        self.restart_span = seqs.max(1);
        self
    }

    /// The most records a restart scan reads back per partition. Default:
    /// 100,000.
    pub fn restart_scan_limit(mut self, records: u64) -> Self {
        self.restart_scan_limit = records.max(1);
        self
    }

    /// What to do when the restart scan may not read a topic (the relay's
    /// principal has WRITE but not READ): `false` fails (see the module
    /// documentation); `true` ships to such topics without the scan,
    /// logging a warning once per topic: after a relay restart, records
    /// that were already written can be written again. Default: `false`.
    pub fn restart_scan_without_read(mut self, allow: bool) -> Self {
        self.scan_without_read = allow;
        self
    }

    /// Any other librdkafka setting, passed through to the producer and to
    /// the restart scan's consumer: `security.protocol`, `sasl.*`, `ssl.*`,
    /// `compression.type`, ... The sink sets `linger.ms=1` (librdkafka: 5)
    /// and `queue.buffering.max.messages` to twice the window unless given
    /// here. Settings the sink depends on (`enable.idempotence`, `acks`)
    /// cannot be overridden.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.conn = self.conn.set(key, value);
        self
    }

    /// The topic an event of `event_type` is published to (key `""`).
    pub fn topic_for(&self, event_type: &str) -> String {
        self.render(event_type, "")
    }

    pub(super) fn render(&self, event_type: &str, key: &str) -> String {
        self.template
            .replace("{type}", event_type)
            .replace("{key}", key)
    }

    pub(super) fn client_config(&self) -> ClientConfig {
        self.conn.client_config()
    }

    pub(super) fn producer_config(&self, batch_cap: Option<usize>) -> ClientConfig {
        let mut c = self.client_config();
        if let Some(cap) = batch_cap {
            // Below the smallest `max.message.bytes` of the topics written
            // (see "Order" in the module documentation).
            let asked = self
                .conn
                .settings
                .get("batch.size")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1_000_000);
            c.set("batch.size", asked.min(cap).max(1).to_string());
        }
        c.set("client.id", "outboxkv-relay")
            .set("partitioner", &self.partitioner)
            .set(
                "message.timeout.ms",
                self.delivery_timeout
                    .map_or(0, |t| t.as_millis().max(1))
                    .to_string(),
            );
        if !self.conn.settings.contains_key("linger.ms") {
            // The relay already hands over whole batches; librdkafka's own
            // 5 ms default would add that much to every batch's latency.
            c.set("linger.ms", "1");
        }
        if !self
            .conn
            .settings
            .contains_key("queue.buffering.max.messages")
        {
            c.set(
                "queue.buffering.max.messages",
                (self.window * 2).max(1000).to_string(),
            );
        }
        c.set("enable.idempotence", "true").set("acks", "all");
        c
    }
}

/// Whether `t` is a valid Kafka topic name: 1 to 249 of `[A-Za-z0-9._-]`,
/// not `.` or `..`.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl KafkaOptions {
    pub(super) fn create_producer(
        &self,
        last_error: &LastError,
        batch_cap: Option<usize>,
    ) -> rdkafka::error::KafkaResult<SinkProducer> {
        let config = self.producer_config(batch_cap);
        let secrets = crate::broker::kafka::secrets_of(&config);
        config.create_with_context(SinkContext {
            last_error: last_error.clone(),
            secrets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(valid_topic("orders.paid"));
        assert!(valid_topic("a-b_c.1"));
        for bad in ["", ".", "..", "a b", "a/b", "ü", &"x".repeat(250)] {
            assert!(!valid_topic(bad), "{bad}");
        }
        let o = KafkaOptions::new("x").topic_template("svc.{type}.{key}");
        assert_eq!(o.render("orders.paid", "k1"), "svc.orders.paid.k1");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let o = KafkaOptions::new("127.0.0.1:1")
            .set("sasl.password", "hunter22")
            .set("ssl.key.password", "p4ss")
            .set("sasl.username", "relay");
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("hunter22") && !dbg.contains("p4ss"), "{dbg}");
        assert!(dbg.contains("relay"), "{dbg}");
    }

    #[test]
    fn sink_settings_win_over_pass_through() {
        let o = KafkaOptions::new("127.0.0.1:1")
            .set("enable.idempotence", "false")
            .set("acks", "1")
            .set("security.protocol", "SASL_SSL");
        let c = o.producer_config(None);
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
    }
}
