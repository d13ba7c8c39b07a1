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
        let body = CommandBody::InitModel { model: spec.model.clone(), dataset: eval_dataset.unwrap_or_default(), seed: spec.seed };
        return vec![Action::Send { worker_id: agg_worker.clone(), command: command(job, &aggregator.task_id, 0, "init", body) }];
    };
    if !job.round_open() {
        return vec![Action::Handle(if job.rounds_completed >= spec.rounds { JobCommand::Complete } else { JobCommand::StartRound })];
    }
    let round = job.round;
    let mut actions = Vec::new();
    for t in job.trainers().filter(|t| !job.updates.contains_key(&t.task_id)) {
        let Some(worker) = job.assignments.get(&t.task_id) else {
            continue;
        };
        let body = CommandBody::Train {
            model: spec.model.clone(),
            global_model: global_model.clone(),
            dataset: t.dataset.clone().unwrap_or_default(),
            hyperparameters: spec.hyperparameters.clone(),
            seed: spec.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round)),
        };
        actions.push(Action::Send {
            worker_id: worker.clone(),
            command: command(job, &t.task_id, round, &format!("r{round}/train/{}", t.task_id), body),
        });
    }
    if actions.is_empty() {
        let updates = job.trainers().filter_map(|t| job.updates.get(&t.task_id)).cloned().collect();
        let body = CommandBody::Aggregate {
            model: spec.model.clone(),
            optimizer: spec.optimizer.clone(),
            optimizer_kwargs: spec.optimizer_kwargs.clone(),
            optimizer_state: job.optimizer_state.clone(),
            global_model,
            updates,
            eval_dataset,
        };
        actions.push(Action::Send {
            worker_id: agg_worker.clone(),
            command: command(job, &aggregator.task_id, round, &format!("r{round}/aggregate"), body),
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use flame_events::job::JobEvent;
    use flame_events::protocol::CommandBody;

    use super::*;
    use crate::testing::{History, update};

    fn sends(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { worker_id, command } => Some((worker_id.clone(), command.id.clone())),
                Action::Handle(_) => None,
            })
            .collect()
    }

    #[test]
    fn nothing_happens_before_the_job_runs_or_after_it_ends() {
        assert!(decide(&History::created(2).job()).is_empty());
        let done = History::created(1).started().initialized().round(1).then(JobEvent::JobCompleted {
            rounds_completed: 1,
            final_model: "m1".into(),
            metrics: Default::default(),
        });
        assert!(decide(&done.job()).is_empty());
    }

    #[test]
    fn a_running_job_first_asks_the_aggregator_for_the_initial_model() {
        let actions = decide(&History::created(2).started().job());
        assert_eq!(sends(&actions), vec![("w-agg".to_string(), "job-1/init".to_string())]);
        assert!(matches!(&actions[0], Action::Send { command, .. } if matches!(command.body, CommandBody::InitModel { .. })));
    }

    #[test]
    fn rounds_start_train_aggregate_and_finish() {
        let ready = History::created(2).started().initialized();
        assert_eq!(decide(&ready.job()), vec![Action::Handle(JobCommand::StartRound)]);

        let open = ready.then(JobEvent::RoundStarted { round: 1, global_model: "m0".into() });
        assert_eq!(
            sends(&decide(&open.job())),
            vec![("w-t0".into(), "job-1/r1/train/t0".into()), ("w-t1".into(), "job-1/r1/train/t1".into())]
        );

        let half = open.then(update(1, "t0"));
        assert_eq!(sends(&decide(&half.job())), vec![("w-t1".into(), "job-1/r1/train/t1".into())]);

        let full = half.then(update(1, "t1"));
        let actions = decide(&full.job());
        assert_eq!(sends(&actions), vec![("w-agg".into(), "job-1/r1/aggregate".into())]);
        let Action::Send { command, .. } = &actions[0] else { panic!("send") };
        let CommandBody::Aggregate { updates, global_model, .. } = &command.body else { panic!("aggregate") };
        assert_eq!(global_model, "m0");
        assert_eq!(updates.iter().map(|u| u.digest.as_str()).collect::<Vec<_>>(), vec!["u1t0", "u1t1"]);

        let last = History::created(2).started().initialized().round(1).round(2);
        assert_eq!(decide(&last.job()), vec![Action::Handle(JobCommand::Complete)]);
    }

    #[test]
    fn decisions_are_deterministic() {
        let h = History::created(2).started().initialized().then(JobEvent::RoundStarted { round: 1, global_model: "m0".into() });
        assert_eq!(decide(&h.job()), decide(&h.job()));
    }
}
