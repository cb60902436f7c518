//! The outbox's record formats, at the bottom of the crate: they call
//! nothing above them and build without RocksDB (the fuzz crate decodes
//! them without the engine).
//!
//! - [`entry`]: an outbox entry ([`OutboxEntry`](crate::OutboxEntry)), its
//!   id ([`EventId`](crate::EventId), [`StoreId`](crate::StoreId)) and its
//!   on-disk encoding;
//! - [`event`]: [`Event`](crate::Event), what a transaction emits, and the
//!   rules its headers follow;
//! - [`dead`]: a dead letter ([`DeadLetter`](crate::DeadLetter));
//! - [`cursor`]: the sidecar relay's cursor file
//!   ([`RelayCursor`](crate::RelayCursor)).
//!
//! The [`Outbox`](crate::Outbox) handle is a view of the store (in
//! `crate::store`) over entries in these formats.

pub(crate) mod cursor;
pub(crate) mod dead;
pub(crate) mod entry;
pub(crate) mod event;
