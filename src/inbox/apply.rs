//! [`Inbox`]: applies messages, one commit per call.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use super::dead::{DEAD, InboxDeadLetter, REPLAY};
use super::message::Message;
use super::metrics::InboxMetrics;
use super::position::{FILTERS, POSITIONS, Position, SEEN, Seen};
use super::tx::InboxTx;
use crate::error::{Error, Result};
use crate::outbox::entry::StoreId;
use crate::store::{CommitFuture, Durability, Store, WriteTx};

/// Longest consumer name, in bytes.
pub const MAX_CONSUMER_NAME: usize = 128;

/// Options of an [`Inbox`].
///
/// ```
/// use outboxkv::inbox::InboxOptions;
/// let opts = InboxOptions::new().max_attempts(3).producer_window(0);
/// assert_eq!(opts.get_max_attempts(), 3);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct InboxOptions {
    max_attempts: u32,
    producer_window: u32,
}

impl Default for InboxOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl InboxOptions {
    /// The defaults: 5 attempts, a producer window of 4096 seqs.
    pub fn new() -> Self {
        InboxOptions {
            max_attempts: 5,
            producer_window: 4096,
        }
    }

    /// Attempts at a message before it is dead-lettered (at least 1).
    /// Default: 5.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The attempts setting.
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// How many of each producing store's latest seqs the inbox remembers,
    /// to skip an outboxkv event delivered again at another broker
    /// position; 0 turns it off. Rounded up to a multiple of 64, at most
    /// 1,048,576 (a record of `window / 8` bytes per producing store,
    /// rewritten by each commit that applies its events). Default: 4096.
    pub fn producer_window(mut self, seqs: u32) -> Self {
        self.producer_window = seqs.min(1 << 20);
        self
    }
}

/// What became of one message in [`Inbox::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its writes committed with the position:
    /// acknowledge.
    Applied,
    /// The position was done already (a redelivery): nothing was written;
    /// acknowledge.
    Duplicate,
    /// The producing store's event was applied already, at another
    /// position: only the position was written; acknowledge.
    ProducerDuplicate,
    /// The handler failed on its last attempt; the message is in the inbox
    /// dead-letter table and the position moved past it: acknowledge.
    DeadLettered {
        /// The last error.
        error: String,
    },
    /// The handler failed and attempts remain: nothing was written; do not
    /// acknowledge, deliver it again (with [`Message::attempt`] + 1).
    Retry {
        /// The error.
        error: String,
    },
    /// Not tried: an earlier message of its partition is to be retried, and
    /// applying this one would move the partition past it. Do not
    /// acknowledge; deliver it again after that one.
    Blocked {
        /// The position it waits for.
        behind: u64,
    },
}

impl Outcome {
    /// Whether the message is settled (applied, skipped or dead-lettered)
    /// and may be acknowledged.
    pub fn settled(&self) -> bool {
        matches!(
            self,
            Outcome::Applied
                | Outcome::Duplicate
                | Outcome::ProducerDuplicate
                | Outcome::DeadLettered { .. }
        )
    }
}

/// A batch [`Inbox::submit`] ordered into the store's commit pipeline:
/// visible to later transactions, on its way to disk. Its outcomes are
/// known, and its settled messages may be acknowledged, once
/// [`durable`](Applying::durable) returns.
///
/// Dropping it does not take the commit back (it is written, or fails with
/// the store, either way): the messages are then only not acknowledged,
/// and are skipped by position when delivered again.
#[must_use = "acknowledge the messages only after `durable` returned"]
pub struct Applying {
    outcomes: Vec<Outcome>,
    /// The commit still to be awaited, the delivery times of the messages
    /// it applies, and the metrics to count them in; `None` when the
    /// outcomes were settled (and durable) before `submit` returned.
    commit: Option<(CommitFuture, Vec<std::time::Instant>, InboxMetrics)>,
}

impl std::fmt::Debug for Applying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applying")
            .field("messages", &self.outcomes.len())
            .field("awaiting_commit", &self.commit.is_some())
            .finish()
    }
}

impl Applying {
    fn settled(outcomes: Vec<Outcome>) -> Applying {
        Applying {
            outcomes,
            commit: None,
        }
    }

