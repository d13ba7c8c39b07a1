//! The MongoDB event store: one document per append (a *commit* holding its
//! events), written without a transaction (docs/adr/0007).
//!
//! - Stream versions: a commit's `_id` is its stream and first version, so two
//!   appends after the same version collide on it and one of them is refused.
//!   An append that expects version `v` first checks that a commit ends at `v`
//!   (skipped when this process wrote `v` itself), so versions never skip.
//! - Global order: a commit takes its positions with one `$inc` on a counter
//!   just before its insert; `first_position` is unique. Nothing is held
//!   across round trips, so a writer killed at any point blocks nobody.
//! - Gaps: positions taken and never stored (a writer that died between the
//!   two steps, or lost its version collision). A reader of the global log
//!   waits for a missing position for a grace period, then stores a *void* at
//!   it. The void holds the position's unique key, so a late writer's insert
//!   fails and that writer takes new positions: a reader never skips a commit
//!   that could still appear.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, Database, IndexModel};

use flame_events::store::{AppendResult, Error, EventStore, ExpectedVersion};
use flame_events::{Envelope, NewEvent};

/// The database used when the URL names none.
pub const DEFAULT_DB: &str = "flame";
const DUPLICATE_KEY: i32 = 11000;
/// How long a reader waits for a position that was taken but not stored
/// before it voids it. Far above an insert's latency; it is only ever waited
/// out after a writer died between taking positions and storing its commit.
pub const GAP_GRACE: Duration = Duration::from_secs(2);
/// How many times an append takes new positions after losing them to a void
/// (or re-reads the head, for `ExpectedVersion::Any`) before giving up.
const ATTEMPTS: usize = 50;
/// The counter document that hands out global positions. Earlier versions
/// used the same one, so positions continue where an old log ends.
const POSITIONS: &str = "events";
/// The marker of a database whose old one-document-per-event log was folded into commits.
const LAYOUT: &str = "layout";
const LAYOUT_VERSION: i64 = 2;

/// An `EventStore` in a MongoDB database.
#[derive(Clone)]
pub struct MongoStore {
    commits: Collection<Document>,
    counters: Collection<Document>,
    checkpoints: Collection<Document>,
    location: String,
    /// Stream heads this process wrote or read, so an append after them skips the check.
    heads: Arc<Mutex<HashMap<String, u64>>>,
    grace: Duration,
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

/// A commit's `_id`: its stream and first version, the version zero-padded so
/// that a stream's commits also sort by `_id`.
fn commit_id(stream: &str, first_version: u64) -> String {
    format!("{stream}:{first_version:020}")
}

/// A void: holds the global positions `first..=last`, which no commit will ever take.
fn void(first: u64, last: u64) -> Document {
    doc! {"_id": format!("void:{first:020}"), "first_position": first as i64, "last_position": last as i64, "void": true}
}

fn event_doc(e: &NewEvent) -> Document {
    doc! {
        "event_id": e.event_id.to_string(),
        "type": &e.event_type,
        "schema_version": e.schema_version as i64,
        "payload": bson::to_bson(&e.payload).unwrap_or(Bson::Null),
        "causation_id": e.causation_id.clone(),
        "correlation_id": e.correlation_id.clone(),
        "actor": &e.actor,
    }
}

impl MongoStore {
    /// Connects, creates the indexes (idempotent), and folds an old
    /// one-document-per-event log into commits if the database has one.
    pub async fn connect(uri: &str, database: &str) -> Result<Self, Error> {
        let client = Client::with_uri_str(uri).await.map_err(|e| Error::Config(format!("cannot use MongoDB URL '{uri}': {e}")))?;
        let db = client.default_database().unwrap_or_else(|| client.database(database));
        let store = Self {
            commits: db.collection("commits"),
            counters: db.collection("counters"),
            checkpoints: db.collection("checkpoints"),
            location: redact(uri),
            heads: Arc::default(),
            grace: GAP_GRACE,
        };
        store.ensure_indexes().await?;
        store.migrate(&db).await?;
        Ok(store)
    }

