//! The `outbox-relay` configuration file (feature `config`).
//!
//! A TOML file whose keys are the binary's flags with `_` for `-`, e.g.
//!
//! ```toml
//! db = "data/orders"
//! sink = "nats"
//! nats_url = "nats://127.0.0.1:4222"
//! batch_size = 1000
//!
//! [kafka_options]
//! "security.protocol" = "SASL_SSL"
//! ```
//!
//! Unknown keys and values of the wrong type are errors naming the line.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// The settings a relay configuration file may hold; every one optional
/// (flags and environment variables take precedence).
///
/// ```
/// use outboxkv::config::RelayConfig;
/// let c = RelayConfig::from_toml("sink = \"file\"\nbatch_size = 10\n").unwrap();
/// assert_eq!(c.batch_size, Some(10));
/// let e = RelayConfig::from_toml("batch_size = \"many\"\n").unwrap_err();
/// assert_eq!(e.line, Some(1));
/// let k = RelayConfig::from_toml("[kafka_options]\n\"security.protocol\" = \"SSL\"\n").unwrap();
/// assert_eq!(k.kafka_options.unwrap()["security.protocol"], "SSL");
/// ```
#[derive(Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The store's folder.
    pub db: Option<PathBuf>,
    /// `file`, `stdout`, `nats` or `kafka`.
    pub sink: Option<String>,
    /// File sink: the JSON Lines file.
    pub file: Option<PathBuf>,
    /// NATS sink: server URL.
    pub nats_url: Option<String>,
    /// NATS sink: subject template.
    pub nats_subject: Option<String>,
    /// NATS sink: stream to create.
    pub nats_stream: Option<String>,
    /// NATS sink: subject prefix.
    pub nats_prefix: Option<String>,
    /// NATS sink: credentials file.
    pub nats_creds: Option<PathBuf>,
    /// NATS sink: token.
    pub nats_token: Option<String>,
    /// NATS sink: user.
    pub nats_user: Option<String>,
    /// NATS sink: password.
    pub nats_password: Option<String>,
    /// NATS sink: root CA (PEM); requires TLS.
    pub nats_ca: Option<PathBuf>,
    /// Kafka sink: bootstrap brokers.
    pub kafka_brokers: Option<String>,
    /// Kafka sink: topic template.
    pub kafka_topic: Option<String>,
    /// Kafka sink: librdkafka settings (`"security.protocol" = "SASL_SSL"`, ...).
    pub kafka_options: Option<std::collections::BTreeMap<String, String>>,
    /// Entries per batch.
    pub batch_size: Option<usize>,
    /// Sidecar catch-up interval, milliseconds.
    pub catch_up_ms: Option<u64>,
    /// Address of /metrics and /healthz, or `off`.
    pub metrics_addr: Option<String>,
    /// /healthz lag threshold, seconds.
    pub max_lag_secs: Option<u64>,
    /// Drain timeout, seconds.
    pub drain_timeout_secs: Option<u64>,
}

/// Why a configuration file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// That line, trimmed.
    pub text: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.text) {
            (Some(l), Some(t)) => write!(f, "line {l} (`{t}`): {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl RelayConfig {
    /// Parses a configuration file's text. Never panics, whatever the text.
    pub fn from_toml(text: &str) -> Result<RelayConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| {
                let start = span.start.min(text.len());
                text.as_bytes()[..start]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
            });
            ConfigError {
                line: line.map(|l| l + 1),
                text: line
                    .and_then(|l| text.lines().nth(l))
                    .map(|t| t.trim().to_string()),
                message: e.message().replace('\n', " "),
            }
        })
    }
}
