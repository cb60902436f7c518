//! `outbox-relay`: ships an outboxkv store's outbox from a separate process
//! (a sidecar beside the service), and the operator commands `status`,
//! `inspect` and `dlq`.
//!
//! Settings come from flags, then `OUTBOXKV_*` environment variables, then a
//! TOML file (`--config`), in that order of precedence. Errors are one line
//! on stderr and a non-zero exit code (2: bad input, 1: failure at run time).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use outboxkv::config::RelayConfig;
use outboxkv::outbox::handoff::{cursor_path, read_cursor};
use outboxkv::relay::sidecar::SidecarSource;
use outboxkv::relay::{Relay, RelayBuilder, RelayMetrics, Shutdown, Sink};
use outboxkv::sink::cloudevents;
use outboxkv::store::StoreReader;
use outboxkv::{DeadLetter, OutboxEntry, Store};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
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
    /// Log filter (tracing EnvFilter syntax, e.g. `info,outboxkv=debug`).
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Ship the outbox to a sink: beside a running service (sidecar), or
    /// with --drain, alone, until the outbox is empty.
    Run(Box<RunArgs>),
    /// Head, tail, depth, lag, dead letters and cursor of a store.
    Status {
        #[arg(long, env = "OUTBOXKV_DB")]
        db: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print outbox entries.
    Inspect {
        #[arg(long, env = "OUTBOXKV_DB")]
        db: PathBuf,
        /// First seq (default: the oldest entry).
        #[arg(long)]
        from: Option<u64>,
        /// Most entries to print.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only entries with this key.
        #[arg(long)]
        key: Option<String>,
        /// Only entries of this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter table: list, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters.
    List {
        #[arg(long, env = "OUTBOXKV_DB")]
        db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Append dead letters to the outbox again (same event ids). Needs the
    /// store closed by the service.
    Replay(DlqSelect),
    /// Delete dead letters. Needs the store closed by the service.
    Purge(DlqSelect),
}

#[derive(Args, Debug)]
struct DlqSelect {
    #[arg(long, env = "OUTBOXKV_DB")]
    db: PathBuf,
    /// Seqs to act on (repeat the flag, or comma-separate).
    #[arg(long, value_delimiter = ',', required_unless_present = "all")]
    seq: Vec<u64>,
    /// Every dead letter.
    #[arg(long, conflicts_with = "seq")]
    all: bool,
}

#[derive(Args, Debug, Default)]
struct RunArgs {
    /// The store's folder.
    #[arg(long, env = "OUTBOXKV_DB")]
    db: Option<PathBuf>,
    /// Where to ship: file, stdout, nats or kafka.
    #[arg(long, env = "OUTBOXKV_SINK")]
    sink: Option<String>,
    /// A TOML file with any of these settings (keys as the flags, with `_`).
    #[arg(long, env = "OUTBOXKV_CONFIG")]
    config: Option<PathBuf>,
    /// File sink: the JSON Lines file to append to.
    #[arg(long, env = "OUTBOXKV_FILE")]
    file: Option<PathBuf>,
    /// NATS sink: server URL.
    #[arg(long, env = "OUTBOXKV_NATS_URL")]
    nats_url: Option<String>,
    /// NATS sink: subject template ({prefix}, {type}, {key}).
    #[arg(long, env = "OUTBOXKV_NATS_SUBJECT")]
    nats_subject: Option<String>,
    /// NATS sink: create this stream (capturing `<prefix>.>`) if missing.
    #[arg(long, env = "OUTBOXKV_NATS_STREAM")]
    nats_stream: Option<String>,
    /// NATS sink: the {prefix} of the subject template.
    #[arg(long, env = "OUTBOXKV_NATS_PREFIX")]
    nats_prefix: Option<String>,
    /// NATS sink: credentials (.creds) file.
    #[arg(long, env = "OUTBOXKV_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// NATS sink: token (prefer the environment variable for secrets).
    #[arg(long, env = "OUTBOXKV_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS sink: user (with OUTBOXKV_NATS_PASSWORD).
    #[arg(long, env = "OUTBOXKV_NATS_USER")]
    nats_user: Option<String>,
    /// NATS sink: password for --nats-user.
    #[arg(long, env = "OUTBOXKV_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS sink: trust this root CA (PEM) and require TLS.
    #[arg(long, env = "OUTBOXKV_NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// Kafka sink: bootstrap brokers (host:port,...).
    #[arg(long, env = "OUTBOXKV_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Kafka sink: topic template ({type}, {key}).
    #[arg(long, env = "OUTBOXKV_KAFKA_TOPIC")]
    kafka_topic: Option<String>,
    /// Kafka sink: a librdkafka setting, KEY=VALUE (repeatable): security.protocol,
    /// sasl.*, ssl.*, compression.type, ... Added to `kafka_options` of the config file.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    kafka_options: Vec<String>,
    /// Most entries per published batch (default 500).
    #[arg(long, env = "OUTBOXKV_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Sidecar: how often to catch up with the service's writes, in ms (default 20);
    /// on Linux it also catches up as soon as the service writes.
    #[arg(long, env = "OUTBOXKV_CATCH_UP_MS")]
    catch_up_ms: Option<u64>,
    /// Where to serve /metrics and /healthz (default 127.0.0.1:9464; `off` to disable).
    #[arg(long, env = "OUTBOXKV_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// /healthz fails when the oldest undelivered entry is older (default 60 s).
    #[arg(long, env = "OUTBOXKV_MAX_LAG_SECS")]
    max_lag_secs: Option<u64>,
    /// How long SIGTERM (or --drain) keeps shipping before exiting (default 10 s).
    #[arg(long, env = "OUTBOXKV_DRAIN_TIMEOUT_SECS")]
    drain_timeout_secs: Option<u64>,
    /// Open the store directly (no service may hold it), ship everything, exit.
    #[arg(long)]
    drain: bool,
}

/// A failure: the message and the exit code.
struct Fail(String, u8);

impl From<outboxkv::Error> for Fail {
    fn from(e: outboxkv::Error) -> Fail {
        let code = match e {
            outboxkv::Error::NotAStore { .. }
            | outboxkv::Error::UnsupportedFormat { .. }
            | outboxkv::Error::Locked { .. }
            | outboxkv::Error::Corruption { .. }
            | outboxkv::Error::InvalidArgument(_) => 2,
            _ => 1,
        };
        Fail(e.to_string(), code)
    }
}

fn bad(message: impl Into<String>) -> Fail {
    Fail(message.into(), 2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Status { db, json } => status(&db, json),
        Command::Inspect {
            db,
            from,
            limit,
            key,
            event_type,
            json,
        } => inspect(&db, from, limit, key, event_type, json),
        Command::Dlq { command } => dlq(command),
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

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Settings of `run` after flags, environment and file are merged.
struct RunConfig {
    db: PathBuf,
    sink: SinkChoice,
    batch_size: usize,
    catch_up: Duration,
    metrics_addr: Option<SocketAddr>,
    max_lag: Duration,
    drain_timeout: Duration,
    drain: bool,
}

enum SinkChoice {
    File(PathBuf),
    Stdout,
    Nats {
        url: String,
        subject: Option<String>,
        prefix: Option<String>,
        stream: Option<String>,
        creds: Option<PathBuf>,
        token: Option<String>,
        user: Option<(String, String)>,
        ca: Option<PathBuf>,
    },
    Kafka {
        brokers: String,
        topic: Option<String>,
        options: std::collections::BTreeMap<String, String>,
    },
}

fn load_config(args: RunArgs) -> Result<RunConfig, Fail> {
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
        "nats" => SinkChoice::Nats {
            url: args
                .nats_url
                .or(file.nats_url)
                .ok_or_else(|| bad("the nats sink needs --nats-url URL"))?,
            subject: args.nats_subject.or(file.nats_subject),
            prefix: args.nats_prefix.or(file.nats_prefix),
            stream: args.nats_stream.or(file.nats_stream),
            creds: args.nats_creds.or(file.nats_creds),
            token: args.nats_token.or(file.nats_token),
            user: match (
                args.nats_user.or(file.nats_user),
                args.nats_password.or(file.nats_password),
            ) {
                (Some(u), Some(p)) => Some((u, p)),
                (None, None) => None,
                _ => return Err(bad("nats_user and nats_password go together")),
            },
            ca: args.nats_ca.or(file.nats_ca),
        },
        "kafka" => SinkChoice::Kafka {
            brokers: args
                .kafka_brokers
                .or(file.kafka_brokers)
                .ok_or_else(|| bad("the kafka sink needs --kafka-brokers HOST:PORT"))?,
            topic: args.kafka_topic.or(file.kafka_topic),
            options: {
                let mut o = file.kafka_options.unwrap_or_default();
                for kv in &args.kafka_options {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| bad(format!("--kafka-option {kv:?}: expected KEY=VALUE")))?;
                    o.insert(k.trim().to_string(), v.to_string());
                }
                o
            },
        },
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

fn run(args: RunArgs) -> Result<(), Fail> {
    let config = load_config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Fail(format!("start runtime: {e}"), 1))?;
    runtime.block_on(run_async(config))
}

async fn connect_sink(choice: &SinkChoice) -> Result<Arc<dyn Sink>, Fail> {
    match choice {
        SinkChoice::File(path) => Ok(Arc::new(outboxkv::sink::FileSink::open(path)?)),
        SinkChoice::Stdout => Ok(Arc::new(outboxkv::sink::StdoutSink)),
        #[cfg(feature = "nats")]
        SinkChoice::Nats {
            url,
            subject,
            prefix,
            stream,
            creds,
            token,
            user,
            ca,
        } => {
            use outboxkv::sink::nats::{NatsOptions, NatsSink, StreamSetup};
            let mut o = NatsOptions::new(url.clone());
            if let Some(s) = subject {
                o = o.subject_template(s.clone());
            }
            if let Some(c) = creds {
                o = o.credentials_file(c.clone());
            }
            if let Some(t) = token {
                o = o.token(t.clone());
            }
            if let Some((u, p)) = user {
                o = o.user_and_password(u.clone(), p.clone());
            }
            if let Some(ca) = ca {
                o = o.root_ca(ca.clone());
            }
            let prefix = prefix.clone().unwrap_or_else(|| "events".into());
            o = o.prefix(prefix.clone());
            if let Some(name) = stream {
                o = o.create_stream(StreamSetup {
                    name: name.clone(),
                    subjects: vec![format!("{prefix}.>")],
                    duplicate_window: Duration::from_secs(120),
                });
            }
            Ok(Arc::new(NatsSink::connect(o).await?))
        }
        #[cfg(feature = "kafka")]
        SinkChoice::Kafka {
            brokers,
            topic,
            options,
        } => {
            use outboxkv::sink::kafka::{KafkaOptions, KafkaSink};
            let mut o = KafkaOptions::new(brokers.clone());
            for (k, v) in options {
                o = o.set(k.clone(), v.clone());
            }
            if let Some(t) = topic {
                o = o.topic_template(t.clone());
            }
            Ok(Arc::new(KafkaSink::connect(o).await?))
        }
        #[allow(unreachable_patterns)]
        _ => Err(bad(
            "this outbox-relay was built without that sink (cargo features nats, kafka)",
        )),
    }
}

async fn run_async(config: RunConfig) -> Result<(), Fail> {
    // Open (and so check) the store before connecting anything.
    let metrics = RelayMetrics::new();
    let (builder, store): (RelayBuilder, Option<Store>) = if config.drain {
        let store = Store::options()
            .create_if_missing(false)
            .relay_cursor_poll(None)
            .open(&config.db)?;
        // A sidecar's cursor, if one ran: do not ship its work again.
        store.outbox().apply_relay_cursor()?;
        (Relay::builder(&store), Some(store))
    } else {
        // The service may be creating the store right now (its column
        // families appear just after its CURRENT file): retry storage errors
        // for a while. Anything else (not a store, newer format, a damaged
        // cursor, another sidecar) fails at once.
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
        (Relay::builder_for(source), None)
    };
    let sink = connect_sink(&config.sink).await?;
    let relay = builder
        .sink_arc(sink)
        .batch_size(config.batch_size)
        .metrics(metrics.clone())
        .start()?;
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Fail(format!("metrics endpoint {addr}: {e}"), 1))?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        tokio::spawn(serve_metrics(listener, metrics.clone(), config.max_lag));
    }
    if let Some(store) = store {
        let result = relay.shutdown(Shutdown::Drain(config.drain_timeout)).await;
        result?;
        let left = store.outbox().depth();
        if left > 0 {
            return Err(Fail(
                format!(
                    "{left} entries still undelivered after {:?}",
                    config.drain_timeout
                ),
                1,
            ));
        }
        tracing::info!("drained; the outbox is empty");
        return Ok(());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Fail(format!("install SIGTERM handler: {e}"), 1))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
        _ = relay.stopped() => {}
    }
    relay
        .shutdown(Shutdown::Drain(config.drain_timeout))
        .await?;
    Ok(())
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: RelayMetrics,
    max_lag: Duration,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the request head (up to 8 KiB): a request may arrive in pieces.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read_head = async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let n = buf.len();
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.encode_text(),
                ),
                "/healthz" => {
                    let lag = metrics.oldest_undelivered_age_seconds.get();
                    let up = metrics.sink_up.get() == 1;
                    if up && lag <= max_lag.as_secs_f64() {
                        ("200 OK", "text/plain", "ok\n".to_string())
                    } else {
                        (
                            "503 Service Unavailable",
                            "text/plain",
                            format!("unhealthy: sink_up={up} lag_seconds={lag:.3}\n"),
                        )
                    }
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}