    /// The same store with another grace period for missing positions (tests).
    pub fn with_gap_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    async fn ensure_indexes(&self) -> Result<(), Error> {
        let index =
            |keys: Document, unique: bool| IndexModel::builder().keys(keys).options(IndexOptions::builder().unique(unique).build()).build();
        self.commits
            .create_indexes([
                index(doc! {"first_position": 1}, true),
                index(doc! {"last_position": 1}, false),
                index(doc! {"stream": 1, "last_version": 1}, false),
                // Event ids are unique across commits (voids have no events, hence sparse): a retried
                // append is refused whatever version it expects.
                IndexModel::builder()
                    .keys(doc! {"events.event_id": 1})
                    .options(IndexOptions::builder().unique(true).sparse(true).build())
                    .build(),
            ])
            .await
            .map_err(|e| Error::Backend(format!("cannot create the commit indexes at {}: {e}", self.location)))?;
        Ok(())
    }

    /// Folds the `events` collection of earlier versions (one document per
    /// event, dense positions) into commits of one event each, keeping every
    /// event's id, version and position, so checkpoints stay valid. Runs once
    /// per database; a run cut short is resumed by the next (commits already
    /// there are skipped). Engines of the old version must be stopped first.
    async fn migrate(&self, db: &Database) -> Result<(), Error> {
        let fail =
            |e: mongodb::error::Error| Error::Backend(format!("cannot move the old event log at {} into commits: {e}", self.location));
        if self
            .counters
            .find_one(doc! {"_id": LAYOUT})
            .await
            .map_err(fail)?
            .is_some_and(|d| get_u64(&d, "version") >= LAYOUT_VERSION as u64)
        {
            return Ok(());
        }
        let old: Collection<Document> = db.collection("events");
        let end = self.positions_taken().await?;
        let mut moved = 0u64;
        let mut from = 1u64;
        while from <= end {
            let to = from + 1000;
            let page: Vec<Document> = old
                .find(doc! {"position": {"$gte": from as i64, "$lt": to as i64}})
                .await
                .map_err(fail)?
                .try_collect()
                .await
                .map_err(fail)?;
            let commits: Vec<Document> = page
                .into_iter()
                .map(|d| {
                    let (version, position) = (get_u64(&d, "version"), get_u64(&d, "position"));
                    let stream = get_str(&d, "stream").unwrap_or_default();
                    let mut event = doc! {"event_id": d.get("_id").cloned().unwrap_or(Bson::Null)};
                    for key in ["type", "schema_version", "payload", "causation_id", "correlation_id", "actor"] {
                        event.insert(key, d.get(key).cloned().unwrap_or(Bson::Null));
                    }
                    doc! {
                        "_id": commit_id(&stream, version), "stream": stream,
                        "first_version": version as i64, "last_version": version as i64,
                        "first_position": position as i64, "last_position": position as i64,
                        "recorded_at": d.get("recorded_at").cloned().unwrap_or(Bson::Null), "events": [event],
                    }
                })
                .collect();
            moved += commits.len() as u64;
            if !commits.is_empty() {
                match self.commits.insert_many(commits).ordered(false).await {
                    Ok(_) => {}
                    Err(e) if is_duplicate_key(&e) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            from = to;
        }
        if moved > 0 {
            tracing::info!(events = moved, store = %self.location, "moved the old event log into commits (the old 'events' collection is kept; drop it once satisfied)");
        }
        self.counters.update_one(doc! {"_id": LAYOUT}, doc! {"$max": {"version": LAYOUT_VERSION}}).upsert(true).await.map_err(fail)?;
        Ok(())
    }

    fn known_head(&self, stream: &str) -> Option<u64> {
        self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(stream).copied()
    }

    fn remember_head(&self, stream: &str, version: u64) {
        let mut heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if heads.len() > 100_000 {
            heads.clear();
        }
        let head = heads.entry(stream.to_string()).or_default();
        *head = (*head).max(version);
    }

    fn forget_head(&self, stream: &str) {
        self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(stream);
    }

    /// The stream's last version as stored (0: no stream).
    async fn head(&self, stream: &str) -> Result<u64, Error> {
        let last = self.commits.find_one(doc! {"stream": stream}).sort(doc! {"stream": 1, "last_version": -1}).await.map_err(backend)?;
        Ok(last.as_ref().map_or(0, |c| get_u64(c, "last_version")))
    }

    /// Whether a stored commit ends at version `v` of the stream.
    async fn ends_at(&self, stream: &str, v: u64) -> Result<bool, Error> {
        let found =
            self.commits.find_one(doc! {"stream": stream, "last_version": v as i64}).projection(doc! {"_id": 1}).await.map_err(backend)?;
        Ok(found.is_some())
    }

    /// Where these events are stored, if their first one is.
    async fn stored(&self, events: &[NewEvent]) -> Result<Option<AppendResult>, Error> {
        let id = events[0].event_id.to_string();
        let Some(c) = self.commits.find_one(doc! {"events.event_id": &id}).await.map_err(backend)? else {
            return Ok(None);
        };
        let index = c
            .get_array("events")
            .ok()
            .and_then(|es| es.iter().position(|e| e.as_document().and_then(|e| e.get_str("event_id").ok()) == Some(id.as_str())))
            .unwrap_or(0) as u64;
        let n = events.len() as u64;
        let first_version = get_u64(&c, "first_version") + index;
        Ok(Some(AppendResult {
            first_version,
            last_version: first_version + n - 1,
            last_position: get_u64(&c, "first_position") + index + n - 1,
        }))
    }

    /// After a refused append: the stored result if these events are already
    /// stored (an idempotent retry), else the conflict.
    async fn refused(&self, stream: &str, expected: ExpectedVersion, events: &[NewEvent]) -> Result<AppendResult, Error> {
        if let Some(done) = self.stored(events).await? {
            return Ok(done);
        }
        let actual = self.head(stream).await?;
        self.remember_head(stream, actual);
        Err(Error::Conflict { stream: stream.to_string(), expected, actual })
    }

    /// Takes `n` global positions; returns the last.
    async fn take_positions(&self, n: u64) -> Result<u64, Error> {
        let counter = self
            .counters
            .find_one_and_update(doc! {"_id": POSITIONS}, doc! {"$inc": {"position": n as i64}})
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| Error::Backend(format!("cannot take global positions at {}: {e}", self.location)))?
            .ok_or_else(|| Error::Backend("the position counter was not returned".into()))?;
        Ok(get_u64(&counter, "position"))
    }

    /// How many global positions have been taken (the last one handed out).
    async fn positions_taken(&self) -> Result<u64, Error> {
        Ok(self.counters.find_one(doc! {"_id": POSITIONS}).await.map_err(backend)?.map_or(0, |d| get_u64(&d, "position")))
    }

    /// Voids the positions `from..=to`. `own`: this writer took them and
    /// stored nothing at them, so one void holds them all. Otherwise one void
    /// per position, in order, stopping at the first that is taken (by a
    /// commit or another reader's void): a writer whose positions start
    /// inside the range must collide with one.
    async fn void_positions(&self, from: u64, to: u64, own: bool) -> Result<(), Error> {
        if from > to {
            return Ok(());
        }
        let voids: Vec<Document> = if own { vec![void(from, to)] } else { (from..=to).map(|p| void(p, p)).collect() };
        match self.commits.insert_many(voids).ordered(true).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(Error::Backend(format!("cannot void the missing global positions {from}..={to} at {}: {e}", self.location))),
        }
    }

