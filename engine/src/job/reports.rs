//! Worker reports. A report is a request: it becomes events only if it comes
//! from the worker its task is assigned to and fits the job's state. After
//! those checks each kind of report has its own function.

use flame_events::job::{JobEvent, Metrics, Status, TaskSpec};
use flame_events::protocol::{Excluded, Report, ReportBody};

use super::round::Input;
use super::{Job, Rejection};

impl Job {
    /// A worker's report: who sent it, then what it says.
    pub(super) fn report(&self, r: Report) -> Result<Vec<JobEvent>, Rejection> {
        // The subject a report arrived on names who published it; a report in another worker's name is refused.
        if let Some(via) = r.via.as_deref().filter(|v| *v != r.worker_id) {
            return Err(Rejection::Unexpected(format!(
                "a report in worker '{}''s name arrived on the subject of '{via}' (flame.report.<job>.{via}), which is neither that worker nor a group its registration names",
                r.worker_id
            )));
        }
        let task = self.task(&r.task_id).ok_or_else(|| Rejection::UnknownTask(r.task_id.clone()))?;
        let assigned = self.assignments.get(&r.task_id).cloned().unwrap_or_default();
        if assigned != r.worker_id {
            return Err(Rejection::WrongWorker { task: r.task_id, worker: r.worker_id, assigned });
        }
        if self.orphaned.contains(&r.task_id) {
            return Err(Rejection::Unexpected(format!("task '{}' sits out: its worker '{}' was lost", r.task_id, r.worker_id)));
        }
        let Report { task_id, worker_id, round, body, .. } = r;
        match body {
            ReportBody::Failed { error } if self.fails_training(task, &r.command_id, round) => {
                Ok(self.training_failed(task_id, worker_id, round, error))
            }
            ReportBody::Failed { error } if self.fails_async_training(task, &r.command_id, round) => {
                Ok(vec![JobEvent::TrainingFailed { round, task_id, worker_id, error }])
            }
            // The same failure again (a redelivery after an engine restart): it changes nothing.
            ReportBody::Failed { .. }
                if self.round.failed.contains(&task_id) && round == self.round.number && r.command_id == self.train_id(round, &task_id) =>
            {
                Err(Rejection::Duplicate { task: task_id, round })
            }
            // Asynchronous jobs: a training no longer in flight failed again (a redelivery).
            ReportBody::Failed { .. } if self.is_async() && r.command_id == self.train_id(round, &task_id) => {
                Err(Rejection::Duplicate { task: task_id, round })
            }
            ReportBody::Failed { error } => {
                Ok(vec![JobEvent::JobFailed { reason: format!("worker '{worker_id}' failed task '{task_id}' in round {round}: {error}") }])
            }
            ReportBody::Deployed { samples } => self.deployed(task_id, worker_id, samples.filter(|_| task.is_data_consumer)),
            _ if self.status != Status::Running => {
                Err(Rejection::Unexpected(format!("round reports are taken while the job runs; it is {:?}", self.status)))
            }
            ReportBody::Initialized { digest } => self.initialized(task, worker_id, digest),
            ReportBody::Trained { state: None, .. } if self.keeps_client_state() => Err(Rejection::Unexpected(format!(
                "task '{task_id}' sent no client state with its update; {} needs one",
                self.spec.as_ref().map_or("", |s| s.optimizer.name())
            ))),
            // More samples than the task's dataset holds: the claim would weigh its update up. The
            // update is refused; in a synchronous round the task sits it out, as after a failure.
            ReportBody::Trained { samples, .. } if self.rows_exceeded(&task_id, samples).is_some() => {
                let rows = self.rows_exceeded(&task_id, samples).unwrap_or_default();
                let error = format!(
                    "the update claims {samples} samples; the task's dataset holds {rows} training rows (its worker said so at deployment)"
                );
                if self.fails_training(task, &r.command_id, round) {
                    Ok(self.training_failed(task_id, worker_id, round, error))
                } else if self.fails_async_training(task, &r.command_id, round) {
                    Ok(vec![JobEvent::TrainingFailed { round, task_id, worker_id, error }])
                } else {
                    Err(Rejection::Unexpected(error))
                }
            }
            ReportBody::Trained { digest, samples, metrics, state } => {
                let update = Trained { task, worker_id, round, digest, samples, metrics, state };
                if self.is_async() { self.buffered(update) } else { self.trained(update) }
            }
            ReportBody::Coordinated { pairing } => self.coordinated(&task_id, round, pairing),
            ReportBody::Aggregated { digest, metrics, optimizer_state, excluded } => {
                self.aggregated(task, worker_id, round, Aggregated { digest, metrics, optimizer_state, excluded })
            }
            ReportBody::Evaluated { metrics } => self.evaluated(task, worker_id, round, metrics),
        }
    }

