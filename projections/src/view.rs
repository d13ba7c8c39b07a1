//! The read models of one job, folded from its events: status, rounds, task
//! and worker histories, model lineage and the audit log.
//!
//! `JobView::apply` is a pure function of the view and one event, so folding
//! any prefix and then the rest equals folding everything at once, and a view
//! can be rebuilt from scratch whenever its stored copy is in doubt.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use flame_events::Envelope;
use flame_events::job::{JobEvent, Metrics, Status};

/// Everything the projections know about one job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// Job id (the stream is `job-<id>`).
    pub job_id: String,
    /// State, round and timings.
    pub status: JobStatus,
    /// The rounds, in order.
    pub rounds: Vec<RoundView>,
    /// Per-task history, by task id.
    pub tasks: BTreeMap<String, TaskHistory>,
    /// Per-worker history, by worker id.
    pub workers: BTreeMap<String, WorkerHistory>,
    /// Every global model and what produced it, oldest first.
    pub lineage: Vec<ModelNode>,
    /// Every event of the job: who did what and when, refusals included.
    pub audit: Vec<AuditEntry>,
    /// Asynchronous jobs: updates that joined the buffer of a round not started yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub early: Vec<EarlyUpdate>,
    /// Where the job was forked from, if it is a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<flame_events::job::ForkOrigin>,
    /// Stream version of the last event folded in.
    pub version: u64,
    /// Global position of the last event folded in.
    pub position: u64,
    /// Rounds (indexes) changed since the last `take_touched`: what a store must rewrite.
    #[serde(skip)]
    pub touched: Touched,
}

/// Indexes of rounds changed since they were last stored. Bookkeeping for
/// storage, not part of the view: always equal, never serialized.
#[derive(Clone, Debug, Default)]
pub struct Touched(pub BTreeSet<usize>);

impl PartialEq for Touched {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl JobView {
    /// The rounds changed since the last call.
    pub fn take_touched(&mut self) -> BTreeSet<usize> {
        std::mem::take(&mut self.touched.0)
    }
}

/// Where a job stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job name.
    pub name: String,
    /// Flame's state (`new` before any event).
    pub state: Status,
    /// Latest round started (0 = none).
    pub round: u32,
    /// Rounds the job runs.
    pub rounds_total: u32,
    /// Rounds aggregated.
    pub rounds_completed: u32,
    /// Server optimizer.
    pub optimizer: String,
    /// Current global model.
    pub global_model: Option<String>,
    /// Metrics of the current global model.
    pub metrics: Metrics,
    /// Why it failed or was stopped.
    pub failure: Option<String>,
    /// Reports refused so far.
    pub rejected: u64,
    /// Updates left out of aggregates so far.
    pub excluded: u64,
    /// When it was created.
    pub created_at: Option<DateTime<Utc>>,
    /// When rounds began (`JobStarted`).
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached an end state.
    pub ended_at: Option<DateTime<Utc>>,
    /// When its last event was recorded.
    pub updated_at: Option<DateTime<Utc>>,
}

/// One round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundView {
    /// Round number, from 1.
    pub round: u32,
    /// Model the round started from.
    pub start_model: String,
    /// Model it produced, once aggregated.
    pub model: Option<String>,
    /// Trainer tasks the selector chose (empty: every trainer with a worker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selected: Vec<String>,
    /// Updates accepted, in arrival order.
    pub participants: Vec<Participant>,
    /// Tasks whose updates missed the round's deadline.
    pub stragglers: Vec<String>,
    /// Updates the aggregator left out, with why.
    pub excluded: Vec<Exclusion>,
    /// Trainers whose training failed this round (they sat it out), with their errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Failure>,
    /// Reports refused while the round was open.
    pub rejected: u32,
    /// Coordinated jobs: which aggregator each trainer uploaded to this round.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pairing: BTreeMap<String, String>,
    /// Middle aggregators' partial aggregates (hierarchical jobs), in arrival order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupAggregate>,
    /// Digests of the trainers' updates that went into the aggregate.
    pub inputs: Vec<String>,
    /// Evaluation of the produced model.
    pub metrics: Metrics,
    /// Federated evaluation of the produced model: each trainer's metrics on its own held-out data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evaluations: BTreeMap<String, Metrics>,
    /// Their means weighted by each trainer's `test_samples` (which is their sum).
    #[serde(default, skip_serializing_if = "Metrics::is_empty")]
    pub federated: Metrics,
    /// When the round started.
    pub started_at: DateTime<Utc>,
    /// When its last update arrived or its deadline closed training.
    pub training_done_at: Option<DateTime<Utc>>,
    /// When it was aggregated.
    pub closed_at: Option<DateTime<Utc>>,
}

impl RoundView {
    /// Seconds from start to aggregate, once closed.
    pub fn seconds(&self) -> Option<f64> {
        self.closed_at.map(|c| seconds_between(self.started_at, c))
    }