/// A read-only view for status, inspect and dlq list.
struct ReadView {
    // Field order is drop order: the database closes before its scratch
    // folder is removed.
    reader: StoreReader,
    _scratch: Scratch,
}

/// A temporary folder for the secondary instance, removed on drop (also
/// when opening the store fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ReadView {
    fn open(db: &Path) -> Result<ReadView, Fail> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let scratch = Scratch(
            std::env::temp_dir().join(format!("outbox-relay-{}-{nanos}", std::process::id())),
        );
        let reader = StoreReader::open(db, &scratch.0)?;
        Ok(ReadView {
            reader,
            _scratch: scratch,
        })
    }

    fn reader(&self) -> &StoreReader {
        &self.reader
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn status(db: &Path, as_json: bool) -> Result<(), Fail> {
    // The cursor file is checked first: a damaged one is reported as such.
    let cursor = read_cursor(&cursor_path(db));
    let view = ReadView::open(db)?;
    let r = view.reader();
    let cursor = cursor?;
    let (head, tail) = (r.head()?, r.tail()?);
    let depth = (head + 1).saturating_sub(tail);
    let oldest = r.read(tail, 1)?.into_iter().next();
    let delivered = cursor.as_ref().map_or(tail.saturating_sub(1), |c| {
        c.delivered_through.max(tail.saturating_sub(1))
    });
    let undelivered = head.saturating_sub(delivered);
    let oldest_undelivered = if undelivered == 0 {
        None
    } else {
        r.read(delivered + 1, 1)?.into_iter().next()
    };
    let age = |e: &Option<OutboxEntry>| {
        e.as_ref()
            .map(|e| now_micros().saturating_sub(e.created_at_micros) as f64 / 1e6)
    };
    let dead = r.dead_letter_count()?;
    let doc = json!({
        "store": db.display().to_string(),
        "store_id": r.id().to_string(),
        "format_version": r.format_version(),
        "head": head,
        "tail": tail,
        "depth": depth,
        "undelivered": undelivered,
        "oldest_entry_age_seconds": age(&oldest),
        "oldest_undelivered_age_seconds": age(&oldest_undelivered),
        "dead_letters": dead,
        "sidecar_cursor": cursor.as_ref().map(|c| json!({
            "delivered_through": c.delivered_through,
            "dead_pending": c.dead.len(),
        })),
    });
    if as_json {
        println!("{doc}");
        return Ok(());
    }
    let rows: Vec<(&str, String)> = vec![
        ("store", db.display().to_string()),
        ("store id", r.id().to_string()),
        ("format version", r.format_version().to_string()),
        ("head seq", head.to_string()),
        ("tail seq", tail.to_string()),
        ("outbox depth", depth.to_string()),
        ("undelivered", undelivered.to_string()),
        (
            "oldest undelivered age",
            age(&oldest_undelivered).map_or("-".into(), |a| format!("{a:.3} s")),
        ),
        ("dead letters", dead.to_string()),
        (
            "sidecar cursor",
            cursor.as_ref().map_or("none".into(), |c| {
                format!(
                    "delivered through {} ({} dead pending)",
                    c.delivered_through,
                    c.dead.len()
                )
            }),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<24}{v}");
    }
    Ok(())
}

fn payload_json(e: &OutboxEntry) -> Value {
    match serde_json::from_slice::<Value>(&e.payload) {
        Ok(v) => v,
        Err(_) => match std::str::from_utf8(&e.payload) {
            Ok(text) => json!({ "text": text }),
            Err(_) => json!({ "base64": cloudevents::base64(&e.payload) }),
        },
    }
}

fn entry_json(e: &OutboxEntry) -> Value {
    json!({
        "seq": e.seq,
        "id": e.id.to_string(),
        "type": e.event_type,
        "key": e.key,
        "content_type": e.content_type,
        "time": cloudevents::rfc3339_micros(e.created_at_micros),
        "headers": e.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "payload": payload_json(e),
    })
}

fn inspect(
    db: &Path,
    from: Option<u64>,
    limit: usize,
    key: Option<String>,
    event_type: Option<String>,
    as_json: bool,
) -> Result<(), Fail> {
    let view = ReadView::open(db)?;
    let r = view.reader();
    let head = r.head()?;
    let mut next = from.unwrap_or(0).max(r.tail()?);
    let mut shown = 0usize;
    while shown < limit && next <= head {
        let chunk = r.read(next, 1000)?;
        let Some(last) = chunk.last() else { break };
        next = last.seq + 1;
        for e in chunk.iter().filter(|e| {
            key.as_ref().is_none_or(|k| &e.key == k)
                && event_type.as_ref().is_none_or(|t| &e.event_type == t)
        }) {
            if shown >= limit {
                break;
            }
            shown += 1;
            if as_json {
                println!("{}", entry_json(e));
            } else {
                println!(
                    "seq {}  {}  type {}  key {}  {}  {}",
                    e.seq,
                    e.id,
                    e.event_type,
                    e.key,
                    e.content_type,
                    cloudevents::rfc3339_micros(e.created_at_micros)
                );
                for (k, v) in &e.headers {
                    println!("  header {k}: {v}");
                }
                println!("  payload {}", payload_json(e));
            }
        }
    }
    if !as_json {
        println!("({shown} entries)");
    }
    Ok(())
}

fn dead_json(d: &DeadLetter) -> Value {
    json!({
        "seq": d.entry.seq,
        "id": d.entry.id.to_string(),
        "type": d.entry.event_type,
        "key": d.entry.key,
        "attempts": d.attempts,
        "error": d.error,
        "first_failed": cloudevents::rfc3339_micros(d.first_failed_micros),
        "dead_at": cloudevents::rfc3339_micros(d.dead_at_micros),
        "payload": payload_json(&d.entry),
    })
}

fn open_for_write(db: &Path) -> Result<Store, Fail> {
    match Store::options()
        .create_if_missing(false)
        .relay_cursor_poll(None)
        .open(db)
    {
        Err(outboxkv::Error::Locked { .. }) => Err(bad(format!(
            "the store {} is open in another process (the service?); dlq replay and purge need it closed",
            db.display()
        ))),
        other => Ok(other?),
    }
}

fn dlq(command: DlqCommand) -> Result<(), Fail> {
    match command {
        DlqCommand::List { db, json: as_json } => {
            let view = ReadView::open(&db)?;
            let dead = view.reader().dead_letters(0, usize::MAX)?;
            for d in &dead {
                if as_json {
                    println!("{}", dead_json(d));
                } else {
                    println!(
                        "seq {}  {}  type {}  key {}  attempts {}  error: {}",
                        d.entry.seq,
                        d.entry.id,
                        d.entry.event_type,
                        d.entry.key,
                        d.attempts,
                        d.error
                    );
                }
            }
            if !as_json {
                println!("({} dead letters)", dead.len());
            }
            Ok(())
        }
        DlqCommand::Replay(sel) => {
            let store = open_for_write(&sel.db)?;
            let seqs = selected(&store, &sel)?;
            let new = store.outbox().dead_letters().replay(&seqs)?;
            println!(
                "replayed {} dead letters as seqs {}..={}",
                seqs.len(),
                new.start,
                new.end.saturating_sub(1)
            );
            Ok(())
        }
        DlqCommand::Purge(sel) => {
            let store = open_for_write(&sel.db)?;
            let seqs = selected(&store, &sel)?;
            store.outbox().dead_letters().purge(&seqs)?;
            println!("purged {} dead letters", seqs.len());
            Ok(())
        }
    }
}

fn selected(store: &Store, sel: &DlqSelect) -> Result<Vec<u64>, Fail> {
    let present: Vec<u64> = store
        .outbox()
        .dead_letters()
        .list(0, usize::MAX)?
        .iter()
        .map(|d| d.entry.seq)
        .collect();
    if sel.all {
        return Ok(present);
    }
    if let Some(missing) = sel.seq.iter().find(|s| !present.contains(s)) {
        return Err(bad(format!("no dead letter with seq {missing}")));
    }
    Ok(sel.seq.clone())
}
