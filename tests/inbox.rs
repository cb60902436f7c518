//! The inbox without a broker: a simulated at-least-once broker (in-order
//! like Kafka, or out of order within an in-flight window like JetStream)
//! delivers messages in random batches, with redeliveries, producer
//! duplicates at other positions, transient and permanent handler
//! failures, and restarts between commit and acknowledgement; every
//! message's effect must happen exactly once, poison ones be dead-lettered
//! once, and the inbox stay small.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::TestResult;
use outboxkv::inbox::{Inbox, InboxOptions, InboxTx, Message, Outcome};
use outboxkv::{Durability, Error, Event, Store, Table};
use proptest::prelude::*;

/// Logical message id -> times its effect was applied.
const EFFECTS: Table<u64, u64> = Table::new("effects");
/// "total" -> effects applied by the inbox plus increments by other writers.
const TOTAL: Table<str, u64> = Table::new("total");
/// Junk written blindly by other writers.
const JUNK: Table<u64, u64> = Table::new("junk");

const PRODUCER: &str = "0123456789abcdef0123456789abcdef";

/// One message of the simulated broker.
#[derive(Clone, Debug)]
struct Sim {
    partition: u32,
    position: u64,
    /// The logical message (the producer's event seq): a producer duplicate
    /// has the logical id of an earlier message at another position.
    logical: u64,
    /// Every delivery at an attempt up to this fails.
    fail_until: u32,
}

fn message(s: &Sim, attempt: u32, floor: Option<u64>, done_from: Option<u64>) -> Message {
    let m = Message::new(
        "S",
        s.partition,
        s.position,
        s.logical.to_string().into_bytes(),
    )
    .with_header("ce_specversion", "1.0")
    .with_header("ce_id", format!("{PRODUCER}-{}", s.logical))
    .with_header("ce_source", format!("outboxkv:{PRODUCER}"))
    .with_header("ce_type", "t")
    .with_header(
        "ce_traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    .with_attempt(attempt);
    let m = match floor {
        Some(f) => m.with_done_below(f),
        None => m,
    };
    match done_from {
        Some(f) => m.with_done_from(f),
        None => m,
    }
}

/// The handler: counts the logical message's effect, bumps the hot total,
/// emits one event; fails while the attempt is at or below `fail_until`.
fn handler(
    fails: &HashMap<u64, u32>,
    buffered: bool,
) -> impl FnMut(&mut InboxTx<'_, '_>) -> outboxkv::Result<()> + '_ {
    move |tx| {
        let body = std::str::from_utf8(tx.message().data()).map_err(Error::abort)?;
        let logical: u64 = body.parse().map_err(Error::abort)?;
        if tx.message().attempt <= fails.get(&logical).copied().unwrap_or(0) {
            return Err(Error::abort(format!("planned failure of {logical}")));
        }
        if buffered {
            tx.set_durability(Durability::Buffered);
        }
        let n = tx.get_for_update(&EFFECTS, &logical)?.unwrap_or(0);
        tx.put(&EFFECTS, &logical, &(n + 1))?;
        let t = tx.get_for_update(&TOTAL, "total")?.unwrap_or(0);
        tx.put(&TOTAL, "total", &(t + 1))?;
        tx.emit(Event::bytes("effect", logical.to_string(), Vec::new()))
    }
}