    /// Waits until the batch's commit is durable and says what became of
    /// each message, in submit order. Fails only for a store failure; then
    /// none of the messages may be acknowledged.
    pub async fn durable(self) -> Result<Vec<Outcome>> {
        let Some((commit, received, m)) = self.commit else {
            return Ok(self.outcomes);
        };
        commit.await?;
        let mut wrote = false;
        for o in &self.outcomes {
            match o {
                Outcome::Applied => {
                    m.applied.inc();
                    wrote = true;
                }
                Outcome::Duplicate => {
                    m.duplicates.inc();
                }
                Outcome::ProducerDuplicate => {
                    m.producer_duplicates.inc();
                    wrote = true;
                }
                _ => {}
            }
        }
        for at in received {
            m.delivery_to_commit.observe(at.elapsed().as_secs_f64());
        }
        if wrote {
            m.commits.inc();
        }
        Ok(self.outcomes)
    }
}

/// A consumer's inbox in a store: applies messages with exactly-once effect
/// (see the [module documentation](crate::inbox)). Cheap to clone.
///
/// ```
/// use outboxkv::inbox::{Inbox, Message, Outcome};
/// # let dir = tempfile::tempdir()?;
/// let store = outboxkv::Store::open(dir.path())?;
/// let inbox = Inbox::new(&store, "billing")?;
/// let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// let batch: Vec<Message> = (0..3).map(|i| Message::new("orders", 0, i, vec![])).collect();
/// let out = rt.block_on(inbox.apply(&batch, |_tx| Ok(())))?;
/// assert!(out.iter().all(|o| *o == Outcome::Applied));
/// assert_eq!(inbox.position("orders", 0)?.map(|p| p.next), Some(3));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Inbox {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    consumer: String,
    opts: InboxOptions,
    metrics: InboxMetrics,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("consumer", &self.shared.consumer)
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

/// A handler failure about the message, carried out of the transaction
/// closure with the index of the message.
#[derive(Debug)]
struct HandlerFailed {
    index: usize,
    error: Error,
}

impl std::fmt::Display for HandlerFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handler failed on message {}: {}",
            self.index, self.error
        )
    }
}

impl std::error::Error for HandlerFailed {}

enum Failed {
    /// About message `index` of the batch (or the whole batch, for a
    /// commit-time failure): retry or dead-letter it.
    Message { index: usize, error: Error },
    /// The store failed: stop, acknowledge nothing.
    Store(Error),
}

/// Whether a handler or commit error is about the message (retried, then
/// dead-lettered) rather than about the store (returned).
fn about_the_message(e: &Error) -> bool {
    matches!(
        e,
        Error::Aborted(_)
            | Error::InvalidEvent { .. }
            | Error::TooLarge { .. }
            | Error::Encode { .. }
            | Error::InvalidArgument(_)
            | Error::InvalidTableName { .. }
            | Error::Conflict { .. }
            | Error::TransactionExpired { .. }
    )
}

impl Inbox {
    /// The inbox of consumer `consumer` (1 to 128 bytes) in `store`, with
    /// default [`InboxOptions`].
    pub fn new(store: &Store, consumer: impl Into<String>) -> Result<Inbox> {
        Self::with_options(store, consumer, InboxOptions::new())
    }

    /// The inbox of consumer `consumer` in `store`, with `opts`.
    pub fn with_options(
        store: &Store,
        consumer: impl Into<String>,
        opts: InboxOptions,
    ) -> Result<Inbox> {
        let consumer = consumer.into();
        if consumer.is_empty() || consumer.len() > MAX_CONSUMER_NAME {
            return Err(Error::InvalidArgument(format!(
                "inbox consumer name {consumer:?} must be 1 to {MAX_CONSUMER_NAME} bytes"
            )));
        }
        Ok(Inbox {
            shared: Arc::new(Shared {
                store: store.clone(),
                consumer,
                opts,
                metrics: InboxMetrics::new(),
            }),
        })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The options.
    pub fn options(&self) -> &InboxOptions {
        &self.shared.opts
    }

    /// The metrics.
    pub fn metrics(&self) -> &InboxMetrics {
        &self.shared.metrics
    }

    /// Applies `messages` (in order) in one commit, and says what became of
    /// each; [`Outcome::settled`] ones may be acknowledged once this
    /// returns (the commit is durable: inbox commits are always
    /// [`Durability::Sync`]).
    ///
    /// `handler` runs once per new message in the commit, and again when
    /// the commit is re-run (a conflict). When it fails on one message (or
    /// the batch's commit fails for a reason about the messages, such as
    /// its size), the batch is applied again one message per commit, so
    /// the others go on: the failing one is [`Outcome::Retry`] (or
    /// [`Outcome::DeadLettered`] on its last attempt), and later messages
    /// of its partition whose commit would move the partition past it are
    /// [`Outcome::Blocked`].
    ///
    /// Fails only for a store failure; then none of the messages may be
    /// acknowledged (some may have committed: they are skipped when
    /// delivered again).
    ///
    /// The same as [`submit`](Inbox::submit) followed by
    /// [`Applying::durable`].
    pub async fn apply<F>(&self, messages: &[Message], handler: F) -> Result<Vec<Outcome>>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        self.submit(messages, handler).await?.durable().await
    }

