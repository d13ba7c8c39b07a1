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

use serde::{Deserialize, Serialize};

use crate::view::JobView;

/// The name of the job projection's checkpoint.
pub const CHECKPOINT: &str = "projection:jobs";

/// A stored view: its JSON text as reassembled from its parts.
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

/// One stored piece of a view. A view is stored as parts so that a commit
/// writes what changed, not the whole view: `head` (status, tasks, workers,
/// version, position), `round:NNNNNN` (one per round), and the append-only
/// lists in chunks of `CHUNK` entries, `lineage:NNNNNN` and `audit:NNNNNN`.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    /// The job id.
    pub job_id: String,
    /// Which part.
    pub key: String,
    /// Its JSON text.
    pub json: String,
}

/// Entries per stored chunk of the lineage and audit lists.
pub const CHUNK: usize = 256;

#[derive(Serialize)]
struct HeadRef<'a> {
    job_id: &'a str,
    status: &'a crate::view::JobStatus,
    tasks: &'a std::collections::BTreeMap<String, crate::view::TaskHistory>,
    workers: &'a std::collections::BTreeMap<String, crate::view::WorkerHistory>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    early: &'a [crate::view::EarlyUpdate],
    #[serde(skip_serializing_if = "Option::is_none")]
    forked_from: &'a Option<flame_events::job::ForkOrigin>,
    version: u64,
    position: u64,
}

#[derive(Deserialize)]
struct Head {
    job_id: String,
    status: crate::view::JobStatus,
    tasks: std::collections::BTreeMap<String, crate::view::TaskHistory>,
    workers: std::collections::BTreeMap<String, crate::view::WorkerHistory>,
    #[serde(default)]
    early: Vec<crate::view::EarlyUpdate>,
    #[serde(default)]
    forked_from: Option<flame_events::job::ForkOrigin>,
    version: u64,
    position: u64,
}

/// How much of a view's append-only lists is stored already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// Lineage entries stored.
    pub lineage: usize,
    /// Audit entries stored.
    pub audit: usize,
}

impl Mark {
    /// The mark of a view stored in full.
    pub fn of(view: &JobView) -> Self {
        Self { lineage: view.lineage.len(), audit: view.audit.len() }
    }
}

fn json<T: Serialize + ?Sized>(v: &T) -> Result<String, Error> {
    serde_json::to_string(v).map_err(|e| Error::Backend(e.to_string()))
}

fn chunks<T: Serialize>(job: &str, name: &str, list: &[T], stored: usize, out: &mut Vec<Part>) -> Result<(), Error> {
    // The last stored chunk may be partial: rewrite from its start.
    for c in (stored / CHUNK)..list.len().div_ceil(CHUNK) {
        let slice = &list[c * CHUNK..((c + 1) * CHUNK).min(list.len())];
        out.push(Part { job_id: job.into(), key: format!("{name}:{c:06}"), json: json(slice)? });
    }
    Ok(())
}

/// The parts of a view to write after folding: the head, the rounds touched
/// since the last call, and the lineage and audit chunks past `mark`.
pub fn changed_parts(view: &mut JobView, mark: Mark) -> Result<(Vec<Part>, Mark), Error> {
    let job = view.job_id.clone();
    let head = HeadRef {
        job_id: &view.job_id,
        status: &view.status,
        tasks: &view.tasks,
        workers: &view.workers,
        early: &view.early,
        forked_from: &view.forked_from,
        version: view.version,
        position: view.position,
    };
    let mut out = vec![Part { job_id: job.clone(), key: "head".into(), json: json(&head)? }];
    for i in view.take_touched() {
        if let Some(r) = view.rounds.get(i) {
            out.push(Part { job_id: job.clone(), key: format!("round:{i:06}"), json: json(r)? });
        }
    }
    chunks(&job, "lineage", &view.lineage, mark.lineage, &mut out)?;
    chunks(&job, "audit", &view.audit, mark.audit, &mut out)?;
    Ok((out, Mark::of(view)))
}

/// Every part of a view, as a full store writes it.
pub fn all_parts(view: &JobView) -> Result<Vec<Part>, Error> {
    let mut v = view.clone();
    v.touched.0 = (0..v.rounds.len()).collect();
    Ok(changed_parts(&mut v, Mark::default())?.0)
}

