//! The event vocabulary of Flame for Rust and the plumbing that carries it:
//! envelopes, the `EventStore` contract with its SQLite and MongoDB backends,
//! the outbox relay to NATS JetStream, the worker protocol and its transports.

pub mod algorithm;
pub mod envelope;
pub mod job;
pub mod mongo;
pub mod protocol;
pub mod relay;
pub mod sqlite;
pub mod store;
pub mod subscription;
pub mod transport;
pub mod upcast;

pub use envelope::{Actor, Cause, Envelope, NewEvent};

/// For `skip_serializing_if`: leave a zero count out of the JSON.
pub fn is_zero(n: &u32) -> bool {
    *n == 0
}
pub use store::{AppendResult, EventStore, ExpectedVersion};

/// Opens an event store from a URL: `sqlite:PATH` or `mongodb://...`.
pub async fn open_store(url: &str) -> Result<std::sync::Arc<dyn EventStore>, store::Error> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(std::sync::Arc::new(sqlite::SqliteStore::open(path)?))
    } else if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        Ok(std::sync::Arc::new(mongo::MongoStore::connect(url, mongo::DEFAULT_DB).await?))
    } else {
        Err(store::Error::Config(format!("unknown event store URL '{url}': use sqlite:PATH or mongodb://HOST:PORT/...")))
    }
}

/// Resolves on Ctrl-C or SIGTERM: the graceful-shutdown trigger of every binary.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
