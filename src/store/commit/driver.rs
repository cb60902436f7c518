//! The store's commit threads, which do the pipeline's work for async
//! commits.
//!
//! A thread that commits with `Store::write` takes on the pipeline's roles
//! when they come to it: it leads the queue (writes a group) or runs the
//! fsyncs, then goes back to waiting for its own commit. An async commit
//! cannot: its task would block a worker of the caller's runtime for a
//! write or an fsync. So a role meant for an async commit goes to one of
//! two threads the store starts at its first async commit:
//! `outboxkv-lead` writes groups, `outboxkv-fsync` fsyncs them. Two, so
//! that the next group is written while the last one is fsynced, as with
//! threads that commit. They hold the store open while they run; the last
//! [`Store`](crate::Store) handle to be dropped stops them (after they
//! finished the roles they were given) before the database closes.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::store::handle::Inner;

/// A role of the pipeline that a commit thread takes on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Role {
    /// Write the queue (`Pipeline::lead`).
    Lead,
    /// Fsync the groups waiting for it (`Pipeline::sync_loop`).
    Sync,
}

#[derive(Default)]
struct Flags {
    given: bool,
    stop: bool,
}

/// One thread's mailbox: a role given and not yet taken, or a stop.
#[derive(Default)]
struct Mailbox {
    flags: Mutex<Flags>,
    cond: Condvar,
}

impl Mailbox {
    /// Waits for a role; `false` once stopped with no role left to take.
    fn take(&self) -> bool {
        let mut f = self.flags.lock();
        loop {
            if f.given {
                f.given = false;
                return true;
            }
            if f.stop {
                return false;
            }
            self.cond.wait(&mut f);
        }
    }

    fn give(&self) {
        self.flags.lock().given = true;
        self.cond.notify_one();
    }

    fn stop(&self) {
        self.flags.lock().stop = true;
        self.cond.notify_one();
    }
}

struct Boxes {
    lead: Mailbox,
    sync: Mailbox,
}

thread_local! {
    /// Set on the commit threads (a store must not join them from one).
    static ON_DRIVER: Cell<bool> = const { Cell::new(false) };
}

/// The commit threads of one store, started at its first async commit.
#[derive(Default)]
pub(super) struct Drivers {
    boxes: OnceLock<Arc<Boxes>>,
    /// Held while starting; the handles, for the stop.
    threads: Mutex<Vec<(Role, JoinHandle<()>)>>,
}

impl Drivers {
    /// Starts the threads, once (later calls return at once).
    pub(super) fn start(&self, inner: &Arc<Inner>) -> Result<()> {
        if self.boxes.get().is_some() {
            return Ok(());
        }
        let mut threads = self.threads.lock();
        if self.boxes.get().is_some() {
            return Ok(());
        }
        let boxes = Arc::new(Boxes {
            lead: Mailbox::default(),
            sync: Mailbox::default(),
        });
        for (role, name) in [
            (Role::Lead, "outboxkv-lead"),
            (Role::Sync, "outboxkv-fsync"),
        ] {
            let (b, shared) = (boxes.clone(), inner.clone());
            let spawned = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(&b, &shared, role));
            match spawned {
                Ok(handle) => threads.push((role, handle)),
                Err(e) => {
                    // Stop what started (it holds the store open).
                    boxes.lead.stop();
                    boxes.sync.stop();
                    for (_, t) in threads.drain(..) {
                        let _ = t.join();
                    }
                    return Err(Error::io("start a commit thread", inner.path.as_path(), e));
                }
            }
        }
        let _ = self.boxes.set(boxes);
        Ok(())
    }

    /// Hands `role` to its thread. `false` if the threads never started
    /// (no async commit was made, so no role can be meant for them).
    pub(super) fn give(&self, role: Role) -> bool {
        match self.boxes.get() {
            Some(b) => {
                match role {
                    Role::Lead => b.lead.give(),
                    Role::Sync => b.sync.give(),
                }
                true
            }
            None => false,
        }
    }

    /// Stops the threads once they finished the roles they were given, and
    /// waits for them. Only the lead thread is told to stop: it is the one
    /// that hands the fsync thread its role, so it stops the fsync thread
    /// when it exits (after its last hand-off), which is then told of
    /// every fsync still to run. Called when the last `Store` handle is
    /// dropped.
    pub(super) fn stop(&self) {
        let Some(boxes) = self.boxes.get() else {
            return;
        };
        boxes.lead.stop();
        let threads = std::mem::take(&mut *self.threads.lock());
        // On a commit thread (a waker of the caller's executor dropped the
        // last `Store` there), joining would wait for this very thread:
        // the threads stop by themselves.
        if ON_DRIVER.with(Cell::get) {
            return;
        }
        // Lead first: the fsync thread stops only after it.
        let (lead, sync): (Vec<_>, Vec<_>) =
            threads.into_iter().partition(|(r, _)| *r == Role::Lead);
        for (_, t) in lead.into_iter().chain(sync) {
            let _ = t.join();
        }
    }
}

fn run(boxes: &Boxes, inner: &Arc<Inner>, role: Role) {
    ON_DRIVER.with(|d| d.set(true));
    let mailbox = match role {
        Role::Lead => &boxes.lead,
        Role::Sync => &boxes.sync,
    };
    while mailbox.take() {
        let driven = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            inner.pipeline.drive(inner, role);
        }));
        if driven.is_err() {
            // A panic mid-role (in a waker of the caller's executor, say)
            // leaves the leadership or the fsync role with no one: every
            // commit, blocking ones too, would wait forever. Like a
            // broken invariant, that ends the process.
            tracing::error!(?role, "outboxkv commit thread panicked; aborting");
            std::process::abort();
        }
    }
    if role == Role::Lead {
        boxes.sync.stop();
    }
}
