//! Commit notification: wakes readers when the outbox head moves.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Holds the outbox head (last committed seq) and wakes both blocking and
/// async waiters when it moves. Publishing costs one uncontended lock when
/// nobody waits.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    head: AtomicU64,
    lock: Mutex<Vec<Waker>>,
    cond: Condvar,
}

impl Notifier {
    pub(crate) fn new(head: u64) -> Arc<Notifier> {
        Arc::new(Notifier {
            head: AtomicU64::new(head),
            ..Notifier::default()
        })
    }

    pub(crate) fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Records a new head and wakes every waiter.
    pub(crate) fn publish(&self, head: u64) {
        self.head.fetch_max(head, Ordering::AcqRel);
        let wakers = std::mem::take(&mut *self.lock.lock());
        self.cond.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    /// Blocks until the head is beyond `seq` or `timeout` passes; returns the head.
    pub(crate) fn wait_beyond(&self, seq: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.lock.lock();
        loop {
            let head = self.head();
            if head > seq {
                return head;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut guard, d).timed_out() {
                        return self.head();
                    }
                }
                None => self.cond.wait(&mut guard),
            }
        }
    }
}

/// Future returned by [`Outbox::changed`](crate::Outbox::changed): resolves
/// with the new head once the outbox head is beyond the given seq. It needs
/// no particular async runtime.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct HeadChanged {
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) after: u64,
}

impl Future for HeadChanged {
    type Output = u64;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        let head = self.notifier.head();
        if head > self.after {
            return Poll::Ready(head);
        }
        let mut wakers = self.notifier.lock.lock();
        // Re-check under the lock: `publish` swaps the list under the same
        // lock after storing the head, so no wake-up can fall in between.
        let head = self.notifier.head();
        if head > self.after {
            return Poll::Ready(head);
        }
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
