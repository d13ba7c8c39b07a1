//! The job aggregate: a pure state machine. `handle` decides which events a
//! command produces (or rejects it); `apply` folds an event into the state.
//! Time enters only as `now_ms` inside commands, so the aggregate stays pure.
//!
//! The lifecycle follows Flame's job states; [`TRANSITIONS`] lists every
//! legal move, and a test checks that each is reachable and nothing else is.

use std::collections::{BTreeMap, BTreeSet};

use flame_events::algorithm::{Selection, over_commit};
use flame_events::job::{JobEvent, Metrics, RunSpec, TaskSpec};
use flame_events::protocol::{Report, ReportBody, UpdateRef};

/// How long a round (or the deployment) may wait when the job names no `roundTimeout`.
pub const DEFAULT_ROUND_TIMEOUT_S: u64 = 600;
/// Timer that stops the job when `maxRunTime` passes.
pub const MAX_RUN_TIME: &str = "max-run-time";
/// Timer that bounds placement, deployment and the initial model.
pub const DEPLOY: &str = "deploy";

/// The timer that bounds round `n`.
pub fn round_timer(n: u32) -> String {
    format!("round-{n}")
}

/// Flame's job states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing recorded yet.
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
}

/// What the job aggregate is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum JobCommand {
    /// Record a new job.
    Create {
        /// Job id.
        job_id: String,
        /// Name.
        name: String,
        /// Where the definition came from.
        source: String,
        /// Run settings.
        spec: RunSpec,
        /// Expanded tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Replace the definition of a job that is not running.
    Update {
        /// Name.
        name: String,
        /// Where the definition came from.
        source: String,
        /// Run settings.
        spec: RunSpec,
        /// Expanded tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Start the job (a user's request).
    Start {
        /// Now, ms since the epoch.
        now_ms: u64,
    },
    /// Place every task on a worker (task id -> worker id).
    Assign(BTreeMap<String, String>),
    /// Take a worker's report.
    Report(Report),
    /// Begin the next round.
    StartRound {
        /// Now, ms since the epoch.
        now_ms: u64,
    },
    /// A durable timer came due.
    Fire {
        /// Timer name.
        timer: String,
        /// Now, ms since the epoch.
        now_ms: u64,
    },
    /// A worker stopped heartbeating; its tasks move to the given workers where one was found.
    LoseWorker {
        /// The lost worker.
        worker_id: String,
        /// Task id -> replacement worker id.
        replacements: BTreeMap<String, String>,
    },
    /// Stop the job (a user's request).
    Stop {
        /// Why.
        reason: String,
    },
    /// Finish stopping.
    Terminate,
    /// Finish after the last round.
    Complete,
    /// Give up.
    Fail(String),
    /// Remove a job that is not active.
    Delete,
    /// Record that a report was refused (audit).
    RecordRejection {
        /// The refused report.
        report: Box<Report>,
        /// Why.
        reason: String,
    },
}

impl JobCommand {
    /// The command's name in the transition table.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Update { .. } => "update",
            Self::Start { .. } => "start",
            Self::Assign(_) => "assign",
            Self::Report(_) => "report",
            Self::StartRound { .. } => "start round",
            Self::Fire { .. } => "fire timer",
            Self::LoseWorker { .. } => "lose worker",
            Self::Stop { .. } => "stop",
            Self::Terminate => "terminate",
            Self::Complete => "complete",
            Self::Fail(_) => "fail",
            Self::Delete => "delete",
            Self::RecordRejection { .. } => "record rejection",
        }
    }
}

/// Every legal move: (state before, command, state after). A command in a
/// state not listed here is refused with [`Rejection::IllegalInState`].
pub const TRANSITIONS: &[(Status, &str, Status)] = {
    use Status::*;
    &[
        (New, "create", Ready),
        (Ready, "update", Ready),
        (Ready, "start", Starting),
        (Ready, "delete", Deleted),
        (Starting, "assign", Deploying),
        (Starting, "fire timer", Failed),
        (Starting, "fire timer", Stopping),
        (Starting, "stop", Stopping),
        (Starting, "fail", Failed),
        (Deploying, "report", Deploying),
        (Deploying, "report", Running),
        (Deploying, "report", Failed),
        (Deploying, "lose worker", Deploying),
        (Deploying, "lose worker", Running),
        (Deploying, "lose worker", Failed),
        (Deploying, "fire timer", Failed),
        (Deploying, "fire timer", Stopping),
        (Deploying, "stop", Stopping),
        (Deploying, "fail", Failed),
        (Running, "report", Running),
        (Running, "report", Failed),
        (Running, "start round", Running),
        (Running, "lose worker", Running),
        (Running, "lose worker", Failed),
        (Running, "fire timer", Running),
        (Running, "fire timer", Failed),
        (Running, "fire timer", Stopping),
        (Running, "stop", Stopping),
        (Running, "complete", Completed),
        (Running, "fail", Failed),
        (Stopping, "terminate", Terminated),
        (Stopping, "fail", Failed),
        (Stopping, "fire timer", Stopping),
        (Completed, "delete", Deleted),
        (Failed, "delete", Deleted),
        (Terminated, "delete", Deleted),
        // Refused reports are recorded in every state a job can be in.
        (Ready, "record rejection", Ready),
        (Starting, "record rejection", Starting),
        (Deploying, "record rejection", Deploying),
        (Running, "record rejection", Running),
        (Stopping, "record rejection", Stopping),
        (Completed, "record rejection", Completed),
        (Failed, "record rejection", Failed),
        (Terminated, "record rejection", Terminated),
        (Deleted, "record rejection", Deleted),
    ]
};

/// Whether the table allows `command` in `status` at all.
pub fn allowed(status: Status, command: &str) -> bool {
    TRANSITIONS.iter().any(|(from, c, _)| *from == status && *c == command)
}

/// Why a command was refused; nothing but an audit record is kept of it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The command does not fit the job's state.
    #[error("cannot {command} while the job is {status:?}")]
    IllegalInState {
        /// What was asked.
        command: &'static str,
        /// The job's state.
        status: Status,
    },
    /// The report names a task the job does not have.
    #[error("task '{0}' is not part of this job")]
    UnknownTask(String),
    /// The report comes from a worker the task is not assigned to.
    #[error("worker '{worker}' reported for task '{task}', which is assigned to '{assigned}'")]
    WrongWorker {
        /// Task.
        task: String,
        /// Reporting worker.
        worker: String,
        /// Assigned worker.
        assigned: String,
    },
    /// The report is for a round that is not open.
    #[error("report for round {got} from task '{task}', but the open round is {open}")]
    WrongRound {
        /// Task.
        task: String,
        /// Round in the report.
        got: u32,
        /// Round open now (0 = none).
        open: u32,
    },
    /// The task already reported for this round.
    #[error("task '{task}' already reported for round {round}")]
    Duplicate {
        /// Task.
        task: String,
        /// Round.
        round: u32,
    },
    /// The report does not fit the task's role or the round's progress.
    #[error("{0}")]
    Unexpected(String),
}

/// A job's state, folded from its events.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    /// Job id.
    pub job_id: String,
    /// Name.
    pub name: String,
    /// Where the definition came from.
    pub source: String,
    /// State.
    pub status: Status,
    /// Run settings.
    pub spec: Option<RunSpec>,
    /// Tasks.
    pub tasks: Vec<TaskSpec>,
    /// Task id -> worker id.
    pub assignments: BTreeMap<String, String>,
    /// Tasks whose worker confirmed them.
    pub deployed: BTreeSet<String>,
    /// Tasks whose worker was lost with no replacement: they sit out.
    pub orphaned: BTreeSet<String>,
    /// The current global model.
    pub global_model: Option<String>,
    /// The latest round started (0 = none).
    pub round: u32,
    /// Rounds aggregated.
    pub rounds_completed: u32,
    /// Trainer tasks selected for the open round (empty: every trainer with a worker).
    pub selected: BTreeSet<String>,
    /// Updates accepted in the open round, by task id.
    pub updates: BTreeMap<String, UpdateRef>,
    /// Middle aggregators' results in the open round, by task id.
    #[serde(default)]
    pub partials: BTreeMap<String, Partial>,
    /// Task id -> the task it uploads to (derived from the definition; the top aggregator has none).
    #[serde(default)]
    pub parents: BTreeMap<String, String>,
    /// Asynchronous jobs: trainers training now, with the round (and model) they started from.
    #[serde(default)]
    pub in_flight: BTreeMap<String, Dispatch>,
    /// Asynchronous jobs: updates that arrived while the open round's buffer was full; they open the next one.
    #[serde(default)]
    pub queued: BTreeMap<String, UpdateRef>,
    /// SCAFFOLD / FedDyn: each trainer's latest state (digest), handed back with its next training.
    #[serde(default)]
    pub client_states: BTreeMap<String, String>,
    /// Oort: what each trainer's last update said of its usefulness and speed.
    #[serde(default)]
    pub oort: BTreeMap<String, crate::oort::Stats>,
    /// Coordinated jobs: the last round the coordinator paired, and each trainer's last samples (what it balances).
    #[serde(default)]
    pub coordinated: u32,
    /// Training samples of each trainer's last accepted update.
    #[serde(default)]
    pub samples: BTreeMap<String, u64>,
    /// Whether the open round stopped taking updates at its deadline.
    pub training_closed: bool,
    /// Metrics of the latest global model.
    pub metrics: Metrics,
    /// Digest of the server optimizer's state, for adaptive optimizers.
    pub optimizer_state: Option<String>,
    /// Armed timers: name -> due time (ms since the epoch).
    pub timers: BTreeMap<String, u64>,
    /// Why it failed, or why it was stopped.
    pub failure: Option<String>,
    /// Reports refused so far.
    pub rejected: u64,
    /// Events applied (the stream version).
    pub version: u64,
}

