//! What the job aggregate is asked to do, why it refuses, and `handle`: the
//! state table first, then one function per command (lifecycle commands in
//! [`super::lifecycle`], worker reports in [`super::reports`]).

use std::collections::BTreeMap;

use flame_events::job::{JobEvent, RunSpec, Status, TaskSpec};
use flame_events::protocol::Report;

use super::Job;
use super::transitions::allowed;

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
        /// A fork: the job starts from another job's model after a round.
        fork: Option<Box<flame_events::job::ForkOrigin>>,
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
        /// Differential privacy already spent by other jobs on the datasets
        /// this job has budgets for (dataset URL -> their runs): the runner
        /// reads it from the log; the job adds its own.
        spent: BTreeMap<String, Vec<crate::accountant::Runs>>,
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

impl Job {
    /// Decides what a command records.
    pub fn handle(&self, command: JobCommand) -> Result<Vec<JobEvent>, Rejection> {
        use JobCommand as C;
        let name = command.name();
        if !allowed(self.status, name) {
            return Err(Rejection::IllegalInState { command: name, status: self.status });
        }
        match command {
            C::Create { job_id, name, source, spec, tasks, fork } => {
                let created = JobEvent::JobCreated { job_id, name, source, spec, tasks };
                Ok(std::iter::once(created).chain(fork.map(|f| JobEvent::JobForked(*f))).collect())
            }
            C::Update { name, source, spec, tasks } => Ok(vec![JobEvent::JobUpdated { name, source, spec, tasks }]),
            C::Start { now_ms } => Ok(self.start(now_ms)),
            C::Assign(assignments) => self.assign(&assignments),
            C::StartRound { now_ms, spent } => self.start_round(now_ms, &spent),
            C::Fire { timer, now_ms } => self.fire(timer, now_ms),
            C::LoseWorker { worker_id, replacements } => self.lose_worker(worker_id, replacements),
            C::Stop { reason } => Ok(vec![JobEvent::JobStopping { reason }]),
            C::Terminate => Ok(vec![JobEvent::JobTerminated { reason: self.failure.clone().unwrap_or_else(|| "stopped".into()) }]),
            C::Complete => self.complete(),
            C::Fail(reason) => Ok(vec![JobEvent::JobFailed { reason }]),
            C::Delete => Ok(vec![JobEvent::JobDeleted {}]),
            C::RecordRejection { report, reason } => Ok(vec![JobEvent::ReportRejected {
                command_id: report.command_id,
                task_id: report.task_id,
                worker_id: report.worker_id,
                round: report.round,
                reason,
            }]),
            C::Report(report) => self.report(report),
        }
    }
}
