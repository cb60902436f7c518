//! Store options and durability.

/// When a commit counts as done.
///
/// ```
/// use outboxkv::{Durability, Store};
/// let dir = tempfile::tempdir()?;
/// let store = Store::options().durability(Durability::Buffered).open(dir.path())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// The write-ahead log is fsynced before the commit returns: the commit
    /// survives a power loss. Concurrent `Sync` commits share one fsync
    /// (group commit), and the next group is written while one is fsynced
    /// (see [`StoreOptions::pipelined_fsync`] for what readers can see
    /// meanwhile). The relay ships a `Sync` event only once it is fsynced.
    /// The default.
    #[default]
    Sync,
    /// The commit is in the operating system's page cache when it returns: it
    /// survives a crash of the process, not of the machine. The relay fsyncs
    /// before it ships a `Buffered` event (one fsync per batch), so an event
    /// never reaches the broker while a power loss could still erase it and
    /// its state.
    Buffered,
}

/// What opening a store does when its write-ahead log is damaged.
///
/// ```
/// use outboxkv::{Store, WalRecovery};
/// # let dir = tempfile::tempdir()?;
/// // Salvage a store whose log was damaged in the middle (loses what follows).
/// let store = Store::options().wal_recovery(WalRecovery::PointInTime).open(dir.path())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WalRecovery {
    /// An incomplete last record (a write a crash interrupted, so never
    /// acknowledged) is dropped; damage anywhere else fails the open with
    /// [`Error::Corruption`](crate::Error::Corruption), so acknowledged
    /// commits are never dropped silently. The default.
    #[default]
    TolerateTornTail,
    /// Recovers up to the first damaged record and drops everything after
    /// it, without an error: for salvaging a store that the default refuses.
    PointInTime,
    /// Any damage, even a torn last record, fails the open.
    AbsoluteConsistency,
}

/// Default for [`StoreOptions::max_key_size`]: 16 KiB.
pub const DEFAULT_MAX_KEY_SIZE: usize = 16 << 10;
/// Default for [`StoreOptions::max_value_size`]: 16 MiB.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 16 << 20;
/// Default for [`StoreOptions::max_event_size`]: 1 MiB (NATS' default `max_payload`).
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1 << 20;
/// Default for [`StoreOptions::max_conflict_retries`].
pub const DEFAULT_MAX_CONFLICT_RETRIES: u32 = 16;
/// Default for [`StoreOptions::max_transaction_age`]: 30 s.
pub const DEFAULT_MAX_TRANSACTION_AGE: std::time::Duration = std::time::Duration::from_secs(30);
/// Default for [`StoreOptions::max_conflict_index_keys`]: 1,048,576.
pub const DEFAULT_MAX_CONFLICT_INDEX_KEYS: usize = 1 << 20;
/// Default for [`StoreOptions::max_transaction_bytes`]: 64 MiB.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 64 << 20;

/// Options for opening a [`Store`](crate::Store); get one from
/// [`Store::options`](crate::Store::options). Every setter documents its default.
///
/// ```
/// use outboxkv::{Durability, Store};
/// let dir = tempfile::tempdir()?;
/// let store = Store::options()
///     .durability(Durability::Sync)
///     .max_outbox_depth(Some(100_000))
///     .max_event_size(256 << 10)
///     .open(dir.path().join("orders"))?;
/// assert_eq!(store.outbox().depth(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct StoreOptions {
    pub(crate) durability: Durability,
    pub(crate) create_if_missing: bool,
    pub(crate) max_outbox_depth: Option<u64>,
    pub(crate) max_key_size: usize,
    pub(crate) max_value_size: usize,
    pub(crate) max_event_size: usize,
    pub(crate) max_conflict_retries: u32,
    pub(crate) block_cache_bytes: usize,
    pub(crate) relay_cursor_poll: Option<std::time::Duration>,
    pub(crate) wal_recovery: WalRecovery,
    pub(crate) pipelined_fsync: bool,
    pub(crate) max_transaction_age: std::time::Duration,
    pub(crate) max_conflict_index_keys: usize,
    pub(crate) max_transaction_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Sync,
            create_if_missing: true,
            max_outbox_depth: None,
            max_key_size: DEFAULT_MAX_KEY_SIZE,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            max_conflict_retries: DEFAULT_MAX_CONFLICT_RETRIES,
            block_cache_bytes: 32 << 20,
            relay_cursor_poll: Some(std::time::Duration::from_millis(100)),
            wal_recovery: WalRecovery::default(),
            pipelined_fsync: true,
            max_transaction_age: DEFAULT_MAX_TRANSACTION_AGE,
            max_conflict_index_keys: DEFAULT_MAX_CONFLICT_INDEX_KEYS,
            max_transaction_bytes: DEFAULT_MAX_TRANSACTION_BYTES,
        }
    }
}

impl StoreOptions {
    /// Default durability of commits; a transaction can override it with
    /// [`WriteTx::set_durability`](crate::WriteTx::set_durability).
    /// Default: [`Durability::Sync`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Create the store when the path does not exist or is an empty directory.
    /// Default: `true`.
    pub fn create_if_missing(mut self, yes: bool) -> Self {
        self.create_if_missing = yes;
        self
    }