#[derive(Debug, Clone)]
struct Plan {
    partitions: Vec<Vec<Sim>>,
    /// The random choices of the broker, consumed in order.
    choices: Vec<u32>,
    in_order: bool,
    /// Out of order, each message also marks the positions between the
    /// previous message of its partition and itself (none of which are
    /// this consumer's) done, as the JetStream reader does for a filtered
    /// consumer.
    gaps: bool,
    max_attempts: u32,
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        1usize..4,
        5usize..40,
        proptest::collection::vec(any::<u32>(), 400),
        any::<bool>(),
        any::<bool>(),
        1u32..4,
        any::<u64>(),
    )
        .prop_map(
            |(parts, per, choices, in_order, gaps, max_attempts, seed)| {
                let mut rng = seed | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut logical = 0u64;
                let mut partitions = Vec::new();
                for p in 0..parts {
                    let mut sims = Vec::new();
                    let mut position = next() % 5;
                    for _ in 0..per {
                        // Gaps between positions (compaction, filtered subjects).
                        position += 1 + next() % 3;
                        // One in eight is a producer duplicate of an earlier one.
                        let l = if logical > 0 && next() % 8 == 0 {
                            1 + next() % logical
                        } else {
                            logical += 1;
                            logical
                        };
                        // Mostly fine, some transient failures, a few poison.
                        let fail_until = match next() % 16 {
                            0 => 99,
                            1..=3 => (next() % 3) as u32,
                            _ => 0,
                        };
                        sims.push(Sim {
                            partition: p as u32,
                            position,
                            logical: l,
                            fail_until,
                        });
                    }
                    partitions.push(sims);
                }
                Plan {
                    partitions,
                    choices,
                    in_order,
                    gaps,
                    max_attempts,
                }
            },
        )
}

