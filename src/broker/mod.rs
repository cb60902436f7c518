//! Connection settings per broker, shared by the [`sink`](crate::sink)
//! that publishes to a broker and the [`inbox`](crate::inbox) reader that
//! consumes from it: one place for addresses, credentials and TLS.

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
