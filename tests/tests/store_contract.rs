//! The `EventStore` contract, one suite run against every backend: SQLite
//! (embedded) and MongoDB (SecantusDB started by scripts/test.sh).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{Document, doc};

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
        .collection::<Document>("commits")
        .insert_one(doc! {
            "_id": "job-bad:00000000000000000001", "stream": "job-bad", "first_version": 1i64, "last_version": 1i64,
            "first_position": 999i64, "last_position": 999i64, "recorded_at": mongodb::bson::DateTime::now(),
            "events": [{"event_id": "not-a-uuid", "type": "JobStarted", "schema_version": 1i64, "payload": {}, "actor": "engine"}],
        })
        .await
        .expect("insert a damaged document");
    let err = store.read_stream("job-bad", 1).await.expect_err("undecodable");
    let msg = err.to_string();
    assert!(msg.contains("job-bad") && msg.contains("v1") && msg.contains("JobStarted") && msg.contains("not-a-uuid"), "{msg}");
    assert_eq!(store.read_stream("job-good", 1).await.expect("other streams still read").len(), 1);
}

async fn positions_taken(db: &mongodb::Database) -> u64 {
    let d = db.collection::<Document>("counters").find_one(doc! {"_id": "events"}).await.expect("counter").expect("a counter");
    d.get_i64("position").map(|p| p as u64).or_else(|_| d.get_i32("position").map(|p| p as u64)).expect("position")
}

/// What a writer killed between taking its global positions and storing its
/// commit leaves behind: positions taken, nothing at them. Writers go on at
/// once; readers wait for the grace period, then void the positions, so that
/// the dead writer's commit could never appear behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_mid_append_blocks_no_writer_and_readers_void_its_positions() {
    let uri = mongo_uri();
    let name = format!("flame_gap_{}", unique());
    let store = Arc::new(MongoStore::connect(&uri, &name).await.expect("connect").with_gap_grace(Duration::from_millis(300)));
    let db = mongodb::Client::with_uri_str(&uri).await.expect("client").database(&name);
    let before = store.append("job-a", ExpectedVersion::NoStream, vec![event(1)]).await.expect("append");
    // The dead writer: three positions taken, no commit.
    db.collection::<Document>("counters").update_one(doc! {"_id": "events"}, doc! {"$inc": {"position": 3i64}}).await.expect("take");
    let after = tokio::time::timeout(Duration::from_secs(5), store.append("job-b", ExpectedVersion::NoStream, vec![event(2), event(3)]))
        .await
        .expect("a writer is not held up by a dead one")
        .expect("append");
    assert_eq!(after.last_position, before.last_position + 5, "the gap is the dead writer's three positions");
    let mut sub = subscribe(store.clone(), before.last_position, Duration::from_millis(20));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("the reader gets past the gap")
            .expect("open")
            .expect("event");
        seen.push((e.stream_id, e.version, e.position));
    }
    let p = before.last_position;
    assert_eq!(seen, vec![("job-a".into(), 1, p), ("job-b".into(), 1, p + 4), ("job-b".into(), 2, p + 5)]);
    let voids = db.collection::<Document>("commits").count_documents(doc! {"void": true}).await.expect("count");
    assert_eq!(voids, 3, "one void per missing position");
    // The dead writer's commit, arriving late, cannot land behind the reader.
    let late = db
        .collection::<Document>("commits")
        .insert_one(doc! {
            "_id": "job-c:00000000000000000001", "stream": "job-c", "first_version": 1i64, "last_version": 1i64,
            "first_position": (p + 1) as i64, "last_position": (p + 1) as i64, "recorded_at": mongodb::bson::DateTime::now(), "events": [],
        })
        .await;
    assert!(late.is_err(), "a commit at a voided position was stored");
    assert_eq!(store.read_all(p, 100).await.expect("read").len(), 3, "nothing new appeared behind the reader");
}

