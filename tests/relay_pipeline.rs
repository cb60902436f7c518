//! Several batches in flight: a history check of what the relay promises a
//! sink that takes concurrent publishes (`Sink::max_concurrent_publishes`),
//! against a sink that answers at random (acks, broker-wide failures,
//! rejections, held entries, random delays) while writers commit over hot
//! and cold keys and the relay is stopped and started again.
//!
//! Checked on the recorded history, every run:
//! - calls are made in seq order, each batch ascending;
//! - once the relay has taken in a failure (a `Retry` or `Held`: the calls
//!   of a prefix of its calls have returned, and one of them failed), it
//!   makes no call while others are in flight;
//! - a call made while no other is in flight starts at the first entry not
//!   settled (past the ones acknowledged to this relay): the relay has taken
//!   in every outcome before it, so a sink may forget earlier failures then
//!   (the NATS sink's per-key order relies on it);
//! - a relay never publishes an entry again that a sink acknowledged to it
//!   (a restarted relay may: that is at-least-once);
//! - entries in flight stay within `in_flight_entries` (one batch is always
//!   allowed);
//! - at the end every committed entry was acknowledged or dead-lettered,
//!   none both (unless a stopped relay had not settled the ack), the outbox
//!   is empty, and the dead letters are exactly the
//!   entries the sink refused for good;
//! - the relay really had several publishes in flight.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use outboxkv::relay::{Backoff, BoxFuture, Outcome, Relay, Shutdown, Sink};
use outboxkv::{Durability, Event, OutboxEntry, Store};
use parking_lot::Mutex;

use common::TestResult;

const BATCH: usize = 40;
const IN_FLIGHT: usize = 120;

#[derive(Default)]
struct History {
    rng: u64,
    /// Publish calls not returned yet.
    active: usize,
    most_active: usize,
    /// Entries of the calls not returned yet.
    pending: usize,
    most_pending: usize,
    /// Last seq of the latest call (while calls are in flight).
    last_seq: u64,
    /// Acknowledged to the relay running now.
    acked_now: HashSet<u64>,
    /// Acknowledged to any relay.
    acked: BTreeSet<u64>,
    /// Acknowledged to a relay that stopped before it settled them.
    acked_unsettled: BTreeSet<u64>,
    /// Refused for good (the relay must dead-letter these).
    refused: BTreeSet<u64>,
    /// Rejections per seq (non-permanent ones count toward max_attempts).
    rejections: HashMap<u64, u32>,
    calls: usize,
    /// This relay's calls in call order: (returned, returned an outcome
    /// that holds the relay back: `Retry` or `Held`).
    log: Vec<(bool, bool)>,
    /// How many of `log` the relay has taken in for sure (a prefix that
    /// has returned).
    taken: usize,
    /// The relay has taken in an outcome that holds it back.
    holding: bool,
    violations: Vec<String>,
}

