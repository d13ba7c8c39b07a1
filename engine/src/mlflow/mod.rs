//! The MLflow projection: what MLflow should hold for a job, derived from
//! its events (pure), and the adapter that keeps an MLflow tracking server in
//! step with the log ([`export`], over MLflow's REST API in [`client`]).
//!
//! A job is one MLflow run in the experiment named after the job, found again
//! by its `flame.job_id` tag; each aggregated round logs its metrics at step
//! = round, stamped with the time the round closed, so logging a round twice
//! stores it once. A completed job's final model is the run's `model/`
//! artifact and a version of the registered model named after the job.

pub mod client;
pub mod export;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flame_events::Envelope;
use flame_events::job::{JobEvent, RunSpec, Status, TaskSpec};
use flame_events::model::Model;
use flame_projections::view::{self, JobView};
use serde_json::Value;

use crate::accountant::{Runs, default_orders, epsilon};

/// The δ a DP job's ε is logged at when its datasets name no budget.
pub const DEFAULT_DELTA: f64 = 1e-5;

/// What MLflow's run status is for a job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// The job is not at an end.
    Running,
    /// Completed.
    Finished,
    /// Failed.
    Failed,
    /// Stopped by someone (terminated) or deleted.
    Killed,
}

impl RunStatus {
    /// The run status of a job in `state`.
    pub fn of(state: Status) -> Self {
        match state {
            Status::Completed => Self::Finished,
            Status::Failed => Self::Failed,
            Status::Terminated | Status::Deleted => Self::Killed,
            _ => Self::Running,
        }
    }

    /// MLflow's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Finished => "FINISHED",
            Self::Failed => "FAILED",
            Self::Killed => "KILLED",
        }
    }

    /// Whether the run is over.
    pub fn is_end(self) -> bool {
        self != Self::Running
    }
}

/// One aggregated round's figures, as MLflow metrics at step = round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundMetrics {
    /// The round (the metrics' step).
    pub round: u32,
    /// When it was aggregated, in ms since the epoch (the metrics' timestamp).
    pub at_ms: i64,
    /// Metric key and value.
    pub values: Vec<(String, f64)>,
}

/// A completed job's final global model.
#[derive(Clone, Debug, PartialEq)]
pub struct FinalModel {
    /// The round that made it.
    pub round: u32,
    /// Its blob digest (safetensors with PyTorch's names).
    pub digest: String,
    /// The job's TorchScript module (file name, blob digest), when it has one.
    pub torchscript: Option<(String, String)>,
}

/// Everything MLflow should hold for one job.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// The job.
    pub job_id: String,
    /// Its name: the experiment and the registered model are named after it.
    pub name: String,
    /// Its state.
    pub state: Status,
    /// When it was created, ms since the epoch (the run's start time).
    pub created_ms: i64,
    /// When it reached an end state (the run's end time).
    pub ended_ms: Option<i64>,
    /// Run settings, flattened (`optimizer`, `optimizer.eta`, `hyperparameters.rounds`, ...).
    pub params: BTreeMap<String, String>,
    /// Tags besides the job id (`flame.state`, `flame.source`, ...).
    pub tags: BTreeMap<String, String>,
    /// The aggregated rounds, in order.
    pub rounds: Vec<RoundMetrics>,
    /// The final model, once the job completed.
    pub model: Option<FinalModel>,
}

impl RunRecord {
    /// MLflow's status for the run.
    pub fn status(&self) -> RunStatus {
        RunStatus::of(self.state)
    }

    /// Whether the job ever started: a run is made only for jobs that did
    /// (a job's settings may still change before it starts).
    pub fn started(&self) -> bool {
        !matches!(self.state, Status::New | Status::Ready)
    }
}

/// The tag that names a run's job.
pub const JOB_TAG: &str = "flame.job_id";

/// MLflow's limits on a param value and a key (3.x: 6000 and 250).
const MAX_VALUE: usize = 6000;
const MAX_KEY: usize = 250;

