//! Event store throughput, printed as figures (not a test).
//!
//! `scripts/bench.sh store` runs it against SQLite and the MongoDB-wire server
//! the services script starts (`FLAME_TEST_MONGO_URI`). For each backend:
//! events/s when appending 1, 10 and 100 events per append, the raw driver's
//! `insert_many` rate on the same server for the same documents, and the
//! global-log read rate.

use std::sync::Arc;
use std::time::Instant;

use mongodb::bson::doc;
use serde_json::json;

use flame_events::{EventStore, ExpectedVersion, NewEvent};
use flame_stores::mongo::MongoStore;
use flame_stores::sqlite::SqliteStore;

const EVENTS: usize = 2000;

fn batch(n: usize, round: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent::new("UpdateReported", json!({"round": round, "task_id": format!("trainer-{i}"), "digest": "ab".repeat(32), "samples": 479, "metrics": {"loss": 0.25}}), "worker:w").correlated("bench"))
        .collect()
}

/// Appends `EVENTS` events, `per` at a time, to a few streams, each append
/// expecting the stream's last version as the engine does; returns events/s.
async fn append_rate(store: &dyn EventStore, per: usize, tag: &str) -> f64 {
    let appends = (EVENTS / per).max(1);
    let mut heads = [0u64; 8];
    let started = Instant::now();
    for a in 0..appends {
        let head = &mut heads[a % 8];
        let expected = if *head == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(*head) };
        *head = store.append(&format!("bench-{tag}-{per}-{}", a % 8), expected, batch(per, a)).await.expect("append").last_version;
    }
    (appends * per) as f64 / started.elapsed().as_secs_f64()
}

async fn read_rate(store: &dyn EventStore) -> (usize, f64) {
    let started = Instant::now();
    let (mut from, mut n) = (1, 0);
    loop {
        let page = store.read_all(from, 1000).await.expect("read");
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        n += page.len();
    }
    (n, n as f64 / started.elapsed().as_secs_f64())
}

async fn raw_insert_many_rate(uri: &str, db: &str, per: usize, run: usize) -> f64 {
    let client = mongodb::Client::with_uri_str(uri).await.expect("mongo");
    let coll = client.database(db).collection::<mongodb::bson::Document>("raw");
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"stream": 1, "version": 1})
            .options(mongodb::options::IndexOptions::builder().unique(true).build())
            .build(),
    )
    .await
    .expect("index");
    let appends = (EVENTS / per).max(1);
    let started = Instant::now();
    for a in 0..appends {
        let docs: Vec<_> = batch(per, a)
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                doc! {"_id": e.event_id.to_string(), "stream": format!("raw-{run}-{per}-{a}"), "version": i as i64 + 1, "position": (a * per + i) as i64, "type": e.event_type,
                "schema_version": 1i64, "payload": mongodb::bson::to_bson(&e.payload).expect("bson"), "recorded_at": mongodb::bson::DateTime::now(), "actor": e.actor}
            })
            .collect();
        coll.insert_many(docs).await.expect("insert_many");
    }
    (appends * per) as f64 / started.elapsed().as_secs_f64()
}

const REPEATS: usize = 5;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = SqliteStore::open(dir.path().join("bench.db").to_str().expect("utf8")).expect("sqlite");
    println!("median of {REPEATS} runs of {EVENTS} events each");
    println!("backend   per-append  events/s");
    for per in [1, 10, 100] {
        let mut runs = Vec::new();
        for r in 0..REPEATS {
            runs.push(append_rate(&sqlite, per, &format!("s{r}")).await);
        }
        println!("sqlite    {per:>10}  {:>8.0}", median(runs));
    }
    let (n, _) = read_rate(&sqlite).await;
    let mut runs = Vec::new();
    for _ in 0..REPEATS {
        runs.push(read_rate(&sqlite).await.1);
    }
    println!("sqlite    read_all    {:>8.0}  ({n} events)", median(runs));

    let Ok(uri) = std::env::var("FLAME_TEST_MONGO_URI") else {
        eprintln!("FLAME_TEST_MONGO_URI is unset: skipping MongoDB (run through scripts/bench.sh)");
        return;
    };
    let db = format!("flame_bench_{}", std::process::id());
    let mongo: Arc<dyn EventStore> = Arc::new(MongoStore::connect(&uri, &db).await.expect("mongo"));
    for per in [1, 10, 100] {
        let (mut ours, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved, so both see the same server state (collection sizes grow).
        for r in 0..REPEATS {
            let o = append_rate(mongo.as_ref(), per, &format!("m{r}")).await;
            let w = raw_insert_many_rate(&uri, &db, per, r).await;
            ours.push(o);
            raw.push(w);
            ratios.push(o / w);
        }
        println!("mongodb   {per:>10}  {:>8.0}  raw insert_many {:>8.0}/s  ratio {:.2}", median(ours), median(raw), median(ratios));
    }
    let (n, _) = read_rate(mongo.as_ref()).await;
    let mut runs = Vec::new();
    for _ in 0..REPEATS {
        runs.push(read_rate(mongo.as_ref()).await.1);
    }
    println!("mongodb   read_all    {:>8.0}  ({n} events)", median(runs));
}
