//! The operator commands: `status`, `inspect` and `dlq`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use outboxkv::relay::{read_sidecar_cursor, relay_running, sidecar_cursor_path};
use outboxkv::sink::cloudevents;
use outboxkv::{DeadLetter, OutboxEntry, Store, StoreReader};
use serde_json::{Value, json};

use crate::{Fail, bad};

#[derive(Args)]
pub(crate) struct InspectArgs {
    #[arg(long, env = "OUTBOXKV_DB")]
    db: PathBuf,
    /// First seq (default: the oldest entry).
    #[arg(long)]
    from: Option<u64>,
    /// Most entries to print (before --follow goes on).
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Only entries with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only entries of this event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// After the entries there are, keep printing new ones as the service
    /// commits them (until interrupted).
    #[arg(long)]
    follow: bool,
}

/// Which dead letters `dlq replay` / `dlq purge` act on: the seqs given,
/// then narrowed (or, without seqs, chosen) by type and key; or all.
#[derive(Args)]
pub(crate) struct DlqSelect {
    #[arg(long, env = "OUTBOXKV_DB")]
    db: PathBuf,
    /// Seqs to act on (repeat the flag, or comma-separate; each once).
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["all", "event_type", "key"])]
    seq: Vec<u64>,
    /// Only dead letters of this event type.
    #[arg(long = "type", conflicts_with = "all")]
    event_type: Option<String>,
    /// Only dead letters with this key.
    #[arg(long, conflicts_with = "all")]
    key: Option<String>,
    /// Every dead letter.
    #[arg(long, conflicts_with = "seq")]
    all: bool,
}

/// A read-only view for status, inspect and dlq list.
struct ReadView {
    // Field order is drop order: the database closes before its scratch
    // folder is removed.
    reader: StoreReader,
    _scratch: Scratch,
}

/// A temporary folder for the secondary instance, removed on drop (also
/// when opening the store fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ReadView {
    fn open(db: &Path) -> Result<ReadView, Fail> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let scratch = Scratch(
            std::env::temp_dir().join(format!("outbox-relay-{}-{nanos}", std::process::id())),
        );
        let reader = StoreReader::open(db, &scratch.0)?;
        Ok(ReadView {
            reader,
            _scratch: scratch,
        })
    }

    fn reader(&self) -> &StoreReader {
        &self.reader
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) fn status(db: &Path, as_json: bool, max_lag_secs: u64) -> Result<(), Fail> {
    // The cursor file is checked first: a damaged one is reported as such.
    let cursor = read_sidecar_cursor(db);
    let view = ReadView::open(db)?;
    let r = view.reader();
    let cursor = cursor?;
    let relay = relay_running(db)?;
    let cursor_age = std::fs::metadata(sidecar_cursor_path(db))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    let (head, tail) = (r.head()?, r.tail()?);
    let depth = (head + 1).saturating_sub(tail);
    let oldest = r.read(tail, 1)?.into_iter().next();
    let delivered = cursor.as_ref().map_or(tail.saturating_sub(1), |c| {
        c.delivered_through.max(tail.saturating_sub(1))
    });
    let undelivered = head.saturating_sub(delivered);
    let oldest_undelivered = if undelivered == 0 {
        None
    } else {
        r.read(delivered + 1, 1)?.into_iter().next()
    };
    let age = |e: &Option<OutboxEntry>| {
        e.as_ref()
            .map(|e| now_micros().saturating_sub(e.created_at_micros) as f64 / 1e6)
    };
    let lag = age(&oldest_undelivered);
    let dead = r.dead_letter_count()?;
    let unhealthy = lag.is_some_and(|l| l > max_lag_secs as f64);
    let doc = json!({
        "store": db.display().to_string(),
        "store_id": r.id().to_string(),
        "format_version": r.format_version(),
        "head": head,
        "tail": tail,
        "depth": depth,
        "undelivered": undelivered,
        "oldest_entry_age_seconds": age(&oldest),
        "oldest_undelivered_age_seconds": lag,
        "dead_letters": dead,
        "relay_running": relay,
        "sidecar_cursor": cursor.as_ref().map(|c| json!({
            "store_id": c.store.to_string(),
            "delivered_through": c.delivered_through,
            "dead_pending": c.dead.len(),
            "age_seconds": cursor_age.map(|a| a.as_secs_f64()),
        })),
        "healthy": !unhealthy,
    });
    if as_json {
        println!("{doc}");
    } else {
        let rows: Vec<(&str, String)> = vec![
            ("store", db.display().to_string()),
            ("store id", r.id().to_string()),
            ("format version", r.format_version().to_string()),
            ("head seq", head.to_string()),
            ("tail seq", tail.to_string()),
            ("outbox depth", depth.to_string()),
            ("undelivered", undelivered.to_string()),
            (
                "oldest undelivered age",
                lag.map_or("-".into(), |a| format!("{a:.3} s")),
            ),
            ("dead letters", dead.to_string()),
            (
                "relay",
                if relay {
                    "running (the relay lock is held)".into()
                } else {
                    "none running".into()
                },
            ),
            (
                "sidecar cursor",
                cursor.as_ref().map_or("none".into(), |c| {
                    format!(
                        "delivered through {} ({} dead pending), store {}, written {} ago",
                        c.delivered_through,
                        c.dead.len(),
                        c.store,
                        cursor_age.map_or("?".into(), |a| format!("{:.1} s", a.as_secs_f64()))
                    )
                }),
            ),
            (
                "health",
                if unhealthy {
                    format!("UNHEALTHY: undelivered entries older than {max_lag_secs} s")
                } else {
                    "ok".into()
                },
            ),
        ];
        for (k, v) in rows {
            println!("{k:<24}{v}");
        }
    }
    if unhealthy {
        return Err(Fail(
            format!(
                "unhealthy: the oldest undelivered entry is {:.3} s old (limit {max_lag_secs} s)",
                lag.unwrap_or_default()
            ),
            1,
        ));
    }
    Ok(())
}

