//! End-to-end tests: one test binary, a module per feature (ripgrep's layout).

mod auth;
mod cluster;
mod conformance;
mod dashboard;
mod distributed;
mod embedded;
mod fleet;
mod identity;
mod inspect;
mod lifecycle;
mod logs;
mod mlflow;
mod models;
mod mqtt;
mod privacy;
mod python_sdk;
mod relay;
mod soak;
mod store_contract;
mod torchscript;
mod traces;
mod transfer;
mod util;
