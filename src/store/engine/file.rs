//! The store's files outside RocksDB, and the helpers that write them.
//!
//! ```text
//! <store>/OUTBOXKV      identity and format version (`StoreMeta`)
//! <store>/LOCK          held by the one `Store` that has the store open
//! <store>/db/           the RocksDB database (see `super` for its layout)
//! <store>/relay/LOCK    held by the one relay of the store, whichever kind
//! <store>/relay/cursor  the sidecar relay's cursor (`RelayCursor`)
//! ```

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::lock::LOCK_FILE;
use crate::error::{Error, Result};
use crate::outbox::cursor::RelayCursor;
use crate::store::meta::{FORMAT_VERSION, META_FILE, MetaError, StoreMeta};

/// The RocksDB database's folder inside a store.
pub(crate) const DB_DIR: &str = "db";
/// The relay's folder inside a store: its `LOCK` and the sidecar's cursor.
pub(crate) const RELAY_DIR: &str = "relay";
/// The sidecar's cursor file inside [`RELAY_DIR`].
pub(crate) const CURSOR_FILE: &str = "cursor";

/// Where the sidecar relay of the store at `store_path` keeps its cursor.
pub(crate) fn cursor_path(store_path: &Path) -> PathBuf {
    store_path.join(RELAY_DIR).join(CURSOR_FILE)
}

/// Reads and decodes the cursor file at `path`; `Ok(None)` when there is
/// none, [`Error::Corruption`] when it is damaged.
pub(crate) fn read_cursor(path: &Path) -> Result<Option<RelayCursor>> {
    read_cursor_bytes(path)?
        .map(|bytes| decode_cursor(path, &bytes))
        .transpose()
}

/// The bytes of the cursor file at `path`, undecoded; `Ok(None)` when there
/// is none.
pub(crate) fn read_cursor_bytes(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read relay cursor", path, e)),
    }
}

/// Decodes cursor `bytes` read from `path`.
pub(crate) fn decode_cursor(path: &Path, bytes: &[u8]) -> Result<RelayCursor> {
    RelayCursor::decode(bytes).map_err(|e| Error::corruption(path.display().to_string(), e.0))
}

/// The error for a path that is not a store, saying why.
pub(crate) fn not_a_store(path: &Path, reason: impl Into<String>) -> Error {
    Error::NotAStore {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads `<path>/OUTBOXKV`; `Ok(None)` when there is none.
pub(crate) fn read_meta(path: &Path) -> Result<Option<StoreMeta>> {
    let file = path.join(META_FILE);
    let bytes = match fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", file, e)),
    };
    match StoreMeta::decode(&bytes) {
        Ok(m) => Ok(Some(m)),
        Err(MetaError::Version(found)) if found > FORMAT_VERSION => Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        }),
        Err(e @ (MetaError::BadMagic | MetaError::Version(_))) => {
            Err(not_a_store(path, e.to_string()))
        }
        Err(e) => Err(Error::corruption(file.display().to_string(), e.to_string())),
    }
}

/// Writes `<path>/OUTBOXKV` atomically ([`write_file_atomic`]).
pub(crate) fn write_meta(path: &Path, meta: &StoreMeta) -> Result<()> {
    write_file_atomic(&path.join(META_FILE), &meta.encode())
}

/// Replaces `file` with `bytes` so that a reader (or a crash) sees the old
/// or the new content, never a mix: a temporary file written and fsynced,
/// renamed over `file`, then the directory fsynced.
pub(crate) fn write_file_atomic(file: &Path, bytes: &[u8]) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut tmp_name = file.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    fs::rename(&tmp, file).map_err(|e| Error::io("rename", file, e))?;
    sync_dir(dir)
}

/// Fsyncs the directory `dir`, so the files created or renamed in it are
/// durable under their names.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

/// Whether `path` holds nothing but, perhaps, a `LOCK` file (left by a
/// creation that stopped half-way).
pub(crate) fn is_empty_dir(path: &Path) -> Result<bool> {
    let entries = fs::read_dir(path).map_err(|e| Error::io("list", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", path, e))?;
        if entry.file_name() != LOCK_FILE {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Refuses a database folder that holds data files but no `CURRENT` file:
/// RocksDB (`create_if_missing`) would start a new, empty database there and
/// delete the old files as obsolete. A folder with no data files is an
/// interrupted creation and may be created again.
pub(crate) fn check_current(db_path: &Path) -> Result<()> {
    if db_path.join("CURRENT").exists() {
        return Ok(());
    }
    let entries = match fs::read_dir(db_path) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list directory", db_path, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list directory", db_path, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".sst") || name.ends_with(".log") {
            return Err(Error::corruption(
                db_path.display().to_string(),
                format!(
                    "the database has data files ({name}, ...) but no CURRENT file; \
                     refusing to create a new database over them"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks, reading only, that `path` is an outboxkv store of a format this
/// build reads, with a database in it.
pub(crate) fn check_store(path: &Path) -> Result<StoreMeta> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(not_a_store(path, "it is not a directory")),
        Err(_) => return Err(not_a_store(path, "it does not exist")),
    }
    let meta = read_meta(path)?.ok_or_else(|| not_a_store(path, "it has no OUTBOXKV file"))?;
    let db_path = path.join(DB_DIR);
    // A secondary on a missing primary can hang (facebook/rocksdb#7031).
    if !db_path.join("CURRENT").is_file() {
        return Err(Error::corruption(
            db_path.display().to_string(),
            "the database has no CURRENT file",
        ));
    }
    Ok(meta)
}