    /// Maximum number of undelivered outbox entries. A commit that would go
    /// past it fails at once with [`Error::OutboxFull`](crate::Error::OutboxFull)
    /// and writes nothing (it does not wait): the service sees backpressure
    /// and decides. Default: `None`, unbounded.
    pub fn max_outbox_depth(mut self, depth: Option<u64>) -> Self {
        self.max_outbox_depth = depth;
        self
    }

    /// Largest encoded key, in bytes; larger keys fail with
    /// [`Error::TooLarge`](crate::Error::TooLarge). Default: 16 KiB.
    pub fn max_key_size(mut self, bytes: usize) -> Self {
        self.max_key_size = bytes;
        self
    }

    /// Largest encoded value, in bytes; capped at 64 MiB whatever is asked.
    /// Default: 16 MiB.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes.min(super::value::MAX_VALUE_BYTES);
        self
    }

    /// Largest event (payload, key, type, content type and headers), in
    /// bytes; capped at 64 MiB. Default: 1 MiB, NATS' default `max_payload`.
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes.min(64 << 20);
        self
    }

    /// How many times [`Store::write`](crate::Store::write) re-runs a closure
    /// whose commit hit a conflict before returning
    /// [`Error::Conflict`](crate::Error::Conflict). Default: 16.
    pub fn max_conflict_retries(mut self, retries: u32) -> Self {
        self.max_conflict_retries = retries;
        self
    }

    /// How long a transaction may stay open, from its first read to its
    /// commit, and still commit with reads to validate. An open transaction
    /// that read keeps the history of later writes in memory (the conflict
    /// index) until it ends; past this age its commit fails with
    /// [`Error::TransactionExpired`](crate::Error::TransactionExpired) and
    /// writes nothing, and the history it held is released. A transaction
    /// with no `get_for_update` / `contains_for_update` reads has nothing to
    /// validate and is not limited. [`Store::transaction_stats`](crate::Store::transaction_stats)
    /// reports the oldest open transaction. Default: 30 s.
    pub fn max_transaction_age(mut self, age: std::time::Duration) -> Self {
        self.max_transaction_age = age;
        self
    }

    /// Most write records (one per key written by a commit) the conflict
    /// index holds for open transactions; each takes about 40 bytes. Over
    /// it, the oldest open transactions are expired (their commits fail with
    /// [`Error::TransactionExpired`](crate::Error::TransactionExpired)) until
    /// the index fits again; records of commits not yet written are never
    /// dropped. Default: 1,048,576 (about 40 MiB).
    pub fn max_conflict_index_keys(mut self, keys: usize) -> Self {
        self.max_conflict_index_keys = keys;
        self
    }

    /// Largest commit (keys, values and encoded events together, in bytes);
    /// a larger one fails with [`Error::TooLarge`](crate::Error::TooLarge)
    /// and writes nothing. Default: 64 MiB.
    pub fn max_transaction_bytes(mut self, bytes: usize) -> Self {
        self.max_transaction_bytes = bytes;
        self
    }

    /// Size of RocksDB's block cache. Default: 32 MiB.
    pub fn block_cache_bytes(mut self, bytes: usize) -> Self {
        self.block_cache_bytes = bytes;
        self
    }

    /// How often the store looks for a sidecar relay's cursor file
    /// (`<store>/relay/cursor`, written by `outbox-relay run`) and prunes what
    /// it delivered; `None` turns that off (call
    /// [`Outbox::apply_relay_cursor`](crate::Outbox::apply_relay_cursor)
    /// yourself). A look is one `stat` of that file. Default: every 100 ms.
    pub fn relay_cursor_poll(mut self, every: Option<std::time::Duration>) -> Self {
        self.relay_cursor_poll = every;
        self
    }

    /// What to do with a damaged write-ahead log at open. Default:
    /// [`WalRecovery::TolerateTornTail`].
    pub fn wal_recovery(mut self, mode: WalRecovery) -> Self {
        self.wal_recovery = mode;
        self
    }

    /// How a group of [`Durability::Sync`] commits is made durable. A `Sync`
    /// commit returns after the fsync that covers it either way.
    ///
    /// - `true`: the group is written, then fsynced while the next group is
    ///   written, so more commits share each fsync (on the 2-vCPU test VM, 16
    ///   threads commit 5.2-6.3x as fast as one instead of 4.3-4.8x; see
    ///   `benches/commit_ratio.rs`). Reads in this process can then see a
    ///   `Sync` commit up to one fsync before it is durable. The relay cannot:
    ///   it ships a `Sync` event only after its fsync (a sidecar relay fsyncs
    ///   the log itself before it ships). If that fsync fails,
    ///   the store is poisoned and the commits it covered fail, but they may
    ///   stay visible until the store is reopened and may or may not survive.
    /// - `false`: each group is written and fsynced in one RocksDB write, and
    ///   reads never see a `Sync` commit before it is durable.
    ///
    /// Default: `true`.
    pub fn pipelined_fsync(mut self, yes: bool) -> Self {
        self.pipelined_fsync = yes;
        self
    }
}
