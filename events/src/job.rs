//! The events of a job's stream (`job-<id>`), version 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::algorithm::{Selection, ServerOptimizer, Training};
use crate::model::Model;
use crate::upcast::Upcasters;
use crate::{Envelope, NewEvent, store};

/// Metrics by name (`accuracy`, `loss`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// Flame's job states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing recorded yet.
    #[default]
    New,
    /// Created; may be updated, started or deleted.
    Ready,
    /// Start asked for; tasks are being placed on workers.
    Starting,
    /// Tasks placed; workers are confirming they can run them.
    Deploying,
    /// Rounds run.
    Running,
    /// A stop was asked for (by a user or `maxRunTime`).
    Stopping,
    /// All rounds done.
    Completed,
    /// Stopped by an error.
    Failed,
    /// Stopped before the end.
    Terminated,
    /// Removed (its events stay).
    Deleted,
}

impl Status {
    /// Every state, for tables and tests.
    pub const ALL: [Status; 10] = [
        Self::New,
        Self::Ready,
        Self::Starting,
        Self::Deploying,
        Self::Running,
        Self::Stopping,
        Self::Completed,
        Self::Failed,
        Self::Terminated,
        Self::Deleted,
    ];

    /// Whether the job can change no more (except by deletion).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Terminated | Self::Deleted)
    }

    /// Whether the engine is working on the job.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Starting | Self::Deploying | Self::Running | Self::Stopping)
    }

    /// The state's name, as stored and shown (`running`).
    pub fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Ready => "ready",
            Self::Starting => "starting",
            Self::Deploying => "deploying",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Terminated => "terminated",
            Self::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One task of an expanded job: a role instance, with its dataset if it consumes data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Task id, unique in the job (e.g. `trainer-0`).
    pub task_id: String,
    /// The role from the design (`trainer`, `aggregator`, ...).
    pub role: String,
    /// Whether the role consumes data (trains).
    pub is_data_consumer: bool,
    /// Channel name -> group this task belongs to on that channel.
    pub group_association: BTreeMap<String, String>,
    /// Names of the channels the role takes part in.
    pub channels: Vec<String>,
    /// Dataset URL for data consumers.
    pub dataset: Option<String>,
    /// Realm of the dataset (where its data lives), used to place the task.
    pub realm: Option<String>,
    /// Runs on the same worker as this task (a ring's reduction runs on its leader's worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colocate: Option<String>,
}

/// What the engine needs to run a job's rounds, fixed at creation: compiled
/// from the definition once (schema version 2 of `JobCreated`/`JobUpdated`;
/// version 1 kept the algorithms as names and arguments, lifted on read by
/// [`upcasters`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Number of rounds.
    pub rounds: u32,
    /// How the top aggregator makes the next global model.
    pub optimizer: ServerOptimizer,
    /// Which trainers take part in a round, and when it closes.
    #[serde(default)]
    pub selection: Selection,
    /// How trainers train.
    #[serde(default)]
    pub training: Training,
    /// The model trainers train (its JSON form is `{"name": "mlp", "hidden": [32]}` in every schema version).
    pub model: Model,
    /// The hyperparameters as the job gave them (for the record; trainers get `training`).
    pub hyperparameters: serde_json::Value,
    /// Seed for model initialisation and training.
    pub seed: u64,
    /// Seconds the job may run from its start before it is terminated (Flame's `maxRunTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_run_time_s: Option<u64>,
    /// Seconds a round may wait for updates before it closes by quorum or fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_timeout_s: Option<u64>,
    /// Fewest updates a round may aggregate (`minClients`); all selected trainers when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// Task id -> the task it uploads to (its aggregator); the top aggregator has none.
    /// Empty in jobs recorded before hierarchies ran: every trainer reports to the one aggregator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub uplinks: BTreeMap<String, String>,
    /// Coordinated jobs: the coordinator's task id; it pairs trainers with aggregators each round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Coordinated jobs: task id -> the aggregators it may upload to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub candidates: BTreeMap<String, Vec<String>>,
    /// Differential privacy budgets of the job's datasets (dataset URL -> the
    /// most all jobs together may spend on it; schema version 3 of
    /// `JobCreated`/`JobUpdated`, absent before).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub privacy_budgets: BTreeMap<String, PrivacyBudget>,
    /// Federated evaluation (`evalEvery`): every this many rounds, and after
    /// the last, the round's trainers evaluate the new global model on their
    /// own held-out data. 0: never.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eval_every: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RunSpec {
    /// Whether the trainers evaluate round `round`'s global model.
    pub fn evaluates(&self, round: u32) -> bool {
        self.eval_every > 0 && round > 0 && (round.is_multiple_of(self.eval_every) || round == self.rounds)
    }
}

