//! Order across publishes in flight together.
//!
//! The idempotent producer keeps each partition in the order records are
//! handed to it, so the sink keeps per-key order across concurrent publish
//! calls by handing over their records in call order (which is seq order):
//! each call takes a ticket when it is made and sends only in its
//! [`Turn`], after the call before it has handed over all of its records
//! (its deliveries may still be outstanding). The producer is replaced (a
//! fatal error, a smaller batch cap) only when no other call has deliveries
//! outstanding, so no record of a later call can go out through a new
//! producer session while an earlier one may still be retried by the old.

use std::collections::BTreeSet;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Tickets for the send phases of publish calls, served in order.
#[derive(Debug, Default)]
pub(super) struct Turnstile {
    state: Mutex<TurnState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct TurnState {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose turn it is: every lower one has passed.
    serving: u64,
    /// Tickets above `serving` that passed already (dropped early).
    passed: BTreeSet<u64>,
    /// Calls made and not finished (their futures not dropped).
    active: usize,
    /// Calls that took their turn and have deliveries outstanding.
    delivering: usize,
    /// A call failed as a whole (nothing of it sent): the calls after it
    /// send nothing either, until one is made alone.
    halted: bool,
}

/// A publish call's place in line. Dropping it passes its turn (if it has
/// not) and ends the call.
#[derive(Debug)]
pub(super) struct Ticket<'a> {
    line: &'a Turnstile,
    ticket: u64,
    /// Whether no other call was in flight when this one was made.
    alone: bool,
    passed: bool,
    delivering: bool,
}

impl Turnstile {
    /// Takes the next ticket (when the call is made, in call order).
    pub(super) fn enter(&self) -> Ticket<'_> {
        let mut s = self.state.lock();
        let ticket = s.next;
        s.next += 1;
        let alone = s.active == 0;
        s.active += 1;
        Ticket {
            line: self,
            ticket,
            alone,
            passed: false,
            delivering: false,
        }
    }
}

impl Ticket<'_> {
    /// Whether no other call was in flight when this one was made: the
    /// relay had then taken in every earlier outcome (see
    /// [`Sink::max_concurrent_publishes`](crate::relay::Sink)), so what
    /// earlier calls refused need not hold this one back.
    pub(super) fn alone(&self) -> bool {
        self.alone
    }

    /// Marks the calls after this one as not to send anything (this one
    /// failed as a whole: what they would send could overtake what this one
    /// did not).
    pub(super) fn halt(&self) {
        self.line.state.lock().halted = true;
    }

    /// Whether an earlier call failed as a whole since the last call made
    /// alone (in this call's turn).
    pub(super) fn halted(&self) -> bool {
        let mut s = self.line.state.lock();
        if self.alone {
            s.halted = false;
        }
        s.halted
    }

    /// Waits for this call's turn to send; from then on it counts as
    /// delivering until it is dropped.
    pub(super) async fn turn(&mut self) {
        loop {
            let notified = self.line.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.line.state.lock();
                if s.serving >= self.ticket {
                    if !self.delivering {
                        self.delivering = true;
                        s.delivering += 1;
                    }
                    return;
                }
            }
            notified.await;
        }
    }

    /// Waits (in its turn) until no other call has deliveries outstanding:
    /// the producer may then be replaced.
    pub(super) async fn alone_with_deliveries(&self) {
        loop {
            let notified = self.line.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.line.state.lock().delivering <= usize::from(self.delivering) {
                return;
            }
            notified.await;
        }
    }

    /// Every record of this call is handed to the producer: the next call
    /// may send.
    pub(super) fn pass(&mut self) {
        if self.passed {
            return;
        }
        self.passed = true;
        let mut s = self.line.state.lock();
        s.passed.insert(self.ticket);
        loop {
            let serving = s.serving;
            if !s.passed.remove(&serving) {
                break;
            }
            s.serving += 1;
        }
        drop(s);
        self.line.notify.notify_waiters();
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.pass();
        let mut s = self.line.state.lock();
        s.active = s.active.saturating_sub(1);
        if self.delivering {
            s.delivering = s.delivering.saturating_sub(1);
        }
        drop(s);
        self.line.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn turns_come_in_ticket_order_and_a_dropped_ticket_passes() {
        let short = std::time::Duration::from_millis(20);
        let line = Turnstile::default();
        let mut a = line.enter();
        let b = line.enter();
        let mut c = line.enter();
        assert!(a.alone() && !b.alone() && !c.alone());
        // b is dropped before its turn; c still waits for a.
        drop(b);
        assert!(tokio::time::timeout(short, c.turn()).await.is_err());
        a.turn().await;
        a.pass();
        tokio::time::timeout(short, c.turn())
            .await
            .expect("c's turn once a passed");
        drop(a);
        // c is still in flight: the next call is not alone.
        assert!(!line.enter().alone());
        drop(c);
        assert!(line.enter().alone());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_halt_stops_the_calls_after_it_until_one_is_made_alone() {
        let line = Turnstile::default();
        let mut a = line.enter();
        let mut b = line.enter();
        a.turn().await;
        assert!(!a.halted());
        a.halt();
        drop(a);
        b.turn().await;
        assert!(b.halted(), "b was made while a was in flight");
        drop(b);
        let mut c = line.enter();
        c.turn().await;
        assert!(!c.halted(), "c was made alone");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_replacement_waits_for_earlier_deliveries() {
        let line = Turnstile::default();
        let mut a = line.enter();
        let mut b = line.enter();
        a.turn().await;
        a.pass();
        b.turn().await;
        // a still has deliveries outstanding: b may not replace the producer.
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            b.alone_with_deliveries(),
        )
        .await;
        assert!(waited.is_err());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(1), b.alone_with_deliveries())
            .await
            .expect("alone once a is done");
    }
}
