//! The seam between the store core and the storage medium: every RocksDB
//! write the store makes after opening, and every fsync of the write-ahead
//! log, goes through [`Medium`].
//!
//! In a normal build `Medium` is a pass-through. With the `failpoints`
//! feature (tests only) each call site is a named [`Failpoint`] where a test
//! can make the call fail, make it "crash" (the write or fsync happens, then
//! the store behaves as if the process died right after it: the call
//! reports an error and the store is poisoned), or slow it down. The fault
//! tests and the model-based test (`tests/model.rs`) use it.

use rocksdb::{DB, WriteBatch, WriteOptions};

/// The storage medium the store core writes to (see the module docs).
pub(crate) struct Medium {
    #[cfg(feature = "failpoints")]
    pub(crate) faults: faults::Faults,
}

impl Medium {
    pub(crate) fn new() -> Medium {
        Medium {
            #[cfg(feature = "failpoints")]
            faults: faults::Faults::default(),
        }
    }

    /// Applies `batch` to `db` at the call site `at`. The error is the cause
    /// a poisoned store reports.
    pub(crate) fn write(
        &self,
        db: &DB,
        at: WriteSite,
        batch: WriteBatch,
        opts: &WriteOptions,
    ) -> Result<(), String> {
        #[cfg(feature = "failpoints")]
        let fault = self.faults.hit(at.failpoint());
        #[cfg(feature = "failpoints")]
        if let Some(faults::Fault::Fail) = fault {
            return Err(format!("injected {} failure (failpoints)", at.what()));
        }
        db.write_opt(batch, opts)
            .map_err(|e| format!("{} failed: {e}", at.what()))?;
        #[cfg(feature = "failpoints")]
        if let Some(faults::Fault::CrashAfter) = fault {
            return Err(format!(
                "injected crash after the {} (failpoints)",
                at.what()
            ));
        }
        Ok(())
    }

    /// Fsyncs the write-ahead log of `db` (RocksDB's `SyncWAL`): every write
    /// made before the call is on disk when it returns `Ok`.
    pub(crate) fn sync_wal(&self, db: &DB) -> Result<(), String> {
        #[cfg(feature = "failpoints")]
        let fault = self.faults.hit(Failpoint::WalSync);
        #[cfg(feature = "failpoints")]
        if let Some(faults::Fault::Fail) = fault {
            return Err("injected fsync failure (failpoints)".to_string());
        }
        db.flush_wal(true)
            .map_err(|e| format!("write-ahead log fsync failed: {e}"))?;
        #[cfg(feature = "failpoints")]
        if let Some(faults::Fault::CrashAfter) = fault {
            return Err("injected crash after the write-ahead log fsync (failpoints)".to_string());
        }
        Ok(())
    }
}

/// Which of the store's writes a [`Medium::write`] is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WriteSite {
    /// A commit group's batch (the commit pipeline).
    CommitGroup,
    /// A prune, with the dead letters it records (`complete_through`).
    Prune,
    /// A purge of dead letters.
    DeadLetterPurge,
}

impl WriteSite {
    fn what(self) -> &'static str {
        match self {
            WriteSite::CommitGroup => "commit write",
            WriteSite::Prune => "outbox prune",
            WriteSite::DeadLetterPurge => "dead-letter purge",
        }
    }

    #[cfg(feature = "failpoints")]
    fn failpoint(self) -> Failpoint {
        match self {
            WriteSite::CommitGroup => Failpoint::CommitWrite,
            WriteSite::Prune => Failpoint::PruneWrite,
            WriteSite::DeadLetterPurge => Failpoint::DeadLetterWrite,
        }
    }
}

#[cfg(feature = "failpoints")]
pub use faults::{Failpoint, Fault};

#[cfg(feature = "failpoints")]
mod faults {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use parking_lot::Mutex;

    /// A named point in the store where a test can inject a fault (feature
    /// `failpoints`, not for production): see [`Store::inject`](crate::Store::inject).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum Failpoint {
        /// The RocksDB write of a commit group.
        CommitWrite,
        /// An fsync of the write-ahead log: of a `Sync` commit group when
        /// the fsync is pipelined (the default), of
        /// [`Outbox::make_durable`](crate::Outbox::make_durable), or of
        /// [`Store::flush`](crate::Store::flush). A delay set with
        /// [`Store::delay_fsyncs`](crate::Store::delay_fsyncs) runs before
        /// the fsync, failing or not.
        WalSync,
        /// The write that prunes the outbox and records dead letters.
        PruneWrite,
        /// The write that purges dead letters.
        DeadLetterWrite,
    }

    const POINTS: usize = 4;

    impl Failpoint {
        fn index(self) -> usize {
            match self {
                Failpoint::CommitWrite => 0,
                Failpoint::WalSync => 1,
                Failpoint::PruneWrite => 2,
                Failpoint::DeadLetterWrite => 3,
            }
        }
    }

    /// What an armed [`Failpoint`] does to each call once its passes are
    /// used up (every later call, until it is disarmed).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum Fault {
        /// The call fails without touching the medium: a write is not
        /// applied, an fsync not run. The store is poisoned.
        Fail,
        /// Like `Fail`, after waiting this long: a stalled disk that gives
        /// up, so that commits queue up behind the failing call.
        Stall(Duration),
        /// The call goes through, then fails: as if the process died right
        /// after the write (or fsync) reached the medium. The store is
        /// poisoned; what the call wrote is found after a reopen.
        CrashAfter,
    }

    #[derive(Default)]
    struct Point {
        /// Calls let through before `fault` applies.
        passes: u64,
        fault: Option<Fault>,
        delay: Duration,
    }

    /// The armed failpoints of one store.
    #[derive(Default)]
    pub(crate) struct Faults {
        points: Mutex<[Point; POINTS]>,
        /// Set once any point is armed or delayed: until then a call does
        /// not take the lock (benchmarks build with this feature too).
        used: AtomicBool,
    }

    impl Faults {
        /// Arms `point`: the next `passes` calls go through, every later one
        /// gets `fault` (`None` disarms).
        pub(crate) fn arm(&self, point: Failpoint, passes: u64, fault: Option<Fault>) {
            let mut points = self.points.lock();
            let p = &mut points[point.index()];
            p.passes = passes;
            p.fault = fault;
            self.used.store(true, Ordering::Release);
        }

        /// Every call at `point` first sleeps `delay` (`ZERO`: no delay).
        pub(crate) fn delay(&self, point: Failpoint, delay: Duration) {
            self.points.lock()[point.index()].delay = delay;
            self.used.store(true, Ordering::Release);
        }

        /// One call at `point`: sleeps its delay, then says which fault
        /// applies to it, if any.
        pub(crate) fn hit(&self, point: Failpoint) -> Option<Fault> {
            if !self.used.load(Ordering::Acquire) {
                return None;
            }
            let (delay, fault) = {
                let mut points = self.points.lock();
                let p = &mut points[point.index()];
                let fault = match p.fault {
                    Some(_) if p.passes > 0 => {
                        p.passes -= 1;
                        None
                    }
                    f => f,
                };
                (p.delay, fault)
            };
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            match fault {
                Some(Fault::Stall(late)) => {
                    std::thread::sleep(late);
                    Some(Fault::Fail)
                }
                f => f,
            }
        }
    }
}