/// A writer slower than the grace period finds its positions voided: it takes
/// new ones, and its events are stored once, after the void.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_positions_were_voided_takes_new_ones() {
    let uri = mongo_uri();
    let name = format!("flame_void_{}", unique());
    let store = MongoStore::connect(&uri, &name).await.expect("connect");
    let db = mongodb::Client::with_uri_str(&uri).await.expect("client").database(&name);
    store.append("job-a", ExpectedVersion::NoStream, vec![event(1)]).await.expect("append");
    let next = positions_taken(&db).await + 1;
    // A reader voided the next positions before this writer stored its commit there.
    let voids: Vec<Document> = (next..next + 2)
        .map(|p| doc! {"_id": format!("void:{p:020}"), "first_position": p as i64, "last_position": p as i64, "void": true})
        .collect();
    db.collection::<Document>("commits").insert_many(voids).await.expect("void");
    let r = store.append("job-a", ExpectedVersion::Exact(1), vec![event(2), event(3)]).await.expect("append after the voids");
    assert_eq!((r.first_version, r.last_version), (2, 3));
    assert!(r.last_position > next + 1, "positions after the voids: {r:?}");
    let all = store.read_all(1, 100).await.expect("read");
    assert_eq!(all.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3], "each event once");
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
}

/// A database written by an earlier version (one document per event in
/// `events`, dense positions) is moved into commits on first use: the same
/// ids, versions, positions and checkpoints, and appends go on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_one_document_per_event_log_is_moved_into_commits() {
    let uri = mongo_uri();
    let name = format!("flame_old_{}", unique());
    let db = mongodb::Client::with_uri_str(&uri).await.expect("client").database(&name);
    let old: Vec<NewEvent> = (1..=3).map(event).collect();
    let docs: Vec<Document> = old
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (stream, version) = if i < 2 { ("job-old", i as i64 + 1) } else { ("design-old", 1) };
            doc! {
                "_id": e.event_id.to_string(), "stream": stream, "version": version, "position": i as i64 + 1, "type": &e.event_type,
                "schema_version": 1i64, "payload": mongodb::bson::to_bson(&e.payload).expect("bson"),
                "recorded_at": mongodb::bson::DateTime::now(), "causation_id": "cmd-1", "correlation_id": null, "actor": "engine",
            }
        })
        .collect();
    db.collection::<Document>("events").insert_many(docs).await.expect("old events");
    db.collection::<Document>("counters").insert_one(doc! {"_id": "events", "position": 3i64}).await.expect("old counter");
    db.collection::<Document>("checkpoints").insert_one(doc! {"_id": "views", "position": 2i64}).await.expect("old checkpoint");

    let store = MongoStore::connect(&uri, &name).await.expect("connect and migrate");
    let all = store.read_all(1, 100).await.expect("read");
    assert_eq!(
        all.iter().map(|e| (e.event_id, e.position)).collect::<Vec<_>>(),
        old.iter().zip(1..).map(|(e, p)| (e.event_id, p)).collect::<Vec<_>>()
    );
    let job = store.read_stream("job-old", 1).await.expect("read");
    assert_eq!(job.iter().map(|e| (e.version, e.payload["n"].as_u64())).collect::<Vec<_>>(), vec![(1, Some(1)), (2, Some(2))]);
    assert_eq!((job[0].actor.as_str(), job[0].causation_id.as_deref()), ("engine", Some("cmd-1")));
    assert_eq!(store.load_checkpoint("views").await.expect("checkpoint"), 2);
    let r = store.append("job-old", ExpectedVersion::Exact(2), vec![event(4)]).await.expect("append after the old log");
    assert_eq!((r.first_version, r.last_position), (3, 4));
    store.append("job-old", ExpectedVersion::Exact(1), vec![event(5)]).await.expect_err("old versions still conflict");
    // A second process connecting does not move anything twice.
    let again = MongoStore::connect(&uri, &name).await.expect("connect again");
    assert_eq!(again.read_all(1, 100).await.expect("read").len(), 4);
}
