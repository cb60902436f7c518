//! History checker for the isolation promises (in the spirit of Jepsen's
//! Elle): random transactions over many keys, some hot and most cold, that
//! read with `get_for_update` / `contains_for_update` and plain `get`, write,
//! delete, emit, abort and conflict, beside blind batches and bank transfers,
//! with per-commit durability chosen at random, blocking commits beside
//! async ones (many tasks on one runtime thread, through `write_async` and
//! `commit_async`), in every store mode (Sync /
//! Buffered x pipelined fsync on / off), with reopens between rounds, and in
//! a second harness with SIGKILLs of a child process doing the same.
//!
//! Every committing transaction writes values no other write has (its id and
//! a counter) and emits at least one event; its first event carries its
//! whole write set. So the outbox alone gives the commit order (seqs are
//! assigned in commit order) and how the state evolved. The checker then
//! replays the outbox and requires:
//!
//! - **events**: every acknowledged transaction's events are in the outbox
//!   exactly once, at the seqs its commit returned, in emit order; nothing
//!   of an aborted or conflicted transaction is; no event appears that no
//!   transaction emitted; seqs are 1..=head without a gap;
//! - **real-time order**: a transaction's events come after every event
//!   acknowledged before it started;
//! - **serializability**: every key a committed transaction read with
//!   `get_for_update` (or `contains_for_update`) still had the value read
//!   when the transaction took its place in the order: no lost update, no
//!   write skew among such keys;
//! - **snapshots**: all reads of a transaction (plain ones too, and those of
//!   read-only transactions) agree with one state of the order, taken no
//!   earlier than the transaction's start; no read returns a value that no
//!   committed transaction wrote;
//! - **state**: the table after the last round equals the replayed state,
//!   and bank transfers keep the total.
//!
//! CI runs a bounded number of rounds. The long mode:
//! `OUTBOXKV_HISTORY_ROUNDS=20 OUTBOXKV_HISTORY_TXS=20000 OUTBOXKV_HISTORY_KILLS=100
//! cargo test --release --all-features --test serializable -- --nocapture`
//! (`OUTBOXKV_HISTORY_SEED` repeats a run).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboxkv::{Durability, Error, Event, Store, Table};
use serde::{Deserialize, Serialize};

use common::TestResult;

/// Registers (keys `0..KEYS`) and bank accounts (`BANK..BANK + ACCOUNTS`).
const CELLS: Table<u32, Cell> = Table::new("cells");
const KEYS: u32 = 64;
const HOT: u32 = 4;
const BANK: u32 = 1_000;
const ACCOUNTS: u32 = 16;
const OPENING_BALANCE: i64 = 100;

/// A stored value: which write made it (unique per write) and, for bank
/// accounts, the balance.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Cell {
    tx: u64,
    n: u32,
    balance: i64,
}

