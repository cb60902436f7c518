//! Write transactions and blind-write batches.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::ops::Range;

use rocksdb::{DB, SnapshotWithThreadMode, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::commit::{BATCH_HEADER, ReadRecord, Registration, Request};
use super::engine::{CF_DEAD, CF_TABLES};
use super::future::{CommitFuture, CommitState};
use super::handle::Store;
use super::key::{Key, render};
use super::options::Durability;
use super::read::{Snapshot, decode_stored};
use super::table::{Table, full_key};
use super::value::encode_value;
use crate::error::{Error, Result};
use crate::outbox::entry::{EncodedEntries, EventId, StoreId};
use crate::outbox::event::Event;

/// What a successful commit returns: the closure's value and the outbox seqs
/// the commit's events were given (empty when it emitted none).
///
/// ```
/// # use outboxkv::{Event, Store};
/// # let dir = tempfile::tempdir()?;
/// # let store = Store::open(dir.path())?;
/// let committed = store.write(|tx| {
///     tx.emit(Event::bytes("pings", "k", b"1".to_vec()))?;
///     tx.emit(Event::bytes("pings", "k", b"2".to_vec()))?;
///     Ok("done")
/// })?;
/// assert_eq!(committed.value, "done");
/// assert_eq!(committed.seqs, 1..3);
/// assert_eq!(committed.event_ids().count(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    /// What the transaction closure returned.
    pub value: T,
    /// Seqs assigned to the emitted events, in emit order.
    pub seqs: Range<u64>,
    pub(super) store: StoreId,
}

impl Committed<()> {
    fn empty(store: StoreId) -> Committed<()> {
        Committed {
            value: (),
            seqs: 0..0,
            store,
        }
    }
}

impl<T> Committed<T> {
    /// The ids of the emitted events, in emit order.
    pub fn event_ids(&self) -> impl Iterator<Item = EventId> + '_ {
        self.seqs.clone().map(|seq| EventId {
            store: self.store,
            seq,
        })
    }

    pub(super) fn map<U>(self, value: U) -> Committed<U> {
        Committed {
            value,
            seqs: self.seqs,
            store: self.store,
        }
    }
}

/// The writes of a transaction, in the order they were made. Writing a key
/// twice keeps both: RocksDB applies a batch in order, so the last one wins,
/// and reads look for the last one. Small sets are searched backwards; a set
/// that grows past `INDEX_AT` writes gets a hash index, so large batches that
/// also read stay linear.
#[derive(Default)]
pub(crate) struct WriteSet {
    /// Full key, encoded value (`None`: a delete), and the key's hash in
    /// the conflict index (taken here, outside the pipeline's lock).
    entries: Vec<(Vec<u8>, Option<Vec<u8>>, u64)>,
    index: Option<HashMap<Vec<u8>, usize>>,
}

impl WriteSet {
    const INDEX_AT: usize = 32;

    fn insert(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, hash: u64) {
        let at = self.entries.len();
        match &mut self.index {
            Some(index) => {
                index.insert(key.clone(), at);
            }
            None if at >= Self::INDEX_AT => {
                let mut index: HashMap<Vec<u8>, usize> = self
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _, _))| (k.clone(), i))
                    .collect();
                index.insert(key.clone(), at);
                self.index = Some(index);
            }
            None => {}
        }
        self.entries.push((key, value, hash));
    }

    /// The last write of `key`: `Some(None)` for a delete.
    fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        match &self.index {
            Some(index) => index
                .get(key)
                .and_then(|&i| self.entries.get(i))
                .map(|(_, v, _)| v),
            None => self
                .entries
                .iter()
                .rev()
                .find(|(k, _, _)| k == key)
                .map(|(_, v, _)| v),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The conflict-index hashes of the keys written.
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|&(_, _, h)| h)
    }
}

/// Writes and events staged by a transaction or batch.
struct Staged<'s> {
    store: &'s Store,
    /// Full key → encoded value, or `None` for a delete.
    writes: WriteSet,
    events: Vec<Event>,
    durability: Durability,
}

impl<'s> Staged<'s> {
    fn new(store: &'s Store) -> Self {
        Staged {
            store,
            writes: WriteSet::default(),
            events: Vec::new(),
            durability: store.inner.opts.durability,
        }
    }