/// A middle aggregator's result in the open round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Partial {
    /// Its model as an input one tier up: its task, digest and the samples behind it.
    pub update: UpdateRef,
    /// Digests of the trainers' updates it contains.
    pub inputs: Vec<String>,
}

/// Asynchronous jobs: a trainer's training in flight.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dispatch {
    /// The round that sent it.
    pub round: u32,
    /// The global model it trains from.
    pub model: String,
}

/// One input of an aggregator: an update (or a partial aggregate) and the trainers' digests inside it.
struct Input<'a> {
    update: &'a UpdateRef,
    trainers: Vec<&'a str>,
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

impl Default for Job {
    fn default() -> Self {
        Self {
            job_id: String::new(),
            name: String::new(),
            source: String::new(),
            status: Status::New,
            spec: None,
            tasks: Vec::new(),
            assignments: BTreeMap::new(),
            deployed: BTreeSet::new(),
            orphaned: BTreeSet::new(),
            global_model: None,
            round: 0,
            rounds_completed: 0,
            selected: BTreeSet::new(),
            updates: BTreeMap::new(),
            partials: BTreeMap::new(),
            parents: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            queued: BTreeMap::new(),
            client_states: BTreeMap::new(),
            oort: BTreeMap::new(),
            coordinated: 0,
            samples: BTreeMap::new(),
            training_closed: false,
            metrics: Metrics::new(),
            optimizer_state: None,
            timers: BTreeMap::new(),
            failure: None,
            rejected: 0,
            version: 0,
        }
    }
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
        self.round > self.rounds_completed
    }

    /// Rounds the job runs.
    pub fn total_rounds(&self) -> u32 {
        self.spec.as_ref().map_or(0, |s| s.rounds)
    }

    /// Seconds a round, or the deployment, may take.
    pub fn round_timeout_ms(&self) -> u64 {
        self.spec.as_ref().and_then(|s| s.round_timeout_s).unwrap_or(DEFAULT_ROUND_TIMEOUT_S).saturating_mul(1000)
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

    /// Coordinated jobs: whether the open round still waits for the coordinator's pairing.
    pub fn awaits_coordination(&self) -> bool {
        self.coordinator().is_some() && self.round_open() && self.coordinated < self.round
    }

    /// The tasks that upload to `task`.
    pub fn children<'a>(&'a self, task: &'a str) -> impl Iterator<Item = &'a TaskSpec> + 'a {
        self.tasks.iter().filter(move |t| self.parents.get(&t.task_id).is_some_and(|p| p == task))
    }

    /// Whether `t` may still bring an input to its aggregator in the open round:
    /// a round trainer that reported or may yet (training is open), or an
    /// aggregator that has its result or a child that still may.
    fn expects(&self, t: &TaskSpec) -> bool {
        if t.is_data_consumer {
            self.updates.contains_key(&t.task_id) || (!self.training_closed && self.in_round(t))
        } else {
            self.partials.contains_key(&t.task_id) || self.children(&t.task_id).any(|c| self.expects(c))
        }
    }

    /// The inputs `task` has for the open round, in task order.
    fn inputs_of<'a>(&'a self, task: &str) -> Vec<Input<'a>> {
        self.children(task)
            .filter_map(|c| match self.updates.get(&c.task_id) {
                Some(u) => Some(Input { update: u, trainers: vec![u.digest.as_str()] }),
                None => self
                    .partials
                    .get(&c.task_id)
                    .map(|p| Input { update: &p.update, trainers: p.inputs.iter().map(String::as_str).collect() }),
            })
            .collect()
    }

    /// Whether aggregator `task` has every input it will get this round (at
    /// least one) and has not aggregated yet: time to ask it.
    pub fn ready(&self, task: &str) -> bool {
        if !self.round_open() || self.partials.contains_key(task) || self.awaits_coordination() {
            return false;
        }
        if self.is_async() {
            return self.training_done() && !self.updates.is_empty() && self.aggregator().is_some_and(|a| a.task_id == task);
        }
        let mut any = false;
        for c in self.children(task) {
            let has = self.updates.contains_key(&c.task_id) || self.partials.contains_key(&c.task_id);
            if !has && self.expects(c) {
                return false;
            }
            any |= has;
        }
        any
    }

    /// The updates aggregator `task` combines this round.
    pub fn updates_for(&self, task: &str) -> Vec<UpdateRef> {
        self.inputs_of(task).into_iter().map(|i| i.update.clone()).collect()
    }

    /// The data-consuming tasks.
    pub fn trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.tasks.iter().filter(|t| t.is_data_consumer)
    }

    /// Whether the job aggregates asynchronously (FedBuff): every `agg_goal` updates, no barrier.
    pub fn is_async(&self) -> bool {
        self.agg_goal().is_some()
    }

    /// Whether trainers keep a state between rounds (SCAFFOLD, FedDyn).
    pub fn keeps_client_state(&self) -> bool {
        self.spec.as_ref().is_some_and(|s| s.optimizer.keeps_client_state())
    }

    /// Which trainers take part in a round.
    pub fn selection(&self) -> Selection {
        self.spec.as_ref().map(|s| s.selection).unwrap_or_default()
    }

    fn agg_goal(&self) -> Option<usize> {
        match self.selection() {
            Selection::Buffered { goal, .. } => Some((goal as usize).max(1)),
            _ => None,
        }
    }

    fn oort(&self) -> Option<usize> {
        match self.selection() {
            Selection::Oort { aggr_num } => Some(aggr_num as usize),
            _ => None,
        }
    }

    /// Trainers that still have a worker.
    pub fn active_trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.trainers().filter(|t| !self.orphaned.contains(&t.task_id))
    }

    /// Trainers of the open round: selected (when a selector chose) and with a worker.
    pub fn round_trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.trainers().filter(|t| self.in_round(t))
    }

    /// Whether `t` trains in the open round (without scanning the tasks).
    fn in_round(&self, t: &TaskSpec) -> bool {
        t.is_data_consumer && !self.orphaned.contains(&t.task_id) && (self.selected.is_empty() || self.selected.contains(&t.task_id))
    }

    /// The trainers a round starting now takes: `k` per aggregation group when
    /// the job has a random selector (seeded by the job's seed and the round,
    /// the same pick `flamectl plan` shows), else none (meaning all).
    fn select(&self, round: u32) -> Vec<String> {
        let seed = self.spec.as_ref().map_or(0, |s| s.seed);
        if self.is_async() {
            // FedBuff: keep `concurrency` trainers busy; idle ones are picked at random.
            let c = match self.selection() {
                Selection::Buffered { concurrency: Some(c), .. } => c as usize,
                _ => usize::MAX,
            };
            let idle: Vec<String> =
                self.active_trainers().filter(|t| !self.in_flight.contains_key(&t.task_id)).map(|t| t.task_id.clone()).collect();
            let busy = self.in_flight.keys().filter(|t| !self.orphaned.contains(*t)).count();
            return crate::plan::choose(&idle, c.saturating_sub(busy).min(idle.len()), seed, round, self.selection().name());
        }
        if let Some(aggr_num) = self.oort() {
            let candidates: Vec<String> = self.active_trainers().map(|t| t.task_id.clone()).collect();
            return crate::oort::select(&candidates, &self.oort, over_commit(aggr_num), seed, round);
        }
        let Selection::Random { k } = self.selection() else { return Vec::new() };
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in self.active_trainers() {
            let key = t.group_association.iter().map(|(c, g)| format!("{c}/{g}")).collect::<Vec<_>>().join(",");
            groups.entry(key).or_default().push(t.task_id.clone());
        }
        let mut out: Vec<String> = groups
            .iter()
            .flat_map(|(key, members)| crate::plan::choose(members, (k as usize).min(members.len()), seed, round, key))
            .collect();
        out.sort();
        out
    }

    /// Fewest updates a round may aggregate.
    pub fn quorum(&self) -> usize {
        if let Some(goal) = self.agg_goal() {
            return self.spec.as_ref().and_then(|s| s.quorum).map_or(goal, |q| (q as usize).clamp(1, goal));
        }
        let all = if self.selected.is_empty() { self.trainers().count() } else { self.selected.len() };
        // Oort closes a round at aggr_num updates of the over-committed selection.
        let all = self.oort().map_or(all, |n| n.min(all));
        self.spec.as_ref().and_then(|s| s.quorum).map_or(all, |q| (q as usize).clamp(1, all.max(1)))
    }

    /// Whether the open round has every update it will get.
    pub fn training_done(&self) -> bool {
        if let Some(goal) = self.agg_goal() {
            return self.training_closed || self.updates.len() >= goal;
        }
        self.training_closed || self.round_trainers().all(|t| self.updates.contains_key(&t.task_id))
    }

    /// The earliest armed timer.
    pub fn next_timer(&self) -> Option<(&str, u64)> {
        self.timers.iter().min_by_key(|(name, due)| (**due, name.as_str())).map(|(n, d)| (n.as_str(), *d))
    }

    /// Decides what a command records.
    pub fn handle(&self, command: JobCommand) -> Result<Vec<JobEvent>, Rejection> {
        use JobCommand as C;
        let name = command.name();
        if !allowed(self.status, name) {
            return Err(Rejection::IllegalInState { command: name, status: self.status });
        }
        match command {
            C::Create { job_id, name, source, spec, tasks } => Ok(vec![JobEvent::JobCreated { job_id, name, source, spec, tasks }]),
            C::Update { name, source, spec, tasks } => Ok(vec![JobEvent::JobUpdated { name, source, spec, tasks }]),
            C::Start { now_ms } => {
                let mut events = vec![JobEvent::JobStarting {}];
                events.push(JobEvent::TimerSet { timer: DEPLOY.into(), due_at_ms: now_ms.saturating_add(self.round_timeout_ms()) });
                if let Some(max) = self.spec.as_ref().and_then(|s| s.max_run_time_s) {
                    events.push(JobEvent::TimerSet {
                        timer: MAX_RUN_TIME.into(),
                        due_at_ms: now_ms.saturating_add(max.saturating_mul(1000)),
                    });
                }
                Ok(events)
            }
            C::Assign(assignments) => {
                let mut events = Vec::new();
                for t in &self.tasks {
                    let worker =
                        assignments.get(&t.task_id).ok_or_else(|| Rejection::Unexpected(format!("task '{}' has no worker", t.task_id)))?;
                    events.push(JobEvent::TaskAssigned { task_id: t.task_id.clone(), worker_id: worker.clone() });
                }
                events.push(JobEvent::JobDeploying {});
                Ok(events)
            }
            C::StartRound { now_ms } => {
                let global_model = self.global_model.clone().ok_or_else(|| Rejection::Unexpected("no global model yet".into()))?;
                if self.round_open() || self.rounds_completed >= self.total_rounds() {
                    return Err(Rejection::Unexpected(format!(
                        "cannot start a round: round {} is open or all {} rounds are done",
                        self.round,
                        self.total_rounds()
                    )));
                }
                let round = self.round + 1;
                Ok(vec![
                    JobEvent::RoundStarted { round, global_model, selected: self.select(round) },
                    JobEvent::TimerSet { timer: round_timer(round), due_at_ms: now_ms.saturating_add(self.round_timeout_ms()) },
                ])
            }
            C::Fire { timer, now_ms } => self.fire(timer, now_ms),
            C::LoseWorker { worker_id, replacements } => self.lose_worker(worker_id, replacements),
            C::Stop { reason } => Ok(vec![JobEvent::JobStopping { reason }]),
            C::Terminate => Ok(vec![JobEvent::JobTerminated { reason: self.failure.clone().unwrap_or_else(|| "stopped".into()) }]),
            C::Complete => {
                if self.round_open() || self.rounds_completed < self.total_rounds() {
                    return Err(Rejection::Unexpected(format!(
                        "cannot complete after {} of {} rounds",
                        self.rounds_completed,
                        self.total_rounds()
                    )));
                }
                Ok(vec![JobEvent::JobCompleted {
                    rounds_completed: self.rounds_completed,
                    final_model: self.global_model.clone().unwrap_or_default(),
                    metrics: self.metrics.clone(),
                }])
            }
            C::Fail(reason) => Ok(vec![JobEvent::JobFailed { reason }]),
            C::Delete => Ok(vec![JobEvent::JobDeleted {}]),
            C::RecordRejection { report, reason } => Ok(vec![JobEvent::ReportRejected {
                command_id: report.command_id,
                task_id: report.task_id,
                worker_id: report.worker_id,
                round: report.round,
                reason,
            }]),
            C::Report(report) => self.handle_report(report),
        }
    }

    fn fire(&self, timer: String, now_ms: u64) -> Result<Vec<JobEvent>, Rejection> {
        let due = *self.timers.get(&timer).ok_or_else(|| Rejection::Unexpected(format!("timer '{timer}' is not armed")))?;
        if due > now_ms {
            return Err(Rejection::Unexpected(format!("timer '{timer}' is due in {} ms", due - now_ms)));
        }
        let mut events = vec![JobEvent::TimerFired { timer: timer.clone() }];
        let waiting = |what: String| format!("{what} within the deadline of {} s", self.round_timeout_ms() / 1000);
        match timer.as_str() {
            MAX_RUN_TIME if self.status != Status::Stopping => {
                let max = self.spec.as_ref().and_then(|s| s.max_run_time_s).unwrap_or_default();
                events.push(JobEvent::JobStopping { reason: format!("maxRunTime of {max} s exceeded") });
            }
            DEPLOY if self.status == Status::Starting => {
                events.push(JobEvent::JobFailed { reason: waiting("no workers could take every task (check roles and realms)".into()) })
            }
            DEPLOY if self.status == Status::Deploying => {
                let missing: Vec<_> = self.tasks.iter().map(|t| &t.task_id).filter(|t| !self.deployed.contains(*t)).collect();
                events.push(JobEvent::JobFailed { reason: waiting(format!("tasks {missing:?} were not deployed")) })
            }
            DEPLOY if self.status == Status::Running && self.global_model.is_none() => {
                events.push(JobEvent::JobFailed { reason: waiting("the aggregator made no initial model".into()) })
            }
            t if self.status == Status::Running && self.round_open() && t == round_timer(self.round) => {
                let round = self.round;
                if self.training_done() {
                    events.push(JobEvent::JobFailed { reason: waiting(format!("round {round}: the aggregator did not aggregate")) });
                } else if self.updates.len() >= self.quorum() {
                    // Asynchronous trainers still training are not dropped: their updates join a later buffer.
                    let dropped = if self.is_async() {
                        Vec::new()
                    } else {
                        self.round_trainers().map(|t| t.task_id.clone()).filter(|t| !self.updates.contains_key(t)).collect()
                    };
                    events.push(JobEvent::TrainingClosed { round, dropped });
                    events
                        .push(JobEvent::TimerSet { timer: round_timer(round), due_at_ms: now_ms.saturating_add(self.round_timeout_ms()) });
                } else {
                    events.push(JobEvent::JobFailed {
                        reason: waiting(format!(
                            "round {round}: {} of {} updates arrived, fewer than the quorum of {} (minClients)",
                            self.updates.len(),
                            self.round_trainers().count(),
                            self.quorum()
                        )),
                    });
                }
            }
            // A timer whose reason has passed: record that it fired, nothing more.
            _ => {}
        }
        Ok(events)
    }

    fn lose_worker(&self, worker_id: String, replacements: BTreeMap<String, String>) -> Result<Vec<JobEvent>, Rejection> {
        let tasks: Vec<&TaskSpec> = self
            .tasks
            .iter()
            .filter(|t| self.assignments.get(&t.task_id) == Some(&worker_id) && !self.orphaned.contains(&t.task_id))
            .collect();
        if tasks.is_empty() {
            return Err(Rejection::Unexpected(format!("worker '{worker_id}' runs no task of this job")));
        }
        let mut events = Vec::new();
        let mut orphaned = Vec::new();
        for t in &tasks {
            match replacements.get(&t.task_id) {
                Some(w) if *w != worker_id => events.push(JobEvent::TaskAssigned { task_id: t.task_id.clone(), worker_id: w.clone() }),
                _ => orphaned.push(t.task_id.clone()),
            }
        }
        let lost_aggregator = tasks.iter().find(|t| !t.is_data_consumer && orphaned.contains(&t.task_id));
        let left = self.active_trainers().filter(|t| !orphaned.contains(&t.task_id)).count();
        events.push(JobEvent::WorkerLost { worker_id: worker_id.clone(), orphaned: orphaned.clone() });
        if let Some(agg) = lost_aggregator {
            events.push(JobEvent::JobFailed {
                reason: format!("worker '{worker_id}' was lost and no other live worker can take task '{}' ({})", agg.task_id, agg.role),
            });
        } else if left < self.quorum() {
            events.push(JobEvent::JobFailed {
                reason: format!(
                    "worker '{worker_id}' was lost: {left} trainer(s) left, fewer than the quorum of {} (set minClients to run with fewer)",
                    self.quorum()
                ),
            });
        } else if self.status == Status::Deploying
            && self
                .tasks
                .iter()
                .all(|t| self.deployed.contains(&t.task_id) || self.orphaned.contains(&t.task_id) || orphaned.contains(&t.task_id))
        {
            events.push(JobEvent::JobStarted {});
        }
        Ok(events)
    }

    fn handle_report(&self, r: Report) -> Result<Vec<JobEvent>, Rejection> {
        let task = self.tasks.iter().find(|t| t.task_id == r.task_id).ok_or_else(|| Rejection::UnknownTask(r.task_id.clone()))?;
        let assigned = self.assignments.get(&r.task_id).cloned().unwrap_or_default();
        if assigned != r.worker_id {
            return Err(Rejection::WrongWorker { task: r.task_id, worker: r.worker_id, assigned });
        }
        if self.orphaned.contains(&r.task_id) {
            return Err(Rejection::Unexpected(format!("task '{}' sits out: its worker '{}' was lost", r.task_id, r.worker_id)));
        }
        match r.body {
            ReportBody::Failed { error } => Ok(vec![JobEvent::JobFailed {
                reason: format!("worker '{}' failed task '{}' in round {}: {error}", r.worker_id, r.task_id, r.round),
            }]),
            ReportBody::Deployed {} => {
                if self.status != Status::Deploying || self.deployed.contains(&r.task_id) {
                    return Err(Rejection::Unexpected(format!("task '{}' is already deployed (the job is {:?})", r.task_id, self.status)));
                }
                let mut events = vec![JobEvent::TaskDeployed { task_id: r.task_id.clone(), worker_id: r.worker_id }];
                let rest = self.tasks.iter().filter(|t| !self.orphaned.contains(&t.task_id) && !self.deployed.contains(&t.task_id)).count();
                if rest == 1 {
                    events.push(JobEvent::JobStarted {});
                }
                Ok(events)
            }
            _ if self.status != Status::Running => {
                Err(Rejection::Unexpected(format!("round reports are taken while the job runs; it is {:?}", self.status)))
            }
            ReportBody::Initialized { digest } => {
                if task.is_data_consumer || self.global_model.is_some() {
                    return Err(Rejection::Unexpected(format!("unexpected initial model from task '{}'", r.task_id)));
                }
                Ok(vec![JobEvent::ModelInitialized { digest, worker_id: r.worker_id }])
            }
            ReportBody::Trained { state: None, .. } if self.keeps_client_state() => Err(Rejection::Unexpected(format!(
                "task '{}' sent no client state with its update; {} needs one",
                r.task_id,
                self.spec.as_ref().map_or("", |s| s.optimizer.name())
            ))),
            ReportBody::Trained { digest, samples, metrics, state } if self.is_async() => {
                let Some(d) = self.in_flight.get(&r.task_id) else {
                    return Err(Rejection::Unexpected(format!(
                        "task '{}' has no training in flight (it reported already or was not dispatched)",
                        r.task_id
                    )));
                };
                if d.round != r.round {
                    return Err(Rejection::WrongRound { task: r.task_id, got: r.round, open: d.round });
                }
                if samples == 0 {
                    return Err(Rejection::Unexpected(format!("task '{}' reported an update trained on 0 samples", r.task_id)));
                }
                // It joins the open round's buffer, or the next one when this one is full.
                let buffer = if self.round_open() && !self.training_done() { self.round } else { self.round + 1 };
                let staleness = buffer.saturating_sub(d.round);
                Ok(vec![JobEvent::UpdateReported {
                    round: buffer,
                    task_id: r.task_id,
                    worker_id: r.worker_id,
                    digest,
                    samples,
                    metrics,
                    staleness,
                    client_state: state,
                }])
            }
            ReportBody::Trained { digest, samples, metrics, state } => {
                self.check_round(&r.task_id, r.round)?;
                if !task.is_data_consumer {
                    return Err(Rejection::Unexpected(format!("task '{}' does not train", r.task_id)));
                }
                if self.updates.contains_key(&r.task_id) {
                    return Err(Rejection::Duplicate { task: r.task_id, round: r.round });
                }
                if !self.selected.is_empty() && !self.selected.contains(&r.task_id) {
                    return Err(Rejection::Unexpected(format!("task '{}' was not selected for round {}", r.task_id, r.round)));
                }
                if self.training_closed {
                    return Err(Rejection::Unexpected(format!("round {} stopped taking updates at its deadline", r.round)));
                }
                if samples == 0 {
                    return Err(Rejection::Unexpected(format!("task '{}' reported an update trained on 0 samples", r.task_id)));
                }
                let round = r.round;
                let task_id = r.task_id.clone();
                let mut events = vec![JobEvent::UpdateReported {
                    round,
                    task_id: r.task_id,
                    worker_id: r.worker_id,
                    digest,
                    samples,
                    metrics,
                    staleness: 0,
                    client_state: state,
                }];
                // Oort: the aggr_num-th update closes the round; the over-committed rest are stragglers.
                if let Some(n) = self.oort()
                    && self.updates.len() + 1 >= n
                {
                    let dropped: Vec<String> = self
                        .round_trainers()
                        .map(|t| t.task_id.clone())
                        .filter(|t| *t != task_id && !self.updates.contains_key(t))
                        .collect();
                    if !dropped.is_empty() {
                        events.push(JobEvent::TrainingClosed { round, dropped });
                    }
                }
                Ok(events)
            }
            ReportBody::Coordinated { pairing } => {
                self.check_round(&r.task_id, r.round)?;
                if self.coordinator() != Some(r.task_id.as_str()) {
                    return Err(Rejection::Unexpected(format!("task '{}' does not coordinate", r.task_id)));
                }
                if !self.awaits_coordination() {
                    return Err(Rejection::Duplicate { task: r.task_id, round: r.round });
                }
                let candidates = self.spec.as_ref().map(|s| &s.candidates);
                for t in self.round_trainers() {
                    let options = candidates.and_then(|c| c.get(&t.task_id));
                    match (pairing.get(&t.task_id), options) {
                        (Some(a), Some(o)) if o.contains(a) => {}
                        (Some(a), Some(_)) => {
                            return Err(Rejection::Unexpected(format!(
                                "the pairing sends '{}' to '{a}', which is not one of its aggregators",
                                t.task_id
                            )));
                        }
                        (None, Some(_)) => return Err(Rejection::Unexpected(format!("the pairing leaves out trainer '{}'", t.task_id))),
                        (_, None) => {}
                    }
                }
                if let Some(t) = pairing.keys().find(|t| !self.round_trainers().any(|x| &x.task_id == *t)) {
                    return Err(Rejection::Unexpected(format!("the pairing names '{t}', which is not a trainer of round {}", r.round)));
                }
                Ok(vec![JobEvent::RoundCoordinated { round: r.round, pairing }])
            }
            ReportBody::Aggregated { digest, metrics, optimizer_state, excluded } => {
                self.check_round(&r.task_id, r.round)?;
                if task.is_data_consumer {
                    return Err(Rejection::Unexpected(format!("task '{}' does not aggregate", r.task_id)));
                }
                if self.partials.contains_key(&r.task_id) {
                    return Err(Rejection::Duplicate { task: r.task_id, round: r.round });
                }
                if self.is_async() && !self.ready(&r.task_id) {
                    return Err(Rejection::Unexpected(format!(
                        "aggregate for round {} before its buffer filled ({} of {} updates)",
                        r.round,
                        self.updates.len(),
                        self.quorum()
                    )));
                }
                if !self.ready(&r.task_id) {
                    let missing = self.children(&r.task_id).filter(|c| self.expects(c)).count() - self.inputs_of(&r.task_id).len();
                    return Err(Rejection::Unexpected(format!("aggregate for round {} before {missing} input(s) arrived", r.round)));
                }
                let inputs = self.inputs_of(&r.task_id);
                for x in &excluded {
                    if !inputs.iter().any(|i| i.update.task_id == x.task_id && i.update.digest == x.digest) {
                        return Err(Rejection::Unexpected(format!(
                            "the aggregate excludes update {} of task '{}', which is not an input of '{}' in round {}",
                            x.digest, x.task_id, r.task_id, r.round
                        )));
                    }
                }
                let used: Vec<&Input> = inputs.iter().filter(|i| !excluded.iter().any(|x| x.task_id == i.update.task_id)).collect();
                let trainers: Vec<String> = used.iter().flat_map(|i| i.trainers.iter().map(|d| d.to_string())).collect();
                let mut events: Vec<JobEvent> = excluded
                    .iter()
                    .map(|x| JobEvent::UpdateExcluded {
                        round: r.round,
                        task_id: x.task_id.clone(),
                        digest: x.digest.clone(),
                        reason: x.reason.clone(),
                    })
                    .collect();
                let top = !self.parents.contains_key(&r.task_id);
                if top && trainers.len() < self.quorum().min(self.updates.len()).max(1) {
                    events.push(JobEvent::JobFailed {
                        reason: format!(
                            "round {}: {} of {} updates were usable, fewer than the quorum of {} (minClients)",
                            r.round,
                            trainers.len(),
                            self.updates.len(),
                            self.quorum()
                        ),
                    });
                } else if top {
                    events.push(JobEvent::RoundAggregated { round: r.round, digest, inputs: trainers, metrics, optimizer_state });
                } else if used.is_empty() {
                    events.push(JobEvent::JobFailed {
                        reason: format!("round {}: middle aggregator '{}' had no usable update", r.round, r.task_id),
                    });
                } else {
                    events.push(JobEvent::GroupAggregated {
                        round: r.round,
                        task_id: r.task_id,
                        worker_id: r.worker_id,
                        digest,
                        samples: used.iter().map(|i| i.update.samples).sum(),
                        inputs: trainers,
                        metrics,
                    });
                }
                Ok(events)
            }
        }
    }

    fn check_round(&self, task: &str, round: u32) -> Result<(), Rejection> {
        if self.round_open() && round == self.round {
            Ok(())
        } else {
            Err(Rejection::WrongRound { task: task.to_string(), got: round, open: if self.round_open() { self.round } else { 0 } })
        }
    }

    fn end(&mut self, status: Status, reason: Option<&str>) {
        self.status = status;
        if let Some(r) = reason {
            self.failure = Some(r.to_string());
        }
        self.timers.clear();
    }

    /// Folds one event into the state.
    pub fn apply(&mut self, event: &JobEvent) {
        self.version += 1;
        match event {
            JobEvent::JobCreated { job_id, name, source, spec, tasks } => {
                self.parents = parents(spec, tasks);
                self.job_id = job_id.clone();
                self.name = name.clone();
                self.source = source.clone();
                self.spec = Some(spec.clone());
                self.tasks = tasks.clone();
                self.status = Status::Ready;
            }
            JobEvent::JobUpdated { name, source, spec, tasks } => {
                self.parents = parents(spec, tasks);
                self.name = name.clone();
                self.source = source.clone();
                self.spec = Some(spec.clone());
                self.tasks = tasks.clone();
            }
            JobEvent::JobStarting {} => self.status = Status::Starting,
            JobEvent::TaskAssigned { task_id, worker_id } => {
                self.assignments.insert(task_id.clone(), worker_id.clone());
            }
            JobEvent::JobDeploying {} => self.status = Status::Deploying,
            JobEvent::TaskDeployed { task_id, .. } => {
                self.deployed.insert(task_id.clone());
            }
            JobEvent::JobStarted {} => self.status = Status::Running,
            JobEvent::TimerSet { timer, due_at_ms } => {
                self.timers.insert(timer.clone(), *due_at_ms);
            }
            JobEvent::TimerFired { timer } => {
                self.timers.remove(timer);
            }
            JobEvent::WorkerLost { orphaned, .. } => {
                for t in orphaned {
                    self.in_flight.remove(t);
                }
                self.orphaned.extend(orphaned.iter().cloned());
            }
            JobEvent::ModelInitialized { digest, .. } => {
                self.global_model = Some(digest.clone());
                self.timers.remove(DEPLOY);
            }
            JobEvent::RoundStarted { round, selected, global_model } => {
                self.round = *round;
                self.selected = selected.iter().cloned().collect();
                self.updates.clear();
                if self.is_async() {
                    self.updates = std::mem::take(&mut self.queued);
                    for t in selected {
                        self.in_flight.insert(t.clone(), Dispatch { round: *round, model: global_model.clone() });
                    }
                }
                self.partials.clear();
                self.training_closed = false;
            }
            JobEvent::RoundCoordinated { round, pairing } => {
                for (t, a) in pairing {
                    self.parents.insert(t.clone(), a.clone());
                }
                self.coordinated = *round;
            }
            JobEvent::UpdateReported { round, task_id, digest, samples, staleness, client_state, metrics, .. } => {
                // Only the coordinator balances by them: no map to grow in other jobs' folds.
                if self.coordinator().is_some() {
                    self.samples.insert(task_id.clone(), *samples);
                }
                if self.oort().is_some() {
                    let stats = crate::oort::Stats {
                        samples: *samples,
                        loss: metrics.get("loss").copied().unwrap_or(0.0),
                        seconds: metrics.get("train_seconds").copied(),
                        last_round: *round,
                    };
                    self.oort.insert(task_id.clone(), stats);
                }
                let mut update = UpdateRef::new(task_id.clone(), digest.clone(), *samples);
                if let Some(s) = client_state {
                    self.client_states.insert(task_id.clone(), s.clone());
                    update.client_state = Some(s.clone());
                }
                let dispatch = self.in_flight.remove(task_id);
                if *staleness > 0 {
                    update.base_model = dispatch.map(|d| d.model);
                    update.staleness = *staleness;
                }
                if self.is_async() && !(*round == self.round && self.round_open()) {
                    self.queued.insert(task_id.clone(), update);
                } else {
                    self.updates.insert(task_id.clone(), update);
                }
            }
            JobEvent::GroupAggregated { round: _, task_id, digest, samples, inputs, .. } => {
                let update = UpdateRef::new(task_id.clone(), digest.clone(), *samples);
                self.partials.insert(task_id.clone(), Partial { update, inputs: inputs.clone() });
            }
            JobEvent::TrainingClosed { .. } => self.training_closed = true,
            JobEvent::ReportRejected { .. } => self.rejected += 1,
            JobEvent::UpdateExcluded { .. } => {}
            JobEvent::RoundAggregated { round, digest, metrics, optimizer_state, .. } => {
                self.optimizer_state = optimizer_state.clone();
                self.rounds_completed = *round;
                self.global_model = Some(digest.clone());
                self.metrics = metrics.clone();
                self.updates.clear();
                self.partials.clear();
                self.training_closed = false;
                self.timers.remove(&round_timer(*round));
            }
            JobEvent::JobCompleted { .. } => self.end(Status::Completed, None),
            JobEvent::JobFailed { reason } => self.end(Status::Failed, Some(reason)),
            JobEvent::JobStopping { reason } => {
                self.status = Status::Stopping;
                self.failure = Some(reason.clone());
            }
            JobEvent::JobTerminated { reason } => self.end(Status::Terminated, Some(reason)),
            JobEvent::JobDeleted {} => self.end(Status::Deleted, None),
        }
    }
}

