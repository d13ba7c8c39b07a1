//! Read models folded from the event log. Each fold is a pure function of the
//! events, so a read model can be rebuilt from scratch at any time; the
//! runner stores them with their checkpoint in one transaction.

pub mod render;
pub mod runner;
pub mod store;
pub mod trace;
pub mod verify;
pub mod view;

pub use runner::{Progress, Projector, Runner};
pub use store::{ReadModels, Stored};
pub use view::JobView;
