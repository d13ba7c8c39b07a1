//! A job's life around its rounds: starting and its deadlines, placing tasks,
//! starting rounds, timers coming due, lost workers, completing.

use std::collections::{BTreeMap, BTreeSet};

use flame_events::job::{JobEvent, Status, TaskSpec};

use super::{Job, Rejection};
use crate::accountant::Runs;

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

impl Job {
    /// Start: arm the deployment deadline and `maxRunTime`.
    pub(super) fn start(&self, now_ms: u64) -> Vec<JobEvent> {
        let mut events = vec![JobEvent::JobStarting {}];
        events.push(JobEvent::TimerSet { timer: DEPLOY.into(), due_at_ms: now_ms.saturating_add(self.round_timeout_ms()) });
        if let Some(max) = self.spec.as_ref().and_then(|s| s.max_run_time_s) {
            events.push(JobEvent::TimerSet { timer: MAX_RUN_TIME.into(), due_at_ms: now_ms.saturating_add(max.saturating_mul(1000)) });
        }
        events
    }

    /// Every task placed on a worker at once, then deployment.
    pub(super) fn assign(&self, assignments: &BTreeMap<String, String>) -> Result<Vec<JobEvent>, Rejection> {
        let mut events = Vec::new();
        for t in self.tasks.iter() {
            let worker = assignments.get(&t.task_id).ok_or_else(|| Rejection::Unexpected(format!("task '{}' has no worker", t.task_id)))?;
            events.push(JobEvent::TaskAssigned { task_id: t.task_id.clone(), worker_id: worker.clone() });
        }
        events.push(JobEvent::JobDeploying {});
        Ok(events)
    }

    /// The next round, from the current global model, with its trainers and its deadline.
    pub(super) fn start_round(&self, now_ms: u64, spent: &BTreeMap<String, Vec<Runs>>) -> Result<Vec<JobEvent>, Rejection> {
        let global_model = self.global_model.clone().ok_or_else(|| Rejection::Unexpected("no global model yet".into()))?;
        if self.round_open() || self.rounds_completed >= self.total_rounds() {
            return Err(Rejection::Unexpected(format!(
                "cannot start a round: round {} is open or all {} rounds are done",
                self.round.number,
                self.total_rounds()
            )));
        }
        let round = self.round.number + 1;
        let mut selected = self.select(round);
        // Privacy budgets: a trainer whose dataset this round would take past its budget sits it out.
        let refused = self.over_budget(round, &selected, spent);
        let mut events: Vec<JobEvent> = refused.clone();
        if !refused.is_empty() {
            let out: BTreeSet<&str> = refused
                .iter()
                .filter_map(|e| match e {
                    JobEvent::PrivacyRefused { task_id, .. } => Some(task_id.as_str()),
                    _ => None,
                })
                .collect();
            if selected.is_empty() && !self.is_async() {
                selected = self.active_trainers().map(|t| t.task_id.clone()).collect();
            }
            selected.retain(|t| !out.contains(t.as_str()));
            let quorum = self.spec.as_ref().and_then(|s| s.quorum).map_or(1, |q| q as usize);
            if !self.is_async() && selected.len() < quorum.max(1) {
                events.push(JobEvent::JobFailed {
                    reason: format!(
                        "round {round}: the privacy budgets of the datasets of [{}] leave {} trainer(s), fewer than the quorum of {} (minClients); `flamectl privacy DATASET` shows the ledger",
                        out.iter().copied().collect::<Vec<_>>().join(", "),
                        selected.len(),
                        quorum.max(1)
                    ),
                });
                return Ok(events);
            }
        }
        events.push(JobEvent::RoundStarted { round, global_model, selected });
        events.push(JobEvent::TimerSet { timer: round_timer(round), due_at_ms: now_ms.saturating_add(self.round_timeout_ms()) });
        Ok(events)
    }