/// The job aggregate as cqrs-es sees it: `handle` writes the decided events
/// to the sink (which applies them), `apply` folds one event.
impl cqrs_es::Aggregate for Job {
    const TYPE: &'static str = "job";
    type Command = JobCommand;
    type Event = JobEvent;
    type Error = Rejection;
    type Services = ();

    async fn handle(&mut self, command: JobCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), Rejection> {
        for event in Job::handle(self, command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: JobEvent) {
        Job::apply(self, &event);
    }
}

#[cfg(test)]
mod tests {
    //! Given a history, when a command arrives, then these events (or this rejection).

    use std::collections::{BTreeMap, BTreeSet};

    use flame_events::job::{JobEvent, Metrics};
    use flame_events::protocol::{Report, ReportBody};

    use super::*;
    use crate::testing::{self, History, JOB, report, trained, update};

    const LATE: u64 = u64::MAX / 2;

    fn assignments() -> BTreeMap<String, String> {
        ["t0", "t1", "agg"].iter().map(|t| (t.to_string(), format!("w-{t}"))).collect()
    }

    fn aggregated(round: u32) -> ReportBody {
        ReportBody::Aggregated { digest: format!("m{round}"), metrics: Metrics::new(), optimizer_state: None, excluded: vec![] }
    }

    fn spec() -> RunSpec {
        match testing::created(2) {
            JobEvent::JobCreated { spec, .. } => spec,
            _ => unreachable!(),
        }
    }