    /// Training samples behind the accepted updates.
    pub fn samples(&self) -> u64 {
        self.participants.iter().map(|p| p.samples).sum()
    }
}

/// Seconds from `a` to `b`.
pub fn seconds_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(0) as f64 / 1e6
}

/// An accepted update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    /// Task that trained it.
    pub task_id: String,
    /// Worker that ran the task.
    pub worker_id: String,
    /// Digest of the update.
    pub digest: String,
    /// Samples behind it.
    pub samples: u64,
    /// Local training metrics.
    pub metrics: Metrics,
    /// When it was accepted.
    pub at: DateTime<Utc>,
    /// Asynchronous jobs: global models made since the model it trained from.
    #[serde(default, skip_serializing_if = "flame_events::is_zero")]
    pub staleness: u32,
}

/// A middle aggregator's combination of its group's updates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupAggregate {
    /// The middle aggregator's task.
    pub task_id: String,
    /// Its worker.
    pub worker_id: String,
    /// Digest of the group's model.
    pub digest: String,
    /// Samples behind it.
    pub samples: u64,
    /// The trainers' update digests it contains.
    pub inputs: Vec<String>,
    /// What its worker measured.
    pub metrics: Metrics,
    /// When it was accepted.
    pub at: DateTime<Utc>,
}

/// An update accepted for a round that has not started yet (asynchronous
/// jobs: it arrived while the open round's buffer was full).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyUpdate {
    /// The round whose buffer it joins.
    pub round: u32,
    /// The update.
    pub participant: Participant,
}

/// An update left out of an aggregate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exclusion {
    /// Task that produced it.
    pub task_id: String,
    /// Its digest.
    pub digest: String,
    /// Why.
    pub reason: String,
}

/// A trainer's failed training in a round (`TrainingFailed`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The trainer task.
    pub task_id: String,
    /// The worker that reported it.
    pub worker_id: String,
    /// Its error.
    pub error: String,
}

/// What happened to one task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskHistory {
    /// Role.
    pub role: String,
    /// Dataset URL for data consumers.
    pub dataset: Option<String>,
    /// Workers it was placed on, in order (a new one after a loss).
    pub placements: Vec<Placement>,
    /// When its worker confirmed it.
    pub deployed_at: Option<DateTime<Utc>>,
    /// Rounds it delivered an update for.
    pub updates: Vec<TaskUpdate>,
    /// Rounds it missed the deadline of.
    pub missed: Vec<u32>,
    /// Rounds its training failed in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<u32>,
    /// Reports of it that were refused.
    pub rejected: u32,
    /// Its updates that were left out of aggregates.
    pub excluded: u32,
    /// Whether it sits out (its worker was lost with no replacement).
    pub orphaned: bool,
}

/// A task placed on a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Worker id.
    pub worker_id: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// A task's update in one round (its digest is in the round's participants).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskUpdate {
    /// Round.
    pub round: u32,
    /// Samples.
    pub samples: u64,
    /// Seconds from the round's start.
    pub seconds: f64,
}

/// What one worker did for the job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerHistory {
    /// Tasks placed on it.
    pub tasks: BTreeSet<String>,
    /// Updates it delivered that were accepted.
    pub updates: u32,
    /// Samples behind them.
    pub samples: u64,
    /// Global models it produced (initial model, aggregates).
    pub models: u32,
    /// Its reports that were refused.
    pub rejected: u32,
    /// When it was declared lost, if it was.
    pub lost_at: Option<DateTime<Utc>>,
    /// When it last caused an event.
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// A global model and what produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelNode {
    /// Its digest.
    pub digest: String,
    /// The round that produced it (0 = the initial model).
    pub round: u32,
    /// The model the round started from.
    pub parent: Option<String>,
    /// The updates averaged into it.
    pub inputs: Vec<LineageInput>,
    /// Who made it (`worker:<id>`).
    pub made_by: String,
    /// Its evaluation.
    pub metrics: Metrics,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// One update that went into a global model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LineageInput {
    /// Update digest.
    pub digest: String,
    /// Task that trained it.
    pub task_id: String,
    /// Worker that ran the task.
    pub worker_id: String,
    /// Its FedAvg weight.
    pub samples: u64,
}

/// What became of a command or report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Applied.
    Accepted,
    /// A report that was refused (`ReportRejected`).
    Rejected,
    /// An update the aggregator left out (`UpdateExcluded`).
    Excluded,
    /// An event this program cannot decode.
    Undecodable,
}

impl Outcome {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Excluded => "excluded",
            Self::Undecodable => "undecodable",
        }
    }
}

