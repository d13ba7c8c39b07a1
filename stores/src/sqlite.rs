//! The embedded event store: one SQLite file in WAL mode.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use flame_events::store::{AppendResult, Error, EventStore, ExpectedVersion};
use flame_events::{Envelope, NewEvent};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,
    event_id       TEXT    NOT NULL UNIQUE,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    causation_id   TEXT,
    correlation_id TEXT,
    actor          TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
";

const COLUMNS: &str =
    "event_id, stream_id, version, position, event_type, schema_version, payload, recorded_at, causation_id, correlation_id, actor";

/// An `EventStore` in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: String,
    appended: Arc<tokio::sync::Notify>,
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`; `:memory:` for a throw-away one.
    pub fn open(path: &str) -> Result<Self, Error> {
        if path != ":memory:"
            && let Some(dir) = Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("cannot create the folder for the event store '{path}': {e}")))?;
        }
        let conn = Connection::open(path).map_err(|e| Error::Config(format!("cannot open the event store '{path}': {e}")))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: path.to_string(), appended: Arc::default() })
    }

    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
        blocking(&self.conn, f).await
    }
}

/// Runs `f` on a shared SQLite connection on the blocking pool (SQLite calls block).
pub async fn blocking<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = conn.lock().map_err(|_| Error::Backend("the SQLite connection lock is poisoned".into()))?;
        f(&mut guard)
    })
    .await
    .map_err(backend)?
}

fn row_to_envelope(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        event_id: row.get(0)?,
        stream_id: row.get(1)?,
        version: row.get(2)?,
        position: row.get(3)?,
        event_type: row.get(4)?,
        schema_version: row.get(5)?,
        payload: row.get(6)?,
        recorded_at: row.get(7)?,
        causation_id: row.get(8)?,
        correlation_id: row.get(9)?,
        actor: row.get(10)?,
    })
}

struct RawRow {
    event_id: String,
    stream_id: String,
    version: i64,
    position: i64,
    event_type: String,
    schema_version: i64,
    payload: String,
    recorded_at: String,
    causation_id: Option<String>,
    correlation_id: Option<String>,
    actor: String,
}

impl RawRow {
    fn decode(self) -> Result<Envelope, Error> {
        let version = self.version as u64;
        let fail = |reason: String| Error::Decode { stream: self.stream_id.clone(), version, event_type: self.event_type.clone(), reason };
        let event_id = self.event_id.parse().map_err(|e| fail(format!("bad event id '{}': {e}", self.event_id)))?;
        let payload = serde_json::from_str(&self.payload).map_err(|e| fail(format!("payload is not JSON: {e}")))?;
        let recorded_at = DateTime::parse_from_rfc3339(&self.recorded_at)
            .map_err(|e| fail(format!("bad recorded_at '{}': {e}", self.recorded_at)))?
            .with_timezone(&Utc);
        Ok(Envelope {
            event_id,
            stream_id: self.stream_id,
            version,
            position: self.position as u64,
            event_type: self.event_type,
            schema_version: self.schema_version as u32,
            payload,
            recorded_at,
            causation_id: self.causation_id,
            correlation_id: self.correlation_id,
            actor: self.actor,
        })
    }
}

fn query(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Envelope>, Error> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let rows = stmt.query_map(args, row_to_envelope).map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(backend)?.decode()?);
    }
    Ok(out)
}

fn stored_result(conn: &Connection, ids: &[String]) -> Result<Option<AppendResult>, Error> {
    let mut stmt = conn.prepare_cached("SELECT version, position FROM events WHERE event_id = ?1").map_err(backend)?;
    let first: Option<(i64, i64)> = stmt.query_row([&ids[0]], |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(backend)?;
    let Some((first_version, _)) = first else {
        return Ok(None);
    };
    let last_id = ids.last().unwrap_or(&ids[0]);
    let (last_version, last_position): (i64, i64) = stmt
        .query_row([last_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(backend)?
        .ok_or_else(|| Error::Backend(format!("event {} was stored without the rest of its batch", ids[0])))?;
    Ok(Some(AppendResult { first_version: first_version as u64, last_version: last_version as u64, last_position: last_position as u64 }))
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> Result<AppendResult, Error> {
        if events.is_empty() {
            return Err(Error::Empty);
        }
        let stream = stream.to_string();
        let result = self
            .with(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend)?;
                let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
                if let Some(done) = stored_result(&tx, &ids)? {
                    return Ok(done);
                }
                let actual: i64 = tx
                    .query_row("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?1", [&stream], |r| r.get(0))
                    .map_err(backend)?;
                if !expected.admits(actual as u64) {
                    return Err(Error::Conflict { stream, expected, actual: actual as u64 });
                }
                let mut position: i64 = tx.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| r.get(0)).map_err(backend)?;
                let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let mut version = actual;
                {
                    let mut insert = tx
                        .prepare_cached(&format!("INSERT INTO events ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"))
                        .map_err(backend)?;
                    for (event, id) in events.iter().zip(&ids) {
                        version += 1;
                        position += 1;
                        insert
                            .execute(params![
                                id,
                                stream,
                                version,
                                position,
                                event.event_type,
                                event.schema_version,
                                event.payload.to_string(),
                                now,
                                event.causation_id,
                                event.correlation_id,
                                event.actor,
                            ])
                            .map_err(backend)?;
                    }
                }
                tx.commit().map_err(backend)?;
                Ok(AppendResult { first_version: actual as u64 + 1, last_version: version as u64, last_position: position as u64 })
            })
            .await;
        if result.is_ok() {
            self.appended.notify_waiters();
        }
        result
    }

    async fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, Error> {
        let stream = stream.to_string();
        self.with(move |conn| {
            query(
                conn,
                &format!("SELECT {COLUMNS} FROM events WHERE stream_id = ?1 AND version >= ?2 ORDER BY version"),
                params![stream, from_version as i64],
            )
        })
        .await
    }

    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<Envelope>, Error> {
        self.with(move |conn| {
            query(
                conn,
                &format!("SELECT {COLUMNS} FROM events WHERE position >= ?1 ORDER BY position LIMIT ?2"),
                params![from_position as i64, limit as i64],
            )
        })
        .await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<u64, Error> {
        let name = name.to_string();
        self.with(move |conn| {
            let pos: Option<i64> =
                conn.query_row("SELECT position FROM checkpoints WHERE name = ?1", [&name], |r| r.get(0)).optional().map_err(backend)?;
            Ok(pos.unwrap_or(0) as u64)
        })
        .await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), Error> {
        let name = name.to_string();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET position = excluded.position",
                params![name, position as i64],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    fn location(&self) -> String {
        format!("sqlite:{}", self.path)
    }

    async fn wait_for_append(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.appended.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use flame_events::job::JobEvent;
    use flame_events::upcast::Upcasters;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    #[test]
    fn a_bad_stored_event_names_its_place_and_spares_other_streams() {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("e.db");
            let store = SqliteStore::open(path.to_str().expect("utf8")).expect("open");
            store.append("job-good", ExpectedVersion::NoStream, vec![JobEvent::JobStarted {}.to_new_event("good", "engine")]).await.expect("append");
            store
                .append("job-odd", ExpectedVersion::NoStream, vec![NewEvent::new("JobTeleported", json!({"to": "mars"}), "engine")])
                .await
                .expect("append");
            // Damage one stored payload behind the store's back.
            let raw = Connection::open(&path).expect("raw");
            raw.execute(
                "INSERT INTO events (position, event_id, stream_id, version, event_type, schema_version, payload, recorded_at, actor) \
                 VALUES (100, '01900000-0000-7000-8000-000000000000', 'job-bad', 1, 'JobStarted', 1, '{not json', '2026-01-01T00:00:00Z', 'engine')",
                [],
            )
            .expect("insert");
            let err = store.read_stream("job-bad", 1).await.expect_err("undecodable");
            let msg = err.to_string();
            assert!(msg.contains("job-bad") && msg.contains("v1") && msg.contains("JobStarted"), "{msg}");
            assert_eq!(store.read_stream("job-good", 1).await.expect("other streams still read").len(), 1);

            // An unknown event type decodes as an envelope but not as a job event, and says where.
            let odd = store.read_stream("job-odd", 1).await.expect("envelope");
            let err = JobEvent::from_envelope(&odd[0]).expect_err("unknown type");
            assert!(matches!(&err, flame_events::store::Error::Decode { stream, version: 1, event_type, .. } if stream == "job-odd" && event_type == "JobTeleported"), "{err}");
        });
    }

    #[test]
    fn a_version_1_event_is_read_as_version_2() {
        rt().block_on(async {
            let store = SqliteStore::open(":memory:").expect("open");
            store
                .append("acct-1", ExpectedVersion::NoStream, vec![NewEvent::new("Renamed", json!({"name": "Ada Lovelace"}), "user:a")])
                .await
                .expect("append");
            let mut upcasters = Upcasters::default();
            upcasters.register("Renamed", 1, |mut v| {
                let full = v["name"].as_str().ok_or("no name")?.to_string();
                let (first, last) = full.split_once(' ').unwrap_or((&full, ""));
                v["first"] = json!(first);
                v["last"] = json!(last);
                v.as_object_mut().ok_or("not an object")?.remove("name");
                Ok(v)
            });
            let stored = store.read_stream("acct-1", 1).await.expect("read").remove(0);
            assert_eq!(stored.schema_version, 1);
            let lifted = upcasters.upcast(stored).expect("upcast");
            assert_eq!(lifted.schema_version, 2);
            assert_eq!(lifted.payload, json!({"first": "Ada", "last": "Lovelace"}));

            // A step that fails reports the event's place.
            let mut broken = Upcasters::default();
            broken.register("Renamed", 1, |_| Err("boom".into()));
            let err = broken.upcast(store.read_stream("acct-1", 1).await.expect("read").remove(0)).expect_err("fails");
            assert!(err.to_string().contains("acct-1 v1"), "{err}");
        });
    }

    #[test]
    fn newer_schema_versions_are_refused_not_misread() {
        let mut n = JobEvent::JobStarted {}.to_new_event("j", "engine");
        n.schema_version = 9;
        rt().block_on(async {
            let store = SqliteStore::open(":memory:").expect("open");
            store.append("job-j", ExpectedVersion::NoStream, vec![n]).await.expect("append");
            let e = store.read_stream("job-j", 1).await.expect("read").remove(0);
            let err = JobEvent::from_envelope(&e).expect_err("newer");
            assert!(err.to_string().contains("upgrade"), "{err}");
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// For any interleaving of appends to a few streams, the global log is
        /// the union of the streams, in commit order, and every stream is gap-free.
        #[test]
        fn the_global_log_is_the_union_of_gap_free_streams(appends in proptest::collection::vec((0usize..4, 1usize..4), 1..40)) {
            rt().block_on(async {
                let store = SqliteStore::open(":memory:").expect("open");
                let mut expected: Vec<(String, u64)> = Vec::new();
                let mut heads = [0u64; 4];
                for (stream, n) in &appends {
                    let s = format!("s-{stream}");
                    let events = (0..*n).map(|i| NewEvent::new("E", json!({"i": i}), "t")).collect();
                    store.append(&s, ExpectedVersion::Exact(heads[*stream]), events).await.expect("append");
                    for _ in 0..*n {
                        heads[*stream] += 1;
                        expected.push((s.clone(), heads[*stream]));
                    }
                }
                let all = store.read_all(1, 10_000).await.expect("all");
                let got: Vec<(String, u64)> = all.iter().map(|e| (e.stream_id.clone(), e.version)).collect();
                assert_eq!(got, expected);
                assert!(all.iter().enumerate().all(|(i, e)| e.position == i as u64 + 1));
                for (k, head) in heads.iter().enumerate() {
                    let versions: Vec<u64> = store.read_stream(&format!("s-{k}"), 1).await.expect("read").iter().map(|e| e.version).collect();
                    assert_eq!(versions, (1..=*head).collect::<Vec<_>>());
                }
            });
        }
    }
}