    fn given(h: &History) -> Job {
        h.job()
    }

    fn status_after(job: &Job, events: &[JobEvent]) -> Status {
        let mut j = job.clone();
        for e in events {
            j.apply(e);
        }
        j.status
    }

    /// Histories reaching every state, several ways.
    fn histories() -> Vec<(&'static str, History)> {
        let quorum1 = || {
            History::created_with(2, |s| {
                s.quorum = Some(1);
                s.max_run_time_s = Some(60);
            })
            .then(JobEvent::TimerSet { timer: MAX_RUN_TIME.into(), due_at_ms: 60_000 })
        };
        vec![
            ("new", History::default()),
            ("ready", History::created(2)),
            ("starting", History::created(2).starting()),
            ("starting with maxRunTime", quorum1().starting()),
            ("deploying", History::created(2).deploying()),
            (
                "deploying, one task left",
                History::created(2)
                    .deploying()
                    .then(JobEvent::TaskDeployed { task_id: "t1".into(), worker_id: "w-t1".into() })
                    .then(JobEvent::TaskDeployed { task_id: "agg".into(), worker_id: "w-agg".into() }),
            ),
            (
                "deploying with quorum 1, t0 left",
                quorum1()
                    .deploying()
                    .then(JobEvent::TaskDeployed { task_id: "t1".into(), worker_id: "w-t1".into() })
                    .then(JobEvent::TaskDeployed { task_id: "agg".into(), worker_id: "w-agg".into() }),
            ),
            ("running, no model", History::created(2).started()),
            ("running, between rounds", History::created(2).started().initialized()),
            ("running, round open", History::created(2).started().initialized().round_started(1)),
            ("running with quorum 1, round open", quorum1().started().initialized().round_started(1)),
            ("running with quorum 1, one update", quorum1().started().initialized().round_started(1).then(update(1, "t0"))),
            (
                "running, round full",
                History::created(2).started().initialized().round_started(1).then(update(1, "t0")).then(update(1, "t1")),
            ),
            ("running, all rounds done", History::created(2).started().initialized().round(1).round(2)),
            ("stopping", History::created(2).started().then(JobEvent::JobStopping { reason: "user".into() })),
            (
                "stopping with maxRunTime",
                quorum1()
                    .started()
                    .then(JobEvent::TimerSet { timer: MAX_RUN_TIME.into(), due_at_ms: 1 })
                    .then(JobEvent::JobStopping { reason: "user".into() }),
            ),
            (
                "completed",
                History::created(1).started().initialized().round(1).then(JobEvent::JobCompleted {
                    rounds_completed: 1,
                    final_model: "m1".into(),
                    metrics: Metrics::new(),
                }),
            ),
            ("failed", History::created(2).started().then(JobEvent::JobFailed { reason: "x".into() })),
            (
                "terminated",
                History::created(2)
                    .started()
                    .then(JobEvent::JobStopping { reason: "x".into() })
                    .then(JobEvent::JobTerminated { reason: "x".into() }),
            ),
            ("deleted", History::created(2).then(JobEvent::JobDeleted {})),
        ]
    }

