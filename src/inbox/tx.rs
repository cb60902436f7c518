//! [`InboxTx`]: the write transaction a handler gets, with the message it
//! applies.

use std::ops::{Deref, DerefMut};

use super::message::{Message, parse_traceparent};
use crate::error::Result;
use crate::outbox::event::Event;
use crate::store::WriteTx;

/// A write transaction applying one message: every [`WriteTx`] method
/// (through `Deref`), and an [`emit`](InboxTx::emit) that links the event
/// to the message.
///
/// The handler may run more than once for one message (a conflict re-runs
/// it; a crash before the commit runs it again after the restart): only
/// its writes and emits through this transaction happen exactly once, so
/// it should have no other side effects.
pub struct InboxTx<'t, 's> {
    tx: &'t mut WriteTx<'s>,
    message: &'t Message,
}

impl<'t, 's> InboxTx<'t, 's> {
    pub(crate) fn new(tx: &'t mut WriteTx<'s>, message: &'t Message) -> Self {
        InboxTx { tx, message }
    }

    /// The message being applied.
    pub fn message(&self) -> &Message {
        self.message
    }

    /// Appends `event` to the outbox, with the message's ids in its
    /// headers (kept if the event sets them itself):
    ///
    /// - `causationid`: [`Message::causation_id`];
    /// - `correlationid`: [`Message::correlation_id`];
    /// - `traceparent`: the message's trace id and flags with a new span
    ///   id, when the message carries a valid `traceparent` (and its
    ///   `tracestate`, when it has one).
    ///
    /// These names are CloudEvents extension names: the sinks send them as
    /// extensions.
    pub fn emit(&mut self, event: Event) -> Result<()> {
        let event = follow(self.message, event);
        self.tx.emit(event)
    }
}

impl std::fmt::Debug for InboxTx<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxTx")
            .field("stream", &self.message.stream)
            .field("partition", &self.message.partition)
            .field("position", &self.message.position)
            .finish_non_exhaustive()
    }
}

impl<'s> Deref for InboxTx<'_, 's> {
    type Target = WriteTx<'s>;
    fn deref(&self) -> &WriteTx<'s> {
        self.tx
    }
}

impl<'s> DerefMut for InboxTx<'_, 's> {
    fn deref_mut(&mut self) -> &mut WriteTx<'s> {
        self.tx
    }
}

/// `event` with the causation, correlation and trace headers of `message`.
///
/// Values come from upstream: one that is not short printable ASCII (at
/// most 512 bytes) is not copied, and none is added past the event's header
/// limit, so that a malformed upstream header never makes the emit fail.
pub(crate) fn follow(message: &Message, mut event: Event) -> Event {
    let has = |e: &Event, name: &str| e.headers().iter().any(|(n, _)| n == name);
    let room = |e: &Event| e.headers().len() < crate::outbox::event::MAX_HEADERS;
    let fine =
        |v: &str| !v.is_empty() && v.len() <= 512 && v.bytes().all(|b| (0x20..0x7f).contains(&b));
    let causation = Some(message.causation_id()).filter(|c| fine(c));
    // A malformed upstream correlation id starts a new conversation here.
    let correlation = Some(message.correlation_id())
        .filter(|c| fine(c))
        .or_else(|| causation.clone());
    if let Some(c) = causation
        && !has(&event, "causationid")
        && room(&event)
    {
        event = event.with_header("causationid", c);
    }
    if let Some(c) = correlation
        && !has(&event, "correlationid")
        && room(&event)
    {
        event = event.with_header("correlationid", c);
    }
    if !has(&event, "traceparent")
        && event.headers().len() + 2 <= crate::outbox::event::MAX_HEADERS
        && let Some((trace, flags)) = message.traceparent().and_then(parse_traceparent)
    {
        let mut span = [0u8; 8];
        if getrandom::fill(&mut span).is_ok() && span != [0; 8] {
            let span: String = span.iter().map(|b| format!("{b:02x}")).collect();
            event = event.with_header("traceparent", format!("00-{trace}-{span}-{flags}"));
            let state = message
                .event
                .as_ref()
                .and_then(|e| e.extensions.get("tracestate").cloned())
                .or_else(|| {
                    message
                        .header("tracestate")
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(str::to_string)
                });
            if let Some(state) = state.filter(|s| fine(s))
                && !has(&event, "tracestate")
            {
                event = event.with_header("tracestate", state);
            }
        }
    }
    event
}
