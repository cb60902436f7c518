//! Publishing a batch: the window of acks in flight, per-key order, what a
//! failure says about the entry.

use std::collections::VecDeque;
use std::sync::Arc;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use tokio::sync::OwnedSemaphorePermit;

use super::order::Ticket;
use super::{NatsSink, cloudevents, valid_subject};
use crate::OutboxEntry;
use crate::relay::{BoxFuture, Outcome, Sink};

/// What a failed publish says about the entry.
fn classify(kind: PublishErrorKind, error: String, code: Option<u64>) -> Outcome {
    const MESSAGE_EXCEEDS_MAXIMUM: u64 = 10054;
    match kind {
        PublishErrorKind::MaxPayloadExceeded => Outcome::Rejected {
            error,
            permanent: true,
        },
        PublishErrorKind::Other if code == Some(MESSAGE_EXCEEDS_MAXIMUM) => Outcome::Rejected {
            error,
            permanent: true,
        },
        // Timeouts, broken connections, no stream for the subject, a full
        // stream (discard new), insufficient resources, any other JetStream
        // error: nothing wrong with the entry; retry until it works.
        _ => Outcome::Retry { error },
    }
}

/// The JetStream API error code behind a publish error, if there is one.
fn api_code(e: &async_nats::jetstream::context::PublishError) -> Option<u64> {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .map(|e| e.error_code().0)
}

/// How many publishes the relay may have in flight at once: the window and
/// the per-key line bound what reaches the broker, the relay's in-flight
/// limits what is read.
const CONCURRENT_PUBLISHES: usize = 64;

/// Acks awaited in send order, one at a time (a task woken for every ack
/// that arrives costs more than the publish). Each one's time limit runs
/// from when it was sent, not from when it is awaited, so the acks a lost
/// connection took time out together, not one after the other.
type Acks<'a> = VecDeque<(usize, BoxFuture<'a, Outcome>)>;

/// One publish call's bookkeeping.
struct Publishing<'a> {
    outcomes: Vec<Option<Outcome>>,
    tickets: Vec<Option<Ticket<'a>>>,
    acks: Acks<'a>,
}