/// Runs `plan` against a store in `dir`; returns what to check.
fn simulate(plan: &Plan, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // One failure plan per logical message (copies share it).
    let mut fails: HashMap<u64, u32> = HashMap::new();
    for s in plan.partitions.iter().flatten() {
        fails.entry(s.logical).or_insert(s.fail_until);
    }
    let opts = InboxOptions::new().max_attempts(plan.max_attempts);
    let mut store = Store::open(dir)?;
    let mut inbox = Inbox::with_options(&store, "sim", opts.clone())?;
    let mut settled: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); plan.partitions.len()];
    let mut attempts: HashMap<(u32, usize), u32> = HashMap::new();
    // The ack floor as the broker last reported it (stale on purpose).
    let mut floors: Vec<u64> = vec![0; plan.partitions.len()];
    let mut choices = plan.choices.iter().copied().cycle();
    let mut pick = move |n: usize| choices.next().unwrap_or(0) as usize % n.max(1);
    let mut steps = 0;
    let mut outcomes_seen: BTreeMap<String, usize> = BTreeMap::new();
    // Batches submitted and not yet awaited, oldest first.
    let mut pending: std::collections::VecDeque<(
        usize,
        Vec<usize>,
        Vec<u32>,
        outboxkv::inbox::Applying,
    )> = std::collections::VecDeque::new();
    while settled
        .iter()
        .zip(&plan.partitions)
        .any(|(s, p)| s.len() < p.len())
    {
        steps += 1;
        assert!(steps < 100_000, "the simulation does not finish");
        let p = pick(plan.partitions.len());
        let sims = &plan.partitions[p];
        let unsettled: Vec<usize> = (0..sims.len())
            .filter(|i| !settled[p].contains(i))
            .collect();
        if unsettled.is_empty() {
            continue;
        }
        let mut batch_idx: Vec<usize> = Vec::new();
        let size = 1 + pick(6);
        if plan.in_order {
            batch_idx.extend(unsettled.iter().take(size));
        } else {
            // Any of the first 8 unsettled, in any order.
            let window: Vec<usize> = unsettled.iter().take(8).copied().collect();
            for _ in 0..size {
                let i = window[pick(window.len())];
                if !batch_idx.contains(&i) {
                    batch_idx.push(i);
                }
            }
        }
        // A redelivery of something already settled, now and then.
        if !settled[p].is_empty() && pick(4) == 0 {
            let done: Vec<usize> = settled[p].iter().copied().collect();
            let at = pick(batch_idx.len() + 1);
            batch_idx.insert(at, done[pick(done.len())]);
        }
        let floor = floors[p];
        let batch: Vec<Message> = batch_idx
            .iter()
            .map(|&i| {
                let a = attempts.get(&(p as u32, i)).copied().unwrap_or(0) + 1;
                let done_from = (plan.gaps && !plan.in_order)
                    .then(|| i.checked_sub(1).map_or(0, |prev| sims[prev].position + 1));
                message(&sims[i], a, (!plan.in_order).then_some(floor), done_from)
            })
            .collect();
        let buffered = pick(2) == 0;
        let applying = rt.block_on(inbox.submit(&batch, handler(&fails, buffered)))?;
        let tried: Vec<u32> = batch.iter().map(|m| m.attempt).collect();
        // Up to 4 batches are left in flight (0 to 3 besides this one,
        // chosen anew each time) while the next are taken in and handled
        // (what `NatsReader` does), so batches overlap and may hold the
        // same message; the oldest are awaited first.
        pending.push_back((p, batch_idx, tried, applying));
        let depth = pick(4);
        let mut ready = Vec::new();
        while pending.len() > depth {
            ready.extend(pending.pop_front());
        }
        // A crash between the commits and the acknowledgements: nothing is
        // acknowledged, the store is reopened.
        if pick(12) == 0 {
            drop(ready);
            pending.clear();
            drop(inbox);
            drop(store);
            store = Store::open(dir)?;
            inbox = Inbox::with_options(&store, "sim", opts.clone())?;
            continue;
        }
        for (p, batch_idx, tried, applying) in ready {
            let outcomes = rt.block_on(applying.durable())?;
            assert_eq!(outcomes.len(), batch_idx.len());
            for ((&i, o), &attempt) in batch_idx.iter().zip(&outcomes).zip(&tried) {
                let name = format!("{o:?}");
                *outcomes_seen
                    .entry(name.split([' ', '{']).next().unwrap_or("").to_string())
                    .or_default() += 1;
                if o.settled() {
                    settled[p].insert(i);
                } else if matches!(o, Outcome::Retry { .. }) {
                    // Two batches in flight may both have tried it at
                    // this attempt: the next one is the attempt after.
                    let a = attempts.entry((p as u32, i)).or_default();
                    *a = (*a).max(attempt);
                }
            }
            // The new ack floor: the first unsettled position (or past the end).
            let sims = &plan.partitions[p];
            floors[p] = (0..sims.len())
                .find(|i| !settled[p].contains(i))
                .map_or(u64::MAX / 2, |i| sims[i].position);
        }
    }
    // The batches left in flight hold only copies of settled messages now.
    for (_, _, _, applying) in pending {
        let outcomes = rt.block_on(applying.durable())?;
        assert!(
            outcomes.iter().all(Outcome::settled),
            "a batch of settled messages: {outcomes:?}"
        );
    }
    // Every logical message: applied once, or (poison) dead-lettered once.
    let dead = inbox.dead_letters()?;
    let mut dead_logical: BTreeMap<u64, usize> = BTreeMap::new();
    for d in &dead {
        let l: u64 = String::from_utf8_lossy(&d.body).parse()?;
        *dead_logical.entry(l).or_default() += 1;
    }
    let mut applied = 0;
    for (&l, &f) in &fails {
        let effects = store.get(&EFFECTS, &l)?.unwrap_or(0);
        if f >= plan.max_attempts {
            assert_eq!(effects, 0, "poison {l} applied");
            assert_eq!(dead_logical.get(&l), Some(&1), "poison {l} dead letters");
        } else {
            assert_eq!(
                effects, 1,
                "message {l} applied {effects} times ({outcomes_seen:?})"
            );
            assert_eq!(dead_logical.get(&l), None, "message {l} dead-lettered");
            applied += 1;
        }
    }
    assert_eq!(store.get(&TOTAL, "total")?.unwrap_or(0), applied);
    assert_eq!(
        store.outbox().head(),
        applied,
        "one event per applied message"
    );
    // Each partition's position holds every message.
    for (p, sims) in plan.partitions.iter().enumerate() {
        let pos = inbox.position("S", p as u32)?.ok_or("no position")?;
        let last = sims.last().map_or(0, |s| s.position);
        assert!(
            sims.iter().all(|s| pos.contains(s.position)),
            "partition {p}: {pos:?}"
        );
        if plan.in_order || plan.gaps {
            assert!(pos.next > last, "partition {p}: {pos:?}, last {last}");
            assert!(pos.done.is_empty(), "partition {p}: {pos:?}");
        }
        // Out of order, the watermark rises with the floor the next
        // delivery brings; until then the positions done above the last
        // floor stay (and while a message at the floor is retried, what
        // completes above it). The bound without failures is checked by
        // `a_million_messages_leave_one_record_per_partition`.
    }
    // The emitted events carry the causation, correlation and trace.
    for e in store.outbox().read(1, 5)? {
        let id = e.header("causationid").ok_or("no causationid")?;
        assert!(id.starts_with(PRODUCER), "{id}");
        assert_eq!(e.header("correlationid"), Some(id));
        let tp = e.header("traceparent").ok_or("no traceparent")?;
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(!tp.contains("b7ad6b7169203331"), "the span id is new: {tp}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_message_takes_effect_once(plan in plan()) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        simulate(&plan, dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}

/// Inbox commits beside transactional writers on the same hot key and
/// blind writers, from several tasks and threads: no update is lost.
#[test]
fn inbox_beside_other_writers_loses_no_update() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .max_conflict_retries(100_000)
        .open(dir.path())?;
    let stop = Arc::new(AtomicBool::new(false));
    let others = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let (store, stop, others) = (store.clone(), stop.clone(), others.clone());
        threads.push(std::thread::spawn(move || -> outboxkv::Result<()> {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if t == 0 {
                    store.write(|tx| {
                        let n = tx.get_for_update(&TOTAL, "total")?.unwrap_or(0);
                        tx.put(&TOTAL, "total", &(n + 1))?;
                        if i.is_multiple_of(2) {
                            tx.set_durability(Durability::Buffered);
                        }
                        Ok(())
                    })?;
                    others.fetch_add(1, Ordering::Relaxed);
                } else {
                    let mut b = store.batch();
                    b.put(&JUNK, &(i % 64), &i)?;
                    b.commit()?;
                }
            }
            Ok(())
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let fails = HashMap::new();
    let partitions = 8u32;
    let per = 400u64;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for p in 0..partitions {
            let inbox = Inbox::new(&store, "mixed")?;
            let fails = fails.clone();
            tasks.push(tokio::spawn(async move {
                let mut pos = 0;
                while pos < per {
                    let n = 1 + (pos % 7);
                    let batch: Vec<Message> = (pos..(pos + n).min(per))
                        .map(|i| {
                            message(
                                &Sim {
                                    partition: p,
                                    position: i,
                                    logical: u64::from(p) * per + i + 1,
                                    fail_until: 0,
                                },
                                1,
                                None,
                                None,
                            )
                        })
                        .collect();
                    let out = inbox.apply(&batch, handler(&fails, pos % 2 == 0)).await?;
                    assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
                    // The same batch again: all duplicates now.
                    let again = inbox.apply(&batch, handler(&fails, false)).await?;
                    assert!(again.iter().all(|o| *o == Outcome::Duplicate), "{again:?}");
                    pos += n;
                }
                Ok::<_, outboxkv::Error>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| "writer panicked")??;
    }
    let applied = u64::from(partitions) * per;
    assert_eq!(
        store.get(&TOTAL, "total")?,
        Some(applied + others.load(Ordering::Relaxed))
    );
    for l in 1..=applied {
        assert_eq!(store.get(&EFFECTS, &l)?, Some(1), "message {l}");
    }
    Ok(())
}

/// 1,000,000 messages over 12 partitions, completed out of order within an
/// in-flight window: the inbox keeps one record per partition, and at most
/// the in-flight messages above the watermarks.
#[test]
fn a_million_messages_leave_one_record_per_partition() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let inbox = Inbox::with_options(&store, "big", InboxOptions::new().producer_window(0))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    const PARTITIONS: u64 = 12;
    const IN_FLIGHT: u64 = 64;
    const TOTAL_MESSAGES: u64 = 1_000_000;
    // Whole windows, at least TOTAL_MESSAGES in all.
    let windows = TOTAL_MESSAGES.div_ceil(PARTITIONS * IN_FLIGHT);
    let mut most_above = 0;
    let mut sent = 0u64;
    for w in 0..windows {
        // A window of IN_FLIGHT per partition, completed in a scrambled
        // order, in batches; the floor is the window's start.
        let base = w * IN_FLIGHT;
        let mut batch = Vec::new();
        for p in 0..PARTITIONS {
            for k in 0..IN_FLIGHT {
                let i = base + (k * 37 + p) % IN_FLIGHT;
                batch.push(Message::new("big", p as u32, i, Vec::new()).with_done_below(base));
                sent += 1;
            }
        }
        for chunk in batch.chunks(500) {
            let out = rt.block_on(inbox.apply(chunk, |_tx| Ok(())))?;
            assert!(out.iter().all(|o| *o == Outcome::Applied));
            let (records, above) = inbox.footprint()?;
            assert!(records <= PARTITIONS as usize, "{records} records");
            most_above = most_above.max(above);
            assert!(
                above <= (PARTITIONS * IN_FLIGHT) as usize,
                "{above} positions kept above the watermarks"
            );
        }
    }
    assert!(sent >= TOTAL_MESSAGES);
    let (records, above) = inbox.footprint()?;
    assert_eq!((records, above), (PARTITIONS as usize, 0));
    println!(
        "1,000,000 messages: {records} records, at most {most_above} positions above the watermarks"
    );
    Ok(())
}

/// A message retried for long while 100,000 later ones of a filtered
/// stream (every other position is another consumer's) are applied behind
/// it: the position keeps one range for them, not one entry each.
#[test]
fn a_stuck_message_keeps_one_range_for_what_is_applied_behind_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let inbox = Inbox::with_options(
        &store,
        "stuck",
        InboxOptions::new()
            .producer_window(0)
            .max_attempts(u32::MAX),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Ours are the odd positions; 1 is stuck (the floor stays at it).
    let stuck = Message::new("S", 0, 1, b"stuck".to_vec()).with_done_from(0);
    let fail = |tx: &mut InboxTx<'_, '_>| {
        if tx.message().data() == b"stuck" {
            Err(Error::abort("not yet"))
        } else {
            Ok(())
        }
    };
    let out = rt.block_on(inbox.apply(std::slice::from_ref(&stuck), fail))?;
    assert!(matches!(out[..], [Outcome::Retry { .. }]), "{out:?}");
    let mut most = 0;
    for chunk in (1..=100_000u64).collect::<Vec<_>>().chunks(250) {
        let batch: Vec<Message> = chunk
            .iter()
            .map(|k| {
                let at = 2 * k + 1;
                Message::new("S", 0, at, Vec::new())
                    .with_done_below(1)
                    .with_done_from(at - 1)
            })
            .collect();
        let out = rt.block_on(inbox.apply(&batch, fail))?;
        assert!(out.iter().all(|o| *o == Outcome::Applied), "{out:?}");
        let pos = inbox.position("S", 0)?.ok_or("no position")?;
        assert_eq!(pos.next, 1, "{pos:?}");
        most = most.max(pos.done.len());
        assert!(pos.done.len() <= 1, "{} ranges kept", pos.done.len());
    }
    let out = rt.block_on(inbox.apply(&[stuck.with_attempt(2)], |_tx| Ok(())))?;
    assert_eq!(out, vec![Outcome::Applied]);
    let pos = inbox.position("S", 0)?.ok_or("no position")?;
    assert_eq!((pos.next, pos.done.len()), (200_002, 0), "{pos:?}");
    assert!(most == 1);
    Ok(())
}

/// A poison message is dead-lettered on its last attempt and the partition
/// moves on; replaying it (once fixed) applies it once, and a second replay
/// finds nothing.
#[test]
fn poison_is_dead_lettered_and_replayed_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let inbox = Inbox::with_options(&store, "c", InboxOptions::new().max_attempts(2))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fails: HashMap<u64, u32> = [(2, 99)].into();
    let msgs: Vec<Sim> = (1..=3)
        .map(|l| Sim {
            partition: 0,
            position: l,
            logical: l,
            fail_until: 0,
        })
        .collect();
    let batch: Vec<Message> = msgs.iter().map(|s| message(s, 1, None, None)).collect();
    let out = rt.block_on(inbox.apply(&batch, handler(&fails, false)))?;
    assert_eq!(out[0], Outcome::Applied);
    assert!(matches!(out[1], Outcome::Retry { .. }), "{out:?}");
    assert_eq!(out[2], Outcome::Blocked { behind: 2 });
    // Second attempt: the last one.
    let batch: Vec<Message> = msgs[1..]
        .iter()
        .map(|s| message(s, 2, None, None))
        .collect();
    let out = rt.block_on(inbox.apply(&batch, handler(&fails, false)))?;
    assert!(matches!(out[0], Outcome::DeadLettered { .. }), "{out:?}");
    assert_eq!(out[1], Outcome::Applied, "the partition moves on");
    let dead = inbox.dead_letters()?;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error.contains("planned failure of 2"),
        "{}",
        dead[0].error
    );
    assert_eq!((dead[0].position, dead[0].attempts), (2, 2));
    assert_eq!(store.get(&EFFECTS, &2)?, None);
    // Replay with a handler that now succeeds.
    let fixed = HashMap::new();
    assert!(rt.block_on(inbox.replay_dead("S", 0, 2, handler(&fixed, false)))?);
    assert!(!rt.block_on(inbox.replay_dead("S", 0, 2, handler(&fixed, false)))?);
    assert_eq!(store.get(&EFFECTS, &2)?, Some(1));
    assert!(inbox.dead_letters()?.is_empty());
    assert_eq!(inbox.metrics().dead_lettered(), 1);
    Ok(())
}

/// A store failure is returned, not dead-lettered; the reserved tables are
/// not open to users.
#[test]
fn reserved_names_and_store_errors() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    const FORGED: Table<(String, String, u32), u64> = Table::new("outboxkv.inbox.positions");
    let err = store
        .write(|tx| tx.put(&FORGED, &("c".into(), "S".into(), 0), &1))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTableName { .. }), "{err}");
    assert!(Inbox::new(&store, "").is_err());
    assert!(Inbox::new(&store, "x".repeat(129)).is_err());
    let inbox = Inbox::new(&store, "c")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A handler error that is about the store, not the message.
    let out = rt.block_on(inbox.apply(&[Message::new("S", 0, 1, vec![])], |_tx| {
        Err(Error::Timeout("disk".into()))
    }));
    assert!(matches!(out, Err(Error::Timeout(_))), "{out:?}");
    assert!(inbox.dead_letters()?.is_empty());
    assert_eq!(inbox.position("S", 0)?, None);
    Ok(())
}