/// One entry of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Global position.
    pub position: u64,
    /// Version in the job's stream.
    pub version: u64,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Who caused it: `user:<name>`, `engine`, `worker:<id>`.
    pub actor: String,
    /// The event type.
    pub action: Cow<'static, str>,
    /// What became of it.
    pub outcome: Outcome,
    /// The command or event that caused it.
    pub causation_id: Option<String>,
    /// The job it belongs to.
    pub correlation_id: Option<String>,
    /// Why, for a refused report, an excluded update or an undecodable event
    /// (`render::audit_table` describes the others from their events).
    pub reason: Option<String>,
}

impl JobView {
    /// Folds one event of the job's stream into the view. Events that do not
    /// decode still enter the audit log (with the decode error) and change
    /// nothing else, so a view never blocks on a bad event.
    pub fn apply(&mut self, e: &Envelope) {
        if self.job_id.is_empty() {
            self.job_id = e.stream_id.strip_prefix("job-").unwrap_or(&e.stream_id).to_string();
        }
        self.version = e.version;
        self.position = e.position;
        let at = e.recorded_at;
        self.status.updated_at = Some(at);
        if let Some(w) = e.actor.strip_prefix("worker:") {
            match self.workers.get_mut(w) {
                Some(history) => history.last_seen_at = Some(at),
                None => self.workers.entry(w.to_string()).or_default().last_seen_at = Some(at),
            }
        }
        let event = match JobEvent::from_envelope(e) {
            Ok(ev) => ev,
            Err(err) => {
                self.audit.push(self.entry(e, Cow::Owned(e.event_type.clone()), Outcome::Undecodable, Some(err.to_string())));
                return;
            }
        };
        let (outcome, reason) = match &event {
            JobEvent::ReportRejected { reason, .. } => (Outcome::Rejected, Some(reason.clone())),
            JobEvent::UpdateExcluded { reason, .. } => (Outcome::Excluded, Some(reason.clone())),
            JobEvent::PrivacyRefused { .. } => (Outcome::Excluded, Some(detail(&event))),
            _ => (Outcome::Accepted, None),
        };
        self.audit.push(self.entry(e, Cow::Borrowed(event.event_type()), outcome, reason));
        self.fold(event, at, &e.actor);
    }

    fn entry(&self, e: &Envelope, action: Cow<'static, str>, outcome: Outcome, reason: Option<String>) -> AuditEntry {
        AuditEntry {
            position: e.position,
            version: e.version,
            at: e.recorded_at,
            actor: e.actor.clone(),
            action,
            outcome,
            causation_id: e.causation_id.clone(),
            correlation_id: e.correlation_id.clone(),
            reason,
        }
    }

    fn round_mut(&mut self, round: u32) -> Option<&mut RoundView> {
        let i = self.rounds.iter().rposition(|r| r.round == round)?;
        self.touched.0.insert(i);
        self.rounds.get_mut(i)
    }

    fn end(&mut self, state: Status, reason: Option<&str>, at: DateTime<Utc>) {
        self.status.state = state;
        if let Some(r) = reason {
            self.status.failure = Some(r.into());
        }
        self.status.ended_at = Some(at);
    }

    fn define(&mut self, name: &str, spec: &flame_events::job::RunSpec, tasks: &[flame_events::job::TaskSpec]) {
        self.status.name = name.into();
        self.status.rounds_total = spec.rounds;
        self.status.optimizer = spec.optimizer.name().to_string();
        self.tasks = tasks
            .iter()
            .map(|t| (t.task_id.clone(), TaskHistory { role: t.role.clone(), dataset: t.dataset.clone(), ..TaskHistory::default() }))
            .collect();
    }

