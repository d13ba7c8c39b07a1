//! The MongoDB event store: one document per event, appended in a transaction
//! that also allocates the global positions, so no reader sees position N+1
//! committed before N.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, ClientSession, Collection, IndexModel};

use flame_events::store::{AppendResult, Error, EventStore, ExpectedVersion};
use flame_events::{Envelope, NewEvent};

/// The database used when the URL names none.
pub const DEFAULT_DB: &str = "flame";
const DUPLICATE_KEY: i32 = 11000;
/// How long an append retries transient transaction conflicts. Long enough to
/// outlast a transaction left open by a writer that was killed, which the
/// server aborts after its lifetime limit (MongoDB: 60 s by default).
const TRANSACTION_RETRY_WINDOW: Duration = Duration::from_secs(90);

/// An `EventStore` in a MongoDB database (a replica set, for transactions).
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    events: Collection<Document>,
    streams: Collection<Document>,
    counters: Collection<Document>,
    checkpoints: Collection<Document>,
    location: String,
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => m.write_errors.as_ref().is_some_and(|es| es.iter().any(|w| w.code == DUPLICATE_KEY)),
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

impl MongoStore {
    /// Connects and creates the collections' indexes (idempotent).
    pub async fn connect(uri: &str, database: &str) -> Result<Self, Error> {
        let client = Client::with_uri_str(uri).await.map_err(|e| Error::Config(format!("cannot use MongoDB URL '{uri}': {e}")))?;
        let db = client.default_database().unwrap_or_else(|| client.database(database));
        let store = Self {
            events: db.collection("events"),
            streams: db.collection("streams"),
            counters: db.collection("counters"),
            checkpoints: db.collection("checkpoints"),
            location: redact(uri),
            client,
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    async fn ensure_indexes(&self) -> Result<(), Error> {
        let unique = |keys: Document| IndexModel::builder().keys(keys).options(IndexOptions::builder().unique(true).build()).build();
        self.events
            .create_indexes([unique(doc! {"stream": 1, "version": 1}), unique(doc! {"position": 1})])
            .await
            .map_err(|e| Error::Backend(format!("cannot create the event indexes at {}: {e}", self.location)))?;
        Ok(())
    }

    /// One append transaction. `Ok(None)`: the stream's head did not match
    /// `expected` (a conflict, or a retry of a stored append); the transaction
    /// is aborted and nothing is written.
    async fn try_append(
        &self,
        session: &mut ClientSession,
        stream: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Option<AppendResult>, mongodb::error::Error> {
        session.start_transaction().await?;
        match self.append_in(session, stream, expected, events).await {
            Ok(Some(done)) => {
                loop {
                    match session.commit_transaction().await {
                        Ok(()) => break,
                        Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Ok(Some(done))
            }
            Ok(None) => {
                let _ = session.abort_transaction().await;
                Ok(None)
            }
            Err(e) => {
                let _ = session.abort_transaction().await;
                Err(e)
            }
        }
    }

    /// Claims the next versions on the stream's head document (one round trip,
    /// and the point where concurrent writers of one stream serialise), then
    /// the global positions on the counter, then inserts the events.
    async fn append_in(
        &self,
        session: &mut ClientSession,
        stream: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Option<AppendResult>, mongodb::error::Error> {
        let n = events.len() as u64;
        let actual = match expected {
            ExpectedVersion::Any => {
                let head = self
                    .streams
                    .find_one_and_update(doc! {"_id": stream}, doc! {"$inc": {"version": n as i64}})
                    .upsert(true)
                    .return_document(ReturnDocument::After)
                    .session(&mut *session)
                    .await?
                    .ok_or_else(|| mongodb::error::Error::custom("the stream head was not returned"))?;
                get_u64(&head, "version") - n
            }
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => {
                match self.streams.insert_one(doc! {"_id": stream, "version": n as i64}).session(&mut *session).await {
                    Ok(_) => 0,
                    Err(e) if is_duplicate_key(&e) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            ExpectedVersion::Exact(v) => {
                let claimed = self
                    .streams
                    .find_one_and_update(doc! {"_id": stream, "version": v as i64}, doc! {"$inc": {"version": n as i64}})
                    .session(&mut *session)
                    .await?;
                if claimed.is_none() {
                    return Ok(None);
                }
                v
            }
        };
        let counter = self
            .counters
            .find_one_and_update(doc! {"_id": "events"}, doc! {"$inc": {"position": n as i64}})
            .upsert(true)
            .return_document(ReturnDocument::After)
            .session(&mut *session)
            .await?
            .ok_or_else(|| mongodb::error::Error::custom("the position counter was not returned"))?;
        let last_position = get_u64(&counter, "position");
        let first_position = last_position + 1 - n;
        let now = bson::DateTime::now();
        let docs: Vec<Document> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let payload = bson::to_bson(&e.payload).unwrap_or(Bson::Null);
                doc! {
                    "_id": e.event_id.to_string(),
                    "stream": stream,
                    "version": (actual + 1 + i as u64) as i64,
                    "position": (first_position + i as u64) as i64,
                    "type": &e.event_type,
                    "schema_version": e.schema_version as i64,
                    "payload": payload,
                    "recorded_at": now,
                    "causation_id": e.causation_id.clone(),
                    "correlation_id": e.correlation_id.clone(),
                    "actor": &e.actor,
                }
            })
            .collect();
        self.events.insert_many(docs).session(&mut *session).await?;
        Ok(Some(AppendResult { first_version: actual + 1, last_version: actual + n, last_position }))
    }

    /// After a refused or duplicate append: the stored result if these events
    /// are already stored (an idempotent retry), else the conflict.
    async fn refused(&self, stream: &str, expected: ExpectedVersion, events: &[NewEvent]) -> Result<AppendResult, Error> {
        let first = self.events.find_one(doc! {"_id": events[0].event_id.to_string()}).await.map_err(backend)?;
        if let Some(first) = first {
            let last_id = events[events.len() - 1].event_id.to_string();
            let last = self.events.find_one(doc! {"_id": last_id}).await.map_err(backend)?.unwrap_or_else(|| first.clone());
            return Ok(AppendResult {
                first_version: get_u64(&first, "version"),
                last_version: get_u64(&last, "version"),
                last_position: get_u64(&last, "position"),
            });
        }
        let head = self.streams.find_one(doc! {"_id": stream}).await.map_err(backend)?;
        Err(Error::Conflict { stream: stream.to_string(), expected, actual: head.as_ref().map_or(0, |h| get_u64(h, "version")) })
    }

    async fn find(&self, filter: Document, sort: Document, limit: Option<i64>) -> Result<Vec<Envelope>, Error> {
        let mut find = self.events.find(filter).sort(sort);
        if let Some(limit) = limit {
            find = find.limit(limit);
        }
        let mut cursor = find.await.map_err(backend)?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await.map_err(backend)? {
            out.push(decode(d)?);
        }
        Ok(out)
    }
}

fn get_u64(d: &Document, key: &str) -> u64 {
    match d.get(key) {
        Some(Bson::Int64(v)) => *v as u64,
        Some(Bson::Int32(v)) => *v as u64,
        Some(Bson::Double(v)) => *v as u64,
        _ => 0,
    }
}

fn get_str(d: &Document, key: &str) -> Option<String> {
    d.get_str(key).ok().map(str::to_string)
}

fn decode(d: Document) -> Result<Envelope, Error> {
    let stream_id = get_str(&d, "stream").unwrap_or_default();
    let version = get_u64(&d, "version");
    let event_type = get_str(&d, "type").unwrap_or_default();
    let fail = |reason: String| Error::Decode { stream: stream_id.clone(), version, event_type: event_type.clone(), reason };
    let id = get_str(&d, "_id").ok_or_else(|| fail("missing _id".into()))?;
    let event_id = id.parse().map_err(|e| fail(format!("bad event id '{id}': {e}")))?;
    let payload = match d.get("payload") {
        Some(b) => b.clone().into_relaxed_extjson(),
        None => return Err(fail("missing payload".into())),
    };
    let recorded_at = d
        .get_datetime("recorded_at")
        .ok()
        .and_then(|t| DateTime::<Utc>::from_timestamp_millis(t.timestamp_millis()))
        .ok_or_else(|| fail("missing or bad recorded_at".into()))?;
    Ok(Envelope {
        event_id,
        position: get_u64(&d, "position"),
        schema_version: get_u64(&d, "schema_version") as u32,
        payload,
        recorded_at,
        causation_id: get_str(&d, "causation_id"),
        correlation_id: get_str(&d, "correlation_id"),
        actor: get_str(&d, "actor").unwrap_or_default(),
        stream_id,
        version,
        event_type,
    })
}

/// The URL without its password, for messages and `location()`.
fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &uri[..scheme], &uri[at + 1..])
        }
        _ => uri.to_string(),
    }
}

#[async_trait]
impl EventStore for MongoStore {
    async fn append(&self, stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> Result<AppendResult, Error> {
        if events.is_empty() {
            return Err(Error::Empty);
        }
        let mut session = self.client.start_session().await.map_err(backend)?;
        let deadline = std::time::Instant::now() + TRANSACTION_RETRY_WINDOW;
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            match self.try_append(&mut session, stream, expected, &events).await {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => return self.refused(stream, expected, &events).await,
                // An event id that is already stored: a retry of an append that succeeded.
                Err(e) if is_duplicate_key(&e) => {
                    return self.refused(stream, expected, &events).await;
                }
                Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && std::time::Instant::now() < deadline => {
                    // Another writer (or a dead one's open transaction) holds the stream head or
                    // the position counter: try again, backing off.
                    if attempt == 20 {
                        tracing::warn!(stream, "append keeps conflicting; retrying for up to {TRANSACTION_RETRY_WINDOW:?}");
                    }
                    tokio::time::sleep(Duration::from_millis((attempt * attempt).min(500))).await;
                }
                Err(e) => {
                    return Err(Error::Backend(format!("append to '{stream}' at {} failed: {e}", self.location)));
                }
            }
        }
    }

    async fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, Error> {
        self.find(doc! {"stream": stream, "version": {"$gte": from_version as i64}}, doc! {"version": 1}, None).await
    }

    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<Envelope>, Error> {
        // Positions are dense (allocated inside the append transaction), so a
        // bounded range selects exactly the page and lets the server use the
        // position index without sorting the rest of the log.
        let from = from_position.max(1) as i64;
        let to = from.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX));
        self.find(doc! {"position": {"$gte": from, "$lt": to}}, doc! {"position": 1}, Some(limit as i64)).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<u64, Error> {
        let d = self.checkpoints.find_one(doc! {"_id": name}).await.map_err(backend)?;
        Ok(d.as_ref().map_or(0, |d| get_u64(d, "position")))
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
        self.checkpoints
            .update_one(doc! {"_id": name}, doc! {"$set": {"position": position as i64}})
            .upsert(true)
            .await
            .map_err(backend)?;
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}
