//! Sinks: where the relay ships events.
//!
//! - [`FileSink`]: CloudEvents JSON Lines in a file, fsynced per batch (the
//!   embedded default: no broker needed).
//! - [`StdoutSink`]: the same lines on standard output.
//! - [`nats::NatsSink`] (feature `nats`): NATS JetStream, deduplicated by `Nats-Msg-Id`.
//! - [`kafka::KafkaSink`] (feature `kafka`): Apache Kafka through an
//!   idempotent producer, with a restart scan against duplicates.

pub mod cloudevents;
mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;

pub use file::{FileSink, StdoutSink};
