//! Every legal move of a job between Flame's states, as a table; a command
//! in a state the table does not list is refused.

use flame_events::job::Status;

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

#[cfg(test)]
pub(crate) mod tests {
    //! Given a history reaching each state, every command either moves the
    //! job as the table says or is refused as illegal in that state.

    use std::collections::{BTreeMap, BTreeSet};

    use flame_events::job::{JobEvent, Metrics, RunSpec};
    use flame_events::protocol::{Report, ReportBody};

    use super::*;
    use crate::job::{DEPLOY, Job, JobCommand, MAX_RUN_TIME, Rejection, round_timer};
    use crate::testing::{self, History, JOB, report, trained, update};

    pub(crate) const LATE: u64 = u64::MAX / 2;

    pub(crate) fn assignments() -> BTreeMap<String, String> {
        ["t0", "t1", "agg"].iter().map(|t| (t.to_string(), format!("w-{t}"))).collect()
    }

    pub(crate) fn aggregated(round: u32) -> ReportBody {
        ReportBody::Aggregated { digest: format!("m{round}"), metrics: Metrics::new(), optimizer_state: None, excluded: vec![] }
    }

    pub(crate) fn spec() -> RunSpec {
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
                    .then(JobEvent::TaskDeployed { task_id: "t1".into(), worker_id: "w-t1".into(), samples: None })
                    .then(JobEvent::TaskDeployed { task_id: "agg".into(), worker_id: "w-agg".into(), samples: None }),
            ),
            (
                "deploying with quorum 1, t0 left",
                quorum1()
                    .deploying()
                    .then(JobEvent::TaskDeployed { task_id: "t1".into(), worker_id: "w-t1".into(), samples: None })
                    .then(JobEvent::TaskDeployed { task_id: "agg".into(), worker_id: "w-agg".into(), samples: None }),
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
        let deployed = |t: &str| report(t, 0, ReportBody::Deployed { samples: None });
        vec![
            JobCommand::Create { job_id: JOB.into(), name: "n".into(), source: "s".into(), spec: s.clone(), tasks: vec![], fork: None },
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
            JobCommand::StartRound { now_ms: 0, spent: Default::default() },
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
                    body: ReportBody::Deployed { samples: None },
                    via: None,
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
}
