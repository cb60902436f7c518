//! [`NatsReader`]: feeds an [`Inbox`] from a JetStream pull consumer.
//!
//! - The durable consumer (explicit acks) is created when missing, starting
//!   at the store's position of the stream when it has one (else at the
//!   stream's start); an existing one keeps its own place, and whatever it
//!   delivers again is skipped by position.
//! - Messages are taken in batches of what has arrived (up to
//!   [`NatsReaderOptions::batch`]), applied in one commit, and acknowledged
//!   after it is durable; the acknowledgements of a batch are flushed
//!   together. While a batch's commit is fsynced, the next ones are taken
//!   in, handled and ordered ([`Inbox::submit`]), up to
//!   [`NatsReaderOptions::commits_in_flight`] commits not yet durable, and
//!   acknowledged in commit order; with commits in flight, a batch goes
//!   once it is full or they are all durable. A crash between commit and
//!   acknowledgement means a redelivery, which the inbox skips.
//! - A handler failure with attempts left is `nak`ed with
//!   [`NatsReaderOptions::retry_delay`]: JetStream redelivers it, with its
//!   delivery count as [`Message::attempt`](super::Message::attempt); on the
//!   last attempt it is dead-lettered and acknowledged.
//! - JetStream positions are stream sequences, and a filtered consumer sees
//!   only some of them: the position's watermark rises to the consumer's
//!   acknowledgement floor (read every [`NatsReaderOptions::floor_interval`]),
//!   so the positions done above it stay about the in-flight limit.
//! - A message stuck in retries holds the floor while later ones are
//!   applied. The reader keeps those as ranges: when two first deliveries
//!   arrive with consecutive consumer sequences (no delivery in between,
//!   to this reader or another), the stream sequences between them are not
//!   this consumer's, and are marked done with the second one
//!   ([`Message::with_done_from`](super::Message::with_done_from)). So the
//!   position stays one range per unfinished message, not one entry per
//!   message applied behind it. Any gap in the consumer sequences (a
//!   reconnect, a delivery lost on the way, a redelivery) ends the run:
//!   nothing is assumed across it.
//! - One reader per durable and store at a time: two readers sharing a
//!   durable split its deliveries, and each then sees gaps.
//! - The filter is pinned: the store records the subject filter a
//!   durable's positions were kept with, and [`NatsReader::connect`] fails
//!   with [`Error::InvalidArgument`](crate::Error::InvalidArgument) for
//!   another one (the ranges hold the old filter's gaps, where the new
//!   one's messages would be skipped), and with `Error::Broker` when the
//!   existing durable filters otherwise than the options ask. Another
//!   filter needs another durable name.
//!
//! The position's partition is 0; its stream is `<stream>/<durable>` (the
//! JetStream stream and durable consumer names, which cannot hold a `/`):
//! each durable has its own acknowledgement floor, so two readers of one
//! stream through different durables (different filters) keep separate
//! positions in one inbox.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};

use super::message::Message;
use super::{Inbox, InboxTx, Outcome};
use crate::broker::nats::NatsConnection;
use crate::error::Result;

const ROLE: &str = "nats inbox";

/// Options of a [`NatsReader`].
///
/// ```
/// use outboxkv::broker::nats::NatsConnection;
/// use outboxkv::inbox::nats::NatsReaderOptions;
/// let opts = NatsReaderOptions::new(NatsConnection::new("nats://127.0.0.1:4222"), "EVENTS", "billing")
///     .filter_subject("events.orders.>")
///     .batch(500);
/// assert_eq!(opts.durable_name(), "billing");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct NatsReaderOptions {
    conn: NatsConnection,
    stream: String,
    durable: String,
    filter: Option<String>,
    batch: usize,
    max_ack_pending: i64,
    ack_wait: Duration,
    retry_delay: Duration,
    floor_interval: Duration,
    commits_in_flight: usize,
    settle_wait: Duration,
    pause_before_ack: Duration,
}

