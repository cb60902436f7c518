//! Reads: point lookups, ranges, prefix scans and snapshots.

use std::marker::PhantomData;
use std::ops::Bound;

use rocksdb::{DB, DBRawIteratorWithThreadMode, ReadOptions, SnapshotWithThreadMode};
use serde::de::DeserializeOwned;

use super::engine::{CF_TABLES, storage};
use super::handle::{Inner, Store};
use super::key::{Key, KeyPrefix, KeyRange, decode_exact, render};
use super::table::{Table, full_key, table_prefix};
use super::value::decode_value;
use crate::error::{Error, Result};

type RawSnapshot<'a> = SnapshotWithThreadMode<'a, DB>;
type RawIter<'a> = DBRawIteratorWithThreadMode<'a, DB>;

enum View<'a> {
    Latest,
    Owned(RawSnapshot<'a>),
    Borrowed(&'a RawSnapshot<'a>),
}

/// A consistent, read-only view of the whole store (tables and outbox) as of
/// the moment it was taken; later commits do not change what it shows.
/// Holding one keeps RocksDB from discarding the versions it sees, so do not
/// keep it for hours.
///
/// ```
/// use outboxkv::{Store, Table};
/// const T: Table<u32, String> = Table::new("t");
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// store.write(|tx| tx.put(&T, &1, &"before".to_string()))?;
/// let snap = store.snapshot();
/// store.write(|tx| tx.put(&T, &1, &"after".to_string()))?;
/// assert_eq!(snap.get(&T, &1)?.as_deref(), Some("before"));
/// assert_eq!(store.get(&T, &1)?.as_deref(), Some("after"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Snapshot<'a> {
    inner: &'a Inner,
    view: View<'a>,
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

/// Decodes a stored value, reporting corruption with its table and key.
pub(crate) fn decode_stored<K: Key + ?Sized, V: DeserializeOwned>(
    table: &str,
    full: &[u8],
    bytes: &[u8],
) -> Result<V> {
    decode_value(bytes).map_err(|e| {
        Error::corruption(
            format!(
                "table {table:?} key {}",
                render::<K>(full.get(table.len() + 1..).unwrap_or_default())
            ),
            e.to_string(),
        )
    })
}

impl<'a> Snapshot<'a> {
    pub(crate) fn latest(inner: &'a Inner) -> Self {
        Snapshot {
            inner,
            view: View::Latest,
        }
    }

    pub(crate) fn borrowed(inner: &'a Inner, snap: &'a RawSnapshot<'a>) -> Self {
        Snapshot {
            inner,
            view: View::Borrowed(snap),
        }
    }

    fn raw(&self) -> Option<&RawSnapshot<'a>> {
        match &self.view {
            View::Latest => None,
            View::Owned(s) => Some(s),
            View::Borrowed(s) => Some(s),
        }
    }

    pub(crate) fn read_options(&self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        if let Some(s) = self.raw() {
            ro.set_snapshot(s);
        }
        ro
    }

    pub(crate) fn get_full<K: Key + ?Sized, V: DeserializeOwned>(
        &self,
        table: &str,
        full: &[u8],
    ) -> Result<Option<V>> {
        let cf = self.inner.cf(CF_TABLES)?;
        let found = self
            .inner
            .db
            .get_pinned_cf_opt(cf, full, &self.read_options())
            .map_err(storage("read"))?;
        match found {
            Some(bytes) => decode_stored::<K, V>(table, full, &bytes).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn contains_full(&self, full: &[u8]) -> Result<bool> {
        let cf = self.inner.cf(CF_TABLES)?;
        let found = self
            .inner
            .db
            .get_pinned_cf_opt(cf, full, &self.read_options())
            .map_err(storage("read"))?;
        Ok(found.is_some())
    }

    /// Reads the value under `key`, or `None`.
    pub fn get<K: Key + ?Sized, V: DeserializeOwned>(
        &self,
        table: &Table<K, V>,
        key: &K,
    ) -> Result<Option<V>> {
        self.get_full::<K, V>(table.name(), &full_key(table, key)?)
    }

    /// Whether `key` exists (without decoding its value).
    pub fn contains<K: Key + ?Sized, V>(&self, table: &Table<K, V>, key: &K) -> Result<bool> {
        self.contains_full(&full_key(table, key)?)
    }

    /// Iterates over the keys in `range`, in key order; `.rev()` iterates
    /// backwards. Items are `Result`s: a corrupt value ends nothing but its
    /// own item.
    pub fn range<K, V, R>(&self, table: &Table<K, V>, range: R) -> Result<Range<'_, K, V>>
    where
        K: Key + ?Sized,
        R: KeyRange<K>,
    {
        range_in(self.inner, self.raw(), table, range)
    }

    /// Iterates over the keys whose leading tuple elements equal `prefix`,
    /// e.g. `(customer,)` in a table keyed by `(String, u64)`.
    pub fn prefix<K, V, P>(&self, table: &Table<K, V>, prefix: &P) -> Result<Range<'_, K, V>>
    where
        K: Key + ?Sized,
        P: KeyPrefix<K>,
    {
        prefix_in(self.inner, self.raw(), table, prefix)
    }
}

fn range_in<'a, K, V, R>(
    inner: &'a Inner,
    snapshot: Option<&'a RawSnapshot<'a>>,
    table: &Table<K, V>,
    range: R,
) -> Result<Range<'a, K, V>>
where
    K: Key + ?Sized,
    R: KeyRange<K>,
{
    let mut prefix = Vec::new();
    table_prefix(table, &mut prefix)?;
    let mut lower = prefix.clone();
    match range.start() {
        Bound::Included(k) => k.encode_key(&mut lower),
        Bound::Excluded(k) => {
            // Encodings are prefix-free, so `enc(k) + 0x00` is the least
            // encoding greater than `enc(k)`.
            k.encode_key(&mut lower);
            lower.push(0);
        }
        Bound::Unbounded => {}
    }
    let upper = match range.end() {
        Bound::Included(k) => {
            let mut u = prefix.clone();
            k.encode_key(&mut u);
            u.push(0);
            u
        }
        Bound::Excluded(k) => {
            let mut u = prefix.clone();
            k.encode_key(&mut u);
            u
        }
        Bound::Unbounded => successor(&prefix),
    };
    Range::new(inner, snapshot, table.name(), prefix.len(), lower, upper)
}

