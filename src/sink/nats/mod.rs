//! The NATS JetStream sink.
//!
//! # Messages
//!
//! One message per outbox entry, on the subject rendered from the event
//! type and key ([`NatsOptions::subject_template`]), with the event id as
//! `Nats-Msg-Id` (JetStream drops a re-sent entry within the stream's
//! duplicate window) and the event's own headers as message headers. The
//! CloudEvents attributes follow the NATS protocol binding
//! ([`ContentMode`]):
//!
//! - **Structured** (the default; the only mode of the released binding,
//!   1.0.2): the payload is the event as a CloudEvents JSON object (see
//!   [`cloudevents`]), `content-type: application/cloudevents+json`.
//! - **Binary** (the 1.0.3 draft of the binding): the payload is the
//!   entry's payload as it is; every attribute is a `ce-<name>` header with
//!   a percent-encoded value, the content type included
//!   (`ce-datacontenttype`); no `content-type` header (which the draft
//!   reserves for structured messages).
//!
//! # Order
//!
//! Publishes are pipelined (up to [`NatsOptions::window`] awaiting their
//! ack, over every batch in flight: the relay may have several), but at
//! most one per event key at a time: the next entry of a key is sent only
//! once the previous one, of this batch or an earlier one in flight, is
//! acknowledged, and is held back (the relay sends it again later) if that
//! one failed. A connection lost in the middle of a batch can lose a
//! publish while a later one, still in the client's buffer, goes through
//! after the reconnect; one per key at a time means that later one is never
//! of the same key, so per-key order holds on the stream. Entries with an
//! empty key have no order to keep and are not held back. A key with many
//! entries in a row is therefore shipped at one broker round trip per
//! entry; many keys go as fast as the window allows.
//!
//! # Failures
//!
//! Only what is wrong with the entry itself is a rejection: a message over
//! the server's `max_payload` or the stream's `max_msg_size`, an invalid
//! subject, an entry whose headers would not be safe to send (see
//! [`cloudevents::unsafe_for_headers`]): the relay dead-letters those.
//! Everything else (timeouts, a lost connection, no stream for the subject,
//! a full stream with `discard: new`, insufficient resources, any other
//! JetStream error) says nothing about the entry: the relay retries it,
//! with backoff, for as long as it takes.
//!
//! The stream check at connect looks at one sample subject (the template
//! rendered for type `outboxkv.check`): a stream narrower than the template
//! (`events.orders.>` for `{prefix}.{type}`) is refused even if the service
//! only emits `orders.*` types, and one that captures the sample but not
//! every type (`events.*.*` and a type without a dot) passes; the entries
//! it does not capture then find no stream and are retried (the relay
//! holds, `sink_up` is 0) until the stream is fixed.

mod order;
mod publish;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};

use super::cloudevents;
use crate::OutboxEntry;
use crate::broker::nats::NatsConnection;
use crate::error::{Error, Result};
#[cfg(test)]
use crate::redact::{redact_url, scrub};
use order::KeyOrder;

/// How the CloudEvents attributes travel (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// The event as a CloudEvents JSON object in the payload (binding 1.0.2).
    #[default]
    Structured,
    /// Attributes as `ce-*` headers, the payload as it is (binding 1.0.3 draft).
    Binary,
}

/// The stream the sink makes sure exists at start-up, or checks: an
/// existing stream must capture the subjects the template renders and
/// deduplicate over at least `duplicate_window`, else
/// [`NatsSink::connect`] fails with [`Error::Broker`] saying what differs.
#[derive(Debug, Clone)]
pub struct StreamSetup {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures (e.g. `events.>`) when it is created.
    pub subjects: Vec<String>,
    /// How long JetStream remembers message ids for deduplication:
    /// redelivery after a relay restart (or after a publish whose ack was
    /// lost) is deduplicated only within this window, so it should cover
    /// the longest time a relay may need to come back. Default: 2 minutes
    /// (JetStream's default).
    pub duplicate_window: Duration,
}

impl StreamSetup {
    /// A stream named `name` capturing exactly what `opts` publishes to: the
    /// subject template up to its first placeholder, then `>` (so
    /// `{prefix}.{type}` with prefix `events` captures `events.>`), with
    /// the default duplicate window. Fails for a template that starts with
    /// a placeholder: such a stream would capture every subject.
    pub fn for_template(name: impl Into<String>, opts: &NatsOptions) -> Result<StreamSetup> {
        let fixed = opts
            .template
            .replace("{prefix}", &opts.prefix)
            .split('{')
            .next()
            .unwrap_or_default()
            .to_string();
        let subject = if fixed.len() == opts.template.replace("{prefix}", &opts.prefix).len() {
            fixed
        } else if let Some(stem) = fixed.strip_suffix('.').filter(|s| !s.is_empty()) {
            format!("{stem}.>")
        } else {
            return Err(Error::InvalidArgument(format!(
                "the subject template {:?} has no fixed first token to give a stream its \
                 subjects; add a prefix ({{prefix}}.{{type}}) or create the stream yourself",
                opts.template
            )));
        };
        Ok(StreamSetup {
            name: name.into(),
            subjects: vec![subject],
            duplicate_window: Duration::from_secs(120),
        })
    }
}