impl NatsReaderOptions {
    /// Reads stream `stream` through the durable consumer `durable`.
    /// Defaults: every subject of the stream, batches of up to 256,
    /// at most 1,000 unacknowledged (`max_ack_pending`), 30 s `ack_wait`,
    /// retries after 200 ms, the floor read every 100 ms, 4 commits in
    /// flight, 10 s to settle.
    pub fn new(
        conn: NatsConnection,
        stream: impl Into<String>,
        durable: impl Into<String>,
    ) -> Self {
        NatsReaderOptions {
            conn,
            stream: stream.into(),
            durable: durable.into(),
            filter: None,
            batch: 256,
            max_ack_pending: 1000,
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_millis(200),
            floor_interval: Duration::from_millis(100),
            commits_in_flight: 4,
            settle_wait: Duration::from_secs(10),
            pause_before_ack: Duration::ZERO,
        }
    }

    /// Only subjects matching `filter` (applied when the consumer is
    /// created).
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// Most messages applied in one commit (at least 1). Default: 256.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Most messages delivered and not yet acknowledged (at least 1; set
    /// when the consumer is created). Default: 1,000.
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = n.max(1);
        self
    }

    /// How long JetStream waits for an acknowledgement before delivering
    /// again (set when the consumer is created). Default: 30 s.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// The delay of a `nak` after a handler failure. Default: 200 ms.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// How often the consumer's acknowledgement floor (and lag) is read.
    /// Default: 100 ms.
    pub fn floor_interval(mut self, every: Duration) -> Self {
        self.floor_interval = every;
        self
    }

    /// Most batches committed and not yet durable (at least 1): while
    /// they are fsynced, the reader takes in, handles and orders the next
    /// ([`Inbox::submit`]); the store fsyncs the commits ordered meanwhile
    /// together (each batch is still a commit of its own). With 1, a
    /// batch is handled only once the commit before it is durable (it is
    /// taken in meanwhile). Above 1, a handler reads the writes of commits
    /// not yet durable (see [`NatsReader::run`]). Default: 4.
    pub fn commits_in_flight(mut self, n: usize) -> Self {
        self.commits_in_flight = n.max(1);
        self
    }

    /// How long the reader waits for the broker to take a batch's
    /// acknowledgements (the client waits for a connection that is down:
    /// then the reader fails with `Error::Broker`), and, stopping or
    /// failing, for the batches in flight to be durable and acknowledged
    /// (then [`NatsReader::run`] returns `Error::Timeout`; what was not
    /// acknowledged is delivered again and skipped). Default: 10 s.
    pub fn settle_wait(mut self, wait: Duration) -> Self {
        self.settle_wait = wait;
        self
    }

    /// Waits this long between each commit and its acknowledgements (for
    /// crash tests: a kill then lands in that gap). Default: zero.
    #[doc(hidden)]
    pub fn pause_before_ack(mut self, pause: Duration) -> Self {
        self.pause_before_ack = pause;
        self
    }

    /// The durable consumer's name.
    pub fn durable_name(&self) -> &str {
        &self.durable
    }
}

/// Feeds an [`Inbox`] from a JetStream durable pull consumer (see the
/// [module documentation](self)).
///
/// ```no_run
/// use outboxkv::broker::nats::NatsConnection;
/// use outboxkv::inbox::{Inbox, nats::{NatsReader, NatsReaderOptions}};
/// # async fn run(store: outboxkv::Store) -> outboxkv::Result<()> {
/// let inbox = Inbox::new(&store, "billing")?;
/// let opts = NatsReaderOptions::new(NatsConnection::new("nats://127.0.0.1:4222"), "EVENTS", "billing");
/// let mut reader = NatsReader::connect(inbox, opts).await?;
/// reader
///     .run(|tx| { tx.emit(outboxkv::Event::bytes("seen", "k", vec![]))?; Ok(()) }, std::future::pending())
///     .await
/// # }
/// ```
pub struct NatsReader {
    inbox: Inbox,
    opts: NatsReaderOptions,
    client: async_nats::Client,
    consumer: consumer::PullConsumer,
    /// The acknowledgement floor + 1, as last read.
    floor: u64,
    floor_read: Option<Instant>,
    deliveries: DeliveryRun,
}