/// What MLflow should hold for the job whose stream is `events`; none before it was created.
pub fn record(events: &[Envelope]) -> Option<RunRecord> {
    let view = view::fold(events);
    let mut created: Option<(String, String, RunSpec, Vec<TaskSpec>)> = None;
    let mut ended_at: Option<DateTime<Utc>> = None;
    let mut completed: Option<(u32, String)> = None;
    // The end a job reached before it was deleted, if it was: deleting a job keeps its run as it ended.
    let mut ended: Option<Status> = None;
    for e in events {
        match JobEvent::from_envelope(e) {
            Ok(JobEvent::JobCreated { name, source, spec, tasks, .. } | JobEvent::JobUpdated { name, source, spec, tasks }) => {
                created = Some((name, source, spec, tasks));
            }
            Ok(JobEvent::JobCompleted { rounds_completed, final_model, .. }) => {
                ended_at = Some(e.recorded_at);
                completed = Some((rounds_completed, final_model));
                ended = Some(Status::Completed);
            }
            Ok(JobEvent::JobFailed { .. }) => (ended_at, ended) = (Some(e.recorded_at), Some(Status::Failed)),
            Ok(JobEvent::JobTerminated { .. }) => (ended_at, ended) = (Some(e.recorded_at), Some(Status::Terminated)),
            Ok(JobEvent::JobStarting {}) => (completed, ended) = (None, None),
            _ => {}
        }
    }
    let (name, source, spec, tasks) = created?;
    let state = match (view.status.state, ended) {
        (Status::Deleted, Some(end)) => end,
        (state, _) => state,
    };
    let mut tags = BTreeMap::from([
        ("flame.state".to_string(), view.status.state.name().to_string()),
        ("flame.source".to_string(), source),
        ("flame.rounds_completed".to_string(), view.status.rounds_completed.to_string()),
    ]);
    if let Some(f) = &view.forked_from {
        tags.insert("flame.forked_from".into(), format!("{}@{}", f.parent_job, f.from_round));
    }
    if let Some(failure) = &view.status.failure {
        tags.insert("flame.failure".into(), clip(failure, MAX_VALUE));
    }
    let model = completed.filter(|_| state == Status::Completed).map(|(round, digest)| FinalModel {
        round,
        digest,
        torchscript: match &spec.model {
            Model::TorchScript { file, sha256, .. } => Some((file.clone(), sha256.clone())),
            _ => None,
        },
    });
    Some(RunRecord {
        job_id: view.job_id.clone(),
        state,
        created_ms: view.status.created_at.map_or(0, |t| t.timestamp_millis()),
        ended_ms: ended_at.filter(|_| RunStatus::of(state).is_end()).map(|t| t.timestamp_millis()),
        params: params(&spec, &tasks),
        rounds: rounds(&view, &spec, &tasks),
        tags,
        model,
        name,
    })
}

/// The run's parameters: the topology, the optimizer and its arguments, the
/// selector, training, the hyperparameters as given, and the datasets.
pub fn params(spec: &RunSpec, tasks: &[TaskSpec]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut roles: BTreeMap<&str, usize> = BTreeMap::new();
    for t in tasks {
        *roles.entry(t.role.as_str()).or_default() += 1;
    }
    out.insert("topology".into(), roles.iter().map(|(r, n)| format!("{r}:{n}")).collect::<Vec<_>>().join(" "));
    let datasets: std::collections::BTreeSet<&str> = tasks.iter().filter_map(|t| t.dataset.as_deref()).collect();
    out.insert("datasets".into(), datasets.into_iter().collect::<Vec<_>>().join(","));
    out.insert("rounds".into(), spec.rounds.to_string());
    out.insert("seed".into(), spec.seed.to_string());
    out.insert("model".into(), spec.model.name().to_string());
    flatten("optimizer", &serde_json::to_value(spec.optimizer).unwrap_or_default(), &mut out);
    flatten("selector", &serde_json::to_value(spec.selection).unwrap_or_default(), &mut out);
    flatten("training", &serde_json::to_value(spec.training).unwrap_or_default(), &mut out);
    flatten("hyperparameters", &spec.hyperparameters, &mut out);
    if let Some(q) = spec.quorum {
        out.insert("quorum".into(), q.to_string());
    }
    if spec.eval_every > 0 {
        out.insert("eval_every".into(), spec.eval_every.to_string());
    }
    out.into_iter().map(|(k, v)| (clip(&key(&k), MAX_KEY), clip(&v, MAX_VALUE))).collect()
}

