//! The relay: ships committed outbox entries to a [`Sink`], at least once,
//! in seq order, and prunes them once the sink acknowledged them.
//!
//! # Delivery
//!
//! - **At least once, always.** An entry leaves the outbox only after its
//!   sink acknowledged it (or it was dead-lettered), in one atomic write that
//!   also records the new tail, the relay's durable cursor. A crash between
//!   the acknowledgement and that write re-sends the entry after restart.
//! - **Effectively once where the broker deduplicates**: every attempt of an
//!   entry carries the same event id (`<store id>-<seq>`), which sinks pass
//!   as the broker's deduplication key (JetStream `Nats-Msg-Id`).
//! - **Order, per key**: entries are published in seq order and settled in
//!   seq order: the relay never settles past an entry that is still
//!   failing, and after a failure it publishes again from that entry,
//!   skipping the entries acknowledged beyond it. A sink that takes several
//!   publishes at once ([`Sink::max_concurrent_publishes`]: NATS, Kafka)
//!   gets the next full batch while earlier ones await their
//!   acknowledgements, within [`RelayBuilder::in_flight_entries`] and
//!   [`RelayBuilder::in_flight_bytes`]; the outcomes are taken in in seq
//!   order, and after a failure the relay lets what is in flight finish
//!   before it publishes again from the failed entry. The sinks keep a key's
//!   entries from overtaking each other when a publish fails (see their
//!   module docs), so every key's events reach the broker in seq order.
//!   Events of different keys may not, after a failure.
//! - **Failures**: `Outcome::Retry` (a broker-wide condition: unreachable,
//!   timeouts, a full stream, refused authorization) backs off
//!   exponentially with jitter and is retried for as long as it takes, and
//!   never dead-letters. `Outcome::Rejected` (something wrong with the entry)
//!   counts toward `max_attempts` in the rounds where that entry blocks the
//!   others (not while it waits behind one) and moves the entry to the
//!   dead-letter table when permanent or after `max_attempts`, atomically
//!   with moving past it, unless more than `dead_letter_storm_limit`
//!   entries in a row were dead-lettered: then the relay holds and backs
//!   off. `Outcome::Fatal` stops the relay with the sink's error.
//! - **Wake-ups**: the relay sleeps on the outbox's commit notification; an
//!   idle relay uses no CPU and a commit reaches the sink without polling.

mod backoff;
mod metrics;
mod sidecar;
mod sink;

pub use backoff::Backoff;
pub use metrics::{RelayMetricFamilies, RelayMetrics, register_store_metrics};
pub use sidecar::{CatchUpHealth, SidecarSource, read_sidecar_cursor, sidecar_cursor_path};
pub use sink::{BoxFuture, Outcome, Sink};

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::outbox::entry::now_micros;
use crate::store::engine::file::RELAY_DIR;
use crate::store::engine::lock::{is_locked, lock};
use crate::{DeadLetter, Outbox, OutboxEntry, Store};
use backoff::Jitter;

/// Whether a relay of any kind (in-process, sidecar, or `outbox-relay run
/// --drain`) holds the relay lock of the store at `store` now. Creates
/// nothing; `Ok(false)` for a store no relay ever ran on.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// let store = outboxkv::Store::open(dir.path())?;
/// assert!(!outboxkv::relay::relay_running(dir.path())?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn relay_running(store: impl AsRef<std::path::Path>) -> Result<bool> {
    is_locked(&store.as_ref().join(RELAY_DIR))
}

/// Takes `<store>/relay/LOCK`: one relay per store, whichever kind.
/// [`Error::RelayLocked`] when another relay holds it.
pub(crate) fn take_relay_lock(store: &std::path::Path) -> Result<std::fs::File> {
    let dir = store.join(RELAY_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    lock(&dir).map_err(|e| match e {
        Error::Locked { lock, .. } => Error::RelayLocked {
            path: store.to_path_buf(),
            lock,
        },
        other => other,
    })
}

/// Where a relay reads committed outbox entries and records what it settled.
///
/// [`Outbox`] is the source of a relay inside the service;
/// [`SidecarSource`] the source of a relay in
/// another process. The contract:
///
/// - `tail()..=head()` are the committed entries not settled yet; `read`
///   returns them from `from` in seq order, contiguous, committed only,
///   and on disk when it returns (so a power loss cannot take back the
///   state of an event the relay then ships).
/// - `settle(through, dead)` records that every seq up to `through` is
///   delivered, except `dead`, which were dead-lettered; afterwards
///   `tail()` is above `through`. The record may reach its storage after
///   `settle` returns (a sidecar's cursor file); `flush` waits for it, and
///   what is stored never runs ahead of what was settled.
/// - `changed(head)` resolves once `head()` may have moved past `head` (a
///   spurious wake-up is allowed; the relay looks again).
///
/// A relay calls [`begin`](OutboxSource::begin) once before its first
/// `tail()` and keeps what it returns until it stops; its
/// [`dead_in_a_row`](OutboxSource::dead_in_a_row) seeds the dead-letter
/// storm guard, so a restart does not reset it.
pub trait OutboxSource: Send + Sync + 'static {
    /// Makes this relay the only one shipping the source and brings the
    /// source up to date, before the relay reads its tail; what it returns
    /// is held until the relay stops. [`Outbox`] takes the store's relay
    /// lock (`<store>/relay/LOCK`, [`Error::RelayLocked`] when a sidecar,
    /// `run --drain` or another in-process relay holds it) and then
    /// applies a sidecar's cursor, so nothing a sidecar delivered is sent
    /// again. Default: nothing to do.
    fn begin(&self) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        Ok(None)
    }
    /// How many entries just below the tail were dead-lettered in a row
    /// (counting down from `tail() - 1`, at most `limit`; reads up to
    /// `limit` dead letters). An error is logged and counts as 0.
    /// Default: 0.
    fn dead_in_a_row(&self, limit: u32) -> Result<u32> {
        let _ = limit;
        Ok(0)
    }
    /// First seq not settled yet.
    fn tail(&self) -> Result<u64>;
    /// Last committed seq.
    fn head(&self) -> Result<u64>;
    /// Up to `max_entries` entries (about `max_bytes`) from `from` on.
    fn read(&self, from: u64, max_entries: usize, max_bytes: usize) -> Result<Vec<OutboxEntry>>;
    /// Records that everything through `through` is settled. A source may
    /// record it later than it returns (a sidecar writes its cursor file
    /// on a thread of its own): then an error of that recording comes with
    /// a later `settle` or with [`flush`](Self::flush).
    fn settle(&self, through: u64, dead: &[DeadLetter]) -> Result<()>;
    /// Waits until every `settle` so far is recorded; called once when the
    /// relay stops (however it stops). Default: nothing to wait for.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Resolves when the head may have moved beyond `head`.
    fn changed(&self, head: u64) -> BoxFuture<'static, ()>;
}

