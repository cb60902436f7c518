//! Commit notification: wakes readers when the outbox head moves.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Holds the outbox head (last committed seq) and wakes both blocking and
/// async waiters when it moves. Publishing costs two atomic operations when
/// nobody waits.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    head: AtomicU64,
    /// Blocked `wait_beyond` callers plus registered wakers. `publish` skips
    /// the lock when it is zero (both sides use SeqCst: either the waiter
    /// sees the new head or the publisher sees the waiter).
    waiters: AtomicUsize,
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
        self.head.load(Ordering::SeqCst)
    }

    /// Records a new head and wakes every waiter.
    pub(crate) fn publish(&self, head: u64) {
        self.head.fetch_max(head, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let wakers = std::mem::take(&mut *self.lock.lock());
        self.waiters.fetch_sub(wakers.len(), Ordering::SeqCst);
        self.cond.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    /// Blocks until the head is beyond `seq` or `timeout` passes; returns the head.
    pub(crate) fn wait_beyond(&self, seq: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now().checked_add(timeout);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock();
        let head = loop {
            let head = self.head();
            if head > seq {
                break head;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut guard, d).timed_out() {
                        break self.head();
                    }
                }
                None => self.cond.wait(&mut guard),
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        head
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
        if wakers.iter().any(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        // Count the waker before re-checking the head: `publish` stores the
        // head before it reads the count, so either we see its head here or
        // it sees our waker and takes the list (under this lock).
        self.notifier.waiters.fetch_add(1, Ordering::SeqCst);
        let head = self.notifier.head();
        if head > self.after {
            self.notifier.waiters.fetch_sub(1, Ordering::SeqCst);
            return Poll::Ready(head);
        }
        wakers.push(cx.waker().clone());
        Poll::Pending
    }
}
