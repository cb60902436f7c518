//! A commit from a thread-local destructor (a per-thread buffered writer
//! that flushes its pending events when its thread exits) succeeds: the
//! commit path's own thread-local state may be destroyed already by then,
//! and must not be touched in a way that panics (a panic in a thread-local
//! destructor aborts the process, so the check runs in a child process).

use std::cell::RefCell;
use std::process::Command;
use std::sync::mpsc;

use outboxkv::{Event, Store};

struct FlushOnExit {
    store: &'static Store,
    done: mpsc::Sender<bool>,
}

impl Drop for FlushOnExit {
    fn drop(&mut self) {
        let r = self
            .store
            .write(|tx| tx.emit(Event::bytes("t", "k", b"flushed at thread exit".to_vec())));
        let _ = self.done.send(r.is_ok());
    }
}

thread_local! {
    static FLUSH: RefCell<Option<FlushOnExit>> = const { RefCell::new(None) };
}

#[test]
#[ignore = "the child process of a_commit_from_a_thread_local_destructor_succeeds"]
fn thread_exit_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: &'static Store = Box::leak(Box::new(Store::open(dir.path()).expect("open")));
    let (done, flushed) = mpsc::channel();
    std::thread::spawn(move || {
        // Registered first, so destroyed after everything the commit path
        // registers on this thread.
        FLUSH.with(|f| *f.borrow_mut() = Some(FlushOnExit { store, done }));
        store
            .write(|tx| tx.emit(Event::bytes("t", "k", b"first".to_vec())))
            .expect("first commit");
    })
    .join()
    .expect("thread");
    assert_eq!(
        flushed.recv().ok(),
        Some(true),
        "the exit-time commit failed"
    );
    assert_eq!(store.outbox().head(), 2);
}

#[test]
fn a_commit_from_a_thread_local_destructor_succeeds() -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--ignored", "--exact", "thread_exit_child", "--nocapture"])
        .output()?;
    assert!(
        out.status.success(),
        "child failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
