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
//!   skipping the entries acknowledged beyond it. The sinks keep a key's
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

use std::collections::HashMap;

use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// - `settle(through, dead)` records durably that every seq up to `through`
///   is delivered, except `dead`, which were dead-lettered; afterwards
///   `tail()` is above `through`.
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
    /// Records that everything through `through` is settled.
    fn settle(&self, through: u64, dead: &[DeadLetter]) -> Result<()>;
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

    /// How long to wait for a batch to fill once entries are waiting. Adds up
    /// to this much latency in exchange for larger batches; a batch that has
    /// [`batch_size`](RelayBuilder::batch_size) entries, or reaches it while
    /// the relay waits, is sent at once (one full by
    /// [`batch_bytes`](RelayBuilder::batch_bytes) only waits out the linger).
    /// Default: zero.
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
            let result = worker.run(stop_rx).await;
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
    async fn run(self, mut stop: watch::Receiver<Mode>) -> Result<()> {
        let outbox = self.source.clone();
        let mut memory = Memory {
            dead_in_a_row: self.dead_in_a_row,
            ..Memory::default()
        };
        let mut failed_rounds = 0u32;
        let mut jitter = Jitter::new();
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
            if !self.linger.is_zero() && mode == Mode::Running {
                // Wait for the batch to fill (in entries), up to the linger:
                // a batch that is full, or fills meanwhile, goes at once. A
                // stop request goes back to the top, which ends or drains.
                let linger = tokio::time::sleep(self.linger);
                tokio::pin!(linger);
                let mut seen = head;
                let mut stopped = false;
                while (seen + 1).saturating_sub(tail) < self.batch_size as u64 {
                    tokio::select! {
                        _ = &mut linger => break,
                        _ = outbox.changed(seen) => {
                            let now = outbox.head()?;
                            if now <= seen {
                                // A spurious wake-up (the trait allows
                                // them): let the runtime run other tasks.
                                tokio::task::yield_now().await;
                            }
                            seen = seen.max(now);
                        }
                        _ = stop.changed() => {
                            stopped = true;
                            break;
                        }
                    }
                }
                if stopped {
                    continue;
                }
            }
            let batch = outbox.read(tail, self.batch_size, self.batch_bytes)?;
            let Some(oldest) = batch.first() else {
                continue;
            };
            let age = now_micros().saturating_sub(oldest.created_at_micros);
            self.metrics
                .oldest_undelivered_age_seconds
                .set(age as f64 / 1e6);
            // Entries acknowledged in an earlier round are not sent again.
            // Only then is the batch copied: the usual round sends it as read.
            let to_send: std::borrow::Cow<'_, [OutboxEntry]> = if memory.acked_ahead.is_empty() {
                std::borrow::Cow::Borrowed(&batch)
            } else {
                batch
                    .iter()
                    .filter(|e| !memory.acked_ahead.contains(&e.seq))
                    .cloned()
                    .collect::<Vec<_>>()
                    .into()
            };
            self.metrics.published.inc_by(to_send.len() as u64);
            let sent = if to_send.is_empty() {
                Vec::new()
            } else {
                self.metrics.publish_started();
                let publish = self.sink.publish(&to_send);
                tokio::pin!(publish);
                let started = Instant::now();
                let mut report = tokio::time::interval_at(
                    (started + PUBLISH_WAIT_REPORT).into(),
                    PUBLISH_WAIT_REPORT,
                );
                let sent = loop {
                    tokio::select! {
                        o = &mut publish => break o,
                        _ = report.tick() => {
                            // A sink that waits for the broker (a Kafka
                            // producer retrying without a timeout, a hung
                            // connection): say so, and count the sink down.
                            self.metrics.sink_up.set(0);
                            tracing::warn!(
                                sink = self.sink.name(),
                                seq = tail,
                                waited = ?started.elapsed(),
                                "a publish is still waiting for the broker"
                            );
                        }
                        _ = must_stop(&mut stop) => {
                            self.metrics.publish_ended();
                            return Ok(());
                        }
                    }
                };
                self.metrics.publish_ended();
                sent
            };
            let outcomes = merge_outcomes(&batch, &to_send, sent);
            let settled = self.settle(&batch, outcomes, &mut memory);
            if settled.fatal.is_some() && settled.through >= tail {
                outbox.settle(settled.through, &settled.dead)?;
            }
            if let Some(error) = settled.fatal {
                self.metrics.sink_up.set(0);
                return Err(Error::Broker {
                    sink: self.sink.name().to_string(),
                    message: error,
                });
            }
            if settled.through >= tail {
                outbox.settle(settled.through, &settled.dead)?;
                memory.attempts.retain(|&seq, _| seq > settled.through);
                memory.acked_ahead = memory.acked_ahead.split_off(&(settled.through + 1));
                self.metrics.delivered_seq.set(settled.through as i64);
                self.delivered.send_replace(settled.through);
            }
            if settled.blocked && settled.held && settled.through >= tail {
                // Held behind an entry that settled this round: go on at
                // once (the sink is fine; nothing to back off from).
                self.metrics.sink_up.set(1);
                failed_rounds = 0;
            } else if settled.blocked {
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
            } else {
                self.metrics.sink_up.set(1);
                failed_rounds = 0;
            }
        }
    }

    /// Walks the outcomes in seq order: everything up to the first entry that
    /// is still failing is settled (acknowledged or dead-lettered).
    /// Rejections count toward `max_attempts` only for the entry that
    /// blocks (not for entries waiting behind it), and never past the
    /// dead-letter storm limit.
    fn settle(
        &self,
        batch: &[crate::OutboxEntry],
        mut outcomes: Vec<Outcome>,
        memory: &mut Memory,
    ) -> Settled {
        let now = now_micros();
        let mut settled = Settled {
            through: batch.first().map_or(0, |e| e.seq.saturating_sub(1)),
            dead: Vec::new(),
            blocked: false,
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
            outcomes = batch
                .iter()
                .map(|_| Outcome::Retry {
                    error: error.clone(),
                })
                .collect();
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
        self.metrics.dead_letter_storm.set(i64::from(storm));
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
        return batch
            .iter()
            .map(|_| Outcome::Retry {
                error: error.clone(),
            })
            .collect();
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
