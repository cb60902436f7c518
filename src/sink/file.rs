//! JSON Lines sinks: a file (fsynced per batch) and stdout.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::cloudevents;
use crate::OutboxEntry;
use crate::error::{Error, Result};
use crate::relay::{BoxFuture, Outcome, Sink};

/// How every record this sink writes begins.
const RECORD_START: &[u8] = br#"{"specversion":"1.0","#;

/// Whether `line` is a whole record of this sink (or of its earlier
/// versions, which wrote the attributes in another order): a JSON object
/// with a CloudEvents `specversion`.
fn is_own_record(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .is_some_and(|v| v.get("specversion").is_some_and(|s| s.is_string()))
}

/// Whether `tail` (the bytes after the last line break) is a record a
/// crash cut short: not whole JSON, and beginning as this sink's records
/// do (or, after lines of the sink's own, at least as a JSON object).
fn is_torn_record(tail: &[u8], after_own_lines: bool) -> bool {
    let starts_like_ours = RECORD_START.starts_with(tail) || tail.starts_with(RECORD_START);
    serde_json::from_slice::<serde_json::Value>(tail).is_err()
        && (starts_like_ours || (after_own_lines && tail.starts_with(b"{\"")))
}

/// Reads the bytes of `file` in `range`.
fn read_range(file: &mut File, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.seek(SeekFrom::Start(range.start))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// The longest last line (or torn tail) the check reads: above any record
/// this sink writes (an event is at most 64 MiB, `max_event_size`'s
/// ceiling; as JSON a payload can grow up to 6 times, escaped), so a
/// longer one is not this sink's.
const MAX_CHECKED_LINE: u64 = 6 * (64 << 20) + (16 << 20);

/// The position of the last `\n` in `file` before `end`, reading backwards
/// in chunks, at most `MAX_CHECKED_LINE` bytes back (`Err(None)` beyond).
fn last_newline_before(file: &mut File, end: u64) -> std::io::Result<Result<Option<u64>, ()>> {
    let floor = end.saturating_sub(MAX_CHECKED_LINE);
    let mut end = end;
    while end > 0 {
        if end <= floor {
            return Ok(Err(()));
        }
        let start = end.saturating_sub(64 << 10);
        let chunk = read_range(file, start..end)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Ok(Some(start + i as u64)));
        }
        end = start;
    }
    Ok(Ok(None))
}

/// Checks that `file` is empty or a file this sink wrote, and cuts off a
/// torn last record (a write a crash interrupted, never acknowledged).
/// Anything else is refused and left untouched: a last line that is not
/// one of the sink's records, or text after it that is not a torn record.
fn check_and_repair(file: &mut File, path: &Path) -> Result<()> {
    let io = |e| Error::io("check sink file", path, e);
    let refuse = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "{} is not a CloudEvents JSON Lines file this sink wrote ({why}); \
             refusing to append to it",
            path.display()
        )))
    };
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(());
    }
    let too_long = || refuse("its last line is longer than any record this sink writes");
    let Ok(last_newline) = last_newline_before(file, len).map_err(io)? else {
        return too_long();
    };
    if let Some(n) = last_newline {
        let Ok(before) = last_newline_before(file, n).map_err(io)? else {
            return too_long();
        };
        let line_start = before.map_or(0, |p| p + 1);
        let line = read_range(file, line_start..n).map_err(io)?;
        if !is_own_record(&line) {
            return refuse("its last line is not a CloudEvents JSON object");
        }
    }
    let tail_start = last_newline.map_or(0, |n| n + 1);
    if tail_start == len {
        return Ok(());
    }
    let tail = read_range(file, tail_start..len).map_err(io)?;
    if !is_torn_record(&tail, last_newline.is_some()) {
        return refuse("it ends with text that is not a record cut short");
    }
    tracing::warn!(
        path = %path.display(),
        bytes = tail.len(),
        "cutting a torn last record off the sink file"
    );
    file.set_len(tail_start).map_err(io)?;
    file.sync_data().map_err(io)
}

fn render(batch: &[OutboxEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|e| e.size_hint() + 256).sum());
    for entry in batch {
        // `specversion` first (RECORD_START), then the other attributes.
        // Serializing a serde_json::Value cannot fail, and JSON escapes
        // every control character: no entry can break a line.
        let mut json = cloudevents::to_json(entry);
        if let Some(map) = json.as_object_mut() {
            map.remove("specversion");
        }
        let rest = json.to_string();
        out.extend_from_slice(RECORD_START);
        out.extend_from_slice(rest.as_bytes().get(1..).unwrap_or_default());
        out.push(b'\n');
    }
    out
}

