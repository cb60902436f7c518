//! The settings of `run`: flags, then environment variables (both through
//! clap), then the TOML file, merged into one [`RunConfig`]; secrets read
//! from files where asked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outboxkv::config::RelayConfig;
use outboxkv::redact::{REDACTED, redact_settings, redact_url};

use crate::{Fail, RunArgs, bad};

/// Settings of `run` after flags, environment and file are merged.
pub(crate) struct RunConfig {
    pub(crate) db: PathBuf,
    pub(crate) sink: SinkChoice,
    pub(crate) batch_size: usize,
    pub(crate) catch_up: Duration,
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) max_lag: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) drain: bool,
}

pub(crate) enum SinkChoice {
    File(PathBuf),
    Stdout,
    Nats(NatsChoice),
    Kafka(KafkaChoice),
}

pub(crate) struct NatsChoice {
    pub(crate) url: String,
    pub(crate) subject: Option<String>,
    pub(crate) prefix: Option<String>,
    pub(crate) stream: Option<String>,
    pub(crate) binary: bool,
    pub(crate) creds: Option<PathBuf>,
    pub(crate) token: Option<String>,
    pub(crate) user: Option<(String, String)>,
    pub(crate) ca: Option<PathBuf>,
}

pub(crate) struct KafkaChoice {
    pub(crate) brokers: String,
    pub(crate) topic: Option<String>,
    pub(crate) options: BTreeMap<String, String>,
    pub(crate) scan_without_read: bool,
}

impl SinkChoice {
    /// The sink's name, for logs and metric labels.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            SinkChoice::File(_) => "file",
            SinkChoice::Stdout => "stdout",
            SinkChoice::Nats(_) => "nats",
            SinkChoice::Kafka(_) => "kafka",
        }
    }
}

/// Secrets never printed: the token, the password, secret Kafka settings,
/// credentials in the URL.
impl std::fmt::Debug for SinkChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkChoice::File(p) => f.debug_tuple("File").field(p).finish(),
            SinkChoice::Stdout => f.write_str("Stdout"),
            SinkChoice::Nats(n) => f
                .debug_struct("Nats")
                .field("url", &redact_url(&n.url))
                .field("subject", &n.subject)
                .field("prefix", &n.prefix)
                .field("stream", &n.stream)
                .field("binary", &n.binary)
                .field("creds", &n.creds)
                .field("token", &n.token.as_ref().map(|_| REDACTED))
                .field("user", &n.user.as_ref().map(|(u, _)| (u, REDACTED)))
                .field("ca", &n.ca)
                .finish(),
            SinkChoice::Kafka(k) => f
                .debug_struct("Kafka")
                .field("brokers", &k.brokers)
                .field("topic", &k.topic)
                .field("options", &redact_settings(&k.options))
                .field("scan_without_read", &k.scan_without_read)
                .finish(),
        }
    }
}

