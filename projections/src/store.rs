//! Where read models live: next to the events, in the same SQLite file or
//! MongoDB database. Each commit writes the changed views and the
//! projection's checkpoint in one transaction, so after any crash the stored
//! views are exactly the fold of the events up to the stored checkpoint.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::{Client, Collection};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use flame_events::store::Error;

use crate::view::JobView;

/// The name of the job projection's checkpoint.
pub const CHECKPOINT: &str = "projection:jobs";

/// A stored view: the JSON text exactly as written.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The job id.
    pub job_id: String,
    /// The view as JSON text.
    pub json: String,
}

impl Stored {
    /// Decodes the view.
    pub fn view(&self) -> Result<JobView, Error> {
        serde_json::from_str(&self.json).map_err(|e| {
            Error::Backend(format!(
                "the stored view of job '{}' does not decode: {e}; rebuild with `flamectl project --rebuild`",
                self.job_id
            ))
        })
    }
}

/// Stored job views and the checkpoint they are folded up to.
#[async_trait]
pub trait ReadModels: Send + Sync {
    /// Global position of the last event folded into the stored views (0 = none).
    async fn checkpoint(&self) -> Result<u64, Error>;
    /// Every stored view.
    async fn load_all(&self) -> Result<Vec<Stored>, Error>;
    /// One job's stored view.
    async fn get(&self, job_id: &str) -> Result<Option<Stored>, Error>;
    /// Writes the views and moves the checkpoint, all or nothing.
    async fn commit(&self, views: Vec<Stored>, checkpoint: u64) -> Result<(), Error>;
    /// Drops every view and the checkpoint (a rebuild starts from the first event).
    async fn reset(&self) -> Result<(), Error>;
    /// Where the views are, for people.
    fn location(&self) -> String;
}

/// Opens the read models next to an event store URL (`sqlite:PATH` or `mongodb://...`).
pub async fn open(url: &str) -> Result<Arc<dyn ReadModels>, Error> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Arc::new(SqliteViews::open(path)?))
    } else if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        Ok(Arc::new(MongoViews::connect(url, flame_events::mongo::DEFAULT_DB).await?))
    } else {
        Err(Error::Config(format!("unknown store URL '{url}': use sqlite:PATH or mongodb://HOST:PORT/...")))
    }
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS job_views (
    job_id   TEXT PRIMARY KEY,
    view     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
";

/// Views in the SQLite file of the embedded event store.
pub struct SqliteViews {
    conn: Arc<Mutex<Connection>>,
    path: String,
}

impl SqliteViews {
    /// Opens (creating the tables if needed) the views in the SQLite file at `path`.
    pub fn open(path: &str) -> Result<Self, Error> {
        if path != ":memory:" && !Path::new(path).exists() {
            return Err(Error::Config(format!("no event store at '{path}': run a job first or give --store")));
        }
        let conn = Connection::open(path).map_err(|e| Error::Config(format!("cannot open '{path}': {e}")))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(backend)?;
        conn.execute_batch(SQLITE_SCHEMA).map_err(backend)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: path.into() })
    }

    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| Error::Backend("the SQLite connection lock is poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }
}

#[async_trait]
impl ReadModels for SqliteViews {
    async fn checkpoint(&self) -> Result<u64, Error> {
        self.with(|c| {
            let p: Option<i64> =
                c.query_row("SELECT position FROM checkpoints WHERE name = ?1", [CHECKPOINT], |r| r.get(0)).optional().map_err(backend)?;
            Ok(p.unwrap_or(0) as u64)
        })
        .await
    }