/// The most (ε, δ)-differential privacy all jobs together may spend on a dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyBudget {
    /// ε.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// Where a forked job starts: a parent job's global model after a round,
/// with what the parent's rounds left for the ones after it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForkOrigin {
    /// The job it was forked from.
    pub parent_job: String,
    /// The first round the fork runs; it starts from the parent's global model after the round before (0: the initial model).
    pub from_round: u32,
    /// Digest of that model.
    pub model: String,
    /// The parent's server optimizer state after that round (adaptive optimizers, SCAFFOLD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_state: Option<String>,
    /// Each remaining trainer's state after its last update before the fork (SCAFFOLD, FedDyn, FedBN).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub client_states: BTreeMap<String, String>,
    /// The parent's trainer tasks left out of the fork.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    /// Hyperparameters the fork changed (name -> new value).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub changed: serde_json::Map<String, serde_json::Value>,
}

/// Every event in a job stream.
// JobCreated is large and rare; boxing it would only complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum JobEvent {
    /// The job was submitted and expanded into tasks.
    JobCreated {
        /// Job id.
        job_id: String,
        /// Job name (the design's name or the folder's).
        name: String,
        /// Where the definition came from.
        source: String,
        /// Run settings.
        spec: RunSpec,
        /// The expanded tasks.
        tasks: Vec<TaskSpec>,
    },
    /// The job is a fork: it starts from another job's model after a round
    /// (recorded right after `JobCreated`, in the same append).
    JobForked(ForkOrigin),
    /// The job's definition was replaced while it was not running.
    JobUpdated {
        /// Job name.
        name: String,
        /// Where the definition came from.
        source: String,
        /// Run settings.
        spec: RunSpec,
        /// The expanded tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Someone asked the job to start; the engine now places its tasks.
    JobStarting {},
    /// A task was placed on a worker (again, after its worker was lost).
    TaskAssigned {
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
    },
    /// Every task is placed; the engine deploys them to their workers.
    JobDeploying {},
    /// A worker confirmed it can run its task (its dataset and model load).
    TaskDeployed {
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
        /// Training rows the worker found in the task's dataset (schema
        /// version 2; absent before, and for tasks without data): no update
        /// of the task may claim more samples than this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        samples: Option<u64>,
    },
    /// Every task is deployed; rounds run.
    JobStarted {},
    /// A durable timer was armed: when `due_at_ms` passes the engine acts, even after a restart.
    TimerSet {
        /// Timer name (`max-run-time`, `round-3`).
        timer: String,
        /// Due time, milliseconds since the Unix epoch.
        due_at_ms: u64,
    },
    /// A timer came due and was acted on.
    TimerFired {
        /// Timer name.
        timer: String,
    },
    /// A worker running tasks of this job stopped heartbeating.
    WorkerLost {
        /// Worker id.
        worker_id: String,
        /// Its tasks that found no other worker (they sit out until one appears).
        orphaned: Vec<String>,
    },
    /// The initial global model exists.
    ModelInitialized {
        /// sha256 of the safetensors blob.
        digest: String,
        /// Worker that made it.
        worker_id: String,
    },
    /// A round began from a global model.
    RoundStarted {
        /// Round number, from 1.
        round: u32,
        /// Digest of the global model trainers start from.
        global_model: String,
        /// Trainer tasks chosen for this round by the selector; empty: every trainer with a worker.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        selected: Vec<String>,
    },
    /// A trainer's update for a round was accepted.
    UpdateReported {
        /// Round number.
        round: u32,
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
        /// Digest of the updated model.
        digest: String,
        /// Training samples behind the update (the FedAvg weight).
        samples: u64,
        /// Local training metrics.
        metrics: Metrics,
        /// Asynchronous (FedBuff) jobs: how many global models older than the
        /// one this round started from is the model it trained from (0 in synchronous rounds).
        #[serde(default, skip_serializing_if = "crate::is_zero")]
        staleness: u32,
        /// SCAFFOLD / FedDyn: digest of the task's state after this update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_state: Option<String>,
    },
    /// A middle aggregator combined the updates of its group; the result goes up to its own aggregator.
    GroupAggregated {
        /// Round number.
        round: u32,
        /// The middle aggregator's task id.
        task_id: String,
        /// Its worker.
        worker_id: String,
        /// Digest of the group's model.
        digest: String,
        /// Training samples behind it (the sum over its inputs): its weight one tier up.
        samples: u64,
        /// Digests of the trainers' updates it contains, in task order.
        inputs: Vec<String>,
        /// What its worker measured, if anything.
        metrics: Metrics,
    },
    /// The coordinator paired the round's trainers with aggregators.
    RoundCoordinated {
        /// Round number.
        round: u32,
        /// Trainer task id -> the aggregator task it uploads to this round.
        pairing: BTreeMap<String, String>,
    },
    /// A round's training closed at its deadline without every update; the rest are dropped.
    TrainingClosed {
        /// Round number.
        round: u32,
        /// Tasks whose updates did not arrive in time.
        dropped: Vec<String>,
    },
    /// A trainer's worker answered a round's training command `failed` (its
    /// code raised, its data did not load): the task sits out the round,
    /// which goes on with the others while they reach the quorum.
    TrainingFailed {
        /// Round number.
        round: u32,
        /// The trainer task.
        task_id: String,
        /// The worker that reported the failure.
        worker_id: String,
        /// Its error message.
        error: String,
    },
    /// A trainer sits out a round: training on its dataset would take the
    /// privacy spent on it (by every job) past the dataset's budget.
    PrivacyRefused {
        /// Round number.
        round: u32,
        /// The trainer task.
        task_id: String,
        /// Its dataset (URL).
        dataset: String,
        /// ε spent on the dataset before this round, at the budget's δ.
        spent_epsilon: f64,
        /// ε it would be after this round.
        epsilon_after: f64,
        /// The dataset's budget.
        budget: PrivacyBudget,
    },
    /// An aggregator refused an accepted update's blob (audit); it did not enter the aggregate.
    UpdateExcluded {
        /// Round number.
        round: u32,
        /// Task that produced it.
        task_id: String,
        /// Its digest.
        digest: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A report was refused and not applied (audit).
    ReportRejected {
        /// The command the report answered.
        command_id: String,
        /// Task id it claimed.
        task_id: String,
        /// Worker id it claimed.
        worker_id: String,
        /// Round it claimed.
        round: u32,
        /// Why it was refused.
        reason: String,
    },
    /// The aggregator combined the round's updates into a new global model.
    RoundAggregated {
        /// Round number.
        round: u32,
        /// Digest of the new global model.
        digest: String,
        /// Digests of the updates that went in, in task order.
        inputs: Vec<String>,
        /// Evaluation of the new global model.
        metrics: Metrics,
        /// Digest of the server optimizer's state after the round (adaptive optimizers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        optimizer_state: Option<String>,
    },
    /// A trainer evaluated a round's global model on its own held-out data
    /// (federated evaluation: `loss`, `accuracy`, `test_samples`).
    ModelEvaluated {
        /// The round whose global model it evaluated.
        round: u32,
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
        /// Its metrics.
        metrics: Metrics,
    },
    /// All rounds are done.
    JobCompleted {
        /// Rounds completed.
        rounds_completed: u32,
        /// Digest of the final global model.
        final_model: String,
        /// Evaluation of the final model.
        metrics: Metrics,
    },
    /// The job cannot go on.
    JobFailed {
        /// Why.
        reason: String,
    },
    /// A stop was asked for (by a user, or by `maxRunTime`); work in flight is abandoned.
    JobStopping {
        /// Why.
        reason: String,
    },
    /// The job was stopped before it finished.
    JobTerminated {
        /// Why.
        reason: String,
    },
    /// The job was removed; its events stay for audit.
    JobDeleted {},
}

impl JobEvent {
    /// The event's type name, as stored.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::JobCreated { .. } => "JobCreated",
            Self::JobUpdated { .. } => "JobUpdated",
            Self::JobForked(_) => "JobForked",
            Self::PrivacyRefused { .. } => "PrivacyRefused",
            Self::JobStarting {} => "JobStarting",
            Self::TaskAssigned { .. } => "TaskAssigned",
            Self::JobDeploying {} => "JobDeploying",
            Self::TaskDeployed { .. } => "TaskDeployed",
            Self::JobStarted {} => "JobStarted",
            Self::TimerSet { .. } => "TimerSet",
            Self::TimerFired { .. } => "TimerFired",
            Self::WorkerLost { .. } => "WorkerLost",
            Self::TrainingClosed { .. } => "TrainingClosed",
            Self::ReportRejected { .. } => "ReportRejected",
            Self::UpdateExcluded { .. } => "UpdateExcluded",
            Self::TrainingFailed { .. } => "TrainingFailed",
            Self::JobStopping { .. } => "JobStopping",
            Self::JobTerminated { .. } => "JobTerminated",
            Self::JobDeleted {} => "JobDeleted",
            Self::ModelInitialized { .. } => "ModelInitialized",
            Self::RoundStarted { .. } => "RoundStarted",
            Self::UpdateReported { .. } => "UpdateReported",
            Self::GroupAggregated { .. } => "GroupAggregated",
            Self::RoundCoordinated { .. } => "RoundCoordinated",
            Self::RoundAggregated { .. } => "RoundAggregated",
            Self::ModelEvaluated { .. } => "ModelEvaluated",
            Self::JobCompleted { .. } => "JobCompleted",
            Self::JobFailed { .. } => "JobFailed",
        }
    }

    /// Wraps the event for appending, correlated with its job.
    pub fn to_new_event(&self, job_id: &str, actor: &str) -> NewEvent {
        let payload = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let mut event = NewEvent::new(self.event_type(), payload, actor).correlated(job_id);
        event.schema_version = schema_version(self.event_type());
        event
    }

    /// Decodes a stored event of a job stream, upcasting old schema versions.
    pub fn from_envelope(e: &Envelope) -> Result<Self, store::Error> {
        // The common case, without copying the payload: current schema, tagged with its type.
        let current = schema_version(&e.event_type);
        if e.schema_version == current {
            // Most of a job's events are updates: read them field by field, which
            // is several times faster than serde's buffering of tagged enums.
            if e.event_type == "UpdateReported"
                && let Some(event) = decode_update(&e.payload)
            {
                return Ok(event);
            }
            if e.payload.get("type").and_then(serde_json::Value::as_str) == Some(e.event_type.as_str())
                && let Ok(event) = <Self as Deserialize>::deserialize(&e.payload)
            {
                return Ok(event);
            }
        }
        let e = upcasters().upcast(e.clone())?;
        if e.schema_version != current {
            return Err(store::Error::Decode {
                stream: e.stream_id.clone(),
                version: e.version,
                event_type: e.event_type.clone(),
                reason: format!("schema version {} is newer than this program knows ({current}); upgrade flame", e.schema_version),
            });
        }
        let mut payload = e.payload.clone();
        if let Some(map) = payload.as_object_mut() {
            map.insert("type".into(), serde_json::Value::String(e.event_type.clone()));
        }
        serde_json::from_value(payload).map_err(|err| store::Error::Decode {
            stream: e.stream_id.clone(),
            version: e.version,
            event_type: e.event_type.clone(),
            reason: err.to_string(),
        })
    }
}

