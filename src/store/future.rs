//! Async commits: [`Store::write_async`], [`WriteTx::commit_async`],
//! [`Batch::commit_async`] and the [`CommitFuture`] they wait with.
//!
//! An async commit does on the caller's task what needs no waiting for the
//! disk: the transaction's closure, building the batch, and the few
//! microseconds of ordering it in the commit pipeline (conflict validation,
//! seqs). The group write and the fsync are then done by the store's two
//! commit threads, and the caller's task waits for them as a future: no
//! worker of its runtime is blocked meanwhile, and thousands of tasks can
//! wait for one fsync. Async and blocking commits share one pipeline and
//! one group commit.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::commit::SlotWait;
use super::handle::Store;
#[cfg(doc)]
use super::tx::Batch;
use super::tx::{Committed, WriteTx};
use crate::error::{Error, Result};
use crate::outbox::entry::StoreId;

/// A commit on its way to disk: what [`WriteTx::commit_async`] and
/// [`Batch::commit_async`] return. It resolves like their blocking
/// `commit` returns: once the commit is written, and for a
/// [`Durability::Sync`](crate::Durability::Sync) commit fsynced.
///
/// The commit was validated and ordered before the future was returned:
/// dropping it does not cancel the commit, which is written (or fails with
/// the store) either way; you only do not learn which. A commit refused at
/// once (a conflict, a limit) resolves at the first poll.
///
/// `CommitFuture` is `Send`, `'static` and runtime-agnostic: any executor
/// can poll it, and it may be moved to another task.
///
/// ```
/// use outboxkv::{Event, Store, Table};
/// const STOCK: Table<str, u32> = Table::new("stock");
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let runtime = tokio::runtime::Builder::new_current_thread().build()?;
/// runtime.block_on(async {
///     let mut tx = store.begin();
///     let left = tx.get_for_update(&STOCK, "apples")?.unwrap_or(10);
///     tx.put(&STOCK, "apples", &(left - 1))?;
///     tx.emit(Event::bytes("stock.taken", "apples", b"1".to_vec()))?;
///     let committed = tx.commit_async().await?;
///     assert_eq!(committed.seqs, 1..2);
///     Ok::<_, outboxkv::Error>(())
/// })?;
/// assert_eq!(store.get(&STOCK, "apples")?, Some(9));
/// # Ok(())
/// # }
/// ```
#[must_use = "the commit is made whether or not this is awaited; await it to learn its outcome"]
pub struct CommitFuture {
    pub(super) state: CommitState,
}

pub(super) enum CommitState {
    /// Decided before it was queued (an error, or nothing to commit);
    /// `None` once taken.
    Ready(Option<Result<Committed<()>>>),
    /// Queued: the outcome is set on the slot.
    Waiting {
        wait: SlotWait,
        seqs: Range<u64>,
        store: StoreId,
    },
}

impl CommitFuture {
    pub(super) fn ready(result: Result<Committed<()>>) -> CommitFuture {
        CommitFuture {
            state: CommitState::Ready(Some(result)),
        }
    }

    /// The error of a commit refused before it was queued (a conflict, a
    /// limit), taken out; `None` for a queued (or empty) commit.
    fn refused(&mut self) -> Option<Error> {
        match &mut self.state {
            CommitState::Ready(r @ Some(Err(_))) => r.take().and_then(Result::err),
            _ => None,
        }
    }
}

impl std::fmt::Debug for CommitFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            CommitState::Ready(r) => f
                .debug_struct("CommitFuture")
                .field("decided", &r.as_ref().map(Result::is_ok))
                .finish(),
            CommitState::Waiting { seqs, .. } => f
                .debug_struct("CommitFuture")
                .field("queued", &true)
                .field("seqs", seqs)
                .finish(),
        }
    }
}

impl Future for CommitFuture {
    type Output = Result<Committed<()>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            CommitState::Ready(r) => Poll::Ready(r.take().unwrap_or_else(|| {
                Err(Error::InvalidArgument(
                    "a CommitFuture was polled after it resolved".into(),
                ))
            })),
            CommitState::Waiting { wait, seqs, store } => {
                let done = std::task::ready!(Pin::new(wait).poll(cx));
                Poll::Ready(done.map_err(Error::from).map(|()| Committed {
                    value: (),
                    seqs: seqs.clone(),
                    store: *store,
                }))
            }
        }
    }
}