    async fn load_all(&self) -> Result<Vec<Stored>, Error> {
        self.with(|c| {
            let mut q = c.prepare("SELECT job_id, view FROM job_views ORDER BY job_id").map_err(backend)?;
            let rows = q.query_map([], |r| Ok(Stored { job_id: r.get(0)?, json: r.get(1)? })).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn get(&self, job_id: &str) -> Result<Option<Stored>, Error> {
        let id = job_id.to_string();
        self.with(move |c| {
            c.query_row("SELECT job_id, view FROM job_views WHERE job_id = ?1", [&id], |r| {
                Ok(Stored { job_id: r.get(0)?, json: r.get(1)? })
            })
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn commit(&self, views: Vec<Stored>, checkpoint: u64) -> Result<(), Error> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            {
                let mut put = tx
                    .prepare_cached(
                        "INSERT INTO job_views (job_id, view) VALUES (?1, ?2) ON CONFLICT(job_id) DO UPDATE SET view = excluded.view",
                    )
                    .map_err(backend)?;
                for v in &views {
                    put.execute(params![v.job_id, v.json]).map_err(backend)?;
                }
            }
            tx.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET position = excluded.position",
                params![CHECKPOINT, checkpoint as i64],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    async fn reset(&self) -> Result<(), Error> {
        self.with(|c| {
            let tx = c.transaction().map_err(backend)?;
            tx.execute("DELETE FROM job_views", []).map_err(backend)?;
            tx.execute("DELETE FROM checkpoints WHERE name = ?1", [CHECKPOINT]).map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    fn location(&self) -> String {
        format!("sqlite:{}", self.path)
    }
}

/// Views in the MongoDB database of the event store (collection `job_views`).
pub struct MongoViews {
    client: Client,
    views: Collection<Document>,
    checkpoints: Collection<Document>,
    location: String,
}

impl MongoViews {
    /// Connects to the database named in the URL, or `database` when it names none.
    pub async fn connect(uri: &str, database: &str) -> Result<Self, Error> {
        let client = Client::with_uri_str(uri).await.map_err(|e| Error::Config(format!("cannot use MongoDB URL '{uri}': {e}")))?;
        let db = client.default_database().unwrap_or_else(|| client.database(database));
        let location = match (uri.find("://"), uri.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}://***@{}", &uri[..s], &uri[at + 1..]),
            _ => uri.to_string(),
        };
        Ok(Self { views: db.collection("job_views"), checkpoints: db.collection("checkpoints"), client, location })
    }

    /// One transaction: either the views and the checkpoint (`Some`), or, with
    /// `None`, the removal of every view and the checkpoint.
    async fn try_write(&self, views: &[Stored], checkpoint: Option<u64>) -> Result<(), mongodb::error::Error> {
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let writes = async {
            let Some(checkpoint) = checkpoint else {
                self.views.delete_many(doc! {}).session(&mut session).await?;
                self.checkpoints.delete_one(doc! {"_id": CHECKPOINT}).session(&mut session).await?;
                return Ok(());
            };
            for v in views {
                self.views
                    .replace_one(doc! {"_id": &v.job_id}, doc! {"_id": &v.job_id, "view": &v.json})
                    .upsert(true)
                    .session(&mut session)
                    .await?;
            }
            self.checkpoints
                .update_one(doc! {"_id": CHECKPOINT}, doc! {"$set": {"position": checkpoint as i64}})
                .upsert(true)
                .session(&mut session)
                .await?;
            Ok::<(), mongodb::error::Error>(())
        };
        if let Err(e) = writes.await {
            let _ = session.abort_transaction().await;
            return Err(e);
        }
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(()),
                Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn stored(d: &Document) -> Option<Stored> {
    Some(Stored { job_id: d.get_str("_id").ok()?.to_string(), json: d.get_str("view").ok()?.to_string() })
}

#[async_trait]
impl ReadModels for MongoViews {
    async fn checkpoint(&self) -> Result<u64, Error> {
        let d = self.checkpoints.find_one(doc! {"_id": CHECKPOINT}).await.map_err(backend)?;
        Ok(match d.as_ref().and_then(|d| d.get("position")) {
            Some(Bson::Int64(p)) => *p as u64,
            Some(Bson::Int32(p)) => *p as u64,
            _ => 0,
        })
    }

    async fn load_all(&self) -> Result<Vec<Stored>, Error> {
        let docs: Vec<Document> =
            self.views.find(doc! {}).sort(doc! {"_id": 1}).await.map_err(backend)?.try_collect().await.map_err(backend)?;
        Ok(docs.iter().filter_map(stored).collect())
    }

    async fn get(&self, job_id: &str) -> Result<Option<Stored>, Error> {
        Ok(self.views.find_one(doc! {"_id": job_id}).await.map_err(backend)?.as_ref().and_then(stored))
    }

    async fn commit(&self, views: Vec<Stored>, checkpoint: u64) -> Result<(), Error> {
        self.write(&views, Some(checkpoint)).await
    }

    async fn reset(&self) -> Result<(), Error> {
        self.write(&[], None).await
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

impl MongoViews {
    /// Retries transient transaction conflicts (another writer, a failover) for up to 90 s.
    async fn write(&self, views: &[Stored], checkpoint: Option<u64>) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            match self.try_write(views, checkpoint).await {
                Ok(()) => return Ok(()),
                Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(backend(format!("cannot store the job views at {}: {e}", self.location))),
            }
        }
    }
}
