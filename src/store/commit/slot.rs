//! How a queued commit learns its outcome: its [`Slot`].
//!
//! A commit that is not the leader queues with a slot and waits on it. The
//! pipeline sets the slot once: to the commit's outcome, or (for a slot of a
//! thread that waits, [`Waiter::Thread`]) to a role the thread is to take
//! on first (lead the queue, run the fsyncs). A slot of an async commit
//! ([`Waiter::Task`]) never gets a role: the pipeline gives roles meant for
//! it to the store's commit threads (`super::driver`) instead, so no task
//! of the caller's runtime ever writes or fsyncs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::{Condvar, Mutex};

use super::Failure;

/// What a commit's wait ends with.
pub(super) type Done = std::result::Result<(), Failure>;

/// Who waits on a slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Waiter {
    /// A thread blocked in `Pipeline::commit`: it may be handed a role.
    Thread,
    /// An async commit's future: it is woken with its outcome only.
    Task,
}

pub(super) enum SlotState {
    Waiting,
    /// Become the leader: write the queue.
    Lead,
    /// Become the fsyncer: fsync for the groups waiting for one.
    Sync,
    Done(Done),
}

pub(super) struct Slot {
    pub(super) state: Mutex<SlotState>,
    pub(super) cond: Condvar,
    pub(super) waiter: Waiter,
    /// The task to wake when the slot is set (`Waiter::Task` only).
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    pub(super) fn new(waiter: Waiter) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Waiting),
            cond: Condvar::new(),
            waiter,
            waker: Mutex::new(None),
        })
    }

    /// Sets the slot and wakes its waiter. Call it without the pipeline's
    /// lock held: dropping the waker may free a task.
    pub(super) fn set(&self, s: SlotState) {
        *self.state.lock() = s;
        self.cond.notify_one();
        let waker = self.waker.lock().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Resolves with the outcome set on a [`Waiter::Task`] slot.
///
/// The waker is stored before the state is checked, and [`Slot::set`]
/// writes the state before it takes the waker: so a `set` between the two
/// finds the waker, and no wake-up is lost.
pub(crate) struct SlotWait {
    pub(super) slot: Arc<Slot>,
}

impl Drop for SlotWait {
    fn drop(&mut self) {
        // A dropped future's waker is not kept until the slot is set.
        self.slot.waker.lock().take();
    }
}

impl Future for SlotWait {
    type Output = Done;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let slot = &self.slot;
        {
            let mut waker = slot.waker.lock();
            match &mut *waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
        }
        let mut state = slot.state.lock();
        match std::mem::replace(&mut *state, SlotState::Waiting) {
            SlotState::Done(r) => {
                // Polled again after this (a caller's mistake): the same
                // outcome again, not a wait that never ends.
                *state = SlotState::Done(r.clone());
                drop(state);
                slot.waker.lock().take();
                Poll::Ready(r)
            }
            SlotState::Waiting => Poll::Pending,
            // A task slot is never handed a role (`Pipeline::hand`); keep
            // what was there rather than lose it.
            other => {
                *state = other;
                Poll::Pending
            }
        }
    }
}
