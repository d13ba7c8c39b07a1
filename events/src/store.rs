//! The `EventStore` contract that every backend implements identically.

use async_trait::async_trait;

use crate::{Envelope, NewEvent};

/// What the writer believes the stream's current version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` (0 = no stream) satisfies this.
    pub fn admits(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::Exact(v) => actual == v,
        }
    }
}

/// Where an append landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    /// Stream version of the first appended event.
    pub first_version: u64,
    /// Stream version of the last appended event.
    pub last_version: u64,
    /// Global position of the last appended event.
    pub last_position: u64,
}

/// Errors of any event store backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream moved on since the writer read it.
    #[error("conflict appending to stream '{stream}': expected {expected:?}, but its version is {actual}; reload the stream and retry")]
    Conflict {
        /// The stream.
        stream: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's actual last version.
        actual: u64,
    },
    /// A stored event could not be decoded.
    #[error("event {stream} v{version} (type '{event_type}') cannot be decoded: {reason}")]
    Decode {
        /// The stream.
        stream: String,
        /// The event's version in its stream.
        version: u64,
        /// The stored event type.
        event_type: String,
        /// What was wrong.
        reason: String,
    },
    /// The store is misconfigured (URL, path).
    #[error("{0}")]
    Config(String),
    /// The backend failed (I/O, database, network).
    #[error("event store backend error: {0}")]
    Backend(String),
    /// An append was given no events.
    #[error("an append needs at least one event")]
    Empty,
}

/// The event log: append-only streams and a global order over them.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Appends events atomically. Fails with `Error::Conflict` when `expected` is
    /// stale. If the first event's id is already stored, nothing is written and the
    /// stored result is returned (idempotent retries).
    async fn append(&self, stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> Result<AppendResult, Error>;

    /// Reads a stream from `from_version` (1 = the start); empty if it does not exist.
    async fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, Error>;

    /// Reads the global log from `from_position` (1 = the start), at most `limit` events.
    /// Positions strictly increase but may skip numbers; an event is never
    /// returned before every event at a lower position that will ever commit.
    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<Envelope>, Error>;

    /// Loads a named checkpoint (a global position; 0 when never saved).
    async fn load_checkpoint(&self, name: &str) -> Result<u64, Error>;

    /// Saves a named checkpoint.
    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error>;

    /// A URL-like description of where the events are, for people.
    fn location(&self) -> String;

    /// Waits until something may have been appended, at most `timeout`.
    /// The default just sleeps; stores that can signal appends wake sooner.
    async fn wait_for_append(&self, timeout: std::time::Duration) {
        tokio::time::sleep(timeout).await;
    }
}

/// Ids of the streams named `<prefix><id>`, in the order they were created (a scan of the global log).
pub async fn stream_ids(store: &dyn EventStore, prefix: &str) -> Result<Vec<String>, Error> {
    let mut ids = Vec::new();
    let mut from = 1;
    loop {
        let batch = store.read_all(from, 5000).await?;
        let Some(last) = batch.last() else { break };
        from = last.position + 1;
        ids.extend(batch.iter().filter(|e| e.version == 1).filter_map(|e| e.stream_id.strip_prefix(prefix).map(str::to_string)));
    }
    Ok(ids)
}