    /// The trainers among `selected` (none: every active one) whose datasets
    /// this round would take past their privacy budgets, as events: what was
    /// spent (by other jobs, `spent`, and this one) and what the round would make it.
    fn over_budget(&self, round: u32, selected: &[String], spent: &BTreeMap<String, Vec<Runs>>) -> Vec<JobEvent> {
        let Some(spec) = self.spec.as_ref().filter(|s| !s.privacy_budgets.is_empty()) else { return Vec::new() };
        // Each round a trainer takes part in, its whole clipped update gets noise: one run with q = 1.
        let z = spec.training.privacy.map_or(0.0, |p| p.noise_factor);
        let orders = crate::accountant::default_orders();
        let candidates: Vec<&flame_events::job::TaskSpec> =
            self.active_trainers().filter(|t| selected.is_empty() || selected.contains(&t.task_id)).collect();
        let mut out = Vec::new();
        for t in candidates {
            let Some(dataset) = t.dataset.as_ref() else { continue };
            let Some(budget) = spec.privacy_budgets.get(dataset) else { continue };
            let mine: u64 = self
                .trainers()
                .filter(|o| o.dataset.as_ref() == Some(dataset))
                .map(|o| self.records.updates_made.get(&o.task_id).copied().unwrap_or(0))
                .sum();
            let mut runs: Vec<Runs> = spent.get(dataset).cloned().unwrap_or_default();
            runs.push(Runs { q: 1.0, z, steps: mine });
            let (before, _) = crate::accountant::epsilon(&runs, budget.delta, &orders);
            runs.push(Runs { q: 1.0, z, steps: 1 });
            let (after, _) = crate::accountant::epsilon(&runs, budget.delta, &orders);
            if after > budget.epsilon {
                out.push(JobEvent::PrivacyRefused {
                    round,
                    task_id: t.task_id.clone(),
                    dataset: dataset.clone(),
                    spent_epsilon: before,
                    epsilon_after: after,
                    budget: *budget,
                });
            }
        }
        out
    }

    /// All rounds done: the final model.
    pub(super) fn complete(&self) -> Result<Vec<JobEvent>, Rejection> {
        if self.round_open() || self.rounds_completed < self.total_rounds() {
            return Err(Rejection::Unexpected(format!(
                "cannot complete after {} of {} rounds",
                self.rounds_completed,
                self.total_rounds()
            )));
        }
        if let Some(t) = self.evaluations_owed().next() {
            return Err(Rejection::Unexpected(format!("task '{t}' has not evaluated round {}'s model yet", self.evaluation.round)));
        }
        Ok(vec![JobEvent::JobCompleted {
            rounds_completed: self.rounds_completed,
            final_model: self.global_model.clone().unwrap_or_default(),
            metrics: self.metrics.clone(),
        }])
    }

    /// A timer came due: what its deadline means in the job's state now.
    pub(super) fn fire(&self, timer: String, now_ms: u64) -> Result<Vec<JobEvent>, Rejection> {
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
            t if self.status == Status::Running && self.round_open() && t == round_timer(self.round.number) => {
                events.extend(self.round_deadline(now_ms, waiting));
            }
            // A timer whose reason has passed: record that it fired, nothing more.
            _ => {}
        }
        Ok(events)
    }

    /// The open round's deadline: close training by quorum (the aggregator
    /// gets a deadline of its own), or fail.
    fn round_deadline(&self, now_ms: u64, waiting: impl Fn(String) -> String) -> Vec<JobEvent> {
        let round = self.round.number;
        let updates = self.round.updates.len();
        if self.training_done() {
            return vec![JobEvent::JobFailed { reason: waiting(format!("round {round}: the aggregator did not aggregate")) }];
        }
        if updates < self.quorum() {
            return vec![JobEvent::JobFailed {
                reason: waiting(format!(
                    "round {round}: {updates} of {} updates arrived, fewer than the quorum of {} (minClients)",
                    self.round_trainers().count(),
                    self.quorum()
                )),
            }];
        }
        // Asynchronous trainers still training are not dropped: their updates join a later buffer.
        let dropped = if self.is_async() {
            Vec::new()
        } else {
            self.round_trainers().map(|t| t.task_id.clone()).filter(|t| !self.round.updates.contains_key(t)).collect()
        };
        vec![
            JobEvent::TrainingClosed { round, dropped },
            JobEvent::TimerSet { timer: round_timer(round), due_at_ms: now_ms.saturating_add(self.round_timeout_ms()) },
        ]
    }

    /// A worker stopped heartbeating: its tasks move to the replacements found, or sit out.
    pub(super) fn lose_worker(&self, worker_id: String, replacements: BTreeMap<String, String>) -> Result<Vec<JobEvent>, Rejection> {
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
}

