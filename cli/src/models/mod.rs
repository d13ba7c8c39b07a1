//! What a job's log makes possible with its models: `verify --models`
//! (every model derived again, bit for bit), `whatif` (another rule, or
//! without someone), `contributions` (leave-one-out and Shapley values) and
//! `privacy` (the ledger of a dataset).
//!
//! The log names each aggregation's inputs: the global model it started from,
//! the trainers' update blobs with their samples (and, for FedBuff, the model
//! each trained from; for SCAFFOLD and FedDyn, each trainer's state), the
//! optimizer with its settings and its state from the round before. The
//! command the engine sent is built again from the job's state just before
//! the aggregator's report ([`flame_engine::rederive`]) and run by the same
//! aggregation code the workers run, against a store that keeps its writes in
//! memory ([`Rerun`]); [`Counterfactual`] runs them in another world, with
//! another rule or without some updates. Trainers are not run again: their
//! updates are the logged blobs.

use std::sync::Arc;

use anyhow::{Context, bail};

use flame_engine::rederive::{self, Aggregation};
use flame_events::algorithm::ServerOptimizer;
use flame_events::job::JobEvent;
use flame_events::model::Model;
use flame_events::protocol::{Command, CommandBody, ReportBody, WorkerInfo};
use flame_transport::InProcess;
use flame_workers::Worker;
use flame_workers::blob::{BlobStore, Error as BlobError, Overlay};
use flame_workers::weights;

use crate::inspect::{Events, Source};

macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

mod contributions;
mod privacy;
mod verify;
mod whatif;

pub use contributions::contributions;
pub use privacy::privacy;
pub use verify::verify;
pub use whatif::{WhatIf, whatif};

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
        let info =
            WorkerInfo { id: "flamectl".into(), roles: vec!["aggregator".into()], realm: String::new(), device: "cpu".into(), group: None };
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