    async fn find(&self, filter: Document, sort: Document) -> Result<Vec<Document>, Error> {
        self.commits.find(filter).sort(sort).await.map_err(backend)?.try_collect().await.map_err(backend)
    }

    /// Adds the events of commit `c` from position `next` on (at most up to
    /// `limit` in all) to `out`; returns the position after the last one added.
    fn take(c: &Document, next: u64, limit: usize, out: &mut Vec<Envelope>) -> Result<u64, Error> {
        let first = get_u64(c, "first_position");
        let last = get_u64(c, "last_position");
        if c.get_bool("void").unwrap_or(false) {
            return Ok(last + 1);
        }
        let mut next = next;
        for (i, e) in decode(c)?.into_iter().enumerate() {
            let position = first + i as u64;
            if position < next {
                continue;
            }
            if out.len() >= limit {
                return Ok(next);
            }
            out.push(e);
            next = position + 1;
        }
        Ok(next.max(last + 1))
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

/// The events of one commit.
fn decode(c: &Document) -> Result<Vec<Envelope>, Error> {
    let stream_id = get_str(c, "stream").unwrap_or_default();
    let first_version = get_u64(c, "first_version");
    let first_position = get_u64(c, "first_position");
    let recorded_at = c.get_datetime("recorded_at").ok().and_then(|t| DateTime::<Utc>::from_timestamp_millis(t.timestamp_millis()));
    let events = c.get_array("events").map_err(|e| Error::Decode {
        stream: stream_id.clone(),
        version: first_version,
        event_type: String::new(),
        reason: format!("commit {} has no events: {e}", get_str(c, "_id").unwrap_or_default()),
    })?;
    let mut out = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let version = first_version + i as u64;
        let empty = Document::new();
        let d = e.as_document().unwrap_or(&empty);
        let event_type = get_str(d, "type").unwrap_or_default();
        let fail = |reason: String| Error::Decode { stream: stream_id.clone(), version, event_type: event_type.clone(), reason };
        let id = get_str(d, "event_id").ok_or_else(|| fail("missing event_id".into()))?;
        let event_id = id.parse().map_err(|e| fail(format!("bad event id '{id}': {e}")))?;
        let payload = match d.get("payload") {
            Some(b) => b.clone().into_relaxed_extjson(),
            None => return Err(fail("missing payload".into())),
        };
        out.push(Envelope {
            event_id,
            position: first_position + i as u64,
            schema_version: get_u64(d, "schema_version") as u32,
            payload,
            recorded_at: recorded_at.ok_or_else(|| fail("missing or bad recorded_at".into()))?,
            causation_id: get_str(d, "causation_id"),
            correlation_id: get_str(d, "correlation_id"),
            actor: get_str(d, "actor").unwrap_or_default(),
            stream_id: stream_id.clone(),
            version,
            event_type,
        });
    }
    Ok(out)
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
        let n = events.len() as u64;
        let docs: Vec<Document> = events.iter().map(event_doc).collect();
        let mut base = match expected {
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => 0,
            ExpectedVersion::Exact(v) => match self.known_head(stream) {
                // Versions only grow: a head seen past `v` is a conflict (or a retry of a stored append).
                Some(h) if h > v => return self.refused(stream, expected, &events).await,
                Some(h) if h == v => v,
                _ if self.ends_at(stream, v).await? => v,
                _ => return self.refused(stream, expected, &events).await,
            },
            ExpectedVersion::Any => match self.known_head(stream) {
                Some(v) => v,
                None => self.head(stream).await?,
            },
        };
        for _ in 0..ATTEMPTS {
            let last_position = self.take_positions(n).await?;
            let first_position = last_position + 1 - n;
            let commit = doc! {
                "_id": commit_id(stream, base + 1), "stream": stream,
                "first_version": (base + 1) as i64, "last_version": (base + n) as i64,
                "first_position": first_position as i64, "last_position": last_position as i64,
                "recorded_at": bson::DateTime::now(), "events": docs.clone(),
            };
            match self.commits.insert_one(commit).await {
                Ok(_) => {
                    self.remember_head(stream, base + n);
                    return Ok(AppendResult { first_version: base + 1, last_version: base + n, last_position });
                }
                Err(e) if is_duplicate_key(&e) => {
                    // The positions went unused. Give them back at once so that no reader waits for
                    // them (a no-op when a reader already voided them).
                    self.void_positions(first_position, last_position, true).await?;
                    // The events are stored already: a retry of an append that succeeded.
                    if let Some(done) = self.stored(&events).await? {
                        return Ok(done);
                    }
                    let version_taken = self
                        .commits
                        .find_one(doc! {"_id": commit_id(stream, base + 1)})
                        .projection(doc! {"_id": 1})
                        .await
                        .map_err(backend)?;
                    if version_taken.is_none() {
                        // A reader voided these positions while this writer was slow: take new ones.
                        tracing::debug!(stream, first_position, "positions were voided before the commit arrived; taking new ones");
                        continue;
                    }
                    // Another append took this version first: a conflict, or, for `Any`, append after it.
                    self.forget_head(stream);
                    if expected != ExpectedVersion::Any {
                        return self.refused(stream, expected, &events).await;
                    }
                    base = self.head(stream).await?;
                }
                Err(e) => return Err(Error::Backend(format!("append to '{stream}' at {} failed: {e}", self.location))),
            }
        }
        Err(Error::Backend(format!(
            "append to '{stream}' at {} kept losing its positions or version after {ATTEMPTS} attempts",
            self.location
        )))
    }

