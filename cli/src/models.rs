//! `flamectl verify --models`: every global model (and every group model of a
//! hierarchy) derived again from what the log recorded, compared bit for bit.
//!
//! The log names each aggregation's inputs: the global model it started from,
//! the trainers' update blobs with their samples (and, for FedBuff, the model
//! each trained from; for SCAFFOLD and FedDyn, each trainer's state), the
//! optimizer with its settings and its state from the round before. The
//! command the engine sent is built again from the job's state just before
//! the aggregator's report ([`flame_engine::rederive`]) and run by the same
//! aggregation code the workers run, against a store that keeps its writes in
//! memory. Trainers are not run again: their updates are the logged blobs.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;

use flame_engine::rederive::{self, Aggregation};
use flame_events::algorithm::ServerOptimizer;
use flame_events::job::JobEvent;
use flame_events::model::Model;
use flame_events::protocol::{Command, CommandBody, ReportBody, WorkerInfo};
use flame_transport::InProcess;
use flame_workers::Worker;
use flame_workers::blob::{BlobStore, Error as BlobError, Overlay};
use flame_workers::weights;

use crate::Output;
use crate::export::Blobs;
use crate::inspect::{Events, Source};

macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

/// A job's events with their stream versions, decoded (old payloads upcast).
pub async fn job_events(job_id: &str, source: &Source) -> anyhow::Result<Vec<(u64, JobEvent)>> {
    let events = Events::open(source).await?.read(job_id, 1).await?;
    if events.is_empty() {
        bail!("no job '{job_id}' in {}", source.api.clone().unwrap_or_else(|| source.store.clone()));
    }
    events
        .iter()
        .map(|e| Ok((e.version, JobEvent::from_envelope(e).with_context(|| format!("job '{job_id}', event v{}", e.version))?)))
        .collect()
}

/// A job's events and the aggregations they record, with the command of each.
async fn job_aggregations(job_id: &str, source: &Source) -> anyhow::Result<(Vec<(u64, JobEvent)>, Vec<Aggregation>)> {
    let events = job_events(job_id, source).await?;
    let aggs = rederive::aggregations(events.iter().map(|(v, e)| (*v, e))).map_err(|u| {
        anyhow::anyhow!(
            "job '{job_id}': the aggregate of '{}' in round {} (v{}) cannot be re-derived: {}",
            u.task_id,
            u.round,
            u.version,
            u.reason
        )
    })?;
    Ok((events, aggs))
}

/// The folders held-out data may be read from: those given, or the current one.
fn data_roots(given: &[std::path::PathBuf]) -> anyhow::Result<flame_workers::roots::DataRoots> {
    let dirs = if given.is_empty() { vec![std::env::current_dir()?] } else { given.to_vec() };
    flame_workers::roots::DataRoots::new(&dirs).map_err(anyhow::Error::msg)
}

/// Runs aggregate commands again with the workers' own code, reading the
/// job's blobs and keeping what it writes in memory.
pub struct Rerun {
    store: Arc<dyn BlobStore>,
    overlay: Arc<Overlay>,
    worker: Worker,
}

impl Rerun {
    /// Over the job's blob store; `roots` lets it read evaluation data.
    pub fn new(store: Arc<dyn BlobStore>, roots: Option<flame_workers::roots::DataRoots>) -> Self {
        let overlay = Arc::new(Overlay::new(store.clone()));
        let info = WorkerInfo { id: "flamectl".into(), roles: vec!["aggregator".into()], realm: String::new(), device: "cpu".into() };
        let mut worker = Worker::new(info, Arc::new(InProcess::default()), overlay.clone());
        if let Some(roots) = roots {
            worker = worker.with_data_roots(roots);
        }
        Self { store, overlay, worker }
    }