    /// One of each command, several ways.
    fn commands() -> Vec<JobCommand> {
        let s = spec();
        let deployed = |t: &str| report(t, 0, ReportBody::Deployed {});
        vec![
            JobCommand::Create { job_id: JOB.into(), name: "n".into(), source: "s".into(), spec: s.clone(), tasks: vec![] },
            JobCommand::Update { name: "n2".into(), source: "s2".into(), spec: s, tasks: vec![] },
            JobCommand::Start { now_ms: 0 },
            JobCommand::Assign(assignments()),
            deployed("t0"),
            deployed("agg"),
            report("agg", 0, ReportBody::Initialized { digest: "m0".into() }),
            report("t0", 1, trained(1, "t0")),
            report("t1", 1, trained(1, "t1")),
            report("agg", 1, aggregated(1)),
            report("t1", 1, ReportBody::Failed { error: "disk full".into() }),
            JobCommand::StartRound { now_ms: 0 },
            JobCommand::Fire { timer: DEPLOY.into(), now_ms: LATE },
            JobCommand::Fire { timer: MAX_RUN_TIME.into(), now_ms: LATE },
            JobCommand::Fire { timer: round_timer(1), now_ms: LATE },
            JobCommand::LoseWorker { worker_id: "w-t0".into(), replacements: BTreeMap::new() },
            JobCommand::LoseWorker { worker_id: "w-t0".into(), replacements: BTreeMap::from([("t0".into(), "w-spare".into())]) },
            JobCommand::LoseWorker { worker_id: "w-agg".into(), replacements: BTreeMap::new() },
            JobCommand::Stop { reason: "user".into() },
            JobCommand::Terminate,
            JobCommand::Complete,
            JobCommand::Fail("broken".into()),
            JobCommand::Delete,
            JobCommand::RecordRejection {
                report: Box::new(Report {
                    v: 1,
                    command_id: "c".into(),
                    job_id: JOB.into(),
                    task_id: "t9".into(),
                    worker_id: "w-x".into(),
                    round: 7,
                    body: ReportBody::Deployed {},
                }),
                reason: "unknown task".into(),
            },
        ]
    }

