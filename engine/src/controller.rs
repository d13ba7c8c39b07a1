//! The process manager's decisions, as data: given a job's state, which
//! commands go to which workers and which job commands come next. Pure, so the
//! runner (effects on) and replay (effects off) share it.

use flame_events::protocol::{self, Command, CommandBody};

use crate::job::{Job, JobCommand, Status};

/// Something the runner should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a command to a worker (idempotent by `command.id`).
    Send {
        /// Worker id.
        worker_id: String,
        /// The command.
        command: Command,
    },
    /// Feed a command to the job aggregate.
    Handle(JobCommand),
}

fn command(job: &Job, task_id: &str, round: u32, key: &str, body: CommandBody) -> Command {
    Command {
        v: protocol::VERSION,
        id: format!("{}/{key}", job.job_id),
        job_id: job.job_id.clone(),
        task_id: task_id.to_string(),
        round,
        body,
    }
}

/// What should happen next for a running job. Empty while it waits for reports.
pub fn decide(job: &Job) -> Vec<Action> {
    if job.status != Status::Running {
        return Vec::new();
    }
    let (Some(spec), Some(aggregator)) = (&job.spec, job.aggregator()) else {
        return Vec::new();
    };
    let Some(agg_worker) = job.assignments.get(&aggregator.task_id) else {
        return Vec::new();
    };
    let eval_dataset = job.trainers().find_map(|t| t.dataset.clone());
    let Some(global_model) = job.global_model.clone() else {
        let body = CommandBody::InitModel {
            model: spec.model.clone(),
            dataset: eval_dataset.unwrap_or_default(),
            seed: spec.seed,
        };
        return vec![Action::Send {
            worker_id: agg_worker.clone(),
            command: command(job, &aggregator.task_id, 0, "init", body),
        }];
    };
    if !job.round_open() {
        return vec![Action::Handle(if job.rounds_completed >= spec.rounds {
            JobCommand::Complete
        } else {
            JobCommand::StartRound
        })];
    }
    let round = job.round;
    let mut actions = Vec::new();
    for t in job
        .trainers()
        .filter(|t| !job.updates.contains_key(&t.task_id))
    {
        let Some(worker) = job.assignments.get(&t.task_id) else {
            continue;
        };
        let body = CommandBody::Train {
            model: spec.model.clone(),
            global_model: global_model.clone(),
            dataset: t.dataset.clone().unwrap_or_default(),
            hyperparameters: spec.hyperparameters.clone(),
            seed: spec
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(u64::from(round)),
        };
        actions.push(Action::Send {
            worker_id: worker.clone(),
            command: command(
                job,
                &t.task_id,
                round,
                &format!("r{round}/train/{}", t.task_id),
                body,
            ),
        });
    }
    if actions.is_empty() {
        let updates = job
            .trainers()
            .filter_map(|t| job.updates.get(&t.task_id))
            .cloned()
            .collect();
        let body = CommandBody::Aggregate {
            model: spec.model.clone(),
            optimizer: spec.optimizer.clone(),
            global_model,
            updates,
            eval_dataset,
        };
        actions.push(Action::Send {
            worker_id: agg_worker.clone(),
            command: command(
                job,
                &aggregator.task_id,
                round,
                &format!("r{round}/aggregate"),
                body,
            ),
        });
    }
    actions
}