/// A shared source: the caller can keep a handle (to read its tail after
/// the relay stopped, say).
impl<T: OutboxSource + ?Sized> OutboxSource for Arc<T> {
    fn begin(&self) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        (**self).begin()
    }
    fn dead_in_a_row(&self, limit: u32) -> Result<u32> {
        (**self).dead_in_a_row(limit)
    }
    fn tail(&self) -> Result<u64> {
        (**self).tail()
    }
    fn head(&self) -> Result<u64> {
        (**self).head()
    }
    fn read(&self, from: u64, max_entries: usize, max_bytes: usize) -> Result<Vec<OutboxEntry>> {
        (**self).read(from, max_entries, max_bytes)
    }
    fn settle(&self, through: u64, dead: &[DeadLetter]) -> Result<()> {
        (**self).settle(through, dead)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn changed(&self, head: u64) -> BoxFuture<'static, ()> {
        (**self).changed(head)
    }
}

impl OutboxSource for Outbox {
    fn begin(&self) -> Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        let lock = take_relay_lock(self.store().path())?;
        self.apply_relay_cursor()?;
        Ok(Some(Box::new(lock)))
    }
    fn dead_in_a_row(&self, limit: u32) -> Result<u32> {
        let tail = Outbox::tail(self);
        let from = tail.saturating_sub(u64::from(limit)).max(1);
        let dead = self.dead_letters().list(from, limit as usize)?;
        Ok(count_dead_below(
            tail,
            dead.iter().map(|d| d.entry.seq),
            limit,
        ))
    }
    fn tail(&self) -> Result<u64> {
        Ok(Outbox::tail(self))
    }
    fn head(&self) -> Result<u64> {
        Ok(Outbox::head(self))
    }
    /// Reads like [`Outbox::read_limited`], then makes the entries read
    /// durable ([`Outbox::make_durable`]): a `Buffered` commit costs the
    /// relay one fsync per batch, and no event is shipped ahead of its state.
    fn read(&self, from: u64, max_entries: usize, max_bytes: usize) -> Result<Vec<OutboxEntry>> {
        let batch = self.read_limited(from, max_entries, max_bytes)?;
        if let Some(last) = batch.last() {
            self.make_durable(last.seq)?;
            // INV-SHIP: nothing is handed to a sink above the durable head.
            crate::invariant::invariant!(
                self.durable_head() >= last.seq,
                "INV-SHIP: seq {} read for shipping above the durable head {}",
                last.seq,
                self.durable_head()
            );
        }
        Ok(batch)
    }
    fn settle(&self, through: u64, dead: &[DeadLetter]) -> Result<()> {
        self.complete_through(through, dead).map(|_| ())
    }
    fn changed(&self, head: u64) -> BoxFuture<'static, ()> {
        let changed = Outbox::changed(self, head);
        Box::pin(async move {
            changed.await;
        })
    }
}

/// The least of the default in-flight entry limit (small batches still keep
/// the broker busy).
const DEFAULT_IN_FLIGHT_ENTRIES: usize = 5000;

/// How often a publish that keeps waiting is reported.
const PUBLISH_WAIT_REPORT: Duration = Duration::from_secs(10);

/// How many of the seqs just below `tail` (`tail - 1`, `tail - 2`, ...)
/// are in `dead`, without a gap, at most `limit`.
pub(crate) fn count_dead_below(tail: u64, dead: impl Iterator<Item = u64>, limit: u32) -> u32 {
    let dead: std::collections::BTreeSet<u64> = dead.collect();
    let mut n = 0u32;
    let mut seq = tail;
    while n < limit && seq > 1 && dead.contains(&(seq - 1)) {
        n += 1;
        seq -= 1;
    }
    n
}

/// How to stop a relay; see [`Relay::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shutdown {
    /// Keep shipping until the outbox is empty or the timeout passes, then stop.
    Drain(Duration),
    /// Stop at once; entries being published stay in the outbox and are sent
    /// again by the next relay (at least once).
    Now,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Drain(Instant),
    Now,
}

/// Builder for a [`Relay`]; get one from [`Relay::builder`].
#[must_use]
pub struct RelayBuilder {
    source: Arc<dyn OutboxSource>,
    sink: Option<Arc<dyn Sink>>,
    batch_size: usize,
    batch_bytes: usize,
    in_flight_entries: Option<usize>,
    in_flight_bytes: Option<usize>,
    linger: Duration,
    max_attempts: u32,
    storm_limit: u32,
    backoff: Backoff,
    metrics: RelayMetrics,
}

