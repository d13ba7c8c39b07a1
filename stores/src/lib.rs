//! The event store's backends: SQLite (embedded mode, one file) and MongoDB
//! (distributed mode, a replica set). Both keep the `EventStore` contract of
//! the event vocabulary (`flame_events::store`); one contract test suite runs
//! against both (`tests/tests/store_contract.rs`). Workers never link this
//! crate: they record nothing.

pub mod mongo;
pub mod sqlite;

use std::sync::Arc;

use flame_events::store::{self, EventStore};

/// Opens an event store from a URL: `sqlite:PATH` or `mongodb://...`.
pub async fn open_store(url: &str) -> Result<Arc<dyn EventStore>, store::Error> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(path)?))
    } else if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        Ok(Arc::new(mongo::MongoStore::connect(url, mongo::DEFAULT_DB).await?))
    } else {
        Err(store::Error::Config(format!("unknown event store URL '{url}': use sqlite:PATH or mongodb://HOST:PORT/...")))
    }
}
