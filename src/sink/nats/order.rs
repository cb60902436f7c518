//! Per-key order across publishes in flight together.
//!
//! A connection lost in the middle of a batch can lose a publish while a
//! later one, still in the client's buffer, goes through after the
//! reconnect. So an entry of a key is handed to the client only once the
//! previous entry of that key, in this publish call or an earlier one still
//! in flight, is acknowledged; if that one failed (or was held back, or
//! refused), the entry is held back too. Relays sharing the sink share
//! the lines: an entry waits for the entry before it in its key's line
//! whatever its store (seqs are only compared within one store).
//!
//! Each publish call takes its places in line when it is made (in seq
//! order: see [`Sink::max_concurrent_publishes`](crate::relay::Sink)), one
//! [`Ticket`] per entry with a key. A ticket is resolved when its entry is
//! acknowledged or fails, and as failed when it is dropped unresolved (a
//! publish dropped half-way). The line forgets a key once its last entry is
//! acknowledged; a failed one stays, so that every later entry of its key
//! is held back. An entry of its own store with a seq at or above one's own
//! is not waited for: the relay publishes again from the first failed entry
//! once nothing it sent is in flight any more, so such an entry is an
//! earlier attempt. An entry of another store always is (see `enter`). The
//! line is emptied when a call is made while no other is in flight (by
//! then the relay has taken in every outcome and publishes again from its
//! first failed entry, so nothing earlier is left to wait for).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::OutboxEntry;

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const FAILED: u8 = 2;

/// The line of every key with an entry in flight (or failed).
#[derive(Debug, Default)]
pub(super) struct KeyOrder {
    state: Mutex<State>,
    /// Keys are held by a hash: two keys that collide are kept in order
    /// together, which costs latency, never order.
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Debug, Default)]
struct State {
    /// Publish calls not finished (nor dropped).
    active: usize,
    /// Per key hash: the turn of its last entry in line.
    last: HashMap<u64, Arc<Turn>>,
}

/// Whether one entry is acknowledged.
#[derive(Debug, Default)]
pub(super) struct Turn {
    /// The entry's seq.
    seq: u64,
    /// The store of its event id (usually the store whose outbox holds it;
    /// entries a checkpoint copy took over keep the original's).
    store: Option<crate::StoreId>,
    state: AtomicU8,
    notify: Notify,
}

impl Turn {
    /// `Some(acknowledged)` once resolved.
    pub(super) fn done(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            PENDING => None,
            s => Some(s == ACKED),
        }
    }

    /// Resolves with whether the entry was acknowledged.
    pub(super) async fn settled(&self) -> bool {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(ok) = self.done() {
                return ok;
            }
            notified.await;
        }
    }
}

/// One entry's place in its key's line.
#[derive(Debug)]
pub(super) struct Ticket<'a> {
    order: &'a KeyOrder,
    key: u64,
    /// The turn of the entry of the same key before this one, if it may
    /// still be unresolved or failed.
    prev: Option<Arc<Turn>>,
    mine: Arc<Turn>,
}

impl Ticket<'_> {
    /// The previous entry of this key: `None` when there is none in line.
    #[cfg(test)]
    fn prev(&self) -> Option<&Turn> {
        self.prev.as_deref()
    }

    /// The previous entry of this key, shared: `None` when there is none
    /// in line.
    pub(super) fn prev_turn(&self) -> Option<Arc<Turn>> {
        self.prev.clone()
    }

    /// Records whether this ticket's entry was acknowledged; wakes the next
    /// entry of its key.
    pub(super) fn resolve(self, acked: bool) {
        self.finish(acked);
    }

    fn finish(&self, acked: bool) {
        let state = if acked { ACKED } else { FAILED };
        if self
            .mine
            .state
            .compare_exchange(PENDING, state, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.mine.notify.notify_waiters();
        if acked {
            // Nothing of this key is left to wait for, unless a later entry
            // is in line already.
            let mut s = self.order.state.lock();
            if s.last
                .get(&self.key)
                .is_some_and(|t| Arc::ptr_eq(t, &self.mine))
            {
                s.last.remove(&self.key);
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Unresolved: the entry may or may not have been sent.
        self.finish(false);
    }
}

/// A publish call's place among the calls in flight.
#[derive(Debug)]
pub(super) struct Call<'a> {
    order: &'a KeyOrder,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let mut s = self.order.state.lock();
        s.active = s.active.saturating_sub(1);
    }
}