impl std::fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("sink", &self.sink.as_ref().map(|s| s.name().to_string()))
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl RelayBuilder {
    /// The sink to publish to (required).
    pub fn sink(mut self, sink: impl Sink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// The sink to publish to, already shared.
    pub fn sink_arc(mut self, sink: Arc<dyn Sink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Most entries per published batch. Default: 500.
    pub fn batch_size(mut self, entries: usize) -> Self {
        self.batch_size = entries.max(1);
        self
    }

    /// Most bytes per batch (at least one entry is always sent). Default: 4 MiB.
    pub fn batch_bytes(mut self, bytes: usize) -> Self {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// Most entries published and not yet settled, over every batch in
    /// flight. A sink that takes several publishes at once
    /// ([`Sink::max_concurrent_publishes`]: the NATS and Kafka sinks) gets
    /// the next full batch while earlier ones await their acknowledgements,
    /// as long as this and
    /// [`in_flight_bytes`](RelayBuilder::in_flight_bytes) allow; one batch
    /// is always allowed, and a batch that is not full goes out once nothing
    /// is in flight. The others get one batch at a time whatever this says. Default: four batches (4 x
    /// [`batch_size`](RelayBuilder::batch_size)), at least 5,000.
    pub fn in_flight_entries(mut self, entries: usize) -> Self {
        self.in_flight_entries = Some(entries.max(1));
        self
    }

    /// Most bytes (entry size as stored, about) published and not yet
    /// settled, over every batch in flight; see
    /// [`in_flight_entries`](RelayBuilder::in_flight_entries). Default: four
    /// batches (4 x [`batch_bytes`](RelayBuilder::batch_bytes)).
    pub fn in_flight_bytes(mut self, bytes: usize) -> Self {
        self.in_flight_bytes = Some(bytes.max(1));
        self
    }

    /// How long to wait for a batch to fill once entries are waiting. Adds up
    /// to this much latency in exchange for larger batches; a batch that has
    /// [`batch_size`](RelayBuilder::batch_size) entries, or reaches it while
    /// the relay waits, is sent at once (one full by
    /// [`batch_bytes`](RelayBuilder::batch_bytes) only waits out the linger).
    /// Only a relay with nothing in flight lingers: while batches await
    /// their acknowledgements, what is committed meanwhile goes out as soon
    /// as the in-flight limits allow. Default: zero.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Rejections of one entry before it is dead-lettered (permanent
    /// rejections dead-letter at once). Only rejections of the entry itself
    /// count: `Retry` outcomes (a broker-wide condition: unreachable, a full
    /// stream, refused authorization) never do, nor do rounds in which the
    /// entry waited behind an earlier failing one. Default: 5.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Most entries dead-lettered in a row (with no acknowledged entry
    /// between them) before the relay suspects the broker rather than the
    /// entries: it then stops dead-lettering, logs an error, sets the
    /// `dead_letter_storm` gauge and backs off, retrying the entry it
    /// stopped at until one is acknowledged (or an operator intervenes: fix
    /// the broker, or raise this limit). Default: 20.
    pub fn dead_letter_storm_limit(mut self, entries: u32) -> Self {
        self.storm_limit = entries.max(1);
        self
    }

    /// Backoff between failed rounds. Default: [`Backoff::default`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Metrics to update (share them with your registry first). Default: fresh ones.
    pub fn metrics(mut self, metrics: RelayMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Starts the relay: on the current Tokio runtime when called inside one,
    /// otherwise on a thread of its own with a single-threaded runtime.
    pub fn start(self) -> Result<Relay> {
        let sink = self
            .sink
            .ok_or_else(|| Error::InvalidArgument("a relay needs a sink: call .sink(..)".into()))?;
        let lock = self.source.begin()?;
        let dead_in_a_row = self
            .source
            .dead_in_a_row(self.storm_limit)
            .unwrap_or_else(|e| {
                // Not a reason to stay down: the guard starts from zero.
                tracing::warn!(error = %e, "could not count the dead letters below the tail; the dead-letter storm guard starts from 0");
                0
            });
        let (stop_tx, stop_rx) = watch::channel(Mode::Running);
        let tail = self.source.tail()?;
        let (delivered_tx, delivered_rx) = watch::channel(tail.saturating_sub(1));
        let (done_tx, done_rx) = oneshot::channel();
        let worker = Worker {
            source: self.source,
            sink,
            batch_size: self.batch_size,
            batch_bytes: self.batch_bytes,
            in_flight_entries: self.in_flight_entries.unwrap_or(
                self.batch_size
                    .saturating_mul(4)
                    .max(DEFAULT_IN_FLIGHT_ENTRIES),
            ),
            in_flight_bytes: self
                .in_flight_bytes
                .unwrap_or(self.batch_bytes.saturating_mul(4)),
            linger: self.linger,
            max_attempts: self.max_attempts,
            storm_limit: self.storm_limit,
            backoff: self.backoff,
            metrics: self.metrics.clone(),
            delivered: delivered_tx,
            dead_in_a_row,
            _lock: lock,
        };
        let task = async move {
            let metrics = worker.metrics.clone();
            let result = worker.run(stop_rx).await;
            // What the worker settled is recorded (a sidecar writes its
            // cursor off the loop) before the relay says it stopped:
            // `stopped`, `wait_delivered` and `shutdown` answer once the
            // worker, and with it `delivered`, is dropped. Both off the
            // runtime's workers: the flush waits for a file write, and
            // dropping the source may close the store.
            let flushed = off_runtime(move || {
                let flushed = worker.source.flush();
                // Fields drop in order: the source (and the sidecar's
                // relay lock, unless the caller kept a handle), then
                // `delivered`.
                drop(worker);
                flushed
            })
            .await;
            let result = match (result, flushed) {
                (result, Ok(())) => result,
                (Ok(()), Err(e)) => Err(e),
                (Err(e), Err(flush)) => {
                    tracing::warn!(error = %flush, "outboxkv relay could not record its last settle");
                    Err(e)
                }
            };
            // However the worker ended, nothing is being published now.
            metrics.publish_ended();
            if let Err(e) = &result {
                tracing::error!(error = %e, "outboxkv relay stopped on an error");
            }
            let _ = done_tx.send(result);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(task);
            }
            Err(_) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("start relay runtime", "", e))?;
                std::thread::Builder::new()
                    .name("outboxkv-relay".into())
                    .spawn(move || runtime.block_on(task))
                    .map_err(|e| Error::io("start relay thread", "", e))?;
            }
        }
        Ok(Relay {
            stop: stop_tx,
            delivered: delivered_rx,
            done: done_rx,
            metrics: self.metrics,
        })
    }
}

/// A running relay. Dropping it stops the relay at once (like
/// [`Shutdown::Now`]); use [`shutdown`](Relay::shutdown) to drain.
///
/// ```
/// use outboxkv::{Event, Store};
/// use outboxkv::relay::{Relay, Shutdown};
/// use outboxkv::sink::FileSink;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("store"))?;
/// let relay = Relay::builder(&store)
///     .sink(FileSink::open(dir.path().join("events.jsonl"))?)
///     .start()?;
/// let c = store.write(|tx| tx.emit(outboxkv::Event::bytes("pings", "k", b"1".to_vec())))?;
/// relay.wait_delivered(c.seqs.end - 1, Duration::from_secs(5)).await?;
/// assert_eq!(store.outbox().depth(), 0); // delivered and pruned
/// relay.shutdown(Shutdown::Drain(Duration::from_secs(5))).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Relay {
    stop: watch::Sender<Mode>,
    delivered: watch::Receiver<u64>,
    done: oneshot::Receiver<Result<()>>,
    metrics: RelayMetrics,
}