fn payload_json(e: &OutboxEntry) -> Value {
    match serde_json::from_slice::<Value>(&e.payload) {
        Ok(v) => v,
        Err(_) => match std::str::from_utf8(&e.payload) {
            Ok(text) => json!({ "text": text }),
            Err(_) => json!({ "base64": cloudevents::base64(&e.payload) }),
        },
    }
}

fn entry_json(e: &OutboxEntry) -> Value {
    json!({
        "seq": e.seq,
        "id": e.id.to_string(),
        "type": e.event_type,
        "key": e.key,
        "content_type": e.content_type,
        "time": cloudevents::rfc3339_micros(e.created_at_micros),
        "headers": e.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "payload": payload_json(e),
    })
}

fn print_entry(e: &OutboxEntry, as_json: bool) {
    if as_json {
        println!("{}", entry_json(e));
    } else {
        // Debug-quoted: a key or header from the store cannot forge lines.
        println!(
            "seq {}  {}  type {}  key {:?}  {:?}  {}",
            e.seq,
            e.id,
            e.event_type,
            e.key,
            e.content_type,
            cloudevents::rfc3339_micros(e.created_at_micros)
        );
        for (k, v) in &e.headers {
            println!("  header {k:?}: {v:?}");
        }
        println!("  payload {}", payload_json(e));
    }
}

