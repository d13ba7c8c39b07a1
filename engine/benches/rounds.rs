//! Engine overhead per round: a two-tier job whose N trainers and one
//! aggregator are simulated workers (no training: each command is answered at
//! once) connected to a real NATS server, with the engine's events in SQLite
//! (embedded) or MongoDB. Prints the median milliseconds per round (from
//! `RoundStarted` to `RoundAggregated`) and the events/s the engine recorded.
//! Each size runs twice: workers with a command consumer each and reports one
//! by one, then grouped by 500 as `flame-worker --virtual` runs them
//! (commands in batches on the group's subject, reports in batches).
//! Run: `scripts/bench.sh rounds` (needs FLAME_TEST_NATS_URL; MongoDB is
//! measured too when FLAME_TEST_MONGO_URI is set).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use flame_engine::definition::{DataSpecEntry, Dataset, Design, JobFile, ModelSpec};
use flame_engine::{JobDefinition, Runner, runner};
use flame_events::job::stream_id;
use flame_events::protocol::{CommandBody, Report, ReportBody, WorkerInfo};
use flame_events::store::EventStore;
use flame_transport::{Nats, Transport};

const ROUNDS: u64 = 10;
/// Simulated workers share NATS connections, this many to a connection.
const PER_CONNECTION: usize = 50;

fn definition(trainers: usize) -> JobDefinition {
    let design = json!({
        "name": "bench",
        "roles": [
            {"name": "trainer", "isDataConsumer": true, "groupAssociation": [{"param": "default"}]},
            {"name": "aggregator", "replica": 1, "groupAssociation": [{"param": "default"}]}
        ],
        "channels": [{"name": "param", "pair": ["trainer", "aggregator"], "groupBy": {"type": "tag", "value": ["default"]},
            "funcTags": {"trainer": ["fetch", "upload"], "aggregator": ["distribute", "aggregate"]}}]
    });
    let refs: Vec<String> = (0..trainers).map(|i| format!("d{i}.json")).collect();
    let datasets = refs.iter().map(|r| (r.clone(), Dataset::new(r.clone(), format!("builtin://digits?part=0&of={trainers}")))).collect();
    JobDefinition {
        folder: "bench".into(),
        job: serde_json::from_value::<JobFile>(json!({"designId": "bench"})).expect("job"),
        design: serde_json::from_value::<Design>(design).expect("design"),
        data_spec: vec![DataSpecEntry {
            role: "trainer".into(),
            dataset_groups: BTreeMap::from([("default".to_string(), refs)]),
            extra: Default::default(),
        }],
        model_spec: serde_json::from_value::<ModelSpec>(json!({"hyperparameters": {"rounds": ROUNDS}})).expect("model"),
        datasets,
        model_file: None,
    }
}

/// Heartbeats that stop with the workers they are for, also when the
/// measurement aborts them: a worker that beats on without answering would
/// be placed again by the next measurement and stall its deployment.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Registers `infos` again every 2 s (64 at a time) until dropped.
fn heartbeat(transport: Arc<Nats>, infos: Vec<WorkerInfo>) -> Heartbeat {
    Heartbeat(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            futures::stream::iter(infos.iter())
                .for_each_concurrent(64, |i| {
                    let t = &transport;
                    async move {
                        let started = Instant::now();
                        if let Err(e) = t.register(i).await {
                            eprintln!("heartbeat of {} failed after {:?}: {e}", i.id, started.elapsed());
                        }
                    }
                })
                .await;
        }
    }))
}

/// A worker that answers every command at once.
async fn simulated(transport: Arc<Nats>, info: WorkerInfo) {
    if let Err(e) = transport.register(&info).await {
        eprintln!("{} cannot register: {e}", info.id);
        return;
    }
    let mut inbox = match transport.command_inbox(&info.id).await {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{} has no inbox: {e}", info.id);
            return;
        }
    };
    let _beat = heartbeat(transport.clone(), vec![info.clone()]);
    while let Some(Ok(d)) = inbox.next().await {
        let report = answer(&info.id, &d.message);
        if transport.send_report(&report).await.is_err() {
            break;
        }
        let _ = d.ack().await;
    }
}

