//! The NATS JetStream sink.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectErrorKind, HeaderMap};

use super::cloudevents;
use crate::error::{Error, Result};
use crate::outbox::entry::OutboxEntry;
use crate::relay::{BoxFuture, Outcome, Sink};

/// The stream the sink makes sure exists at start-up.
#[derive(Debug, Clone)]
pub struct StreamSetup {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures (e.g. `events.>`).
    pub subjects: Vec<String>,
    /// How long JetStream remembers message ids for deduplication. Redelivery
    /// after a relay restart is only deduplicated within this window.
    /// Default: 2 minutes (JetStream's default).
    pub duplicate_window: Duration,
}

/// Options for [`NatsSink::connect`].
///
/// ```
/// use outboxkv::sink::nats::{NatsOptions, StreamSetup};
/// let opts = NatsOptions::new("nats://127.0.0.1:4222")
///     .subject_template("{prefix}.{type}")
///     .prefix("events")
///     .create_stream(StreamSetup {
///         name: "EVENTS".into(),
///         subjects: vec!["events.>".into()],
///         duplicate_window: std::time::Duration::from_secs(120),
///     });
/// assert_eq!(opts.subject_for("orders.paid"), "events.orders.paid");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct NatsOptions {
    url: String,
    template: String,
    prefix: String,
    stream: Option<StreamSetup>,
    window: usize,
    ack_timeout: Duration,
    user: Option<(String, String)>,
    token: Option<String>,
    credentials: Option<PathBuf>,
    root_ca: Option<PathBuf>,
}

impl NatsOptions {
    /// Options for the server at `url` (e.g. `nats://127.0.0.1:4222`).
    pub fn new(url: impl Into<String>) -> NatsOptions {
        NatsOptions {
            url: url.into(),
            template: "{prefix}.{type}".into(),
            prefix: "events".into(),
            stream: None,
            window: 1000,
            ack_timeout: Duration::from_secs(5),
            user: None,
            token: None,
            credentials: None,
            root_ca: None,
        }
    }

    /// Subject template; `{prefix}`, `{type}` and `{key}` are replaced.
    /// Default: `{prefix}.{type}`.
    pub fn subject_template(mut self, template: impl Into<String>) -> Self {
        self.template = template.into();
        self
    }

    /// The `{prefix}` of the template. Default: `events`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Create (or check) this stream at connect. Default: none.
    pub fn create_stream(mut self, stream: StreamSetup) -> Self {
        self.stream = Some(stream);
        self
    }

    /// Most publishes awaiting their ack at once. Default: 1000 (async-nats
    /// itself allows 5000; every ack future is awaited, none dropped).
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// How long to wait for one ack before the attempt counts as failed
    /// (and is retried). Default: 5 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Authenticate with user and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Authenticate with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Authenticate with a credentials (`.creds`) file.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials = Some(path.into());
        self
    }

    /// Trust this root CA (PEM) and require TLS.
    pub fn root_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_ca = Some(path.into());
        self
    }

    /// The subject an event of `event_type` is published on (key `""`).
    pub fn subject_for(&self, event_type: &str) -> String {
        self.render(event_type, "")
    }

    fn render(&self, event_type: &str, key: &str) -> String {
        self.template
            .replace("{prefix}", &self.prefix)
            .replace("{type}", event_type)
            .replace("{key}", key)
    }
}

/// Whether `s` is a valid NATS subject to publish on: non-empty tokens
/// separated by `.`, no whitespace, no wildcards.
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| !t.is_empty() && t != "*" && t != ">")
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Publishes to NATS JetStream, pipelined, with the event id as
/// `Nats-Msg-Id` so JetStream drops re-sent entries within its duplicate
/// window, and the CloudEvents attributes as `ce-*` headers (binary mode).
#[derive(Debug)]
pub struct NatsSink {
    opts: NatsOptions,
    js: jetstream::Context,
}

impl NatsSink {
    /// Connects (and creates the stream, if configured).
    pub async fn connect(opts: NatsOptions) -> Result<NatsSink> {
        let broker = |message: String| Error::Broker {
            sink: "nats".into(),
            message,
        };
        // A first attempt without retries tells refused credentials, a bad
        // address or bad TLS apart from a server that is not up yet; only the
        // latter is worth retrying in the background.
        let first = tokio::time::timeout(
            Duration::from_secs(5),
            Self::connect_options(&opts, false)
                .await?
                .connect(opts.url.as_str()),
        )
        .await;
        let client = match first {
            Ok(Ok(client)) => client,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    ConnectErrorKind::AuthorizationViolation
                        | ConnectErrorKind::Authentication
                        | ConnectErrorKind::ServerParse
                        | ConnectErrorKind::Tls
                ) =>
            {
                return Err(broker(format!("connect to {}: {e}", opts.url)));
            }
            _ => tokio::time::timeout(
                Duration::from_secs(10),
                Self::connect_options(&opts, true)
                    .await?
                    .connect(opts.url.as_str()),
            )
            .await
            .map_err(|_| broker(format!("connecting to {} timed out", opts.url)))?
            .map_err(|e| broker(format!("connect to {}: {e}", opts.url)))?,
        };
        let mut js = jetstream::new(client);
        js.set_timeout(opts.ack_timeout);
        if let Some(s) = &opts.stream {
            js.get_or_create_stream(stream::Config {
                name: s.name.clone(),
                subjects: s.subjects.clone(),
                duplicate_window: s.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| broker(format!("create stream {}: {e}", s.name)))?;
        }
        Ok(NatsSink { opts, js })
    }

