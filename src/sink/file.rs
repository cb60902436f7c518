//! JSON Lines sinks: a file (fsynced per batch) and stdout.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::cloudevents;
use crate::error::{Error, Result};
use crate::outbox::entry::OutboxEntry;
use crate::relay::{BoxFuture, Outcome, Sink};

/// Truncates `file` after its last newline (a crash can leave part of a line).
fn cut_torn_line(file: &mut File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                tracing::warn!(
                    bytes = len - keep,
                    "cutting a torn last line off the sink file"
                );
                file.set_len(keep)?;
                file.sync_data()?;
            }
            return Ok(());
        }
        end = start;
    }
    if len > 0 {
        tracing::warn!(bytes = len, "cutting a torn line off the sink file");
        file.set_len(0)?;
        file.sync_data()?;
    }
    Ok(())
}

fn render(batch: &[OutboxEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|e| e.size_hint() + 256).sum());
    for entry in batch {
        // Serializing a serde_json::Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &cloudevents::to_json(entry));
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

/// Appends one CloudEvents JSON object per line to a file and fsyncs it
/// before acknowledging the batch. Lines are only ever appended; after a
/// crash between the fsync and the relay's cursor write a batch can appear
/// twice (at least once), with the same `id`s. A batch whose write fails is
/// cut off again, and opening the file cuts off a torn last line (a write a
/// crash interrupted, never acknowledged), so every line is whole.
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
    file: Arc<Mutex<File>>,
}

impl FileSink {
    /// Opens (creating if needed) `path` for appending; a torn last line
    /// (no final newline) is removed first.
    pub fn open(path: impl AsRef<Path>) -> Result<FileSink> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open sink file", &path, e))?;
        cut_torn_line(&mut file).map_err(|e| Error::io("repair sink file", &path, e))?;
        Ok(FileSink {
            path,
            file: Arc::new(Mutex::new(file)),
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
        let n = batch.len();
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || {
                let mut f = file.lock();
                let before = f.metadata()?.len();
                let result = f.write_all(&bytes).and_then(|()| f.sync_data());
                if result.is_err() {
                    // Leave no partial batch behind for the next append.
                    let _ = f.set_len(before);
                }
                result
            })
            .await;
            let result = match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("write to sink file: {e}")),
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
