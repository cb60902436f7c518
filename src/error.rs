//! The crate's error type.

use std::path::PathBuf;

/// Result type used throughout outboxkv.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed error source, used where the underlying error type belongs to another
/// crate (RocksDB, serde) and should not leak into this crate's API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Every error outboxkv returns.
///
/// Variants carry what failed, where (path, table, key, seq) and why, so that a
/// caller can both match on the kind and log a message an operator can act on.
/// New variants may be added in minor releases.
///
/// ```
/// use outboxkv::{Error, Event, Store};
/// let dir = tempfile::tempdir()?;
/// let store = Store::options().max_outbox_depth(Some(1)).open(dir.path())?;
/// store.write(|tx| tx.emit(Event::bytes("e", "k", vec![1])))?;
/// match store.write(|tx| tx.emit(Event::bytes("e", "k", vec![2]))) {
///     Err(Error::OutboxFull { depth, limit, .. }) => assert_eq!((depth, limit), (1, 1)),
///     other => panic!("expected backpressure, got {other:?}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation on the store directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, e.g. "create directory".
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The storage engine (RocksDB) reported an error.
    #[error("storage engine error while {op}: {source}")]
    Storage {
        /// What was being done, e.g. "commit", "read".
        op: &'static str,
        /// The engine's error.
        #[source]
        source: BoxError,
    },

    /// The path exists but is not an outboxkv store (or does not exist and
    /// `create_if_missing` is off). Nothing was written.
    #[error("{path} is not an outboxkv store: {reason}")]
    NotAStore {
        /// The path given to `open`.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },

    /// The store was written by a format version this build does not read.
    /// Nothing was written.
    #[error(
        "{path} has on-disk format version {found}; this build reads up to version {supported}"
    )]
    UnsupportedFormat {
        /// The path given to `open`.
        path: PathBuf,
        /// The version found in the store's `OUTBOXKV` file.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },

    /// Another `Store` (in this or another process) has the store open.
    ///
    /// The lock is an `flock` on the store's `LOCK` file. A child process
    /// that this process is starting (between its fork and its exec) holds
    /// a copy of it for that moment, so reopening right after dropping a
    /// `Store` can see `Locked` briefly while another thread spawns a
    /// process; retry after a few milliseconds.
    #[error("{path} is already open in another Store (lock file {lock} is held)")]
    Locked {
        /// The store path.
        path: PathBuf,
        /// The lock file that is held.
        lock: PathBuf,
    },

    /// Another relay ships this store's outbox already: an in-process
    /// relay, a sidecar (`outbox-relay run`) or `outbox-relay run --drain`.
    /// Two relays on one store would prune each other's undelivered
    /// entries, so each takes the lock `<store>/relay/LOCK` first.
    #[error(
        "another relay ships the outbox of {path} already (in-process, sidecar or --drain; \
         lock file {lock} is held); stop it first"
    )]
    RelayLocked {
        /// The store path.
        path: PathBuf,
        /// The lock file that is held.
        lock: PathBuf,
    },

    /// Stored data failed its checksum or could not be decoded.
    #[error("corruption in {location}: {reason}")]
    Corruption {
        /// Where: `table "orders" key 42`, `outbox seq 17`, a file path.
        location: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A transaction read a key (with `get_for_update`) that another
    /// transaction changed before it could commit. Nothing was written.
    /// [`Store::write`](crate::Store::write) retries this automatically.
    #[error(
        "write conflict on table {table:?} key {key}: it changed after this transaction read it"
    )]
    Conflict {
        /// Table of the conflicting key.
        table: String,
        /// The key, rendered with `Debug`.
        key: String,
    },

    /// Committing would grow the outbox beyond the configured maximum depth.
    /// Nothing was written.
    #[error(
        "outbox full: {depth} undelivered entries, this commit adds {adding}, limit is {limit}"
    )]
    OutboxFull {
        /// Entries in the outbox now.
        depth: u64,
        /// Entries the rejected commit would have added.
        adding: u64,
        /// The configured limit.
        limit: u64,
    },

    /// A key, value or event exceeds a configured size limit. Nothing was written.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes ({location})")]
    TooLarge {
        /// "key", "value" or "event".
        what: &'static str,
        /// Table and key, or event type and key.
        location: String,
        /// Actual encoded size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },

    /// An emitted event breaks a rule of [`Event`](crate::Event) (an empty
    /// type, control characters in its key or a header, a reserved header
    /// name, ...). Nothing was written.
    #[error("invalid event (type {event_type:?}, key {key:?}): {reason}")]
    InvalidEvent {
        /// The event's type.
        event_type: String,
        /// The event's key.
        key: String,
        /// The rule it breaks.
        reason: String,
    },

    /// A table name breaks the naming rules.
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTableName {
        /// The rejected name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// An argument is outside its allowed range (an event without a type, an
    /// option out of range, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A value or event payload could not be serialized.
    #[error("could not encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },

    /// A transaction stayed open past a limit of the store: it read (so it
    /// held the conflict index's history back) for longer than
    /// [`StoreOptions::max_transaction_age`](crate::StoreOptions::max_transaction_age),
    /// or it was the oldest open reader when the index outgrew
    /// [`StoreOptions::max_conflict_index_keys`](crate::StoreOptions::max_conflict_index_keys).
    /// Its reads can no longer be validated, so its commit wrote nothing.
    /// [`Store::write`](crate::Store::write) does not retry it: start a new
    /// transaction, and do not hold one across slow work.
    #[error("transaction open for {open_for:?} expired ({limit}); nothing was written")]
    TransactionExpired {
        /// How long the transaction had been open (since its first read).
        open_for: std::time::Duration,
        /// The limit it ran into: `"max_transaction_age"` or
        /// `"max_conflict_index_keys"`.
        limit: &'static str,
    },

    /// An earlier write failed at the storage layer (for example an fsync
    /// error). After such a failure the state of the page cache is unknown, so
    /// the store refuses further writes; reads still work. Reopen the store to
    /// recover from the write-ahead log.
    ///
    /// `outcome` says what became of the write that returned this error:
    /// [`WriteOutcome::NotWritten`] when it was refused before anything was
    /// written (the store was poisoned already, or the group before it
    /// failed), [`WriteOutcome::Unknown`] when its own write or fsync failed:
    /// it may be visible until the reopen, and may or may not survive it.
    #[error("store is poisoned by an earlier write failure ({cause}); reopen it ({outcome})")]
    Poisoned {
        /// The first failure, as text.
        cause: String,
        /// Whether the failed write is known not to be written.
        outcome: WriteOutcome,
    },

    /// A broker (or other sink) failed in a way the caller must see, e.g.
    /// connecting or creating a stream at start-up.
    #[error("{sink} sink: {message}")]
    Broker {
        /// The sink's name ("nats", "file", ...).
        sink: String,
        /// What failed.
        message: String,
    },

    /// Something did not happen within the time allowed.
    #[error("timed out: {0}")]
    Timeout(String),

    /// The relay is no longer running (it was shut down, or stopped on an error).
    #[error("relay stopped: {0}")]
    RelayStopped(String),

    /// The transaction closure asked to abort with its own error. Nothing was written.
    #[error("transaction aborted: {0}")]
    Aborted(#[source] BoxError),
}

/// What became of a write that failed with [`Error::Poisoned`].
///
/// ```
/// use outboxkv::{Error, WriteOutcome};
/// fn retry_is_safe(e: &Error) -> bool {
///     matches!(e, Error::Poisoned { outcome: WriteOutcome::NotWritten, .. })
/// }
/// # assert!(!retry_is_safe(&Error::Timeout("x".into())));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// Nothing of it was written: after a reopen it is certainly absent.
    NotWritten,
    /// Its write or fsync failed part-way: after a reopen it may or may not
    /// be there (whole or not at all: commits are atomic).
    Unknown,
}

impl std::fmt::Display for WriteOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriteOutcome::NotWritten => "this write was not written",
            WriteOutcome::Unknown => "this write's outcome is unknown",
        })
    }
}

impl Error {
    /// Aborts a transaction with the caller's own error; `Store::write` returns
    /// it unchanged inside [`Error::Aborted`] and commits nothing.
    pub fn abort<E: Into<BoxError>>(err: E) -> Self {
        Error::Aborted(err.into())
    }

    pub(crate) fn corruption(location: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corruption {
            location: location.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