    fn key<K: Key + ?Sized, V>(&self, table: &Table<K, V>, key: &K) -> Result<Vec<u8>> {
        let full = full_key(table, key)?;
        let limit = self.store.inner.opts.max_key_size;
        let size = full.len() - table.name().len() - 1;
        if size > limit {
            return Err(Error::TooLarge {
                what: "key",
                location: format!("table {:?} key {key:?}", table.name()),
                size,
                limit,
            });
        }
        Ok(full)
    }

    fn put<K: Key + ?Sized, V: Serialize>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
        value: &V,
    ) -> Result<()> {
        let full = self.key(table, key)?;
        let mut bytes = Vec::new();
        encode_value(value, &mut bytes).map_err(|e| Error::Encode {
            what: format!("value for table {:?} key {key:?}", table.name()),
            source: Box::new(e),
        })?;
        let limit = self.store.inner.opts.max_value_size;
        if bytes.len() > limit {
            return Err(Error::TooLarge {
                what: "value",
                location: format!("table {:?} key {key:?}", table.name()),
                size: bytes.len(),
                limit,
            });
        }
        let hash = self.store.inner.key_hasher.hash_one(&full);
        self.writes.insert(full, Some(bytes), hash);
        Ok(())
    }

    fn delete<K: Key + ?Sized, V>(&mut self, table: &Table<K, V>, key: &K) -> Result<()> {
        let full = self.key(table, key)?;
        let hash = self.store.inner.key_hasher.hash_one(&full);
        self.writes.insert(full, None, hash);
        Ok(())
    }

    fn emit(&mut self, event: Event) -> Result<()> {
        event.validate(self.store.inner.opts.max_event_size)?;
        self.events.push(event);
        Ok(())
    }

    /// About the size of the RocksDB batch this commit makes (its writes and
    /// encoded outbox entries, with record overheads), so that the batch is
    /// allocated once.
    fn batch_bytes(&self) -> usize {
        const RECORD: usize = 12; // tag, column family, two varint lengths
        let writes: usize = self
            .writes
            .entries
            .iter()
            .map(|(k, v, _)| RECORD + k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        BATCH_HEADER + writes + EncodedEntries::batch_bytes(&self.events)
    }

    /// Commits the staged writes and events. Everything that depends only
    /// on them (the batch, key hashes, encoded entries) is done here, before
    /// the pipeline's lock is taken. `reader` (the transaction's
    /// registration, if it read) is released on every path, including
    /// errors here.
    fn commit(
        self,
        reader: Option<Registration<'s>>,
        reads: &[ReadRecord],
    ) -> Result<Committed<()>> {
        let inner = &self.store.inner;
        let store = inner.meta.store_id;
        let Some((batch, entries)) = self.build()? else {
            return Ok(Committed::empty(store));
        };
        let assigned = inner.pipeline.commit(
            inner,
            Request {
                reader,
                reads,
                writes: &self.writes,
                batch,
                entries,
                sync: self.durability == Durability::Sync,
            },
        )?;
        Ok(Committed {
            value: (),
            seqs: assigned.seqs,
            store,
        })
    }

    /// Like [`Staged::commit`], but the wait for the write and fsync is the
    /// future returned (see [`Pipeline::commit_async`](super::commit::Pipeline::commit_async)).
    fn commit_async(self, reader: Option<Registration<'s>>, reads: &[ReadRecord]) -> CommitFuture {
        let inner = &self.store.inner;
        let store = inner.meta.store_id;
        let (batch, entries) = match self.build() {
            Ok(Some(built)) => built,
            Ok(None) => return CommitFuture::ready(Ok(Committed::empty(store))),
            Err(e) => return CommitFuture::ready(Err(e)),
        };
        let ordered = inner.pipeline.commit_async(
            inner.arc(),
            Request {
                reader,
                reads,
                writes: &self.writes,
                batch,
                entries,
                sync: self.durability == Durability::Sync,
            },
        );
        match ordered {
            Ok((wait, seqs)) => CommitFuture {
                state: CommitState::Waiting { wait, seqs, store },
            },
            Err(e) => CommitFuture::ready(Err(e)),
        }
    }

    /// The commit's RocksDB batch (its table writes) and its encoded outbox
    /// entries; `None` for a commit with nothing in it.
    fn build(&self) -> Result<Option<(WriteBatch, EncodedEntries)>> {
        let inner = &self.store.inner;
        let store = inner.meta.store_id;
        if self.writes.len() == 0 && self.events.is_empty() {
            return Ok(None);
        }
        let size = self.batch_bytes();
        if size > inner.opts.max_transaction_bytes {
            return Err(Error::TooLarge {
                what: "transaction",
                location: format!(
                    "{} writes and {} events in one commit",
                    self.writes.len(),
                    self.events.len()
                ),
                size,
                limit: inner.opts.max_transaction_bytes,
            });
        }
        let tables = inner.cf(CF_TABLES)?;
        let mut batch = WriteBatch::with_capacity_bytes(size);
        for (key, value, _) in &self.writes.entries {
            match value {
                Some(v) => batch.put_cf(tables, key, v),
                None => batch.delete_cf(tables, key),
            }
        }
        let entries = EncodedEntries::encode(&self.events, store);
        Ok(Some((batch, entries)))
    }
}