impl History {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Chaos {
    history: Arc<Mutex<History>>,
    store: Store,
}

impl Sink for Chaos {
    fn name(&self) -> &str {
        "chaos"
    }
    fn max_concurrent_publishes(&self) -> usize {
        8
    }
    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        let delay;
        {
            let mut h = self.history.lock();
            h.calls += 1;
            // What the relay has taken in by now: every call of a prefix
            // that has returned (it takes them in before it publishes more).
            while h.taken < h.log.len() && h.log[h.taken].0 {
                if h.log[h.taken].1 {
                    h.holding = true;
                }
                h.taken += 1;
            }
            if h.holding && h.active > 0 {
                let active = h.active;
                h.violations.push(format!(
                    "call at seq {} made while {active} calls are in flight, after the relay \
                     took in a failure",
                    batch[0].seq
                ));
            }
            if h.active == 0 {
                h.holding = false;
                // Nothing in flight: the relay has taken in every outcome,
                // so this call starts at the first entry not settled (after
                // the ones acknowledged to it beyond a failure).
                let tail = self.store.outbox().tail();
                if let Some(seq) = (tail..batch[0].seq).find(|s| !h.acked_now.contains(s)) {
                    h.violations.push(format!(
                        "call at seq {} made with nothing in flight, but seq {seq} (tail {tail}) \
                         is neither settled nor acknowledged",
                        batch[0].seq
                    ));
                }
            } else if batch[0].seq <= h.last_seq {
                let last = h.last_seq;
                h.violations.push(format!(
                    "call at seq {} made after one that ended at {last}",
                    batch[0].seq
                ));
            }
            if batch.windows(2).any(|w| w[0].seq >= w[1].seq) {
                h.violations.push("a batch out of seq order".into());
            }
            for e in batch {
                if h.acked_now.contains(&e.seq) {
                    h.violations.push(format!(
                        "seq {} published again after it was acknowledged",
                        e.seq
                    ));
                }
            }
            h.last_seq = batch[batch.len() - 1].seq;
            h.active += 1;
            h.most_active = h.most_active.max(h.active);
            h.pending += batch.len();
            h.most_pending = h.most_pending.max(h.pending);
            delay = Duration::from_micros(h.next() % 3000);
        }
        // Counts the call as returned when its future ends or is dropped
        // (a relay stopped with `Shutdown::Now` drops what is in flight).
        let guard = InFlight {
            history: &self.history,
            entries: batch.len(),
            call: {
                let mut h = self.history.lock();
                h.log.push((false, false));
                h.log.len() - 1
            },
        };
        Box::pin(async move {
            let guard = guard;
            tokio::time::sleep(delay).await;
            let mut h = self.history.lock();
            let mut failed_keys: HashSet<&str> = HashSet::new();
            let mut outcomes = Vec::with_capacity(batch.len());
            for e in batch {
                let roll = h.next() % 1000;
                let outcome = if failed_keys.contains(e.key.as_str()) {
                    Outcome::Held {
                        reason: "an earlier entry of the key failed".into(),
                    }
                } else if e.key == "doomed" && roll < 500 {
                    h.refused.insert(e.seq);
                    Outcome::Rejected {
                        error: "refused for good".into(),
                        permanent: true,
                    }
                } else if roll < 60 {
                    Outcome::Retry {
                        error: "broker away".into(),
                    }
                } else if roll < 90 {
                    *h.rejections.entry(e.seq).or_default() += 1;
                    Outcome::Rejected {
                        error: "not now".into(),
                        permanent: false,
                    }
                } else {
                    Outcome::acked()
                };
                if matches!(outcome, Outcome::Acked { .. }) {
                    h.acked_now.insert(e.seq);
                    h.acked.insert(e.seq);
                } else if !e.key.is_empty() {
                    failed_keys.insert(e.key.as_str());
                }
                outcomes.push(outcome);
            }
            if outcomes
                .iter()
                .any(|o| matches!(o, Outcome::Retry { .. } | Outcome::Held { .. }))
                && let Some(call) = h.log.get_mut(guard.call)
            {
                call.1 = true;
            }
            outcomes
        })
    }
}

struct InFlight<'a> {
    history: &'a Mutex<History>,
    entries: usize,
    /// Its index in `History::log`.
    call: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut h = self.history.lock();
        h.active -= 1;
        h.pending -= self.entries;
        if let Some(call) = h.log.get_mut(self.call) {
            call.0 = true;
        }
    }
}