    #[test]
    fn every_transition_in_the_table_happens_and_nothing_else_does() {
        let mut seen = BTreeSet::new();
        for (label, h) in histories() {
            let job = given(&h);
            for command in commands() {
                let name = command.name();
                match job.handle(command.clone()) {
                    Ok(events) => {
                        let after = status_after(&job, &events);
                        assert!(
                            TRANSITIONS.contains(&(job.status, name, after)),
                            "{label}: '{name}' moved {:?} -> {after:?}, which the table does not list",
                            job.status
                        );
                        seen.insert((job.status, name, after));
                    }
                    Err(Rejection::IllegalInState { status, .. }) => {
                        assert_eq!(status, job.status);
                        assert!(!allowed(job.status, name), "{label}: '{name}' refused in {status:?} though the table allows it");
                    }
                    Err(other) => {
                        assert!(allowed(job.status, name), "{label}: '{name}' in {:?}: {other} (should be IllegalInState)", job.status)
                    }
                }
            }
        }
        let missing: Vec<_> = TRANSITIONS.iter().filter(|t| !seen.contains(*t)).collect();
        assert!(missing.is_empty(), "transitions no test reaches: {missing:?}");
    }

    #[test]
    fn create_records_the_job_once() {
        let events = Job::default()
            .handle(JobCommand::Create { job_id: JOB.into(), name: "n".into(), source: "s".into(), spec: spec(), tasks: vec![] })
            .expect("create");
        assert_eq!(events.len(), 1);
        let job = History::created(2).job();
        assert_eq!(job.status, Status::Ready);
        let again =
            job.handle(JobCommand::Create { job_id: JOB.into(), name: "n".into(), source: "s".into(), spec: spec(), tasks: vec![] });
        assert!(matches!(again, Err(Rejection::IllegalInState { command: "create", status: Status::Ready })));
    }