impl Relay {
    /// A builder for a relay shipping `store`'s outbox. Starting it takes
    /// the store's relay lock (`<store>/relay/LOCK`), which a sidecar and
    /// `outbox-relay run --drain` take too: a second relay on one store
    /// fails with [`Error::RelayLocked`]. The lock is released when the
    /// relay stops.
    pub fn builder(store: &Store) -> RelayBuilder {
        Relay::builder_for(store.outbox())
    }

    /// A builder for a relay shipping from any [`OutboxSource`] (e.g. a
    /// [`SidecarSource`], which holds the relay
    /// lock itself; an [`Outbox`] takes it when the relay starts, see
    /// [`OutboxSource::begin`]).
    pub fn builder_for(source: impl OutboxSource) -> RelayBuilder {
        RelayBuilder {
            source: Arc::new(source),
            sink: None,
            batch_size: 500,
            batch_bytes: 4 << 20,
            in_flight_entries: None,
            in_flight_bytes: None,
            linger: Duration::ZERO,
            max_attempts: 5,
            storm_limit: 20,
            backoff: Backoff::default(),
            metrics: RelayMetrics::new(),
        }
    }

    /// The last seq delivered (or dead-lettered) and pruned.
    pub fn delivered(&self) -> u64 {
        *self.delivered.borrow()
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// Waits until every seq `<= seq` is delivered (or dead-lettered) and
    /// pruned. Fails with [`Error::Timeout`] after `timeout`, and with
    /// [`Error::RelayStopped`] if the relay stops first.
    pub async fn wait_delivered(&self, seq: u64, timeout: Duration) -> Result<()> {
        let mut rx = self.delivered.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&d| d >= seq))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::RelayStopped(format!(
                "before seq {seq} was delivered"
            ))),
            Err(_) => Err(Error::Timeout(format!(
                "seq {seq} not delivered within {timeout:?} (delivered through {})",
                self.delivered()
            ))),
        }
    }

    /// Resolves when the relay has stopped on its own (on an error: call
    /// [`shutdown`](Relay::shutdown) to get it). Never resolves while it runs.
    pub async fn stopped(&self) {
        let mut rx = self.delivered.clone();
        while rx.changed().await.is_ok() {}
    }

    /// Stops the relay and waits for it; returns the error it stopped on, if any.
    pub async fn shutdown(self, mode: Shutdown) -> Result<()> {
        // Keep the stop channel open while waiting: closing it means "now".
        let (_stop, done) = self.begin_shutdown(mode);
        match done.await {
            Ok(result) => result,
            Err(_) => Err(Error::RelayStopped(
                "the relay task ended without a result".into(),
            )),
        }
    }

    /// Like [`shutdown`](Relay::shutdown), for code outside an async runtime
    /// (it blocks; do not call it from async code).
    pub fn shutdown_blocking(self, mode: Shutdown) -> Result<()> {
        let (_stop, done) = self.begin_shutdown(mode);
        match done.blocking_recv() {
            Ok(result) => result,
            Err(_) => Err(Error::RelayStopped(
                "the relay task ended without a result".into(),
            )),
        }
    }

    fn begin_shutdown(
        self,
        mode: Shutdown,
    ) -> (watch::Sender<Mode>, oneshot::Receiver<Result<()>>) {
        let mode = match mode {
            Shutdown::Now => Mode::Now,
            Shutdown::Drain(t) => Instant::now().checked_add(t).map_or(Mode::Now, Mode::Drain),
        };
        let _ = self.stop.send(mode);
        (self.stop, self.done)
    }
}