#[cfg(test)]
mod tests {
    //! Given a history, when a lifecycle command arrives, then these events (or this rejection).

    use std::collections::BTreeMap;

    use flame_events::job::JobEvent;
    use flame_events::protocol::ReportBody;

    use super::*;
    use crate::job::transitions::tests::{LATE, aggregated, assignments, spec};
    use crate::job::{JobCommand, Rejection};
    use crate::testing::{History, JOB, report, trained, update};

    #[test]
    fn create_records_the_job_once() {
        let events = Job::default()
            .handle(JobCommand::Create {
                job_id: JOB.into(),
                name: "n".into(),
                source: "s".into(),
                spec: spec(),
                tasks: vec![],
                fork: None,
            })
            .expect("create");
        assert_eq!(events.len(), 1);
        let job = History::created(2).job();
        assert_eq!(job.status, Status::Ready);
        let again = job.handle(JobCommand::Create {
            job_id: JOB.into(),
            name: "n".into(),
            source: "s".into(),
            spec: spec(),
            tasks: vec![],
            fork: None,
        });
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
            let events = h.job().handle(report(t, 0, ReportBody::Deployed { samples: None })).expect("deployed");
            assert_eq!(events, vec![JobEvent::TaskDeployed { task_id: t.into(), worker_id: format!("w-{t}"), samples: None }]);
            h = h.then(events[0].clone());
        }
        assert!(h.job().handle(report("t0", 0, ReportBody::Deployed { samples: None })).is_err(), "a task deploys once");
        let last = h.job().handle(report("agg", 0, ReportBody::Deployed { samples: None })).expect("last");
        assert_eq!(last.last(), Some(&JobEvent::JobStarted {}));
    }

    #[test]
    fn a_round_starts_with_its_deadline() {
        let job = History::created_with(2, |s| s.round_timeout_s = Some(5)).started().initialized().job();
        let events = job.handle(JobCommand::StartRound { now_ms: 100, spent: Default::default() }).expect("round");
        assert_eq!(
            events,
            vec![
                JobEvent::RoundStarted { round: 1, global_model: "m0".into(), selected: vec![] },
                JobEvent::TimerSet { timer: "round-1".into(), due_at_ms: 5_100 }
            ]
        );
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
    fn a_round_closes_with_its_aggregate_and_the_job_completes_after_the_last() {
        let one = History::created(2).started().initialized().round(1).job();
        assert_eq!(one.rounds_completed, 1);
        assert!(!one.timers.contains_key("round-1"), "the round's deadline ends with it");
        assert!(matches!(one.handle(JobCommand::Complete), Err(Rejection::Unexpected(_))));

        let two = History::created(2).started().initialized().round(1).round(2).job();
        assert!(matches!(two.handle(JobCommand::StartRound { now_ms: 0, spent: Default::default() }), Err(Rejection::Unexpected(_))));
        let done = two.handle(JobCommand::Complete).expect("complete");
        assert!(matches!(&done[..], [JobEvent::JobCompleted { rounds_completed: 2, final_model, .. }] if final_model == "m2"));
        let completed = History::created(2).started().initialized().round(1).round(2).then(done[0].clone()).job();
        assert_eq!(completed.status, Status::Completed);
        assert!(matches!(completed.handle(JobCommand::Fail("late".into())), Err(Rejection::IllegalInState { .. })));
        assert!(matches!(completed.handle(JobCommand::Start { now_ms: 0 }), Err(Rejection::IllegalInState { command: "start", .. })));
        assert!(matches!(completed.handle(report("t0", 3, trained(3, "t0"))), Err(Rejection::IllegalInState { .. })));
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
}