impl Publishing<'_> {
    /// Records the outcome of entry `j`, which resolves its place in its
    /// key's line.
    fn record(&mut self, j: usize, outcome: Outcome) {
        if let Some(ticket) = self.tickets.get_mut(j).and_then(Option::take) {
            ticket.resolve(matches!(outcome, Outcome::Acked { .. }));
        }
        if let Some(slot) = self.outcomes.get_mut(j) {
            *slot = Some(outcome);
        }
    }

    /// Records `outcome` for entry `i`, which was not sent.
    fn not_sent(&mut self, i: usize, outcome: Outcome) {
        self.record(i, outcome);
    }

    /// Records the next ack in send order, if one is awaited. Cancel-safe:
    /// the ack stays first in line until it resolves.
    async fn next_ack(&mut self) {
        let Some((j, ack)) = self.acks.front_mut() else {
            return;
        };
        let j = *j;
        let outcome = ack.await;
        self.acks.pop_front();
        self.record(j, outcome);
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        "nats"
    }

    /// Several batches may be in flight at once: the order of a key holds
    /// across them (see the module documentation).
    fn max_concurrent_publishes(&self) -> usize {
        CONCURRENT_PUBLISHES
    }

    fn publish<'a>(&'a self, batch: &'a [OutboxEntry]) -> BoxFuture<'a, Vec<Outcome>> {
        // Places in the keys' lines are taken now, in call order.
        let (call, tickets) = self.order.enter(batch);
        Box::pin(async move {
            let _call = call;
            let mut p = Publishing {
                outcomes: vec![None; batch.len()],
                tickets,
                acks: VecDeque::new(),
            };
            for (i, entry) in batch.iter().enumerate() {
                // Refused before sending (judged first, so that a run of
                // such entries settles in one round): the key's later
                // entries wait too (the refusal may be held back by the
                // storm guard).
                let subject = self.opts.render(&entry.event_type, &entry.key);
                let refusal = cloudevents::unsafe_for_headers(entry)
                    .map(|why| format!("not published: {why}"))
                    .or_else(|| {
                        (!valid_subject(&subject))
                            .then(|| format!("invalid NATS subject {subject:?}"))
                    });
                if let Some(error) = refusal {
                    p.not_sent(
                        i,
                        Outcome::Rejected {
                            error,
                            permanent: true,
                        },
                    );
                    continue;
                }
                // One publish per key in flight: wait until this key's
                // previous entry is acknowledged, recording this call's
                // acks meanwhile.
                if !self.previous_acked(&mut p, i).await {
                    p.not_sent(
                        i,
                        Outcome::Held {
                            reason: "held back: an earlier entry of the same key is not \
                                     delivered yet"
                                .into(),
                        },
                    );
                    continue;
                }
                let permit = match self.window_permit(&mut p).await {
                    Some(permit) => permit,
                    None => {
                        p.not_sent(
                            i,
                            Outcome::Retry {
                                error: "the publish window was closed".into(),
                            },
                        );
                        continue;
                    }
                };
                let id = entry.id.to_string();
                let (headers, payload) = self.message(entry, &id);
                match self
                    .js
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    Ok(ack) => {
                        // No deadline of its own for a timeout too large to
                        // add (async-nats' own applies).
                        let deadline =
                            tokio::time::Instant::now().checked_add(self.opts.ack_timeout);
                        p.acks.push_back((
                            i,
                            Box::pin(async move {
                                let outcome = match deadline {
                                    Some(deadline) => {
                                        match tokio::time::timeout_at(deadline, await_ack(ack))
                                            .await
                                        {
                                            Ok(outcome) => outcome,
                                            Err(_) => Outcome::Retry {
                                                error: "timed out waiting for the JetStream ack"
                                                    .into(),
                                            },
                                        }
                                    }
                                    None => await_ack(ack).await,
                                };
                                drop(permit);
                                outcome
                            }),
                        ));
                    }
                    Err(e) => {
                        let code = api_code(&e);
                        p.not_sent(i, classify(e.kind(), e.to_string(), code));
                    }
                }
            }
            // Every ack future is awaited: a dropped one would hide its error.
            while !p.acks.is_empty() {
                p.next_ack().await;
            }
            p.outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or(Outcome::Retry {
                        error: "no outcome recorded".into(),
                    })
                })
                .collect()
        })
    }
}

impl NatsSink {
    /// Waits until the entry before `i` of its key (in this call or an
    /// earlier one) is settled, recording this call's acks meanwhile (the
    /// entry waited for may be among them); whether it was acknowledged.
    async fn previous_acked<'a>(&self, p: &mut Publishing<'a>, i: usize) -> bool {
        let Some(prev) = p.tickets[i].as_ref().and_then(Ticket::prev_turn) else {
            return true;
        };
        loop {
            if let Some(ok) = prev.done() {
                return ok;
            }
            if p.acks.is_empty() {
                return prev.settled().await;
            }
            tokio::select! {
                biased;
                ok = prev.settled() => return ok,
                _ = p.next_ack() => {}
            }
        }
    }

    /// A place in the publish window (shared by every call in flight),
    /// recording this call's acks while waiting for one. `None` if the
    /// window was closed (it never is).
    async fn window_permit(&self, p: &mut Publishing<'_>) -> Option<OwnedSemaphorePermit> {
        let acquire = Arc::clone(&self.window).acquire_owned();
        tokio::pin!(acquire);
        loop {
            if p.acks.is_empty() {
                return acquire.await.ok();
            }
            tokio::select! {
                biased;
                permit = &mut acquire => return permit.ok(),
                _ = p.next_ack() => {}
            }
        }
    }
}

async fn await_ack(ack: PublishAckFuture) -> Outcome {
    match ack.await {
        Ok(a) => Outcome::Acked {
            position: Some(format!("{}:{}", a.stream, a.sequence)),
            duplicate: a.duplicate,
        },
        Err(e) => {
            let code = api_code(&e);
            classify(e.kind(), e.to_string(), code)
        }
    }
}