    /// Which of the blobs `needs` (what, digest) the job's store does not hold
    /// as they were recorded: missing, or bytes that do not match the digest.
    pub async fn unavailable(&self, needs: &[(String, String)]) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for (what, digest) in needs {
            if self.overlay.wrote(digest) {
                continue;
            }
            match self.store.get(digest).await {
                Ok(_) => {}
                Err(BlobError::NotFound(_)) => out.push(format!("{what} ({digest}) is missing from the blob store")),
                Err(BlobError::Corrupt { .. }) => out.push(format!("{what} ({digest}): the stored bytes do not match the digest")),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {what} ({digest})"))),
            }
        }
        Ok(out)
    }

    /// Runs one aggregate command: the result's digest, the optimizer state's, the metrics.
    pub async fn aggregate(&self, command: &Command) -> Result<Rerun1, String> {
        match self.worker.execute(command).await.body {
            ReportBody::Aggregated { digest, optimizer_state, excluded, metrics } => {
                if let Some(x) = excluded.first() {
                    return Err(format!("the aggregation left out the update of task '{}': {}", x.task_id, x.reason));
                }
                Ok(Rerun1 { digest, optimizer_state, metrics })
            }
            ReportBody::Failed { error } => Err(error),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// A model evaluated on the held-out split of top aggregation `a`'s
    /// command: the FedAvg of that model alone, which is the model itself.
    pub async fn evaluate(&self, a: &Aggregation, model: &str, tag: &str) -> anyhow::Result<flame_events::job::Metrics> {
        let mut command = rerun_command(a, true, tag);
        if let CommandBody::Aggregate { optimizer, optimizer_state, global_model, updates, .. } = &mut command.body {
            let mut only = updates.first().cloned().context("an aggregation without updates")?;
            (only.digest, only.samples, only.base_model, only.staleness, only.client_state) = (model.to_string(), 1, None, 0, None);
            *updates = vec![only];
            (*optimizer, *optimizer_state, *global_model) = (ServerOptimizer::FedAvg, None, model.to_string());
        }
        command.id = format!("{tag}/evaluate/{model}");
        let out = self.aggregate(&command).await.map_err(|e| anyhow::anyhow!("evaluating model {model}: {e}"))?;
        if out.digest != model {
            bail!("evaluating model {model}: the FedAvg of it alone is {}, not itself", out.digest);
        }
        Ok(out.metrics)
    }

    /// A model blob, from the overlay or the store.
    pub async fn state(&self, digest: &str) -> anyhow::Result<weights::State> {
        let bytes = self.overlay.get(digest).await.with_context(|| format!("reading model {digest}"))?;
        Ok(weights::decode_state(&bytes)?)
    }
}

/// What one aggregation made when run again.
pub struct Rerun1 {
    /// The model's digest.
    pub digest: String,
    /// The optimizer state's digest.
    pub optimizer_state: Option<String>,
    /// Its evaluation (when the command asked for one).
    pub metrics: flame_events::job::Metrics,
}

/// The blobs an aggregation reads, with what each is, in words.
pub fn needs(a: &Aggregation) -> Vec<(String, String)> {
    let CommandBody::Aggregate { model, optimizer, optimizer_state, global_model, .. } = &a.command.body else { return Vec::new() };
    let mut out = vec![(format!("the global model round {} started from", a.round), global_model.clone())];
    if let Model::TorchScript { file, sha256, .. } = model {
        out.push((format!("the job's model file {file}"), sha256.clone()));
    }
    if let Some(s) = optimizer_state {
        out.push((format!("the optimizer state after round {}", a.round - 1), s.clone()));
    }
    for u in a.used() {
        let by = a.workers.get(&u.task_id).map(|w| format!(" (worker {w})")).unwrap_or_default();
        out.push((format!("round {}'s update of task '{}'{by}", a.round, u.task_id), u.digest.clone()));
        if let Some(b) = &u.base_model {
            out.push((format!("the model task '{}' trained from", u.task_id), b.clone()));
        }
        if let Some(s) = u.client_state.as_ref().filter(|_| optimizer.keeps_client_state()) {
            out.push((format!("task '{}''s state after its update", u.task_id), s.clone()));
        }
    }
    out
}

/// The command to run again: the used updates only (the recorded exclusions
/// stand), no evaluation unless asked, an id of its own.
pub fn rerun_command(a: &Aggregation, evaluate: bool, tag: &str) -> Command {
    let mut c = a.command.clone();
    let used: Vec<_> = a.used().into_iter().cloned().collect();
    if let CommandBody::Aggregate { updates, eval_dataset, .. } = &mut c.body {
        *updates = used;
        if !evaluate {
            *eval_dataset = None;
        }
    }
    c.id = format!("{tag}/{}", c.id);
    c
}

/// One aggregation's check.
#[derive(Serialize)]
struct Checked {
    round: u32,
    aggregator: String,
    /// `round` (a global model) or `group` (a middle aggregator's).
    kind: &'static str,
    version: u64,
    inputs: usize,
    excluded: usize,
    recorded: String,
    rederived: Option<String>,
    ok: bool,
    problems: Vec<String>,
    /// What went in: task, worker (trainers' updates) and digest.
    input_blobs: Vec<serde_json::Value>,
}

/// `flamectl verify JOB --models`.
pub async fn verify(job_id: &str, source: &Source, blobs: &Blobs, output: Output) -> anyhow::Result<ExitCode> {
    let (events, aggs) = job_aggregations(job_id, source).await?;
    let rerun = Rerun::new(blobs.open().await?, None);
    let mut checked = Vec::new();
    for a in &aggs {
        let mut problems = rerun.unavailable(&needs(a)).await?;
        let mut rederived = None;
        if problems.is_empty() {
            match rerun.aggregate(&rerun_command(a, false, "verify")).await {
                Ok(out) => {
                    if out.digest != a.digest {
                        let why = match (rerun.state(&a.digest).await, rerun.state(&out.digest).await) {
                            (Ok(recorded), Ok(again)) => weights::first_difference(&recorded, &again).map_or_else(
                                || "the same tensors, written differently".to_string(),
                                |d| format!("first difference: {d} (recorded against re-derived)"),
                            ),
                            (Err(e), _) => format!("the recorded model cannot be read to compare: {e:#}"),
                            (_, Err(e)) => format!("{e:#}"),
                        };
                        problems.push(format!("the re-derived model differs from the recorded one; {why}"));
                    }
                    if a.top && a.optimizer_state.is_some() && out.optimizer_state != a.optimizer_state {
                        problems.push(format!(
                            "the optimizer state differs: recorded {}, re-derived {}",
                            a.optimizer_state.as_deref().unwrap_or("none"),
                            out.optimizer_state.as_deref().unwrap_or("none")
                        ));
                    }
                    rederived = Some(out.digest);
                }
                Err(e) => problems.push(format!("the aggregation could not run again: {e}")),
            }
        }
        checked.push(Checked {
            round: a.round,
            aggregator: a.task_id.clone(),
            kind: if a.top { "round" } else { "group" },
            version: a.version,
            inputs: a.used().len(),
            excluded: a.excluded.len(),
            recorded: a.digest.clone(),
            ok: problems.is_empty(),
            rederived,
            problems,
            input_blobs: a
                .used()
                .iter()
                .map(|u| serde_json::json!({"task": u.task_id, "worker": a.workers.get(&u.task_id), "digest": u.digest}))
                .collect(),
        });
    }
    // The final model is the last round's.
    let mut end_problems = Vec::new();
    if let Some((v, JobEvent::JobCompleted { final_model, .. })) =
        events.iter().rev().find(|(_, e)| matches!(e, JobEvent::JobCompleted { .. }))
    {
        let last = aggs.iter().rev().find(|a| a.top).map(|a| a.digest.as_str());
        if last != Some(final_model.as_str()) {
            end_problems.push(format!(
                "JobCompleted (v{v}) names the final model {final_model}, but the last round made {}",
                last.unwrap_or("none")
            ));
        }
    }
    let failed = checked.iter().filter(|c| !c.ok).count();
    match output {
        Output::Json => {
            for c in &checked {
                outln!("{}", serde_json::to_string(c)?)?;
            }
        }
        Output::Table => {
            outln!(
                "{:>5}  {:<20} {:>6} {:>8}  {:<14} {:<14} result",
                "round",
                "aggregator",
                "inputs",
                "excluded",
                "recorded",
                "re-derived"
            )?;
            for c in &checked {
                let short = |d: &str| d.chars().take(12).collect::<String>();
                outln!(
                    "{:>5}  {:<20} {:>6} {:>8}  {:<14} {:<14} {}",
                    c.round,
                    c.aggregator,
                    c.inputs,
                    c.excluded,
                    short(&c.recorded),
                    c.rederived.as_deref().map(short).unwrap_or_else(|| "-".into()),
                    if c.ok { "same bits" } else { "MISMATCH" }
                )?;
                for p in &c.problems {
                    outln!("       round {}, {}: {p}", c.round, c.aggregator)?;
                }
                if !c.ok {
                    let inputs: Vec<String> = c
                        .input_blobs
                        .iter()
                        .map(|i| {
                            format!(
                                "{} {}",
                                i["task"].as_str().unwrap_or("?"),
                                i["digest"].as_str().unwrap_or("?").chars().take(12).collect::<String>()
                            )
                        })
                        .collect();
                    outln!("       its inputs: {}", inputs.join(", "))?;
                }
            }
        }
    }
    for p in &end_problems {
        eprintln!("verify: {p}");
    }
    let groups = checked.iter().filter(|c| c.kind == "group").count();
    let updates: usize = aggs.iter().map(|a| a.used().len()).sum();
    if failed > 0 || !end_problems.is_empty() {
        let first = checked.iter().find(|c| !c.ok);
        eprintln!(
            "verify: job '{job_id}': {failed} of {} aggregation(s) do not re-derive{}",
            checked.len(),
            first.map(|c| format!("; the first is round {} ({}): {}", c.round, c.aggregator, c.problems.join("; "))).unwrap_or_default()
        );
        return Ok(ExitCode::from(6));
    }
    eprintln!(
        "verify: job '{job_id}': all {} aggregation(s) ({} round(s), {groups} group(s)) re-derived bit for bit from {updates} logged update(s); trainers were not re-run (their updates are the logged blobs)",
        checked.len(),
        checked.len() - groups
    );
    Ok(ExitCode::SUCCESS)
}

/// What `flamectl whatif` changes.
pub struct WhatIf {
    /// The top aggregator's rule instead of the job's.
    pub optimizer: Option<ServerOptimizer>,
    /// Tasks or workers whose updates are left out.
    pub exclude: Vec<String>,
    /// Folders the evaluation data may be read from.
    pub roots: Vec<std::path::PathBuf>,
    /// Draw accuracy and loss beside the real run's here.
    pub plot: Option<std::path::PathBuf>,
}

/// One round of the counterfactual run beside the real one.
#[derive(Serialize)]
struct Compared {
    round: u32,
    /// Updates that entered the counterfactual model.
    updates: usize,
    real_model: String,
    whatif_model: String,
    /// Whether the two models are the same bits.
    same: bool,
    real: flame_events::job::Metrics,
    whatif: flame_events::job::Metrics,
}

/// `flamectl whatif JOB --optimizer R [--exclude task|worker ...]`: the job's
/// logged updates aggregated again with another rule, or without some
/// trainers, each counterfactual global model evaluated on the held-out split.
/// Trainers are not run again: a round's updates are the ones recorded,
/// trained from the real global model; where the counterfactual model differs,
/// each update's change (the update less the model it trained from) is applied
/// to the counterfactual model instead.
pub async fn whatif(job_id: &str, source: &Source, blobs: &Blobs, change: &WhatIf, output: Output) -> anyhow::Result<ExitCode> {
    let (events, aggs) = job_aggregations(job_id, source).await?;
    let Some(real) = aggs.iter().find(|a| a.top).map(|a| match &a.command.body {
        CommandBody::Aggregate { optimizer, .. } => *optimizer,
        _ => ServerOptimizer::FedAvg,
    }) else {
        bail!("job '{job_id}' has no aggregated round yet: nothing to compare");
    };
    let rule = change.optimizer.unwrap_or(real);
    if rule.is_asynchronous() != real.is_asynchronous() {
        bail!(
            "job '{job_id}' ran {} rounds with {}; a what-if keeps the rounds as they ran, so it takes {} rule",
            if real.is_asynchronous() { "asynchronous" } else { "synchronous" },
            real.name(),
            if real.is_asynchronous() { "FedBuff's (--optimizer fedbuff)" } else { "a synchronous" }
        );
    }
    if rule.keeps_client_state() && !real.keeps_client_state() {
        bail!("{} needs the trainers' states, which a job run with {} did not record", rule.name(), real.name());
    }
    let known: std::collections::BTreeSet<&str> =
        aggs.iter().flat_map(|a| a.updates().iter().map(|u| u.task_id.as_str()).chain(a.workers.values().map(String::as_str))).collect();
    if let Some(x) = change.exclude.iter().find(|x| !known.contains(x.as_str())) {
        bail!("--exclude {x}: no update of job '{job_id}' came from a task or worker of that name");
    }
    let roots = data_roots(&change.roots)?;
    let rerun = Rerun::new(blobs.open().await?, Some(roots));
    let excluded = |task: &str, a: &Aggregation| change.exclude.iter().any(|x| x == task || a.workers.get(task).is_some_and(|w| w == x));
    let mut world = Counterfactual::new(None);
    let mut rows = Vec::new();
    for a in &aggs {
        if let Some(top) = world.step(&rerun, a, rule, &excluded, "whatif").await? {
            rows.push(compared(a, &events, top.digest, top.updates, top.metrics));
        }
    }
    let what = format!(
        "{}{}",
        if rule == real { format!("{} (as the job ran)", rule.name()) } else { format!("{} instead of {}", rule.name(), real.name()) },
        if change.exclude.is_empty() { String::new() } else { format!(", without {}", change.exclude.join(", ")) }
    );
    let caveat = "trainers were not re-run: each round's updates are the recorded ones, trained from the real global models (where the what-if model differs, each update's change is applied to it)";
    let metric = |m: &flame_events::job::Metrics, k: &str| m.get(k).map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    match output {
        Output::Json => {
            for r in &rows {
                outln!("{}", serde_json::to_string(r)?)?;
            }
        }
        Output::Table => {
            outln!("what if job {job_id} had aggregated with {what}")?;
            outln!("{caveat}")?;
            outln!(
                "{:>5}  {:>8} {:>10} {:>10} {:>11} {:>12}  model",
                "round",
                "updates",
                "real acc",
                "whatif acc",
                "real loss",
                "whatif loss"
            )?;
            for r in &rows {
                outln!(
                    "{:>5}  {:>8} {:>10} {:>10} {:>11} {:>12}  {}",
                    r.round,
                    r.updates,
                    metric(&r.real, "accuracy"),
                    metric(&r.whatif, "accuracy"),
                    metric(&r.real, "loss"),
                    metric(&r.whatif, "loss"),
                    if r.same { "same bits" } else { "differs" }
                )?;
            }
        }
    }
    if let Some(path) = &change.plot {
        let series =
            |f: &dyn Fn(&Compared) -> Option<f64>| rows.iter().filter_map(|r| f(r).map(|v| (f64::from(r.round), v))).collect::<Vec<_>>();
        crate::plot::lines(
            path,
            &format!("job {job_id}: what if {what}"),
            &[
                ("real accuracy", series(&|r| r.real.get("accuracy").copied())),
                ("what-if accuracy", series(&|r| r.whatif.get("accuracy").copied())),
                ("real loss", series(&|r| r.real.get("loss").copied())),
                ("what-if loss", series(&|r| r.whatif.get("loss").copied())),
            ],
        )?;
        eprintln!("whatif: wrote {}", path.display());
    }
    if output == Output::Json {
        eprintln!("whatif: {caveat}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A run of aggregations in another world: the real models (global and
/// group) mapped to their counterparts, the optimizer's state there.
pub struct Counterfactual {
    /// Real model -> its counterpart.
    models: std::collections::HashMap<String, String>,
    /// A group's real model -> the samples in its counterpart.
    samples: std::collections::HashMap<String, u64>,
    /// Groups left with no update.
    dropped: std::collections::HashSet<String>,
    /// The top optimizer's state there.
    state: Option<String>,
}

/// What a counterfactual top aggregation made.
pub struct TopOut {
    /// The model's digest.
    pub digest: String,
    /// Updates (or groups) that went in.
    pub updates: usize,
    /// Its evaluation on the held-out split.
    pub metrics: flame_events::job::Metrics,
}

impl Counterfactual {
    /// Starting from the real models, with the top optimizer's `state`.
    pub fn new(state: Option<String>) -> Self {
        Self { models: Default::default(), samples: Default::default(), dropped: Default::default(), state }
    }

    fn swap(&self, d: &str) -> String {
        self.models.get(d).cloned().unwrap_or_else(|| d.to_string())
    }

    /// Runs aggregation `a` here: the top one with `rule`, without the
    /// trainers' updates `excluded` says; each trainer's update moved onto
    /// this world's model where it differs from the real one. The top
    /// aggregation's result, evaluated; `None` for a group's.
    pub async fn step(
        &mut self,
        rerun: &Rerun,
        a: &Aggregation,
        rule: ServerOptimizer,
        excluded: &dyn Fn(&str, &Aggregation) -> bool,
        tag: &str,
    ) -> anyhow::Result<Option<TopOut>> {
        if let Some(p) = rerun.unavailable(&needs(a)).await?.first() {
            bail!("round {} ({}): {p}; this needs every logged input", a.round, a.task_id);
        }
        let global = a.global_model().to_string();
        let mut updates = Vec::new();
        for u in a.used() {
            if let Some(group) = self.models.get(&u.digest).filter(|_| !a.workers.contains_key(&u.task_id)) {
                // A group's model (hierarchies): its counterpart, with the samples left in it.
                if self.dropped.contains(&u.digest) {
                    continue;
                }
                let mut v = u.clone();
                v.digest = group.clone();
                v.samples = self.samples.get(&u.digest).copied().unwrap_or(u.samples);
                updates.push(v);
                continue;
            }
            if excluded(&u.task_id, a) {
                continue;
            }
            let base = u.base_model.clone().unwrap_or_else(|| global.clone());
            let onto = self.swap(&base);
            let mut v = u.clone();
            if onto != base {
                let (update, from, to) = (rerun.state(&u.digest).await?, rerun.state(&base).await?, rerun.state(&onto).await?);
                let moved = weights::rebase(&update, &from.params, &to.params)
                    .with_context(|| format!("round {}: moving task '{}''s update onto the what-if model", a.round, u.task_id))?;
                v.digest = rerun.overlay.put(weights::encode_state(&moved)?).await?;
                if v.base_model.is_some() {
                    v.base_model = Some(onto);
                }
            }
            updates.push(v);
        }
        if updates.is_empty() {
            // Nothing left to aggregate: the model stays as it was (a group drops out of its round).
            let same = self.swap(&global);
            self.models.insert(a.digest.clone(), same.clone());
            if !a.top {
                self.dropped.insert(a.digest.clone());
                return Ok(None);
            }
            let metrics = rerun.evaluate(a, &same, tag).await?;
            return Ok(Some(TopOut { digest: same, updates: 0, metrics }));
        }
        let mut command = rerun_command(a, a.top, tag);
        let samples = updates.iter().map(|u| u.samples).sum();
        let count = updates.len();
        if let CommandBody::Aggregate { optimizer, optimizer_state, global_model, updates: u, .. } = &mut command.body {
            *global_model = self.swap(&global);
            *u = updates;
            if a.top {
                *optimizer = rule;
                *optimizer_state = self.state.clone();
            }
        }
        // Named by what it holds: the same aggregation asked again is answered from the worker's memory.
        command.id = format!("{tag}/{}", flame_workers::blob::digest(&serde_json::to_vec(&command.body)?));
        let out = rerun.aggregate(&command).await.map_err(|e| anyhow::anyhow!("round {} ({}): {e}", a.round, a.task_id))?;
        self.models.insert(a.digest.clone(), out.digest.clone());
        if a.top {
            self.state = out.optimizer_state.clone();
            Ok(Some(TopOut { digest: out.digest, updates: count, metrics: out.metrics }))
        } else {
            self.samples.insert(a.digest.clone(), samples);
            Ok(None)
        }
    }
}

fn compared(
    a: &Aggregation,
    events: &[(u64, JobEvent)],
    whatif_model: String,
    updates: usize,
    whatif: flame_events::job::Metrics,
) -> Compared {
    let real = events
        .iter()
        .find_map(|(v, e)| match e {
            JobEvent::RoundAggregated { metrics, .. } if *v == a.version => Some(metrics.clone()),
            _ => None,
        })
        .unwrap_or_default();
    Compared { round: a.round, updates, same: whatif_model == a.digest, real_model: a.digest.clone(), whatif_model, real, whatif }
}

/// One trainer's contribution to one round.
#[derive(Serialize)]
struct RoundShare {
    round: u32,
    task: String,
    worker: Option<String>,
    shapley: f64,
    leave_one_out: f64,
}

/// One trainer's contribution to the whole job.
#[derive(Serialize)]
struct JobShare {
    task: String,
    workers: Vec<String>,
    rounds: usize,
    shapley: f64,
    leave_one_out: f64,
}

/// `flamectl contributions JOB`: per round and over the job, each trainer's
/// share of the held-out accuracy gain (the loss's fall where the job reports
/// no accuracy): leave-one-out and Shapley values. A round's utility of a set
/// of trainers is the accuracy of the model the round's aggregations make
/// from their updates alone (the job's rule, the recorded optimizer state);
/// the round's gain is that of all of them less that of none (the model the
/// round started from). Values are exact up to six trainers a round and
/// GTG-Shapley estimates above ([`flame_engine::shapley`]); a job's value is
/// the sum of its rounds'. Trainers are not re-run.
pub async fn contributions(
    job_id: &str,
    source: &Source,
    blobs: &Blobs,
    roots: &[std::path::PathBuf],
    plot: Option<&std::path::Path>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    use flame_engine::shapley;
    let started = std::time::Instant::now();
    let (_, aggs) = job_aggregations(job_id, source).await?;
    let roots = data_roots(roots)?;
    let rerun = Rerun::new(blobs.open().await?, Some(roots));
    let handle = tokio::runtime::Handle::current();
    let mut rounds: std::collections::BTreeMap<u32, Vec<&Aggregation>> = Default::default();
    for a in &aggs {
        rounds.entry(a.round).or_default().push(a);
    }
    let mut shares: Vec<RoundShare> = Vec::new();
    let mut gains: Vec<serde_json::Value> = Vec::new();
    let (mut evaluations, mut permutations, mut metric) = (0usize, 0usize, "accuracy");
    for (round, of_round) in &rounds {
        let Some(top) = of_round.iter().find(|a| a.top) else { continue };
        let rule = match &top.command.body {
            CommandBody::Aggregate { optimizer, .. } => *optimizer,
            _ => ServerOptimizer::FedAvg,
        };
        let state = match &top.command.body {
            CommandBody::Aggregate { optimizer_state, .. } => optimizer_state.clone(),
            _ => None,
        };
        // The round's trainers: the tasks whose updates went into it (through groups too).
        let mut players: Vec<String> = of_round
            .iter()
            .flat_map(|a| a.used().into_iter().filter(|u| a.workers.contains_key(&u.task_id)).map(|u| u.task_id.clone()))
            .collect();
        players.sort();
        players.dedup();
        let utility = |set: &[usize]| -> anyhow::Result<f64> {
            let keep: std::collections::BTreeSet<&str> = set.iter().map(|&i| players[i].as_str()).collect();
            let out = tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let mut world = Counterfactual::new(state.clone());
                    let mut made = None;
                    for a in of_round {
                        let left_out = |task: &str, _: &Aggregation| !keep.contains(task);
                        if let Some(t) = world.step(&rerun, a, rule, &left_out, "contributions").await? {
                            made = Some(t);
                        }
                    }
                    made.context("the round has no top aggregation")
                })
            })?;
            match (out.metrics.get("accuracy"), out.metrics.get("loss")) {
                (Some(a), _) => Ok(*a),
                (None, Some(l)) => {
                    metric = "loss";
                    Ok(-l)
                }
                (None, None) => bail!("round {round}: the model was not evaluated (no held-out data readable here? see --data-root)"),
            }
        };
        let c = shapley::contributions(players.len(), &shapley::Settings::default(), utility)?;
        gains.push(serde_json::json!({"round": round, "gain": c.full - c.empty, "empty": c.empty, "full": c.full, "trainers": players.len(), "evaluations": c.evaluations, "permutations": c.permutations}));
        evaluations += c.evaluations;
        permutations += c.permutations;
        for (i, task) in players.iter().enumerate() {
            shares.push(RoundShare {
                round: *round,
                task: task.clone(),
                worker: top.workers.get(task).or_else(|| of_round.iter().find_map(|a| a.workers.get(task))).cloned(),
                shapley: c.shapley[i],
                leave_one_out: c.leave_one_out[i],
            });
        }
    }
    let mut totals: std::collections::BTreeMap<String, JobShare> = Default::default();
    for s in &shares {
        let t = totals.entry(s.task.clone()).or_insert_with(|| JobShare {
            task: s.task.clone(),
            workers: vec![],
            rounds: 0,
            shapley: 0.0,
            leave_one_out: 0.0,
        });
        t.rounds += 1;
        t.shapley += s.shapley;
        t.leave_one_out += s.leave_one_out;
        if let Some(w) = s.worker.as_ref().filter(|w| !t.workers.contains(w)) {
            t.workers.push(w.clone());
        }
    }
    let mut ranked: Vec<&JobShare> = totals.values().collect();
    ranked.sort_by(|a, b| b.shapley.total_cmp(&a.shapley));
    let gain = if metric == "loss" { "fall in held-out loss" } else { "held-out accuracy gain" };
    match output {
        Output::Json => {
            for s in &shares {
                outln!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({"round": s.round, "task": s.task, "worker": s.worker, "shapley": s.shapley, "leave_one_out": s.leave_one_out})
                    )?
                )?;
            }
            for g in &gains {
                outln!("{}", serde_json::to_string(&serde_json::json!({"round_gain": g}))?)?;
            }
            for t in &ranked {
                outln!("{}", serde_json::to_string(&serde_json::json!({"job": t}))?)?;
            }
        }
        Output::Table => {
            outln!("contributions to job {job_id}'s {gain}, summed over {} round(s)", rounds.len())?;
            outln!("{:<24} {:<24} {:>6} {:>10} {:>14}", "trainer", "worker(s)", "rounds", "shapley", "leave-one-out")?;
            for t in &ranked {
                outln!("{:<24} {:<24} {:>6} {:>10.4} {:>14.4}", t.task, t.workers.join(","), t.rounds, t.shapley, t.leave_one_out)?;
            }
        }
    }
    if let Some(path) = plot {
        let named: Vec<(String, Vec<(f64, f64)>)> = ranked
            .iter()
            .map(|t| {
                let mut sum = 0.0;
                let points = shares.iter().filter(|s| s.task == t.task).map(|s| {
                    sum += s.shapley;
                    (f64::from(s.round), sum)
                });
                (format!("{} (shapley, cumulative)", t.task), points.collect())
            })
            .collect();
        let named: Vec<(&str, Vec<(f64, f64)>)> = named.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
        crate::plot::lines(path, &format!("job {job_id}: each trainer's share of the {gain}"), &named)?;
        eprintln!("contributions: wrote {}", path.display());
    }
    eprintln!(
        "contributions: {evaluations} models aggregated and evaluated ({permutations} permutations sampled) in {:.1} s; exact Shapley values up to 6 trainers a round, GTG-Shapley estimates above; trainers were not re-run",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `flamectl privacy DATASET`: the privacy each job spent on a dataset (its
/// URL as the jobs name it), in order, with the budget and what is left.
pub async fn privacy(dataset: &str, source: &Source, delta: Option<f64>, output: Output) -> anyhow::Result<ExitCode> {
    let events = Events::open(source).await?;
    let mut jobs = Vec::new();
    let mut refused: Vec<(String, u32)> = Vec::new();
    for id in events.job_ids().await? {
        let envelopes = events.read(&id, 1).await?;
        let decoded = envelopes.iter().map(JobEvent::from_envelope).collect::<Result<Vec<_>, _>>()?;
        for e in &decoded {
            if let JobEvent::PrivacyRefused { round, dataset: d, .. } = e
                && d == dataset
            {
                refused.push((id.clone(), *round));
            }
        }
        jobs.push(flame_engine::job::Job::from_events(&decoded));
    }
    let budget = flame_engine::ledger::budget(dataset, &jobs);
    let Some(delta) = delta.or(budget.map(|b| b.delta)) else {
        bail!("no job gives dataset '{dataset}' a privacy budget: say at which delta to count with --delta (e.g. 1e-5)");
    };
    let rows = flame_engine::ledger::ledger(dataset, &jobs, &refused, delta);
    let total = rows.last().map_or(0.0, |r| r.cumulative);
    match output {
        Output::Json => {
            for r in &rows {
                outln!("{}", serde_json::to_string(r)?)?;
            }
            outln!("{}", serde_json::json!({"dataset": dataset, "delta": delta, "spent": total, "budget": budget.map(|b| b.epsilon)}))?;
        }
        Output::Table => {
            outln!("privacy ledger of {dataset} (epsilon at delta {delta:e}; RDP accounting, one Gaussian run per noised update)")?;
            outln!(
                "{:<38} {:<24} {:>6} {:>8} {:>9} {:>11}  refused in rounds",
                "job",
                "name",
                "noise",
                "updates",
                "epsilon",
                "cumulative"
            )?;
            for r in &rows {
                let refused = r.refused.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                outln!(
                    "{:<38} {:<24} {:>6.2} {:>8} {:>9.3} {:>11.3}  {}",
                    r.job_id,
                    r.name,
                    r.noise_multiplier,
                    r.updates,
                    r.epsilon,
                    r.cumulative,
                    if refused.is_empty() { "-".to_string() } else { refused }
                )?;
            }
            match budget {
                Some(b) => {
                    outln!("spent {total:.3} of a budget of {} (delta {:e}): {:.3} left", b.epsilon, b.delta, (b.epsilon - total).max(0.0))?
                }
                None => outln!("spent {total:.3}; no job gives this dataset a budget")?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
