//! Fold rate of a 1,000,000-event history into every job read model.
//!
//! The history: jobs of 10 trainers and 1 aggregator, ~1,000 events each
//! (placement, deployment, 76 rounds of 10 updates, completion), 10 running
//! at a time and interleaved round by round as concurrent jobs are in a real
//! log. Measured: (1) in memory, `Projector::apply` over the envelopes;
//! (2) the embedded store, `ViewWriter::catch_up` reading the SQLite log and
//! committing views + checkpoint per batch of 5,000 events.
//!
//! `cargo bench -p flame-projections --bench fold` (FOLD_EVENTS to change the size).

use std::time::Instant;

use chrono::{DateTime, Utc};

use flame_events::job::{JobEvent, Metrics, RunSpec, TaskSpec};
use flame_events::store::{EventStore, ExpectedVersion};
use flame_events::{Envelope, NewEvent};
use flame_projections::store::{ReadModels, SqliteViews};
use flame_projections::{Projector, ViewWriter};
use flame_stores::sqlite::SqliteStore;

// The allocator flamectl and flame-engine use too: folding is allocation-bound.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TRAINERS: usize = 10;
const ROUNDS: u32 = 76;
const ACTIVE: usize = 10;

/// Events appended together, with their actors.
type Chunk = Vec<(JobEvent, String)>;

fn digest(i: u64) -> String {
    format!("{i:064x}")
}

/// One job's events, in chunks that are appended together (setup, each round, the end).
fn job(j: usize) -> Vec<Chunk> {
    let id = format!("job{j}");
    let engine = "engine".to_string();
    let tasks: Vec<TaskSpec> = (0..=TRAINERS)
        .map(|t| TaskSpec {
            task_id: if t < TRAINERS { format!("trainer-{t}") } else { "aggregator-0".into() },
            role: if t < TRAINERS { "trainer".into() } else { "aggregator".into() },
            is_data_consumer: t < TRAINERS,
            group_association: Default::default(),
            channels: vec!["param-channel".into()],
            dataset: (t < TRAINERS).then(|| format!("builtin://digits?part={t}&of={TRAINERS}")),
            realm: Some("default".into()),
            colocate: None,
        })
        .collect();
    let spec = RunSpec {
        rounds: ROUNDS,
        model: flame_events::model::Model::default(),
        hyperparameters: serde_json::json!({"epochs": 1, "batchSize": 32, "learningRate": 0.1}),
        seed: j as u64,
        ..RunSpec::default()
    };
    let mut setup = vec![(
        JobEvent::JobCreated { job_id: id.clone(), name: "bench".into(), source: "bench".into(), spec, tasks: tasks.clone() },
        "user:bench".to_string(),
    )];
    setup.push((JobEvent::JobStarting {}, "user:bench".into()));
    for t in &tasks {
        setup.push((
            JobEvent::TaskAssigned { task_id: t.task_id.clone(), worker_id: format!("w-{}-{}", j % 50, t.task_id) },
            engine.clone(),
        ));
    }
    setup.push((JobEvent::JobDeploying {}, engine.clone()));
    for t in &tasks {
        let w = format!("w-{}-{}", j % 50, t.task_id);
        setup.push((JobEvent::TaskDeployed { task_id: t.task_id.clone(), worker_id: w.clone(), samples: None }, format!("worker:{w}")));
    }
    setup.push((JobEvent::JobStarted {}, engine.clone()));
    let agg = format!("w-{}-aggregator-0", j % 50);
    setup.push((JobEvent::ModelInitialized { digest: digest(0), worker_id: agg.clone() }, format!("worker:{agg}")));
    let mut chunks = vec![setup];
    let mut model = digest(0);
    for r in 1..=ROUNDS {
        let mut c = vec![
            (JobEvent::RoundStarted { round: r, global_model: model.clone(), selected: vec![] }, engine.clone()),
            (JobEvent::TimerSet { timer: format!("round-{r}"), due_at_ms: 1_800_000_000_000 + u64::from(r) }, engine.clone()),
        ];
        let mut inputs = Vec::new();
        for t in 0..TRAINERS {
            let w = format!("w-{}-trainer-{t}", j % 50);
            let d = digest(u64::from(r) * 1000 + t as u64);
            inputs.push(d.clone());
            c.push((
                JobEvent::UpdateReported {
                    round: r,
                    task_id: format!("trainer-{t}"),
                    worker_id: w.clone(),
                    digest: d,
                    samples: 100 + t as u64,
                    metrics: Metrics::from([("loss".into(), 0.5), ("train_accuracy".into(), 0.9)]),
                    staleness: 0,
                    client_state: None,
                },
                format!("worker:{w}"),
            ));
        }
        model = digest(u64::from(r) * 1000 + 999);
        c.push((
            JobEvent::RoundAggregated {
                round: r,
                digest: model.clone(),
                inputs,
                metrics: Metrics::from([("accuracy".into(), 0.9), ("loss".into(), 0.3)]),
                optimizer_state: None,
            },
            format!("worker:{agg}"),
        ));
        chunks.push(c);
    }
    chunks.push(vec![(JobEvent::JobCompleted { rounds_completed: ROUNDS, final_model: model, metrics: Metrics::new() }, engine)]);
    chunks
}

