//! The commit pipeline: conflict detection, seq assignment and group commit.
//!
//! A commit arrives with everything that can be done without the pipeline's
//! lock done already: its table writes in a RocksDB batch, the hashes of
//! its keys, and its outbox entries encoded with placeholder seqs
//! ([`EncodedEntries`]). Then it passes through one short critical section
//! (`State`), whose cost does not depend on the size of the commit's
//! values or events, where it
//!
//! 1. is validated against the [conflict index](super::conflict): each key
//!    it read with `get_for_update` must not have been written by a commit
//!    ordered after the transaction's snapshot (optimistic concurrency
//!    control, which makes read-modify-write serializable), and its own
//!    writes are recorded there;
//! 2. gets the next commit version and a contiguous run of outbox seqs;
//! 3. is appended to the queue of ordered, not yet written commits.
//!
//! The leader seals each commit's entries with their seqs (a few fixed-width
//! fields and a CRC combination per entry) when it builds the group's write.
//!
//! One committer at a time is the *leader*: it takes the queue (up to about
//! `GROUP_BYTES` of it), merges the batches into one RocksDB write (without
//! fsync), writes what queued up meanwhile the same way for a few rounds,
//! then hands leadership to the first commit still queued. Async commits
//! never lead: their roles go to the store's commit threads (`driver`),
//! whose lead thread keeps leading while commits queue (it has no fsync to
//! run and no commit of its own to go back to). Because groups are written
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
//! is what keeps seqs gap-free and unambiguous. Every group write checks for
//! poisoning first, so a group handed to a new leader after a failure is
//! failed as [`WriteOutcome::NotWritten`] (a `Buffered` group whose write
//! began before the failure was noticed is still acknowledged: it was
//! written as if before the failure); members of a group whose write or
//! fsync failed get [`WriteOutcome::Unknown`].

mod driver;
mod slot;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard};
use rocksdb::WriteBatch;

use super::conflict::{ConflictIndex, ExpiredBy, Limits, Stats, Ticket, Verdict};
use super::engine::medium::WriteSite;
use super::engine::{CF_OUTBOX, seq_key};
use super::handle::Inner;
use super::options::Durability;
use super::tx::WriteSet;
use crate::error::{Error, Result, WriteOutcome};
use crate::invariant::invariant;
use crate::outbox::entry::{EncodedEntries, MAX_SEQ, now_micros};
use driver::{Drivers, Role};
pub(crate) use slot::SlotWait;
use slot::{Done, Slot, SlotState, Waiter};

/// Size of a RocksDB write batch header: 8-byte sequence, 4-byte count.
pub(crate) const BATCH_HEADER: usize = 12;
/// Groups one leader writes in a row before handing leadership on.
const LEADER_ROUNDS: u32 = 8;
/// Fsyncs one thread runs in a row before handing the role on.
const SYNC_ROUNDS: u32 = 4;
/// Times a waiting commit yields its CPU before it sleeps.
const SPIN_YIELDS: u32 = 10;
/// A group takes commits off the queue until their batches and entries
/// reach about this many bytes (at least one commit): with many async
/// commits queued, one merged write (and its copy) stays bounded.
const GROUP_BYTES: usize = 32 << 20;

/// A key read with `get_for_update`.
pub(crate) struct ReadRecord {
    pub hash: u64,
    pub table: &'static str,
    pub key: Vec<u8>,
    pub render: fn(&[u8]) -> String,
}

/// A transaction registered as a reader of the conflict index. Dropping it
/// unregisters the reader; a commit hands it to the pipeline, which
/// validates and unregisters it under its lock. So no path (an early
/// return, an error, a panic in a `Key` impl) leaves a reader registered.
pub(crate) struct Registration<'p> {
    pipeline: &'p Pipeline,
    ticket: Option<Ticket>,
}

impl Registration<'_> {
    fn take(&mut self) -> Option<Ticket> {
        self.ticket.take()
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.pipeline.state.lock().conflicts.release(&ticket);
        }
    }
}