    /// A worker confirmed its task; the last confirmation starts the job.
    fn deployed(&self, task_id: String, worker_id: String, samples: Option<u64>) -> Result<Vec<JobEvent>, Rejection> {
        if self.status != Status::Deploying || self.deployed.contains(&task_id) {
            return Err(Rejection::Unexpected(format!("task '{task_id}' is already deployed (the job is {:?})", self.status)));
        }
        // Deployed and orphaned tasks are tasks of the job; counted without a pass over every task.
        let orphaned_undeployed = self.orphaned.iter().filter(|t| !self.deployed.contains(*t)).count();
        let rest = self.tasks.len().saturating_sub(self.deployed.len() + orphaned_undeployed);
        let mut events = vec![JobEvent::TaskDeployed { task_id, worker_id, samples }];
        if rest == 1 {
            events.push(JobEvent::JobStarted {});
        }
        Ok(events)
    }

    /// The top aggregator made the initial model.
    fn initialized(&self, task: &TaskSpec, worker_id: String, digest: String) -> Result<Vec<JobEvent>, Rejection> {
        if task.is_data_consumer || self.global_model.is_some() {
            return Err(Rejection::Unexpected(format!("unexpected initial model from task '{}'", task.task_id)));
        }
        Ok(vec![JobEvent::ModelInitialized { digest, worker_id }])
    }

    /// Federated evaluation: once per asked trainer, for the latest evaluated round.
    fn evaluated(&self, task: &TaskSpec, worker_id: String, round: u32, metrics: Metrics) -> Result<Vec<JobEvent>, Rejection> {
        let id = &task.task_id;
        let e = &self.evaluation;
        if round != e.round || !e.tasks.contains(id) {
            return Err(Rejection::Unexpected(format!(
                "task '{id}' was not asked to evaluate round {round}'s model (the trainers evaluate round {}'s)",
                e.round
            )));
        }
        if e.reported.contains(id) {
            return Err(Rejection::Duplicate { task: id.clone(), round });
        }
        Ok(vec![JobEvent::ModelEvaluated { round, task_id: id.clone(), worker_id, metrics }])
    }

    /// A synchronous round's update: once per selected trainer, while training is open.
    fn trained(&self, u: Trained) -> Result<Vec<JobEvent>, Rejection> {
        let id = &u.task.task_id;
        self.check_round(id, u.round)?;
        if !u.task.is_data_consumer {
            return Err(Rejection::Unexpected(format!("task '{id}' does not train")));
        }
        if self.round.updates.contains_key(id) {
            return Err(Rejection::Duplicate { task: id.clone(), round: u.round });
        }
        if !self.round.selected.is_empty() && !self.round.selected.contains(id) {
            return Err(Rejection::Unexpected(format!("task '{id}' was not selected for round {}", u.round)));
        }
        if self.round.training_closed {
            return Err(Rejection::Unexpected(format!("round {} stopped taking updates at its deadline", u.round)));
        }
        if self.round.failed.contains(id) {
            return Err(Rejection::Unexpected(format!("task '{id}' reported its training in round {} as failed", u.round)));
        }
        u.check_samples()?;
        let round = u.round;
        // Oort: the aggr_num-th update closes the round; the over-committed rest are stragglers.
        let dropped: Vec<String> = match self.oort_closes_at() {
            Some(n) if self.round.updates.len() + 1 >= n => {
                self.round_trainers().map(|t| t.task_id.clone()).filter(|t| t != id && !self.round.updates.contains_key(t)).collect()
            }
            _ => Vec::new(),
        };
        let mut events = vec![u.event(round, 0)];
        if !dropped.is_empty() {
            events.push(JobEvent::TrainingClosed { round, dropped });
        }
        Ok(events)
    }