/// The whole log as (job, chunk) in global order: `ACTIVE` jobs at a time, round-robin.
fn history(target: usize) -> Vec<(String, Chunk)> {
    let mut out = Vec::new();
    let mut total = 0;
    let mut next_job = 0;
    let mut running: Vec<(String, std::collections::VecDeque<Chunk>)> = Vec::new();
    while total < target {
        while running.len() < ACTIVE {
            running.push((format!("job{next_job}"), job(next_job).into()));
            next_job += 1;
        }
        for (id, chunks) in &mut running {
            if let Some(c) = chunks.pop_front() {
                total += c.len();
                out.push((id.clone(), c));
            }
        }
        running.retain(|(_, c)| !c.is_empty());
    }
    out
}

fn envelopes(log: &[(String, Chunk)]) -> Vec<Envelope> {
    let mut versions: std::collections::HashMap<&str, u64> = Default::default();
    let t0: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let mut out = Vec::new();
    for (job, chunk) in log {
        for (e, actor) in chunk {
            let v = versions.entry(job).or_default();
            *v += 1;
            let n = e.to_new_event(job, actor);
            let position = out.len() as u64 + 1;
            out.push(Envelope {
                event_id: n.event_id,
                stream_id: format!("job-{job}"),
                version: *v,
                position,
                event_type: n.event_type,
                schema_version: 1,
                payload: n.payload,
                recorded_at: t0 + chrono::Duration::milliseconds(position as i64),
                causation_id: Some(format!("{job}/cmd-{v}")),
                correlation_id: Some(job.clone()),
                actor: n.actor,
            });
        }
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let target: usize = std::env::var("FOLD_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let log = history(target);
    let events = envelopes(&log);
    let n = events.len();
    let jobs = log.iter().map(|(j, _)| j).collect::<std::collections::BTreeSet<_>>().len();
    println!("history: {n} events, {jobs} jobs ({TRAINERS} trainers, {ROUNDS} rounds each, {ACTIVE} interleaved)");

    // (1) In memory: three runs, median.
    let mut rates = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut p = Projector::default();
        for e in &events {
            p.apply(e);
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(p.views().len(), jobs);
        rates.push(n as f64 / secs);
    }
    println!(
        "in memory, 1 thread:  median {:>9.0} events/s over 3 runs (min {:.0}, max {:.0})",
        median(rates.clone()),
        rates.iter().copied().fold(f64::MAX, f64::min),
        rates.iter().copied().fold(0.0, f64::max)
    );

    // (1b) In memory, jobs folded in parallel, in batches of 5,000 events as the runner does.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut p = Projector::default();
        for batch in events.chunks(5000) {
            p.apply_batch(batch, threads);
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(p.views().len(), jobs);
        rates.push(n as f64 / secs);
    }
    println!(
        "in memory, {threads} threads: median {:>9.0} events/s over 3 runs (min {:.0}, max {:.0})",
        median(rates.clone()),
        rates.iter().copied().fold(f64::MAX, f64::min),
        rates.iter().copied().fold(0.0, f64::max)
    );

    if std::env::var_os("FOLD_MEMORY_ONLY").is_some() {
        return Ok(());
    }

    // (2) Embedded store: write the log, then fold it from the SQLite file into views stored beside it.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("events.db");
    let path = path.to_str().unwrap_or_default().to_string();
    let store = SqliteStore::open(&path)?;
    let started = Instant::now();
    let mut versions: std::collections::HashMap<&str, u64> = Default::default();
    for (job, chunk) in &log {
        let v = versions.entry(job).or_default();
        let batch: Vec<NewEvent> = chunk.iter().map(|(e, actor)| e.to_new_event(job, actor)).collect();
        let len = batch.len() as u64;
        store.append(&format!("job-{job}"), ExpectedVersion::Exact(*v), batch).await?;
        *v += len;
    }
    println!("(wrote the SQLite log in {:.1} s)", started.elapsed().as_secs_f64());
    let models = SqliteViews::open(&path)?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        models.reset().await?;
        let started = Instant::now();
        let p = ViewWriter::open(&store, &models, 5000).await?.catch_up().await?;
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(p.events as usize, n);
        rates.push(n as f64 / secs);
        println!("  embedded run: {:.2} s, {} commits", secs, p.commits);
    }
    // Where the embedded time goes: the runner's step, taken apart.
    models.reset().await?;
    let (mut read, mut fold, mut parts_s, mut commit) = (0.0, 0.0, 0.0, 0.0);
    let mut p = Projector::default();
    let mut marks: std::collections::HashMap<String, flame_projections::store::Mark> = Default::default();
    loop {
        let t = Instant::now();
        let batch = store.read_all(p.checkpoint() + 1, 5000).await?;
        read += t.elapsed().as_secs_f64();
        if batch.is_empty() {
            break;
        }
        let t = Instant::now();
        let changed: Vec<String> = p.apply_batch(&batch, threads).into_iter().map(str::to_string).collect();
        fold += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut parts = Vec::new();
        for id in &changed {
            if let Some(view) = p.view_mut(id) {
                let (ps, mark) = flame_projections::store::changed_parts(view, marks.get(id).copied().unwrap_or_default())?;
                parts.extend(ps);
                marks.insert(id.clone(), mark);
            }
        }
        parts_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        models.commit(parts, p.checkpoint()).await?;
        commit += t.elapsed().as_secs_f64();
    }
    println!("  one run taken apart: read {read:.2} s, fold {fold:.2} s, serialize changed parts {parts_s:.2} s, commit {commit:.2} s");
    println!(
        "embedded store: median {:>9.0} events/s over 3 runs (read + fold + store views and checkpoint per 5,000 events)",
        median(rates)
    );
    let bytes: usize = models.load_all().await?.iter().map(|s| s.json.len()).sum();
    println!("stored views: {jobs} jobs, {:.1} MB of JSON", bytes as f64 / 1e6);
    Ok(())
}