/// One outcome per entry when a whole batch succeeds or fails together:
/// acknowledged, or retried with `error`.
fn same_for_all(n: usize, result: std::result::Result<(), String>) -> Vec<Outcome> {
    (0..n)
        .map(|_| match &result {
            Ok(()) => Outcome::acked(),
            Err(error) => Outcome::Retry {
                error: error.clone(),
            },
        })
        .collect()
}

/// Appends one CloudEvents JSON object per line (structured mode; see
/// [`cloudevents`](super::cloudevents) for the attributes, the event's
/// headers among them) to a file and fsyncs it before acknowledging the
/// batch. Lines are only ever appended; after a crash between the fsync and
/// the relay's cursor write a batch can appear twice (at least once), with
/// the same `id`s. A batch whose write fails is cut off again, and opening
/// the file cuts off a torn last record (a write a crash interrupted, never
/// acknowledged), so every line is whole. It never touches a file that is
/// not its own.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let sink = outboxkv::sink::FileSink::open(dir.path().join("events.jsonl"))?;
/// assert_eq!(sink.path(), dir.path().join("events.jsonl"));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<Appender>>,
}

/// The open file, and whether it must be checked again before the next
/// append (a failed write could not be cut off).
#[derive(Debug)]
struct Appender {
    file: File,
    check: bool,
}

impl FileSink {
    /// Opens `path` for appending, creating it (mode 0600, its folder
    /// fsynced) when it does not exist. An existing file must be one this
    /// sink wrote (CloudEvents JSON objects, one per line): anything else
    /// fails with [`Error::InvalidArgument`] and is left untouched. A torn
    /// last record (a write a crash interrupted) is cut off. The sink holds
    /// an exclusive lock on the file (`flock`) while it is open: a second
    /// sink on it (another relay) fails with [`Error::Io`] (`WouldBlock`).
    /// On a filesystem without `flock` support the sink warns and goes on
    /// unlocked.
    pub fn open(path: impl AsRef<Path>) -> Result<FileSink> {
        let path = path.as_ref().to_path_buf();
        let mut options = OpenOptions::new();
        options.read(true).append(true);
        let (mut file, created) = match options.open(&path) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut create = OpenOptions::new();
                create.read(true).append(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut create, 0o600);
                let f = create
                    .open(&path)
                    .map_err(|e| Error::io("create sink file", &path, e))?;
                (f, true)
            }
            Err(e) => return Err(Error::io("open sink file", &path, e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::io(
                    "lock sink file",
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "another relay is writing to it",
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot lock the sink file; going on without the lock");
            }
        }
        if created {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            crate::store::engine::file::sync_dir(dir)?;
        } else {
            check_and_repair(&mut file, &path)?;
        }
        Ok(FileSink {
            path,
            file: Arc::new(Mutex::new(Appender { file, check: false })),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        "file"
    }

    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        let bytes = render(batch);
        let file = self.file.clone();
        let path = self.path.clone();
        let n = batch.len();
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || {
                let mut a = file.lock();
                if a.check {
                    // An earlier failed batch could not be cut off: cut it
                    // now (a torn record of ours), or refuse to go on.
                    check_and_repair(&mut a.file, &path).map_err(|e| e.to_string())?;
                    a.check = false;
                }
                let f = &mut a.file;
                let before = f.metadata().map_err(|e| e.to_string())?.len();
                let result = f.write_all(&bytes).and_then(|()| f.sync_data());
                if let Err(e) = result {
                    // Leave no partial batch behind for the next append.
                    if f.set_len(before).and_then(|()| f.sync_data()).is_err() {
                        a.check = true;
                    }
                    return Err(format!("write to sink file: {e}"));
                }
                Ok(())
            })
            .await;
            let result = match written {
                Ok(r) => r,
                Err(e) => Err(format!("sink file writer failed: {e}")),
            };
            same_for_all(n, result)
        })
    }
}

/// Writes one CloudEvents JSON object per line to standard output.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        "stdout"
    }

    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        let bytes = render(batch);
        let n = batch.len();
        Box::pin(async move {
            let mut out = std::io::stdout().lock();
            let result = out
                .write_all(&bytes)
                .and_then(|()| out.flush())
                .map_err(|e| format!("write to stdout: {e}"));
            same_for_all(n, result)
        })
    }
}