pub(crate) fn inspect(a: InspectArgs) -> Result<(), Fail> {
    let view = ReadView::open(&a.db)?;
    let r = view.reader();
    let matches = |e: &OutboxEntry| {
        a.key.as_ref().is_none_or(|k| &e.key == k)
            && a.event_type.as_ref().is_none_or(|t| &e.event_type == t)
    };
    let mut next = a.from.unwrap_or(0).max(r.tail()?);
    let mut shown = 0usize;
    let head = r.head()?;
    while shown < a.limit && next <= head {
        let chunk = r.read(next, 1000)?;
        let Some(last) = chunk.last() else { break };
        next = last.seq + 1;
        for e in chunk.iter().filter(|e| matches(e)) {
            if shown >= a.limit {
                break;
            }
            shown += 1;
            print_entry(e, a.json);
        }
    }
    if !a.follow {
        if !a.json {
            println!("({shown} entries)");
        }
        return Ok(());
    }
    // Follow: catch up with the service and print what it commits.
    next = next.max(r.head()? + 1);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        r.catch_up()?;
        // Pruned meanwhile: go on from the tail.
        next = next.max(r.tail()?);
        loop {
            let chunk = r.read(next, 1000)?;
            let Some(last) = chunk.last() else { break };
            next = last.seq + 1;
            for e in chunk.iter().filter(|e| matches(e)) {
                print_entry(e, a.json);
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

fn dead_json(d: &DeadLetter) -> Value {
    json!({
        "seq": d.entry.seq,
        "id": d.entry.id.to_string(),
        "type": d.entry.event_type,
        "key": d.entry.key,
        "attempts": d.attempts,
        "error": d.error,
        "first_failed": cloudevents::rfc3339_micros(d.first_failed_micros),
        "dead_at": cloudevents::rfc3339_micros(d.dead_at_micros),
        "payload": payload_json(&d.entry),
    })
}

fn open_for_write(db: &Path) -> Result<Store, Fail> {
    match Store::options()
        .create_if_missing(false)
        .relay_cursor_poll(None)
        .open(db)
    {
        Err(outboxkv::Error::Locked { .. }) => Err(Fail(
            format!(
                "the store {} is open in another process (the service?); dlq replay and purge need it closed",
                db.display()
            ),
            1,
        )),
        other => Ok(other?),
    }
}

pub(crate) fn dlq_list(db: &Path, as_json: bool, limit: Option<usize>) -> Result<(), Fail> {
    let view = ReadView::open(db)?;
    let dead = view.reader().dead_letters(0, limit.unwrap_or(usize::MAX))?;
    for d in &dead {
        if as_json {
            println!("{}", dead_json(d));
        } else {
            println!(
                "seq {}  {}  type {}  key {:?}  attempts {}  error: {:?}",
                d.entry.seq, d.entry.id, d.entry.event_type, d.entry.key, d.attempts, d.error
            );
        }
    }
    if !as_json {
        println!("({} dead letters)", dead.len());
    }
    Ok(())
}

pub(crate) fn dlq_replay(sel: &DlqSelect) -> Result<(), Fail> {
    let store = open_for_write(&sel.db)?;
    let seqs = selected(&store, sel)?;
    if seqs.is_empty() {
        println!("no dead letters selected");
        return Ok(());
    }
    let new = store.outbox().dead_letters().replay(&seqs)?;
    println!(
        "replayed {} dead letters as seqs {}..={}",
        seqs.len(),
        new.start,
        new.end.saturating_sub(1)
    );
    Ok(())
}

pub(crate) fn dlq_purge(sel: &DlqSelect) -> Result<(), Fail> {
    let store = open_for_write(&sel.db)?;
    let seqs = selected(&store, sel)?;
    store.outbox().dead_letters().purge(&seqs)?;
    println!("purged {} dead letters", seqs.len());
    Ok(())
}

fn selected(store: &Store, sel: &DlqSelect) -> Result<Vec<u64>, Fail> {
    let mut seen = HashSet::new();
    if let Some(dup) = sel.seq.iter().find(|s| !seen.insert(**s)) {
        return Err(bad(format!("--seq {dup} is given more than once")));
    }
    let present = store.outbox().dead_letters().list(0, usize::MAX)?;
    if sel.all {
        return Ok(present.iter().map(|d| d.entry.seq).collect());
    }
    if let Some(missing) = sel
        .seq
        .iter()
        .find(|s| !present.iter().any(|d| d.entry.seq == **s))
    {
        return Err(bad(format!("no dead letter with seq {missing}")));
    }
    Ok(present
        .iter()
        .filter(|d| sel.seq.is_empty() || sel.seq.contains(&d.entry.seq))
        .filter(|d| {
            sel.event_type
                .as_ref()
                .is_none_or(|t| &d.entry.event_type == t)
        })
        .filter(|d| sel.key.as_ref().is_none_or(|k| &d.entry.key == k))
        .map(|d| d.entry.seq)
        .collect())
}