fn prefix_in<'a, K, V, P>(
    inner: &'a Inner,
    snapshot: Option<&'a RawSnapshot<'a>>,
    table: &Table<K, V>,
    prefix: &P,
) -> Result<Range<'a, K, V>>
where
    K: Key + ?Sized,
    P: KeyPrefix<K>,
{
    let mut lower = Vec::new();
    table_prefix(table, &mut lower)?;
    let table_len = lower.len();
    prefix.encode_prefix(&mut lower);
    let upper = successor(&lower);
    Range::new(inner, snapshot, table.name(), table_len, lower, upper)
}

fn decode_item<K: Key + ?Sized, V: DeserializeOwned>(
    table: &str,
    prefix_len: usize,
    key: &[u8],
    value: &[u8],
) -> Result<(K::Owned, V)> {
    let user_key = key.get(prefix_len..).unwrap_or_default();
    let k = decode_exact::<K>(user_key).map_err(|e| {
        Error::corruption(
            format!("table {table:?} key bytes {user_key:02x?}"),
            format!("key does not decode: {e}"),
        )
    })?;
    let v = decode_value(value)
        .map_err(|e| Error::corruption(format!("table {table:?} key {k:?}"), e.to_string()))?;
    Ok((k, v))
}

/// The least byte string greater than every string starting with `prefix`.
fn successor(prefix: &[u8]) -> Vec<u8> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xFF {
            s.push(last + 1);
            return s;
        }
    }
    // All 0xFF: cannot happen for table prefixes, which end in 0x00 or a key.
    vec![0xFF; prefix.len() + 1]
}

/// Iterator over a key range of a table; see [`Store::range`].
///
/// Double-ended: `.rev()` walks from the end, and mixing `next` and
/// `next_back` meets in the middle without repeating an item.
pub struct Range<'a, K: Key + ?Sized, V> {
    inner: &'a Inner,
    snapshot: Option<&'a RawSnapshot<'a>>,
    table: &'static str,
    prefix_len: usize,
    lower: Vec<u8>,
    upper: Vec<u8>,
    front: Option<RawIter<'a>>,
    back: Option<RawIter<'a>>,
    done: bool,
    _types: PhantomData<fn(&K) -> V>,
}

impl<K: Key + ?Sized, V> std::fmt::Debug for Range<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Range")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<'a, K: Key + ?Sized, V> Range<'a, K, V> {
    fn new(
        inner: &'a Inner,
        snapshot: Option<&'a RawSnapshot<'a>>,
        table: &'static str,
        prefix_len: usize,
        lower: Vec<u8>,
        upper: Vec<u8>,
    ) -> Result<Self> {
        inner.cf(CF_TABLES)?;
        Ok(Range {
            inner,
            snapshot,
            table,
            prefix_len,
            done: lower >= upper,
            lower,
            upper,
            front: None,
            back: None,
            _types: PhantomData,
        })
    }
}

impl<'a, K: Key + ?Sized, V: DeserializeOwned> Range<'a, K, V> {
    fn open_iter(&self) -> Option<RawIter<'a>> {
        let inner: &'a Inner = self.inner;
        let cf = inner.db.cf_handle(CF_TABLES)?;
        let mut ro = ReadOptions::default();
        if let Some(s) = self.snapshot {
            ro.set_snapshot(s);
        }
        ro.set_iterate_lower_bound(self.lower.clone());
        ro.set_iterate_upper_bound(self.upper.clone());
        Some(inner.db.raw_iterator_cf_opt(cf, ro))
    }

    fn finish(
        &mut self,
        it_status: std::result::Result<(), rocksdb::Error>,
    ) -> Option<Result<(K::Owned, V)>> {
        self.done = true;
        it_status.err().map(|e| Err(storage("iterate")(e)))
    }
}

