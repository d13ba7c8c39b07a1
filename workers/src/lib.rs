//! Workers: the runtime that takes commands and reports results, the FL
//! algorithms, model weights and blobs, the tch training backend and datasets.

pub mod aggregate;
pub mod archive;
pub mod claim;
/// Model blobs (in `flame-transport`, where the engine reaches them too).
pub use flame_transport::blob;
pub mod control;
pub mod coordinate;
pub mod data;
pub mod fedavg;
pub mod fedbuff;
#[cfg(feature = "tch")]
pub(crate) mod fit;
pub mod fleet;
pub mod images;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod numpy;
pub mod optimizers;
pub mod partition;
pub mod privacy;
pub mod robust;
pub mod roots;
pub mod runtime;
#[cfg(feature = "tch")]
pub mod script;
pub mod sources;
pub mod spill;
pub mod split;
pub mod synthetic;
pub mod tables;
pub mod training;
pub mod weights;

pub use runtime::Worker;
