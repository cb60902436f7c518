//! [`InboxDeadLetter`]: a message the handler kept failing on, kept with
//! the error, in the reserved table `outboxkv.inbox.dead`.

use serde::{Deserialize, Serialize};

use super::message::Message;
use crate::Table;

/// A dead-lettered message: where it was, what it held, why it failed.
///
/// It was written in the same commit that moved the consumer past its
/// position, so the partition went on; [`Inbox::replay_dead`](super::Inbox::replay_dead)
/// applies it again (with the service's handler) and deletes it in one
/// commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InboxDeadLetter {
    /// The stream (JetStream stream, Kafka topic).
    pub stream: String,
    /// The partition.
    pub partition: u32,
    /// The position in the partition.
    pub position: u64,
    /// The subject (NATS) or topic (Kafka).
    pub subject: String,
    /// The Kafka key.
    pub key: Option<Vec<u8>>,
    /// The broker headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
    /// The last error.
    pub error: String,
    /// The attempts made.
    pub attempts: u32,
    /// When it was dead-lettered, microseconds since the Unix epoch.
    pub at_micros: u64,
    /// The message was too large to keep whole: `headers` and `body` are
    /// empty (`error` says how large they were), and it cannot be replayed
    /// from here; fetch it from the broker by its position.
    pub truncated: bool,
}

impl InboxDeadLetter {
    pub(crate) fn of(message: &Message, error: String) -> InboxDeadLetter {
        InboxDeadLetter {
            stream: message.stream.clone(),
            partition: message.partition,
            position: message.position,
            subject: message.subject.clone(),
            key: message.key.clone(),
            headers: message.headers.clone(),
            body: message.body.clone(),
            error,
            attempts: message.attempt,
            at_micros: crate::outbox::entry::now_micros(),
            truncated: false,
        }
    }

    /// Without the message's headers and body, when writing them failed
    /// (`why`): the dead letter must be written for the partition to go on.
    pub(crate) fn truncate(mut self, why: &str) -> InboxDeadLetter {
        let bytes: usize = self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        self.error = format!(
            "{}; the message ({bytes} bytes of headers and body) was not kept: {why}",
            cap(&self.error)
        );
        self.headers.clear();
        self.body.clear();
        self.key = None;
        self.truncated = true;
        self
    }

    /// The message again, as the handler saw it (CloudEvents attributes
    /// decoded again), first attempt.
    pub fn message(&self) -> Message {
        let mut m = Message::new(
            self.stream.clone(),
            self.partition,
            self.position,
            self.body.clone(),
        )
        .with_subject(self.subject.clone());
        m.key = self.key.clone();
        m.headers = self.headers.clone();
        m.decode();
        m
    }
}

/// At most 4 KiB of an error's text, cut at a char boundary.
pub(crate) fn cap(text: &str) -> &str {
    let mut end = text.len().min(4096);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Dead letters, per (consumer, stream, partition, position).
pub(crate) const DEAD: Table<(String, String, u32, u64), InboxDeadLetter> =
    Table::reserved("outboxkv.inbox.dead");

/// Dead letters queued for replay (by `outbox-relay inbox replay`, or
/// [`Inbox::queue_replay`](super::Inbox::queue_replay)), per (consumer,
/// stream, partition, position); a reader applies them when it starts.
pub(crate) const REPLAY: Table<(String, String, u32, u64), InboxDeadLetter> =
    Table::reserved("outboxkv.inbox.replay");
