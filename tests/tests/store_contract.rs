//! The `EventStore` contract, one suite run against every backend: SQLite
//! (embedded) and MongoDB (SecantusDB started by scripts/test.sh).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use serde_json::json;

use flame_events::store::Error;
use flame_events::subscription::subscribe;
use flame_events::{EventStore, ExpectedVersion, NewEvent};
use flame_stores::mongo::MongoStore;
use flame_stores::sqlite::SqliteStore;

use crate::util::{mongo_uri, unique};

fn event(n: u64) -> NewEvent {
    NewEvent::new("Tested", json!({"n": n}), "test")
}

async fn append_read_and_versions(store: &dyn EventStore) {
    let s = format!("test-{}", unique());
    assert!(store.read_stream(&s, 1).await.expect("read").is_empty(), "a missing stream reads empty");
    let r = store.append(&s, ExpectedVersion::NoStream, vec![event(1), event(2)]).await.expect("append");
    assert_eq!((r.first_version, r.last_version), (1, 2));
    let r2 = store.append(&s, ExpectedVersion::Exact(2), vec![event(3)]).await.expect("append");
    assert_eq!(r2.first_version, 3);
    assert!(r2.last_position > r.last_position);
    let read = store.read_stream(&s, 1).await.expect("read");
    assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(read.iter().map(|e| e.payload["n"].as_u64().expect("n")).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(read[0].actor, "test");
    assert_eq!(store.read_stream(&s, 3).await.expect("read").len(), 1);
    let positions: Vec<u64> = read.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
}

async fn stale_versions_conflict(store: &dyn EventStore) {
    let s = format!("test-{}", unique());
    store.append(&s, ExpectedVersion::NoStream, vec![event(1)]).await.expect("append");
    let e = store.append(&s, ExpectedVersion::NoStream, vec![event(2)]).await.expect_err("stream exists");
    assert!(matches!(e, Error::Conflict { actual: 1, .. }), "{e}");
    let e = store.append(&s, ExpectedVersion::Exact(5), vec![event(2)]).await.expect_err("stale");
    assert!(matches!(e, Error::Conflict { actual: 1, .. }), "{e}");
    assert_eq!(store.read_stream(&s, 1).await.expect("read").len(), 1, "a refused append writes nothing");
    store.append(&s, ExpectedVersion::Any, vec![event(2)]).await.expect("any");
}

async fn reappending_is_idempotent(store: &dyn EventStore) {
    let s = format!("test-{}", unique());
    let batch = vec![event(1), event(2)];
    let first = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.expect("append");
    // A retry of the same batch (same ids) with a now-stale expectation returns the stored result.
    let again = store.append(&s, ExpectedVersion::NoStream, batch).await.expect("idempotent retry");
    assert_eq!(first, again);
    assert_eq!(store.read_stream(&s, 1).await.expect("read").len(), 2);
}

async fn concurrent_writers_one_wins_per_version(store: Arc<dyn EventStore>) {
    let s = format!("test-{}", unique());
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.expect("seed");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, s) = (store.clone(), s.clone());
        tasks.push(tokio::spawn(async move { store.append(&s, ExpectedVersion::Exact(1), vec![event(100 + i)]).await }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => {
                assert_eq!(r.first_version, 2);
                wins += 1;
            }
            Err(Error::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one writer wins version 2");
    assert_eq!(store.read_stream(&s, 1).await.expect("read").len(), 2);
}

async fn global_log_and_checkpoints(store: Arc<dyn EventStore>) {
    let start = store.read_all(1, usize::MAX >> 1).await.expect("all").last().map_or(0, |e| e.position);
    let streams: Vec<String> = (0..4).map(|_| format!("test-{}", unique())).collect();
    let mut tasks = Vec::new();
    for s in &streams {
        let (store, s) = (store.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                store.append(&s, ExpectedVersion::Any, vec![event(i)]).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let all = store.read_all(start + 1, 1000).await.expect("all");
    let mine: Vec<_> = all.iter().filter(|e| streams.contains(&e.stream_id)).collect();
    assert_eq!(mine.len(), 20);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position), "global positions strictly increase");
    let ids: BTreeSet<_> = mine.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 20);
    assert_eq!(store.read_all(start + 1, 3).await.expect("limit").len(), 3);

    let name = format!("cp-{}", unique());
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), 0);
    store.save_checkpoint(&name, 42).await.expect("save");
    store.save_checkpoint(&name, 43).await.expect("save");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), 43);
}

