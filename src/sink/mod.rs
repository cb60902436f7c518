//! Sinks: where the relay ships events.
//!
//! - [`FileSink`]: CloudEvents JSON Lines in a file, fsynced per batch (the
//!   embedded default: no broker needed).
//! - [`StdoutSink`]: the same lines on standard output.
//! - [`nats::NatsSink`] (feature `nats`): NATS JetStream, deduplicated by `Nats-Msg-Id`.

pub mod cloudevents;
mod file;
#[cfg(feature = "nats")]
pub mod nats;

pub use file::{FileSink, StdoutSink};