/// `UpdateReported` read directly from its payload (one pass over its fields,
/// no hashing); `None` sends it down the general path.
fn decode_update(p: &serde_json::Value) -> Option<JobEvent> {
    let (mut round, mut task_id, mut worker_id, mut digest, mut samples, mut metrics) = (None, None, None, None, None, None);
    let mut staleness = 0;
    let mut client_state = None;
    for (k, v) in p.as_object()? {
        match k.as_str() {
            "type" if v.as_str() != Some("UpdateReported") => return None,
            "round" => round = Some(u32::try_from(v.as_u64()?).ok()?),
            "task_id" => task_id = Some(v.as_str()?.to_string()),
            "worker_id" => worker_id = Some(v.as_str()?.to_string()),
            "digest" => digest = Some(v.as_str()?.to_string()),
            "samples" => samples = Some(v.as_u64()?),
            "staleness" => staleness = u32::try_from(v.as_u64()?).ok()?,
            "client_state" => client_state = Some(v.as_str()?.to_string()),
            "metrics" => {
                metrics = Some(v.as_object()?.iter().map(|(k, v)| v.as_f64().map(|v| (k.clone(), v))).collect::<Option<Metrics>>()?)
            }
            _ => {}
        }
    }
    Some(JobEvent::UpdateReported {
        round: round?,
        task_id: task_id?,
        worker_id: worker_id?,
        digest: digest?,
        samples: samples?,
        metrics: metrics?,
        staleness,
        client_state,
    })
}