/// A read-modify-write transaction; get one from [`Store::write`] (which
/// retries on conflict) or [`Store::begin`].
///
/// Reads see one consistent snapshot, taken at the first read, plus the
/// transaction's own writes. Keys read with [`get_for_update`] are checked at
/// commit: if another transaction committed a change to one of them after
/// this snapshot, the commit fails with [`Error::Conflict`] and writes
/// nothing. That makes read-modify-write serializable. Plain [`get`] reads
/// are not checked (snapshot isolation): use `get_for_update` for every
/// value your writes depend on.
///
/// Dropping a transaction without committing discards it.
///
/// A transaction that has read holds the history of later commits in
/// memory until it ends, so keep it short: one with writes and validated
/// reads that stays open longer than
/// [`StoreOptions::max_transaction_age`](crate::StoreOptions::max_transaction_age)
/// (default 30 s) fails to commit with [`Error::TransactionExpired`] (a
/// read-only one has nothing to commit, and still succeeds).
///
/// [`get_for_update`]: WriteTx::get_for_update
/// [`get`]: WriteTx::get
///
/// ```
/// use outboxkv::{Error, Store, Table};
/// const COUNTERS: Table<str, u64> = Table::new("counters");
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let mut a = store.begin();
/// let mut b = store.begin();
/// let va = a.get_for_update(&COUNTERS, "hits")?.unwrap_or(0);
/// let vb = b.get_for_update(&COUNTERS, "hits")?.unwrap_or(0);
/// a.put(&COUNTERS, "hits", &(va + 1))?;
/// b.put(&COUNTERS, "hits", &(vb + 1))?;
/// a.commit()?;
/// assert!(matches!(b.commit(), Err(Error::Conflict { .. })));
/// assert_eq!(store.get(&COUNTERS, "hits")?, Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct WriteTx<'s> {
    staged: Staged<'s>,
    /// The snapshot (taken at the first read) and the registration that
    /// validation needs; dropping the transaction releases both.
    view: Option<(SnapshotWithThreadMode<'s, DB>, Registration<'s>)>,
    reads: Vec<ReadRecord>,
}

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("writes", &self.staged.writes.len())
            .field("events", &self.staged.events.len())
            .field("reads", &self.reads.len())
            .finish_non_exhaustive()
    }
}

impl<'s> WriteTx<'s> {
    pub(crate) fn new(store: &'s Store) -> Self {
        WriteTx {
            staged: Staged::new(store),
            view: None,
            reads: Vec::new(),
        }
    }