impl Store {
    /// [`Store::write`] for async code: runs `f` in a transaction, commits
    /// it, and retries on conflict exactly as `write` does, with the same
    /// guarantees; but the wait for the group write and its fsync is a
    /// future, so no worker thread of the runtime is blocked while the
    /// commit waits for the disk, and many tasks share one fsync. Works on
    /// a current-thread or a multi-thread runtime, or any other executor.
    ///
    /// What does run on the calling task, and can block it:
    ///
    /// - `f` itself, with its reads (`get`, `get_for_update`, ...): each is
    ///   a RocksDB read, microseconds from the memtable or block cache, up
    ///   to one disk read per level on a cache miss (typically well under a
    ///   millisecond on an SSD, more on a slow or busy disk). Keep `f`
    ///   short, as for `write`.
    /// - ordering the commit: one short critical section (conflict
    ///   validation and seq assignment, microseconds, independent of the
    ///   size of the values), shared with every other committer.
    ///
    /// The writes and fsyncs themselves run on two threads the store
    /// starts at its first async commit (`outboxkv-lead`, `outboxkv-fsync`),
    /// however many tasks commit.
    ///
    /// Dropping the future: while `f` has not returned, nothing happens;
    /// after `f` returned, that attempt's commit is made or refused as if
    /// awaited (see [`CommitFuture`]).
    ///
    /// ```
    /// use outboxkv::{Event, Store, Table};
    /// const COUNTERS: Table<str, u64> = Table::new("counters");
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// // 100 tasks on one hot key: allow more retries than the default 16.
    /// let store = Store::options().max_conflict_retries(10_000).open(dir.path())?;
    /// let runtime = tokio::runtime::Builder::new_multi_thread()
    ///     .worker_threads(2)
    ///     .build()?;
    /// runtime.block_on(async {
    ///     let tasks: Vec<_> = (0..100)
    ///         .map(|_| {
    ///             let store = store.clone();
    ///             tokio::spawn(async move {
    ///                 store
    ///                     .write_async(|tx| {
    ///                         let n = tx.get_for_update(&COUNTERS, "hits")?.unwrap_or(0);
    ///                         tx.put(&COUNTERS, "hits", &(n + 1))?;
    ///                         tx.emit(Event::bytes("hit", "hits", Vec::new()))
    ///                     })
    ///                     .await
    ///             })
    ///         })
    ///         .collect();
    ///     for t in tasks {
    ///         t.await.expect("task")?;
    ///     }
    ///     Ok::<_, outboxkv::Error>(())
    /// })?;
    /// assert_eq!(store.get(&COUNTERS, "hits")?, Some(100));
    /// assert_eq!(store.outbox().head(), 100);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write_async<T, F>(&self, f: F) -> Result<Committed<T>>
    where
        F: FnMut(&mut WriteTx<'_>) -> Result<T>,
    {
        let (value, commit) = self.order_with_retries(f).await?;
        Ok(commit.await?.map(value))
    }

    /// Runs `f` in a transaction and orders its commit like
    /// [`Store::write_async`] (retrying conflicts the same way), but
    /// returns once the commit is ordered and visible to later
    /// transactions, with the future of its write and fsync. A transaction
    /// begun after this returns sees the commit, so a caller can prepare
    /// its next commit while this one's fsync runs (commits are written and
    /// fsynced in the order they were ordered: if the later one is on disk,
    /// so is this one).
    pub(crate) async fn write_ordered<T, F>(&self, f: F) -> Result<(T, CommitFuture)>
    where
        F: FnMut(&mut WriteTx<'_>) -> Result<T>,
    {
        let ordered = self.order_with_retries(f).await?;
        self.inner.pipeline.visible().await;
        Ok(ordered)
    }

    /// Runs `f` and orders its commit, retrying a conflict (on a snapshot
    /// that includes the conflicting write) up to `max_conflict_retries`
    /// times.
    async fn order_with_retries<T, F>(&self, mut f: F) -> Result<(T, CommitFuture)>
    where
        F: FnMut(&mut WriteTx<'_>) -> Result<T>,
    {
        let mut attempt = 0;
        loop {
            let (mut commit, value) = {
                let mut tx = self.begin();
                let value = f(&mut tx)?;
                (tx.commit_async(), value)
            };
            match commit.refused() {
                None => return Ok((value, commit)),
                Some(Error::Conflict { .. }) if attempt < self.inner.opts.max_conflict_retries => {
                    attempt += 1;
                    // Retry on a snapshot that includes the conflicting
                    // write, waiting for it without blocking.
                    self.inner.pipeline.visible().await;
                }
                Some(Error::TransactionExpired {
                    limit: "max_conflict_index_keys",
                    ..
                }) if attempt < self.inner.opts.max_conflict_retries => {
                    attempt += 1;
                }
                Some(e) => return Err(e),
            }
        }
    }
}
