//! The job aggregate: a pure state machine. `handle` decides which events a
//! command produces (or rejects it); `apply` folds an event into the state.
//! Time enters only as `now_ms` inside commands, so the aggregate stays pure.
//!
//! - [`transitions`]: Flame's job states and the table of every legal move
//!   (a test checks that each is reachable and nothing else is);
//! - [`command`]: the commands, the rejections, and `handle`;
//! - [`lifecycle`]: creating, starting, placing, deadlines, lost workers,
//!   stopping and ending;
//! - [`round`]: the open round ([`Round`]): who trains, what came in, when an
//!   aggregator is ready, the quorum, the asynchronous buffer;
//! - [`reports`]: one function per kind of worker report;
//! - [`apply`]: the fold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use flame_events::algorithm::Selection;
use flame_events::job::{JobEvent, Metrics, RunSpec, TaskSpec};

mod apply;
pub mod command;
pub mod lifecycle;
mod reports;
pub mod round;
pub mod transitions;

pub use command::{JobCommand, Rejection};
pub use flame_events::job::Status;
pub use lifecycle::{DEFAULT_ROUND_TIMEOUT_S, DEPLOY, MAX_RUN_TIME, round_timer};
pub use round::{Dispatch, Partial, Round};
pub use transitions::{TRANSITIONS, allowed};

/// A job's state, folded from its events.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    /// Job id.
    pub job_id: String,
    /// Name.
    pub name: String,
    /// Where the definition came from.
    pub source: String,
    /// State.
    pub status: Status,
    /// Run settings (shared: set once by the definition, read by every copy of the state).
    pub spec: Option<Arc<RunSpec>>,
    /// Tasks (shared, like the run settings: a copy of a job of thousands of tasks copies none).
    pub tasks: Arc<Vec<TaskSpec>>,
    /// Task id -> the task it uploads to (from the run settings; a coordinator's pairing changes it per round).
    pub parents: BTreeMap<String, String>,
    /// Task id -> worker id.
    pub assignments: BTreeMap<String, String>,
    /// Tasks whose worker confirmed them.
    pub deployed: BTreeSet<String>,
    /// Training rows each data task's worker found at deployment: the most samples an update of it may claim.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dataset_rows: BTreeMap<String, u64>,
    /// Tasks whose worker was lost with no replacement: they sit out.
    pub orphaned: BTreeSet<String>,
    /// The current global model.
    pub global_model: Option<String>,
    /// Rounds aggregated.
    pub rounds_completed: u32,
    /// The latest round started, open until it is aggregated.
    pub round: Round,
    /// What each trainer's updates left behind for later rounds.
    pub records: TrainerRecords,
    /// Metrics of the latest global model.
    pub metrics: Metrics,
    /// Federated evaluation of the latest round whose global model the trainers evaluate.
    #[serde(default)]
    pub evaluation: Evaluation,
    /// Digest of the server optimizer's state, for adaptive optimizers and SCAFFOLD.
    pub optimizer_state: Option<String>,
    /// Armed timers: name -> due time (ms since the epoch).
    pub timers: BTreeMap<String, u64>,
    /// Why it failed, or why it was stopped.
    pub failure: Option<String>,
    /// Reports refused so far.
    pub rejected: u64,
    /// Events applied (the stream version).
    pub version: u64,
    /// Where the job was forked from, if it is a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<flame_events::job::ForkOrigin>,
    /// Task id -> its place in `tasks`, built with them: a report finds its task without a scan.
    #[serde(skip)]
    task_index: Arc<HashMap<String, usize>>,
}

/// Federated evaluation of one round's global model: the trainers asked,
/// and those that reported.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// The round whose global model is evaluated (0: none yet).
    pub round: u32,
    /// That global model.
    pub model: String,
    /// The trainers that evaluate it: those whose updates made it.
    pub tasks: BTreeSet<String>,
    /// Those that reported.
    pub reported: BTreeSet<String>,
}

/// What trainers' accepted updates leave for the rounds after theirs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerRecords {
    /// SCAFFOLD / FedDyn: each trainer's latest state (digest), handed back with its next training.
    pub client_states: BTreeMap<String, String>,
    /// Oort: what each trainer's last update said of its usefulness and speed.
    pub oort: BTreeMap<String, crate::oort::Stats>,
    /// Updates each trainer made (with differential privacy, each is one run of the mechanism on its dataset).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub updates_made: BTreeMap<String, u64>,
    /// Coordinated jobs: training samples of each trainer's last update (what the coordinator balances).
    pub samples: BTreeMap<String, u64>,
}