/// Puts a view together from its parts (in key order).
pub fn assemble(job_id: &str, parts: &[Part]) -> Result<JobView, Error> {
    let bad = |key: &str, e: serde_json::Error| {
        Error::Backend(format!("the stored part '{key}' of job '{job_id}' does not decode: {e}; rebuild with `flamectl project --rebuild`"))
    };
    let head =
        parts.iter().find(|p| p.key == "head").ok_or_else(|| Error::Backend(format!("the stored view of job '{job_id}' has no head")))?;
    let head: Head = serde_json::from_str(&head.json).map_err(|e| bad("head", e))?;
    let mut view = JobView {
        job_id: head.job_id,
        status: head.status,
        tasks: head.tasks,
        workers: head.workers,
        early: head.early,
        forked_from: head.forked_from,
        version: head.version,
        position: head.position,
        ..JobView::default()
    };
    for p in parts {
        match p.key.split_once(':') {
            Some(("round", _)) => view.rounds.push(serde_json::from_str(&p.json).map_err(|e| bad(&p.key, e))?),
            Some(("lineage", _)) => view.lineage.extend(serde_json::from_str::<Vec<_>>(&p.json).map_err(|e| bad(&p.key, e))?),
            Some(("audit", _)) => view.audit.extend(serde_json::from_str::<Vec<_>>(&p.json).map_err(|e| bad(&p.key, e))?),
            _ => {}
        }
    }
    Ok(view)
}

fn group(parts: Vec<Part>) -> Result<Vec<Stored>, Error> {
    let mut out = Vec::new();
    let mut rest = parts.as_slice();
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|p| p.job_id == first.job_id).count();
        let view = assemble(&first.job_id, &rest[..n])?;
        out.push(Stored { job_id: first.job_id.clone(), json: json(&view)? });
        rest = &rest[n..];
    }
    Ok(out)
}

/// Stored job views and the checkpoint they are folded up to.
#[async_trait]
pub trait ReadModels: Send + Sync {
    /// Global position of the last event folded into the stored views (0 = none).
    async fn checkpoint(&self) -> Result<u64, Error>;
    /// The stored parts of one job, or of every job, ordered by job and key.
    async fn parts(&self, job_id: Option<&str>) -> Result<Vec<Part>, Error>;
    /// Writes the parts and moves the checkpoint, all or nothing.
    async fn commit(&self, parts: Vec<Part>, checkpoint: u64) -> Result<(), Error>;
    /// Drops every view and the checkpoint (a rebuild starts from the first event).
    async fn reset(&self) -> Result<(), Error>;
    /// Where the views are, for people.
    fn location(&self) -> String;

    /// Every stored view.
    async fn load_all(&self) -> Result<Vec<Stored>, Error> {
        group(self.parts(None).await?)
    }

    /// One job's stored view.
    async fn get(&self, job_id: &str) -> Result<Option<Stored>, Error> {
        Ok(group(self.parts(Some(job_id)).await?)?.pop())
    }
}