impl<K: Key + ?Sized, V: DeserializeOwned> Iterator for Range<'_, K, V> {
    type Item = Result<(K::Owned, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let it = match self.front.take() {
            Some(mut it) => {
                it.next();
                it
            }
            None => {
                let Some(mut it) = self.open_iter() else {
                    return self.finish(Ok(()));
                };
                it.seek_to_first();
                it
            }
        };
        let front = self.front.insert(it);
        let Some((key, value)) = front.item() else {
            let status = front.status();
            return self.finish(status);
        };
        if let Some(back_key) = self.back.as_ref().and_then(|b| b.key())
            && key >= back_key
        {
            self.done = true;
            return None;
        }
        Some(decode_item::<K, V>(self.table, self.prefix_len, key, value))
    }
}

impl<K: Key + ?Sized, V: DeserializeOwned> DoubleEndedIterator for Range<'_, K, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let it = match self.back.take() {
            Some(mut it) => {
                it.prev();
                it
            }
            None => {
                let Some(mut it) = self.open_iter() else {
                    return self.finish(Ok(()));
                };
                it.seek_to_last();
                it
            }
        };
        let back = self.back.insert(it);
        let Some((key, value)) = back.item() else {
            let status = back.status();
            return self.finish(status);
        };
        if let Some(front_key) = self.front.as_ref().and_then(|f| f.key())
            && key <= front_key
        {
            self.done = true;
            return None;
        }
        Some(decode_item::<K, V>(self.table, self.prefix_len, key, value))
    }
}

impl Store {
    /// A consistent read view; see [`Snapshot`].
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            inner: &self.inner,
            view: View::Owned(self.inner.db.snapshot()),
        }
    }

    /// Reads the latest committed value under `key`, or `None`. A value that
    /// fails its checksum or does not decode is [`Error::Corruption`].
    pub fn get<K: Key + ?Sized, V: DeserializeOwned>(
        &self,
        table: &Table<K, V>,
        key: &K,
    ) -> Result<Option<V>> {
        Snapshot::latest(&self.inner).get(table, key)
    }

    /// Whether `key` exists.
    pub fn contains<K: Key + ?Sized, V>(&self, table: &Table<K, V>, key: &K) -> Result<bool> {
        Snapshot::latest(&self.inner).contains(table, key)
    }

    /// Iterates over a key range in key order (`.rev()` for descending). The
    /// iterator reads one consistent RocksDB view per direction; for a view
    /// that also agrees with other reads, iterate a [`Snapshot`].
    ///
    /// ```
    /// use outboxkv::{Store, Table};
    /// const T: Table<u64, u64> = Table::new("squares");
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// store.write(|tx| (0..30u64).try_for_each(|i| tx.put(&T, &i, &(i * i))))?;
    /// let keys: Vec<u64> = store.range(&T, 10..13)?.map(|r| r.map(|(k, _)| k)).collect::<Result<_, _>>()?;
    /// assert_eq!(keys, [10, 11, 12]);
    /// let (last, sq) = store.range(&T, ..)?.rev().next().unwrap()?;
    /// assert_eq!((last, sq), (29, 841));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn range<K, V, R>(&self, table: &Table<K, V>, range: R) -> Result<Range<'_, K, V>>
    where
        K: Key + ?Sized,
        V: DeserializeOwned,
        R: KeyRange<K>,
    {
        range_in(&self.inner, None, table, range)
    }

    /// Iterates over the keys whose leading tuple elements equal `prefix`.
    ///
    /// ```
    /// use outboxkv::{Store, Table};
    /// const BY_CUSTOMER: Table<(String, u64), ()> = Table::new("by_customer");
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// store.write(|tx| {
    ///     for (c, o) in [("ann", 1), ("bob", 2), ("ann", 3)] {
    ///         tx.put(&BY_CUSTOMER, &(c.to_string(), o), &())?;
    ///     }
    ///     Ok(())
    /// })?;
    /// let anns: Vec<u64> = store
    ///     .prefix(&BY_CUSTOMER, &("ann".to_string(),))?
    ///     .map(|r| r.map(|((_, order), ())| order))
    ///     .collect::<Result<_, _>>()?;
    /// assert_eq!(anns, [1, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn prefix<K, V, P>(&self, table: &Table<K, V>, prefix: &P) -> Result<Range<'_, K, V>>
    where
        K: Key + ?Sized,
        V: DeserializeOwned,
        P: KeyPrefix<K>,
    {
        prefix_in(&self.inner, None, table, prefix)
    }
}