/// What the deliveries received so far tell about the stream sequences
/// between them (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeliveryRun {
    /// The consumer sequence of the last delivery received (or, at
    /// connect, the consumer's last delivered).
    last_delivery: u64,
    /// The stream sequence of the last first delivery, while the consumer
    /// sequences received since have had no gap.
    last_first: Option<u64>,
}

impl DeliveryRun {
    /// Starts from the consumer's info: its last delivery's consumer and
    /// stream sequences.
    pub(crate) fn start(consumer_sequence: u64, stream_sequence: u64) -> DeliveryRun {
        DeliveryRun {
            last_delivery: consumer_sequence,
            last_first: Some(stream_sequence),
        }
    }

    /// Takes in a delivery (`delivered`: its delivery count); returns the
    /// lowest stream sequence such that every one from it up to this
    /// message's is known to be this message or none of this consumer's.
    pub(crate) fn next(
        &mut self,
        consumer_sequence: u64,
        stream_sequence: u64,
        delivered: i64,
    ) -> u64 {
        if consumer_sequence != self.last_delivery.wrapping_add(1) {
            self.last_first = None;
        }
        self.last_delivery = consumer_sequence;
        let mut done_from = stream_sequence;
        if delivered == 1 {
            if let Some(previous) = self.last_first
                && previous < stream_sequence
            {
                done_from = previous + 1;
            }
            self.last_first = Some(stream_sequence);
        }
        done_from
    }
}

impl std::fmt::Debug for NatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsReader")
            .field("opts", &self.opts)
            .field("floor", &self.floor)
            .finish_non_exhaustive()
    }
}