    /// An asynchronous (FedBuff) update: it joins its aggregator's buffer in
    /// the open round, or the next round's when this one is full, with its staleness.
    fn buffered(&self, u: Trained) -> Result<Vec<JobEvent>, Rejection> {
        let id = &u.task.task_id;
        let Some(d) = self.round.buffer.in_flight.get(id) else {
            return Err(Rejection::Unexpected(format!(
                "task '{id}' has no training in flight (it reported already or was not dispatched)"
            )));
        };
        if d.round != u.round {
            return Err(Rejection::WrongRound { task: id.clone(), got: u.round, open: d.round });
        }
        u.check_samples()?;
        let full = self.parents.get(id).is_none_or(|p| self.buffer_full(p));
        let buffer = if full { self.round.number + 1 } else { self.round.number };
        Ok(vec![u.event(buffer, buffer.saturating_sub(d.round))])
    }

    /// The coordinator's pairing: every trainer of the round with one of its candidates.
    fn coordinated(
        &self,
        task_id: &str,
        round: u32,
        pairing: std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<JobEvent>, Rejection> {
        self.check_round(task_id, round)?;
        if self.coordinator() != Some(task_id) {
            return Err(Rejection::Unexpected(format!("task '{task_id}' does not coordinate")));
        }
        if !self.awaits_coordination() {
            return Err(Rejection::Duplicate { task: task_id.to_string(), round });
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
            return Err(Rejection::Unexpected(format!("the pairing names '{t}', which is not a trainer of round {round}")));
        }
        Ok(vec![JobEvent::RoundCoordinated { round, pairing }])
    }

    /// An aggregator's result: a middle one's group model, or the top one's
    /// new global model; updates it could not use are recorded and left out.
    fn aggregated(&self, task: &TaskSpec, worker_id: String, round: u32, a: Aggregated) -> Result<Vec<JobEvent>, Rejection> {
        let id = &task.task_id;
        self.check_round(id, round)?;
        if task.is_data_consumer {
            return Err(Rejection::Unexpected(format!("task '{id}' does not aggregate")));
        }
        if self.round.partials.contains_key(id) {
            return Err(Rejection::Duplicate { task: id.clone(), round });
        }
        if !self.ready(id) {
            return Err(Rejection::Unexpected(if self.is_async() {
                format!("aggregate for round {round} before its buffer filled ({} of {} updates)", self.buffered_for(id), self.quorum())
            } else {
                let missing = self.children(id).filter(|c| self.expects(c)).count() - self.inputs_of(id).len();
                format!("aggregate for round {round} before {missing} input(s) arrived")
            }));
        }
        let inputs = self.inputs_of(id);
        for x in &a.excluded {
            if !inputs.iter().any(|i| i.update.task_id == x.task_id && i.update.digest == x.digest) {
                return Err(Rejection::Unexpected(format!(
                    "the aggregate excludes update {} of task '{}', which is not an input of '{id}' in round {round}",
                    x.digest, x.task_id
                )));
            }
        }
        let used: Vec<&Input> = inputs.iter().filter(|i| !a.excluded.iter().any(|x| x.task_id == i.update.task_id)).collect();
        let trainers: Vec<String> = used.iter().flat_map(|i| i.trainers.iter().map(|d| d.to_string())).collect();
        let mut events: Vec<JobEvent> = a
            .excluded
            .iter()
            .map(|x| JobEvent::UpdateExcluded { round, task_id: x.task_id.clone(), digest: x.digest.clone(), reason: x.reason.clone() })
            .collect();
        let top = !self.parents.contains_key(id);
        let updates = self.round.updates.len();
        events.push(if top && trainers.len() < self.quorum().min(updates).max(1) {
            JobEvent::JobFailed {
                reason: format!(
                    "round {round}: {} of {updates} updates were usable, fewer than the quorum of {} (minClients)",
                    trainers.len(),
                    self.quorum()
                ),
            }
        } else if top {
            JobEvent::RoundAggregated { round, digest: a.digest, inputs: trainers, metrics: a.metrics, optimizer_state: a.optimizer_state }
        } else if used.is_empty() {
            JobEvent::JobFailed { reason: format!("round {round}: middle aggregator '{id}' had no usable update") }
        } else {
            JobEvent::GroupAggregated {
                round,
                task_id: id.clone(),
                worker_id,
                digest: a.digest,
                samples: used.iter().map(|i| i.update.samples).sum(),
                inputs: trainers,
                metrics: a.metrics,
            }
        });
        Ok(events)
    }

    /// Whether a failed report answers the open round's training command of
    /// a trainer that has not reported yet (synchronous rounds: an
    /// asynchronous job's training outlives its round, so its failure fails the job).
    fn fails_training(&self, task: &TaskSpec, command_id: &str, round: u32) -> bool {
        self.status == Status::Running
            && !self.is_async()
            && self.round_open()
            && round == self.round.number
            && self.in_round(task)
            && !self.round.updates.contains_key(&task.task_id)
            && command_id == self.train_id(round, &task.task_id)
    }

    /// Asynchronous (FedBuff) jobs: whether a failed report ends the task's
    /// training in flight. The task then goes idle, and the next round's
    /// selection may send it the newer model; the job goes on (a round that
    /// cannot fill its buffer closes at its deadline, with what it holds).
    fn fails_async_training(&self, task: &TaskSpec, command_id: &str, round: u32) -> bool {
        self.status == Status::Running
            && self.is_async()
            && self.round.buffer.in_flight.get(&task.task_id).is_some_and(|d| d.round == round)
            && command_id == self.train_id(round, &task.task_id)
    }

    /// The training rows of a task's dataset when `samples` claims more.
    fn rows_exceeded(&self, task: &str, samples: u64) -> Option<u64> {
        self.dataset_rows.get(task).copied().filter(|rows| samples > *rows)
    }

    /// The id the controller gives a round's training command.
    fn train_id(&self, round: u32, task: &str) -> String {
        format!("{}/r{round}/train/{task}", self.job_id)
    }

    /// A trainer's training failed: it sits out the round; the job fails when
    /// the trainers left cannot reach the quorum.
    fn training_failed(&self, task_id: String, worker_id: String, round: u32, error: String) -> Vec<JobEvent> {
        let left = self.round_trainers().filter(|t| t.task_id != task_id).count();
        let quorum = self.quorum();
        let reason = format!("worker '{worker_id}' failed task '{task_id}' in round {round}: {error}");
        let mut events = vec![JobEvent::TrainingFailed { round, task_id, worker_id, error }];
        if left < quorum {
            events.push(JobEvent::JobFailed {
                reason: format!(
                    "{reason}; {left} trainer(s) left in the round, fewer than the quorum of {quorum} (set minClients to go on with fewer)"
                ),
            });
        }
        events
    }

    fn check_round(&self, task: &str, round: u32) -> Result<(), Rejection> {
        if self.round_open() && round == self.round.number {
            Ok(())
        } else {
            let open = if self.round_open() { self.round.number } else { 0 };
            Err(Rejection::WrongRound { task: task.to_string(), got: round, open })
        }
    }
}

/// A trainer's update, as reported.
struct Trained<'a> {
    task: &'a TaskSpec,
    worker_id: String,
    round: u32,
    digest: String,
    samples: u64,
    metrics: Metrics,
    state: Option<String>,
}

