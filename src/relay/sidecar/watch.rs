//! Waking the sidecar when the owner writes its log.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;

/// Signals a [`Notify`] when the owner writes to its database folder: an
/// inotify watch read by a thread (Linux). Elsewhere, or when inotify cannot
/// be set up (logged), it does nothing and the sidecar only polls.
pub(super) struct LogWatch {
    #[cfg(target_os = "linux")]
    stop: Option<linux::Stop>,
}

impl LogWatch {
    #[cfg(target_os = "linux")]
    pub(super) fn start(db_dir: &Path, wake: Arc<Notify>) -> LogWatch {
        match linux::watch(db_dir, wake) {
            Ok(stop) => LogWatch { stop: Some(stop) },
            Err(e) => {
                tracing::warn!(error = %e, dir = %db_dir.display(),
                    "cannot watch the store's log; the sidecar polls only");
                LogWatch { stop: None }
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn start(_db_dir: &Path, _wake: Arc<Notify>) -> LogWatch {
        LogWatch {}
    }
}

#[cfg(target_os = "linux")]
impl Drop for LogWatch {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.stop();
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
    use tokio::sync::Notify;

    /// Ends the watching thread.
    pub(super) struct Stop {
        flag: Arc<AtomicBool>,
        watches: Watches,
        wd: WatchDescriptor,
    }

    impl Stop {
        pub(super) fn stop(mut self) {
            self.flag.store(true, Ordering::Release);
            // Removing the watch queues an IN_IGNORED event, which ends the
            // thread's blocking read. An error means the watch is gone
            // already (the folder was removed) and the thread has ended.
            let _ = self.watches.remove(self.wd);
        }
    }

    pub(super) fn watch(dir: &Path, wake: Arc<Notify>) -> std::io::Result<Stop> {
        let mut inotify = Inotify::init()?;
        let mut watches = inotify.watches();
        let wd = watches.add(
            dir,
            WatchMask::MODIFY | WatchMask::CREATE | WatchMask::MOVED_TO,
        )?;
        let flag = Arc::new(AtomicBool::new(false));
        let stopped = flag.clone();
        std::thread::Builder::new()
            .name("outboxkv-sidecar-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let ended = match inotify.read_events_blocking(&mut buf) {
                        Ok(events) => events
                            .into_iter()
                            .any(|e| e.mask.contains(EventMask::IGNORED)),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
                        Err(e) => {
                            tracing::warn!(error = %e, "sidecar log watch failed; polling only");
                            true
                        }
                    };
                    if ended || stopped.load(Ordering::Acquire) {
                        return;
                    }
                    wake.notify_one();
                }
            })?;
        Ok(Stop { flag, watches, wd })
    }
}
