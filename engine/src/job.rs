//! The job aggregate: a pure state machine. `handle` decides which events a
//! command produces (or rejects it); `apply` folds an event into the state.

use std::collections::BTreeMap;

use flame_events::job::{JobEvent, Metrics, RunSpec, TaskSpec};
use flame_events::protocol::{Report, ReportBody, UpdateRef};

/// Flame's job states (the subset this version reaches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing recorded yet.
    New,
    /// Created, tasks not yet placed ("ready" in Flame).
    Ready,
    /// Tasks placed, rounds running.
    Running,
    /// All rounds done.
    Completed,
    /// Stopped by an error.
    Failed,
}

impl Status {
    /// Whether the job can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
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
    /// Place tasks on workers (task id -> worker id) and start.
    Assign(BTreeMap<String, String>),
    /// Begin the next round.
    StartRound,
    /// Take a worker's report.
    Report(Report),
    /// Finish after the last round.
    Complete,
    /// Give up.
    Fail(String),
}

/// Why a command was refused; nothing is recorded for it.
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
    /// State.
    pub status: Status,
    /// Run settings.
    pub spec: Option<RunSpec>,
    /// Tasks.
    pub tasks: Vec<TaskSpec>,
    /// Task id -> worker id.
    pub assignments: BTreeMap<String, String>,
    /// The current global model.
    pub global_model: Option<String>,
    /// The latest round started (0 = none).
    pub round: u32,
    /// Rounds aggregated.
    pub rounds_completed: u32,
    /// Updates accepted in the open round, by task id.
    pub updates: BTreeMap<String, UpdateRef>,
    /// Metrics of the latest global model.
    pub metrics: Metrics,
    /// Digest of the server optimizer's state, for adaptive optimizers.
    pub optimizer_state: Option<String>,
    /// Why it failed.
    pub failure: Option<String>,
    /// Events applied (the stream version).
    pub version: u64,
}