/// The broker is acknowledged after `apply` returns, so what it committed
/// must be on disk then, whatever the store's default durability and the
/// handler chose; a copy seen as a duplicate is reported only after a
/// durable commit too.
#[test]
fn applied_messages_are_durable_when_apply_returns() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options()
        .durability(Durability::Buffered)
        .open(dir.path())?;
    let inbox = Inbox::new(&store, "c")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outbox = store.outbox();
    for n in 1..=20u64 {
        let m = Message::new("S", 0, n, n.to_be_bytes().to_vec());
        let out = rt.block_on(inbox.apply(&[m], |tx: &mut InboxTx<'_, '_>| {
            tx.set_durability(Durability::Buffered);
            let n = tx.message().position;
            tx.put(&EFFECTS, &n, &1)?;
            tx.emit(Event::bytes("effect", n.to_string(), vec![1]))
        }))?;
        assert_eq!(out, vec![Outcome::Applied]);
        assert_eq!(
            outbox.durable_head(),
            outbox.head(),
            "message {n}: acknowledged before its commit is on disk"
        );
        // A Buffered write by someone else, then a redelivered copy: the
        // duplicate's commit covers it (it is what the first copy's commit
        // may have been, visible before its fsync).
        store.write(|tx| tx.emit(Event::bytes("other", n.to_string(), vec![2])))?;
        let again = Message::new("S", 0, n, vec![]);
        let out = rt.block_on(inbox.apply(&[again], |_tx: &mut InboxTx<'_, '_>| {
            Err(Error::abort("a duplicate must not reach the handler"))
        }))?;
        assert_eq!(out, vec![Outcome::Duplicate]);
        assert_eq!(outbox.durable_head(), outbox.head(), "duplicate {n}");
    }
    Ok(())
}