/// What a transaction hands to the pipeline.
pub(crate) struct Request<'a> {
    /// The reader registration, if the transaction read.
    pub reader: Option<Registration<'a>>,
    /// Keys read with `get_for_update`, to validate.
    pub reads: &'a [ReadRecord],
    /// The keys written (their hashes computed before the lock is taken).
    pub writes: &'a WriteSet,
    /// The table writes.
    pub batch: WriteBatch,
    /// The outbox entries, sealed with their seqs by the leader.
    pub entries: EncodedEntries,
    pub sync: bool,
}

struct Pending {
    batch: WriteBatch,
    entries: EncodedEntries,
    first_seq: u64,
    created_at: u64,
    sync: bool,
    version: u64,
    last_seq: Option<u64>,
    slot: Option<Arc<Slot>>,
}

/// Why a commit failed inside the pipeline (reported as [`Error::Poisoned`]).
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    cause: String,
    outcome: WriteOutcome,
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
    /// What commits are validated against (see `store::conflict`).
    conflicts: ConflictIndex,
    queue: Vec<Pending>,
    leader: bool,
    poisoned: Option<String>,
    /// Reused (empty) group vector.
    spare: Vec<Pending>,
}

/// Why validation refused a commit, rendered once the lock is released
/// (rendering a key runs the caller's `Key` impl).
enum Refused {
    Conflict(usize),
    Error(Error),
}

impl Refused {
    /// The error for the caller (rendering a conflicting key runs the
    /// caller's `Key` impl: call it without the lock).
    fn into_error(self, reads: &[ReadRecord]) -> Error {
        match self {
            Refused::Error(e) => e,
            Refused::Conflict(i) => {
                let r = &reads[i];
                Error::Conflict {
                    table: r.table.to_string(),
                    key: (r.render)(&r.key),
                }
            }
        }
    }
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Error(e)
    }
}

pub(crate) struct Pipeline {
    state: Mutex<State>,
    /// Set (after `State::poisoned`) when the store is poisoned: checked
    /// before every group write without taking the lock.
    poisoned: AtomicBool,
    /// Signalled when `visible_version` advances or the store is poisoned.
    visible: Condvar,
    /// The tail: first seq still in the outbox (advanced by pruning only,
    /// through [`Pipeline::advance_tail`]).
    tail: AtomicU64,
    /// The durable head: highest outbox seq known to be on disk (covered by
    /// an fsync). Starts at the head an open recovered, which RocksDB's
    /// recovery wrote to fsynced table files (see [`Pipeline::new`]).
    /// INV-DURABLE: never above the written seq.
    durable_head: AtomicU64,
    /// Async commits waiting for `visible_version` to advance (a retry
    /// after a conflict, [`Pipeline::visible`]); woken after each group
    /// write, outside the state lock.
    visible_wakers: Mutex<Vec<Waker>>,
    /// The threads that do the pipeline's work for async commits.
    drivers: Drivers,
}

/// Outcome of a successful commit.
pub(crate) struct Assigned {
    pub seqs: Range<u64>,
}

impl Pipeline {
    /// A pipeline for a store whose next outbox seq is `next_seq`. Every
    /// entry below it must be on disk already: a RocksDB open (with
    /// `avoid_flush_during_recovery` false, its default, see
    /// `engine::rocksdb_options`) flushes what it replayed from the log to
    /// fsynced table files before it returns. So the durable head starts at
    /// `next_seq - 1`: a relay draining a recovered backlog pays no fsync
    /// for it, and `durable_head()` is true from the start.
    pub(crate) fn new(next_seq: u64, tail: u64, limits: Limits) -> Pipeline {
        Pipeline {
            state: Mutex::new(State {
                version: 0,
                visible_version: 0,
                // What a reopen recovered is written, and on disk (RocksDB's
                // recovery flush).
                written_seq: next_seq - 1,
                syncing: false,
                awaiting: Vec::new(),
                next_seq,
                conflicts: ConflictIndex::new(limits),
                queue: Vec::new(),
                leader: false,
                poisoned: None,
                spare: Vec::new(),
            }),
            poisoned: AtomicBool::new(false),
            visible: Condvar::new(),
            tail: AtomicU64::new(tail),
            durable_head: AtomicU64::new(next_seq - 1),
            visible_wakers: Mutex::new(Vec::new()),
            drivers: Drivers::default(),
        }
    }

