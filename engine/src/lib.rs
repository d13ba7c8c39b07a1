//! The engine: job definitions, their checks and compilation, the job
//! aggregate, the controller's decisions and the runner that carries them out.

pub mod accountant;
pub mod api;
pub mod compile;
pub mod controller;
pub mod definition;
pub mod expand;
pub mod follow;
pub mod fork;
pub mod job;
pub mod ledger;
pub mod links;
pub mod liveness;
pub mod load;
pub mod metrics;
pub mod mlflow;
pub mod oort;
pub mod otlp;
pub mod persist;
pub mod plan;
pub mod rederive;
pub mod runner;
pub mod shapley;
pub mod supervisor;
#[cfg(test)]
pub mod testing;
pub mod tree;
pub mod ui;
pub mod validate;
pub mod workflow;

pub use definition::JobDefinition;
pub use runner::Runner;
