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
#[derive(Deserialize, Default, Clone, PartialEq, Eq)]
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
    /// NATS sink: token (prefer `nats_token_file` or the environment).
    pub nats_token: Option<String>,
    /// NATS sink: a file holding the token.
    pub nats_token_file: Option<PathBuf>,
    /// NATS sink: user.
    pub nats_user: Option<String>,
    /// NATS sink: password (prefer `nats_password_file` or the environment).
    pub nats_password: Option<String>,
    /// NATS sink: a file holding the password.
    pub nats_password_file: Option<PathBuf>,
    /// NATS sink: `structured` (default) or `binary` CloudEvents.
    pub nats_content_mode: Option<String>,
    /// NATS sink: root CA (PEM); requires TLS.
    pub nats_ca: Option<PathBuf>,
    /// Kafka sink: bootstrap brokers.
    pub kafka_brokers: Option<String>,
    /// Kafka sink: topic template.
    pub kafka_topic: Option<String>,
    /// Kafka sink: librdkafka settings (`"security.protocol" = "SASL_SSL"`, ...).
    pub kafka_options: Option<std::collections::BTreeMap<String, String>>,
    /// Kafka sink: librdkafka settings whose values are read from files
    /// (`"sasl.password" = "/run/secrets/kafka"`).
    pub kafka_option_files: Option<std::collections::BTreeMap<String, PathBuf>>,
    /// Kafka sink: ship without the restart scan to topics it may not read.
    pub kafka_restart_scan_without_read: Option<bool>,
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

/// Secrets (the token, the password, secret Kafka settings) show as
/// `<redacted>`.
impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::redact::{REDACTED, redact_settings, redact_url};
        f.debug_struct("RelayConfig")
            .field("db", &self.db)
            .field("sink", &self.sink)
            .field("file", &self.file)
            .field("nats_url", &self.nats_url.as_deref().map(redact_url))
            .field("nats_subject", &self.nats_subject)
            .field("nats_stream", &self.nats_stream)
            .field("nats_prefix", &self.nats_prefix)
            .field("nats_creds", &self.nats_creds)
            .field("nats_token", &self.nats_token.as_ref().map(|_| REDACTED))
            .field("nats_token_file", &self.nats_token_file)
            .field("nats_user", &self.nats_user)
            .field(
                "nats_password",
                &self.nats_password.as_ref().map(|_| REDACTED),
            )
            .field("nats_password_file", &self.nats_password_file)
            .field("nats_content_mode", &self.nats_content_mode)
            .field("nats_ca", &self.nats_ca)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_topic", &self.kafka_topic)
            .field(
                "kafka_options",
                &self.kafka_options.as_ref().map(redact_settings),
            )
            .field("kafka_option_files", &self.kafka_option_files)
            .field(
                "kafka_restart_scan_without_read",
                &self.kafka_restart_scan_without_read,
            )
            .field("batch_size", &self.batch_size)
            .field("catch_up_ms", &self.catch_up_ms)
            .field("metrics_addr", &self.metrics_addr)
            .field("max_lag_secs", &self.max_lag_secs)
            .field("drain_timeout_secs", &self.drain_timeout_secs)
            .finish()
    }
}

/// Why a configuration file was refused. It never holds a value from the
/// file: `key` is the key of the offending line, and `message` names what
/// is wrong without the value (which could be a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    /// The key of that line, when it has one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.key) {
            (Some(l), Some(k)) => write!(f, "line {l} (key `{k}`): {}", self.message),
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
            let key = line
                .and_then(|l| text.lines().nth(l))
                .and_then(|t| t.split_once('='))
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
                .filter(|k| !k.is_empty() && k.len() <= 64);
            ConfigError {
                line: line.map(|l| l + 1),
                key,
                message: value_free(e.message()),
            }
        })
    }
}

/// A TOML error message with any quoted or back-ticked value taken out:
/// `invalid type: string "hunter2", expected usize` becomes
/// `invalid type: string (value not shown), expected usize`.
fn value_free(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '`' | '\'' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push_str("(value not shown)");
            }
            '\n' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_debug_never_show_a_secret() {
        let e = RelayConfig::from_toml("nats_password = 12345678\n").unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains("12345678"), "{shown}");
        assert_eq!(e.key.as_deref(), Some("nats_password"));
        let e = RelayConfig::from_toml("batch_size = \"hunter2-secret\"\n").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let c = RelayConfig::from_toml(
            "nats_password = \"pw-1\"\nnats_token = \"tok-2\"\nnats_url = \"nats://u:pw-3@h:1\"\n\
             [kafka_options]\n\"sasl.password\" = \"pw-4\"\n",
        )
        .unwrap();
        let dbg = format!("{c:?}");
        for s in ["pw-1", "tok-2", "pw-3", "pw-4"] {
            assert!(!dbg.contains(s), "{s} in {dbg}");
        }
    }
}