/// A message too large to keep in the dead-letter table is still
/// dead-lettered (without its body), so the partition moves on; it cannot
/// be replayed from the store.
#[test]
fn an_oversized_poison_message_does_not_stall_the_partition() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::options().max_value_size(4096).open(dir.path())?;
    let inbox = Inbox::with_options(&store, "c", InboxOptions::new().max_attempts(1))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let big = Message::new("S", 0, 1, vec![7u8; 64 * 1024]);
    let small = Message::new("S", 0, 2, vec![1]);
    let out = rt.block_on(inbox.apply(&[big, small], |tx: &mut InboxTx<'_, '_>| {
        let body = tx.message().body.clone();
        // Fails with TooLarge for the big one.
        let at = tx.message().position;
        tx.put(&BODIES, &at, &body)
    }))?;
    assert!(matches!(out[0], Outcome::DeadLettered { .. }), "{out:?}");
    assert_eq!(out[1], Outcome::Applied);
    assert_eq!(inbox.position("S", 0)?.map(|p| p.next), Some(3));
    let dead = inbox.dead_letters()?;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].truncated && dead[0].body.is_empty(),
        "{:?}",
        dead[0].error
    );
    assert!(dead[0].error.contains("65536 bytes"), "{}", dead[0].error);
    let replay = rt.block_on(inbox.replay_dead("S", 0, 1, |_tx: &mut InboxTx<'_, '_>| Ok(())));
    assert!(
        matches!(replay, Err(Error::InvalidArgument(_))),
        "{replay:?}"
    );
    assert!(matches!(
        inbox.queue_replay("S", 0, 1),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(inbox.dead_letters()?.len(), 1, "kept where it was");
    Ok(())
}

const BODIES: Table<u64, Vec<u8>> = Table::new("bodies");

/// Upstream headers that are not valid for an event (control characters,
/// huge values) are not copied into emitted events: the emit succeeds.
#[test]
fn malformed_upstream_trace_headers_do_not_fail_emits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let inbox = Inbox::new(&store, "c")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let m = Message::new("S", 0, 1, vec![])
        .with_header("correlationid", "a\nb")
        .with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .with_header("tracestate", "x".repeat(10_000));
    let out = rt.block_on(inbox.apply(&[m], |tx: &mut InboxTx<'_, '_>| {
        tx.emit(Event::bytes("e", "k", vec![1]))
    }))?;
    assert_eq!(out, vec![Outcome::Applied]);
    let entries = store.outbox().read(1, 10)?;
    let e = &entries[0];
    assert_eq!(e.header("correlationid"), Some("S/0/1"), "{:?}", e.headers);
    assert!(
        e.header("traceparent")
            .is_some_and(|t| t.contains("0af7651916cd43dd8448eb211c80319c"))
    );
    assert_eq!(e.header("tracestate"), None);
    Ok(())
}

/// Positions at the top of the range neither panic nor wrap.
#[test]
fn positions_at_u64_max_do_not_wrap() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let inbox = Inbox::new(&store, "c")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ok = |_tx: &mut InboxTx<'_, '_>| Ok(());
    let top = [
        Message::new("S", 0, u64::MAX - 1, vec![]).with_done_below(u64::MAX - 1),
        Message::new("S", 0, u64::MAX, vec![]),
    ];
    let out = rt.block_on(inbox.apply(&top, ok))?;
    assert_eq!(out, vec![Outcome::Applied, Outcome::Applied]);
    let again = rt.block_on(inbox.apply(&top, ok))?;
    assert_eq!(again, vec![Outcome::Duplicate, Outcome::Duplicate]);
    let pos = inbox.position("S", 0)?.ok_or("no position")?;
    assert!(pos.contains(u64::MAX) && pos.contains(1), "{pos:?}");
    Ok(())
}