async fn a_subscriber_sees_every_event_once_in_order(store: Arc<dyn EventStore>) {
    let start = store.read_all(1, usize::MAX >> 1).await.expect("all").last().map_or(0, |e| e.position);
    // Some history before the subscription, the rest while it follows.
    let before = format!("test-{}", unique());
    store.append(&before, ExpectedVersion::Any, vec![event(0), event(1)]).await.expect("append");
    let mut sub = subscribe(store.clone(), start + 1, Duration::from_millis(20));
    let streams: Vec<String> = (0..4).map(|_| format!("test-{}", unique())).collect();
    let mut writers = Vec::new();
    for s in &streams {
        let (store, s) = (store.clone(), s.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..10 {
                store.append(&s, ExpectedVersion::Any, vec![event(i), event(100 + i)]).await.expect("append");
            }
        }));
    }
    let mut seen = Vec::new();
    let mut ids = BTreeSet::new();
    let mut last = start;
    while seen.len() < 2 + 4 * 20 {
        let e =
            tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("subscriber keeps up").expect("open").expect("event");
        assert!(e.position > last, "positions arrive in order: {} after {last}", e.position);
        last = e.position;
        if e.stream_id == before || streams.contains(&e.stream_id) {
            assert!(ids.insert(e.event_id), "event {} delivered twice", e.event_id);
            seen.push(e);
        }
    }
    for w in writers {
        w.await.expect("writer");
    }
    for s in &streams {
        let versions: Vec<u64> = seen.iter().filter(|e| &e.stream_id == s).map(|e| e.version).collect();
        assert_eq!(versions, (1..=20).collect::<Vec<_>>());
    }
}

async fn contract(store: Arc<dyn EventStore>) {
    append_read_and_versions(store.as_ref()).await;
    stale_versions_conflict(store.as_ref()).await;
    reappending_is_idempotent(store.as_ref()).await;
    concurrent_writers_one_wins_per_version(store.clone()).await;
    global_log_and_checkpoints(store.clone()).await;
    a_subscriber_sees_every_event_once_in_order(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.db");
    let store = SqliteStore::open(path.to_str().expect("utf8")).expect("open");
    contract(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_store_meets_the_contract() {
    let store = MongoStore::connect(&mongo_uri(), &format!("flame_contract_{}", unique())).await.expect("connect");
    contract(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_mongo_document_names_its_place_and_spares_other_streams() {
    let uri = mongo_uri();
    let db = format!("flame_bad_{}", unique());
    let store = MongoStore::connect(&uri, &db).await.expect("connect");
    store.append("job-good", ExpectedVersion::NoStream, vec![event(1)]).await.expect("append");
    let client = mongodb::Client::with_uri_str(&uri).await.expect("client");
    client
        .database(&db)
        .collection::<mongodb::bson::Document>("events")
        .insert_one(mongodb::bson::doc! {
            "_id": "not-a-uuid", "stream": "job-bad", "version": 1i64, "position": 999i64, "type": "JobStarted",
            "schema_version": 1i64, "payload": {}, "recorded_at": mongodb::bson::DateTime::now(), "actor": "engine",
        })
        .await
        .expect("insert a damaged document");
    let err = store.read_stream("job-bad", 1).await.expect_err("undecodable");
    let msg = err.to_string();
    assert!(msg.contains("job-bad") && msg.contains("v1") && msg.contains("JobStarted") && msg.contains("not-a-uuid"), "{msg}");
    assert_eq!(store.read_stream("job-good", 1).await.expect("other streams still read").len(), 1);
}
