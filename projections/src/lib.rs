//! Read models folded from the event log. Each fold is a pure function of the
//! events, so a read model can be rebuilt from scratch at any time.

pub mod rounds;