/// Reads a secret from `path`: its content without a final line break.
fn read_secret(what: &str, path: &Path) -> Result<String, Fail> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("{what} file {}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// One of a secret given directly or as a file; both is an error.
fn secret(
    what: &str,
    value: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, Fail> {
    match (value, file) {
        (Some(_), Some(_)) => Err(bad(format!("give the {what} or a file with it, not both"))),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(p)) => read_secret(what, &p).map(Some),
        (None, None) => Ok(None),
    }
}

pub(crate) fn load(args: RunArgs) -> Result<RunConfig, Fail> {
    let file: RelayConfig = match &args.config {
        None => RelayConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("config file {}: {e}", path.display())))?;
            RelayConfig::from_toml(&text)
                .map_err(|e| bad(format!("config file {} {e}", path.display())))?
        }
    };
    let db = args.db.or(file.db).ok_or_else(|| {
        bad("no store given: pass --db PATH (or OUTBOXKV_DB, or db in the config)")
    })?;
    let sink_name = args
        .sink
        .or(file.sink)
        .ok_or_else(|| bad("no sink given: pass --sink file|stdout|nats|kafka"))?;
    let sink = match sink_name.as_str() {
        "file" => SinkChoice::File(
            args.file
                .or(file.file)
                .ok_or_else(|| bad("the file sink needs --file PATH"))?,
        ),
        "stdout" => SinkChoice::Stdout,
        "nats" => {
            let token = secret(
                "NATS token",
                args.nats_token.or(file.nats_token),
                args.nats_token_file.or(file.nats_token_file),
            )?;
            let password = secret(
                "NATS password",
                args.nats_password.or(file.nats_password),
                args.nats_password_file.or(file.nats_password_file),
            )?;
            let binary = match args.nats_content_mode.or(file.nats_content_mode).as_deref() {
                None | Some("structured") => false,
                Some("binary") => true,
                Some(other) => {
                    return Err(bad(format!(
                        "nats_content_mode {other:?}: expected structured or binary"
                    )));
                }
            };
            SinkChoice::Nats(NatsChoice {
                url: args
                    .nats_url
                    .or(file.nats_url)
                    .ok_or_else(|| bad("the nats sink needs --nats-url URL"))?,
                subject: args.nats_subject.or(file.nats_subject),
                prefix: args.nats_prefix.or(file.nats_prefix),
                stream: args.nats_stream.or(file.nats_stream),
                binary,
                creds: args.nats_creds.or(file.nats_creds),
                token,
                user: match (args.nats_user.or(file.nats_user), password) {
                    (Some(u), Some(p)) => Some((u, p)),
                    (None, None) => None,
                    _ => return Err(bad("nats_user and a NATS password go together")),
                },
                ca: args.nats_ca.or(file.nats_ca),
            })
        }
        "kafka" => {
            let mut options = file.kafka_options.unwrap_or_default();
            let mut files: BTreeMap<String, PathBuf> = file.kafka_option_files.unwrap_or_default();
            for kv in &args.kafka_option_files {
                let (k, p) = kv
                    .split_once('=')
                    .ok_or_else(|| bad(format!("--kafka-option-file {kv:?}: expected KEY=PATH")))?;
                files.insert(k.trim().to_string(), PathBuf::from(p));
            }
            for (k, p) in files {
                options.insert(k.clone(), read_secret(&format!("Kafka setting {k}"), &p)?);
            }
            for kv in &args.kafka_options {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    bad(format!(
                        "--kafka-option {:?}: expected KEY=VALUE",
                        key_only(kv)
                    ))
                })?;
                options.insert(k.trim().to_string(), v.to_string());
            }
            if let Some(p) = args.kafka_sasl_password {
                options.insert("sasl.password".into(), p);
            }
            SinkChoice::Kafka(KafkaChoice {
                brokers: args
                    .kafka_brokers
                    .or(file.kafka_brokers)
                    .ok_or_else(|| bad("the kafka sink needs --kafka-brokers HOST:PORT"))?,
                topic: args.kafka_topic.or(file.kafka_topic),
                options,
                scan_without_read: args.kafka_restart_scan_without_read
                    || file.kafka_restart_scan_without_read.unwrap_or(false),
            })
        }
        other => {
            return Err(bad(format!(
                "unknown sink {other:?} (expected file, stdout, nats or kafka)"
            )));
        }
    };
    let batch_size = args.batch_size.or(file.batch_size).unwrap_or(500);
    if batch_size == 0 {
        return Err(bad("batch_size must be at least 1"));
    }
    let metrics_addr = match args
        .metrics_addr
        .or(file.metrics_addr)
        .unwrap_or_else(|| "127.0.0.1:9464".into())
        .as_str()
    {
        "off" => None,
        addr => Some(
            addr.parse::<SocketAddr>()
                .map_err(|e| bad(format!("metrics_addr {addr:?}: {e}")))?,
        ),
    };
    Ok(RunConfig {
        db,
        sink,
        batch_size,
        catch_up: Duration::from_millis(args.catch_up_ms.or(file.catch_up_ms).unwrap_or(20).max(1)),
        metrics_addr,
        max_lag: Duration::from_secs(args.max_lag_secs.or(file.max_lag_secs).unwrap_or(60)),
        drain_timeout: Duration::from_secs(
            args.drain_timeout_secs
                .or(file.drain_timeout_secs)
                .unwrap_or(10),
        ),
        drain: args.drain,
    })
}

/// A `KEY=VALUE` argument without a `=` shown safely: it may be a secret
/// value given by mistake, so only a short prefix of it.
fn key_only(arg: &str) -> String {
    let prefix: String = arg.chars().take(24).collect();
    if outboxkv::redact::is_secret_setting(&prefix) || prefix.len() < arg.len() {
        format!("{prefix}...")
    } else {
        prefix
    }
}