/// What a read saw.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
enum Seen {
    Value(Option<Cell>),
    Exists(bool),
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
struct Read {
    key: u32,
    seen: Seen,
    /// Read with `get_for_update` / `contains_for_update`.
    tracked: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
enum Outcome {
    /// Acknowledged, with these seqs (empty for a read-only transaction).
    Committed {
        first: u64,
        end: u64,
    },
    Aborted,
    Conflict,
    /// Refused with `TransactionExpired` (the limits test).
    Expired,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Record {
    tx: u64,
    kind: String,
    reads: Vec<Read>,
    writes: Vec<(u32, Option<Cell>)>,
    events: u32,
    outcome: Outcome,
    /// The highest seq acknowledged to anyone when the (last) attempt began.
    floor: u64,
}

/// A transaction's writes, in order: key and value (`None`: deleted).
type Writes = Vec<(u32, Option<Cell>)>;

/// The payload of every event: the transaction, the event's index in it,
/// how many it emitted and (in the first) its writes.
#[derive(Serialize, Deserialize, Debug)]
struct Payload {
    tx: u64,
    i: u32,
    of: u32,
    writes: Vec<(u32, Option<Cell>)>,
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A register key: half the time one of the few hot ones.
    fn key(&mut self) -> u32 {
        if self.chance(50) {
            self.below(HOT as u64) as u32
        } else {
            HOT + self.below((KEYS - HOT) as u64) as u32
        }
    }
    fn durability(&mut self) -> Durability {
        if self.chance(50) {
            Durability::Sync
        } else {
            Durability::Buffered
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    let seed = env_u64(
        "OUTBOXKV_HISTORY_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    eprintln!("history seed: OUTBOXKV_HISTORY_SEED={seed}");
    seed
}

/// Store modes: (default durability, pipelined fsync).
const MODES: [(Durability, bool); 4] = [
    (Durability::Sync, true),
    (Durability::Sync, false),
    (Durability::Buffered, true),
    (Durability::Buffered, false),
];

fn options(mode: usize) -> outboxkv::StoreOptions {
    let (durability, pipelined) = MODES[mode % MODES.len()];
    Store::options()
        .durability(durability)
        .pipelined_fsync(pipelined)
        .max_conflict_retries(1_000)
        .relay_cursor_poll(None)
}

fn open(path: &Path, mode: usize) -> outboxkv::Result<Store> {
    options(mode).open(path)
}

/// Per-transaction recorder: the closure of `Store::write` may run more
/// than once, and only the last attempt counts.
struct Tx {
    id: u64,
    reads: Vec<Read>,
    writes: Vec<(u32, Option<Cell>)>,
    floor: u64,
}

impl Tx {
    fn start(id: u64, acked: &AtomicU64) -> Tx {
        Tx {
            id,
            reads: Vec::new(),
            writes: Vec::new(),
            floor: acked.load(Ordering::SeqCst),
        }
    }

    fn restart(&mut self, acked: &AtomicU64) {
        self.reads.clear();
        self.writes.clear();
        self.floor = acked.load(Ordering::SeqCst);
    }

    fn next_cell(&self, balance: i64) -> Cell {
        Cell {
            tx: self.id,
            n: self.writes.len() as u32,
            balance,
        }
    }

    fn get(
        &mut self,
        tx: &mut outboxkv::WriteTx<'_>,
        key: u32,
        tracked: bool,
    ) -> outboxkv::Result<Option<Cell>> {
        let v = if tracked {
            tx.get_for_update(&CELLS, &key)?
        } else {
            tx.get(&CELLS, &key)?
        };
        self.reads.push(Read {
            key,
            seen: Seen::Value(v),
            tracked,
        });
        Ok(v)
    }

    fn put(
        &mut self,
        tx: &mut outboxkv::WriteTx<'_>,
        key: u32,
        balance: i64,
    ) -> outboxkv::Result<()> {
        let cell = self.next_cell(balance);
        tx.put(&CELLS, &key, &cell)?;
        self.writes.push((key, Some(cell)));
        Ok(())
    }

    fn delete(&mut self, tx: &mut outboxkv::WriteTx<'_>, key: u32) -> outboxkv::Result<()> {
        tx.delete(&CELLS, &key)?;
        self.writes.push((key, None));
        Ok(())
    }

    /// The events this transaction emits (the first carries its writes).
    fn events(&self, n: u32) -> outboxkv::Result<Vec<Event>> {
        (0..n)
            .map(|i| {
                let payload = Payload {
                    tx: self.id,
                    i,
                    of: n,
                    writes: if i == 0 {
                        self.writes.clone()
                    } else {
                        Vec::new()
                    },
                };
                let key = format!("k{}", self.writes.first().map_or(0, |w| w.0));
                Event::json("history", key, &payload)
            })
            .collect()
    }

    fn emit(&self, tx: &mut outboxkv::WriteTx<'_>, n: u32) -> outboxkv::Result<()> {
        for e in self.events(n)? {
            tx.emit(e)?;
        }
        Ok(())
    }

    fn record(self, kind: &'static str, events: u32, outcome: Outcome) -> Record {
        Record {
            tx: self.id,
            kind: kind.to_string(),
            reads: self.reads,
            writes: self.writes,
            events,
            outcome,
            floor: self.floor,
        }
    }
}

/// The committed value of a `Store::write`, or (from the enclosing
/// function) the record of a transaction refused as expired.
macro_rules! or_expired {
    ($r:expr, $rec:ident, $kind:expr) => {
        match $r {
            Ok(c) => c,
            Err(Error::TransactionExpired { .. }) => {
                return Ok($rec.record($kind, 0, Outcome::Expired));
            }
            Err(e) => return Err(e),
        }
    };
}

fn committed(seqs: &std::ops::Range<u64>, acked: &AtomicU64) -> Outcome {
    if !seqs.is_empty() {
        acked.fetch_max(seqs.end - 1, Ordering::SeqCst);
    }
    Outcome::Committed {
        first: seqs.start,
        end: seqs.end,
    }
}

/// How a transaction commits: blocking (`Store::write`, `commit`) or
/// through the async path (`write_async`, `commit_async`), awaited by one
/// of many tasks on a runtime's thread.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Blocking,
    Async,
}

async fn write<T>(
    store: &Store,
    via: Via,
    f: impl FnMut(&mut outboxkv::WriteTx<'_>) -> outboxkv::Result<T>,
) -> outboxkv::Result<outboxkv::Committed<T>> {
    match via {
        Via::Blocking => store.write(f),
        Via::Async => store.write_async(f).await,
    }
}

async fn commit(tx: outboxkv::WriteTx<'_>, via: Via) -> outboxkv::Result<outboxkv::Committed<()>> {
    match via {
        Via::Blocking => tx.commit(),
        Via::Async => tx.commit_async().await,
    }
}

/// Runs a blocking transaction's future, which never waits.
fn blocking(
    f: impl std::future::Future<Output = outboxkv::Result<Record>>,
) -> outboxkv::Result<Record> {
    use futures_util::FutureExt;
    f.now_or_never().unwrap_or_else(|| {
        Err(Error::InvalidArgument(
            "a blocking commit did not finish".into(),
        ))
    })
}

/// Runs one random transaction of a writer and records it.
async fn writer_tx(
    store: &Store,
    rng: &mut Rng,
    id: u64,
    acked: &AtomicU64,
    via: Via,
) -> outboxkv::Result<Record> {
    let durability = rng.durability();
    let kind = rng.below(100);
    let seed = rng.next();
    let mut rec = Tx::start(id, acked);
    match kind {
        // Read-modify-write of 1-3 keys, maybe a plain read and a write of
        // an unread key too; 1-3 events.
        0..=39 => {
            let events = 1 + (seed % 3) as u32;
            let c = or_expired!(
                write(store, via, |tx| {
                    rec.restart(acked);
                    tx.set_durability(durability);
                    let mut r = Rng::new(seed);
                    let n = 1 + r.below(3);
                    let keys: Vec<u32> = (0..n).map(|_| r.key()).collect();
                    for &k in &keys {
                        rec.get(tx, k, true)?;
                    }
                    if r.chance(30) {
                        rec.get(tx, r.key(), false)?;
                    }
                    for &k in &keys {
                        if r.chance(10) {
                            rec.delete(tx, k)?;
                        } else if r.chance(80) || rec.writes.is_empty() {
                            rec.put(tx, k, 0)?;
                        }
                    }
                    if r.chance(30) {
                        rec.put(tx, r.key(), 0)?;
                    }
                    rec.emit(tx, events)
                })
                .await,
                rec,
                "rmw"
            );
            let o = committed(&c.seqs, acked);
            Ok(rec.record("rmw", events, o))
        }
        // Insert if absent.
        40..=49 => {
            let c = or_expired!(
                write(store, via, |tx| {
                    rec.restart(acked);
                    tx.set_durability(durability);
                    let k = Rng::new(seed).key();
                    let present = tx.contains_for_update(&CELLS, &k)?;
                    rec.reads.push(Read {
                        key: k,
                        seen: Seen::Exists(present),
                        tracked: true,
                    });
                    if !present {
                        rec.put(tx, k, 0)?;
                        rec.emit(tx, 1)?;
                    }
                    Ok(())
                })
                .await,
                rec,
                "insert"
            );
            let events = (c.seqs.end - c.seqs.start) as u32;
            let o = committed(&c.seqs, acked);
            Ok(rec.record("insert", events, o))
        }
        // Bank transfer.
        50..=64 => {
            let c = or_expired!(
                write(store, via, |tx| {
                    rec.restart(acked);
                    tx.set_durability(durability);
                    let mut r = Rng::new(seed);
                    let a = BANK + r.below(ACCOUNTS as u64) as u32;
                    let b = BANK + (a - BANK + 1 + r.below(ACCOUNTS as u64 - 1) as u32) % ACCOUNTS;
                    let amount = 1 + r.below(20) as i64;
                    let va = rec.get(tx, a, true)?.map_or(0, |c| c.balance);
                    let vb = rec.get(tx, b, true)?.map_or(0, |c| c.balance);
                    rec.put(tx, a, va - amount)?;
                    rec.put(tx, b, vb + amount)?;
                    rec.emit(tx, 1)
                })
                .await,
                rec,
                "transfer"
            );
            let o = committed(&c.seqs, acked);
            Ok(rec.record("transfer", 1, o))
        }
        // Abort after staging writes and events.
        65..=71 => {
            let r = write(store, via, |tx| {
                rec.restart(acked);
                let mut r = Rng::new(seed);
                let k = r.key();
                rec.get(tx, k, true)?;
                rec.put(tx, k, 0)?;
                rec.emit(tx, 1)?;
                Err::<(), _>(Error::abort("the closure gives up"))
            })
            .await;
            assert!(matches!(r, Err(Error::Aborted(_))), "abort: {r:?}");
            Ok(rec.record("abort", 1, Outcome::Aborted))
        }
        // Begin / commit without retries: conflicts are returned.
        72..=84 => {
            let mut tx = store.begin();
            tx.set_durability(durability);
            let mut r = Rng::new(seed);
            let k = r.key();
            let k2 = r.key();
            rec.get(&mut tx, k, true)?;
            rec.get(&mut tx, k2, true)?;
            rec.put(&mut tx, k, 0)?;
            rec.emit(&mut tx, 1)?;
            match commit(tx, via).await {
                Ok(c) => {
                    let o = committed(&c.seqs, acked);
                    Ok(rec.record("manual", 1, o))
                }
                Err(Error::Conflict { .. }) => Ok(rec.record("manual", 1, Outcome::Conflict)),
                Err(Error::TransactionExpired { .. }) => {
                    Ok(rec.record("manual", 0, Outcome::Expired))
                }
                Err(e) => Err(e),
            }
        }
        // Audit: read every account (plain reads), must sum to the total.
        85..=89 => {
            let c = or_expired!(
                write(store, via, |tx| {
                    rec.restart(acked);
                    for a in BANK..BANK + ACCOUNTS {
                        rec.get(tx, a, false)?;
                    }
                    Ok(())
                })
                .await,
                rec,
                "audit"
            );
            let o = committed(&c.seqs, acked);
            Ok(rec.record("audit", 0, o))
        }
        // Read-only, tracked and plain reads.
        _ => {
            let c = or_expired!(
                write(store, via, |tx| {
                    rec.restart(acked);
                    let mut r = Rng::new(seed);
                    for _ in 0..1 + r.below(4) {
                        let k = r.key();
                        let tracked = r.chance(50);
                        rec.get(tx, k, tracked)?;
                    }
                    Ok(())
                })
                .await,
                rec,
                "read"
            );
            let o = committed(&c.seqs, acked);
            Ok(rec.record("read", 0, o))
        }
    }
}

/// A blind batch: puts and deletes of 1-3 keys with no reads, one event.
async fn blind_tx(
    store: &Store,
    rng: &mut Rng,
    id: u64,
    acked: &AtomicU64,
    via: Via,
) -> outboxkv::Result<Record> {
    let mut rec = Tx::start(id, acked);
    let mut batch = store.batch();
    batch.set_durability(rng.durability());
    for _ in 0..1 + rng.below(3) {
        let k = rng.key();
        if rng.chance(15) {
            batch.delete(&CELLS, &k)?;
            rec.writes.push((k, None));
        } else {
            let cell = rec.next_cell(0);
            batch.put(&CELLS, &k, &cell)?;
            rec.writes.push((k, Some(cell)));
        }
    }
    for e in rec.events(1)? {
        batch.emit(e)?;
    }
    let c = match via {
        Via::Blocking => batch.commit()?,
        Via::Async => batch.commit_async().await?,
    };
    let o = committed(&c.seqs, acked);
    Ok(rec.record("blind", 1, o))
}

/// Opens the bank: every account gets the opening balance, in one commit.
fn open_bank(store: &Store, id: u64, acked: &AtomicU64) -> outboxkv::Result<Record> {
    let mut rec = Tx::start(id, acked);
    let c = or_expired!(
        store.write(|tx| {
            rec.restart(acked);
            for a in BANK..BANK + ACCOUNTS {
                rec.put(tx, a, OPENING_BALANCE)?;
            }
            rec.emit(tx, 1)
        }),
        rec,
        "bank"
    );
    let o = committed(&c.seqs, acked);
    Ok(rec.record("bank", 1, o))
}

const WRITERS: u64 = 4;
const BLIND: u64 = 2;
/// Async tasks, all on one current-thread runtime: writer transactions and
/// blind batches (one in four) through `write_async` / `commit_async`.
const ASYNC_TASKS: u64 = 8;

/// Runs `txs` transactions spread over the writer and blind threads and
/// the async tasks; each record goes to `sink` as soon as its outcome is
/// known.
fn run_round(
    store: &Store,
    seed: u64,
    first_id: u64,
    txs: u64,
    acked: &AtomicU64,
    sink: &(dyn Fn(Record) + Sync),
) -> TestResult {
    let threads = WRITERS + BLIND;
    let per_worker = txs / (threads + ASYNC_TASKS);
    let rng_for = |w: u64| Rng::new(seed ^ (w + 1).wrapping_mul(0xa076_1d64_78bd_642f));
    std::thread::scope(|s| -> TestResult {
        let mut handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> outboxkv::Result<()> {
                    let mut rng = rng_for(t);
                    for i in 0..per_worker {
                        let id = first_id + t * per_worker + i;
                        let rec = if t < WRITERS {
                            blocking(writer_tx(store, &mut rng, id, acked, Via::Blocking))?
                        } else {
                            blocking(blind_tx(store, &mut rng, id, acked, Via::Blocking))?
                        };
                        sink(rec);
                    }
                    Ok(())
                })
            })
            .collect();
        handles.push(s.spawn(move || -> outboxkv::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::InvalidArgument(format!("runtime: {e}")))?;
            let tasks = (threads..threads + ASYNC_TASKS).map(|w| async move {
                let mut rng = rng_for(w);
                for i in 0..per_worker {
                    let id = first_id + w * per_worker + i;
                    let rec = if rng.chance(25) {
                        blind_tx(store, &mut rng, id, acked, Via::Async).await?
                    } else {
                        writer_tx(store, &mut rng, id, acked, Via::Async).await?
                    };
                    sink(rec);
                }
                Ok::<_, outboxkv::Error>(())
            });
            // A lost wake-up would hang the round: fail it instead.
            rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(600),
                    futures_util::future::try_join_all(tasks),
                )
                .await
                .map_err(|_| Error::InvalidArgument("async tasks hung for 600 s".into()))
            })??;
            Ok(())
        }));
        for h in handles {
            h.join().map_err(|_| "a worker thread panicked")??;
        }
        Ok(())
    })
}