struct Worker {
    source: Arc<dyn OutboxSource>,
    sink: Arc<dyn Sink>,
    batch_size: usize,
    batch_bytes: usize,
    in_flight_entries: usize,
    in_flight_bytes: usize,
    linger: Duration,
    max_attempts: u32,
    storm_limit: u32,
    backoff: Backoff,
    metrics: RelayMetrics,
    delivered: watch::Sender<u64>,
    /// Entries dead-lettered in a row just below the tail at start.
    dead_in_a_row: u32,
    /// What the source's `begin` returned (an in-process relay's lock),
    /// held while the worker runs.
    _lock: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// A batch being published: what the publish gives back.
struct Round {
    /// The entries read.
    batch: Vec<OutboxEntry>,
    /// The entries sent, when some of `batch` were acknowledged in an
    /// earlier round and left out.
    filtered: Option<Vec<OutboxEntry>>,
    /// The sink's outcomes, one per entry sent.
    sent: Vec<Outcome>,
}

impl Round {
    /// The entries given to the sink.
    fn sent_batch(&self) -> &[OutboxEntry] {
        self.filtered.as_deref().unwrap_or(&self.batch)
    }
}

/// What the worker keeps of a round in flight.
struct Launched {
    /// Its first seq.
    first: u64,
    entries: usize,
    bytes: usize,
    /// Commit time of its first entry.
    oldest_micros: u64,
    started: Instant,
    /// When it started, Unix time (for the `publishing_for` gauge).
    started_micros: u64,
    /// How many times it was reported as still waiting.
    reported: u32,
}

/// Attempts of an entry that failed at least once: (count, first failure).
type Attempts = HashMap<u64, (u32, u64)>;

/// What the worker remembers between rounds.
#[derive(Default)]
struct Memory {
    attempts: Attempts,
    /// Entries acknowledged beyond the first failing one: not published
    /// again while the relay retries the failing one (re-publishing them
    /// every round could store them twice once the broker's duplicate
    /// window has passed).
    acked_ahead: std::collections::BTreeSet<u64>,
    /// Entries dead-lettered in a row, with no acknowledgement between.
    dead_in_a_row: u32,
}

impl Worker {
    async fn run(&self, mut stop: watch::Receiver<Mode>) -> Result<()> {
        let outbox = self.source.clone();
        let mut memory = Memory {
            dead_in_a_row: self.dead_in_a_row,
            ..Memory::default()
        };
        let mut failed_rounds = 0u32;
        let mut jitter = Jitter::new();
        let max_publishes = self.sink.max_concurrent_publishes().max(1);
        // Batches published and not settled yet, oldest first: their
        // publishes (polled together, yielded in call order) and what the
        // relay needs to know of each.
        let mut inflight: FuturesOrdered<BoxFuture<'static, Round>> = FuturesOrdered::new();
        let mut launched: VecDeque<Launched> = VecDeque::new();
        let (mut inflight_entries, mut inflight_bytes) = (0usize, 0usize);
        // The first seq not published yet (meaningful while `launched` is
        // not empty; otherwise publishing starts at the tail).
        let mut next = 0u64;
        // The first round that did not settle completely, kept while the
        // rounds behind it come in; then the relay backs off (or not) and
        // publishes again from the tail.
        let mut blocked: Option<Settled> = None;
        // Whether a round settled anything since the relay last published
        // again after a failure: an entry held back behind one that settled
        // (dead-lettered, say) is published again at once; held with no
        // progress at all, the relay backs off.
        let mut progressed = false;
        // Bytes per entry of the last batch read: how full (in bytes) the
        // entries waiting are, before they are read.
        let mut entry_bytes = 0usize;
        // A wait for commits beyond the head it names, kept across rounds
        // (a sidecar source's wait holds a wake-up it would lose if
        // dropped).
        let mut commit_wait: Option<(u64, BoxFuture<'static, ()>)> = None;
        loop {
            // A dropped `Relay` handle closes the channel: stop like `Now`.
            let mode = match stop.has_changed() {
                Ok(_) => *stop.borrow_and_update(),
                Err(_) => Mode::Now,
            };
            if mode == Mode::Now {
                return Ok(());
            }
            let (tail, head) = (outbox.tail()?, outbox.head()?);
            self.metrics
                .depth
                .set((head + 1).saturating_sub(tail) as i64);
            if launched.is_empty() {
                if let Some(settled) = blocked.take() {
                    if settled.held && progressed {
                        // Held behind an entry that settled: go on at once
                        // (the sink is fine; nothing to back off from).
                        self.metrics.sink_up.set(1);
                        failed_rounds = 0;
                    } else {
                        self.metrics.sink_up.set(i64::from(!settled.broker_wide));
                        failed_rounds = failed_rounds.saturating_add(1);
                        let delay = self.backoff.delay(failed_rounds, jitter.next_unit());
                        tracing::warn!(
                            sink = self.sink.name(),
                            seq = settled.through + 1,
                            error = %settled.first_error,
                            retry_in = ?delay,
                            "outbox delivery failed; backing off"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = must_stop(&mut stop) => return Ok(()),
                        }
                    }
                    progressed = false;
                    continue;
                }
                if tail > head {
                    self.metrics.oldest_undelivered_age_seconds.set(0.0);
                    match mode {
                        Mode::Drain(_) => return Ok(()),
                        _ => {
                            tokio::select! {
                                _ = outbox.changed(head) => {}
                                _ = stop.changed() => {}
                            }
                            continue;
                        }
                    }
                }
                if !self.linger.is_zero()
                    && mode == Mode::Running
                    && !self.linger_for(tail, head, &mut stop).await?
                {
                    continue;
                }
                next = tail;
            }
            // Publish the next batch if the limits leave room: one batch is
            // always allowed; more only to a sink that takes them.
            let (room_entries, room_bytes) = if launched.is_empty() {
                (self.batch_size, self.batch_bytes)
            } else {
                (
                    self.in_flight_entries
                        .saturating_sub(inflight_entries)
                        .min(self.batch_size),
                    self.in_flight_bytes
                        .saturating_sub(inflight_bytes)
                        .min(self.batch_bytes),
                )
            };
            if launched.is_empty() {
                commit_wait = None;
            }
            let head = outbox.head()?;
            // While batches are in flight, the next goes out only once it
            // is full (in entries, or in bytes as far as the last batch's
            // entry size tells): a commit at a time would cost a read (and,
            // on a Buffered store, an fsync) per entry.
            let available = (head + 1).saturating_sub(next);
            let can_publish = blocked.is_none()
                && launched.len() < max_publishes
                && room_entries > 0
                && room_bytes > 0;
            // Rounds already done are taken in before anything more is
            // published: a sink may forget earlier failures when a call
            // comes with nothing in flight, so by then the relay must know
            // of them (and publish again from the first).
            let ready = if can_publish && !launched.is_empty() {
                inflight.next().now_or_never().flatten()
            } else {
                None
            };
            let round = match ready {
                Some(round) => Some(round),
                None => {
                    if can_publish
                        && available > 0
                        && (launched.is_empty()
                            || available >= room_entries as u64
                            || (available as usize).saturating_mul(entry_bytes) >= room_bytes)
                    {
                        let batch = {
                            let outbox = outbox.clone();
                            off_runtime(move || outbox.read(next, room_entries, room_bytes)).await?
                        };
                        if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                            let round = Launched {
                                first: first.seq,
                                entries: batch.len(),
                                bytes: batch.iter().map(OutboxEntry::size_hint).sum(),
                                oldest_micros: first.created_at_micros,
                                started: Instant::now(),
                                started_micros: now_micros(),
                                reported: 0,
                            };
                            next = last.seq + 1;
                            entry_bytes = round.bytes / round.entries.max(1);
                            if launched.is_empty() {
                                self.show_age(round.oldest_micros);
                                self.metrics.publish_started();
                            }
                            inflight_entries += round.entries;
                            inflight_bytes += round.bytes;
                            launched.push_back(round);
                            let publish = self.publish(batch, &memory).await;
                            inflight.push_back(publish);
                            continue;
                        }
                        if launched.is_empty() {
                            continue;
                        }
                    }
                    let Some(oldest) = launched.front() else {
                        continue;
                    };
                    let report_at = oldest.started + PUBLISH_WAIT_REPORT * (oldest.reported + 1);
                    if can_publish && commit_wait.as_ref().is_none_or(|(h, _)| *h != head) {
                        commit_wait = Some((head, outbox.changed(head)));
                    }
                    let round = tokio::select! {
                        round = inflight.next() => round,
                        _ = async {
                            match &mut commit_wait {
                                Some((_, wait)) => wait.await,
                                None => std::future::pending().await,
                            }
                        }, if can_publish => {
                            commit_wait = None;
                            continue;
                        }
                        _ = tokio::time::sleep_until(report_at.into()) => {
                            // A sink that waits for the broker (a Kafka producer
                            // retrying without a timeout, a hung connection): say
                            // so, and count the sink down.
                            self.metrics.sink_up.set(0);
                            tracing::warn!(
                                sink = self.sink.name(),
                                seq = oldest.first,
                                waited = ?oldest.started.elapsed(),
                                "a publish is still waiting for the broker"
                            );
                            if let Some(o) = launched.front_mut() {
                                o.reported += 1;
                            }
                            continue;
                        }
                        _ = must_stop(&mut stop) => {
                            self.metrics.publish_ended();
                            return Ok(());
                        }
                    };
                    round
                }
            };
            let (Some(mut round), Some(done)) = (round, launched.pop_front()) else {
                // Cannot happen (one `Launched` per publish); start over.
                launched.clear();
                inflight = FuturesOrdered::new();
                (inflight_entries, inflight_bytes) = (0, 0);
                continue;
            };
            inflight_entries = inflight_entries.saturating_sub(done.entries);
            inflight_bytes = inflight_bytes.saturating_sub(done.bytes);
            match launched.front() {
                Some(o) => {
                    self.metrics.publish_started_at(o.started_micros);
                    if blocked.is_none() {
                        // Settled through this round (or about to be):
                        // the next round's first entry is the oldest.
                        // While a round is blocked the gauge keeps its
                        // stuck entry's age.
                        self.show_age(o.oldest_micros);
                    }
                }
                None => self.metrics.publish_ended(),
            }
            let sent = std::mem::take(&mut round.sent);
            let outcomes = merge_outcomes(&round.batch, round.sent_batch(), sent);
            if blocked.is_some() {
                // Behind a round that failed: only remember what was
                // acknowledged, so it is not sent again.
                self.settle(&round.batch, outcomes, &mut memory, true);
                continue;
            }
            let mut settled = self.settle(&round.batch, outcomes, &mut memory, false);
            let moved = settled.through >= done.first;
            let dead = std::mem::take(&mut settled.dead);
            if let Some(error) = settled.fatal {
                if moved {
                    settle_off_runtime(&outbox, settled.through, dead).await?;
                }
                self.metrics.sink_up.set(0);
                self.metrics.publish_ended();
                return Err(Error::Broker {
                    sink: self.sink.name().to_string(),
                    message: error,
                });
            }
            if moved {
                progressed = true;
                settle_off_runtime(&outbox, settled.through, dead).await?;
                memory.attempts.retain(|&seq, _| seq > settled.through);
                memory.acked_ahead = memory.acked_ahead.split_off(&(settled.through + 1));
                self.metrics.delivered_seq.set(settled.through as i64);
                self.delivered.send_replace(settled.through);
            }
            if settled.blocked {
                // The gauge shows the entry that is stuck, not the next
                // round's.
                if let Some(stuck) = round.batch.iter().find(|e| e.seq > settled.through) {
                    self.show_age(stuck.created_at_micros);
                }
                blocked = Some(settled);
            } else {
                self.metrics.sink_up.set(1);
                failed_rounds = 0;
            }
        }
    }