fn relay(store: &Store, sink: &Arc<dyn Sink>) -> outboxkv::Result<Relay> {
    Relay::builder(store)
        .sink_arc(sink.clone())
        .batch_size(BATCH)
        .in_flight_entries(IN_FLIGHT)
        .max_attempts(3)
        .dead_letter_storm_limit(1000)
        .backoff(Backoff {
            initial: Duration::from_micros(200),
            max: Duration::from_millis(2),
            factor: 2.0,
            jitter: 0.5,
        })
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_keep_the_relays_promises_under_random_failures() -> TestResult {
    for seed in [1u64, 0x9e37_79b9, 0xdead_beef] {
        let dir = tempfile::tempdir()?;
        let store = Store::options()
            .durability(Durability::Buffered)
            .open(dir.path())?;
        let history = Arc::new(Mutex::new(History {
            rng: seed,
            ..History::default()
        }));
        let sink: Arc<dyn Sink> = Arc::new(Chaos {
            history: history.clone(),
            store: store.clone(),
        });
        // Two writers: one over a hot key and many cold ones, one that
        // writes the key the sink often refuses and keyless events.
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let s = store.clone();
                std::thread::spawn(move || -> outboxkv::Result<()> {
                    for i in 0..1500u64 {
                        let key = match (w, i % 4) {
                            (0, 0) => "hot".to_string(),
                            (0, _) => format!("cold-{}", i % 300),
                            (_, 0) => "doomed".to_string(),
                            (_, 1) => String::new(),
                            _ => format!("k-{}", i % 7),
                        };
                        s.write(|tx| tx.emit(Event::bytes("t", key.as_str(), vec![0u8; 16])))?;
                        if i % 100 == 0 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        // Stop and start the relay a few times while the writers run.
        for _ in 0..4 {
            let r = relay(&store, &sink)?;
            tokio::time::sleep(Duration::from_millis(40)).await;
            r.shutdown(Shutdown::Now).await?;
            // What this relay had acknowledged but not settled is sent again
            // by the next (at least once): it may be refused then.
            let tail = store.outbox().tail();
            let mut h = history.lock();
            let unsettled: Vec<u64> = h.acked_now.iter().copied().filter(|&s| s >= tail).collect();
            h.acked_unsettled.extend(unsettled);
            h.acked_now.clear();
            // A new relay: its own calls from here on.
            h.log.clear();
            h.taken = 0;
            h.holding = false;
        }
        for w in writers {
            w.join().map_err(|_| "writer panicked")??;
        }
        let head = store.outbox().head();
        let r = relay(&store, &sink)?;
        r.wait_delivered(head, Duration::from_secs(60)).await?;
        r.shutdown(Shutdown::Now).await?;

        let h = history.lock();
        assert!(h.violations.is_empty(), "seed {seed}: {:?}", h.violations);
        assert_eq!(head, 3000);
        assert_eq!(store.outbox().depth(), 0, "seed {seed}");
        let dead: BTreeSet<u64> = store
            .outbox()
            .dead_letters()
            .list(1, 10_000)?
            .iter()
            .map(|d| d.entry.seq)
            .collect();
        for seq in 1..=head {
            assert!(
                h.acked.contains(&seq) || dead.contains(&seq),
                "seed {seed}: seq {seq} neither acknowledged nor dead-lettered"
            );
        }
        // Dead-lettered although acknowledged: only if a relay stopped
        // before settling the acknowledgement and the next was refused.
        let both: Vec<_> = h
            .acked
            .intersection(&dead)
            .filter(|s| !h.acked_unsettled.contains(s))
            .collect();
        assert!(both.is_empty(), "seed {seed}: acked and dead: {both:?}");
        // Dead letters: refused for good, or rejected max_attempts times.
        for seq in &dead {
            assert!(
                h.refused.contains(seq) || h.rejections.get(seq).copied().unwrap_or(0) >= 3,
                "seed {seed}: seq {seq} dead-lettered without cause"
            );
        }
        assert!(
            h.most_pending <= IN_FLIGHT,
            "seed {seed}: {} entries in flight",
            h.most_pending
        );
        assert!(
            h.most_active >= 2,
            "seed {seed}: never more than one publish in flight"
        );
        eprintln!(
            "seed {seed}: {} calls, at most {} in flight ({} entries), {} acked, {} dead",
            h.calls,
            h.most_active,
            h.most_pending,
            h.acked.len(),
            dead.len()
        );
    }
    Ok(())
}