    #[test]
    fn start_arms_the_deploy_deadline_and_max_run_time() {
        let job = History::created_with(2, |s| s.max_run_time_s = Some(30)).job();
        let events = job.handle(JobCommand::Start { now_ms: 1_000 }).expect("start");
        assert_eq!(
            events,
            vec![
                JobEvent::JobStarting {},
                JobEvent::TimerSet { timer: DEPLOY.into(), due_at_ms: 1_000 + DEFAULT_ROUND_TIMEOUT_S * 1000 },
                JobEvent::TimerSet { timer: MAX_RUN_TIME.into(), due_at_ms: 31_000 },
            ]
        );
        let started = History::created(2).starting().job();
        assert!(matches!(started.handle(JobCommand::Start { now_ms: 0 }), Err(Rejection::IllegalInState { command: "start", .. })));
    }

    #[test]
    fn assign_places_every_task_then_deploys_and_runs_when_every_worker_confirms() {
        let job = History::created(2).starting().job();
        let events = job.handle(JobCommand::Assign(assignments())).expect("assign");
        assert_eq!(events.len(), 4);
        assert_eq!(events.last(), Some(&JobEvent::JobDeploying {}));
        let mut partial = assignments();
        partial.remove("t1");
        assert!(matches!(job.handle(JobCommand::Assign(partial)), Err(Rejection::Unexpected(m)) if m.contains("t1")));

        let mut h = History::created(2).deploying();
        for t in ["t0", "t1"] {
            let events = h.job().handle(report(t, 0, ReportBody::Deployed {})).expect("deployed");
            assert_eq!(events, vec![JobEvent::TaskDeployed { task_id: t.into(), worker_id: format!("w-{t}") }]);
            h = h.then(events[0].clone());
        }
        assert!(h.job().handle(report("t0", 0, ReportBody::Deployed {})).is_err(), "a task deploys once");
        let last = h.job().handle(report("agg", 0, ReportBody::Deployed {})).expect("last");
        assert_eq!(last.last(), Some(&JobEvent::JobStarted {}));
    }

    #[test]
    fn the_initial_model_comes_from_the_aggregator_only() {
        let job = History::created(2).started().job();
        assert!(matches!(job.handle(JobCommand::StartRound { now_ms: 0 }), Err(Rejection::Unexpected(_))));
        let from_trainer = job.handle(report("t0", 0, ReportBody::Initialized { digest: "x".into() }));
        assert!(matches!(from_trainer, Err(Rejection::Unexpected(_))));
        let events = job.handle(report("agg", 0, ReportBody::Initialized { digest: "m0".into() })).expect("init");
        assert_eq!(events, vec![JobEvent::ModelInitialized { digest: "m0".into(), worker_id: "w-agg".into() }]);
        let twice =
            History::created(2).started().initialized().job().handle(report("agg", 0, ReportBody::Initialized { digest: "m0".into() }));
        assert!(twice.is_err());
        let after = History::created(2).started().initialized().job();
        assert!(!after.timers.contains_key(DEPLOY), "the deploy deadline ends with the initial model");
    }

    #[test]
    fn a_round_starts_with_its_deadline() {
        let job = History::created_with(2, |s| s.round_timeout_s = Some(5)).started().initialized().job();
        let events = job.handle(JobCommand::StartRound { now_ms: 100 }).expect("round");
        assert_eq!(
            events,
            vec![
                JobEvent::RoundStarted { round: 1, global_model: "m0".into(), selected: vec![] },
                JobEvent::TimerSet { timer: "round-1".into(), due_at_ms: 5_100 }
            ]
        );
    }

    #[test]
    fn a_random_selector_picks_k_trainers_per_round_and_only_they_report() {
        let base = History::created_with(6, |s| s.selection = Selection::Random { k: 1 }).started().initialized();
        let mut picks = BTreeSet::new();
        for round in 1..=6 {
            let mut job = base.job();
            (job.round, job.rounds_completed) = (round - 1, round - 1);
            let events = job.handle(JobCommand::StartRound { now_ms: 0 }).expect("round");
            let JobEvent::RoundStarted { selected, .. } = &events[0] else { panic!("{events:?}") };
            assert_eq!(selected.len(), 1, "k = 1 of 2 trainers");
            picks.insert(selected[0].clone());
            // The same round picks the same trainer again (seeded, recorded).
            assert_eq!(job.select(round), *selected);
        }
        assert_eq!(picks.len(), 2, "both trainers are picked over six rounds");

        let started = base.job().handle(JobCommand::StartRound { now_ms: 0 }).expect("round");
        let JobEvent::RoundStarted { selected, .. } = &started[0] else { panic!() };
        let (chosen, other) = (selected[0].clone(), if selected[0] == "t0" { "t1" } else { "t0" });
        let history = History { events: base.events.clone() }.then(started[0].clone());
        let job = history.job();
        assert_eq!(job.quorum(), 1);
        assert!(matches!(job.handle(report(other, 1, trained(1, other))), Err(Rejection::Unexpected(m)) if m.contains("not selected")));
        let accepted = job.handle(report(&chosen, 1, trained(1, &chosen))).expect("the chosen trainer reports");
        let mut job = job;
        for e in &accepted {
            job.apply(e);
        }
        assert!(job.training_done(), "one update of one selected trainer completes the round");
        let events = job.handle(report("agg", 1, aggregated(1))).expect("aggregate");
        assert!(matches!(&events[0], JobEvent::RoundAggregated { inputs, .. } if inputs.len() == 1));
    }

    #[test]
    fn updates_are_taken_once_from_the_assigned_worker_in_the_open_round() {
        let job = History::created(2).started().initialized().round_started(1).job();
        assert_eq!(job.handle(report("t0", 1, trained(1, "t0"))).expect("update"), vec![update(1, "t0")]);

        let impostor = JobCommand::Report(Report {
            worker_id: "w-evil".into(),
            ..match report("t0", 1, trained(1, "t0")) {
                JobCommand::Report(r) => r,
                _ => unreachable!(),
            }
        });
        assert!(matches!(job.handle(impostor), Err(Rejection::WrongWorker { .. })));
        assert!(matches!(job.handle(report("t0", 2, trained(2, "t0"))), Err(Rejection::WrongRound { got: 2, open: 1, .. })));
        assert!(matches!(job.handle(report("nope", 1, trained(1, "nope"))), Err(Rejection::UnknownTask(_))));
        let zero = report("t0", 1, ReportBody::Trained { digest: "u".into(), samples: 0, metrics: Metrics::new(), state: None });
        assert!(matches!(job.handle(zero), Err(Rejection::Unexpected(_))));

        let after = History::created(2).started().initialized().round_started(1).then(update(1, "t0")).job();
        assert!(matches!(after.handle(report("t0", 1, trained(1, "t0"))), Err(Rejection::Duplicate { round: 1, .. })));
        // The aggregate cannot come before every update.
        let early = after.handle(report("agg", 1, aggregated(1)));
        assert!(matches!(early, Err(Rejection::Unexpected(m)) if m.contains("before 1 input(s) arrived")));
    }

    #[test]
    fn a_round_closes_with_its_aggregate_and_the_job_completes_after_the_last() {
        let h = History::created(2).started().initialized().round_started(1).then(update(1, "t0")).then(update(1, "t1"));
        let events = h.job().handle(report("agg", 1, aggregated(1))).expect("aggregate");
        assert!(
            matches!(&events[..], [JobEvent::RoundAggregated { round: 1, inputs, .. }] if inputs == &vec!["u1t0".to_string(), "u1t1".to_string()])
        );

        let one = History::created(2).started().initialized().round(1).job();
        assert_eq!(one.rounds_completed, 1);
        assert!(!one.timers.contains_key("round-1"), "the round's deadline ends with it");
        assert!(matches!(one.handle(JobCommand::Complete), Err(Rejection::Unexpected(_))));
        assert!(matches!(one.handle(report("t0", 1, trained(1, "t0"))), Err(Rejection::WrongRound { open: 0, .. })));
        assert!(matches!(one.handle(report("agg", 1, aggregated(1))), Err(Rejection::WrongRound { .. })), "a closed round stays closed");

        let two = History::created(2).started().initialized().round(1).round(2).job();
        assert!(matches!(two.handle(JobCommand::StartRound { now_ms: 0 }), Err(Rejection::Unexpected(_))));
        let done = two.handle(JobCommand::Complete).expect("complete");
        assert!(matches!(&done[..], [JobEvent::JobCompleted { rounds_completed: 2, final_model, .. }] if final_model == "m2"));
        let completed = History::created(2).started().initialized().round(1).round(2).then(done[0].clone()).job();
        assert_eq!(completed.status, Status::Completed);
        assert!(matches!(completed.handle(JobCommand::Fail("late".into())), Err(Rejection::IllegalInState { .. })));
        assert!(matches!(completed.handle(JobCommand::Start { now_ms: 0 }), Err(Rejection::IllegalInState { command: "start", .. })));
        assert!(matches!(completed.handle(report("t0", 3, trained(3, "t0"))), Err(Rejection::IllegalInState { .. })));
    }