    fn fold(&mut self, event: JobEvent, at: DateTime<Utc>, actor: &str) {
        match event {
            JobEvent::JobCreated { name, spec, tasks, .. } => {
                self.define(&name, &spec, &tasks);
                self.status.state = Status::Ready;
                self.status.created_at = Some(at);
            }
            JobEvent::JobUpdated { name, spec, tasks, .. } => self.define(&name, &spec, &tasks),
            JobEvent::JobForked(origin) => {
                self.status.global_model = Some(origin.model.clone());
                self.status.round = origin.from_round.saturating_sub(1);
                self.status.rounds_completed = origin.from_round.saturating_sub(1);
                for t in &origin.excluded {
                    self.tasks.remove(t);
                }
                // The model it starts from, made by the parent job.
                self.lineage.push(ModelNode {
                    digest: origin.model.clone(),
                    round: origin.from_round.saturating_sub(1),
                    parent: None,
                    inputs: Vec::new(),
                    made_by: format!("job:{}", origin.parent_job),
                    metrics: Metrics::new(),
                    at,
                });
                self.forked_from = Some(origin);
            }
            JobEvent::JobStarting {} => self.status.state = Status::Starting,
            JobEvent::TaskAssigned { task_id, worker_id } => {
                let task = self.tasks.entry(task_id.clone()).or_default();
                task.placements.push(Placement { worker_id: worker_id.clone(), at });
                task.orphaned = false;
                self.workers.entry(worker_id).or_default().tasks.insert(task_id);
            }
            JobEvent::JobDeploying {} => self.status.state = Status::Deploying,
            JobEvent::TaskDeployed { task_id, .. } => self.tasks.entry(task_id).or_default().deployed_at = Some(at),
            JobEvent::JobStarted {} => {
                self.status.state = Status::Running;
                self.status.started_at = Some(at);
            }
            JobEvent::TimerSet { .. } | JobEvent::TimerFired { .. } => {}
            JobEvent::WorkerLost { worker_id, orphaned } => {
                self.workers.entry(worker_id).or_default().lost_at = Some(at);
                for t in orphaned {
                    self.tasks.entry(t).or_default().orphaned = true;
                }
            }
            JobEvent::ModelInitialized { digest, worker_id } => {
                self.status.global_model = Some(digest.clone());
                self.workers.entry(worker_id).or_default().models += 1;
                self.lineage.push(ModelNode {
                    digest,
                    round: 0,
                    parent: None,
                    inputs: Vec::new(),
                    made_by: actor.into(),
                    metrics: Metrics::new(),
                    at,
                });
            }
            JobEvent::RoundStarted { round, global_model, selected } => {
                self.status.round = round;
                self.touched.0.insert(self.rounds.len());
                let (early, later): (Vec<EarlyUpdate>, Vec<EarlyUpdate>) =
                    std::mem::take(&mut self.early).into_iter().partition(|e| e.round == round);
                self.early = later;
                self.rounds.push(RoundView {
                    round,
                    start_model: global_model,
                    selected,
                    model: None,
                    participants: early.into_iter().map(|e| e.participant).collect(),
                    stragglers: Vec::new(),
                    excluded: Vec::new(),
                    failed: Vec::new(),
                    rejected: 0,
                    pairing: BTreeMap::new(),
                    groups: Vec::new(),
                    inputs: Vec::new(),
                    metrics: Metrics::new(),
                    evaluations: BTreeMap::new(),
                    federated: Metrics::new(),
                    started_at: at,
                    training_done_at: None,
                    closed_at: None,
                });
            }
            JobEvent::UpdateReported { round, task_id, worker_id, digest, samples, metrics, staleness, .. } => {
                let w = match self.workers.get_mut(&worker_id) {
                    Some(w) => w,
                    None => self.workers.entry(worker_id.clone()).or_default(),
                };
                w.updates += 1;
                w.samples += samples;
                let started = self.round_mut(round).map(|r| r.started_at);
                let seconds = started.map_or(0.0, |s| seconds_between(s, at));
                let update = TaskUpdate { round, samples, seconds };
                match self.tasks.get_mut(&task_id) {
                    Some(t) => t.updates.push(update),
                    None => self.tasks.entry(task_id.clone()).or_default().updates.push(update),
                }
                let participant = Participant { task_id, worker_id, digest, samples, metrics, at, staleness };
                match self.round_mut(round) {
                    Some(r) => {
                        r.training_done_at = Some(at);
                        r.participants.push(participant);
                    }
                    None => self.early.push(EarlyUpdate { round, participant }),
                }
            }
            JobEvent::RoundCoordinated { round, pairing } => {
                if let Some(r) = self.round_mut(round) {
                    r.pairing = pairing;
                }
            }
            JobEvent::GroupAggregated { round, task_id, worker_id, digest, samples, inputs, metrics } => {
                if let Some(r) = self.round_mut(round) {
                    r.groups.push(GroupAggregate { task_id, worker_id, digest, samples, inputs, metrics, at });
                }
            }
            JobEvent::TrainingClosed { round, dropped } => {
                for t in &dropped {
                    self.tasks.entry(t.clone()).or_default().missed.push(round);
                }
                if let Some(r) = self.round_mut(round) {
                    r.training_done_at = Some(at);
                    r.stragglers = dropped;
                }
            }
            JobEvent::TrainingFailed { round, task_id, worker_id, error } => {
                self.tasks.entry(task_id.clone()).or_default().failed.push(round);
                if let Some(r) = self.round_mut(round) {
                    r.failed.push(Failure { task_id, worker_id, error });
                }
            }
            // What a budget kept out shows in the audit (the round it concerns starts after it).
            JobEvent::PrivacyRefused { .. } => {}
            JobEvent::UpdateExcluded { round, task_id, digest, reason } => {
                self.status.excluded += 1;
                self.tasks.entry(task_id.clone()).or_default().excluded += 1;
                if let Some(r) = self.round_mut(round) {
                    r.excluded.push(Exclusion { task_id, digest, reason });
                }
            }
            JobEvent::ReportRejected { round, task_id, worker_id, .. } => {
                self.status.rejected += 1;
                if let Some(t) = self.tasks.get_mut(&task_id) {
                    t.rejected += 1;
                }
                self.workers.entry(worker_id).or_default().rejected += 1;
                if let Some(r) = self.round_mut(round) {
                    r.rejected += 1;
                }
            }
            JobEvent::RoundAggregated { round, digest, inputs, metrics, .. } => {
                self.status.rounds_completed = round;
                self.status.global_model = Some(digest.clone());
                self.status.metrics = metrics.clone();
                if let Some(w) = actor.strip_prefix("worker:") {
                    self.workers.entry(w.to_string()).or_default().models += 1;
                }
                let (parent, lineage_inputs) = match self.round_mut(round) {
                    Some(r) => {
                        r.model = Some(digest.clone());
                        r.inputs = inputs.clone();
                        r.metrics = metrics.clone();
                        r.closed_at = Some(at);
                        let lineage_inputs = inputs
                            .iter()
                            .map(|d| match r.participants.iter().find(|p| &p.digest == d) {
                                Some(p) => LineageInput {
                                    digest: d.clone(),
                                    task_id: p.task_id.clone(),
                                    worker_id: p.worker_id.clone(),
                                    samples: p.samples,
                                },
                                None => LineageInput { digest: d.clone(), task_id: String::new(), worker_id: String::new(), samples: 0 },
                            })
                            .collect();
                        (Some(r.start_model.clone()), lineage_inputs)
                    }
                    None => (None, Vec::new()),
                };
                self.lineage.push(ModelNode { digest, round, parent, inputs: lineage_inputs, made_by: actor.into(), metrics, at });
            }
            JobEvent::JobCompleted { final_model, metrics, .. } => {
                self.status.global_model = Some(final_model);
                self.status.metrics = metrics;
                self.end(Status::Completed, None, at);
            }
            JobEvent::JobFailed { reason } => self.end(Status::Failed, Some(&reason), at),
            JobEvent::JobStopping { reason } => {
                self.status.state = Status::Stopping;
                self.status.failure = Some(reason);
            }
            JobEvent::ModelEvaluated { round, task_id, metrics, .. } => {
                if let Some(r) = self.round_mut(round) {
                    r.evaluations.insert(task_id, metrics);
                    r.federated = federated(&r.evaluations);
                }
            }
            JobEvent::JobTerminated { reason } => self.end(Status::Terminated, Some(&reason), at),
            JobEvent::JobDeleted {} => self.end(Status::Deleted, None, at),
        }
    }
}

