//! The commit pipeline: conflict detection, seq assignment and group commit.
//!
//! Every commit passes through one short critical section (`State`) where it
//!
//! 1. is validated: each key it read with `get_for_update` must not have been
//!    written by a commit ordered after the transaction's snapshot
//!    (optimistic concurrency control, which makes read-modify-write
//!    serializable);
//! 2. gets the next commit version and a contiguous run of outbox seqs, and
//!    has its outbox entries encoded into its batch;
//! 3. is appended to the queue of ordered, not yet written commits.
//!
//! One committer at a time is the *leader*: it takes the whole queue, merges
//! the batches into one RocksDB write (fsynced if any member asked for
//! `Sync`), then hands leadership to the first commit that queued up
//! meanwhile. So concurrent `Sync` committers share fsyncs, and because
//! groups are written strictly in queue order, outbox seqs become visible in
//! commit order without gaps: whoever sees seq N sees every seq below it.
//!
//! A failed write poisons the store (see [`Error::Poisoned`]): after an
//! fsync error the page cache cannot be trusted, and refusing further writes
//! is what keeps seqs gap-free and unambiguous.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};
use rocksdb::WriteBatch;

use super::open::{CF_OUTBOX, Inner};
use super::tx::WriteSet;
use crate::Durability;
use crate::error::{Error, Result};
use crate::outbox::entry::{EntryFields, EventId, encode_parts, now_micros};
use crate::outbox::event::Event;

/// Size of a RocksDB write batch header: 8-byte sequence, 4-byte count.
const BATCH_HEADER: usize = 12;
/// Groups one leader writes in a row before handing leadership on.
const LEADER_ROUNDS: u32 = 8;
/// Conflict-index size above which it is trimmed while transactions are open.
const TRIM_AT: usize = 16 * 1024;

/// A key read with `get_for_update`.
pub(crate) struct ReadRecord {
    pub hash: u64,
    pub table: &'static str,
    pub key: Vec<u8>,
    pub render: fn(&[u8]) -> String,
}

/// What a transaction hands to the pipeline.
pub(crate) struct Request<'a> {
    /// Snapshot version and reads to validate, if the transaction read.
    pub start_version: Option<u64>,
    pub reads: &'a [ReadRecord],
    pub writes: &'a WriteSet,
    pub batch: WriteBatch,
    pub events: &'a [Event],
    pub sync: bool,
}

struct Pending {
    batch: WriteBatch,
    sync: bool,
    version: u64,
    last_seq: Option<u64>,
    slot: Option<Arc<Slot>>,
}

enum SlotState {
    Waiting,
    Lead,
    Done(std::result::Result<(), String>),
}

struct Slot {
    state: Mutex<SlotState>,
    cond: Condvar,
}

impl Slot {
    fn set(&self, s: SlotState) {
        *self.state.lock() = s;
        self.cond.notify_one();
    }
}

struct State {
    /// Version of the last ordered commit.
    version: u64,
    /// Version of the last commit written to RocksDB (visible to readers).
    visible_version: u64,
    next_seq: u64,
    /// Hash of written key → version of the last commit that wrote it.
    writes: HashMap<u64, u64>,
    /// Snapshot versions of open transactions that will validate reads.
    active: BTreeMap<u64, usize>,
    queue: Vec<Pending>,
    leader: bool,
    poisoned: Option<String>,
    /// Reused buffer for encoding outbox entries.
    scratch: Vec<u8>,
    /// Reused (empty) group vector.
    spare: Vec<Pending>,
}

impl State {
    fn release(&mut self, start: u64) {
        if let Some(n) = self.active.get_mut(&start) {
            *n -= 1;
            if *n == 0 {
                self.active.remove(&start);
            }
        }
    }

    fn trim_writes(&mut self) {
        if self.active.is_empty() && self.queue.is_empty() {
            self.writes.clear();
        } else if self.writes.len() > TRIM_AT {
            let floor = self
                .active
                .keys()
                .next()
                .copied()
                .unwrap_or(u64::MAX)
                .min(self.visible_version);
            self.writes.retain(|_, v| *v > floor);
        }
    }
}

pub(crate) struct Pipeline {
    state: Mutex<State>,
    /// Signalled when `visible_version` advances or the store is poisoned.
    visible: Condvar,
    /// First seq still in the outbox (advanced by pruning).
    pub(crate) first_seq: AtomicU64,
}

/// Outcome of a successful commit.
pub(crate) struct Assigned {
    pub seqs: Range<u64>,
}

impl Pipeline {
    pub(crate) fn new(next_seq: u64, first_seq: u64) -> Pipeline {
        Pipeline {
            state: Mutex::new(State {
                version: 0,
                visible_version: 0,
                next_seq,
                writes: HashMap::new(),
                active: BTreeMap::new(),
                queue: Vec::new(),
                leader: false,
                poisoned: None,
                scratch: Vec::new(),
                spare: Vec::new(),
            }),
            visible: Condvar::new(),
            first_seq: AtomicU64::new(first_seq),
        }
    }