/// Opens the read models next to an event store URL (`sqlite:PATH` or `mongodb://...`).
pub async fn open(url: &str) -> Result<Arc<dyn ReadModels>, Error> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        Ok(Arc::new(SqliteViews::open(path)?))
    } else if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        Ok(Arc::new(MongoViews::connect(url, flame_stores::mongo::DEFAULT_DB).await?))
    } else {
        Err(Error::Config(format!("unknown store URL '{url}': use sqlite:PATH or mongodb://HOST:PORT/...")))
    }
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS job_view_parts (
    job_id   TEXT NOT NULL,
    part     TEXT NOT NULL,
    json     TEXT NOT NULL,
    PRIMARY KEY (job_id, part)
) WITHOUT ROWID;
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
        // As the event store: durable at each WAL checkpoint, atomic always.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(backend)?;
        conn.execute_batch(SQLITE_SCHEMA).map_err(backend)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: path.into() })
    }

    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
        flame_stores::sqlite::blocking(&self.conn, f).await
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

    async fn parts(&self, job_id: Option<&str>) -> Result<Vec<Part>, Error> {
        let id = job_id.map(str::to_string);
        self.with(move |c| {
            let row = |r: &rusqlite::Row<'_>| Ok(Part { job_id: r.get(0)?, key: r.get(1)?, json: r.get(2)? });
            let rows = match &id {
                Some(id) => c
                    .prepare_cached("SELECT job_id, part, json FROM job_view_parts WHERE job_id = ?1 ORDER BY part")
                    .map_err(backend)?
                    .query_map([id], row)
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>(),
                None => c
                    .prepare_cached("SELECT job_id, part, json FROM job_view_parts ORDER BY job_id, part")
                    .map_err(backend)?
                    .query_map([], row)
                    .map_err(backend)?
                    .collect::<Result<Vec<_>, _>>(),
            };
            rows.map_err(backend)
        })
        .await
    }

    async fn commit(&self, parts: Vec<Part>, checkpoint: u64) -> Result<(), Error> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
            {
                let mut put = tx
                    .prepare_cached(
                        "INSERT INTO job_view_parts (job_id, part, json) VALUES (?1, ?2, ?3) ON CONFLICT(job_id, part) DO UPDATE SET json = excluded.json",
                    )
                    .map_err(backend)?;
                for p in &parts {
                    put.execute(params![p.job_id, p.key, p.json]).map_err(backend)?;
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
            tx.execute("DELETE FROM job_view_parts", []).map_err(backend)?;
            tx.execute("DELETE FROM checkpoints WHERE name = ?1", [CHECKPOINT]).map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }

    fn location(&self) -> String {
        format!("sqlite:{}", self.path)
    }
}

/// Views in the MongoDB database of the event store (collection `job_view_parts`).
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
        let views: Collection<Document> = db.collection("job_view_parts");
        let index = mongodb::IndexModel::builder().keys(doc! {"job": 1, "part": 1}).build();
        views.create_index(index).await.map_err(|e| Error::Backend(format!("cannot create the job view index at {location}: {e}")))?;
        Ok(Self { views, checkpoints: db.collection("checkpoints"), client, location })
    }

    /// One transaction: either the views and the checkpoint (`Some`), or, with
    /// `None`, the removal of every view and the checkpoint.
    async fn try_write(&self, parts: &[Part], checkpoint: Option<u64>) -> Result<(), mongodb::error::Error> {
        let mut session = self.client.start_session().await?;
        session.start_transaction().await?;
        let writes = async {
            let Some(checkpoint) = checkpoint else {
                self.views.delete_many(doc! {}).session(&mut session).await?;
                self.checkpoints.delete_one(doc! {"_id": CHECKPOINT}).session(&mut session).await?;
                return Ok(());
            };
            for p in parts {
                let id = format!("{}|{}", p.job_id, p.key);
                self.views
                    .replace_one(doc! {"_id": &id}, doc! {"_id": &id, "job": &p.job_id, "part": &p.key, "json": &p.json})
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

fn part(d: &Document) -> Option<Part> {
    Some(Part {
        job_id: d.get_str("job").ok()?.to_string(),
        key: d.get_str("part").ok()?.to_string(),
        json: d.get_str("json").ok()?.to_string(),
    })
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

    async fn parts(&self, job_id: Option<&str>) -> Result<Vec<Part>, Error> {
        let filter = match job_id {
            Some(id) => doc! {"job": id},
            None => doc! {},
        };
        let docs: Vec<Document> =
            self.views.find(filter).sort(doc! {"job": 1, "part": 1}).await.map_err(backend)?.try_collect().await.map_err(backend)?;
        Ok(docs.iter().filter_map(part).collect())
    }

    async fn commit(&self, parts: Vec<Part>, checkpoint: u64) -> Result<(), Error> {
        self.write(&parts, Some(checkpoint)).await
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
    async fn write(&self, parts: &[Part], checkpoint: Option<u64>) -> Result<(), Error> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            match self.try_write(parts, checkpoint).await {
                Ok(()) => return Ok(()),
                Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(backend(format!("cannot store the job views at {}: {e}", self.location))),
            }
        }
    }
}