    fn snapshot(&mut self) -> Snapshot<'_> {
        let store = self.staged.store;
        let (snap, _) = self.view.get_or_insert_with(|| {
            // Register first: the snapshot then shows at least the version
            // the registration validates from.
            let reader = store.inner.pipeline.begin_read();
            (store.inner.db.snapshot(), reader)
        });
        Snapshot::borrowed(&store.inner, snap)
    }

    fn track<K: Key + ?Sized, V>(&mut self, table: &Table<K, V>, full: &[u8]) {
        let inner = &self.staged.store.inner;
        self.reads.push(ReadRecord {
            hash: inner.key_hasher.hash_one(full),
            table: table.name(),
            key: full[table.name().len() + 1..].to_vec(),
            render: render::<K>,
        });
    }

    fn read<K: Key + ?Sized, V: DeserializeOwned>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
        track: bool,
    ) -> Result<Option<V>> {
        let full = full_key(table, key)?;
        if track {
            self.track(table, &full);
        }
        if let Some(own) = self.staged.writes.get(&full) {
            return match own {
                Some(bytes) => decode_stored::<K, V>(table.name(), &full, bytes).map(Some),
                None => Ok(None),
            };
        }
        self.snapshot().get_full::<K, V>(table.name(), &full)
    }

    /// Reads a value at the transaction's snapshot (or its own write), without
    /// conflict tracking.
    pub fn get<K: Key + ?Sized, V: DeserializeOwned>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
    ) -> Result<Option<V>> {
        self.read(table, key, false)
    }

    /// Reads a value and records the read: if another transaction commits a
    /// change to this key before this one commits, this commit fails with
    /// [`Error::Conflict`] (and [`Store::write`] runs the closure again).
    pub fn get_for_update<K: Key + ?Sized, V: DeserializeOwned>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
    ) -> Result<Option<V>> {
        self.read(table, key, true)
    }

    /// Whether the key exists at the snapshot (or in the transaction's own
    /// writes). Not validated at commit (snapshot isolation): for
    /// insert-if-absent use [`contains_for_update`](WriteTx::contains_for_update).
    pub fn contains<K: Key + ?Sized, V>(&mut self, table: &Table<K, V>, key: &K) -> Result<bool> {
        self.exists(table, key, false)
    }

    /// Whether the key exists, like [`contains`](WriteTx::contains), and
    /// records the read like [`get_for_update`](WriteTx::get_for_update): if
    /// another transaction writes or deletes the key before this one
    /// commits, the commit fails with [`Error::Conflict`]. That makes
    /// insert-if-absent safe: of two transactions that both find a key
    /// absent and insert it, one commits and the other conflicts.
    ///
    /// ```
    /// use outboxkv::{Error, Store, Table};
    /// const USERS: Table<str, u64> = Table::new("users");
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// let mut a = store.begin();
    /// let mut b = store.begin();
    /// assert!(!a.contains_for_update(&USERS, "ada")?);
    /// assert!(!b.contains_for_update(&USERS, "ada")?);
    /// a.put(&USERS, "ada", &1)?;
    /// b.put(&USERS, "ada", &2)?;
    /// a.commit()?;
    /// assert!(matches!(b.commit(), Err(Error::Conflict { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn contains_for_update<K: Key + ?Sized, V>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
    ) -> Result<bool> {
        self.exists(table, key, true)
    }

    fn exists<K: Key + ?Sized, V>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
        track: bool,
    ) -> Result<bool> {
        let full = full_key(table, key)?;
        if track {
            self.track(table, &full);
        }
        if let Some(own) = self.staged.writes.get(&full) {
            return Ok(own.is_some());
        }
        self.snapshot().contains_full(&full)
    }

    /// Stages a write of `value` under `key`. Fails with [`Error::TooLarge`]
    /// past the key or value size limit.
    pub fn put<K: Key + ?Sized, V: Serialize>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
        value: &V,
    ) -> Result<()> {
        self.staged.put(table, key, value)
    }

    /// Stages a delete of `key` (deleting a missing key is not an error).
    pub fn delete<K: Key + ?Sized, V>(&mut self, table: &Table<K, V>, key: &K) -> Result<()> {
        self.staged.delete(table, key)
    }

    /// Appends an event to the outbox as part of this transaction. Its seq and
    /// id are assigned at commit. Fails with [`Error::TooLarge`] past the event
    /// size limit, [`Error::InvalidEvent`] for a malformed event (see [`Event`]).
    pub fn emit(&mut self, event: Event) -> Result<()> {
        self.staged.emit(event)
    }

    /// Overrides the store's default durability for this commit.
    pub fn set_durability(&mut self, durability: Durability) {
        self.staged.durability = durability;
    }

    /// Commits atomically: every write and every event, or nothing. Fails
    /// with [`Error::Conflict`] when a key read with `get_for_update` changed
    /// meanwhile (not retried here; [`Store::write`] retries).
    ///
    /// Fails with [`Error::TransactionExpired`] when the transaction read
    /// keys to validate and stayed open past the store's limits, and with
    /// [`Error::TooLarge`] past
    /// [`max_transaction_bytes`](crate::StoreOptions::max_transaction_bytes).
    pub fn commit(self) -> Result<Committed<()>> {
        let (staged, reader, reads) = self.into_parts();
        staged.commit(reader, &reads)
    }

    /// What a commit needs of the transaction: its staged writes, its
    /// reader registration and the keys it read. The RocksDB snapshot is
    /// not needed any more (dropped here); the registration is.
    fn into_parts(self) -> (Staged<'s>, Option<Registration<'s>>, Vec<ReadRecord>) {
        let WriteTx {
            staged,
            view,
            reads,
        } = self;
        let reader = view.map(|(snapshot, reader)| {
            drop(snapshot);
            reader
        });
        (staged, reader, reads)
    }

    /// [`commit`](WriteTx::commit) for async code: validates and orders
    /// the commit now (a conflict or a limit is known at once), and returns
    /// a future that resolves once the commit is written and, if `Sync`,
    /// fsynced, without blocking the runtime meanwhile. Not retried on
    /// conflict ([`Store::write_async`] retries). See [`CommitFuture`] for
    /// what dropping it does.
    pub fn commit_async(self) -> CommitFuture {
        let (staged, reader, reads) = self.into_parts();
        staged.commit_async(reader, &reads)
    }
}

