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
//! the batches into one RocksDB write (without fsync), then hands leadership
//! to the first commit that queued up meanwhile. Because groups are written
//! strictly in queue order, outbox seqs become visible in commit order
//! without gaps: whoever sees seq N sees every seq below it.
//!
//! A group with a `Sync` member is then fsynced (RocksDB's `SyncWAL`) *after*
//! leadership has been handed on, so the next group is written while this
//! one's fsync runs (a pipelined group commit). Written groups wait in
//! `State::awaiting`; one thread at a time is the *fsyncer*: each fsync it
//! runs covers every group written before it started, and it runs another
//! while groups wrote meanwhile are waiting (then hands the role to one of
//! them). Members of a `Sync` group are told "done" only after the fsync
//! that covers it, and the commit notification that wakes the relay is
//! published for their seqs only then too. Each fsync also raises the
//! durable seq that the relay checks before it ships (a later `Buffered`
//! group can move the head past a `Sync` group still waiting for its fsync;
//! `Outbox::make_durable` then fsyncs first), so the relay never ships an
//! event that a power loss could still erase. Reads in the same
//! process can see a `Sync` commit up to one fsync before it is durable
//! (like RocksDB's own `Write` followed by `SyncWAL`);
//! [`StoreOptions::pipelined_fsync`](crate::StoreOptions::pipelined_fsync)
//! `(false)` writes and fsyncs each group in one RocksDB write instead.
//!
//! A failed write poisons the store (see [`Error::Poisoned`]): after an
//! fsync error the page cache cannot be trusted, and refusing further writes
//! is what keeps seqs gap-free and unambiguous.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard};
use rocksdb::WriteBatch;

use super::open::{CF_OUTBOX, Inner};
use super::tx::WriteSet;
use crate::Durability;
use crate::error::{Error, Result};
use crate::outbox::entry::{EntryFields, EventId, encode_parts, now_micros};
use crate::outbox::event::Event;

/// Size of a RocksDB write batch header: 8-byte sequence, 4-byte count.
pub(crate) const BATCH_HEADER: usize = 12;
/// Groups one leader writes in a row before handing leadership on.
const LEADER_ROUNDS: u32 = 8;
/// Fsyncs one thread runs in a row before handing the role on.
const SYNC_ROUNDS: u32 = 4;
/// Times a waiting commit yields its CPU before it sleeps.
const SPIN_YIELDS: u32 = 10;
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
    /// Become the leader: write the queue.
    Lead,
    /// Become the fsyncer: fsync for the groups waiting for one.
    Sync,
    Done(std::result::Result<(), String>),
}