/// Writes `value` under `prefix` as flat `prefix.key` params; a tagged enum's
/// `kind` becomes the prefix's own value (`optimizer = fedavgm`).
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "kind" {
                    flatten(prefix, v, out);
                } else {
                    flatten(&format!("{prefix}.{k}"), v, out);
                }
            }
        }
        Value::String(s) => {
            out.insert(prefix.into(), s.clone());
        }
        Value::Null => {}
        other => {
            out.insert(prefix.into(), other.to_string());
        }
    }
}

/// A metric or param key with only the characters MLflow allows
/// (alphanumerics, `_ - . /` and space); others become `_`.
pub fn key(k: &str) -> String {
    k.chars().map(|c| if c.is_ascii_alphanumeric() || "_-./ ".contains(c) { c } else { '_' }).collect()
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Each aggregated round's metrics: the central evaluation (its own keys),
/// the federated evaluation (`federated_<key>`, once every participant
/// evaluated or the job ended: a point is logged once, final), the mean local training
/// loss, participants, stragglers, excluded updates, samples, the round's
/// seconds and, for a DP job, the ε its updates have spent so far.
pub fn rounds(view: &JobView, spec: &RunSpec, tasks: &[TaskSpec]) -> Vec<RoundMetrics> {
    let dataset_of: BTreeMap<&str, &str> = tasks.iter().filter_map(|t| Some((t.task_id.as_str(), t.dataset.as_deref()?))).collect();
    let noise = spec.training.privacy.map(|p| p.noise_factor);
    let mut steps: BTreeMap<&str, u64> = BTreeMap::new();
    let rows = flame_projections::render::metrics(view);
    let mut out = Vec::new();
    for (r, row) in view.rounds.iter().zip(rows) {
        for p in &r.participants {
            if let Some(d) = dataset_of.get(p.task_id.as_str()) {
                *steps.entry(d).or_default() += 1;
            }
        }
        let Some(closed) = r.closed_at else { continue };
        let mut values: Vec<(String, f64)> = Vec::new();
        for (k, v) in &row.metrics {
            values.push((key(k), *v));
        }
        // The trainers' evaluations arrive one by one after the aggregate; their mean is final once all are in.
        let evaluated = r.participants.iter().all(|p| r.evaluations.contains_key(&p.task_id));
        if evaluated || RunStatus::of(view.status.state).is_end() {
            for (k, v) in &row.federated {
                values.push((format!("federated_{}", key(k)), *v));
            }
        }
        if let Some(l) = row.train_loss {
            values.push(("train_loss".into(), l));
        }
        values.push(("participants".into(), row.participants as f64));
        values.push(("stragglers".into(), row.stragglers as f64));
        values.push(("excluded".into(), r.excluded.len() as f64));
        values.push(("samples".into(), row.samples as f64));
        if let Some(s) = row.seconds {
            values.push(("round_seconds".into(), s));
        }
        if let Some(z) = noise {
            // The most any one dataset has spent, each at its budget's δ.
            let spent = steps
                .iter()
                .map(|(d, &n)| {
                    let delta = spec.privacy_budgets.get(*d).map_or(DEFAULT_DELTA, |b| b.delta);
                    epsilon(&[Runs { q: 1.0, z, steps: n }], delta, &default_orders()).0
                })
                .fold(0.0, f64::max);
            values.push(("privacy_epsilon".into(), spent));
        }
        values.retain(|(_, v)| v.is_finite());
        out.push(RoundMetrics { round: r.round, at_ms: closed.timestamp_millis(), values });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{History, envelopes};
    use flame_events::algorithm::Privacy;
    use flame_events::job::Metrics;
    use serde_json::json;

    fn aggregated(h: History, round: u32, accuracy: f64) -> History {
        let mut h = h.round(round);
        if let Some(JobEvent::RoundAggregated { metrics, .. }) = h.events.last_mut() {
            *metrics = Metrics::from([("accuracy".to_string(), accuracy)]);
        }
        h
    }

    #[test]
    fn a_completed_job_is_a_finished_run_with_each_rounds_metrics_and_its_final_model() {
        let h = History::created_with(2, |s| s.hyperparameters = json!({"rounds": 2, "learningRate": 0.1})).started().initialized();
        let h = aggregated(aggregated(h, 1, 0.5), 2, 0.75);
        let running = record(&envelopes(&h.events)).expect("a created job has a record");
        assert_eq!(running.status(), RunStatus::Running);
        assert!(running.started() && running.model.is_none() && running.ended_ms.is_none());
        let h = h.then(JobEvent::JobCompleted { rounds_completed: 2, final_model: "m2".into(), metrics: Metrics::new() });
        let events = envelopes(&h.events);
        let r = record(&events).expect("record");
        assert_eq!((r.job_id.as_str(), r.name.as_str(), r.status()), ("job-1", "test", RunStatus::Finished));
        assert_eq!(r.ended_ms, Some(events.last().expect("events").recorded_at.timestamp_millis()));
        assert_eq!(r.model, Some(FinalModel { round: 2, digest: "m2".into(), torchscript: None }));
        assert_eq!(r.rounds.iter().map(|m| m.round).collect::<Vec<_>>(), [1, 2]);
        let accuracy: Vec<f64> = r.rounds.iter().filter_map(|m| m.values.iter().find(|(k, _)| k == "accuracy").map(|(_, v)| *v)).collect();
        assert_eq!(accuracy, [0.5, 0.75]);
        assert!(r.rounds[0].values.contains(&("participants".into(), 2.0)));
        assert!(!r.rounds[0].values.iter().any(|(k, _)| k == "privacy_epsilon"), "no DP, no epsilon");
        assert_eq!(r.params["topology"], "aggregator:1 trainer:2");
        assert_eq!(r.params["optimizer"], "fedavg");
        assert_eq!(r.params["hyperparameters.learningRate"], "0.1");
        assert_eq!(r.params["datasets"], "builtin://digits?part=0&of=2,builtin://digits?part=1&of=2");
        assert_eq!(r.tags["flame.state"], "completed");
    }

    #[test]
    fn a_dp_jobs_rounds_log_the_epsilon_spent_so_far_which_only_grows() {
        let h = History::created_with(3, |s| s.training.privacy = Some(Privacy { clip_threshold: 1.0, noise_factor: 1.1 }))
            .started()
            .initialized();
        let h = aggregated(aggregated(aggregated(h, 1, 0.1), 2, 0.2), 3, 0.3);
        let r = record(&envelopes(&h.events)).expect("record");
        let eps: Vec<f64> =
            r.rounds.iter().filter_map(|m| m.values.iter().find(|(k, _)| k == "privacy_epsilon").map(|(_, v)| *v)).collect();
        assert_eq!(eps.len(), 3);
        assert!(eps[0] > 0.0 && eps[0] < eps[1] && eps[1] < eps[2], "{eps:?}");
        // Each dataset had one update per round: the ε of `round` runs at the default δ.
        let expected = epsilon(&[Runs { q: 1.0, z: 1.1, steps: 3 }], DEFAULT_DELTA, &default_orders()).0;
        assert!((eps[2] - expected).abs() < 1e-12);
    }

    #[test]
    fn a_rounds_federated_evaluation_is_logged_once_every_participant_evaluated() {
        let eval = |task: &str, accuracy: f64| JobEvent::ModelEvaluated {
            round: 1,
            task_id: task.into(),
            worker_id: format!("w-{task}"),
            metrics: Metrics::from([("accuracy".to_string(), accuracy), ("test_samples".to_string(), 10.0)]),
        };
        let federated = |h: &History| {
            let r = record(&envelopes(&h.events)).expect("record");
            r.rounds[0].values.iter().find(|(k, _)| k == "federated_accuracy").map(|(_, v)| *v)
        };
        let h = aggregated(History::created(2).started().initialized(), 1, 0.5).then(eval("t0", 0.4));
        assert_eq!(federated(&h), None, "one of two trainers evaluated: the mean is not final");
        let h = h.then(eval("t1", 0.8));
        assert!((federated(&h).expect("both evaluated") - 0.6).abs() < 1e-12);
        // A trainer that never evaluates does not hold the round back past the job's end.
        let h = aggregated(History::created(1).started().initialized(), 1, 0.5)
            .then(eval("t0", 0.4))
            .then(JobEvent::JobFailed { reason: "t1 lost".into() });
        assert_eq!(federated(&h), Some(0.4));
    }

    #[test]
    fn deleting_a_finished_job_keeps_its_run_as_it_ended() {
        let h = aggregated(History::created(1).started().initialized(), 1, 0.5)
            .then(JobEvent::JobCompleted { rounds_completed: 1, final_model: "m1".into(), metrics: Metrics::new() })
            .then(JobEvent::JobDeleted {});
        let r = record(&envelopes(&h.events)).expect("record");
        assert_eq!(r.status(), RunStatus::Finished);
        assert!(r.model.is_some());
        assert_eq!(r.tags["flame.state"], "deleted");
        let never_ended = record(&envelopes(&History::created(1).started().then(JobEvent::JobDeleted {}).events)).expect("record");
        assert_eq!(never_ended.status(), RunStatus::Killed);
    }

    #[test]
    fn a_job_not_yet_started_has_a_record_but_no_run() {
        let r = record(&envelopes(&History::created(2).events)).expect("record");
        assert!(!r.started());
        assert!(record(&[]).is_none());
    }

    #[test]
    fn flattening_names_a_tagged_enum_by_its_kind_and_keeps_its_arguments() {
        let mut out = BTreeMap::new();
        flatten("optimizer", &json!({"kind": "fedavgm", "eta": 1.0, "momentum": 0.9}), &mut out);
        flatten("hyperparameters", &json!({"rounds": 5, "nested": {"a": "x"}, "list": [1, 2], "none": null}), &mut out);
        assert_eq!(out["optimizer"], "fedavgm");
        assert_eq!(out["optimizer.eta"], "1.0");
        assert_eq!(out["optimizer.momentum"], "0.9");
        assert_eq!(out["hyperparameters.rounds"], "5");
        assert_eq!(out["hyperparameters.nested.a"], "x");
        assert_eq!(out["hyperparameters.list"], "[1,2]");
        assert!(!out.contains_key("hyperparameters.none"));
    }

    #[test]
    fn keys_keep_only_what_mlflow_allows_and_values_are_clipped_on_a_char_boundary() {
        assert_eq!(key("top-1 acc/val.x"), "top-1 acc/val.x");
        assert_eq!(key("f1@k(3)"), "f1_k_3_");
        let long = "é".repeat(4000);
        let clipped = clip(&long, MAX_VALUE);
        assert!(clipped.len() <= MAX_VALUE && clipped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn run_status_follows_the_jobs_end_state() {
        assert_eq!(RunStatus::of(Status::Running), RunStatus::Running);
        assert_eq!(RunStatus::of(Status::Completed), RunStatus::Finished);
        assert_eq!(RunStatus::of(Status::Failed), RunStatus::Failed);
        assert_eq!(RunStatus::of(Status::Terminated), RunStatus::Killed);
        assert!(!RunStatus::of(Status::Stopping).is_end());
    }
}