/// A blind-write batch: puts, deletes and events committed atomically with no
/// reads and so no conflict checks. Get one from [`Store::batch`].
///
/// ```
/// use outboxkv::{Event, Store, Table};
/// const SEEN: Table<u64, bool> = Table::new("seen");
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let mut batch = store.batch();
/// batch.put(&SEEN, &7, &true)?;
/// batch.emit(Event::bytes("seen", "7", Vec::new()))?;
/// let committed = batch.commit()?;
/// assert_eq!(committed.seqs, 1..2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Batch<'s> {
    staged: Staged<'s>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("writes", &self.staged.writes.len())
            .field("events", &self.staged.events.len())
            .finish()
    }
}

impl<'s> Batch<'s> {
    /// Stages a write.
    pub fn put<K: Key + ?Sized, V: Serialize>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
        value: &V,
    ) -> Result<()> {
        self.staged.put(table, key, value)
    }

    /// Stages a delete.
    pub fn delete<K: Key + ?Sized, V>(&mut self, table: &Table<K, V>, key: &K) -> Result<()> {
        self.staged.delete(table, key)
    }

    /// Stages an event.
    pub fn emit(&mut self, event: Event) -> Result<()> {
        self.staged.emit(event)
    }

    /// Overrides the store's default durability for this commit.
    pub fn set_durability(&mut self, durability: Durability) {
        self.staged.durability = durability;
    }

    /// Commits atomically.
    pub fn commit(self) -> Result<Committed<()>> {
        self.staged.commit(None, &[])
    }

    /// Commits atomically, for async code: the wait for the write and the
    /// fsync is the [`CommitFuture`] returned (see
    /// [`WriteTx::commit_async`]).
    ///
    /// ```
    /// # use outboxkv::{Event, Store, Table};
    /// # const SEEN: Table<u64, bool> = Table::new("seen");
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path())?;
    /// # let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    /// let mut batch = store.batch();
    /// batch.put(&SEEN, &7, &true)?;
    /// batch.emit(Event::bytes("seen", "7", Vec::new()))?;
    /// let committed = runtime.block_on(batch.commit_async())?;
    /// assert_eq!(committed.seqs, 1..2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn commit_async(self) -> CommitFuture {
        self.staged.commit_async(None, &[])
    }
}