struct Slot {
    state: Mutex<SlotState>,
    cond: Condvar,
}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Waiting),
            cond: Condvar::new(),
        })
    }

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
    /// Highest outbox seq written to RocksDB.
    written_seq: u64,
    /// Whether a thread is fsyncing the write-ahead log right now.
    syncing: bool,
    /// Groups written and waiting for an fsync: version, members' slots.
    awaiting: Vec<(u64, Vec<Arc<Slot>>)>,
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
            // `clear` costs the map's capacity, not its length: skip it when
            // empty, and give back what a burst of writes grew it to.
            if !self.writes.is_empty() {
                self.writes.clear();
                self.writes.shrink_to(TRIM_AT);
            }
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
    /// Highest outbox seq known to be on disk (covered by an fsync). Starts
    /// at 0: what a reopen recovered may sit in the page cache only.
    durable_seq: AtomicU64,
    /// Fsyncs left before injected failures start (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) fsyncs_before_failure: AtomicU64,
    /// Group writes left before injected failures start (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) writes_before_failure: AtomicU64,
    /// Sleep before each fsync, in microseconds (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) fsync_delay_micros: AtomicU64,
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
                written_seq: 0,
                syncing: false,
                awaiting: Vec::new(),
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
            durable_seq: AtomicU64::new(0),
            #[cfg(feature = "failpoints")]
            fsyncs_before_failure: AtomicU64::new(u64::MAX),
            #[cfg(feature = "failpoints")]
            writes_before_failure: AtomicU64::new(u64::MAX),
            #[cfg(feature = "failpoints")]
            fsync_delay_micros: AtomicU64::new(0),
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
        let outcome = if !st.leader {
            st.leader = true;
            let mut group = std::mem::take(&mut st.spare);
            group.push(pending);
            drop(st);
            match self.lead(inner, group, false) {
                Own::Done(r) => r,
                Own::Wait(slot) => self.wait(inner, &slot),
            }
        } else {
            let slot = Slot::new();
            st.queue.push(Pending {
                slot: Some(slot.clone()),
                ..pending
            });
            drop(st);
            self.wait(inner, &slot)
        };
        outcome
            .map(|()| Assigned { seqs })
            .map_err(|cause| Error::Poisoned { cause })
    }

    /// Waits until `slot` says the commit is done, taking on the roles the
    /// pipeline hands to it meanwhile (leader, fsyncer).
    fn wait(&self, inner: &Inner, slot: &Arc<Slot>) -> std::result::Result<(), String> {
        // Yield a few times before sleeping: a commit is often done within
        // microseconds, and a thread that sleeps is woken late (on a VM the
        // idle CPU it would run on has to be woken through the hypervisor).
        // Measured on the 2-vCPU VM, one run each: 16-thread Sync commits
        // ~62k/s without, ~77k/s with (benches/commit_ratio.rs).
        for _ in 0..SPIN_YIELDS {
            if !matches!(*slot.state.lock(), SlotState::Waiting) {
                break;
            }
            std::thread::yield_now();
        }
        let mut guard = slot.state.lock();
        loop {
            match std::mem::replace(&mut *guard, SlotState::Waiting) {
                SlotState::Waiting => slot.cond.wait(&mut guard),
                SlotState::Done(r) => return r,
                SlotState::Lead => {
                    drop(guard);
                    let group = std::mem::take(&mut self.state.lock().queue);
                    // This commit is the group's first member and has a
                    // slot: `lead` reports through it.
                    self.lead(inner, group, true);
                    guard = slot.state.lock();
                }
                SlotState::Sync => {
                    drop(guard);
                    self.sync_loop(inner, self.state.lock());
                    guard = slot.state.lock();
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
    /// leadership to the first waiting commit.
    ///
    /// A group with a `Sync` member hands leadership on right after its
    /// write, joins the groups waiting for an fsync and, if no fsync is
    /// running, runs [`Pipeline::sync_loop`]; so the next group is written
    /// while this one is fsynced.
    ///
    /// `has_slot` says whether the caller's commit (the first group's first
    /// member) has a slot: then its result goes there and this returns
    /// `Own::Done(Ok(()))`; otherwise this returns the result, or a slot to
    /// wait on when the result depends on an fsync.
    fn lead(&self, inner: &Inner, mut group: Vec<Pending>, has_slot: bool) -> Own {
        let mut own = None;
        let mut rounds = 1;
        loop {
            let mut written = Self::write_group(inner, &mut group);
            let mut st = self.state.lock();
            if st.spare.capacity() < group.capacity() {
                st.spare = std::mem::take(&mut group);
            }
            let outcome = match written.outcome {
                Ok(version) => {
                    st.visible_version = st.visible_version.max(version);
                    if let Some(seq) = written.last_seq {
                        st.written_seq = st.written_seq.max(seq);
                        if written.synced {
                            self.durable_seq.fetch_max(seq, Ordering::AcqRel);
                        }
                    }
                    self.visible.notify_all();
                    Ok(version)
                }
                Err(cause) => Err(self.fail(&mut st, cause)),
            };
            let mut failed = Vec::new();
            let mut next = None;
            if st.queue.is_empty() {
                st.leader = false;
            } else if st.poisoned.is_some() {
                failed = std::mem::take(&mut st.queue);
                st.leader = false;
            } else if !written.sync && rounds < LEADER_ROUNDS {
                next = Some(std::mem::take(&mut st.queue));
            } else if let Some(slot) = st.queue.first().and_then(|p| p.slot.as_ref()) {
                slot.set(SlotState::Lead);
            }
            st.trim_writes();
            let cause = st.poisoned.clone().unwrap_or_default();
            let mut sync_now = None;
            if let (Ok(version), true) = (&outcome, written.sync) {
                if own.is_none() && !has_slot {
                    let slot = Slot::new();
                    written.slots.push(slot.clone());
                    own = Some(Own::Wait(slot));
                }
                st.awaiting
                    .push((*version, std::mem::take(&mut written.slots)));
                if st.syncing {
                    drop(st);
                } else {
                    st.syncing = true;
                    sync_now = Some(st);
                }
            } else {
                if let (Ok(_), Some(seq)) = (&outcome, written.last_seq) {
                    inner.notifier.publish(seq);
                }
                drop(st);
                let outcome = outcome.map(|_| ());
                own.get_or_insert(Own::Done(if has_slot { Ok(()) } else { outcome.clone() }));
                for slot in written.slots {
                    slot.set(SlotState::Done(outcome.clone()));
                }
            }
            for slot in failed.into_iter().filter_map(|p| p.slot) {
                slot.set(SlotState::Done(Err(cause.clone())));
            }
            if let Some(st) = sync_now {
                self.sync_loop(inner, st);
            }
            match next {
                Some(g) => {
                    group = g;
                    rounds += 1;
                }
                None => break,
            }
        }
        own.unwrap_or(Own::Done(Ok(())))
    }

    /// Poisons the store with `cause` (keeping an earlier cause) and wakes
    /// everyone who waits on the pipeline; returns the cause to report.
    fn fail(&self, st: &mut State, cause: String) -> String {
        if st.poisoned.is_none() {
            tracing::error!(%cause, "outboxkv commit failed; store is poisoned");
        }
        let cause = st.poisoned.get_or_insert(cause).clone();
        self.visible.notify_all();
        cause
    }

    /// Fsyncs the write-ahead log for the groups waiting for it. The caller
    /// has set `syncing` (under `st`): at most one fsync runs at a time, and
    /// each covers every group written before it started. It repeats while
    /// groups wrote meanwhile wait (up to `SYNC_ROUNDS` fsyncs, then it hands
    /// the role to a waiting commit). After each fsync it publishes the
    /// outbox seqs made durable (under the state lock, so before any commit
    /// it covered is told it is done), then wakes the covered commits.
    fn sync_loop<'p>(&'p self, inner: &Inner, mut st: MutexGuard<'p, State>) {
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (cover, cover_seq) = (st.visible_version, st.written_seq);
            let synced = match &st.poisoned {
                Some(cause) => Err(cause.clone()),
                None => MutexGuard::unlocked(&mut st, || self.fsync(inner)),
            };
            let outcome = match synced {
                Ok(()) => {
                    self.durable_seq.fetch_max(cover_seq, Ordering::AcqRel);
                    if cover_seq > 0 {
                        inner.notifier.publish(cover_seq);
                    }
                    Ok(())
                }
                Err(cause) => Err(self.fail(&mut st, cause)),
            };
            // Groups written during the fsync stay (unless it failed: then
            // every waiting group fails with it).
            let failed = outcome.is_err();
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.awaiting)
                .into_iter()
                .partition(|(version, _)| failed || *version <= cover);
            st.awaiting = waiting;
            let mut again = !st.awaiting.is_empty();
            if again && rounds >= SYNC_ROUNDS {
                // Hand the role (`syncing` stays set) to a waiting commit.
                let next = st.awaiting.iter().find_map(|(_, s)| s.first()).cloned();
                if let Some(slot) = next {
                    slot.set(SlotState::Sync);
                    again = false;
                }
            } else if !again {
                st.syncing = false;
            }
            drop(st);
            for slot in done.into_iter().flat_map(|(_, slots)| slots) {
                slot.set(SlotState::Done(outcome.clone()));
            }
            if !again {
                return;
            }
            st = self.state.lock();
        }
    }

    /// Highest outbox seq known to be on disk.
    pub(crate) fn durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// Makes every outbox entry up to `through` durable: returns at once if
    /// an fsync already covered it, else fsyncs the write-ahead log (which
    /// covers everything written before). A failed fsync poisons the store.
    pub(crate) fn make_durable(&self, inner: &Inner, through: u64) -> Result<()> {
        if self.durable_seq() >= through {
            return Ok(());
        }
        let cover = {
            let st = self.state.lock();
            if let Some(cause) = &st.poisoned {
                return Err(Error::Poisoned {
                    cause: cause.clone(),
                });
            }
            st.written_seq
        };
        match self.fsync(inner) {
            Ok(()) => {
                self.durable_seq.fetch_max(cover, Ordering::AcqRel);
                Ok(())
            }
            Err(cause) => Err(Error::Poisoned {
                cause: self.fail(&mut self.state.lock(), cause),
            }),
        }
    }

    /// Fsyncs RocksDB's write-ahead log (`SyncWAL`).
    fn fsync(&self, inner: &Inner) -> std::result::Result<(), String> {
        #[cfg(feature = "failpoints")]
        if failpoint(&self.fsyncs_before_failure) {
            return Err("injected fsync failure (failpoints)".to_string());
        }
        #[cfg(feature = "failpoints")]
        match self.fsync_delay_micros.load(Ordering::Acquire) {
            0 => {}
            us => std::thread::sleep(std::time::Duration::from_micros(us)),
        }
        inner
            .db
            .flush_wal(true)
            .map_err(|e| format!("write-ahead log fsync failed: {e}"))
    }

    /// One RocksDB write for the whole group: without fsync, unless a member
    /// asked for `Sync` and the fsync is not pipelined
    /// ([`StoreOptions::pipelined_fsync`](crate::StoreOptions::pipelined_fsync)).
    fn write_group(inner: &Inner, group: &mut Vec<Pending>) -> Written {
        let mut sync = group.iter().any(|p| p.sync);
        let version = group.iter().map(|p| p.version).max().unwrap_or(0);
        let last_seq = group.iter().filter_map(|p| p.last_seq).max();
        let synced = sync && !inner.opts.pipelined_fsync;
        let opts = if synced {
            // Durable when the write returns: nothing left to fsync.
            sync = false;
            inner.write_options(Durability::Sync)
        } else {
            inner.write_options(Durability::Buffered)
        };
        let merged = (group.len() > 1).then(|| merge(group));
        let mut slots = Vec::new();
        let mut single = None;
        for p in group.drain(..) {
            slots.extend(p.slot);
            single = Some(p.batch);
        }
        let written = match merged.or(single) {
            #[cfg(feature = "failpoints")]
            Some(_) if failpoint(&inner.pipeline.writes_before_failure) => {
                // Fail as a stalled disk does: late, while commits queue up.
                std::thread::sleep(std::time::Duration::from_millis(2));
                Err("injected write failure (failpoints)".to_string())
            }
            Some(b) => inner
                .db
                .write_opt(b, opts)
                .map_err(|e| format!("commit write failed: {e}")),
            None => Ok(()),
        };
        Written {
            outcome: written.map(|()| version),
            slots,
            last_seq,
            sync,
            synced,
        }
    }
}

/// Lets one pass through a failpoint; true (fail) once the passes `left`
/// allowed are used up.
#[cfg(feature = "failpoints")]
fn failpoint(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        Some(n.saturating_sub(1))
    }) == Ok(0)
}

/// The caller's own commit, as [`Pipeline::lead`] leaves it.
enum Own {
    /// Its result.
    Done(std::result::Result<(), String>),
    /// Its result will be set on this slot (after an fsync).
    Wait(Arc<Slot>),
}

/// What [`Pipeline::write_group`] did.
struct Written {
    /// The group's highest version, or why the write failed.
    outcome: std::result::Result<u64, String>,
    /// The members' wake-up slots (the leader has none).
    slots: Vec<Arc<Slot>>,
    /// The group's last outbox seq, if it emitted events.
    last_seq: Option<u64>,
    /// Whether the group still needs an fsync.
    sync: bool,
    /// Whether the write itself was fsynced (`sync=true`).
    synced: bool,
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
