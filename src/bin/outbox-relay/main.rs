//! `outbox-relay`: ships an outboxkv store's outbox from a separate process
//! (a sidecar beside the service), and the operator commands `status`,
//! `inspect` and `dlq`.
//!
//! Settings come from flags, then `OUTBOXKV_*` environment variables, then a
//! TOML file (`--config`), in that order of precedence. Errors are one line
//! on stderr and a non-zero exit code: 2 for bad input (a path that is not a
//! store, a bad flag or config value), 1 for anything else (damage found, a
//! held lock, a broker that refuses, a drain that timed out, an unhealthy
//! `status`).
//!
//! Modules, one concern each: [`settings`] (flags, environment and file
//! merged), [`sinks`] (connecting the chosen sink), [`serve`] (`/metrics`
//! and `/healthz`), [`run`] (the sidecar and `--drain`), [`ops`] (`status`,
//! `inspect`, `dlq`).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod inbox;
mod ops;
mod run;
mod serve;
mod settings;
mod sinks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Ship and inspect an outboxkv store's outbox"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "OUTBOXKV_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,outboxkv=debug`;
    /// async_nats and rdkafka stay at info at most: their debug logs show
    /// credentials).
    #[arg(long, global = true, env = "OUTBOXKV_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Ship the outbox to a sink: beside a running service (sidecar), or
    /// with --drain, alone, until the outbox is empty.
    Run(Box<RunArgs>),
    /// Head, tail, depth, lag, dead letters, cursor and relay lock of a
    /// store; exits 1 when unhealthy (undelivered entries older than
    /// --max-lag-secs).
    Status {
        #[arg(long, env = "OUTBOXKV_DB")]
        db: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Unhealthy when the oldest undelivered entry is older (seconds).
        #[arg(long, env = "OUTBOXKV_MAX_LAG_SECS", default_value_t = 60)]
        max_lag_secs: u64,
    },
    /// Print outbox entries.
    Inspect(ops::InspectArgs),
    /// The dead-letter table: list, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// A consumer's inbox: positions, dead letters, replays.
    Inbox {
        #[command(subcommand)]
        command: inbox::InboxCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters.
    List {
        #[arg(long, env = "OUTBOXKV_DB")]
        db: PathBuf,
        #[arg(long)]
        json: bool,
        /// Most dead letters to list.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Append dead letters to the outbox again (same event ids). Needs the
    /// store closed by the service.
    Replay(ops::DlqSelect),
    /// Delete dead letters. Needs the store closed by the service.
    Purge(ops::DlqSelect),
}

/// The settings of `run`. Secrets (`--nats-token`, `--nats-password`,
/// `sasl.password` and the like) are better given through the environment
/// or a file than as flags, which other users of the machine can see.
#[derive(Args, Default)]
pub(crate) struct RunArgs {
    /// The store's folder.
    #[arg(long, env = "OUTBOXKV_DB")]
    pub(crate) db: Option<PathBuf>,
    /// Where to ship: file, stdout, nats or kafka.
    #[arg(long, env = "OUTBOXKV_SINK")]
    pub(crate) sink: Option<String>,
    /// A TOML file with any of these settings (keys as the flags, with `_`).
    #[arg(long, env = "OUTBOXKV_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// File sink: the JSON Lines file to append to.
    #[arg(long, env = "OUTBOXKV_FILE")]
    pub(crate) file: Option<PathBuf>,
    /// NATS sink: server URL.
    #[arg(long, env = "OUTBOXKV_NATS_URL", hide_env_values = true)]
    pub(crate) nats_url: Option<String>,
    /// NATS sink: subject template ({prefix}, {type}, {key}).
    #[arg(long, env = "OUTBOXKV_NATS_SUBJECT")]
    pub(crate) nats_subject: Option<String>,
    /// NATS sink: this stream must exist and capture the template's
    /// subjects (created if missing, capturing the template up to its first
    /// placeholder, then `>`).
    #[arg(long, env = "OUTBOXKV_NATS_STREAM")]
    pub(crate) nats_stream: Option<String>,
    /// NATS sink: the {prefix} of the subject template.
    #[arg(long, env = "OUTBOXKV_NATS_PREFIX")]
    pub(crate) nats_prefix: Option<String>,
    /// NATS sink: `structured` (default, CloudEvents JSON payload) or
    /// `binary` (`ce-*` headers).
    #[arg(long, env = "OUTBOXKV_NATS_CONTENT_MODE")]
    pub(crate) nats_content_mode: Option<String>,
    /// NATS sink: credentials (.creds) file.
    #[arg(long, env = "OUTBOXKV_NATS_CREDS")]
    pub(crate) nats_creds: Option<PathBuf>,
    /// NATS sink: token (prefer OUTBOXKV_NATS_TOKEN or --nats-token-file).
    #[arg(long, env = "OUTBOXKV_NATS_TOKEN", hide_env_values = true)]
    pub(crate) nats_token: Option<String>,
    /// NATS sink: a file holding the token.
    #[arg(long, env = "OUTBOXKV_NATS_TOKEN_FILE")]
    pub(crate) nats_token_file: Option<PathBuf>,
    /// NATS sink: user (with a password).
    #[arg(long, env = "OUTBOXKV_NATS_USER")]
    pub(crate) nats_user: Option<String>,
    /// NATS sink: password for --nats-user (prefer OUTBOXKV_NATS_PASSWORD or
    /// --nats-password-file).
    #[arg(long, env = "OUTBOXKV_NATS_PASSWORD", hide_env_values = true)]
    pub(crate) nats_password: Option<String>,
    /// NATS sink: a file holding the password.
    #[arg(long, env = "OUTBOXKV_NATS_PASSWORD_FILE")]
    pub(crate) nats_password_file: Option<PathBuf>,
    /// NATS sink: trust this root CA (PEM) and require TLS.
    #[arg(long, env = "OUTBOXKV_NATS_CA")]
    pub(crate) nats_ca: Option<PathBuf>,
    /// Kafka sink: bootstrap brokers (host:port,...).
    #[arg(long, env = "OUTBOXKV_KAFKA_BROKERS")]
    pub(crate) kafka_brokers: Option<String>,
    /// Kafka sink: topic template ({type}, {key}).
    #[arg(long, env = "OUTBOXKV_KAFKA_TOPIC")]
    pub(crate) kafka_topic: Option<String>,
    /// Kafka sink: a librdkafka setting, KEY=VALUE (repeatable): security.protocol,
    /// sasl.*, ssl.*, compression.type, ... Added to `kafka_options` of the config file.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub(crate) kafka_options: Vec<String>,
    /// Kafka sink: a librdkafka setting whose value is read from a file,
    /// KEY=PATH (repeatable), e.g. sasl.password=/run/secrets/kafka.
    #[arg(long = "kafka-option-file", value_name = "KEY=PATH")]
    pub(crate) kafka_option_files: Vec<String>,
    /// Kafka sink: the SASL password (sets `sasl.password`).
    #[arg(long, env = "OUTBOXKV_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub(crate) kafka_sasl_password: Option<String>,
    /// Kafka sink: ship without the restart scan to topics the relay may
    /// not read (duplicates after a restart become possible).
    #[arg(long, env = "OUTBOXKV_KAFKA_RESTART_SCAN_WITHOUT_READ")]
    pub(crate) kafka_restart_scan_without_read: bool,
    /// Most entries per published batch (default 500).
    #[arg(long, env = "OUTBOXKV_BATCH_SIZE")]
    pub(crate) batch_size: Option<usize>,
    /// Sidecar: how often to catch up with the service's writes, in ms (default 20);
    /// on Linux it also catches up as soon as the service writes.
    #[arg(long, env = "OUTBOXKV_CATCH_UP_MS")]
    pub(crate) catch_up_ms: Option<u64>,
    /// Where to serve /metrics and /healthz (default 127.0.0.1:9464; `off` to disable).
    #[arg(long, env = "OUTBOXKV_METRICS_ADDR")]
    pub(crate) metrics_addr: Option<String>,
    /// /healthz fails when the oldest undelivered entry is older, or a
    /// publish has waited longer (default 60 s).
    #[arg(long, env = "OUTBOXKV_MAX_LAG_SECS")]
    pub(crate) max_lag_secs: Option<u64>,
    /// How long SIGTERM (or --drain) keeps shipping before exiting (default 10 s).
    #[arg(long, env = "OUTBOXKV_DRAIN_TIMEOUT_SECS")]
    pub(crate) drain_timeout_secs: Option<u64>,
    /// Open the store directly (no service may hold it), ship everything, exit.
    #[arg(long)]
    pub(crate) drain: bool,
}

/// A failure: the message and the exit code.
pub(crate) struct Fail(pub(crate) String, pub(crate) u8);

impl From<outboxkv::Error> for Fail {
    fn from(e: outboxkv::Error) -> Fail {
        // 2 is bad input only: a path that is not a store (or of a newer
        // format), an argument out of range. Damage found at run time, a
        // held lock, a broker that refuses: 1.
        let code = match e {
            outboxkv::Error::NotAStore { .. }
            | outboxkv::Error::UnsupportedFormat { .. }
            | outboxkv::Error::InvalidArgument(_) => 2,
            _ => 1,
        };
        Fail(e.to_string(), code)
    }
}

/// Bad input: exit code 2.
pub(crate) fn bad(message: impl Into<String>) -> Fail {
    Fail(message.into(), 2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Status {
            db,
            json,
            max_lag_secs,
        } => ops::status(&db, json, max_lag_secs),
        Command::Inspect(args) => ops::inspect(args),
        Command::Dlq { command } => match command {
            DlqCommand::List { db, json, limit } => ops::dlq_list(&db, json, limit),
            DlqCommand::Replay(sel) => ops::dlq_replay(&sel),
            DlqCommand::Purge(sel) => ops::dlq_purge(&sel),
        },
        Command::Inbox { command } => match command {
            inbox::InboxCommand::List(w) => inbox::list(&w),
            inbox::InboxCommand::Replay(sel) => inbox::replay(&sel),
            inbox::InboxCommand::Purge(sel) => inbox::purge(&sel),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(message, code)) => {
            let message = message.replace('\n', " ");
            eprintln!("outbox-relay: error: {message}");
            ExitCode::from(code)
        }
    }
}

/// Targets whose debug logs print connection details, credentials among
/// them (async-nats logs its parsed server URL, password and all): capped
/// at `info` whatever `--log` asks (a more specific directive such as
/// `async_nats::connector=debug` included), so no secret reaches the log.
const CAPPED: [&str; 3] = ["async_nats", "rdkafka", "librdkafka"];

fn capped(target: &str) -> bool {
    CAPPED.iter().any(|c| {
        target
            .strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let cap = tracing_subscriber::filter::filter_fn(|meta| {
        !(capped(meta.target()) && *meta.level() > tracing::Level::INFO)
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Human => registry.with(layer.with_filter(cap)).init(),
        LogFormat::Json => registry.with(layer.json().with_filter(cap)).init(),
    }
}