/// The open transactions of a store, as [`Store::transaction_stats`]
/// reports them: for a gauge of the oldest open transaction, and to see
/// what holds the conflict index's memory.
///
/// ```
/// use outboxkv::{Store, Table};
/// const T: Table<u32, u32> = Table::new("t");
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let mut tx = store.begin();
/// tx.get_for_update(&T, &1)?;
/// let stats = store.transaction_stats();
/// assert_eq!(stats.open, 1);
/// assert!(stats.oldest_open_for.is_some());
/// drop(tx);
/// assert_eq!(store.transaction_stats().open, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TransactionStats {
    /// Transactions that have read and not yet ended, expired ones
    /// included (up to 4,096 of those).
    pub open: usize,
    /// How long the oldest of them has been open (since its first read).
    pub oldest_open_for: Option<std::time::Duration>,
    /// Write records the conflict index holds for them (see
    /// [`StoreOptions::max_conflict_index_keys`](crate::StoreOptions::max_conflict_index_keys)).
    pub conflict_index_keys: usize,
    /// Transactions expired since the store was opened.
    pub expired: u64,
}

impl Store {
    /// The store's open transactions: how many, the age of the oldest, and
    /// what they hold.
    pub fn transaction_stats(&self) -> TransactionStats {
        let s = self.inner.pipeline.conflict_stats();
        TransactionStats {
            open: s.readers,
            oldest_open_for: s.oldest.map(|t| t.elapsed()),
            conflict_index_keys: s.records,
            expired: s.expired,
        }
    }
}

impl Store {
    /// Runs `f` in a transaction and commits it atomically, retrying the
    /// whole closure (up to `max_conflict_retries` times) when the commit
    /// conflicts with a concurrent one, or was expired because the conflict
    /// index outgrew
    /// [`max_conflict_index_keys`](crate::StoreOptions::max_conflict_index_keys)
    /// while it was open (a bulk commit beside it, not its own fault); a
    /// transaction that outlived
    /// [`max_transaction_age`](crate::StoreOptions::max_transaction_age) is
    /// not retried. `f` may run more than once: keep side effects out of
    /// it. An error returned by `f` aborts the transaction and is returned
    /// as is (wrap your own errors with [`Error::abort`]).
    pub fn write<T, F>(&self, mut f: F) -> Result<Committed<T>>
    where
        F: FnMut(&mut WriteTx<'_>) -> Result<T>,
    {
        let mut attempt = 0;
        loop {
            let mut tx = self.begin();
            let value = f(&mut tx)?;
            match tx.commit() {
                Ok(c) => return Ok(c.map(value)),
                Err(Error::Conflict { .. }) if attempt < self.inner.opts.max_conflict_retries => {
                    attempt += 1;
                    // Retry on a snapshot that includes the conflicting write.
                    self.inner.pipeline.wait_visible();
                }
                Err(Error::TransactionExpired {
                    limit: "max_conflict_index_keys",
                    ..
                }) if attempt < self.inner.opts.max_conflict_retries => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a transaction that you commit yourself (no automatic retry).
    pub fn begin(&self) -> WriteTx<'_> {
        WriteTx::new(self)
    }

    /// Starts a blind-write batch (no reads, no conflict checks).
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            staged: Staged::new(self),
        }
    }
}

impl Store {
    /// Commits replayed dead letters: appends `events` to the outbox and
    /// deletes the dead letters `dead_seqs`, atomically.
    pub(crate) fn commit_replay(
        &self,
        events: Vec<Event>,
        dead_seqs: &[u64],
    ) -> Result<Range<u64>> {
        let inner = &self.inner;
        // The entries, plus a delete record (tag, family, length, key) per
        // dead letter.
        let size = BATCH_HEADER + EncodedEntries::batch_bytes(&events) + 12 * dead_seqs.len();
        if size > inner.opts.max_transaction_bytes {
            return Err(Error::TooLarge {
                what: "transaction",
                location: format!("replay of {} dead letters in one commit", events.len()),
                size,
                limit: inner.opts.max_transaction_bytes,
            });
        }
        let mut batch = WriteBatch::default();
        let cf = inner.cf(CF_DEAD)?;
        for seq in dead_seqs {
            batch.delete_cf(cf, seq.to_be_bytes());
        }
        let entries = EncodedEntries::encode(&events, inner.meta.store_id);
        let assigned = inner.pipeline.commit(
            inner,
            Request {
                reader: None,
                reads: &[],
                writes: &WriteSet::default(),
                batch,
                entries,
                sync: inner.opts.durability == Durability::Sync,
            },
        )?;
        Ok(assigned.seqs)
    }
}