/// The schema version job events are written with, by type: 2 for the
/// events that carry a [`RunSpec`] (typed algorithms) and for `TaskDeployed`
/// (its training rows), 1 for the rest.
pub fn schema_version(event_type: &str) -> u32 {
    match event_type {
        "JobCreated" | "JobUpdated" => 3,
        "TaskDeployed" => 2,
        _ => 1,
    }
}

/// The upcasters for job events: `JobCreated` and `JobUpdated` from version 1
/// (algorithms as names and arguments) to 2 (typed).
pub fn upcasters() -> &'static Upcasters {
    static UPCASTERS: std::sync::OnceLock<Upcasters> = std::sync::OnceLock::new();
    UPCASTERS.get_or_init(|| {
        let mut u = Upcasters::default();
        u.register("JobCreated", 1, spec_v1_to_v2).register("JobUpdated", 1, spec_v1_to_v2);
        // Version 3 may carry the datasets' privacy budgets; version 2 never did.
        u.register("JobCreated", 2, Ok).register("JobUpdated", 2, Ok);
        // Version 2 of `TaskDeployed` may say how many training rows the task has; version 1 never did.
        u.register("TaskDeployed", 1, Ok);
        u
    })
}

/// Version 1 of a `RunSpec` named its optimizer (`optimizer`,
/// `optimizer_kwargs`), kept selection in `select`, `oort`, `agg_goal` and
/// `concurrency`, and handed trainers the raw hyperparameters (with
/// `client_optimizer`, FedProx's `mu` and FedDyn's `alpha` filled in).
/// Version 2 carries the typed [`ServerOptimizer`], [`Selection`] and
/// [`Training`]. Arguments are taken as recorded (the job ran with them),
/// without version 2's stricter checks.
fn spec_v1_to_v2(mut payload: serde_json::Value) -> Result<serde_json::Value, String> {
    let spec = payload.get_mut("spec").and_then(serde_json::Value::as_object_mut).ok_or("no spec")?;
    let name = spec.remove("optimizer").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let kwargs = match spec.remove("optimizer_kwargs") {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let hyperparameters = match spec.get_mut("hyperparameters") {
        Some(serde_json::Value::Object(h)) => {
            h.remove("client_optimizer");
            h.clone()
        }
        _ => serde_json::Map::new(),
    };
    let mut optimizer = ServerOptimizer::from_record(&name, &kwargs)?;
    if let (ServerOptimizer::FedProx { mu }, Some(m)) = (&mut optimizer, hyperparameters.get("mu").and_then(serde_json::Value::as_f64)) {
        // Version 1 gave the trainers the hyperparameters' `mu` first.
        *mu = m;
    }
    let count =
        |spec: &serde_json::Map<String, serde_json::Value>, k: &str| spec.get(k).and_then(serde_json::Value::as_u64).map(|n| n as u32);
    let selection = match (count(spec, "agg_goal"), count(spec, "oort"), count(spec, "select")) {
        (Some(goal), _, _) => Selection::Buffered { goal, concurrency: count(spec, "concurrency") },
        (None, Some(aggr_num), _) => Selection::Oort { aggr_num },
        (None, None, Some(k)) => Selection::Random { k },
        (None, None, None) => Selection::All,
    };
    for old in ["agg_goal", "concurrency", "oort", "select"] {
        spec.remove(old);
    }
    spec.insert("optimizer".into(), serde_json::to_value(optimizer).map_err(|e| e.to_string())?);
    spec.insert("selection".into(), serde_json::to_value(selection).map_err(|e| e.to_string())?);
    spec.insert("training".into(), serde_json::to_value(Training::from_record(&hyperparameters)).map_err(|e| e.to_string())?);
    Ok(payload)
}

/// The stream id of a job.
pub fn stream_id(job_id: &str) -> String {
    format!("job-{job_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(payload: serde_json::Value) -> Envelope {
        Envelope {
            event_id: uuid::Uuid::now_v7(),
            stream_id: "job-j".into(),
            version: 1,
            position: 1,
            event_type: "UpdateReported".into(),
            schema_version: 1,
            payload,
            recorded_at: chrono::Utc::now(),
            causation_id: None,
            correlation_id: None,
            actor: "worker:w".into(),
        }
    }

    fn created_v1(spec: serde_json::Value) -> Envelope {
        let mut e = envelope(serde_json::json!({"job_id": "j", "name": "n", "source": "s", "spec": spec, "tasks": []}));
        e.event_type = "JobCreated".into();
        e.schema_version = 1;
        e
    }

    #[test]
    fn version_1_specs_are_lifted_to_typed_algorithms() {
        use crate::algorithm::{AdaptiveRule, Privacy};
        let base = |extra: serde_json::Value| {
            let mut spec = serde_json::json!({"rounds": 5, "model": {"name": "mlp"}, "seed": 1,
                "hyperparameters": {"epochs": 2, "batchSize": 16, "learningRate": 0.3}});
            for (k, v) in extra.as_object().expect("object") {
                spec[k] = v.clone();
            }
            spec
        };
        let spec = |e: Envelope| match JobEvent::from_envelope(&e).expect("decodes") {
            JobEvent::JobCreated { spec, .. } => spec,
            other => panic!("{other:?}"),
        };
        let adam = spec(created_v1(base(serde_json::json!({"optimizer": "fedadam", "optimizer_kwargs": {"eta": 0.05}, "select": 2}))));
        assert_eq!(adam.optimizer, ServerOptimizer::Adaptive { rule: AdaptiveRule::Adam, eta: 0.05, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 });
        assert_eq!(adam.selection, Selection::Random { k: 2 });
        assert_eq!(adam.training, Training { epochs: 2, batch_size: 16, learning_rate: 0.3, ..Training::default() });
        // FedProx's mu came to the trainers through the hyperparameters, which won.
        let mut prox = base(serde_json::json!({"optimizer": "fedprox", "optimizer_kwargs": {"mu": 0.5}, "oort": 3}));
        prox["hyperparameters"]["mu"] = serde_json::json!(1.0);
        prox["hyperparameters"]["clip_threshold"] = serde_json::json!(2.0);
        let prox = spec(created_v1(prox));
        assert_eq!((prox.optimizer, prox.selection), (ServerOptimizer::FedProx { mu: 1.0 }, Selection::Oort { aggr_num: 3 }));
        assert_eq!(prox.training.privacy, Some(Privacy { clip_threshold: 2.0, noise_factor: 0.0 }));
        let mut dyn_ = base(serde_json::json!({"optimizer": "feddyn", "optimizer_kwargs": {"alpha": 0.02, "clients": 4}}));
        dyn_["hyperparameters"]["client_optimizer"] = serde_json::json!("feddyn");
        let dyn_ = spec(created_v1(dyn_));
        assert_eq!(dyn_.optimizer, ServerOptimizer::FedDyn { alpha: 0.02 });
        assert!(dyn_.hyperparameters.get("client_optimizer").is_none(), "what v1 filled in for the trainers is gone");
        let buff = spec(created_v1(base(serde_json::json!({"optimizer": "fedbuff", "agg_goal": 2, "concurrency": 4}))));
        assert_eq!(
            (buff.optimizer, buff.selection),
            (ServerOptimizer::FedBuff { eta: 1.0 }, Selection::Buffered { goal: 2, concurrency: Some(4) })
        );
        // Arguments the job ran with are kept, even where today's checks are stricter.
        let odd = spec(created_v1(base(serde_json::json!({"optimizer": "trimmed_mean", "optimizer_kwargs": {"beta": 0.7}}))));
        assert_eq!(odd.optimizer, ServerOptimizer::TrimmedMean { beta: 0.7 });
        // New events are written at version 3 and read back as they were; a version 2 event
        // (no privacy budgets) reads as a version 3 one without any.
        let new = JobEvent::JobCreated { job_id: "j".into(), name: "n".into(), source: "s".into(), spec: adam.clone(), tasks: vec![] };
        let n = new.to_new_event("j", "user:u");
        assert_eq!(n.schema_version, 3);
        let mut e = envelope(n.payload.clone());
        (e.event_type, e.schema_version) = ("JobCreated".into(), 3);
        assert_eq!(JobEvent::from_envelope(&e).expect("v3"), new);
        let mut e2 = envelope(n.payload);
        (e2.event_type, e2.schema_version) = ("JobCreated".into(), 2);
        assert_eq!(JobEvent::from_envelope(&e2).expect("v2"), new);
        let mut budgeted = adam.clone();
        budgeted.privacy_budgets.insert("data.csv".into(), PrivacyBudget { epsilon: 8.0, delta: 1e-5 });
        let with = JobEvent::JobCreated { job_id: "j".into(), name: "n".into(), source: "s".into(), spec: budgeted, tasks: vec![] };
        let mut e3 = envelope(with.to_new_event("j", "user:u").payload);
        (e3.event_type, e3.schema_version) = ("JobCreated".into(), 3);
        assert_eq!(JobEvent::from_envelope(&e3).expect("v3 with budgets"), with);
        // An unknown optimizer in an old event is a decode error that names the event.
        let err = JobEvent::from_envelope(&created_v1(base(serde_json::json!({"optimizer": "fedmagic"})))).expect_err("unknown");
        assert!(err.to_string().contains("JobCreated") && err.to_string().contains("fedmagic"), "{err}");
    }

    #[test]
    fn the_fast_update_decoder_agrees_with_serde_and_defers_to_it_on_anything_odd() {
        let event = JobEvent::UpdateReported {
            round: 3,
            task_id: "trainer-1".into(),
            worker_id: "w1".into(),
            digest: "ab".into(),
            samples: 480,
            metrics: Metrics::from([("loss".into(), 0.25), ("n".into(), 7.0)]),
            staleness: 0,
            client_state: None,
        };
        let payload = event.to_new_event("j", "worker:w1").payload;
        assert_eq!(decode_update(&payload), Some(event.clone()));
        assert!(payload.get("staleness").is_none(), "synchronous updates are written as before");
        let stale = JobEvent::UpdateReported {
            round: 3,
            task_id: "trainer-1".into(),
            worker_id: "w1".into(),
            digest: "ab".into(),
            samples: 480,
            metrics: Metrics::new(),
            staleness: 2,
            client_state: None,
        };
        let stale_payload = stale.to_new_event("j", "worker:w1").payload;
        assert_eq!(stale_payload["staleness"], 2);
        assert_eq!(decode_update(&stale_payload), Some(stale.clone()));
        assert_eq!(JobEvent::from_envelope(&envelope(stale_payload)).expect("decodes"), stale);
        assert_eq!(JobEvent::from_envelope(&envelope(payload.clone())).expect("decodes"), event);
        // Integer metrics read as numbers; an unknown extra field is ignored, as serde does.
        let mut extra = payload.clone();
        extra["metrics"]["n"] = serde_json::json!(7);
        extra["note"] = serde_json::json!("x");
        assert_eq!(JobEvent::from_envelope(&envelope(extra)).expect("decodes"), event);
        // Broken payloads fail with serde's error, naming the field.
        for (field, bad) in [("round", serde_json::json!(-1)), ("samples", serde_json::json!("many")), ("task_id", serde_json::Value::Null)]
        {
            let mut p = payload.clone();
            p[field] = bad;
            assert_eq!(decode_update(&p), None, "{field}");
            let err = JobEvent::from_envelope(&envelope(p)).expect_err("refused").to_string();
            assert!(err.contains("UpdateReported"), "{err}");
        }
        let mut nan = payload;
        nan["metrics"]["loss"] = serde_json::Value::Null;
        assert!(JobEvent::from_envelope(&envelope(nan)).is_err());
    }
}