/// Whether the NATS subject filter `filter` (with `*` and `>` wildcards)
/// matches `subject`.
fn filter_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
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
#[derive(Clone)]
#[must_use]
pub struct NatsOptions {
    conn: NatsConnection,
    template: String,
    prefix: String,
    stream: Option<StreamSetup>,
    window: usize,
    ack_timeout: Duration,
    mode: ContentMode,
}

/// Secrets are never printed: the password, the token, and any
/// credentials in the URL show as `<redacted>`.
impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsOptions")
            .field("conn", &self.conn)
            .field("template", &self.template)
            .field("prefix", &self.prefix)
            .field("stream", &self.stream)
            .field("window", &self.window)
            .field("ack_timeout", &self.ack_timeout)
            .field("mode", &self.mode)
            .finish()
    }
}

impl NatsOptions {
    /// Options for the server at `url` (e.g. `nats://127.0.0.1:4222`).
    pub fn new(url: impl Into<String>) -> NatsOptions {
        NatsOptions::with_connection(NatsConnection::new(url))
    }

    /// Options for the server and credentials of `conn` (the same
    /// [`NatsConnection`] an inbox reader of this server takes).
    pub fn with_connection(conn: NatsConnection) -> NatsOptions {
        NatsOptions {
            conn,
            template: "{prefix}.{type}".into(),
            prefix: "events".into(),
            stream: None,
            window: 1000,
            ack_timeout: Duration::from_secs(5),
            mode: ContentMode::Structured,
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

    /// Most publishes awaiting their ack at once, over every batch in
    /// flight, from 1 to 5000 (async-nats' own limit: a publish beyond it
    /// would wait for an ack nobody awaits). Default: 1000. Every ack is
    /// awaited, none dropped.
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.clamp(1, MAX_WINDOW);
        self
    }

    /// How long to wait for one ack before the attempt counts as failed
    /// (and is retried). Default: 5 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// How the CloudEvents attributes travel. Default:
    /// [`ContentMode::Structured`].
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }

    /// Authenticate with user and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.conn = self.conn.user_and_password(user, password);
        self
    }

    /// Authenticate with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.conn = self.conn.token(token);
        self
    }

    /// Authenticate with a credentials (`.creds`) file.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.conn = self.conn.credentials_file(path);
        self
    }

    /// Trust this root CA (PEM) and require TLS.
    pub fn root_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.conn = self.conn.root_ca(path);
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

/// The most acks async-nats lets a JetStream context await at once.
const MAX_WINDOW: usize = 5000;