    /// The tail: the first seq not pruned (INV-TAIL: pruned-through + 1).
    pub(crate) fn tail(&self) -> u64 {
        self.tail.load(Ordering::Acquire)
    }

    /// Moves the tail to `tail` once a prune that deleted everything below
    /// it is written. The tail never goes back.
    pub(crate) fn advance_tail(&self, tail: u64) {
        let before = self.tail.fetch_max(tail, Ordering::AcqRel);
        invariant!(
            before <= tail,
            "INV-TAIL: the tail would go back from {before} to {tail}"
        );
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

    /// Registers a transaction as a reader of the conflict index, with the
    /// visible version as its snapshot version. Take the RocksDB snapshot
    /// after this call (it then shows at least that version).
    pub(crate) fn begin_read(&self) -> Registration<'_> {
        let mut st = self.state.lock();
        let visible = st.visible_version;
        let ticket = st.conflicts.register(visible, Instant::now());
        Registration {
            pipeline: self,
            ticket: Some(ticket),
        }
    }

    /// The conflict index's counters.
    pub(crate) fn conflict_stats(&self) -> Stats {
        self.state.lock().conflicts.stats()
    }

    /// `Err(Error::Poisoned)` (nothing written) once the store is poisoned.
    pub(crate) fn check_poisoned(&self) -> Result<()> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.state.lock().poisoned.clone() {
            Some(cause) => Err(Error::Poisoned {
                cause,
                outcome: WriteOutcome::NotWritten,
            }),
            None => Ok(()),
        }
    }

    /// Marks the store unusable for writes after a failed write outside
    /// the pipeline (pruning, dead letters, flush); returns the error for
    /// the caller, whose own write's outcome is unknown.
    pub(crate) fn poison(&self, cause: String) -> Error {
        let failure = self.fail(
            &mut self.state.lock(),
            Failure {
                cause,
                outcome: WriteOutcome::Unknown,
            },
        );
        failure.into()
    }

    /// Takes the state lock and orders `req` ([`Pipeline::order`]); on
    /// refusal, releases the lock before freeing the request and rendering
    /// the error.
    fn order_locked<'p>(
        &'p self,
        inner: &Inner,
        req: Request<'_>,
    ) -> Result<(MutexGuard<'p, State>, Pending, Range<u64>)> {
        let reads = req.reads;
        let mut st = self.state.lock();
        match self.order(inner, &mut st, req) {
            Ok((pending, seqs)) => Ok((st, pending, seqs)),
            Err((refused, req)) => {
                drop(st);
                // A refused commit's batch and entries are freed here, not
                // under the lock.
                drop(req);
                Err(refused.into_error(reads))
            }
        }
    }

    pub(crate) fn commit(&self, inner: &Inner, req: Request<'_>) -> Result<Assigned> {
        let (mut st, pending, seqs) = self.order_locked(inner, req)?;
        let outcome = if !st.leader {
            st.leader = true;
            let mut group = std::mem::take(&mut st.spare);
            group.push(pending);
            drop(st);
            match self.lead(inner, group, false, false) {
                Own::Done(r) => r,
                Own::Wait(slot) => self.wait(inner, &slot),
            }
        } else {
            let slot = Slot::new(Waiter::Thread);
            st.queue.push(Pending {
                slot: Some(slot.clone()),
                ..pending
            });
            drop(st);
            self.wait(inner, &slot)
        };
        outcome.map(|()| Assigned { seqs }).map_err(Error::from)
    }

    /// Orders the commit of an async caller like [`Pipeline::commit`], then
    /// returns at once with a future of its outcome: it never writes or
    /// fsyncs on the caller's thread. When no leader is running, the
    /// store's lead commit thread (`driver`) is handed the queue; roles
    /// that would come to this commit go to the commit threads too.
    ///
    /// Once this returns `Ok`, the commit is ordered: it is written (or
    /// fails with the store) whether or not the future is polled.
    pub(crate) fn commit_async(
        &self,
        inner: &Arc<Inner>,
        req: Request<'_>,
    ) -> Result<(SlotWait, Range<u64>)> {
        self.drivers.start(inner)?;
        let (mut st, pending, seqs) = self.order_locked(inner, req)?;
        let slot = Slot::new(Waiter::Task);
        st.queue.push(Pending {
            slot: Some(slot.clone()),
            ..pending
        });
        let lead = !std::mem::replace(&mut st.leader, true);
        drop(st);
        if lead {
            self.give(Role::Lead);
        }
        Ok((SlotWait { slot }, seqs))
    }

    /// Takes on `role` for async commits, on a commit thread.
    fn drive(&self, inner: &Inner, role: Role) {
        match role {
            Role::Lead => {
                // Given with the queue not empty, and no one else takes it
                // while this thread holds the leadership.
                let group = take_group(&mut self.state.lock());
                self.lead(inner, group, true, true);
            }
            Role::Sync => self.sync_loop(inner, self.state.lock(), true),
        }
    }

    /// Hands `role` to the commit waiting on `slot`: to its thread, or for
    /// an async commit, to the store's commit thread for the role.
    fn hand(&self, slot: &Slot, role: Role) {
        match slot.waiter {
            Waiter::Thread => slot.set(match role {
                Role::Lead => SlotState::Lead,
                Role::Sync => SlotState::Sync,
            }),
            Waiter::Task => self.give(role),
        }
    }

    fn give(&self, role: Role) {
        // A task slot exists only after `commit_async` started them.
        let given = self.drivers.give(role);
        invariant!(
            given,
            "INV-DRIVER: {role:?} handed to commit threads that never started"
        );
    }

    /// Stops the commit threads (after the roles they were given) and
    /// waits for them; the last `Store` handle calls it.
    pub(crate) fn stop_drivers(&self) {
        self.drivers.stop();
    }

    /// Resolves once every commit ordered so far is visible to readers (or
    /// the store is poisoned): the async form of [`Pipeline::wait_visible`].
    pub(crate) fn visible(&self) -> Visible<'_> {
        Visible {
            pipeline: self,
            target: self.state.lock().version,
        }
    }

    fn reached(&self, target: u64) -> bool {
        let st = self.state.lock();
        st.visible_version >= target || st.poisoned.is_some()
    }

    /// Wakes the async commits waiting for [`Pipeline::visible`]. Call it
    /// without the state lock held.
    fn wake_visible(&self) {
        let wakers = std::mem::take(&mut *self.visible_wakers.lock());
        for w in wakers {
            w.wake();
        }
    }

    /// Waits until `slot` says the commit is done, taking on the roles the
    /// pipeline hands to it meanwhile (leader, fsyncer).
    fn wait(&self, inner: &Inner, slot: &Arc<Slot>) -> Done {
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
                    let group = take_group(&mut self.state.lock());
                    // This commit is the group's first member and has a
                    // slot: `lead` reports through it.
                    self.lead(inner, group, true, false);
                    guard = slot.state.lock();
                }
                SlotState::Sync => {
                    drop(guard);
                    self.sync_loop(inner, self.state.lock(), false);
                    guard = slot.state.lock();
                }
            }
        }
    }

    /// Validates and orders one commit (under the state lock). Runs no code
    /// of the caller's and does work proportional to the number of keys the
    /// commit read and wrote, not to the size of its values or events. A
    /// refused request is handed back, to be freed outside the lock (both
    /// variants carry the request's parts by value on purpose).
    #[allow(clippy::result_large_err)]
    fn order<'r>(
        &self,
        inner: &Inner,
        st: &mut State,
        mut req: Request<'r>,
    ) -> std::result::Result<(Pending, Range<u64>), (Refused, Request<'r>)> {
        // Validate, then unregister at once: every path below releases it.
        let ticket = req.reader.as_mut().and_then(Registration::take);
        let verdict = match &ticket {
            Some(t) if !req.reads.is_empty() => {
                let age = t.since.elapsed();
                if age > inner.opts.max_transaction_age {
                    st.conflicts.count_expired();
                    Err(Verdict::Expired(ExpiredBy::Age))
                } else {
                    st.conflicts.validate(t, req.reads.iter().map(|r| r.hash))
                }
            }
            _ => Ok(()),
        };
        if let Some(t) = &ticket {
            st.conflicts.release(t);
        }
        if let Some(cause) = &st.poisoned {
            let e = Error::Poisoned {
                cause: cause.clone(),
                outcome: WriteOutcome::NotWritten,
            };
            return Err((e.into(), req));
        }
        match verdict {
            Ok(()) => {}
            Err(Verdict::Conflict(i)) => return Err((Refused::Conflict(i), req)),
            Err(Verdict::Expired(by)) => {
                let open_for = ticket.map(|t| t.since.elapsed()).unwrap_or_default();
                let e = Error::TransactionExpired {
                    open_for,
                    limit: match by {
                        ExpiredBy::Age => "max_transaction_age",
                        ExpiredBy::Size => "max_conflict_index_keys",
                    },
                };
                return Err((e.into(), req));
            }
        }
        let adding = req.entries.len() as u64;
        if let Some(limit) = inner.opts.max_outbox_depth {
            let depth = st.next_seq - self.tail();
            if adding > 0 && depth + adding > limit {
                let e = Error::OutboxFull {
                    depth,
                    adding,
                    limit,
                };
                return Err((e.into(), req));
            }
        }
        let first = st.next_seq;
        // The last seq assigned stays at or below MAX_SEQ.
        let Some(next) = first.checked_add(adding).filter(|&n| n <= MAX_SEQ + 1) else {
            let e = Error::InvalidArgument(format!(
                "outbox seqs are used up: next seq {first}, this commit adds {adding}, \
                 the highest is {MAX_SEQ}"
            ));
            return Err((e.into(), req));
        };
        st.version += 1;
        let version = st.version;
        st.next_seq = next;
        st.conflicts.record(version, req.writes.hashes());
        let pending = Pending {
            batch: req.batch,
            entries: req.entries,
            first_seq: first,
            // Taken in commit order: entry times do not go back in seq
            // (unless the wall clock does).
            created_at: now_micros(),
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
    ///
    /// `on_driver` says that the caller is the lead commit thread: then a
    /// group's fsyncs go to the fsync commit thread, and this goes on
    /// leading.
    fn lead(&self, inner: &Inner, mut group: Vec<Pending>, has_slot: bool, on_driver: bool) -> Own {
        let mut own = None;
        let mut rounds = 1;
        loop {
            let mut written = if self.poisoned.load(Ordering::Acquire) {
                // A failure (say, an fsync) after this group was ordered:
                // it is not written at all.
                Written::refused(&mut group)
            } else {
                Self::write_group(inner, &mut group)
            };
            let mut st = self.state.lock();
            if st.spare.capacity() < group.capacity() {
                st.spare = std::mem::take(&mut group);
            }
            let outcome = match written.outcome {
                Ok(version) => {
                    // Groups are written strictly in version order.
                    invariant!(
                        version > st.visible_version && version <= st.version,
                        "INV-ORDER: group version {version} written after version {} (last ordered {})",
                        st.visible_version,
                        st.version
                    );
                    st.visible_version = version;
                    if let Some(seq) = written.last_seq {
                        st.written_seq = st.written_seq.max(seq);
                        if written.synced {
                            self.raise_durable_head(st.written_seq, seq);
                        }
                    }
                    self.visible.notify_all();
                    Ok(version)
                }
                Err(failure) => Err(self.fail(&mut st, failure)),
            };
            let mut failed = Vec::new();
            let mut next = None;
            if st.queue.is_empty() {
                st.leader = false;
            } else if st.poisoned.is_some() {
                failed = std::mem::take(&mut st.queue);
                st.leader = false;
            } else if on_driver || (!written.sync && rounds < LEADER_ROUNDS) {
                // The lead commit thread goes on leading: it has no commit
                // of its own to go back to, and no fsync to run.
                next = Some(take_group(&mut st));
            } else if let Some(slot) = st.queue.first().and_then(|p| p.slot.as_ref()) {
                self.hand(slot, Role::Lead);
            }
            let visible = st.visible_version;
            st.conflicts.trim(visible, Instant::now);
            let not_written = Failure {
                cause: st.poisoned.clone().unwrap_or_default(),
                outcome: WriteOutcome::NotWritten,
            };
            let mut sync_now = false;
            if let (Ok(version), true) = (&outcome, written.sync) {
                if own.is_none() && !has_slot {
                    let slot = Slot::new(Waiter::Thread);
                    written.slots.push(slot.clone());
                    own = Some(Own::Wait(slot));
                }
                st.awaiting
                    .push((*version, std::mem::take(&mut written.slots)));
                sync_now = !std::mem::replace(&mut st.syncing, true);
                drop(st);
            } else {
                // Wakers run outside the lock (a waker may drop a
                // transaction, whose registration takes the lock).
                drop(st);
                if let (Ok(_), Some(seq)) = (&outcome, written.last_seq) {
                    inner.notifier.publish(seq);
                }
                let outcome = outcome.map(|_| ());
                own.get_or_insert(Own::Done(if has_slot { Ok(()) } else { outcome.clone() }));
                for slot in written.slots {
                    slot.set(SlotState::Done(outcome.clone()));
                }
            }
            self.wake_visible();
            if sync_now {
                if on_driver {
                    self.give(Role::Sync);
                } else {
                    self.sync_loop(inner, self.state.lock(), false);
                }
            }
            // After the lock is released (`sync_loop` releases it): the
            // failed commits' batches are freed here.
            for slot in failed.into_iter().filter_map(|p| p.slot) {
                slot.set(SlotState::Done(Err(not_written.clone())));
            }
            match next {
                Some(g) => {
                    group = g;
                    rounds = rounds.saturating_add(1);
                }
                None => break,
            }
        }
        own.unwrap_or(Own::Done(Ok(())))
    }

    /// Poisons the store with the failure's cause (keeping an earlier
    /// cause) and wakes everyone who waits on the pipeline; returns the
    /// failure to report (with the first cause).
    fn fail(&self, st: &mut State, failure: Failure) -> Failure {
        if st.poisoned.is_none() {
            tracing::error!(cause = %failure.cause, "outboxkv write failed; store is poisoned");
        }
        let cause = st.poisoned.get_or_insert(failure.cause).clone();
        self.poisoned.store(true, Ordering::Release);
        self.visible.notify_all();
        Failure {
            cause,
            outcome: failure.outcome,
        }
    }

    /// Fsyncs the write-ahead log for the groups waiting for it. The caller
    /// has set `syncing` (under `st`): at most one fsync runs at a time, and
    /// each covers every group written before it started. It repeats while
    /// groups wrote meanwhile wait (up to `SYNC_ROUNDS` fsyncs, then it hands
    /// the role to a waiting commit). After each fsync it publishes the
    /// outbox seqs made durable (before any commit it covered is told it is
    /// done), then wakes the covered commits.
    ///
    /// On the fsync commit thread (`on_driver`) it does not hand the role
    /// on: it runs fsyncs until no group waits.
    fn sync_loop<'p>(&'p self, inner: &Inner, mut st: MutexGuard<'p, State>, on_driver: bool) {
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (cover, cover_seq) = (st.visible_version, st.written_seq);
            let synced = match &st.poisoned {
                Some(cause) => Err(cause.clone()),
                None => MutexGuard::unlocked(&mut st, || self.fsync(inner)),
            };
            // Written, but maybe not durable: the outcome is unknown.
            let synced = synced.map_err(|cause| Failure {
                cause,
                outcome: WriteOutcome::Unknown,
            });
            let outcome = match synced {
                Ok(()) => {
                    self.raise_durable_head(st.written_seq, cover_seq);
                    Ok(())
                }
                Err(failure) => Err(self.fail(&mut st, failure)),
            };
            // Groups written during the fsync stay (unless it failed: then
            // every waiting group fails with it).
            let failed = outcome.is_err();
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.awaiting)
                .into_iter()
                .partition(|(version, _)| failed || *version <= cover);
            st.awaiting = waiting;
            let mut again = !st.awaiting.is_empty();
            if again && rounds >= SYNC_ROUNDS && !on_driver {
                // Hand the role (`syncing` stays set) to a waiting commit.
                let next = st.awaiting.iter().find_map(|(_, s)| s.first()).cloned();
                if let Some(slot) = next {
                    self.hand(&slot, Role::Sync);
                    again = false;
                }
            } else if !again {
                st.syncing = false;
            }
            drop(st);
            // Announce the seqs made durable before any commit the fsync
            // covered is told it is done (outside the lock: wakers run).
            if outcome.is_ok() && cover_seq > 0 {
                inner.notifier.publish(cover_seq);
            }
            for slot in done.into_iter().flat_map(|(_, slots)| slots) {
                slot.set(SlotState::Done(outcome.clone()));
            }
            if !again {
                return;
            }
            st = self.state.lock();
        }
    }

    /// The durable head: highest outbox seq known to be on disk.
    pub(crate) fn durable_head(&self) -> u64 {
        self.durable_head.load(Ordering::Acquire)
    }

    /// Raises the durable head to `seq`, which an fsync (or a synced write)
    /// just covered, when the highest seq written was `written`.
    fn raise_durable_head(&self, written: u64, seq: u64) {
        // INV-DURABLE: only what was written can be on disk.
        invariant!(
            seq <= written,
            "INV-DURABLE: durable head {seq} above the written seq {written}"
        );
        self.durable_head.fetch_max(seq, Ordering::AcqRel);
    }

    /// Makes every outbox entry up to `through` durable: returns at once if
    /// an fsync already covered it, else fsyncs the write-ahead log (which
    /// covers everything written before). A failed fsync poisons the store.
    pub(crate) fn make_durable(&self, inner: &Inner, through: u64) -> Result<()> {
        if self.durable_head() >= through {
            return Ok(());
        }
        let cover = {
            let st = self.state.lock();
            if let Some(cause) = &st.poisoned {
                return Err(Error::Poisoned {
                    cause: cause.clone(),
                    outcome: WriteOutcome::NotWritten,
                });
            }
            st.written_seq
        };
        match self.fsync(inner) {
            Ok(()) => {
                // `cover` is the written seq sampled before the fsync.
                self.raise_durable_head(cover, cover);
                Ok(())
            }
            Err(cause) => Err(self.poison(cause)),
        }
    }

    /// Fsyncs RocksDB's write-ahead log (`SyncWAL`), through the medium.
    fn fsync(&self, inner: &Inner) -> std::result::Result<(), String> {
        inner.medium.sync_wal(&inner.db)
    }

    /// One RocksDB write for the whole group: without fsync, unless a member
    /// asked for `Sync` and the fsync is not pipelined
    /// ([`StoreOptions::pipelined_fsync`](crate::StoreOptions::pipelined_fsync)).
    fn write_group(inner: &Inner, group: &mut Vec<Pending>) -> Written {
        if group.iter().any(|p| p.entries.len() > 0) {
            let outbox = match inner.cf(CF_OUTBOX) {
                Ok(cf) => cf,
                Err(e) => {
                    return Written::failed(
                        group,
                        Failure {
                            cause: format!("commit write failed: {e}"),
                            outcome: WriteOutcome::NotWritten,
                        },
                    );
                }
            };
            for p in group.iter_mut() {
                let batch = &mut p.batch;
                let sealed = p.entries.seal(p.first_seq, p.created_at, |seq, bytes| {
                    batch.put_cf(outbox, seq_key(seq), bytes);
                });
                if !sealed {
                    return Written::failed(
                        group,
                        Failure {
                            cause: "commit write failed: an outbox entry could not be sealed"
                                .into(),
                            outcome: WriteOutcome::NotWritten,
                        },
                    );
                }
            }
        }
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
            Some(b) => inner
                .medium
                .write(&inner.db, WriteSite::CommitGroup, b, opts),
            None => Ok(()),
        };
        Written {
            // A write that failed may have reached the log in part or whole.
            outcome: written.map(|()| version).map_err(|cause| Failure {
                cause,
                outcome: WriteOutcome::Unknown,
            }),
            slots,
            last_seq,
            sync,
            synced,
        }
    }
}