    /// Sets the `oldest_undelivered_age_seconds` gauge from the commit time
    /// of the oldest entry not settled.
    fn show_age(&self, created_micros: u64) {
        let age = now_micros().saturating_sub(created_micros);
        self.metrics
            .oldest_undelivered_age_seconds
            .set(age as f64 / 1e6);
    }

    /// Waits for the batch at `tail` to fill (in entries), up to the
    /// linger: a batch that is full, or fills meanwhile, goes at once.
    /// `false` when a stop request ended the wait (the caller goes back to
    /// the top, which ends or drains).
    async fn linger_for(
        &self,
        tail: u64,
        head: u64,
        stop: &mut watch::Receiver<Mode>,
    ) -> Result<bool> {
        let linger = tokio::time::sleep(self.linger);
        tokio::pin!(linger);
        let mut seen = head;
        while (seen + 1).saturating_sub(tail) < self.batch_size as u64 {
            tokio::select! {
                _ = &mut linger => break,
                _ = self.source.changed(seen) => {
                    let now = self.source.head()?;
                    if now <= seen {
                        // A spurious wake-up (the trait allows them): let
                        // the runtime run other tasks.
                        tokio::task::yield_now().await;
                    }
                    seen = seen.max(now);
                }
                _ = stop.changed() => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Starts publishing `batch` (without the entries acknowledged in an
    /// earlier round): the sink's `publish` is called, and its future
    /// polled once, before this returns, so the calls reach the sink in
    /// seq order (see [`Sink::max_concurrent_publishes`]).
    async fn publish(&self, batch: Vec<OutboxEntry>, memory: &Memory) -> BoxFuture<'static, Round> {
        // Only when some were acknowledged before is the batch copied: the
        // usual round sends it as read.
        let filtered = (!memory.acked_ahead.is_empty()).then(|| {
            batch
                .iter()
                .filter(|e| !memory.acked_ahead.contains(&e.seq))
                .cloned()
                .collect::<Vec<_>>()
        });
        let sink = self.sink.clone();
        let mut round = Round {
            batch,
            filtered,
            sent: Vec::new(),
        };
        self.metrics
            .published
            .inc_by(round.sent_batch().len() as u64);
        let mut publish: BoxFuture<'static, Round> = Box::pin(async move {
            if !round.sent_batch().is_empty() {
                let sent = sink.publish(round.sent_batch()).await;
                round.sent = sent;
            }
            round
        });
        match std::future::poll_fn(|cx| std::task::Poll::Ready(publish.as_mut().poll(cx))).await {
            std::task::Poll::Ready(round) => Box::pin(std::future::ready(round)),
            std::task::Poll::Pending => publish,
        }
    }

    /// Walks the outcomes in seq order: everything up to the first entry that
    /// is still failing is settled (acknowledged or dead-lettered).
    /// Rejections count toward `max_attempts` only for the entry that
    /// blocks (not for entries waiting behind it), and never past the
    /// dead-letter storm limit.
    ///
    /// `behind`: the round follows one that did not settle completely;
    /// nothing in it settles, its acknowledged entries are remembered.
    fn settle(
        &self,
        batch: &[crate::OutboxEntry],
        mut outcomes: Vec<Outcome>,
        memory: &mut Memory,
        behind: bool,
    ) -> Settled {
        let now = now_micros();
        let mut settled = Settled {
            through: batch.first().map_or(0, |e| e.seq.saturating_sub(1)),
            dead: Vec::new(),
            blocked: behind,
            held: false,
            broker_wide: false,
            first_error: String::new(),
            fatal: None,
        };
        if outcomes.len() != batch.len() {
            let error = format!(
                "sink {} returned {} outcomes for {} entries",
                self.sink.name(),
                outcomes.len(),
                batch.len()
            );
            outcomes = vec![Outcome::Retry { error }; batch.len()];
        }
        let mut storm = false;
        for (entry, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Outcome::Acked { duplicate, .. } => {
                    if !memory.acked_ahead.contains(&entry.seq) {
                        self.metrics.acked.inc();
                        if duplicate {
                            self.metrics.duplicates.inc();
                        }
                    }
                    if settled.blocked {
                        memory.acked_ahead.insert(entry.seq);
                    } else {
                        settled.through = entry.seq;
                        memory.dead_in_a_row = 0;
                        if !memory.acked_ahead.contains(&entry.seq) {
                            let latency = now.saturating_sub(entry.created_at_micros);
                            self.metrics
                                .commit_to_ack_seconds
                                .observe(latency as f64 / 1e6);
                        }
                    }
                }
                Outcome::Retry { error } => {
                    self.metrics.failed.inc();
                    if !settled.blocked {
                        settled.blocked = true;
                        settled.broker_wide = true;
                        settled.first_error = error;
                    }
                }
                Outcome::Held { reason } => {
                    if !settled.blocked {
                        settled.blocked = true;
                        settled.held = true;
                        settled.first_error = reason;
                    }
                }
                Outcome::Fatal { error } => {
                    self.metrics.failed.inc();
                    if !settled.blocked {
                        settled.blocked = true;
                        settled.broker_wide = true;
                        settled.first_error = error.clone();
                        settled.fatal = Some(error);
                    }
                }
                Outcome::Rejected { error, permanent } => {
                    self.metrics.failed.inc();
                    if settled.blocked {
                        // Waiting behind a failing entry: this round does
                        // not count against it.
                        continue;
                    }
                    let a = memory.attempts.entry(entry.seq).or_insert((0, now));
                    a.0 += 1;
                    if !(permanent || a.0 >= self.max_attempts) {
                        settled.blocked = true;
                        settled.first_error = error;
                        continue;
                    }
                    if memory.dead_in_a_row >= self.storm_limit {
                        // Many entries in a row refused: more likely the
                        // broker than the entries. Hold, alert, back off.
                        storm = true;
                        settled.blocked = true;
                        settled.broker_wide = true;
                        settled.first_error = format!(
                            "dead-letter storm: {} entries in a row were dead-lettered \
                             (limit {}); holding seq {} instead ({error})",
                            memory.dead_in_a_row, self.storm_limit, entry.seq
                        );
                        continue;
                    }
                    tracing::warn!(seq = entry.seq, id = %entry.id, %error, "dead-lettering outbox entry");
                    self.metrics.dead_lettered.inc();
                    memory.dead_in_a_row += 1;
                    settled.dead.push(DeadLetter {
                        entry: entry.clone(),
                        error,
                        attempts: a.0,
                        first_failed_micros: a.1,
                        dead_at_micros: now,
                    });
                    settled.through = entry.seq;
                }
            }
        }
        if storm {
            tracing::error!(
                sink = self.sink.name(),
                limit = self.storm_limit,
                "dead-letter storm: stopped dead-lettering; check the broker, then replay the \
                 dead letters or raise the limit"
            );
        }
        if !behind {
            self.metrics.dead_letter_storm.set(i64::from(storm));
        }
        settled
    }
}

/// Puts the outcomes of the entries sent (`sent`, for `to_send`, a
/// subsequence of `batch`) and of those skipped as acknowledged before back
/// in `batch`'s order.
fn merge_outcomes(
    batch: &[OutboxEntry],
    to_send: &[OutboxEntry],
    sent: Vec<Outcome>,
) -> Vec<Outcome> {
    if to_send.len() == batch.len() {
        // Nothing skipped: `settle` checks the count against the batch.
        return sent;
    }
    if sent.len() != to_send.len() {
        // A sink's mistake: never settle on outcomes that may be misaligned.
        let error = format!(
            "the sink returned {} outcomes for {} entries",
            sent.len(),
            to_send.len()
        );
        return vec![Outcome::Retry { error }; batch.len()];
    }
    let mut sent = sent.into_iter();
    let mut next_sent = to_send.iter();
    let mut pending = next_sent.next();
    batch
        .iter()
        .map(|e| match pending {
            Some(s) if s.seq == e.seq => {
                pending = next_sent.next();
                sent.next().unwrap_or(Outcome::Retry {
                    error: "no outcome recorded".into(),
                })
            }
            _ => Outcome::Acked {
                position: None,
                duplicate: false,
            },
        })
        .collect()
}

struct Settled {
    /// Last seq settled: everything up to it can be pruned.
    through: u64,
    dead: Vec<DeadLetter>,
    /// An entry is still failing: back off, then publish again from it.
    blocked: bool,
    /// The entry that blocks was only held back by the sink (behind an
    /// earlier entry of its key that settled this round): publish again
    /// after the shortest backoff, without counting a failed round.
    held: bool,
    /// The failure is the broker's (a `Retry`, or a dead-letter storm), not
    /// the entry's: the sink counts as down.
    broker_wide: bool,
    first_error: String,
    /// The sink cannot go on: stop the relay with this error.
    fatal: Option<String>,
}

/// Runs the relay's store work (a read, with its fsync; a prune) on the
/// runtime's blocking pool: the relay never blocks a worker thread of its
/// runtime, which the service's own tasks (and the sink's client) share.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::RelayStopped(format!("the relay's store work did not finish: {e}")))?
}

/// [`OutboxSource::settle`], through [`off_runtime`].
async fn settle_off_runtime(
    source: &Arc<dyn OutboxSource>,
    through: u64,
    dead: Vec<DeadLetter>,
) -> Result<()> {
    let source = source.clone();
    off_runtime(move || source.settle(through, &dead)).await
}

/// Resolves when the relay must stop what it is waiting for: at once on a
/// stop-now (or when the relay handle is gone), or at the deadline of a drain
/// requested before or while it waits.
async fn must_stop(stop: &mut watch::Receiver<Mode>) {
    loop {
        let mode = *stop.borrow_and_update();
        match mode {
            Mode::Now => return,
            Mode::Drain(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => return,
                    changed = stop.changed() => if changed.is_err() { return },
                }
            }
            Mode::Running => {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