/// Sample-weighted means of the trainers' evaluations (`test_samples` is summed).
pub fn federated(evaluations: &BTreeMap<String, Metrics>) -> Metrics {
    let total: f64 = evaluations.values().map(|m| m.get("test_samples").copied().unwrap_or(0.0)).sum();
    let mut out = Metrics::new();
    if total <= 0.0 {
        return out;
    }
    for m in evaluations.values() {
        let w = m.get("test_samples").copied().unwrap_or(0.0) / total;
        for (k, v) in m.iter().filter(|(k, _)| k.as_str() != "test_samples") {
            *out.entry(k.clone()).or_insert(0.0) += w * v;
        }
    }
    out.insert("test_samples".into(), total);
    out
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// A one-line description of an event for the audit log.
pub fn detail(event: &JobEvent) -> String {
    match event {
        JobEvent::JobCreated { name, source, spec, tasks, .. } => {
            format!("created '{name}' from {source}: {} task(s), {} round(s), {}", tasks.len(), spec.rounds, spec.optimizer.name())
        }
        JobEvent::JobUpdated { name, tasks, .. } => format!("definition of '{name}' replaced: {} task(s)", tasks.len()),
        JobEvent::JobForked(o) => {
            let without = if o.excluded.is_empty() { String::new() } else { format!(", without [{}]", o.excluded.join(", ")) };
            let changed =
                if o.changed.is_empty() { String::new() } else { format!(", changed {}", serde_json::Value::Object(o.changed.clone())) };
            format!("forked from job {} before round {} (model {}){without}{changed}", o.parent_job, o.from_round, short(&o.model))
        }
        JobEvent::JobStarting {} => "start asked for".into(),
        JobEvent::TaskAssigned { task_id, worker_id } => format!("{task_id} placed on {worker_id}"),
        JobEvent::JobDeploying {} => "deploying tasks".into(),
        JobEvent::TaskDeployed { task_id, worker_id, samples } => match samples {
            Some(n) => format!("{worker_id} confirmed {task_id} ({n} training rows)"),
            None => format!("{worker_id} confirmed {task_id}"),
        },
        JobEvent::JobStarted {} => "rounds begin".into(),
        JobEvent::TimerSet { timer, due_at_ms } => {
            let due = DateTime::<Utc>::from_timestamp_millis(*due_at_ms as i64).map(|t| t.to_rfc3339()).unwrap_or_default();
            format!("timer {timer} due {due}")
        }
        JobEvent::TimerFired { timer } => format!("timer {timer} fired"),
        JobEvent::WorkerLost { worker_id, orphaned } => format!("{worker_id} lost; orphaned: [{}]", orphaned.join(", ")),
        JobEvent::ModelInitialized { digest, worker_id } => format!("initial model {} by {worker_id}", short(digest)),
        JobEvent::RoundStarted { round, global_model, selected } if !selected.is_empty() => {
            format!("round {round} from {}; selected [{}]", short(global_model), selected.join(", "))
        }
        JobEvent::RoundStarted { round, global_model, .. } => format!("round {round} from {}", short(global_model)),
        JobEvent::UpdateReported { round, task_id, digest, samples, staleness: 0, .. } => {
            format!("round {round}: {task_id} update {} ({samples} samples)", short(digest))
        }
        JobEvent::UpdateReported { round, task_id, digest, samples, staleness, .. } => {
            format!("round {round}: {task_id} update {} ({samples} samples, {staleness} model(s) stale)", short(digest))
        }
        JobEvent::RoundCoordinated { round, pairing } => {
            let pairs: Vec<String> = pairing.iter().map(|(t, a)| format!("{t}->{a}")).collect();
            format!("round {round}: paired {}", pairs.join(", "))
        }
        JobEvent::GroupAggregated { round, task_id, digest, samples, inputs, .. } => {
            format!("round {round}: {task_id} combined {} update(s) -> {} ({samples} samples)", inputs.len(), short(digest))
        }
        JobEvent::TrainingClosed { round, dropped } => format!("round {round} closed at its deadline; dropped [{}]", dropped.join(", ")),
        JobEvent::UpdateExcluded { round, task_id, reason, .. } => format!("round {round}: {task_id} left out: {reason}"),
        JobEvent::PrivacyRefused { round, task_id, dataset, spent_epsilon, epsilon_after, budget } => format!(
            "round {round}: {task_id} sits out: its dataset {dataset} has spent epsilon {spent_epsilon:.3}, this round would make it {epsilon_after:.3}, over its budget of {} (delta {:e})",
            budget.epsilon, budget.delta
        ),
        JobEvent::TrainingFailed { round, task_id, worker_id, error } => {
            format!("round {round}: {task_id} on {worker_id} failed to train, sits the round out: {error}")
        }
        JobEvent::ReportRejected { round, task_id, worker_id, reason, .. } => {
            format!("round {round}: report of {task_id} from {worker_id} refused: {reason}")
        }
        JobEvent::RoundAggregated { round, digest, inputs, metrics, .. } => {
            let m: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
            format!("round {round}: {} update(s) -> {} {}", inputs.len(), short(digest), m.join(" "))
        }
        JobEvent::ModelEvaluated { round, task_id, metrics, .. } => {
            let m: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
            format!("round {round}'s model evaluated by {task_id}: {}", m.join(" "))
        }
        JobEvent::JobCompleted { rounds_completed, final_model, .. } => {
            format!("completed after {rounds_completed} round(s), final model {}", short(final_model))
        }
        JobEvent::JobFailed { reason } => format!("failed: {reason}"),
        JobEvent::JobStopping { reason } => format!("stopping: {reason}"),
        JobEvent::JobTerminated { reason } => format!("terminated: {reason}"),
        JobEvent::JobDeleted {} => "deleted".into(),
    }
}

/// Folds a job's events into a fresh view.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> JobView {
    let mut view = JobView::default();
    for e in events {
        view.apply(e);
    }
    view
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use flame_events::job::RunSpec;

    #[test]
    fn federated_metrics_are_means_weighted_by_test_samples() {
        let m = |acc: f64, n: f64| Metrics::from([("accuracy".to_string(), acc), ("test_samples".to_string(), n)]);
        let evaluations = BTreeMap::from([("t0".to_string(), m(0.5, 10.0)), ("t1".to_string(), m(1.0, 30.0))]);
        let f = federated(&evaluations);
        assert!((f["accuracy"] - 0.875).abs() < 1e-12, "{f:?}");
        assert_eq!(f["test_samples"], 40.0);
        assert!(federated(&BTreeMap::new()).is_empty());
    }

    fn envelope(job: &str, version: u64, position: u64, e: &JobEvent, actor: &str) -> Envelope {
        let n = e.to_new_event(job, actor);
        Envelope {
            event_id: n.event_id,
            stream_id: format!("job-{job}"),
            version,
            position,
            event_type: n.event_type,
            schema_version: 1,
            payload: n.payload,
            recorded_at: DateTime::from_timestamp(1_000_000 + position as i64, 0).expect("time"),
            causation_id: Some(format!("cmd-{position}")),
            correlation_id: Some(job.into()),
            actor: n.actor,
        }
    }

    fn created() -> JobEvent {
        JobEvent::JobCreated {
            job_id: "j".into(),
            name: "n".into(),
            source: "s".into(),
            spec: RunSpec {
                rounds: 3,
                model: flame_events::model::Model::default(),
                hyperparameters: serde_json::json!({}),
                seed: 1,
                ..RunSpec::default()
            },
            tasks: ["t0", "t1", "agg"]
                .iter()
                .map(|t| flame_events::job::TaskSpec {
                    task_id: (*t).into(),
                    role: if *t == "agg" { "aggregator".into() } else { "trainer".into() },
                    is_data_consumer: *t != "agg",
                    group_association: Default::default(),
                    channels: vec![],
                    dataset: None,
                    realm: None,
                    colocate: None,
                })
                .collect(),
        }
    }

    /// Any job event with small ids, so that rounds, tasks and workers collide.
    fn event() -> impl Strategy<Value = (JobEvent, String)> {
        let task = prop::sample::select(vec!["t0", "t1", "agg", "t9"]).prop_map(String::from);
        let worker = prop::sample::select(vec!["w0", "w1", "w2"]).prop_map(String::from);
        let digest = prop::sample::select(vec!["d0", "d1", "d2", "d3"]).prop_map(String::from);
        let round = 0u32..4;
        let ev = prop_oneof![
            Just(created()),
            Just(JobEvent::JobStarting {}),
            (task.clone(), worker.clone()).prop_map(|(task_id, worker_id)| JobEvent::TaskAssigned { task_id, worker_id }),
            Just(JobEvent::JobDeploying {}),
            (task.clone(), worker.clone()).prop_map(|(task_id, worker_id)| JobEvent::TaskDeployed { task_id, worker_id, samples: None }),
            Just(JobEvent::JobStarted {}),
            (digest.clone(), worker.clone()).prop_map(|(digest, worker_id)| JobEvent::ModelInitialized { digest, worker_id }),
            (round.clone(), digest.clone()).prop_map(|(round, global_model)| JobEvent::RoundStarted {
                round,
                global_model,
                selected: vec![]
            }),
            (round.clone(), task.clone(), worker.clone(), digest.clone(), 1u64..100, 0u32..3).prop_map(
                |(round, task_id, worker_id, digest, samples, staleness)| {
                    let metrics = Metrics::from([("loss".into(), 0.5)]);
                    JobEvent::UpdateReported { round, task_id, worker_id, digest, samples, metrics, staleness, client_state: None }
                }
            ),
            (round.clone(), task.clone(), worker.clone(), digest.clone(), prop::collection::vec(digest.clone(), 0..3)).prop_map(
                |(round, task_id, worker_id, digest, inputs)| JobEvent::GroupAggregated {
                    round,
                    task_id,
                    worker_id,
                    digest,
                    samples: 20,
                    inputs,
                    metrics: Metrics::new()
                }
            ),
            (round.clone(), task.clone(), task.clone())
                .prop_map(|(round, t, a)| JobEvent::RoundCoordinated { round, pairing: BTreeMap::from([(t, a)]) }),
            (round.clone(), task.clone()).prop_map(|(round, t)| JobEvent::TrainingClosed { round, dropped: vec![t] }),
            (round.clone(), task.clone(), digest.clone()).prop_map(|(round, task_id, digest)| JobEvent::UpdateExcluded {
                round,
                task_id,
                digest,
                reason: "NaN".into()
            }),
            (round.clone(), task.clone(), worker.clone()).prop_map(|(round, task_id, worker_id)| JobEvent::ReportRejected {
                command_id: "c".into(),
                task_id,
                worker_id,
                round,
                reason: "duplicate".into()
            }),
            (round.clone(), digest.clone(), prop::collection::vec(digest.clone(), 0..3)).prop_map(|(round, digest, inputs)| {
                JobEvent::RoundAggregated {
                    round,
                    digest,
                    inputs,
                    metrics: Metrics::from([("accuracy".into(), 0.9)]),
                    optimizer_state: None,
                }
            }),
            (worker.clone(), task.clone()).prop_map(|(worker_id, t)| JobEvent::WorkerLost { worker_id, orphaned: vec![t] }),
            Just(JobEvent::JobFailed { reason: "r".into() }),
            Just(JobEvent::JobStopping { reason: "s".into() }),
            Just(JobEvent::JobTerminated { reason: "s".into() }),
            digest.prop_map(|final_model| JobEvent::JobCompleted { rounds_completed: 3, final_model, metrics: Metrics::new() }),
        ];
        (ev, prop::sample::select(vec!["engine", "user:ann", "worker:w0", "worker:w1"]).prop_map(String::from))
    }

    fn history(events: &[(JobEvent, String)]) -> Vec<Envelope> {
        events.iter().enumerate().map(|(i, (e, actor))| envelope("j", i as u64 + 1, i as u64 + 1, e, actor)).collect()
    }

    proptest! {
        /// Folding a prefix, storing the view as JSON, loading it back and
        /// folding the rest equals folding everything from scratch.
        #[test]
        fn a_prefix_stored_and_resumed_equals_a_fold_from_scratch(events in prop::collection::vec(event(), 0..60), cut in 0usize..60) {
            let history = history(&events);
            let cut = cut.min(history.len());
            let whole = fold(&history);
            let stored = serde_json::to_string(&fold(&history[..cut])).expect("json");
            let mut resumed: JobView = serde_json::from_str(&stored).expect("decode");
            for e in &history[cut..] {
                resumed.apply(e);
            }
            prop_assert_eq!(serde_json::to_string(&resumed).expect("json"), serde_json::to_string(&whole).expect("json"));
            prop_assert_eq!(whole.audit.len(), history.len());
        }
    }

    #[test]
    fn a_round_records_participants_stragglers_exclusions_refusals_and_lineage() {
        let events = [
            (created(), "user:ann"),
            (JobEvent::TaskAssigned { task_id: "t0".into(), worker_id: "w0".into() }, "engine"),
            (JobEvent::TaskAssigned { task_id: "t1".into(), worker_id: "w1".into() }, "engine"),
            (JobEvent::JobStarted {}, "engine"),
            (JobEvent::ModelInitialized { digest: "m0".into(), worker_id: "w2".into() }, "worker:w2"),
            (JobEvent::RoundStarted { round: 1, global_model: "m0".into(), selected: vec![] }, "engine"),
            (
                JobEvent::UpdateReported {
                    round: 1,
                    task_id: "t0".into(),
                    worker_id: "w0".into(),
                    digest: "u0".into(),
                    samples: 30,
                    metrics: Metrics::from([("loss".into(), 0.25)]),
                    staleness: 0,
                    client_state: None,
                },
                "worker:w0",
            ),
            (
                JobEvent::ReportRejected {
                    command_id: "c".into(),
                    task_id: "t0".into(),
                    worker_id: "w0".into(),
                    round: 1,
                    reason: "task 't0' already reported for round 1".into(),
                },
                "worker:w0",
            ),
            (JobEvent::TrainingClosed { round: 1, dropped: vec!["t1".into()] }, "engine"),
            (JobEvent::WorkerLost { worker_id: "w1".into(), orphaned: vec!["t1".into()] }, "engine"),
            (
                JobEvent::RoundAggregated {
                    round: 1,
                    digest: "m1".into(),
                    inputs: vec!["u0".into()],
                    metrics: Metrics::from([("accuracy".into(), 0.75)]),
                    optimizer_state: None,
                },
                "worker:w2",
            ),
            (JobEvent::JobFailed { reason: "quorum".into() }, "engine"),
        ];
        let history: Vec<Envelope> =
            events.iter().enumerate().map(|(i, (e, a))| envelope("j", i as u64 + 1, 10 + i as u64, e, a)).collect();
        let v = fold(&history);
        assert_eq!((v.job_id.as_str(), v.status.state, v.status.failure.as_deref()), ("j", Status::Failed, Some("quorum")));
        assert_eq!((v.status.rounds_completed, v.status.rejected, v.version, v.position), (1, 1, 12, 21));
        let r = &v.rounds[0];
        assert_eq!(r.participants.iter().map(|p| (p.task_id.as_str(), p.samples)).collect::<Vec<_>>(), [("t0", 30)]);
        assert_eq!((r.stragglers.clone(), r.rejected, r.seconds()), (vec!["t1".to_string()], 1, Some(5.0)));
        assert_eq!(v.tasks["t1"].missed, [1]);
        assert!(v.tasks["t1"].orphaned);
        assert_eq!(v.tasks["t0"].updates[0].seconds, 1.0);
        assert_eq!((v.workers["w0"].updates, v.workers["w0"].rejected, v.workers["w2"].models), (1, 1, 2));
        assert!(v.workers["w1"].lost_at.is_some());
        let m1 = &v.lineage[1];
        assert_eq!((m1.parent.as_deref(), m1.made_by.as_str()), (Some("m0"), "worker:w2"));
        assert_eq!((m1.inputs[0].task_id.as_str(), m1.inputs[0].worker_id.as_str(), m1.inputs[0].samples), ("t0", "w0", 30));
        let outcomes: Vec<&str> = v.audit.iter().map(|a| a.outcome.as_str()).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == "rejected").count(), 1);
        assert_eq!(v.audit[7].causation_id.as_deref(), Some("cmd-17"));
        assert!(v.audit[7].reason.as_deref().is_some_and(|r| r.contains("already reported")), "{:?}", v.audit[7]);
        assert_eq!(v.audit[6].reason, None);
    }
}