/// Whether `s` is a valid NATS subject to publish on: non-empty tokens
/// separated by `.`, no whitespace, no wildcards.
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| !t.is_empty() && t != "*" && t != ">")
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Publishes to NATS JetStream (see the module documentation for the
/// messages, the order and the failures).
#[derive(Debug)]
pub struct NatsSink {
    opts: NatsOptions,
    js: jetstream::Context,
    /// Per-key order over every publish in flight.
    order: KeyOrder,
    /// Places for publishes awaiting their ack ([`NatsOptions::window`]).
    window: Arc<tokio::sync::Semaphore>,
}

/// A sample subject the template renders, to check a stream against (a
/// type with a dot, as most are).
const SAMPLE_TYPE: &str = "outboxkv.check";

impl NatsSink {
    /// Connects, and creates or checks the stream if one is configured.
    ///
    /// Fails with [`Error::Broker`] whose message starts with what is
    /// wrong: `unreachable:` (no server answered: not up, wrong address),
    /// `refused:` (credentials or TLS refused), `stream:` (the stream is
    /// missing and could not be created, or does not capture the subjects
    /// the template renders, or deduplicates over a shorter window than
    /// configured). Secrets never appear in it.
    pub async fn connect(opts: NatsOptions) -> Result<NatsSink> {
        let client = opts.conn.connect("outboxkv-relay", "nats").await?;
        let broker = |message: String| opts.conn.error("nats", &message);
        let mut js = jetstream::new(client);
        js.set_timeout(opts.ack_timeout);
        if let Some(setup) = &opts.stream {
            Self::ensure_stream(&js, &opts, setup)
                .await
                .map_err(|m| broker(format!("stream: {m}")))?;
        }
        let window = Arc::new(tokio::sync::Semaphore::new(
            opts.window.clamp(1, MAX_WINDOW),
        ));
        Ok(NatsSink {
            opts,
            js,
            order: KeyOrder::default(),
            window,
        })
    }

    /// Creates the stream, or checks the existing one against `setup`.
    async fn ensure_stream(
        js: &jetstream::Context,
        opts: &NatsOptions,
        setup: &StreamSetup,
    ) -> std::result::Result<(), String> {
        let sample = opts.render(SAMPLE_TYPE, "k");
        let config = match js.get_stream(&setup.name).await {
            Ok(mut stream) => stream
                .info()
                .await
                .map_err(|e| format!("stream {}: {e}", setup.name))?
                .config
                .clone(),
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                js.create_stream(stream::Config {
                    name: setup.name.clone(),
                    subjects: setup.subjects.clone(),
                    duplicate_window: setup.duplicate_window,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create stream {}: {e}", setup.name))?
                .cached_info()
                .config
                .clone()
            }
            Err(e) => return Err(format!("look up stream {}: {e}", setup.name)),
        };
        if !config.subjects.iter().any(|f| filter_matches(f, &sample)) {
            return Err(format!(
                "stream {} captures {:?}, but the subject template {:?} publishes to subjects \
                 such as {sample:?}: every publish would find no stream; change the template \
                 or the stream's subjects",
                setup.name, config.subjects, opts.template
            ));
        }
        if config.duplicate_window < setup.duplicate_window {
            return Err(format!(
                "stream {} deduplicates over {:?}, less than the {:?} the relay is configured \
                 for: entries re-sent after a longer outage would be stored twice; raise the \
                 stream's duplicate_window or lower the relay's",
                setup.name, config.duplicate_window, setup.duplicate_window
            ));
        }
        Ok(())
    }

    /// The JetStream context (for tests and tools).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The message of `entry`: its headers and payload.
    fn message(&self, entry: &OutboxEntry, id: &str) -> (HeaderMap, bytes::Bytes) {
        let mut h = HeaderMap::new();
        // Checked before (`unsafe_for_headers`): no reserved names, no
        // control characters.
        for (name, value) in &entry.headers {
            h.append(name.as_str(), value.as_str());
        }
        h.insert("Nats-Msg-Id", id);
        match self.opts.mode {
            ContentMode::Structured => {
                h.insert("content-type", cloudevents::STRUCTURED_JSON);
                let body = cloudevents::to_json_string(entry);
                (h, bytes::Bytes::from(body))
            }
            ContentMode::Binary => {
                for (name, value) in cloudevents::binary_attributes(entry) {
                    h.insert(
                        format!("ce-{name}").as_str(),
                        cloudevents::percent_encode(&value.to_header_value()).as_str(),
                    );
                }
                if let Some(ct) = cloudevents::content_type(entry) {
                    h.insert(
                        "ce-datacontenttype",
                        cloudevents::percent_encode(ct).as_str(),
                    );
                }
                (h, bytes::Bytes::copy_from_slice(&entry.payload))
            }
        }
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

    #[test]
    fn stream_subjects_follow_the_template() {
        let o = NatsOptions::new("x");
        assert_eq!(
            StreamSetup::for_template("S", &o).unwrap().subjects,
            ["events.>"]
        );
        let o = NatsOptions::new("x")
            .subject_template("svc.{type}")
            .prefix("p");
        assert_eq!(
            StreamSetup::for_template("S", &o).unwrap().subjects,
            ["svc.>"]
        );
        let o = NatsOptions::new("x").subject_template("fixed.subject");
        assert_eq!(
            StreamSetup::for_template("S", &o).unwrap().subjects,
            ["fixed.subject"]
        );
        let o = NatsOptions::new("x").subject_template("{type}");
        assert!(StreamSetup::for_template("S", &o).is_err());
    }

    #[test]
    fn filters() {
        assert!(filter_matches("events.>", "events.orders.paid"));
        assert!(!filter_matches("events.>", "events"));
        assert!(filter_matches("events.*", "events.x"));
        assert!(!filter_matches("events.*", "events.x.y"));
        assert!(filter_matches("a.b", "a.b"));
        assert!(!filter_matches("a.b", "a.c"));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let o = NatsOptions::new("nats://alice:s3cret-pw@127.0.0.1:4222")
            .user_and_password("bob", "hunter22")
            .token("tok-en-123");
        let dbg = format!("{o:?}");
        for secret in ["s3cret-pw", "hunter22", "tok-en-123"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(dbg.contains("127.0.0.1:4222"), "{dbg}");
        assert_eq!(
            redact_url("nats://alice:pw@host:4222/x"),
            "nats://<redacted>@host:4222/x"
        );
        assert_eq!(redact_url("nats://host:4222"), "nats://host:4222");
        let text = scrub(
            "auth failed for alice:s3cret-pw token tok-en-123",
            &o.conn.secrets(),
        );
        assert!(
            !text.contains("s3cret-pw") && !text.contains("tok-en-123"),
            "{text}"
        );
    }
}
