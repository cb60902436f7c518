//! `outbox-relay inbox`: a consumer's inbox dead letters (list, queue for
//! replay, purge) and positions. Each opens the store for writing, so the
//! service must be stopped; the service's reader applies queued replays
//! with its handler when it starts.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use outboxkv::Store;
use outboxkv::inbox::{Inbox, InboxDeadLetter};
use outboxkv::sink::cloudevents;
use serde_json::json;

use crate::{Fail, bad};

#[derive(Subcommand)]
pub(crate) enum InboxCommand {
    /// List the consumer's positions, dead letters and queued replays.
    List(Which),
    /// Queue dead letters for replay: the service's reader applies them
    /// with its handler when it next starts.
    Replay(Select),
    /// Delete dead letters.
    Purge(Select),
}

#[derive(Args)]
pub(crate) struct Which {
    #[arg(long, env = "OUTBOXKV_DB")]
    db: PathBuf,
    /// The consumer (inbox) name.
    #[arg(long)]
    consumer: String,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct Select {
    #[arg(long, env = "OUTBOXKV_DB")]
    db: PathBuf,
    /// The consumer (inbox) name.
    #[arg(long)]
    consumer: String,
    /// Dead letters to act on, as STREAM/PARTITION/POSITION (repeat the
    /// flag, or comma-separate).
    #[arg(long, value_delimiter = ',', required_unless_present = "all")]
    at: Vec<String>,
    /// Every dead letter of the consumer.
    #[arg(long, conflicts_with = "at")]
    all: bool,
}

fn open(db: &Path, consumer: &str) -> Result<(Store, Inbox), Fail> {
    let store = match Store::options()
        .create_if_missing(false)
        .relay_cursor_poll(None)
        .open(db)
    {
        Err(outboxkv::Error::Locked { .. }) => {
            return Err(Fail(
                format!(
                    "the store {} is open in another process (the service?); inbox commands need it closed",
                    db.display()
                ),
                1,
            ));
        }
        other => other?,
    };
    let inbox = Inbox::new(&store, consumer)?;
    Ok((store, inbox))
}

fn dead_json(kind: &str, d: &InboxDeadLetter) -> serde_json::Value {
    let event = d.message().event;
    json!({
        "kind": kind,
        "at": format!("{}/{}/{}", d.stream, d.partition, d.position),
        "subject": d.subject,
        "id": event.as_ref().map(|e| e.id.clone()),
        "type": event.as_ref().map(|e| e.event_type.clone()),
        "attempts": d.attempts,
        "error": d.error,
        "dead_at": cloudevents::rfc3339_micros(d.at_micros),
        "body": String::from_utf8_lossy(&d.body),
    })
}

pub(crate) fn list(w: &Which) -> Result<(), Fail> {
    let (_store, inbox) = open(&w.db, &w.consumer)?;
    for (stream, partition, p) in inbox.positions()? {
        if w.json {
            println!(
                "{}",
                json!({"kind": "position", "at": format!("{stream}/{partition}"), "next": p.next, "done_above": p.done})
            );
        } else {
            println!(
                "position {stream}/{partition}: next {}, {} done above",
                p.next,
                p.done.len()
            );
        }
    }
    let dead = inbox.dead_letters()?;
    let queued = inbox.queued_replays()?;
    for (kind, list) in [("dead", &dead), ("queued", &queued)] {
        for d in list {
            if w.json {
                println!("{}", dead_json(kind, d));
            } else {
                println!(
                    "{kind} {}/{}/{}  subject {}  attempts {}  error: {:?}",
                    d.stream, d.partition, d.position, d.subject, d.attempts, d.error
                );
            }
        }
    }
    if !w.json {
        println!(
            "({} dead letters, {} queued for replay)",
            dead.len(),
            queued.len()
        );
    }
    Ok(())
}

/// The dead letters `sel` names, as (stream, partition, position).
fn selected(inbox: &Inbox, sel: &Select) -> Result<Vec<(String, u32, u64)>, Fail> {
    let present: Vec<(String, u32, u64)> = inbox
        .dead_letters()?
        .into_iter()
        .map(|d| (d.stream, d.partition, d.position))
        .collect();
    if sel.all {
        return Ok(present);
    }
    let mut out = Vec::new();
    for at in &sel.at {
        let mut parts = at.rsplitn(3, '/');
        let (Some(position), Some(partition), Some(stream)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(format!(
                "--at {at:?}: expected STREAM/PARTITION/POSITION"
            )));
        };
        let (Ok(partition), Ok(position)) = (partition.parse::<u32>(), position.parse::<u64>())
        else {
            return Err(bad(format!(
                "--at {at:?}: partition and position must be numbers"
            )));
        };
        let key = (stream.to_string(), partition, position);
        if !present.contains(&key) {
            return Err(bad(format!("no dead letter at {at}")));
        }
        if out.contains(&key) {
            return Err(bad(format!("--at {at} is given more than once")));
        }
        out.push(key);
    }
    Ok(out)
}

pub(crate) fn replay(sel: &Select) -> Result<(), Fail> {
    let (_store, inbox) = open(&sel.db, &sel.consumer)?;
    let chosen = selected(&inbox, sel)?;
    for (s, p, n) in &chosen {
        inbox.queue_replay(s, *p, *n)?;
    }
    println!(
        "queued {} dead letters for replay; the service applies them when it starts",
        chosen.len()
    );
    Ok(())
}

pub(crate) fn purge(sel: &Select) -> Result<(), Fail> {
    let (_store, inbox) = open(&sel.db, &sel.consumer)?;
    let chosen = selected(&inbox, sel)?;
    for (s, p, n) in &chosen {
        inbox.purge_dead(s, *p, *n)?;
    }
    println!("purged {} dead letters", chosen.len());
    Ok(())
}