/// A set of positions in the commit order: sorted, disjoint, inclusive.
type Spans = Vec<(u64, u64)>;

fn intersect(a: &Spans, b: &Spans) -> Spans {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo <= hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// How one key's value evolved along the commit order.
#[derive(Default)]
struct Timeline {
    /// (position from which the value holds, value); starts absent at 0.
    changes: Vec<(u64, Option<Cell>)>,
}

impl Timeline {
    fn span(&self, i: usize) -> (u64, u64) {
        let end = self.changes.get(i + 1).map_or(u64::MAX, |c| c.0 - 1);
        (self.changes[i].0, end)
    }
    fn at(&self, pos: u64) -> Option<Cell> {
        let i = self.changes.partition_point(|c| c.0 <= pos);
        self.changes[i - 1].1
    }
    /// Positions at which the key is absent (`want_present` false) or present.
    fn presence(&self, want_present: bool) -> Spans {
        let mut out: Spans = Vec::new();
        for i in 0..self.changes.len() {
            if self.changes[i].1.is_some() == want_present {
                let (lo, hi) = self.span(i);
                match out.last_mut() {
                    Some(last) if last.1.checked_add(1) == Some(lo) => last.1 = hi,
                    _ => out.push((lo, hi)),
                }
            }
        }
        out
    }
}

/// Checks the history `records` against the store's outbox and table.
/// `all_recorded`: every transaction that may have committed has a record
/// (false after kills, when some outcomes are unknown).
fn check(store: &Store, records: &[Record], all_recorded: bool) -> TestResult {
    let by_tx: HashMap<u64, &Record> = records.iter().map(|r| (r.tx, r)).collect();
    assert_eq!(by_tx.len(), records.len(), "transaction ids are unique");

    // 1. The outbox: gap-free, each event once, grouped per transaction.
    let outbox = store.outbox();
    let entries = outbox.read(1, usize::MAX)?;
    assert_eq!(outbox.tail(), 1, "the history checker never prunes");
    assert_eq!(entries.len() as u64, outbox.head(), "outbox holds 1..=head");
    // Transactions in commit order: (tx, first seq, writes).
    let mut order: Vec<(u64, u64, Writes)> = Vec::new();
    let mut seen_tx = HashSet::new();
    let mut i = 0;
    while i < entries.len() {
        let e = &entries[i];
        assert_eq!(e.seq, i as u64 + 1, "seqs are 1..=head");
        let p: Payload = serde_json::from_slice(&e.payload)?;
        assert_eq!(
            p.i, 0,
            "seq {}: event {} of tx {} without its first",
            e.seq, p.i, p.tx
        );
        assert!(
            seen_tx.insert(p.tx),
            "tx {} appears twice in the outbox (seq {})",
            p.tx,
            e.seq
        );
        for j in 1..p.of {
            let next = entries
                .get(i + j as usize)
                .ok_or_else(|| format!("tx {}: event {j} of {} missing at the end", p.tx, p.of))?;
            let q: Payload = serde_json::from_slice(&next.payload)?;
            assert_eq!(
                (q.tx, q.i),
                (p.tx, j),
                "seq {}: tx {}'s events are not contiguous",
                next.seq,
                p.tx
            );
        }
        match by_tx.get(&p.tx) {
            Some(r) => {
                assert_eq!(
                    r.outcome,
                    Outcome::Committed {
                        first: e.seq,
                        end: e.seq + u64::from(p.of)
                    },
                    "tx {} ({}) is in the outbox at seq {} with {} events",
                    r.tx,
                    r.kind,
                    e.seq,
                    p.of
                );
                assert_eq!(r.writes, p.writes, "tx {}: writes in its event", r.tx);
                assert!(
                    e.seq > r.floor,
                    "tx {} got seq {} although seq {} was acknowledged before it began",
                    r.tx,
                    e.seq,
                    r.floor
                );
            }
            None => assert!(
                !all_recorded,
                "seq {}: tx {} emitted it but no such transaction ran",
                e.seq, p.tx
            ),
        }
        order.push((p.tx, e.seq, p.writes));
        i += p.of.max(1) as usize;
    }
    for r in records {
        if let Outcome::Committed { first, end } = r.outcome
            && first < end
        {
            assert!(
                seen_tx.contains(&r.tx),
                "acknowledged tx {} ({}) lost its events {first}..{end}",
                r.tx,
                r.kind
            );
        }
    }

    // 2. Replay: timelines per key; tracked reads at the commit position.
    let mut lines: BTreeMap<u32, Timeline> = BTreeMap::new();
    let mut position_of_seq: Vec<(u64, u64)> = Vec::new(); // (first seq, position)
    let mut position_of_tx: HashMap<u64, u64> = HashMap::new();
    let mut written: HashMap<(u32, Cell), (u64, usize)> = HashMap::new();
    for (pos, (tx, first, writes)) in order.iter().enumerate() {
        let pos = pos as u64;
        position_of_seq.push((*first, pos));
        position_of_tx.insert(*tx, pos);
        if let Some(r) = by_tx.get(tx) {
            for read in r.reads.iter().filter(|r| r.tracked) {
                let now = lines.get(&read.key).and_then(|t| t.at(pos));
                let ok = match read.seen {
                    Seen::Value(v) => v == now,
                    Seen::Exists(b) => b == now.is_some(),
                };
                assert!(
                    ok,
                    "tx {} ({}) read key {} for update as {:?}, but at its place in the commit \
                     order (position {pos}) the key held {now:?}: a lost update or write skew",
                    r.tx, r.kind, read.key, read.seen
                );
            }
        }
        let mut last_per_key: BTreeMap<u32, Option<Cell>> = BTreeMap::new();
        for (k, v) in writes {
            last_per_key.insert(*k, *v);
        }
        for (k, v) in last_per_key {
            let t = lines.entry(k).or_insert_with(|| Timeline {
                changes: vec![(0, None)],
            });
            if let Some(c) = v {
                written.insert((k, c), (pos + 1, t.changes.len()));
            }
            t.changes.push((pos + 1, v));
        }
    }
    let n = order.len() as u64;
    let position_after_seq = |seq: u64| -> u64 {
        if seq == 0 {
            return 0;
        }
        let i = position_of_seq.partition_point(|(first, _)| *first <= seq);
        position_of_seq[i - 1].1 + 1
    };

    // 3. Snapshots: all reads of a transaction agree with one position.
    let empty = Timeline {
        changes: vec![(0, None)],
    };
    for r in records {
        let Outcome::Committed { .. } = r.outcome else {
            continue;
        };
        if r.reads.is_empty() {
            continue;
        }
        let lo = position_after_seq(r.floor);
        let hi = position_of_tx.get(&r.tx).copied().unwrap_or(n);
        let mut spans: Spans = vec![(lo, hi)];
        for read in &r.reads {
            let t = lines.get(&read.key).unwrap_or(&empty);
            let allowed: Spans = match read.seen {
                Seen::Value(Some(c)) => {
                    let (_, idx) = written.get(&(read.key, c)).copied().ok_or_else(|| {
                        format!(
                            "tx {} ({}) read key {} = {c:?}, which no committed transaction wrote",
                            r.tx, r.kind, read.key
                        )
                    })?;
                    vec![t.span(idx)]
                }
                Seen::Value(None) | Seen::Exists(false) => t.presence(false),
                Seen::Exists(true) => t.presence(true),
            };
            spans = intersect(&spans, &allowed);
        }
        assert!(
            !spans.is_empty(),
            "tx {} ({}): its reads {:?} agree with no single state between positions {lo} and {hi}",
            r.tx,
            r.kind,
            r.reads
        );
        if r.kind == "audit" {
            let total: i64 = r
                .reads
                .iter()
                .map(|read| match read.seen {
                    Seen::Value(v) => v.map_or(0, |c| c.balance),
                    Seen::Exists(_) => 0,
                })
                .sum();
            assert_eq!(
                total,
                OPENING_BALANCE * i64::from(ACCOUNTS),
                "tx {}: audit total",
                r.tx
            );
        }
    }

    // 4. The table equals the replayed state.
    let mut expected: BTreeMap<u32, Cell> = BTreeMap::new();
    for (k, t) in &lines {
        if let Some(c) = t.at(n) {
            expected.insert(*k, c);
        }
    }
    let mut actual = BTreeMap::new();
    for row in store.range(&CELLS, ..)? {
        let (k, v) = row?;
        actual.insert(k, v);
    }
    assert_eq!(
        actual, expected,
        "the table differs from the replayed history"
    );
    if expected.contains_key(&BANK) {
        let total: i64 = (BANK..BANK + ACCOUNTS)
            .map(|a| expected.get(&a).map_or(0, |c| c.balance))
            .sum();
        assert_eq!(total, OPENING_BALANCE * i64::from(ACCOUNTS), "bank total");
    }
    Ok(())
}

fn rounds_in_process(mode: usize) -> TestResult {
    rounds_with(mode, options(mode), false)
}

/// `expiring`: the limits are set so that transactions expire; require it.
fn rounds_with(mode: usize, opts: outboxkv::StoreOptions, expiring: bool) -> TestResult {
    let seed = seed() ^ mode as u64;
    let rounds = env_u64("OUTBOXKV_HISTORY_ROUNDS", 3);
    let txs = env_u64("OUTBOXKV_HISTORY_TXS", 3_000);
    let dir = tempfile::tempdir()?;
    let acked = AtomicU64::new(0);
    let records = Mutex::new(Vec::new());
    let open = |path: &Path, _mode: usize| opts.clone().open(path);
    let mut store = open(dir.path(), mode)?;
    let bank = open_bank(&store, 0, &acked)?;
    records.lock().map_err(|_| "poisoned")?.push(bank);
    let sink = |r: Record| records.lock().expect("records lock").push(r);
    let mut expirations = 0;
    for round in 0..rounds {
        run_round(
            &store,
            seed.wrapping_add(round),
            1 + round * txs,
            txs,
            &acked,
            &sink,
        )?;
        expirations += store.transaction_stats().expired;
        drop(store);
        store = open(dir.path(), mode)?;
    }
    let records = records.into_inner().map_err(|_| "poisoned")?;
    let conflicts = records
        .iter()
        .filter(|r| r.outcome == Outcome::Conflict)
        .count();
    let expired = records
        .iter()
        .filter(|r| r.outcome == Outcome::Expired)
        .count();
    eprintln!(
        "mode {:?}: {} transactions, {} committed events, {conflicts} returned conflicts, \
         {expirations} expirations ({expired} returned, the others retried)",
        MODES[mode],
        records.len(),
        store.outbox().head(),
    );
    assert!(conflicts > 0, "the workload must make conflicts happen");
    if expiring {
        assert!(expirations > 0, "the limits must make transactions expire");
    } else {
        assert_eq!(expirations, 0, "nothing expires under the default limits");
        // Nor is any transaction refused as expired at its commit.
        assert_eq!(expired, 0, "a transaction was refused as expired");
    }
    check(&store, &records, true)?;
    Ok(())
}

#[test]
fn history_is_serializable_sync_pipelined() -> TestResult {
    rounds_in_process(0)
}

#[test]
fn history_is_serializable_sync_not_pipelined() -> TestResult {
    rounds_in_process(1)
}

#[test]
fn history_is_serializable_buffered_pipelined() -> TestResult {
    rounds_in_process(2)
}

#[test]
fn history_is_serializable_buffered_not_pipelined() -> TestResult {
    rounds_in_process(3)
}

/// The same with limits small enough that transactions expire all the
/// time (by size while the index outgrows 2 keys, by age past 0.2 ms):
/// expired transactions write nothing, and the rest stay serializable.
#[test]
fn history_is_serializable_with_expiring_transactions() -> TestResult {
    let opts = options(0)
        .max_conflict_index_keys(2)
        .max_transaction_age(Duration::from_micros(200));
    rounds_with(0, opts, true)
}

/// The child of the kill harness: runs rounds forever on the store at
/// `OUTBOXKV_HISTORY_STORE`, printing each record as a JSON line.
#[test]
#[ignore = "the child process of history_survives_kills, run by it"]
fn history_child() -> TestResult {
    let path = std::env::var("OUTBOXKV_HISTORY_STORE")?;
    let mode: usize = std::env::var("OUTBOXKV_HISTORY_MODE")?.parse()?;
    let first: u64 = std::env::var("OUTBOXKV_HISTORY_FIRST")?.parse()?;
    let seed: u64 = std::env::var("OUTBOXKV_HISTORY_SEED")?.parse()?;
    let store = open(Path::new(&path), mode)?;
    let acked = AtomicU64::new(store.outbox().head());
    let out = Mutex::new(std::io::stdout());
    let sink = |r: Record| {
        let line = serde_json::to_string(&r).expect("record encodes");
        let mut out = out.lock().expect("stdout lock");
        writeln!(out, "{line}").expect("stdout");
        out.flush().expect("stdout");
    };
    if first == 0 {
        sink(open_bank(&store, 0, &acked)?);
    }
    for round in 0.. {
        let base = first + 1 + round * 1_000_000;
        run_round(
            &store,
            seed.wrapping_add(round),
            base,
            1_000_000,
            &acked,
            &sink,
        )?;
    }
    Ok(())
}

/// SIGKILLs a child running the workload at random moments, in every mode
/// in turn, and checks the history of all cycles after each one: every
/// acknowledged transaction survived whole, and the unacknowledged ones
/// either whole or not at all.
#[test]
fn history_survives_kills() -> TestResult {
    let seed = seed();
    let cycles = env_u64("OUTBOXKV_HISTORY_KILLS", 8);
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut rng = Rng::new(seed);
    let mut records: Vec<Record> = Vec::new();
    for cycle in 0..cycles {
        let mode = (cycle % MODES.len() as u64) as usize;
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "history_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OUTBOXKV_HISTORY_STORE", dir.path())
            .env("OUTBOXKV_HISTORY_MODE", mode.to_string())
            .env(
                "OUTBOXKV_HISTORY_FIRST",
                (cycle * 1_000_000_000).to_string(),
            )
            .env("OUTBOXKV_HISTORY_SEED", rng.next().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with('{') {
                        lines.lock().expect("lines").push(line);
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(150 + rng.below(450)));
        child.kill()?;
        child.wait()?;
        reader.join().map_err(|_| "reader panicked")?;
        let lines = std::mem::take(&mut *lines.lock().map_err(|_| "poisoned")?);
        let before = records.len();
        for line in lines {
            // The last line may be torn by the kill.
            if let Ok(r) = serde_json::from_str::<Record>(&line) {
                records.push(r);
            }
        }
        let store = open(dir.path(), mode)?;
        check(&store, &records, false)?;
        eprintln!(
            "kill cycle {cycle} (mode {:?}): {} transactions recorded, head {}",
            MODES[mode],
            records.len() - before,
            store.outbox().head()
        );
        assert!(
            records.len() > before,
            "the child recorded nothing before the kill"
        );
    }
    Ok(())
}

/// Two transactions that both find a key absent with
/// `contains_for_update` and insert it: exactly one commits.
#[test]
fn insert_if_absent_race_has_one_winner() -> TestResult {
    const NAMES: Table<str, u64> = Table::new("names");
    let dir = tempfile::tempdir()?;
    let store = Store::options().max_conflict_retries(0).open(dir.path())?;
    for round in 0..50u64 {
        let name = format!("user-{round}");
        let barrier = std::sync::Barrier::new(2);
        let outcomes: Vec<outboxkv::Result<bool>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2u64)
                .map(|who| {
                    let (store, name, barrier) = (&store, &name, &barrier);
                    s.spawn(move || {
                        let mut tx = store.begin();
                        let taken = tx.contains_for_update(&NAMES, name)?;
                        barrier.wait();
                        if taken {
                            return Ok(false);
                        }
                        tx.put(&NAMES, name, &who)?;
                        tx.emit(Event::bytes(
                            "user.registered",
                            name.clone(),
                            vec![who as u8],
                        ))?;
                        tx.commit().map(|_| true)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let won = outcomes.iter().filter(|o| matches!(o, Ok(true))).count();
        let lost = outcomes
            .iter()
            .filter(|o| matches!(o, Err(Error::Conflict { .. })))
            .count();
        assert_eq!((won, lost), (1, 1), "round {round}: {outcomes:?}");
    }
    assert_eq!(store.outbox().head(), 50, "one registration event per name");
    // Plain `contains` is a snapshot read: it is not validated.
    let mut a = store.begin();
    let mut b = store.begin();
    assert!(!a.contains(&NAMES, "plain")?);
    assert!(!b.contains(&NAMES, "plain")?);
    a.put(&NAMES, "plain", &1)?;
    b.put(&NAMES, "plain", &2)?;
    a.commit()?;
    b.commit()?;
    Ok(())
}