    async fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, Error> {
        let commits = self
            .find(doc! {"stream": stream, "last_version": {"$gte": from_version.max(1) as i64}}, doc! {"stream": 1, "last_version": 1})
            .await?;
        let mut out = Vec::new();
        for c in &commits {
            out.extend(decode(c)?.into_iter().filter(|e| e.version >= from_version));
        }
        if let Some(last) = out.last() {
            self.remember_head(stream, last.version);
        }
        Ok(out)
    }

    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<Envelope>, Error> {
        let mut out = Vec::new();
        let mut next = from_position.max(1);
        // Nothing taken from `next` on means nothing stored there: an idle follower's poll is this one read.
        if self.positions_taken().await? < next {
            return Ok(out);
        }
        // When a missing position was first seen, and how far positions had been taken then.
        let mut missing_since: Option<(Instant, u64)> = None;
        let mut pause = Duration::from_millis(1);
        while out.len() < limit {
            // Commits ending in the page; positions are dense over commits and voids, so this is the page's content.
            let want = i64::try_from(limit - out.len()).unwrap_or(i64::MAX);
            let page = self
                .find(doc! {"last_position": {"$gte": next as i64, "$lt": (next as i64).saturating_add(want)}}, doc! {"last_position": 1})
                .await?;
            for c in &page {
                if get_u64(c, "first_position") > next {
                    break;
                }
                next = Self::take(c, next, limit, &mut out)?;
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            // `next` is missing from the page: a commit that runs past it, or not stored (yet).
            if let Some(c) = self.commits.find_one(doc! {"first_position": next as i64}).await.map_err(backend)? {
                next = Self::take(&c, next, limit, &mut out)?;
                continue;
            }
            if !out.is_empty() {
                return Ok(out);
            }
            let taken = self.positions_taken().await?;
            if taken < next {
                return Ok(out); // the end of the log
            }
            match missing_since {
                None => missing_since = Some((Instant::now(), taken)),
                Some((since, upto)) if since.elapsed() >= self.grace && upto >= next => {
                    // Taken at least the grace period ago and still not stored: its writer died or
                    // gave up. Void up to the next stored commit (or as far as was taken then).
                    let later = self
                        .commits
                        .find_one(doc! {"first_position": {"$gt": next as i64, "$lte": upto as i64}})
                        .sort(doc! {"first_position": 1})
                        .await
                        .map_err(backend)?;
                    let to = later.map_or(upto, |c| get_u64(&c, "first_position") - 1);
                    tracing::warn!(from = next, to, store = %self.location, "voiding global positions taken but never stored (a writer died mid-append)");
                    self.void_positions(next, to, false).await?;
                    continue;
                }
                Some(_) => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        Ok(out)
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