    #[test]
    fn a_failed_worker_fails_the_job_with_its_reason() {
        let job = History::created(2).started().initialized().round_started(1).job();
        let events = job.handle(report("t1", 1, ReportBody::Failed { error: "disk full".into() })).expect("fail");
        assert!(matches!(&events[..], [JobEvent::JobFailed { reason }] if reason.contains("disk full") && reason.contains("t1")));
    }

    #[test]
    fn timers_fire_only_when_armed_and_due() {
        let job = History::created(2).started().initialized().round_started(1).job();
        assert!(
            matches!(job.handle(JobCommand::Fire { timer: "round-1".into(), now_ms: 1 }), Err(Rejection::Unexpected(m)) if m.contains("due in"))
        );
        assert!(
            matches!(job.handle(JobCommand::Fire { timer: "round-9".into(), now_ms: LATE }), Err(Rejection::Unexpected(m)) if m.contains("not armed"))
        );
    }

    #[test]
    fn a_round_deadline_closes_training_by_quorum_or_fails_without_it() {
        let h = History::created_with(2, |s| s.quorum = Some(1)).started().initialized().round_started(1).then(update(1, "t0"));
        let events = h.job().handle(JobCommand::Fire { timer: "round-1".into(), now_ms: LATE }).expect("fire");
        assert_eq!(events[0], JobEvent::TimerFired { timer: "round-1".into() });
        assert_eq!(events[1], JobEvent::TrainingClosed { round: 1, dropped: vec!["t1".into()] });
        assert!(matches!(events[2], JobEvent::TimerSet { ref timer, .. } if timer == "round-1"), "the aggregator gets its own deadline");
        let mut closed = h.job();
        for e in &events {
            closed.apply(e);
        }
        assert!(closed.training_done());
        assert!(closed.handle(report("t1", 1, trained(1, "t1"))).is_err(), "a straggler's update is refused");
        let agg = closed.handle(report("agg", 1, aggregated(1))).expect("aggregate by quorum");
        assert!(matches!(&agg[..], [JobEvent::RoundAggregated { inputs, .. }] if inputs == &vec!["u1t0".to_string()]));

        let strict = History::created(2).started().initialized().round_started(1).then(update(1, "t0"));
        let events = strict.job().handle(JobCommand::Fire { timer: "round-1".into(), now_ms: LATE }).expect("fire");
        assert!(
            matches!(&events[1], JobEvent::JobFailed { reason } if reason.contains("1 of 2 updates") && reason.contains("quorum of 2"))
        );
    }

    #[test]
    fn max_run_time_stops_the_job_and_stopping_ends_terminated() {
        let h = History::created_with(2, |s| s.max_run_time_s = Some(1))
            .started()
            .then(JobEvent::TimerSet { timer: MAX_RUN_TIME.into(), due_at_ms: 1000 });
        let events = h.job().handle(JobCommand::Fire { timer: MAX_RUN_TIME.into(), now_ms: 1000 }).expect("fire");
        assert!(matches!(&events[1], JobEvent::JobStopping { reason } if reason.contains("maxRunTime of 1 s")));
        let stopping = h.then(events[0].clone()).then(events[1].clone()).job();
        assert_eq!(stopping.status, Status::Stopping);
        let end = stopping.handle(JobCommand::Terminate).expect("terminate");
        assert!(matches!(&end[..], [JobEvent::JobTerminated { reason }] if reason.contains("maxRunTime")));
        let mut done = stopping.clone();
        done.apply(&end[0]);
        assert_eq!(done.status, Status::Terminated);
        assert!(done.timers.is_empty(), "no timer outlives the job");
    }

    #[test]
    fn a_lost_worker_is_replaced_or_its_task_sits_out_within_quorum() {
        let open = History::created_with(2, |s| s.quorum = Some(1)).started().initialized().round_started(1);
        let replaced = open
            .job()
            .handle(JobCommand::LoseWorker { worker_id: "w-t0".into(), replacements: BTreeMap::from([("t0".into(), "w-spare".into())]) })
            .expect("lose");
        assert_eq!(
            replaced,
            vec![
                JobEvent::TaskAssigned { task_id: "t0".into(), worker_id: "w-spare".into() },
                JobEvent::WorkerLost { worker_id: "w-t0".into(), orphaned: vec![] }
            ]
        );

        let events = open.job().handle(JobCommand::LoseWorker { worker_id: "w-t0".into(), replacements: BTreeMap::new() }).expect("lose");
        assert_eq!(events, vec![JobEvent::WorkerLost { worker_id: "w-t0".into(), orphaned: vec!["t0".into()] }]);
        let mut job = open.job();
        job.apply(&events[0]);
        assert!(!job.training_done());
        job.apply(&update(1, "t1"));
        assert!(job.training_done(), "the round goes on without the lost trainer");
        assert!(job.handle(report("t0", 1, trained(1, "t0"))).is_err(), "the lost worker's late update is refused");

        let strict = History::created(2).started().initialized().round_started(1).job();
        let events = strict.handle(JobCommand::LoseWorker { worker_id: "w-t0".into(), replacements: BTreeMap::new() }).expect("lose");
        assert!(
            matches!(&events[1], JobEvent::JobFailed { reason } if reason.contains("1 trainer(s) left") && reason.contains("minClients"))
        );

        let no_agg = open.job().handle(JobCommand::LoseWorker { worker_id: "w-agg".into(), replacements: BTreeMap::new() }).expect("lose");
        assert!(matches!(&no_agg[1], JobEvent::JobFailed { reason } if reason.contains("'agg'")));
        assert!(open.job().handle(JobCommand::LoseWorker { worker_id: "w-nobody".into(), replacements: BTreeMap::new() }).is_err());
    }

    #[test]
    fn an_unusable_update_is_excluded_and_named_or_fails_the_round_without_quorum() {
        let bad = |task: &str| flame_events::protocol::Excluded { task_id: task.into(), digest: format!("u1{task}"), reason: "NaN".into() };
        let body = |excluded| ReportBody::Aggregated { digest: "m1".into(), metrics: Metrics::new(), optimizer_state: None, excluded };
        let full = |h: History| h.started().initialized().round_started(1).then(update(1, "t0")).then(update(1, "t1")).job();
        let lenient = full(History::created_with(2, |s| s.quorum = Some(1)));
        let events = lenient.handle(report("agg", 1, body(vec![bad("t1")]))).expect("aggregate");
        assert_eq!(events[0], JobEvent::UpdateExcluded { round: 1, task_id: "t1".into(), digest: "u1t1".into(), reason: "NaN".into() });
        assert!(matches!(&events[1], JobEvent::RoundAggregated { inputs, .. } if inputs == &vec!["u1t0".to_string()]));

        let strict = full(History::created(2));
        let events = strict.handle(report("agg", 1, body(vec![bad("t1")]))).expect("aggregate");
        assert!(matches!(&events[1], JobEvent::JobFailed { reason } if reason.contains("1 of 2 updates were usable")));

        let invented = flame_events::protocol::Excluded { task_id: "t0".into(), digest: "other".into(), reason: "x".into() };
        assert!(lenient.handle(report("agg", 1, body(vec![invented]))).is_err(), "only the round's own updates can be excluded");
    }

    #[test]
    fn refused_reports_are_recorded_without_changing_the_job() {
        let job = History::created(2).started().initialized().round(1).job();
        let Err(rejection) = job.handle(report("t0", 1, trained(1, "t0"))) else { panic!("must refuse") };
        let JobCommand::Report(r) = report("t0", 1, trained(1, "t0")) else { unreachable!() };
        let events = job.handle(JobCommand::RecordRejection { report: Box::new(r), reason: rejection.to_string() }).expect("record");
        let mut after = job.clone();
        after.apply(&events[0]);
        assert_eq!(after.rejected, 1);
        assert_eq!(
            (after.status, after.round, after.rounds_completed, &after.updates),
            (job.status, job.round, job.rounds_completed, &job.updates)
        );
        assert!(matches!(&events[0], JobEvent::ReportRejected { reason, .. } if reason.contains("open round is 0")));
    }
}