impl NatsReader {
    /// Connects and finds (or creates) the durable consumer. Fails with
    /// [`Error::Broker`](crate::Error::Broker) (`refused:`, `unreachable:`, `stream:`,
    /// `consumer:`), secrets scrubbed.
    pub async fn connect(inbox: Inbox, opts: NatsReaderOptions) -> Result<NatsReader> {
        let client = opts.conn.connect("outboxkv-inbox", ROLE).await?;
        let js = jetstream::new(client.clone());
        let err = |m: String| opts.conn.error(ROLE, &m);
        let stream = js
            .get_stream(&opts.stream)
            .await
            .map_err(|e| err(format!("stream: {} : {e}", opts.stream)))?;
        let label = position_stream(&opts.stream, &opts.durable);
        let filter = opts.filter.clone().unwrap_or_default();
        inbox.pin_filter(&label, &filter).await?;
        let start = inbox.position(&label, 0)?;
        let deliver_policy = match &start {
            Some(p) if p.next > 0 => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: p.next,
            },
            _ => consumer::DeliverPolicy::All,
        };
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &opts.durable,
                consumer::pull::Config {
                    durable_name: Some(opts.durable.clone()),
                    filter_subject: opts.filter.clone().unwrap_or_default(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: opts.ack_wait,
                    max_ack_pending: opts.max_ack_pending,
                    deliver_policy,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                err(format!(
                    "consumer: {} on {}: {e}",
                    opts.durable, opts.stream
                ))
            })?;
        let config = &consumer.cached_info().config;
        let theirs = config.filter_subject.clone();
        if theirs != filter {
            return Err(err(format!(
                "consumer: {} on {} filters {theirs:?}, this reader asks {filter:?}; \
                 use a new durable name for another filter",
                opts.durable, opts.stream
            )));
        }
        let mut reader = NatsReader {
            inbox,
            opts,
            client,
            consumer,
            floor: 0,
            floor_read: None,
            deliveries: DeliveryRun::default(),
        };
        let info = reader.read_floor().await?;
        reader.deliveries = DeliveryRun::start(
            info.delivered.consumer_sequence,
            info.delivered.stream_sequence,
        );
        Ok(reader)
    }

    /// The inbox fed.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    async fn read_floor(&mut self) -> Result<consumer::Info> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|e| self.opts.conn.error(ROLE, &format!("consumer info: {e}")))?;
        self.floor = self
            .floor
            .max(info.ack_floor.stream_sequence.saturating_add(1));
        self.floor_read = Some(Instant::now());
        self.inbox
            .metrics()
            .lag
            .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
        Ok(info)
    }

    /// Applies messages with `handler` until `shutdown` completes or the
    /// store or the broker fails.
    ///
    /// On `shutdown`, the messages taken in are applied, and every batch
    /// committed is acknowledged once durable; then `run` returns `Ok`.
    /// On a failure, the batches already committed are still acknowledged
    /// as they become durable (a store failure fails them, and nothing of
    /// them is acknowledged), and `run` returns the failure. Either way it
    /// waits at most [`NatsReaderOptions::settle_wait`] for that (a slow disk, a broker away:
    /// then [`Error::Timeout`](crate::Error::Timeout)): what is not
    /// acknowledged is delivered again and skipped by position, so nothing
    /// is lost or applied twice. While it runs, acknowledgements the
    /// broker does not take within [`NatsReaderOptions::settle_wait`] fail the reader with
    /// `Error::Broker`.
    ///
    /// With [`NatsReaderOptions::commits_in_flight`] above 1, `handler`
    /// runs while earlier batches are fsynced, and sees their writes:
    /// store writes that a crash before that fsync takes back, together
    /// with the later batch's own commit. An effect outside the store
    /// (a call to another service) made on such a read is not taken back;
    /// set 1 if a handler makes one.
    pub async fn run<F, S>(&mut self, mut handler: F, shutdown: S) -> Result<()>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
        S: std::future::Future<Output = ()>,
    {
        let mine = position_stream(&self.opts.stream, &self.opts.durable);
        self.inbox
            .replay_queued_of(|stream| stream == mine, &mut handler)
            .await?;
        let mut messages = self
            .consumer
            .stream()
            .max_messages_per_batch(self.opts.batch.max(64))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| self.opts.conn.error(ROLE, &format!("pull: {e}")))?;
        // Batches whose commits are on their way to disk, oldest first:
        // each is polled, so it is stamped durable when its fsync is done,
        // and they come out in the order they were committed.
        let mut in_flight = InFlight::new();
        let pumped = self
            .pump(&mut messages, &mut in_flight, &mut handler, shutdown)
            .await;
        let settled = self.settle(in_flight).await;
        match (pumped, settled) {
            (Err(e), Err(also)) => {
                tracing::warn!(error = %also, "nats inbox: settling after a failure failed too");
                Err(e)
            }
            (pumped, settled) => pumped.and(settled),
        }
    }

    /// The reader's loop: takes messages in, submits batches, acknowledges
    /// what is durable. Returns `Ok` on `shutdown`, once the messages taken
    /// in are submitted.
    async fn pump<F, S>(
        &mut self,
        messages: &mut consumer::pull::Stream,
        in_flight: &mut InFlight,
        handler: &mut F,
        shutdown: S,
    ) -> Result<()>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
        S: std::future::Future<Output = ()>,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut batch: Vec<jetstream::Message> = Vec::new();
        loop {
            // Looked at on every turn: under a steady flow the loop may
            // not come to the `select!` below for a long time.
            if (&mut shutdown).now_or_never().is_some() {
                self.make_room(in_flight).await?;
                return self.submit(batch, handler, in_flight).await;
            }
            // What is durable already is acknowledged now, not when the
            // loop next waits (under a steady flow of full batches, that
            // may be several submits later).
            while let Some(Some(done)) = in_flight.next().now_or_never() {
                self.acknowledge(done).await?;
            }
            while batch.len() < self.opts.batch {
                match messages.next().now_or_never() {
                    Some(m) => batch.push(self.take(m)?),
                    None => break,
                }
            }
            // A full batch goes at once; one that is not waits for more
            // while commits are in flight (their fsync is the wait), and
            // goes when none is.
            if batch.len() >= self.opts.batch || (!batch.is_empty() && in_flight.is_empty()) {
                self.make_room(in_flight).await?;
                let full = std::mem::take(&mut batch);
                self.submit(full, handler, in_flight).await?;
                continue;
            }
            let next = tokio::select! {
                biased;
                () = &mut shutdown => Next::Stop,
                Some(done) = in_flight.next(), if !in_flight.is_empty() => Next::Durable(done),
                next = messages.next() => Next::Message(next),
            };
            match next {
                Next::Stop => {
                    self.make_room(in_flight).await?;
                    return self.submit(batch, handler, in_flight).await;
                }
                Next::Durable(done) => self.acknowledge(done).await?,
                Next::Message(m) => batch.push(self.take(m)?),
            }
        }
    }

    /// Waits until fewer than `commits_in_flight` batches are not yet
    /// durable, acknowledging those that are.
    async fn make_room(&self, in_flight: &mut InFlight) -> Result<()> {
        while in_flight.len() >= self.opts.commits_in_flight {
            if let Some(done) = in_flight.next().await {
                self.acknowledge(done).await?;
            }
        }
        Ok(())
    }

    /// Acknowledges the batches in flight as they become durable, for at
    /// most [`NatsReaderOptions::settle_wait`] (then [`Error::Timeout`](crate::Error::Timeout),
    /// saying whether it waited for the disk or the broker); the first
    /// failure is returned, after trying the rest.
    async fn settle(&self, mut in_flight: InFlight) -> Result<()> {
        if in_flight.is_empty() {
            return Ok(());
        }
        let left = in_flight.len();
        // An atomic, not a `Cell`: `run`'s future stays `Send`.
        let acking = std::sync::atomic::AtomicBool::new(false);
        let all = async {
            let mut first = None;
            while let Some(done) = in_flight.next().await {
                acking.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = self.acknowledge(done).await {
                    first.get_or_insert(e);
                }
                acking.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            first.map_or(Ok(()), Err)
        };
        match tokio::time::timeout(self.opts.settle_wait, all).await {
            Ok(acked) => acked,
            Err(_) => Err(crate::Error::Timeout(format!(
                "{ROLE}: of {left} batches committed, some were not {} within {:?} \
                 (they are delivered again and skipped by position)",
                if acking.load(std::sync::atomic::Ordering::Relaxed) {
                    "acknowledged (the broker did not take the acknowledgements)"
                } else {
                    "durable yet (the store's fsync is slow)"
                },
                self.opts.settle_wait
            ))),
        }
    }

    /// A message of the pull stream, or the reader's error.
    fn take(
        &self,
        m: Option<
            std::result::Result<jetstream::Message, jetstream::consumer::pull::MessagesError>,
        >,
    ) -> Result<jetstream::Message> {
        match m {
            None => Err(self.opts.conn.error(ROLE, "pull: the message stream ended")),
            Some(Err(e)) => Err(self.opts.conn.error(ROLE, &format!("pull: {e}"))),
            Some(Ok(m)) => Ok(m),
        }
    }

    /// Handles `batch` and orders its commit ([`Inbox::submit`]), queued
    /// behind the commits in flight. Nothing for an empty batch.
    async fn submit<F>(
        &mut self,
        batch: Vec<jetstream::Message>,
        handler: &mut F,
        in_flight: &mut InFlight,
    ) -> Result<()>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        if batch.is_empty() {
            return Ok(());
        }
        if self
            .floor_read
            .is_none_or(|t| t.elapsed() >= self.opts.floor_interval)
        {
            self.read_floor().await?;
        }
        let mut converted = Vec::with_capacity(batch.len());
        for m in &batch {
            converted.push(self.message_of(m)?);
        }
        let applying = self.inbox.submit(&converted, &mut *handler).await?;
        in_flight.push_back(Box::pin(async move {
            let outcomes = applying.durable().await;
            Done {
                batch,
                outcomes,
                durable_at: Instant::now(),
            }
        }));
        Ok(())
    }

    /// Acknowledges (or `nak`s) each message of a batch whose commit is
    /// durable; a batch whose commit failed is not acknowledged, and its
    /// failure returned.
    async fn acknowledge(&self, done: Done) -> Result<()> {
        let Done {
            batch,
            outcomes,
            durable_at,
        } = done;
        let outcomes = outcomes?;
        if !self.opts.pause_before_ack.is_zero() {
            tokio::time::sleep(self.opts.pause_before_ack).await;
        }
        let sent = async {
            for (m, outcome) in batch.iter().zip(&outcomes) {
                let sent = match outcome {
                    o if o.settled() => m.ack().await,
                    Outcome::Retry { .. } => {
                        m.ack_with(AckKind::Nak(Some(self.opts.retry_delay))).await
                    }
                    _ => {
                        m.ack_with(AckKind::Nak(Some(self.opts.retry_delay / 4)))
                            .await
                    }
                };
                sent.map_err(|e| self.opts.conn.error(ROLE, &format!("ack: {e}")))?;
            }
            self.client
                .flush()
                .await
                .map_err(|e| self.opts.conn.error(ROLE, &format!("flush acks: {e}")))
        };
        // The client waits for a connection that is down: bounded, so a
        // broker away fails the reader (and lets a shutdown through)
        // rather than hang it.
        tokio::time::timeout(self.opts.settle_wait, sent)
            .await
            .map_err(|_| {
                self.opts.conn.error(
                    ROLE,
                    &format!(
                        "acknowledgements not flushed within {:?}",
                        self.opts.settle_wait
                    ),
                )
            })??;
        let took = durable_at.elapsed();
        for _ in 0..outcomes.iter().filter(|o| o.settled()).count() {
            self.inbox.metrics().observe_commit_to_ack(took);
        }
        Ok(())
    }

    fn message_of(&mut self, m: &jetstream::Message) -> Result<Message> {
        let info = m.info().map_err(|e| {
            self.opts
                .conn
                .error(ROLE, &format!("message without JetStream metadata: {e}"))
        })?;
        let done_from =
            self.deliveries
                .next(info.consumer_sequence, info.stream_sequence, info.delivered);
        let mut headers = Vec::new();
        if let Some(h) = &m.message.headers {
            for (name, values) in h.iter() {
                for v in values {
                    headers.push((name.to_string(), v.as_str().as_bytes().to_vec()));
                }
            }
            headers.sort();
        }
        let mut msg = Message::new(
            position_stream(&self.opts.stream, &self.opts.durable),
            0,
            info.stream_sequence,
            m.message.payload.to_vec(),
        )
        .with_subject(m.message.subject.as_str())
        .with_attempt(u32::try_from(info.delivered).unwrap_or(u32::MAX))
        .with_done_below(self.floor)
        .with_done_from(done_from);
        msg.headers = headers;
        msg.decode();
        Ok(msg)
    }
}