    /// Applies `messages` like [`apply`](Inbox::apply), but returns as soon
    /// as their commit is ordered in the store's commit pipeline and
    /// visible to later transactions, before its fsync: the caller can take
    /// in and submit the next batch while this one's fsync runs, and then
    /// wait for this one with [`Applying::durable`]. Acknowledge nothing
    /// before `durable` returned.
    ///
    /// Commits reach the disk in the order they were submitted, so when a
    /// later batch is durable, so is every one submitted before it; a
    /// store failure fails the `durable` of every batch not yet on disk
    /// (and poisons the store). The handler of a later batch sees this
    /// batch's writes (and so would act on writes that a crash before the
    /// fsync takes back; its own commit is then taken back with them).
    ///
    /// With [`StoreOptions::pipelined_fsync`](crate::StoreOptions::pipelined_fsync)
    /// off, a `Sync` commit's write is synced before it is visible, so
    /// `submit` returns once it is durable and nothing overlaps.
    ///
    /// What fails here (the handler, a commit refused for the messages)
    /// is settled here, one message per commit as `apply` says: the
    /// returned [`Applying`] then holds the outcomes, already durable.
    ///
    /// ```
    /// use outboxkv::inbox::{Inbox, Message, Outcome};
    /// # let dir = tempfile::tempdir()?;
    /// let store = outboxkv::Store::open(dir.path())?;
    /// let inbox = Inbox::new(&store, "billing")?;
    /// let rt = tokio::runtime::Builder::new_current_thread().build()?;
    /// rt.block_on(async {
    ///     let first = inbox.submit(&[Message::new("orders", 0, 0, vec![])], |_tx| Ok(())).await?;
    ///     // Prepared and ordered while the first commit's fsync runs.
    ///     let second = inbox.submit(&[Message::new("orders", 0, 1, vec![])], |_tx| Ok(())).await?;
    ///     assert_eq!(first.durable().await?, vec![Outcome::Applied]);
    ///     assert_eq!(second.durable().await?, vec![Outcome::Applied]);
    ///     Ok::<_, outboxkv::Error>(())
    /// })?;
    /// assert_eq!(inbox.position("orders", 0)?.map(|p| p.next), Some(2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn submit<F>(&self, messages: &[Message], mut handler: F) -> Result<Applying>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        if messages.is_empty() {
            return Ok(Applying::settled(Vec::new()));
        }
        match self.order(messages, &mut handler).await {
            Ok(ordered) => return Ok(ordered),
            Err(Failed::Store(e)) => return Err(e),
            Err(Failed::Message { index, error }) if messages.len() == 1 => {
                debug_assert_eq!(index, 0);
                return Ok(Applying::settled(vec![
                    self.failed(&messages[0], error).await?,
                ]));
            }
            Err(Failed::Message { .. }) => {}
        }
        let mut outcomes = Vec::with_capacity(messages.len());
        // Per partition, the lowest position to be retried.
        let mut held: HashMap<(&str, u32), u64> = HashMap::new();
        for m in messages {
            if let Some(&behind) = held.get(&(m.stream.as_str(), m.partition))
                && (m.done_below > behind || (m.done_from..m.position).contains(&behind))
            {
                outcomes.push(Outcome::Blocked { behind });
                continue;
            }
            let one = match self.order(std::slice::from_ref(m), &mut handler).await {
                Ok(ordered) => ordered.durable().await.map(|mut one| one.pop()),
                Err(Failed::Store(e)) => Err(e),
                Err(Failed::Message { error, .. }) => self.failed(m, error).await.map(Some),
            };
            let outcome = one?.unwrap_or(Outcome::Duplicate);
            if matches!(outcome, Outcome::Retry { .. }) {
                let at = held
                    .entry((m.stream.as_str(), m.partition))
                    .or_insert(m.position);
                *at = (*at).min(m.position);
            }
            outcomes.push(outcome);
        }
        Ok(Applying::settled(outcomes))
    }

    /// A failed attempt at `m`: dead-letters it on its last attempt.
    async fn failed(&self, m: &Message, error: Error) -> Result<Outcome> {
        self.shared.metrics.failed.inc();
        let text = error.to_string();
        if m.attempt < self.shared.opts.max_attempts {
            tracing::debug!(
                consumer = %self.shared.consumer, stream = %m.stream, partition = m.partition,
                position = m.position, attempt = m.attempt, error = %text,
                "inbox handler failed; the message will be retried"
            );
            return Ok(Outcome::Retry { error: text });
        }
        let consumer = &self.shared.consumer;
        let window = self.shared.opts.producer_window;
        let whole = InboxDeadLetter::of(m, text.clone());
        let written = match self.dead_letter(m, &whole, consumer, window).await {
            // The message itself cannot be stored (too large for the
            // store's limits): keep where it was and why, so that the
            // partition still moves on.
            Err(e @ (Error::TooLarge { .. } | Error::Encode { .. })) => {
                let short = whole.truncate(&e.to_string());
                self.dead_letter(m, &short, consumer, window).await?
            }
            other => other?,
        };
        if !written {
            return Ok(Outcome::Duplicate);
        }
        self.shared.metrics.dead_lettered.inc();
        self.shared.metrics.commits.inc();
        tracing::warn!(
            consumer = %consumer, stream = %m.stream, partition = m.partition,
            position = m.position, attempts = m.attempt, error = %text,
            "inbox message dead-lettered"
        );
        Ok(Outcome::DeadLettered { error: text })
    }

    /// One commit of `dead` and the position moved past `m`; `false` when
    /// `m` was done already.
    async fn dead_letter(
        &self,
        m: &Message,
        dead: &InboxDeadLetter,
        consumer: &str,
        window: u32,
    ) -> Result<bool> {
        let written = self
            .shared
            .store
            .write_async(|tx| {
                let key = (consumer.to_string(), m.stream.clone(), m.partition);
                tx.set_durability(Durability::Sync);
                let mut pos = load_position(tx, &key)?;
                if pos.contains(m.position) {
                    // Unchanged, but written: see `commit`.
                    tx.put(&POSITIONS, &key, &pos)?;
                    return Ok(false);
                }
                pos.mark_range(m.done_from, m.position, m.done_below);
                tx.put(
                    &DEAD,
                    &(
                        consumer.to_string(),
                        m.stream.clone(),
                        m.partition,
                        m.position,
                    ),
                    dead,
                )?;
                tx.put(&POSITIONS, &key, &pos)?;
                if window > 0
                    && let Some(id) = m.event.as_ref().and_then(|e| e.outboxkv_id())
                {
                    let mut seen = load_seen(tx, consumer, id.store, window)?;
                    seen.insert(id.seq);
                    tx.put(&SEEN, &(consumer.to_string(), id.store.0.to_vec()), &seen)?;
                }
                Ok(true)
            })
            .await?;
        Ok(written.value)
    }

    /// One commit of every message in `messages`, ordered and visible;
    /// what it did to each is known once it is durable.
    async fn order<F>(
        &self,
        messages: &[Message],
        handler: &mut F,
    ) -> std::result::Result<Applying, Failed>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        let consumer = &self.shared.consumer;
        let window = self.shared.opts.producer_window;
        let result = self
            .shared
            .store
            .write_ordered(|tx| {
                let mut positions: HashMap<(&str, u32), (Position, bool)> = HashMap::new();
                let mut seen: HashMap<StoreId, (Seen, bool)> = HashMap::new();
                let mut outcomes = Vec::with_capacity(messages.len());
                for (index, m) in messages.iter().enumerate() {
                    let (pos, changed) = match positions.entry((m.stream.as_str(), m.partition)) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => {
                            let key = (consumer.clone(), m.stream.clone(), m.partition);
                            e.insert((load_position(tx, &key)?, false))
                        }
                    };
                    if pos.contains(m.position) {
                        // The stretch before it is still known done.
                        pos.mark_range(m.done_from, m.position, m.done_below);
                        // Written back unchanged: the commit is then a
                        // real Sync one, so the copy is acknowledged only
                        // once the commit that applied it (possibly
                        // another task's, visible before its fsync) is on
                        // disk too.
                        *changed = true;
                        outcomes.push(Outcome::Duplicate);
                        continue;
                    }
                    let producer = if window > 0 {
                        m.event.as_ref().and_then(|e| e.outboxkv_id())
                    } else {
                        None
                    };
                    if let Some(id) = producer {
                        let (s, _) = match seen.entry(id.store) {
                            Entry::Occupied(e) => e.into_mut(),
                            Entry::Vacant(e) => {
                                e.insert((load_seen(tx, consumer, id.store, window)?, false))
                            }
                        };
                        if s.contains(id.seq) == Some(true) {
                            pos.mark_range(m.done_from, m.position, m.done_below);
                            *changed = true;
                            outcomes.push(Outcome::ProducerDuplicate);
                            continue;
                        }
                    }
                    let mut itx = InboxTx::new(tx, m);
                    if let Err(error) = handler(&mut itx) {
                        return Err(if about_the_message(&error) {
                            Error::Aborted(Box::new(HandlerFailed { index, error }))
                        } else {
                            error
                        });
                    }
                    pos.mark_range(m.done_from, m.position, m.done_below);
                    *changed = true;
                    if let Some(id) = producer
                        && let Some((s, changed)) = seen.get_mut(&id.store)
                    {
                        s.insert(id.seq);
                        *changed = true;
                    }
                    outcomes.push(Outcome::Applied);
                }
                // Acknowledged after this commit: it must be on disk
                // whatever the handler or the store's default chose.
                tx.set_durability(Durability::Sync);
                for ((stream, partition), (pos, changed)) in positions {
                    if changed {
                        tx.put(
                            &POSITIONS,
                            &(consumer.clone(), stream.to_string(), partition),
                            &pos,
                        )?;
                    }
                }
                for (store, (s, changed)) in seen {
                    if changed {
                        tx.put(&SEEN, &(consumer.clone(), store.0.to_vec()), &s)?;
                    }
                }
                Ok(outcomes)
            })
            .await;
        match result {
            Ok((outcomes, commit)) => {
                let received = outcomes
                    .iter()
                    .zip(messages)
                    .filter(|(o, _)| **o == Outcome::Applied)
                    .map(|(_, m)| m.received)
                    .collect();
                Ok(Applying {
                    outcomes,
                    commit: Some((commit, received, self.shared.metrics.clone())),
                })
            }
            Err(Error::Aborted(source)) => match source.downcast::<HandlerFailed>() {
                Ok(failed) => Err(Failed::Message {
                    index: failed.index,
                    error: failed.error,
                }),
                Err(other) => Err(Failed::Message {
                    index: 0,
                    error: Error::Aborted(other),
                }),
            },
            Err(e) if about_the_message(&e) => Err(Failed::Message { index: 0, error: e }),
            Err(e) => Err(Failed::Store(e)),
        }
    }

    /// Records that `stream`'s positions are kept with subject filter
    /// `filter`, or fails with [`Error::InvalidArgument`] when they were
    /// kept with another one (the positions' ranges would skip the new
    /// filter's messages in the old one's gaps).
    #[cfg(feature = "nats")]
    pub(crate) async fn pin_filter(&self, stream: &str, filter: &str) -> Result<()> {
        let key = (self.shared.consumer.clone(), stream.to_string());
        let pinned = self
            .shared
            .store
            .write_async(|tx| {
                tx.set_durability(Durability::Sync);
                match tx.get_for_update(&FILTERS, &key)? {
                    Some(f) => Ok(Some(f)),
                    None => {
                        tx.put(&FILTERS, &key, &filter.to_string())?;
                        Ok(None)
                    }
                }
            })
            .await?
            .value;
        match pinned {
            Some(f) if f != filter => Err(Error::InvalidArgument(format!(
                "inbox {:?}: the positions of {stream:?} were kept with subject filter {f:?}, not {filter:?}; \
                 a changed filter needs a new durable consumer name",
                self.shared.consumer
            ))),
            _ => Ok(()),
        }
    }

    /// The key of a dead letter (and of its queued replay) of this
    /// consumer.
    fn dead_key(&self, stream: &str, partition: u32, position: u64) -> (String, String, u32, u64) {
        (
            self.shared.consumer.clone(),
            stream.to_string(),
            partition,
            position,
        )
    }

    /// The consumer's position in `partition` of `stream`, if it has one.
    pub fn position(&self, stream: &str, partition: u32) -> Result<Option<Position>> {
        self.shared.store.get(
            &POSITIONS,
            &(self.shared.consumer.clone(), stream.to_string(), partition),
        )
    }

    /// Every position of the consumer: (stream, partition, position), in
    /// key order.
    pub fn positions(&self) -> Result<Vec<(String, u32, Position)>> {
        self.shared
            .store
            .prefix(&POSITIONS, &(self.shared.consumer.clone(),))?
            .map(|row| row.map(|((_, s, p), pos)| (s, p, pos)))
            .collect()
    }

    /// How many records the consumer keeps (positions and producer
    /// windows), and the ranges done above their watermarks, summed: the
    /// inbox's whole footprint, for checks and dashboards.
    pub fn footprint(&self) -> Result<(usize, usize)> {
        let positions = self.positions()?;
        let above = positions.iter().map(|(_, _, p)| p.done.len()).sum();
        let windows = self
            .shared
            .store
            .prefix(&SEEN, &(self.shared.consumer.clone(),))?
            .count();
        Ok((positions.len() + windows, above))
    }

    /// The consumer's dead letters, in (stream, partition, position) order.
    pub fn dead_letters(&self) -> Result<Vec<InboxDeadLetter>> {
        self.shared
            .store
            .prefix(&DEAD, &(self.shared.consumer.clone(),))?
            .map(|row| row.map(|(_, d)| d))
            .collect()
    }

    /// Applies the dead letter at `position` of `partition` of `stream`
    /// again with `handler`, and deletes it in the same commit. `Ok(false)`
    /// when there is no such dead letter (already replayed or purged). A
    /// handler error is returned and the dead letter stays.
    pub async fn replay_dead<F>(
        &self,
        stream: &str,
        partition: u32,
        position: u64,
        mut handler: F,
    ) -> Result<bool>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        let key = self.dead_key(stream, partition, position);
        let Some(dead) = self.shared.store.get(&DEAD, &key)? else {
            return Ok(false);
        };
        if dead.truncated {
            return Err(not_kept(&self.shared.consumer, &dead));
        }
        let message = dead.message();
        let done = self
            .shared
            .store
            .write_async(|tx| {
                // Read for update: two replays of one dead letter conflict,
                // and the second finds it gone.
                if !tx.contains_for_update(&DEAD, &key)? {
                    return Ok(false);
                }
                handler(&mut InboxTx::new(tx, &message))?;
                tx.delete(&DEAD, &key)?;
                Ok(true)
            })
            .await?;
        Ok(done.value)
    }

    /// Queues the dead letter at `position` of `partition` of `stream` for
    /// replay: it moves (in one commit) to the replay queue, which
    /// [`Inbox::replay_queued`] applies (readers do when they start).
    /// `Ok(false)` when there is no such dead letter. This is what
    /// `outbox-relay inbox replay` does, with the service stopped.
    pub fn queue_replay(&self, stream: &str, partition: u32, position: u64) -> Result<bool> {
        let key = self.dead_key(stream, partition, position);
        let done = self.shared.store.write(|tx| {
            let Some(dead) = tx.get_for_update(&DEAD, &key)? else {
                return Ok(false);
            };
            if dead.truncated {
                return Err(not_kept(&self.shared.consumer, &dead));
            }
            tx.delete(&DEAD, &key)?;
            tx.put(&REPLAY, &key, &dead)?;
            Ok(true)
        })?;
        Ok(done.value)
    }

    /// The dead letters queued for replay.
    pub fn queued_replays(&self) -> Result<Vec<InboxDeadLetter>> {
        self.shared
            .store
            .prefix(&REPLAY, &(self.shared.consumer.clone(),))?
            .map(|row| row.map(|(_, d)| d))
            .collect()
    }

    /// Applies every queued replay with `handler`, each in one commit with
    /// its removal from the queue; one the handler fails on goes back to
    /// the dead letters with the new error (in one commit too). Returns
    /// (applied, failed). Store failures are returned.
    pub async fn replay_queued<F>(&self, handler: F) -> Result<(usize, usize)>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        self.replay_queued_of(|_| true, handler).await
    }

    /// [`replay_queued`](Inbox::replay_queued) for the streams `mine`
    /// accepts: a reader replays only what its handler is for.
    pub(crate) async fn replay_queued_of<F>(
        &self,
        mine: impl Fn(&str) -> bool,
        mut handler: F,
    ) -> Result<(usize, usize)>
    where
        F: FnMut(&mut InboxTx<'_, '_>) -> Result<()>,
    {
        let (mut applied, mut failed) = (0, 0);
        for dead in self.queued_replays()? {
            if !mine(&dead.stream) {
                continue;
            }
            let key = self.dead_key(&dead.stream, dead.partition, dead.position);
            let message = dead.message();
            let result = self
                .shared
                .store
                .write_async(|tx| {
                    if !tx.contains_for_update(&REPLAY, &key)? {
                        return Ok(false);
                    }
                    handler(&mut InboxTx::new(tx, &message))?;
                    tx.delete(&REPLAY, &key)?;
                    Ok(true)
                })
                .await;
            match result {
                Ok(c) if c.value => applied += 1,
                Ok(_) => {}
                Err(e) if about_the_message(&e) => {
                    let error = e.to_string();
                    self.shared.store.write(|tx| {
                        let Some(mut d) = tx.get_for_update(&REPLAY, &key)? else {
                            return Ok(());
                        };
                        tx.delete(&REPLAY, &key)?;
                        d.error = error.clone();
                        d.attempts = d.attempts.saturating_add(1);
                        tx.put(&DEAD, &key, &d)
                    })?;
                    failed += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if applied + failed > 0 {
            tracing::info!(consumer = %self.shared.consumer, applied, failed, "inbox replays applied");
        }
        Ok((applied, failed))
    }

    /// Deletes the dead letter at `position` of `partition` of `stream`;
    /// `Ok(false)` when there is none.
    pub fn purge_dead(&self, stream: &str, partition: u32, position: u64) -> Result<bool> {
        let key = self.dead_key(stream, partition, position);
        let done = self.shared.store.write(|tx| {
            if !tx.contains_for_update(&DEAD, &key)? {
                return Ok(false);
            }
            tx.delete(&DEAD, &key)?;
            Ok(true)
        })?;
        Ok(done.value)
    }
}

fn load_position(tx: &mut WriteTx<'_>, key: &(String, String, u32)) -> Result<Position> {
    match tx.get_for_update(&POSITIONS, key)? {
        None => Ok(Position::default()),
        Some(p) if p.valid() => Ok(p),
        Some(p) => Err(Error::corruption(
            format!(
                "inbox position of consumer {:?}, stream {:?}, partition {}",
                key.0, key.1, key.2
            ),
            format!(
                "done ranges {:?} are not ascending and apart above {}",
                p.done.iter().take(8).collect::<Vec<_>>(),
                p.next
            ),
        )),
    }
}

fn load_seen(tx: &mut WriteTx<'_>, consumer: &str, store: StoreId, window: u32) -> Result<Seen> {
    let key = (consumer.to_string(), store.0.to_vec());
    match tx.get_for_update(&SEEN, &key)? {
        Some(s) if s.valid() && s.window == Seen::new(window).window => Ok(s),
        Some(s) if s.valid() => {
            // The window was resized: start over (seqs before count as
            // unknown, so nothing is dropped).
            let mut fresh = Seen::new(window);
            fresh.max = s.max;
            Ok(fresh)
        }
        Some(_) => Err(Error::corruption(
            format!("inbox producer window of consumer {consumer:?}, store {store}"),
            "window size and bits disagree",
        )),
        None => Ok(Seen::new(window)),
    }
}

/// Replaying a dead letter whose message was not kept.
fn not_kept(consumer: &str, dead: &InboxDeadLetter) -> Error {
    Error::InvalidArgument(format!(
        "inbox {consumer:?}: the dead letter at {}/{}/{} did not keep its message (too large); \
         fetch it from the broker instead",
        dead.stream, dead.partition, dead.position
    ))
}