    /// Waits until every commit ordered so far is visible to readers (or the
    /// store is poisoned). A transaction that conflicted calls this before it
    /// retries: its new snapshot then includes the write it conflicted with,
    /// instead of conflicting again, in a loop, until that group is fsynced.
    pub(crate) fn wait_visible(&self) {
        let mut st = self.state.lock();
        let target = st.version;
        while st.visible_version < target && st.poisoned.is_none() {
            self.visible.wait(&mut st);
        }
    }

    /// Registers a transaction that will validate its reads; returns its
    /// snapshot version. Take the RocksDB snapshot after this call.
    pub(crate) fn begin_read(&self) -> u64 {
        let mut st = self.state.lock();
        let v = st.visible_version;
        *st.active.entry(v).or_insert(0) += 1;
        v
    }

    /// Unregisters a transaction that ends without committing.
    pub(crate) fn end_read(&self, start: u64) {
        self.state.lock().release(start);
    }

    pub(crate) fn poisoned(&self) -> Option<String> {
        self.state.lock().poisoned.clone()
    }

    /// Marks the store unusable for writes after a failure outside the
    /// pipeline (pruning).
    pub(crate) fn poison(&self, cause: String) {
        self.state.lock().poisoned.get_or_insert(cause);
        self.visible.notify_all();
    }

