//! Read models folded from the event log. Each fold is a pure function of the
//! events, so a read model can be rebuilt from scratch at any time; the
//! view writer stores them with their checkpoint in one transaction.

pub mod render;
pub mod store;
pub mod trace;
pub mod verify;
pub mod view;
pub mod writer;

pub use store::{ReadModels, Stored};
pub use view::JobView;
pub use writer::{Progress, Projector, ViewWriter};
