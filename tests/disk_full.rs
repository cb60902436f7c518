//! A full disk (a small tmpfs): commits fail with an error and write nothing
//! half; once space returns the store opens again with every acknowledged
//! commit and nothing else. Needs root or passwordless sudo to mount the
//! tmpfs, and fails (not skips) without it.

mod common;

use std::path::Path;
use std::process::Command;

use outboxkv::{Error, Event, Store, Table};

use common::TestResult;

const DOCS: Table<u64, Vec<u8>> = Table::new("docs");

/// A tmpfs of `mib` MiB mounted on `dir`, unmounted on drop.
struct Tmpfs<'a>(&'a Path);

fn sudo(args: &[&str]) -> Result<std::process::ExitStatus, std::io::Error> {
    let root = Command::new("id").arg("-u").output()?.stdout == b"0\n";
    if root {
        Command::new(args[0]).args(&args[1..]).status()
    } else {
        Command::new("sudo").arg("-n").args(args).status()
    }
}

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, mib: u32) -> Result<Tmpfs<'a>, Box<dyn std::error::Error>> {
        let size = format!("size={mib}m");
        let dir_s = dir.to_string_lossy();
        let status = sudo(&["mount", "-t", "tmpfs", "-o", &size, "tmpfs", &dir_s])?;
        if !status.success() {
            return Err(format!(
                "mounting a tmpfs on {dir_s} failed ({status}): this test needs root or passwordless sudo"
            )
            .into());
        }
        Ok(Tmpfs(dir))
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = sudo(&["umount", "-l", &self.0.to_string_lossy()]);
    }
}

fn doc(i: u64) -> Vec<u8> {
    common::incompressible(i, 16 << 10)
}

fn commit(store: &Store, i: u64) -> outboxkv::Result<()> {
    store
        .write(|tx| {
            tx.put(&DOCS, &i, &doc(i))?;
            tx.emit(Event::bytes("docs.saved", i.to_string(), doc(i)))
        })
        .map(|_| ())
}

#[test]
fn a_full_disk_fails_commits_cleanly_and_the_store_recovers_when_space_returns() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let _tmpfs = Tmpfs::mount(&mnt, 48)?;
    // Space to give back later: enough for recovery to flush the log.
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; 30 << 20])?;
    let path = mnt.join("store");

    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    let mut acked = 0u64;
    let failure = loop {
        match commit(&store, acked + 1) {
            Ok(()) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 10_000, "48 MiB never filled up");
    };
    assert!(acked > 10, "only {acked} commits fit");
    assert!(
        matches!(
            failure,
            Error::Storage { .. } | Error::Io { .. } | Error::Poisoned { .. }
        ),
        "a full disk is a storage error: {failure}"
    );
    println!("disk full after {acked} commits: {failure}");
    // Fail-stop: no further commit is accepted on this handle.
    assert!(commit(&store, acked + 1).is_err());
    drop(store);

    // Space returns; the store opens with exactly the acknowledged commits
    // (the failed one wrote nothing half) and works again.
    std::fs::remove_file(&ballast)?;
    let store = Store::options().relay_cursor_poll(None).open(&path)?;
    let mut docs = 0u64;
    for row in store.range(&DOCS, ..)? {
        let (i, v) = row?;
        docs += 1;
        assert_eq!(i, docs);
        assert_eq!(v, doc(i), "doc {i}");
    }
    let head = store.outbox().head();
    assert!(
        docs == acked || docs == acked + 1,
        "{docs} docs after {acked} acknowledged commits"
    );
    assert_eq!(
        head, docs,
        "every doc has its event and no event lacks its doc"
    );
    for e in store.outbox().read(1, usize::MAX)? {
        assert_eq!(e.key, e.seq.to_string());
        assert_eq!(e.payload, doc(e.seq));
    }
    commit(&store, docs + 1)?;
    assert_eq!(store.outbox().head(), docs + 1);
    Ok(())
}