    pub(crate) fn commit(&self, inner: &Inner, req: Request<'_>) -> Result<Assigned> {
        let outbox = inner.cf(CF_OUTBOX)?;
        let mut st = self.state.lock();
        let (pending, seqs) = self.order(inner, outbox, &mut st, req)?;
        if !st.leader {
            st.leader = true;
            let mut group = std::mem::take(&mut st.spare);
            group.push(pending);
            drop(st);
            self.lead(inner, group)?;
            return Ok(Assigned { seqs });
        }
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Waiting),
            cond: Condvar::new(),
        });
        st.queue.push(Pending {
            slot: Some(slot.clone()),
            ..pending
        });
        drop(st);

        let mut guard = slot.state.lock();
        loop {
            match std::mem::replace(&mut *guard, SlotState::Waiting) {
                SlotState::Waiting => slot.cond.wait(&mut guard),
                SlotState::Done(r) => {
                    return r
                        .map(|()| Assigned { seqs })
                        .map_err(|cause| Error::Poisoned { cause });
                }
                SlotState::Lead => {
                    drop(guard);
                    let group = std::mem::take(&mut self.state.lock().queue);
                    // This commit is the group's first member; `lead` reports
                    // the group's result, which is this commit's result.
                    self.lead(inner, group)?;
                    return Ok(Assigned { seqs });
                }
            }
        }
    }

    /// Validates and orders one commit (under the state lock).
    fn order(
        &self,
        inner: &Inner,
        outbox: &rocksdb::ColumnFamily,
        st: &mut State,
        req: Request<'_>,
    ) -> Result<(Pending, Range<u64>)> {
        let finish = |st: &mut State| {
            if let Some(start) = req.start_version {
                st.release(start);
            }
        };
        if let Some(cause) = &st.poisoned {
            let cause = cause.clone();
            finish(st);
            return Err(Error::Poisoned { cause });
        }
        if let Some(start) = req.start_version {
            for r in req.reads {
                if st.writes.get(&r.hash).is_some_and(|&v| v > start) {
                    finish(st);
                    return Err(Error::Conflict {
                        table: r.table.to_string(),
                        key: (r.render)(&r.key),
                    });
                }
            }
        }
        let adding = req.events.len() as u64;
        if let Some(limit) = inner.opts.max_outbox_depth {
            let depth = st.next_seq - self.first_seq.load(Ordering::Acquire);
            if adding > 0 && depth + adding > limit {
                finish(st);
                return Err(Error::OutboxFull {
                    depth,
                    adding,
                    limit,
                });
            }
        }
        finish(st);
        st.version += 1;
        let version = st.version;
        let first = st.next_seq;
        st.next_seq += adding;
        let mut batch = req.batch;
        if adding > 0 {
            let created = now_micros();
            // One scratch buffer reused by every commit (we hold the lock).
            let mut buf = std::mem::take(&mut st.scratch);
            for (i, event) in req.events.iter().enumerate() {
                let seq = first + i as u64;
                let (id, at) = event.origin.unwrap_or((
                    EventId {
                        store: inner.meta.store_id,
                        seq,
                    },
                    created,
                ));
                buf.clear();
                encode_parts(&mut buf, seq, id, at, EntryFields::from(event));
                batch.put_cf(outbox, seq.to_be_bytes(), &buf);
            }
            buf.clear();
            buf.shrink_to(64 << 10);
            st.scratch = buf;
        }
        for key in req.writes.keys() {
            st.writes.insert(inner.key_hasher.hash_one(key), version);
        }
        let pending = Pending {
            batch,
            sync: req.sync,
            version,
            last_seq: (adding > 0).then(|| first + adding - 1),
            slot: None,
        };
        Ok((pending, first..first + adding))
    }

    /// Writes `group` as one RocksDB write and publishes the result to every
    /// member. While more commits queued up meanwhile, it writes them too
    /// (up to `LEADER_ROUNDS` groups: the leader is already on a CPU, while a
    /// hand-off would wait for another thread to be scheduled), then hands
    /// leadership to the first waiting commit. Returns the first group's
    /// result, which is the caller's own.
    fn lead(&self, inner: &Inner, mut group: Vec<Pending>) -> Result<()> {
        let mut own = None;
        let mut rounds = 1;
        loop {
            let (outcome, slots, last_seq) = Self::write_group(inner, &mut group);
            let mut st = self.state.lock();
            if st.spare.capacity() < group.capacity() {
                st.spare = std::mem::take(&mut group);
            }
            let outcome = match outcome {
                Ok(version) => {
                    st.visible_version = st.visible_version.max(version);
                    self.visible.notify_all();
                    Ok(())
                }
                Err(cause) => {
                    tracing::error!(%cause, "outboxkv commit failed; store is poisoned");
                    st.poisoned.get_or_insert(cause.clone());
                    self.visible.notify_all();
                    Err(cause)
                }
            };
            let mut failed = Vec::new();
            let mut next = None;
            if st.queue.is_empty() {
                st.leader = false;
            } else if st.poisoned.is_some() {
                failed = std::mem::take(&mut st.queue);
                st.leader = false;
            } else if rounds < LEADER_ROUNDS {
                next = Some(std::mem::take(&mut st.queue));
            } else if let Some(slot) = st.queue.first().and_then(|p| p.slot.as_ref()) {
                slot.set(SlotState::Lead);
            }
            st.trim_writes();
            let cause = st.poisoned.clone().unwrap_or_default();
            drop(st);

            if let (Ok(()), Some(seq)) = (&outcome, last_seq) {
                inner.notifier.publish(seq);
            }
            for slot in slots {
                slot.set(SlotState::Done(outcome.clone()));
            }
            for slot in failed.into_iter().filter_map(|p| p.slot) {
                slot.set(SlotState::Done(Err(cause.clone())));
            }
            own.get_or_insert(outcome);
            match next {
                Some(g) => {
                    group = g;
                    rounds += 1;
                }
                None => break,
            }
        }
        own.unwrap_or(Ok(()))
            .map_err(|cause| Error::Poisoned { cause })
    }

    /// One RocksDB write for the whole group. Returns the group's highest
    /// version (or the failure), the members' wake-up slots and the group's
    /// last outbox seq.
    fn write_group(
        inner: &Inner,
        group: &mut Vec<Pending>,
    ) -> (
        std::result::Result<u64, String>,
        Vec<Arc<Slot>>,
        Option<u64>,
    ) {
        let sync = group.iter().any(|p| p.sync);
        let version = group.iter().map(|p| p.version).max().unwrap_or(0);
        let last_seq = group.iter().filter_map(|p| p.last_seq).max();
        let opts = inner.write_options(if sync {
            Durability::Sync
        } else {
            Durability::Buffered
        });
        let merged = (group.len() > 1).then(|| merge(group));
        let mut slots = Vec::new();
        let mut single = None;
        for p in group.drain(..) {
            slots.extend(p.slot);
            single = Some(p.batch);
        }
        let written = match merged.or(single) {
            Some(b) => inner.db.write_opt(b, opts),
            None => Ok(()),
        };
        let outcome = written
            .map(|()| version)
            .map_err(|e| format!("commit write failed: {e}"));
        (outcome, slots, last_seq)
    }
}

/// Concatenates RocksDB write batches: one header with the summed count,
/// then every batch's records in order (what RocksDB's own
/// `WriteBatchInternal::Append` does; the record format is the WAL format).
fn merge(group: &[Pending]) -> WriteBatch {
    let body: usize = group
        .iter()
        .map(|p| p.batch.data().len().saturating_sub(BATCH_HEADER))
        .sum();
    let count: usize = group.iter().map(|p| p.batch.len()).sum();
    let mut rep = Vec::with_capacity(BATCH_HEADER + body);
    rep.extend_from_slice(&[0u8; 8]);
    rep.extend_from_slice(&(count as u32).to_le_bytes());
    for p in group {
        rep.extend_from_slice(p.batch.data().get(BATCH_HEADER..).unwrap_or_default());
    }
    WriteBatch::from_data(&rep)
}