/// A batch whose commit is durable (or failed), with when that was
/// learnt.
struct Done {
    batch: Vec<jetstream::Message>,
    outcomes: Result<Vec<Outcome>>,
    durable_at: Instant,
}

/// The batches whose commits are on their way to disk, in commit order.
type InFlight = FuturesOrdered<std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>>;

/// What the reader's loop woke up for. A value on the loop's stack for
/// one turn: boxing the message would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Next {
    Stop,
    Durable(Done),
    Message(
        Option<std::result::Result<jetstream::Message, jetstream::consumer::pull::MessagesError>>,
    ),
}

/// The stream a JetStream durable's positions are kept under.
pub(crate) fn position_stream(stream: &str, durable: &str) -> String {
    format!("{stream}/{durable}")
}

#[cfg(test)]
mod tests {
    use super::DeliveryRun;

    #[test]
    fn first_deliveries_without_a_gap_cover_the_sequences_between() {
        // Connected after delivery 10 (stream 40); 41..49 are others'.
        let mut run = DeliveryRun::start(10, 40);
        assert_eq!(run.next(11, 50, 1), 41);
        assert_eq!(run.next(12, 53, 1), 51);
        // A redelivery between first deliveries: still no gap in the
        // consumer sequences, and it is below the last first delivery.
        assert_eq!(run.next(13, 20, 2), 20);
        assert_eq!(run.next(14, 60, 1), 54);
    }

    #[test]
    fn a_gap_in_consumer_sequences_assumes_nothing() {
        let mut run = DeliveryRun::start(10, 40);
        assert_eq!(run.next(11, 50, 1), 41);
        // Delivery 12 never arrived (lost on a reconnect, or another
        // reader's): 51..59 may hold it.
        assert_eq!(run.next(13, 60, 1), 60);
        // The run starts again from 60.
        assert_eq!(run.next(14, 62, 1), 61);
        // A fresh reader knows nothing before its first delivery.
        let mut fresh = DeliveryRun::default();
        assert_eq!(fresh.next(5, 30, 1), 30);
    }
}
