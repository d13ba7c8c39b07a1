//! How long the MongoDB event store stalls after a writer is SIGKILLed in the
//! middle of its appends, printed as figures (not a test).
//!
//! `scripts/bench.sh kill` runs it against the MongoDB-wire server the
//! services script starts (`FLAME_TEST_MONGO_URI`). Each trial starts a writer
//! process (this binary with `--writer`) that appends batches of 10 events to
//! its own stream back to back, lets it run for a random time, SIGKILLs it,
//! and then measures from the kill:
//!
//! - **write**: until an append by another writer (a fresh stream, as a
//!   restarted engine's first write) succeeds;
//! - **read**: until the global log, read forward from the position read
//!   before the kill, delivers that append (what the relay and projections
//!   wait for).
//!
//! `FLAME_BENCH_KILLS` sets the number of trials (default 10).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use flame_events::{EventStore, ExpectedVersion, NewEvent};
use flame_stores::mongo::MongoStore;

fn batch(n: usize, round: u64) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            NewEvent::new(
                "UpdateReported",
                json!({"round": round, "task_id": format!("trainer-{i}"), "digest": "ab".repeat(32)}),
                "worker:w",
            )
        })
        .collect()
}

/// The writer process: appends to `stream` forever, each append expecting the last version.
async fn writer(uri: &str, db: &str, stream: &str) {
    let store = MongoStore::connect(uri, db).await.expect("mongo");
    let mut version = store.read_stream(stream, 1).await.expect("read").len() as u64;
    for round in 0.. {
        let r = store.append(stream, ExpectedVersion::Exact(version), batch(10, round)).await.expect("append");
        version = r.last_version;
    }
}

fn spawn_writer(uri: &str, db: &str, stream: &str) -> Child {
    Command::new(std::env::current_exe().expect("exe"))
        .args(["--writer", uri, db, stream])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn writer")
}

/// A small deterministic generator for the kill times (no extra dependency).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--writer") {
        writer(&args[i + 1], &args[i + 2], &args[i + 3]).await;
        return;
    }
    let Ok(uri) = std::env::var("FLAME_TEST_MONGO_URI") else {
        eprintln!("FLAME_TEST_MONGO_URI is unset: run through scripts/bench.sh kill");
        return;
    };
    let kills: usize = std::env::var("FLAME_BENCH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(10);
    let db = format!("flame_kill_{}", std::process::id());
    let store = MongoStore::connect(&uri, &db).await.expect("mongo");
    let mut rng = Lcg(17);
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    println!("trial  writer ran  write stall  read stall");
    for k in 0..kills {
        let stream = format!("kill-writer-{k}");
        let mut child = spawn_writer(&uri, &db, &stream);
        // Let it get going (connected, a few appends stored), then a random extra while.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.read_stream(&stream, 1).await.expect("read").len() < 30 {
            assert!(Instant::now() < deadline, "the writer stored nothing in 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ran = 50 + rng.below(400);
        tokio::time::sleep(Duration::from_millis(ran)).await;
        let from = store.read_all(1, usize::MAX >> 1).await.expect("read all").last().map_or(1, |e| e.position + 1);
        child.kill().expect("SIGKILL");
        let killed = Instant::now();
        child.wait().expect("reap");
        let after = format!("kill-after-{k}");
        let appended = store.append(&after, ExpectedVersion::NoStream, batch(1, 0)).await.expect("append after the kill");
        let write = killed.elapsed().as_secs_f64();
        let mut next = from;
        'read: loop {
            for e in store.read_all(next, 1000).await.expect("read all") {
                next = e.position + 1;
                if e.position == appended.last_position {
                    break 'read;
                }
            }
            assert!(killed.elapsed() < Duration::from_secs(300), "the global log never delivered the append after the kill");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let read = killed.elapsed().as_secs_f64();
        println!("{k:>5}  {ran:>7} ms  {write:>9.3} s  {read:>8.3} s");
        writes.push(write);
        reads.push(read);
    }
    let max = |xs: &[f64]| xs.iter().copied().fold(0.0, f64::max);
    println!(
        "{kills} kills: write stall median {:.3} s, max {:.3} s; read stall median {:.3} s, max {:.3} s",
        median(writes.clone()),
        max(&writes),
        median(reads.clone()),
        max(&reads)
    );
}