/// Each task's parent: the run settings' uplinks, or for jobs recorded
/// before hierarchies ran (no uplinks) every trainer under the one aggregator.
fn parents(spec: &RunSpec, tasks: &[TaskSpec]) -> BTreeMap<String, String> {
    if !spec.uplinks.is_empty() {
        return spec.uplinks.clone();
    }
    let Some(agg) = tasks.iter().find(|t| !t.is_data_consumer) else { return BTreeMap::new() };
    tasks.iter().filter(|t| t.is_data_consumer).map(|t| (t.task_id.clone(), agg.task_id.clone())).collect()
}

impl Job {
    /// Rebuilds a job from its events.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a JobEvent>) -> Self {
        let mut job = Self::default();
        for e in events {
            job.apply(e);
        }
        job
    }

    /// Whether a round is started and not yet aggregated.
    pub fn round_open(&self) -> bool {
        self.round.number > self.rounds_completed
    }

    /// Rounds the job runs.
    pub fn total_rounds(&self) -> u32 {
        self.spec.as_ref().map_or(0, |s| s.rounds)
    }

    /// Milliseconds a round, or the deployment, may take.
    pub fn round_timeout_ms(&self) -> u64 {
        self.spec.as_ref().and_then(|s| s.round_timeout_s).unwrap_or(DEFAULT_ROUND_TIMEOUT_S).saturating_mul(1000)
    }

    /// The earliest armed timer.
    pub fn next_timer(&self) -> Option<(&str, u64)> {
        self.timers.iter().min_by_key(|(name, due)| (**due, name.as_str())).map(|(n, d)| (n.as_str(), *d))
    }

    /// Which trainers take part in a round.
    pub fn selection(&self) -> Selection {
        self.spec.as_ref().map(|s| s.selection).unwrap_or_default()
    }

    /// Whether the job aggregates asynchronously (FedBuff): every `goal` updates, no barrier.
    pub fn is_async(&self) -> bool {
        self.selection().is_asynchronous()
    }

    /// Whether trainers keep a state between rounds (SCAFFOLD, FedDyn).
    pub fn keeps_client_state(&self) -> bool {
        self.spec.as_ref().is_some_and(|s| s.optimizer.keeps_client_state())
    }

    /// The top aggregator: the task that makes the global model (it reports to no one).
    pub fn aggregator(&self) -> Option<&TaskSpec> {
        self.aggregators().find(|t| !self.parents.contains_key(&t.task_id))
    }

    /// Every aggregating task: the top aggregator and any middle aggregators (not a coordinator).
    pub fn aggregators(&self) -> impl Iterator<Item = &TaskSpec> {
        let coordinator = self.coordinator();
        self.tasks.iter().filter(move |t| !t.is_data_consumer && Some(t.task_id.as_str()) != coordinator)
    }

    /// Coordinated jobs: the coordinator's task id.
    pub fn coordinator(&self) -> Option<&str> {
        self.spec.as_ref().and_then(|s| s.coordinator.as_deref())
    }

    /// The tasks that upload to `task`.
    pub fn children<'a>(&'a self, task: &'a str) -> impl Iterator<Item = &'a TaskSpec> + 'a {
        self.tasks.iter().filter(move |t| self.parents.get(&t.task_id).is_some_and(|p| p == task))
    }

    /// The data-consuming tasks.
    pub fn trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.tasks.iter().filter(|t| t.is_data_consumer)
    }

    /// Trainers that still owe the latest evaluation (not those whose worker was lost).
    pub fn evaluations_owed(&self) -> impl Iterator<Item = &String> {
        self.evaluation.tasks.iter().filter(|t| !self.evaluation.reported.contains(*t) && !self.orphaned.contains(*t))
    }

    /// The task of this id.
    pub fn task(&self, task_id: &str) -> Option<&TaskSpec> {
        match self.task_index.get(task_id) {
            Some(&i) => self.tasks.get(i),
            // A state not folded from events (deserialized) has no index.
            None if self.task_index.is_empty() => self.tasks.iter().find(|t| t.task_id == task_id),
            None => None,
        }
    }

    /// Trainers that still have a worker.
    pub fn active_trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.trainers().filter(|t| !self.orphaned.contains(&t.task_id))
    }
}