/// The caller's own commit, as [`Pipeline::lead`] leaves it.
enum Own {
    /// Its result.
    Done(Done),
    /// Its result will be set on this slot (after an fsync).
    Wait(Arc<Slot>),
}

/// What [`Pipeline::write_group`] did.
struct Written {
    /// The group's highest version, or why the write failed.
    outcome: std::result::Result<u64, Failure>,
    /// The members' wake-up slots (the leader has none).
    slots: Vec<Arc<Slot>>,
    /// The group's last outbox seq, if it emitted events.
    last_seq: Option<u64>,
    /// Whether the group still needs an fsync.
    sync: bool,
    /// Whether the write itself was fsynced (`sync=true`).
    synced: bool,
}

impl Written {
    /// A group that is not written because the store is poisoned.
    fn refused(group: &mut Vec<Pending>) -> Written {
        Written::failed(
            group,
            Failure {
                cause: String::new(),
                outcome: WriteOutcome::NotWritten,
            },
        )
    }

    fn failed(group: &mut Vec<Pending>, failure: Failure) -> Written {
        Written {
            outcome: Err(failure),
            slots: group.drain(..).filter_map(|p| p.slot).collect(),
            last_seq: None,
            sync: false,
            synced: false,
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        Error::Poisoned {
            cause: f.cause,
            outcome: f.outcome,
        }
    }
}

/// Takes the next group off the queue: its first commits, up to about
/// [`GROUP_BYTES`] (at least one). What stays is led next.
fn take_group(st: &mut State) -> Vec<Pending> {
    let mut bytes = 0usize;
    let mut n = 0;
    for p in &st.queue {
        let size = p.batch.data().len() + p.entries.bytes();
        if n > 0 && bytes.saturating_add(size) > GROUP_BYTES {
            break;
        }
        bytes = bytes.saturating_add(size);
        n += 1;
    }
    if n == st.queue.len() {
        std::mem::take(&mut st.queue)
    } else {
        st.queue.drain(..n).collect()
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

/// What [`Pipeline::visible`] returns.
pub(crate) struct Visible<'p> {
    pipeline: &'p Pipeline,
    target: u64,
}

impl Future for Visible<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let p = self.pipeline;
        if p.reached(self.target) {
            return Poll::Ready(());
        }
        // Registered before the second look: a group written in between
        // wakes it (`wake_visible` runs after the write is published).
        {
            let mut wakers = p.visible_wakers.lock();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
        }
        if p.reached(self.target) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
