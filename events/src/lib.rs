//! The event vocabulary of Flame for Rust: envelopes and who caused them,
//! job events and states, the algorithms a job can name, the worker protocol,
//! design and dataset events, upcasting, and the `EventStore` contract. It
//! links no database or network driver: the store backends live in
//! `flame-stores`, NATS in `flame-transport`.

pub mod algorithm;
pub mod envelope;
pub mod job;
pub mod model;
pub mod protocol;
pub mod resource;
pub mod rng;
pub mod store;
pub mod subscription;
pub mod upcast;

pub use envelope::{Actor, Cause, Envelope, NewEvent};
pub use store::{AppendResult, EventStore, ExpectedVersion};

/// For `skip_serializing_if`: leave a zero count out of the JSON.
pub fn is_zero(n: &u32) -> bool {
    *n == 0
}