/// Workers of one group, as a process of virtual workers runs them: one
/// command consumer for the group (commands come in batches on its subject)
/// and reports batched on the group's subject.
async fn simulated_group(transport: Arc<Nats>, group: String, infos: Vec<WorkerInfo>) {
    for info in &infos {
        if let Err(e) = transport.register(info).await {
            eprintln!("{} cannot register: {e}", info.id);
            return;
        }
    }
    let ids: Vec<String> = infos.iter().map(|i| i.id.clone()).collect();
    let mut inbox = match transport.group_inbox(&group, &ids).await {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{group} has no inbox: {e}");
            return;
        }
    };
    let _beat = heartbeat(transport.clone(), infos.clone());
    let reports: Arc<dyn Transport> = Arc::new(flame_transport::group::GroupReports::new(transport.clone(), group.clone()));
    let mut answering = tokio::task::JoinSet::new();
    while let Some(Ok(d)) = inbox.next().await {
        let reports = reports.clone();
        answering.spawn(async move {
            let (id, c) = &d.message;
            let report = answer(id, c);
            if reports.send_report(&report).await.is_ok() {
                let _ = d.ack().await;
            }
        });
        while answering.try_join_next().is_some() {}
    }
}

/// The report a simulated worker sends at once for a command.
fn answer(worker_id: &str, c: &flame_events::protocol::Command) -> Report {
    {
        let body = match &c.body {
            CommandBody::Deploy { .. } => ReportBody::Deployed { samples: None },
            CommandBody::InitModel { .. } => ReportBody::Initialized { digest: "m0".into() },
            CommandBody::Train { .. } => ReportBody::Trained {
                digest: format!("u-{}-{}", worker_id, c.round),
                samples: 100,
                metrics: Default::default(),
                state: None,
            },
            CommandBody::Coordinate { candidates, .. } => ReportBody::Coordinated {
                pairing: candidates.iter().filter_map(|(t, o)| o.first().map(|a| (t.clone(), a.clone()))).collect(),
            },
            CommandBody::Evaluate { .. } => ReportBody::Evaluated { metrics: Default::default() },
            CommandBody::Unreadable { reason } => ReportBody::Failed { error: reason.clone() },
            CommandBody::Aggregate { .. } => ReportBody::Aggregated {
                digest: format!("m{}", c.round),
                metrics: Default::default(),
                optimizer_state: None,
                excluded: vec![],
            },
        };
        Report::answering(c, worker_id, body)
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Trainers in one group when grouped (as `flame-worker --virtual` groups them).
const GROUP: usize = 500;

async fn measure(label: &str, store: Arc<dyn EventStore>, nats_url: &str, trainers: usize, grouped: bool) {
    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
    let mut connections = Vec::new();
    for _ in 0..=(trainers / PER_CONNECTION) {
        connections.push(Arc::new(Nats::connect(nats_url).await.expect("NATS")));
    }
    let mut workers = Vec::new();
    let mut groups: Vec<(String, Vec<WorkerInfo>)> = Vec::new();
    for i in 0..=trainers {
        let roles = if i == 0 { vec!["aggregator".to_string()] } else { vec!["trainer".to_string()] };
        let mut info = WorkerInfo { id: format!("sim-{run}-{i:04}"), roles, realm: "default".into(), device: "cpu".into(), group: None };
        if grouped && i > 0 {
            let group = format!("sim-{run}-g{}", (i - 1) / GROUP);
            info.group = Some(group.clone());
            match groups.last_mut() {
                Some((g, members)) if *g == group => members.push(info),
                _ => groups.push((group, vec![info])),
            }
        } else {
            workers.push(tokio::spawn(simulated(connections[i / PER_CONNECTION].clone(), info)));
        }
    }
    for (g, (group, members)) in groups.into_iter().enumerate() {
        workers.push(tokio::spawn(simulated_group(connections[g % connections.len()].clone(), group, members)));
    }
    let label = format!("{label}{}", if grouped { " grouped" } else { "" });
    let engine = Arc::new(Nats::connect(nats_url).await.expect("NATS"));
    let runner = Runner::new(store.clone(), engine, runner::Options::default());
    let def = definition(trainers);
    let started = Instant::now();
    let bench = flame_events::Actor::user("bench");
    let id = runner.submit(&def, &bench).await.expect("submit");
    runner.start(&id, &bench).await.expect("start");
    let job = runner.run(&id).await.expect("run");
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(job.rounds_completed as u64, ROUNDS, "{:?}", job.failure);
    let events = store.read_stream(&stream_id(&id), 1).await.expect("read");
    let at = |t: &str, r: u64| {
        events.iter().find(|e| e.event_type == t && e.payload["round"].as_u64() == Some(r)).map(|e| e.recorded_at).expect("event")
    };
    let per_round: Vec<f64> =
        (1..=ROUNDS).map(|r| (at("RoundAggregated", r) - at("RoundStarted", r)).num_microseconds().unwrap_or(0) as f64 / 1e3).collect();
    let ms = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3;
    let phases: Vec<(f64, f64, f64)> = (1..=ROUNDS)
        .map(|r| {
            let updates: Vec<_> =
                events.iter().filter(|e| e.event_type == "UpdateReported" && e.payload["round"].as_u64() == Some(r)).collect();
            let start = at("RoundStarted", r);
            let (first, last) = (updates.first().expect("update").recorded_at, updates.last().expect("update").recorded_at);
            (ms(start, first), ms(start, last), ms(last, at("RoundAggregated", r)))
        })
        .collect();
    let mid = |f: fn(&(f64, f64, f64)) -> f64| median(phases.iter().map(f).collect());
    println!(
        "         phases (median ms from RoundStarted): first update {:.1}, last update {:.1}; last update -> aggregated {:.1}",
        mid(|p| p.0),
        mid(|p| p.1),
        mid(|p| p.2)
    );
    let rounds_span = (at("RoundAggregated", ROUNDS) - at("RoundStarted", 1)).num_microseconds().unwrap_or(1) as f64 / 1e6;
    let round_events = events.iter().filter(|e| e.payload["round"].as_u64().is_some_and(|r| r >= 1)).count();
    println!(
        "{label:<15} {trainers:>5} trainers: {:>8.1} ms/round median (min {:.1}, max {:.1}), {:>7.0} events/s in rounds, {} events, {:.1} s to place+deploy+run",
        median(per_round.clone()),
        per_round.iter().copied().fold(f64::INFINITY, f64::min),
        per_round.iter().copied().fold(0.0, f64::max),
        round_events as f64 / rounds_span,
        events.len(),
        wall
    );
    for w in workers {
        w.abort();
    }
    // Let the stopped workers' registrations expire before the next measurement places tasks.
    tokio::time::sleep(flame_transport::WORKER_TTL + Duration::from_secs(1)).await;
}

#[tokio::main]
async fn main() {
    let Ok(nats) = std::env::var("FLAME_TEST_NATS_URL") else {
        eprintln!("FLAME_TEST_NATS_URL is unset: run scripts/bench.sh rounds");
        return;
    };
    let sizes: Vec<usize> = std::env::var("FLAME_BENCH_WORKERS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000]);
    let dir = tempfile::tempdir().expect("tempdir");
    println!("{ROUNDS} rounds each; workers answer at once; NATS JetStream for commands and reports");
    for &n in &sizes {
        let store =
            flame_stores::open_store(&format!("sqlite:{}", dir.path().join(format!("events-{n}.db")).display())).await.expect("sqlite");
        measure("sqlite", store, &nats, n, false).await;
        let store = flame_stores::open_store(&format!("sqlite:{}", dir.path().join(format!("events-{n}-grouped.db")).display()))
            .await
            .expect("sqlite");
        measure("sqlite", store, &nats, n, true).await;
    }
    if let Ok(mongo) = std::env::var("FLAME_TEST_MONGO_URI") {
        let db = format!("flame_bench_{}", uuid::Uuid::now_v7().simple());
        let store: Arc<dyn EventStore> = Arc::new(flame_stores::mongo::MongoStore::connect(&mongo, &db).await.expect("mongo"));
        measure("mongodb", store, &nats, sizes[0], false).await;
    }
}