impl Trained<'_> {
    fn check_samples(&self) -> Result<(), Rejection> {
        if self.samples == 0 {
            return Err(Rejection::Unexpected(format!("task '{}' reported an update trained on 0 samples", self.task.task_id)));
        }
        Ok(())
    }

    /// The accepted update, recorded for round `round`.
    fn event(self, round: u32, staleness: u32) -> JobEvent {
        JobEvent::UpdateReported {
            round,
            task_id: self.task.task_id.clone(),
            worker_id: self.worker_id,
            digest: self.digest,
            samples: self.samples,
            metrics: self.metrics,
            staleness,
            client_state: self.state,
        }
    }
}

/// An aggregator's result, as reported.
struct Aggregated {
    digest: String,
    metrics: Metrics,
    optimizer_state: Option<String>,
    excluded: Vec<Excluded>,
}

#[cfg(test)]
mod tests {
    //! Given a history, when a worker reports, then these events (or this rejection).

    use flame_events::job::{JobEvent, Metrics};
    use flame_events::protocol::{Report, ReportBody};

    use crate::job::transitions::tests::aggregated;
    use crate::job::{DEPLOY, JobCommand, Rejection};
    use crate::testing::{History, report, trained, update};

    #[test]
    fn the_initial_model_comes_from_the_aggregator_only() {
        let job = History::created(2).started().job();
        assert!(matches!(job.handle(JobCommand::StartRound { now_ms: 0, spent: Default::default() }), Err(Rejection::Unexpected(_))));
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
        // The assigned worker's own report, but published on another worker's subject.
        let relayed = JobCommand::Report(Report {
            via: Some("w-evil".into()),
            ..match report("t0", 1, trained(1, "t0")) {
                JobCommand::Report(r) => r,
                _ => unreachable!(),
            }
        });
        assert!(matches!(job.handle(relayed), Err(Rejection::Unexpected(m)) if m.contains("arrived on the subject of 'w-evil'")));
        let own = JobCommand::Report(Report {
            via: Some("w-t0".into()),
            ..match report("t0", 1, trained(1, "t0")) {
                JobCommand::Report(r) => r,
                _ => unreachable!(),
            }
        });
        assert!(job.handle(own).is_ok(), "on its own subject it is taken");
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
    fn the_aggregate_closes_the_round_in_task_order_and_only_once() {
        let h = History::created(2).started().initialized().round_started(1).then(update(1, "t0")).then(update(1, "t1"));
        let events = h.job().handle(report("agg", 1, aggregated(1))).expect("aggregate");
        assert!(
            matches!(&events[..], [JobEvent::RoundAggregated { round: 1, inputs, .. }] if inputs == &vec!["u1t0".to_string(), "u1t1".to_string()])
        );
        let one = History::created(2).started().initialized().round(1).job();
        assert!(matches!(one.handle(report("t0", 1, trained(1, "t0"))), Err(Rejection::WrongRound { open: 0, .. })));
        assert!(matches!(one.handle(report("agg", 1, aggregated(1))), Err(Rejection::WrongRound { .. })), "a closed round stays closed");
    }

    #[test]
    fn a_failed_worker_fails_the_job_with_its_reason() {
        let job = History::created(2).started().initialized().round_started(1).job();
        let events = job.handle(report("t1", 1, ReportBody::Failed { error: "disk full".into() })).expect("fail");
        assert!(matches!(&events[..], [JobEvent::JobFailed { reason }] if reason.contains("disk full") && reason.contains("t1")));
    }

    /// The failed answer to a round's training command (the id the controller gives it).
    fn failed_training(task: &str, round: u32, error: &str) -> JobCommand {
        let JobCommand::Report(mut r) = report(task, round, ReportBody::Failed { error: error.into() }) else { unreachable!() };
        r.command_id = format!("{}/r{round}/train/{task}", crate::testing::JOB);
        JobCommand::Report(r)
    }

    #[test]
    fn an_update_may_not_claim_more_samples_than_its_dataset_holds() {
        let deployed = |h: History, rows: Option<u64>| {
            h.then(JobEvent::TaskDeployed { task_id: "t1".into(), worker_id: "w-t1".into(), samples: rows })
        };
        let claim = |n: u64| {
            let JobCommand::Report(mut r) =
                report("t1", 1, ReportBody::Trained { digest: "u".into(), samples: n, metrics: Metrics::new(), state: None })
            else {
                unreachable!()
            };
            r.command_id = format!("{}/r1/train/t1", crate::testing::JOB);
            JobCommand::Report(r)
        };
        let bounded = deployed(History::created_with(2, |s| s.quorum = Some(1)).started().initialized(), Some(100)).round_started(1);
        assert_eq!(bounded.job().dataset_rows.get("t1"), Some(&100));
        assert!(matches!(
            &bounded.job().handle(claim(100)).expect("as many as it has")[..],
            [JobEvent::UpdateReported { samples: 100, .. }]
        ));
        let events = bounded.job().handle(claim(100_000)).expect("handled");
        assert!(
            matches!(&events[..], [JobEvent::TrainingFailed { task_id, error, .. }] if task_id == "t1" && error.contains("claims 100000 samples") && error.contains("holds 100")),
            "{events:?}"
        );
        // A worker that did not say (an older one) is not bounded.
        let unbounded = deployed(History::created_with(2, |s| s.quorum = Some(1)).started().initialized(), None).round_started(1);
        assert!(unbounded.job().handle(claim(100_000)).is_ok_and(|e| matches!(&e[..], [JobEvent::UpdateReported { .. }])));
    }

    #[test]
    fn a_trainer_whose_training_fails_sits_out_the_round_within_quorum() {
        // Every trainer is the quorum by default: one failure fails the job, and says why.
        let strict = History::created(2).started().initialized().round_started(1).job();
        let events = strict.handle(failed_training("t1", 1, "ValueError: bad batch")).expect("handled");
        assert!(
            matches!(&events[0], JobEvent::TrainingFailed { round: 1, task_id, error, .. } if task_id == "t1" && error.contains("bad batch"))
        );
        assert!(
            matches!(&events[1..], [JobEvent::JobFailed { reason }] if reason.contains("bad batch") && reason.contains("1 trainer(s) left") && reason.contains("minClients")),
            "{events:?}"
        );

        // minClients 1 of 2: the round goes on without it, and aggregates once the other is in.
        let h = History::created_with(2, |s| s.quorum = Some(1)).started().initialized().round_started(1);
        let events = h.job().handle(failed_training("t1", 1, "ValueError: bad batch")).expect("handled");
        assert!(matches!(&events[..], [JobEvent::TrainingFailed { task_id, .. }] if task_id == "t1"), "{events:?}");
        let h = h.then(events[0].clone());
        assert!(!h.job().ready("agg"), "t0 is still expected");
        assert!(
            matches!(h.job().handle(failed_training("t1", 1, "again")), Err(Rejection::Duplicate { .. })),
            "a redelivered failure changes nothing"
        );
        let h = h.then(update(1, "t0"));
        assert!(h.job().ready("agg") && h.job().training_done(), "the failed trainer is not waited for");
        // Its late update for the same round is refused.
        assert!(h.job().handle(report("t1", 1, trained(1, "t1"))).is_err());
        let events = h.job().handle(report("agg", 1, aggregated(1))).expect("aggregate");
        assert!(matches!(&events[..], [JobEvent::RoundAggregated { inputs, .. }] if inputs.len() == 1), "{events:?}");
        // The next round asks it again.
        let next = h.then(events[0].clone()).round_started(2).job();
        assert!(next.round_trainers().any(|t| t.task_id == "t1"));

        // A second failure leaves fewer than the quorum.
        let h = History::created_with(2, |s| s.quorum = Some(1)).started().initialized().round_started(1);
        let first = h.job().handle(failed_training("t0", 1, "boom")).expect("handled");
        let events = h.then(first[0].clone()).job().handle(failed_training("t1", 1, "boom")).expect("handled");
        assert!(matches!(&events[..], [JobEvent::TrainingFailed { .. }, JobEvent::JobFailed { .. }]), "{events:?}");
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
        assert_eq!((after.status, &after.round, after.rounds_completed), (job.status, &job.round, job.rounds_completed));
        assert!(matches!(&events[0], JobEvent::ReportRejected { reason, .. } if reason.contains("open round is 0")));
    }
}