    async fn connect_options(
        opts: &NatsOptions,
        retry: bool,
    ) -> Result<async_nats::ConnectOptions> {
        let mut connect = async_nats::ConnectOptions::new()
            .name("outboxkv-relay")
            .connection_timeout(Duration::from_secs(5));
        if retry {
            connect = connect.retry_on_initial_connect();
        }
        if let Some((u, p)) = &opts.user {
            connect = connect.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &opts.token {
            connect = connect.token(t.clone());
        }
        if let Some(c) = &opts.credentials {
            connect = connect
                .credentials_file(c)
                .await
                .map_err(|e| Error::io("read NATS credentials", c, e))?;
        }
        if let Some(ca) = &opts.root_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(connect)
    }

    /// The JetStream context (for tests and tools).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    fn headers(entry: &OutboxEntry, id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in &entry.headers {
            h.append(name.as_str(), value.as_str());
        }
        h.insert("Nats-Msg-Id", id);
        h.insert("ce-specversion", cloudevents::SPEC_VERSION);
        h.insert("ce-id", id);
        h.insert("ce-source", cloudevents::source(entry));
        h.insert("ce-type", entry.event_type.as_str());
        h.insert("ce-subject", entry.key.as_str());
        h.insert(
            "ce-time",
            cloudevents::rfc3339_micros(entry.created_at_micros),
        );
        h.insert("content-type", entry.content_type.as_str());
        h
    }
}

fn classify(kind: PublishErrorKind, error: String) -> Outcome {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => Outcome::Rejected {
            error,
            permanent: true,
        },
        PublishErrorKind::Other if error.contains("message size") => Outcome::Rejected {
            error,
            permanent: true,
        },
        PublishErrorKind::Other => Outcome::Rejected {
            error,
            permanent: false,
        },
        // Timeouts, broken connections, a stream that is not (yet) there,
        // back-pressure: nothing wrong with the entry; retry until it works.
        _ => Outcome::Retry { error },
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        "nats"
    }

    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
            let mut inflight: VecDeque<(usize, PublishAckFuture)> = VecDeque::new();
            for (i, entry) in batch.iter().enumerate() {
                let subject = self.opts.render(&entry.event_type, &entry.key);
                if !valid_subject(&subject) {
                    outcomes[i] = Some(Outcome::Rejected {
                        error: format!("invalid NATS subject {subject:?}"),
                        permanent: true,
                    });
                    continue;
                }
                if inflight.len() >= self.opts.window
                    && let Some((j, ack)) = inflight.pop_front()
                {
                    outcomes[j] = Some(await_ack(ack).await);
                }
                let id = entry.id.to_string();
                let headers = Self::headers(entry, &id);
                let payload = bytes::Bytes::copy_from_slice(&entry.payload);
                match self
                    .js
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    Ok(ack) => inflight.push_back((i, ack)),
                    Err(e) => outcomes[i] = Some(classify(e.kind(), e.to_string())),
                }
            }
            // Every ack future is awaited: a dropped one would hide its error.
            while let Some((j, ack)) = inflight.pop_front() {
                outcomes[j] = Some(await_ack(ack).await);
            }
            outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or(Outcome::Retry {
                        error: "no outcome recorded".into(),
                    })
                })
                .collect()
        })
    }
}

async fn await_ack(ack: PublishAckFuture) -> Outcome {
    match ack.await {
        Ok(a) => Outcome::Acked {
            position: Some(format!("{}:{}", a.stream, a.sequence)),
            duplicate: a.duplicate,
        },
        Err(e) => classify(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(valid_subject("events.orders.paid"));
        for bad in ["", "events..x", "events.*", "a b", "events.>"] {
            assert!(!valid_subject(bad), "{bad}");
        }
        let o = NatsOptions::new("x").subject_template("{prefix}.{type}.{key}");
        assert_eq!(
            o.render("orders.paid", "order-1"),
            "events.orders.paid.order-1"
        );
    }
}
