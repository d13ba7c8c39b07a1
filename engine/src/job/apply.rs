//! The fold: one event into the job's state. It never refuses (the events
//! are facts); what `handle` decided is what `apply` records.

use std::sync::Arc;

use flame_events::job::{JobEvent, Status};
use flame_events::protocol::UpdateRef;

use super::lifecycle::{DEPLOY, round_timer};
use super::round::{Dispatch, Partial, Round};
use super::{Job, parents};

impl Job {
    /// Folds one event into the state.
    pub fn apply(&mut self, event: &JobEvent) {
        self.version += 1;
        match event {
            JobEvent::JobCreated { job_id, name, source, spec, tasks } => {
                self.job_id = job_id.clone();
                self.define(name, source, spec, tasks);
                self.status = Status::Ready;
            }
            JobEvent::JobUpdated { name, source, spec, tasks } => self.define(name, source, spec, tasks),
            JobEvent::JobForked(origin) => {
                // Rounds go on from the parent's model, numbered as the parent numbered them.
                self.global_model = Some(origin.model.clone());
                self.rounds_completed = origin.from_round.saturating_sub(1);
                self.round.number = self.rounds_completed;
                self.optimizer_state = origin.optimizer_state.clone();
                self.records.client_states = origin.client_states.clone();
                self.forked_from = Some(origin.clone());
            }
            JobEvent::JobStarting {} => self.status = Status::Starting,
            JobEvent::TaskAssigned { task_id, worker_id } => {
                self.assignments.insert(task_id.clone(), worker_id.clone());
            }
            JobEvent::JobDeploying {} => self.status = Status::Deploying,
            JobEvent::TaskDeployed { task_id, samples, .. } => {
                self.deployed.insert(task_id.clone());
                if let Some(n) = samples {
                    self.dataset_rows.insert(task_id.clone(), *n);
                }
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
                    self.round.buffer.in_flight.remove(t);
                }
                self.orphaned.extend(orphaned.iter().cloned());
            }
            JobEvent::ModelInitialized { digest, .. } => {
                self.global_model = Some(digest.clone());
                self.timers.remove(DEPLOY);
            }
            JobEvent::RoundStarted { round, selected, global_model } => self.start_round_state(*round, selected, global_model),
            JobEvent::RoundCoordinated { round, pairing } => {
                for (t, a) in pairing {
                    self.parents.insert(t.clone(), a.clone());
                }
                self.round.paired |= *round == self.round.number;
            }
            JobEvent::UpdateReported { round, task_id, digest, samples, staleness, client_state, metrics, .. } => {
                *self.records.updates_made.entry(task_id.clone()).or_default() += 1;
                // Only the coordinator balances by them: no map to grow in other jobs' folds.
                if self.coordinator().is_some() {
                    self.records.samples.insert(task_id.clone(), *samples);
                }
                if self.oort_closes_at().is_some() {
                    let stats = crate::oort::Stats {
                        samples: *samples,
                        loss: metrics.get("loss").copied().unwrap_or(0.0),
                        seconds: metrics.get("train_seconds").copied(),
                        last_round: *round,
                    };
                    self.records.oort.insert(task_id.clone(), stats);
                }
                let mut update = UpdateRef::new(task_id.clone(), digest.clone(), *samples);
                if let Some(s) = client_state {
                    self.records.client_states.insert(task_id.clone(), s.clone());
                    update.client_state = Some(s.clone());
                }
                let dispatch = self.round.buffer.in_flight.remove(task_id);
                if *staleness > 0 {
                    update.base_model = dispatch.map(|d| d.model);
                    update.staleness = *staleness;
                }
                if self.is_async() && !(*round == self.round.number && self.round_open()) {
                    self.round.buffer.queued.insert(task_id.clone(), update);
                } else {
                    self.round.updates.insert(task_id.clone(), update);
                }
            }
            JobEvent::GroupAggregated { task_id, digest, samples, inputs, .. } => {
                let update = UpdateRef::new(task_id.clone(), digest.clone(), *samples);
                self.round.partials.insert(task_id.clone(), Partial { update, inputs: inputs.clone() });
            }
            JobEvent::TrainingClosed { .. } => self.round.training_closed = true,
            JobEvent::ReportRejected { .. } => self.rejected += 1,
            JobEvent::UpdateExcluded { .. } | JobEvent::PrivacyRefused { .. } => {}
            JobEvent::TrainingFailed { task_id, .. } => {
                if self.is_async() {
                    // Idle again: the next round's selection may send it the newer model.
                    self.round.buffer.in_flight.remove(task_id);
                } else {
                    self.round.failed.insert(task_id.clone());
                }
            }
            JobEvent::RoundAggregated { round, digest, metrics, optimizer_state, .. } => {
                if self.spec.as_ref().is_some_and(|s| s.evaluates(*round)) {
                    // The trainers whose updates made the model evaluate it.
                    let tasks = self.round.updates.keys().cloned().collect();
                    self.evaluation = super::Evaluation { round: *round, model: digest.clone(), tasks, reported: Default::default() };
                }
                self.optimizer_state = optimizer_state.clone();
                self.rounds_completed = *round;
                self.global_model = Some(digest.clone());
                self.metrics = metrics.clone();
                self.round.updates.clear();
                self.round.partials.clear();
                self.round.training_closed = false;
                self.timers.remove(&round_timer(*round));
            }
            JobEvent::ModelEvaluated { round, task_id, .. } => {
                if *round == self.evaluation.round {
                    self.evaluation.reported.insert(task_id.clone());
                }
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

    fn define(&mut self, name: &str, source: &str, spec: &flame_events::job::RunSpec, tasks: &[flame_events::job::TaskSpec]) {
        self.parents = parents(spec, tasks);
        self.name = name.to_string();
        self.source = source.to_string();
        self.spec = Some(Arc::new(spec.clone()));
        self.tasks = Arc::new(tasks.to_vec());
        self.task_index = Arc::new(tasks.iter().enumerate().map(|(i, t)| (t.task_id.clone(), i)).collect());
    }

    /// A new round: its selection; asynchronous jobs carry the queued updates
    /// into it and put its selected trainers in flight.
    fn start_round_state(&mut self, number: u32, selected: &[String], global_model: &str) {
        let mut buffer = std::mem::take(&mut self.round.buffer);
        let updates = if self.is_async() { std::mem::take(&mut buffer.queued) } else { Default::default() };
        if self.is_async() {
            for t in selected {
                buffer.in_flight.insert(t.clone(), Dispatch { round: number, model: global_model.to_string() });
            }
        }
        self.round = Round { number, selected: selected.iter().cloned().collect(), updates, buffer, ..Round::default() };
    }

    fn end(&mut self, status: Status, reason: Option<&str>) {
        self.status = status;
        if let Some(r) = reason {
            self.failure = Some(r.to_string());
        }
        self.timers.clear();
    }
}