impl KeyOrder {
    /// Takes places in line for every entry of `batch` with a key (`None`
    /// for the others), in order.
    pub(super) fn enter<'a>(
        &'a self,
        batch: &[OutboxEntry],
    ) -> (Call<'a>, Vec<Option<Ticket<'a>>>) {
        let mut s = self.state.lock();
        if s.active == 0 {
            // No call in flight: the relay publishes again from its first
            // failed entry; what failed before is not waited for.
            s.last.clear();
        }
        s.active += 1;
        let tickets = batch
            .iter()
            .map(|e| {
                if e.key.is_empty() {
                    return None;
                }
                let key = self.hash(&e.key);
                let mine = Arc::new(Turn {
                    seq: e.seq,
                    store: Some(e.id.store),
                    ..Turn::default()
                });
                // The entry waits for the one before it in line, except an
                // entry of its own store at or above its seq: that is an
                // earlier attempt (this entry sent again after a failure,
                // from the first that failed, once nothing of that relay
                // was in flight any more). Seqs of two stores say nothing
                // of each other: an entry of another store (another relay
                // sharing the sink, or an entry a checkpoint copy took
                // over) is always waited for, which keeps the chain of
                // each key whole at the cost of some latency.
                let prev = s
                    .last
                    .insert(key, mine.clone())
                    .filter(|prev| prev.seq < e.seq || prev.store != Some(e.id.store));
                Some(Ticket {
                    order: self,
                    key,
                    prev,
                    mine,
                })
            })
            .collect();
        (Call { order: self }, tickets)
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Keys in line now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::entry::{EventId, StoreId};

    /// Entries of `keys`, seqs from `first` on.
    fn entries(first: u64, keys: &[&str]) -> Vec<OutboxEntry> {
        entries_of(StoreId([1; 16]), first, keys)
    }

    /// The same, of the store `store`.
    fn entries_of(store: StoreId, first: u64, keys: &[&str]) -> Vec<OutboxEntry> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let seq = first + i as u64;
                OutboxEntry {
                    seq,
                    id: EventId { store, seq },
                    event_type: "t".into(),
                    key: (*k).into(),
                    content_type: String::new(),
                    headers: Vec::new(),
                    payload: Vec::new(),
                    created_at_micros: 0,
                }
            })
            .collect()
    }

    #[test]
    fn a_key_waits_for_its_previous_entry_across_calls() {
        let order = KeyOrder::default();
        let (_c1, mut t1) = order.enter(&entries(10, &["a", "b", ""]));
        let (_c2, t2) = order.enter(&entries(20, &["a", "c", "b"]));
        assert!(t1[0].as_ref().unwrap().prev().is_none());
        assert!(t1[2].is_none(), "no key, no line");
        let a2 = t2[0].as_ref().unwrap().prev().unwrap();
        assert_eq!(a2.done(), None, "waits for the first call's a");
        assert!(t2[1].as_ref().unwrap().prev().is_none());
        t1[0].take().unwrap().resolve(true);
        assert_eq!(a2.done(), Some(true));
        // b failed in call 1: call 2's b sees it.
        t1[1].take().unwrap().resolve(false);
        assert_eq!(t2[2].as_ref().unwrap().prev().unwrap().done(), Some(false));
    }

    /// Two relays share the sink: store A's seq 370 of key k is in flight,
    /// store B's seq 2500 of k comes in line, then A's seq 2347 of k. A's
    /// 2347 must wait for A's 370 (B's higher seq says nothing about A's
    /// order).
    #[test]
    fn a_key_of_one_store_waits_for_its_own_entry_whatever_another_store_sent() {
        let order = KeyOrder::default();
        let (a, b) = (StoreId([1; 16]), StoreId([2; 16]));
        let (_c1, _t1) = order.enter(&entries_of(a, 370, &["k"]));
        let (_c2, t2) = order.enter(&entries_of(b, 2500, &["k"]));
        let (_c3, t3) = order.enter(&entries_of(a, 2347, &["k"]));
        // The chain of k stays whole: A's 2347 waits for B's 2500, which
        // waits for A's 370 (with the old per-key filter on seqs alone,
        // A's 2347 waited for nothing).
        let b_waits = t2[0].as_ref().unwrap().prev().expect("B's 2500 waits");
        assert_eq!((b_waits.seq, b_waits.store), (370, Some(a)));
        let a_waits = t3[0].as_ref().unwrap().prev().expect("A's 2347 waits");
        assert_eq!((a_waits.seq, a_waits.store), (2500, Some(b)));
    }

    #[test]
    fn entries_of_two_id_stores_in_one_outbox_keep_their_order() {
        let order = KeyOrder::default();
        let (old, new) = (StoreId([1; 16]), StoreId([2; 16]));
        let (_c, mut t) =
            order.enter(&[entries_of(old, 100, &["k"]), entries_of(new, 101, &["k"])].concat());
        let waits_for = t[1]
            .as_ref()
            .unwrap()
            .prev_turn()
            .expect("101 waits for 100");
        assert_eq!(waits_for.done(), None);
        t[0].take().unwrap().resolve(true);
        assert_eq!(waits_for.done(), Some(true));
    }

    #[test]
    fn a_dropped_ticket_counts_as_failed_and_a_failure_stays_until_idle() {
        let order = KeyOrder::default();
        {
            let (c1, t1) = order.enter(&entries(30, &["a"]));
            let (_c2, t2) = order.enter(&entries(40, &["x"]));
            drop(t1);
            drop(c1);
            // Call 2 still in flight: a new call sees a's failure.
            let (_c3, t3) = order.enter(&entries(50, &["a"]));
            assert_eq!(t3[0].as_ref().unwrap().prev().unwrap().done(), Some(false));
            drop(t2);
        }
        // Nothing in flight: the line starts over.
        let (_c, t) = order.enter(&entries(60, &["a"]));
        assert!(t[0].as_ref().unwrap().prev().is_none());
    }

    #[test]
    fn an_entry_sent_again_does_not_wait_for_its_own_failure() {
        let order = KeyOrder::default();
        let batch = entries(70, &["a", "a"]);
        // Another call keeps the line from being emptied (a second relay
        // on the same sink, say).
        let (_other, _t) = order.enter(&entries(80, &["z"]));
        let (c1, t1) = order.enter(&batch);
        drop(t1); // both failed
        drop(c1);
        let (_c2, t2) = order.enter(&batch[..]);
        assert!(
            t2[0].as_ref().unwrap().prev().is_none(),
            "seq 70 again: the failed 70 and 71 in line are earlier attempts"
        );
        assert_eq!(
            t2[1].as_ref().unwrap().prev().unwrap().done(),
            None,
            "seq 71 waits for the new attempt of 70"
        );
    }

    #[test]
    fn acknowledged_keys_are_forgotten() {
        let order = KeyOrder::default();
        let (_keep, _k) = order.enter(&entries(90, &["z"]));
        let (_c, t) = order.enter(&entries(100, &["a", "b", "a"]));
        assert_eq!(order.len(), 3);
        for ticket in t.into_iter().flatten() {
            ticket.resolve(true);
        }
        assert_eq!(order.len(), 1, "only z's line is left");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_wakes_when_the_previous_entry_settles() {
        let order = KeyOrder::default();
        let (_c1, mut t1) = order.enter(&entries(110, &["a"]));
        let (_c2, t2) = order.enter(&entries(120, &["a"]));
        let first = t1[0].take().unwrap();
        let wait = async { t2[0].as_ref().unwrap().prev().unwrap().settled().await };
        let resolve = async {
            tokio::task::yield_now().await;
            first.resolve(true);
        };
        let (ok, ()) = tokio::join!(wait, resolve);
        assert!(ok);
    }
}