impl Default for Job {
    fn default() -> Self {
        Self {
            job_id: String::new(),
            name: String::new(),
            status: Status::New,
            spec: None,
            tasks: Vec::new(),
            assignments: BTreeMap::new(),
            global_model: None,
            round: 0,
            rounds_completed: 0,
            updates: BTreeMap::new(),
            metrics: Metrics::new(),
            optimizer_state: None,
            failure: None,
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

    /// The task that aggregates (two-tier: the only non-data task).
    pub fn aggregator(&self) -> Option<&TaskSpec> {
        self.tasks.iter().find(|t| !t.is_data_consumer)
    }

    /// The data-consuming tasks.
    pub fn trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.tasks.iter().filter(|t| t.is_data_consumer)
    }

    /// Decides what a command records.
    pub fn handle(&self, command: JobCommand) -> Result<Vec<JobEvent>, Rejection> {
        use JobCommand as C;
        let illegal = |command| Err(Rejection::IllegalInState { command, status: self.status });
        match command {
            C::Create { job_id, name, source, spec, tasks } => {
                if self.status != Status::New {
                    return illegal("create");
                }
                Ok(vec![JobEvent::JobCreated { job_id, name, source, spec, tasks }])
            }
            C::Assign(assignments) => {
                if self.status != Status::Ready {
                    return illegal("assign tasks");
                }
                let mut events = Vec::new();
                for t in &self.tasks {
                    let worker =
                        assignments.get(&t.task_id).ok_or_else(|| Rejection::Unexpected(format!("task '{}' has no worker", t.task_id)))?;
                    events.push(JobEvent::TaskAssigned { task_id: t.task_id.clone(), worker_id: worker.clone() });
                }
                events.push(JobEvent::JobStarted {});
                Ok(events)
            }
            C::StartRound => {
                if self.status != Status::Running {
                    return illegal("start a round");
                }
                let global_model = self.global_model.clone().ok_or_else(|| Rejection::Unexpected("no global model yet".into()))?;
                if self.round_open() || self.rounds_completed >= self.total_rounds() {
                    return Err(Rejection::Unexpected(format!(
                        "cannot start a round: round {} is open or all {} rounds are done",
                        self.round,
                        self.total_rounds()
                    )));
                }
                Ok(vec![JobEvent::RoundStarted { round: self.round + 1, global_model }])
            }
            C::Complete => {
                if self.status != Status::Running {
                    return illegal("complete");
                }
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
            C::Fail(reason) => {
                if self.status.is_terminal() || self.status == Status::New {
                    return illegal("fail");
                }
                Ok(vec![JobEvent::JobFailed { reason }])
            }
            C::Report(report) => self.handle_report(report),
        }
    }

    fn handle_report(&self, r: Report) -> Result<Vec<JobEvent>, Rejection> {
        if self.status != Status::Running {
            return Err(Rejection::IllegalInState { command: "take a report", status: self.status });
        }
        let task = self.tasks.iter().find(|t| t.task_id == r.task_id).ok_or_else(|| Rejection::UnknownTask(r.task_id.clone()))?;
        let assigned = self.assignments.get(&r.task_id).cloned().unwrap_or_default();
        if assigned != r.worker_id {
            return Err(Rejection::WrongWorker { task: r.task_id, worker: r.worker_id, assigned });
        }
        match r.body {
            ReportBody::Failed { error } => Ok(vec![JobEvent::JobFailed {
                reason: format!("worker '{}' failed task '{}' in round {}: {error}", r.worker_id, r.task_id, r.round),
            }]),
            ReportBody::Initialized { digest } => {
                if task.is_data_consumer || self.global_model.is_some() {
                    return Err(Rejection::Unexpected(format!("unexpected initial model from task '{}'", r.task_id)));
                }
                Ok(vec![JobEvent::ModelInitialized { digest, worker_id: r.worker_id }])
            }
            ReportBody::Trained { digest, samples, metrics } => {
                self.check_round(&r.task_id, r.round)?;
                if !task.is_data_consumer {
                    return Err(Rejection::Unexpected(format!("task '{}' does not train", r.task_id)));
                }
                if self.updates.contains_key(&r.task_id) {
                    return Err(Rejection::Duplicate { task: r.task_id, round: r.round });
                }
                if samples == 0 {
                    return Err(Rejection::Unexpected(format!("task '{}' reported an update trained on 0 samples", r.task_id)));
                }
                Ok(vec![JobEvent::UpdateReported { round: r.round, task_id: r.task_id, worker_id: r.worker_id, digest, samples, metrics }])
            }
            ReportBody::Aggregated { digest, metrics, optimizer_state } => {
                self.check_round(&r.task_id, r.round)?;
                if task.is_data_consumer {
                    return Err(Rejection::Unexpected(format!("task '{}' does not aggregate", r.task_id)));
                }
                let missing = self.trainers().filter(|t| !self.updates.contains_key(&t.task_id)).count();
                if missing > 0 {
                    return Err(Rejection::Unexpected(format!("aggregate for round {} before {missing} update(s) arrived", r.round)));
                }
                let inputs = self.trainers().filter_map(|t| self.updates.get(&t.task_id)).map(|u| u.digest.clone()).collect();
                Ok(vec![JobEvent::RoundAggregated { round: r.round, digest, inputs, metrics, optimizer_state }])
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

    /// Folds one event into the state.
    pub fn apply(&mut self, event: &JobEvent) {
        self.version += 1;
        match event {
            JobEvent::JobCreated { job_id, name, spec, tasks, .. } => {
                self.job_id = job_id.clone();
                self.name = name.clone();
                self.spec = Some(spec.clone());
                self.tasks = tasks.clone();
                self.status = Status::Ready;
            }
            JobEvent::TaskAssigned { task_id, worker_id } => {
                self.assignments.insert(task_id.clone(), worker_id.clone());
            }
            JobEvent::JobStarted {} => self.status = Status::Running,
            JobEvent::ModelInitialized { digest, .. } => self.global_model = Some(digest.clone()),
            JobEvent::RoundStarted { round, .. } => {
                self.round = *round;
                self.updates.clear();
            }
            JobEvent::UpdateReported { task_id, digest, samples, .. } => {
                self.updates.insert(task_id.clone(), UpdateRef { task_id: task_id.clone(), digest: digest.clone(), samples: *samples });
            }
            JobEvent::RoundAggregated { round, digest, metrics, optimizer_state, .. } => {
                self.optimizer_state = optimizer_state.clone();
                self.rounds_completed = *round;
                self.global_model = Some(digest.clone());
                self.metrics = metrics.clone();
                self.updates.clear();
            }
            JobEvent::JobCompleted { .. } => self.status = Status::Completed,
            JobEvent::JobFailed { reason } => {
                self.status = Status::Failed;
                self.failure = Some(reason.clone());
            }
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

    use std::collections::BTreeMap;

    use flame_events::job::{JobEvent, Metrics};
    use flame_events::protocol::{Report, ReportBody};

    use super::*;
    use crate::testing::{self, History, JOB, report, trained, update};

    fn assignments() -> BTreeMap<String, String> {
        ["t0", "t1", "agg"].iter().map(|t| (t.to_string(), format!("w-{t}"))).collect()
    }

    #[test]
    fn create_records_the_job_once() {
        let events = Job::default()
            .handle(JobCommand::Create {
                job_id: JOB.into(),
                name: "n".into(),
                source: "s".into(),
                spec: match testing::created(2) {
                    JobEvent::JobCreated { spec, .. } => spec,
                    _ => unreachable!(),
                },
                tasks: vec![],
            })
            .expect("create");
        assert_eq!(events.len(), 1);
        let job = History::created(2).job();
        assert_eq!(job.status, Status::Ready);
        let again = job.handle(JobCommand::Create {
            job_id: JOB.into(),
            name: "n".into(),
            source: "s".into(),
            spec: job.spec.clone().expect("spec"),
            tasks: vec![],
        });
        assert!(matches!(again, Err(Rejection::IllegalInState { command: "create", status: Status::Ready })));
    }

    #[test]
    fn assign_places_every_task_then_starts() {
        let job = History::created(2).job();
        let events = job.handle(JobCommand::Assign(assignments())).expect("assign");
        assert_eq!(events.len(), 4);
        assert_eq!(events.last(), Some(&JobEvent::JobStarted {}));
        let mut partial = assignments();
        partial.remove("t1");
        assert!(matches!(job.handle(JobCommand::Assign(partial)), Err(Rejection::Unexpected(m)) if m.contains("t1")));
        let running = History::created(2).started().job();
        assert!(matches!(running.handle(JobCommand::Assign(assignments())), Err(Rejection::IllegalInState { .. })));
    }

    #[test]
    fn the_initial_model_comes_from_the_aggregator_only() {
        let job = History::created(2).started().job();
        assert!(matches!(job.handle(JobCommand::StartRound), Err(Rejection::Unexpected(_))));
        let from_trainer = job.handle(report("t0", 0, ReportBody::Initialized { digest: "x".into() }));
        assert!(matches!(from_trainer, Err(Rejection::Unexpected(_))));
        let events = job.handle(report("agg", 0, ReportBody::Initialized { digest: "m0".into() })).expect("init");
        assert_eq!(events, vec![JobEvent::ModelInitialized { digest: "m0".into(), worker_id: "w-agg".into() }]);
        let twice =
            History::created(2).started().initialized().job().handle(report("agg", 0, ReportBody::Initialized { digest: "m0".into() }));
        assert!(twice.is_err());
    }

    #[test]
    fn updates_are_taken_once_from_the_assigned_worker_in_the_open_round() {
        let job = History::created(2).started().initialized().then(JobEvent::RoundStarted { round: 1, global_model: "m0".into() }).job();
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
        let zero = report("t0", 1, ReportBody::Trained { digest: "u".into(), samples: 0, metrics: Metrics::new() });
        assert!(matches!(job.handle(zero), Err(Rejection::Unexpected(_))));

        let after = History {
            events: [
                History::created(2).started().initialized().events,
                vec![JobEvent::RoundStarted { round: 1, global_model: "m0".into() }, update(1, "t0")],
            ]
            .concat(),
        }
        .job();
        assert!(matches!(after.handle(report("t0", 1, trained(1, "t0"))), Err(Rejection::Duplicate { round: 1, .. })));
        // The aggregate cannot come before every update.
        let early =
            after.handle(report("agg", 1, ReportBody::Aggregated { digest: "m1".into(), metrics: Metrics::new(), optimizer_state: None }));
        assert!(matches!(early, Err(Rejection::Unexpected(m)) if m.contains("1 update")));
    }

    #[test]
    fn a_round_closes_with_its_aggregate_and_the_job_completes_after_the_last() {
        let h = History::created(2)
            .started()
            .initialized()
            .then(JobEvent::RoundStarted { round: 1, global_model: "m0".into() })
            .then(update(1, "t0"))
            .then(update(1, "t1"));
        let events = h
            .job()
            .handle(report(
                "agg",
                1,
                ReportBody::Aggregated { digest: "m1".into(), metrics: Metrics::from([("accuracy".into(), 0.9)]), optimizer_state: None },
            ))
            .expect("aggregate");
        assert!(
            matches!(&events[..], [JobEvent::RoundAggregated { round: 1, inputs, .. }] if inputs == &vec!["u1t0".to_string(), "u1t1".to_string()])
        );

        let one = History::created(2).started().initialized().round(1).job();
        assert_eq!(one.rounds_completed, 1);
        assert!(matches!(one.handle(JobCommand::Complete), Err(Rejection::Unexpected(_))));
        assert!(matches!(one.handle(report("t0", 1, trained(1, "t0"))), Err(Rejection::WrongRound { open: 0, .. })));

        let two = History::created(2).started().initialized().round(1).round(2).job();
        assert!(matches!(two.handle(JobCommand::StartRound), Err(Rejection::Unexpected(_))));
        let done = two.handle(JobCommand::Complete).expect("complete");
        assert!(matches!(&done[..], [JobEvent::JobCompleted { rounds_completed: 2, final_model, .. }] if final_model == "m2"));
        let completed = History::created(2).started().initialized().round(1).round(2).then(done[0].clone()).job();
        assert_eq!(completed.status, Status::Completed);
        assert!(matches!(completed.handle(JobCommand::Fail("late".into())), Err(Rejection::IllegalInState { .. })));
        assert!(matches!(completed.handle(report("t0", 3, trained(3, "t0"))), Err(Rejection::IllegalInState { .. })));
    }

    #[test]
    fn a_failed_worker_fails_the_job_with_its_reason() {
        let job = History::created(2).started().initialized().then(JobEvent::RoundStarted { round: 1, global_model: "m0".into() }).job();
        let events = job.handle(report("t1", 1, ReportBody::Failed { error: "disk full".into() })).expect("fail");
        assert!(matches!(&events[..], [JobEvent::JobFailed { reason }] if reason.contains("disk full") && reason.contains("t1")));
    }
}
