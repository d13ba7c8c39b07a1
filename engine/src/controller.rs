//! The process manager's decisions, as data: given a job's state, the time
//! and the live workers, which commands go to which workers and which job
//! commands come next. Pure, so the runner (effects on) and replay (effects
//! off) share it.

use flame_projections::trace;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use flame_events::algorithm::ServerOptimizer;
use flame_events::job::TaskSpec;
use flame_events::protocol::{self, Command, CommandBody, WorkerInfo};

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

/// What the runner sends in one go: one worker's command, or the commands of
/// several workers of one group (the registry says which group speaks for them).
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    /// A command for one worker, on its own subject.
    One(String, Box<Command>),
    /// Commands for workers of one group, on the group's subject.
    Group(String, Vec<(String, Command)>),
}

impl Outgoing {
    /// Each command's (worker id, command id).
    pub fn addressed(&self) -> Vec<(String, String)> {
        match self {
            Self::One(w, c) => vec![(w.clone(), c.id.clone())],
            Self::Group(_, cs) => cs.iter().map(|(w, c)| (w.clone(), c.id.clone())).collect(),
        }
    }
}

/// A turn's sends as the runner sends them: the commands of workers that
/// name a group go together, one send per group in the order each group
/// first appears; the others one by one, in their order.
pub fn outgoing(sends: Vec<(String, Command)>, groups: &HashMap<String, String>) -> Vec<Outgoing> {
    let mut out: Vec<Outgoing> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (worker_id, command) in sends {
        match groups.get(&worker_id) {
            Some(g) => match at.get(g.as_str()) {
                Some(&i) => {
                    if let Outgoing::Group(_, cs) = &mut out[i] {
                        cs.push((worker_id, command));
                    }
                }
                None => {
                    at.insert(g, out.len());
                    out.push(Outgoing::Group(g.clone(), vec![(worker_id, command)]));
                }
            },
            None => out.push(Outgoing::One(worker_id, Box::new(command))),
        }
    }
    out
}

/// Reports published by a group for its members: a report that arrived on
/// group G's subject in worker M's name stands as M's own if the registry
/// (M's own registration) names G as M's group. Any other report keeps the
/// subject it came on, and the job refuses it if that is not its worker's.
pub fn vouch(reports: &mut [protocol::Report], groups: &HashMap<String, String>) {
    for r in reports {
        if r.via.as_ref().is_some_and(|via| *via != r.worker_id && groups.get(&r.worker_id) == Some(via)) {
            r.via = Some(r.worker_id.clone());
        }
    }
}

/// Whether a command (worker id, command id) already went out: the runner's
/// record, so that a turn builds only the commands not yet sent.
pub type Sent<'a> = &'a dyn Fn(&str, &str) -> bool;

fn command_id(job: &Job, key: &str) -> String {
    format!("{}/{key}", job.job_id)
}

fn command(job: &Job, task_id: &str, round: u32, key: &str, body: CommandBody) -> Command {
    command_with_id(job, task_id, round, command_id(job, key), body)
}

fn command_with_id(job: &Job, task_id: &str, round: u32, id: String, body: CommandBody) -> Command {
    let path = span_path(job, task_id, round, &body);
    Command {
        v: protocol::VERSION,
        id,
        job_id: job.job_id.clone(),
        task_id: task_id.to_string(),
        round,
        traceparent: Some(trace::traceparent(&job.job_id, &path)),
        body,
    }
}

/// Where a command's work sits in the job's trace (`flamectl trace`): the
/// span the worker's own span joins as a child.
fn span_path(job: &Job, task_id: &str, round: u32, body: &CommandBody) -> String {
    match body {
        CommandBody::Deploy { .. } => format!("setup/deploy/{task_id}"),
        CommandBody::InitModel { .. } => "setup/initial model".into(),
        CommandBody::Train { .. } => trace::round_path(round, "train", Some(task_id)),
        // A middle aggregator's group aggregate, or the round's aggregate.
        CommandBody::Aggregate { .. } if job.spec.as_ref().is_some_and(|s| s.uplinks.contains_key(task_id)) => {
            trace::round_path(round, "group aggregates", Some(task_id))
        }
        CommandBody::Aggregate { .. } => trace::round_path(round, "aggregate", None),
        CommandBody::Coordinate { .. } | CommandBody::Evaluate { .. } | CommandBody::Unreadable { .. } => format!("round {round}"),
    }
}

/// The generic role a task needs: `trainer` for data consumers, `aggregator` otherwise.
pub fn generic_role(t: &TaskSpec) -> &'static str {
    if t.is_data_consumer { "trainer" } else { "aggregator" }
}

/// Places each task on a distinct live worker that offers the task's role
/// and serves its dataset's realm, skipping `busy` workers; aggregators first
/// (they are fewer and workers may offer both roles), then in id order. A
/// task that runs beside another (a ring's reducer) goes where that one goes.
/// `None` while some task finds no worker.
pub fn assign(tasks: &[&TaskSpec], workers: &[WorkerInfo], busy: &BTreeSet<String>) -> Option<BTreeMap<String, String>> {
    let mut used: std::collections::HashSet<&str> = busy.iter().map(String::as_str).collect();
    let mut out = BTreeMap::new();
    let mut ordered: Vec<_> = tasks.iter().filter(|t| t.colocate.is_none()).copied().collect();
    ordered.sort_by_key(|t| t.is_data_consumer);
    // Where the search for each kind of task (role, realm) resumes: every worker before it is
    // taken or cannot run that kind, so thousands of tasks are placed in one pass, not one each.
    let mut resume: std::collections::HashMap<(&str, &str, Option<&str>), usize> = std::collections::HashMap::new();
    for t in ordered {
        let kind = (t.role.as_str(), generic_role(t), t.realm.as_deref());
        let from = resume.get(&kind).copied().unwrap_or(0);
        let at = workers[from..].iter().position(|w| !used.contains(w.id.as_str()) && w.can_run(kind.0, kind.1, kind.2))? + from;
        resume.insert(kind, at + 1);
        used.insert(&workers[at].id);
        out.insert(t.task_id.clone(), workers[at].id.clone());
    }
    for t in tasks.iter().filter(|t| t.colocate.is_some()) {
        let w = out.get(t.colocate.as_deref()?)?.clone();
        out.insert(t.task_id.clone(), w);
    }
    Some(out)
}

/// What should happen next. `live` is the registry's list of workers with a
/// fresh heartbeat, or `None` when it was not read (no loss is judged then).
/// Empty while the job waits for reports, workers or a timer.
pub fn decide(job: &Job, now_ms: u64, live: Option<&[WorkerInfo]>) -> Vec<Action> {
    decide_unsent(job, now_ms, live, &|_, _| false)
}

/// [`decide`], leaving out the per-task commands (deploy, train, evaluate)
/// that `sent` says already went out: with thousands of trainers, building
/// every outstanding command again after each report would cost a pass over
/// the whole round per report.
pub fn decide_unsent(job: &Job, now_ms: u64, live: Option<&[WorkerInfo]>, sent: Sent) -> Vec<Action> {
    if !job.status.is_active() {
        return Vec::new();
    }
    if let Some((timer, due)) = job.next_timer()
        && due <= now_ms
    {
        return vec![Action::Handle(JobCommand::Fire { timer: timer.to_string(), now_ms })];
    }
    match job.status {
        Status::Starting => match live.and_then(|w| assign(&job.tasks.iter().collect::<Vec<_>>(), w, &BTreeSet::new())) {
            Some(a) => vec![Action::Handle(JobCommand::Assign(a))],
            None => Vec::new(),
        },
        Status::Stopping => vec![Action::Handle(JobCommand::Terminate)],
        Status::Deploying | Status::Running => {
            if let Some(lost) = live.and_then(|w| lost_worker(job, w)) {
                return vec![Action::Handle(lost)];
            }
            if job.status == Status::Deploying { deploy(job, sent) } else { run(job, now_ms, sent) }
        }
        _ => Vec::new(),
    }
}

/// The first worker of the job that is no longer live, with replacements for its tasks.
fn lost_worker(job: &Job, live: &[WorkerInfo]) -> Option<JobCommand> {
    let alive: BTreeSet<&str> = live.iter().map(|w| w.id.as_str()).collect();
    let active = || job.tasks.iter().filter(|t| !job.orphaned.contains(&t.task_id));
    let lost = active().find_map(|t| job.assignments.get(&t.task_id).filter(|w| !alive.contains(w.as_str())))?.clone();
    let tasks: Vec<&TaskSpec> = active().filter(|t| job.assignments.get(&t.task_id) == Some(&lost)).collect();
    let busy: BTreeSet<String> = job.assignments.values().cloned().collect();
    // Replace task by task, so a task finds a worker even if its siblings do not.
    let mut replacements = BTreeMap::new();
    let mut taken = busy;
    for t in tasks.iter().filter(|t| t.colocate.is_none()) {
        if let Some(a) = assign(&[t], live, &taken) {
            taken.extend(a.values().cloned());
            replacements.extend(a);
        }
    }
    // A task that runs beside another follows it.
    for t in tasks.iter().filter(|t| t.colocate.is_some()) {
        if let Some(w) = t.colocate.as_ref().and_then(|c| replacements.get(c)).cloned() {
            replacements.insert(t.task_id.clone(), w);
        }
    }
    Some(JobCommand::LoseWorker { worker_id: lost, replacements })
}

fn deploy(job: &Job, sent: Sent) -> Vec<Action> {
    job.tasks
        .iter()
        .filter(|t| !job.deployed.contains(&t.task_id) && !job.orphaned.contains(&t.task_id))
        .filter_map(|t| {
            let worker = job.assignments.get(&t.task_id)?;
            let id = command_id(job, &format!("deploy/{}/{worker}", t.task_id));
            if sent(worker, &id) {
                return None;
            }
            let body = CommandBody::Deploy { role: t.role.clone(), dataset: t.dataset.clone() };
            Some(Action::Send { worker_id: worker.clone(), command: command_with_id(job, &t.task_id, 0, id, body) })
        })
        .collect()
}

/// The Evaluate commands the trainers still owe for the latest evaluated round's model.
fn evaluate(job: &Job, sent: Sent) -> Vec<Action> {
    let Some(spec) = &job.spec else { return Vec::new() };
    let e = &job.evaluation;
    job.evaluations_owed()
        .filter_map(|t| {
            let worker = job.assignments.get(t)?;
            let id = command_id(job, &format!("r{}/evaluate/{t}", e.round));
            if sent(worker, &id) {
                return None;
            }
            let task = job.task(t)?;
            let body = CommandBody::Evaluate {
                model: spec.model.clone(),
                global_model: e.model.clone(),
                dataset: task.dataset.clone().unwrap_or_default(),
                loss: spec.training.loss,
                client_state: job.records.client_states.get(t).cloned(),
            };
            Some(Action::Send { worker_id: worker.clone(), command: command_with_id(job, t, e.round, id, body) })
        })
        .collect()
}

fn run(job: &Job, now_ms: u64, sent: Sent) -> Vec<Action> {
    let (Some(spec), Some(aggregator)) = (&job.spec, job.aggregator()) else {
        return Vec::new();
    };
    let eval_dataset = job.trainers().find_map(|t| t.dataset.clone());
    let Some(global_model) = job.global_model.clone() else {
        let Some(agg_worker) = job.assignments.get(&aggregator.task_id) else {
            return Vec::new();
        };
        let body = CommandBody::InitModel {
            model: spec.model.clone(),
            dataset: eval_dataset.unwrap_or_default(),
            seed: spec.seed,
            loss: spec.training.loss,
        };
        return vec![Action::Send { worker_id: agg_worker.clone(), command: command(job, &aggregator.task_id, 0, "init", body) }];
    };
    // Federated evaluation of the latest evaluated round's model, beside the next round's training.
    let evaluations = evaluate(job, sent);
    if !job.round_open() {
        if job.rounds_completed >= spec.rounds {
            // The job completes once the last model is evaluated (by every trainer still with a worker).
            return if evaluations.is_empty() && job.evaluations_owed().next().is_none() {
                vec![Action::Handle(JobCommand::Complete)]
            } else {
                evaluations
            };
        }
        let mut actions = evaluations;
        actions.push(Action::Handle(JobCommand::StartRound { now_ms, spent: Default::default() }));
        return actions;
    }
    let round = job.round.number;
    let mut actions: Vec<Action> = evaluations;
    if job.is_async() {
        // FedBuff: every trainer in flight trains from the model of the round that sent it, buffer full or not.
        actions.extend(job.active_trainers().filter_map(|task| {
            let (t, d) = job.round.buffer.in_flight.get_key_value(&task.task_id)?;
            let worker = job.assignments.get(t)?;
            let id = command_id(job, &format!("r{}/train/{t}", d.round));
            if sent(worker, &id) {
                return None;
            }
            let body = CommandBody::Train {
                model: spec.model.clone(),
                global_model: d.model.clone(),
                dataset: task.dataset.clone().unwrap_or_default(),
                training: spec.training,
                objective: spec.optimizer.objective(),
                seed: spec.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(d.round)),
                client_state: job.records.client_states.get(t).cloned(),
                server_state: None,
            };
            Some(Action::Send { worker_id: worker.clone(), command: command_with_id(job, t, d.round, id, body) })
        }));
    } else if !job.training_done() {
        actions.extend(job.round_trainers().filter(|t| !job.round.updates.contains_key(&t.task_id)).filter_map(|t| {
            let worker = job.assignments.get(&t.task_id)?;
            let id = command_id(job, &format!("r{round}/train/{}", t.task_id));
            if sent(worker, &id) {
                return None;
            }
            let body = CommandBody::Train {
                model: spec.model.clone(),
                global_model: global_model.clone(),
                dataset: t.dataset.clone().unwrap_or_default(),
                training: spec.training,
                objective: spec.optimizer.objective(),
                seed: spec.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round)),
                client_state: job.records.client_states.get(&t.task_id).cloned(),
                // SCAFFOLD's trainers correct their gradients with the server's control variate.
                server_state: if spec.optimizer.trainers_need_server_state() { job.optimizer_state.clone() } else { None },
            };
            Some(Action::Send { worker_id: worker.clone(), command: command_with_id(job, &t.task_id, round, id, body) })
        }));
    }
    // Coordinated jobs: the coordinator pairs the round's trainers with aggregators while they train.
    if job.awaits_coordination()
        && let Some(c) = job.coordinator()
        && let Some(worker) = job.assignments.get(c)
    {
        let candidates = job
            .round_trainers()
            .filter_map(|t| spec.candidates.get(&t.task_id).map(|o| (t.task_id.clone(), o.clone())))
            .collect::<BTreeMap<_, _>>();
        let samples = candidates.keys().filter_map(|t| job.records.samples.get(t).map(|n| (t.clone(), *n))).collect();
        let body = CommandBody::Coordinate { candidates, samples };
        actions.push(Action::Send { worker_id: worker.clone(), command: command(job, c, round, &format!("r{round}/coordinate"), body) });
    }
    // Each aggregator whose inputs are in: a middle one averages its group
    // (FedAvg, weighted by samples) while other groups may still train; the
    // top one applies the job's optimizer and evaluates the new global model.
    for a in job.aggregators().filter(|a| job.ready(&a.task_id)) {
        let Some(worker) = job.assignments.get(&a.task_id) else { continue };
        if let Some(command) = aggregate_command(job, &a.task_id) {
            actions.push(Action::Send { worker_id: worker.clone(), command });
        }
    }
    actions
}

/// The open round's aggregate command for aggregator `task_id`, from the
/// job's state as it is: what the engine sends once the task's inputs are in,
/// and what `flamectl verify --models` runs again to re-derive a recorded
/// aggregate (from the state the engine checked its report against). `None`
/// when the job has no spec, global model or aggregator of that id.
pub fn aggregate_command(job: &Job, task_id: &str) -> Option<Command> {
    let (spec, aggregator, global_model) = (job.spec.as_ref()?, job.aggregator()?, job.global_model.clone()?);
    job.aggregators().find(|a| a.task_id == task_id)?;
    let round = job.round.number;
    let top = task_id == aggregator.task_id;
    let body = CommandBody::Aggregate {
        model: spec.model.clone(),
        // A middle aggregator averages its group (FedAvg), or in an asynchronous
        // job takes FedBuff's staleness-discounted step over its buffer.
        optimizer: match (top, job.is_async()) {
            (true, _) => spec.optimizer,
            (false, true) => ServerOptimizer::FedBuff { eta: 1.0 },
            (false, false) => ServerOptimizer::FedAvg,
        },
        trainers: u32::try_from(job.trainers().count()).unwrap_or(u32::MAX),
        optimizer_state: if top { job.optimizer_state.clone() } else { None },
        global_model,
        updates: job.updates_for(task_id),
        eval_dataset: if top { job.trainers().find_map(|t| t.dataset.clone()) } else { None },
        loss: spec.training.loss,
    };
    let key = if top { format!("r{round}/aggregate") } else { format!("r{round}/aggregate/{task_id}") };
    Some(command(job, task_id, round, &key, body))
}

#[cfg(test)]
mod tests {
    use flame_events::algorithm::{Selection, ServerOptimizer};
    use flame_events::job::JobEvent;
    use flame_events::protocol::CommandBody;

    use super::*;
    use crate::job::Rejection;
    use crate::testing::{History, handle, task, update};

    fn sends(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { worker_id, command } => Some((worker_id.clone(), command.id.clone())),
                Action::Handle(_) => None,
            })
            .collect()
    }

    fn worker(id: &str, roles: &[&str], realm: &str) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            realm: realm.into(),
            device: "cpu".into(),
            group: None,
        }
    }

    fn everyone() -> Vec<WorkerInfo> {
        ["t0", "t1", "agg"].iter().map(|t| worker(&format!("w-{t}"), &["trainer", "aggregator"], "default")).collect()
    }

    #[test]
    fn nothing_happens_before_the_job_starts_or_after_it_ends() {
        assert!(decide(&History::created(2).job(), 0, Some(&everyone())).is_empty());
        let done = History::created(1).started().initialized().round(1).then(JobEvent::JobCompleted {
            rounds_completed: 1,
            final_model: "m1".into(),
            metrics: Default::default(),
        });
        assert!(decide(&done.job(), u64::MAX, Some(&[])).is_empty());
    }

    #[test]
    fn placement_waits_for_workers_with_the_right_roles_and_realms() {
        let starting = History::created(2).starting().job();
        assert!(decide(&starting, 0, None).is_empty(), "no registry read, no placement");
        assert!(decide(&starting, 0, Some(&everyone()[..2])).is_empty(), "three tasks need three workers");
        let actions = decide(&starting, 0, Some(&everyone()));
        assert!(matches!(&actions[..], [Action::Handle(JobCommand::Assign(a))] if a.len() == 3));

        let mut uk = task("t0", true);
        uk.realm = Some("default/eu/uk".into());
        let agg = task("agg", false);
        let workers = [
            worker("a-us", &["trainer"], "default/us"),
            worker("b-eu", &["trainer"], "default/eu"),
            worker("c-uk", &["trainer"], "default/eu/uk/london"),
            worker("d-agg", &["aggregator"], "default/us"),
        ];
        let placed = assign(&[&uk, &agg], &workers, &BTreeSet::new()).expect("placed");
        assert_eq!(placed["t0"], "c-uk", "only a worker inside the dataset's realm may train on it");
        assert_eq!(placed["agg"], "d-agg");
        assert!(assign(&[&uk], &workers[..2], &BTreeSet::new()).is_none());
    }

    #[test]
    fn placing_many_tasks_in_one_pass_gives_what_one_search_per_task_gives() {
        // The reference: each task takes the first free worker that can run it.
        fn one_by_one(tasks: &[&TaskSpec], workers: &[WorkerInfo], busy: &BTreeSet<String>) -> Option<BTreeMap<String, String>> {
            let mut used = busy.clone();
            let mut out = BTreeMap::new();
            let mut ordered: Vec<_> = tasks.to_vec();
            ordered.sort_by_key(|t| t.is_data_consumer);
            for t in ordered {
                let w = workers.iter().find(|w| !used.contains(&w.id) && w.can_run(&t.role, generic_role(t), t.realm.as_deref()))?;
                used.insert(w.id.clone());
                out.insert(t.task_id.clone(), w.id.clone());
            }
            Some(out)
        }
        let realms = ["default/eu", "default/us", "default/eu/uk"];
        let mut rng = flame_events::rng::SplitMix::new(7);
        for case in 0..50 {
            let workers: Vec<WorkerInfo> = (0..40)
                .map(|i| {
                    let roles: &[&str] = match rng.next_u64() % 3 {
                        0 => &["trainer"],
                        1 => &["aggregator"],
                        _ => &["trainer", "aggregator"],
                    };
                    worker(&format!("w{i:02}"), roles, realms[(rng.next_u64() % 3) as usize])
                })
                .collect();
            let tasks: Vec<TaskSpec> = (0..(10 + case % 25))
                .map(|i| {
                    let mut t = task(&format!("t{i}"), !rng.next_u64().is_multiple_of(4));
                    t.realm = match rng.next_u64() % 4 {
                        0 => None,
                        r => Some(realms[r as usize - 1].to_string()),
                    };
                    t
                })
                .collect();
            let refs: Vec<&TaskSpec> = tasks.iter().collect();
            let busy: BTreeSet<String> = (0..case % 5).map(|i| format!("w{:02}", i * 7)).collect();
            assert_eq!(assign(&refs, &workers, &busy), one_by_one(&refs, &workers, &busy), "case {case}");
        }
    }

    #[test]
    fn deployment_asks_each_placed_worker_once_per_task() {
        let h = History::created(2).deploying();
        assert_eq!(
            sends(&decide(&h.job(), 0, Some(&everyone()))),
            vec![
                ("w-t0".to_string(), "job-1/deploy/t0/w-t0".to_string()),
                ("w-t1".into(), "job-1/deploy/t1/w-t1".into()),
                ("w-agg".into(), "job-1/deploy/agg/w-agg".into())
            ]
        );
        let some = h.then(JobEvent::TaskDeployed { task_id: "t0".into(), worker_id: "w-t0".into(), samples: None });
        assert_eq!(sends(&decide(&some.job(), 0, None)).len(), 2);
    }

    #[test]
    fn commands_already_sent_are_left_out_and_nothing_else_is() {
        // Deploying, and a round training.
        let deploying = History::created(2).deploying();
        let training = History::created(3).started().initialized().round(1).round_started(2);
        for job in [deploying.job(), training.job()] {
            let all = decide(&job, 0, Some(&everyone()));
            let all_sends = sends(&all);
            assert!(all_sends.len() >= 2, "{all_sends:?}");
            // Any subset said sent: exactly the others come out, with every job command unchanged.
            for skip in 0..all_sends.len() {
                let said: Vec<&(String, String)> = all_sends.iter().skip(skip).step_by(2).collect();
                let sent = |w: &str, id: &str| said.iter().any(|(sw, sid)| sw == w && sid == id);
                let rest = decide_unsent(&job, 0, Some(&everyone()), &sent);
                let expected: Vec<Action> = all
                    .iter()
                    .filter(|a| !matches!(a, Action::Send { worker_id, command } if sent(worker_id, &command.id)))
                    .cloned()
                    .collect();
                assert_eq!(rest, expected, "skipping {said:?}");
            }
            // The same command to another worker (a task placed again) is not taken as sent.
            let elsewhere = |w: &str, _: &str| w == "w-somewhere-else";
            assert_eq!(decide_unsent(&job, 0, Some(&everyone()), &elsewhere), all);
        }
    }

    #[test]
    fn a_running_job_first_asks_the_aggregator_for_the_initial_model() {
        let actions = decide(&History::created(2).started().job(), 0, Some(&everyone()));
        assert_eq!(sends(&actions), vec![("w-agg".to_string(), "job-1/init".to_string())]);
        assert!(matches!(&actions[0], Action::Send { command, .. } if matches!(command.body, CommandBody::InitModel { .. })));
    }

    #[test]
    fn rounds_start_train_aggregate_and_finish() {
        let ready = History::created(2).started().initialized();
        assert_eq!(decide(&ready.job(), 7, None), vec![Action::Handle(JobCommand::StartRound { now_ms: 7, spent: Default::default() })]);

        let open = ready.round_started(1);
        assert_eq!(
            sends(&decide(&open.job(), 0, None)),
            vec![("w-t0".into(), "job-1/r1/train/t0".into()), ("w-t1".into(), "job-1/r1/train/t1".into())]
        );

        let half = open.then(update(1, "t0"));
        assert_eq!(sends(&decide(&half.job(), 0, None)), vec![("w-t1".into(), "job-1/r1/train/t1".into())]);

        let full = half.then(update(1, "t1"));
        let actions = decide(&full.job(), 0, None);
        assert_eq!(sends(&actions), vec![("w-agg".into(), "job-1/r1/aggregate".into())]);
        let Action::Send { command, .. } = &actions[0] else { panic!("send") };
        let CommandBody::Aggregate { updates, global_model, .. } = &command.body else { panic!("aggregate") };
        assert_eq!(global_model, "m0");
        assert_eq!(updates.iter().map(|u| u.digest.as_str()).collect::<Vec<_>>(), vec!["u1t0", "u1t1"]);

        let last = History::created(2).started().initialized().round(1).round(2);
        assert_eq!(decide(&last.job(), 0, None), vec![Action::Handle(JobCommand::Complete)]);
    }

    /// Each command names its step's span in the job's trace, as `flamectl
    /// trace` builds it from the events: the worker's span joins it.
    #[test]
    fn commands_carry_the_trace_context_of_their_step() {
        let open = History::created(2).started().initialized().round_started(1);
        let events = crate::testing::envelopes(&open.then(update(1, "t0")).then(update(1, "t1")).events);
        let tree = trace::build(&events).expect("a trace");
        let train = &tree.children.iter().find(|s| s.name == "round 1").expect("round 1").children[0];
        let actions = decide(&History::created(2).started().initialized().round_started(1).job(), 0, None);
        for a in &actions {
            let Action::Send { command, .. } = a else { continue };
            let task = train.children.iter().find(|t| t.name == command.task_id).expect("the task's span");
            assert_eq!(command.traceparent, Some(format!("00-{}-{}-01", tree.trace_id, task.id)), "{}", command.task_id);
        }
        assert_eq!(actions.len(), 2);
        let full = History::created(2).started().initialized().round_started(1).then(update(1, "t0")).then(update(1, "t1"));
        let Some(Action::Send { command, .. }) = decide(&full.job(), 0, None).into_iter().next() else { panic!("aggregate") };
        assert_eq!(command.traceparent, Some(trace::traceparent(crate::testing::JOB, "round 1/aggregate")));
    }

    /// The Evaluate commands among actions: (worker, round, global model).
    fn evaluations(actions: &[Action]) -> Vec<(String, u32, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { worker_id, command } => match &command.body {
                    CommandBody::Evaluate { global_model, .. } => Some((worker_id.clone(), command.round, global_model.clone())),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[test]
    fn trainers_evaluate_the_rounds_models_and_the_job_waits_for_the_last() {
        use crate::testing::report;
        use flame_events::protocol::ReportBody;
        let every = |n: u32| History::created_with(3, move |s| s.eval_every = n).started().initialized();
        // evalEvery 2 of 3 rounds: round 1 is not evaluated, round 2 is (beside round 3's training), round 3 (the last) is.
        let after_one = every(2).round(1);
        assert!(evaluations(&decide(&after_one.job(), 0, None)).is_empty());
        let after_two = every(2).round(1).round(2);
        let actions = decide(&after_two.job(), 0, None);
        assert_eq!(evaluations(&actions), [("w-t0".into(), 2, "m2".into()), ("w-t1".into(), 2, "m2".into())]);
        assert!(
            actions.contains(&Action::Handle(JobCommand::StartRound { now_ms: 0, spent: Default::default() })),
            "the next round does not wait for them"
        );

        // After the last round the job completes only once every trainer evaluated its model.
        let last = every(2).round(1).round(2).round(3);
        assert_eq!(evaluations(&decide(&last.job(), 0, None)).len(), 2);
        assert!(!decide(&last.job(), 0, None).contains(&Action::Handle(JobCommand::Complete)));
        let metrics = |acc: f64| ReportBody::Evaluated {
            metrics: [("accuracy".to_string(), acc), ("test_samples".to_string(), 10.0)].into_iter().collect(),
        };
        let job = last.job();
        let events = job.handle(report("t0", 3, metrics(0.9))).expect("t0 evaluates");
        assert!(matches!(&events[..], [JobEvent::ModelEvaluated { round: 3, task_id, .. }] if task_id == "t0"));
        let one = last.clone().then(events[0].clone());
        assert!(matches!(one.job().handle(report("t0", 3, metrics(0.9))), Err(Rejection::Duplicate { .. })), "once per trainer");
        assert!(
            matches!(one.job().handle(report("t1", 2, metrics(0.9))), Err(Rejection::Unexpected(_))),
            "round 2's is no longer asked for"
        );
        assert_eq!(evaluations(&decide(&one.job(), 0, None)), [("w-t1".into(), 3, "m3".into())]);
        let both = one.clone().then(one.job().handle(report("t1", 3, metrics(0.8))).expect("t1")[0].clone());
        assert_eq!(decide(&both.job(), 0, None), vec![Action::Handle(JobCommand::Complete)]);
        // A trainer whose worker is lost is not waited for.
        let lost = one.then(JobEvent::WorkerLost { worker_id: "w-t1".into(), orphaned: vec!["t1".into()] });
        assert_eq!(decide(&lost.job(), 0, None), vec![Action::Handle(JobCommand::Complete)]);
        // Without evalEvery nothing changes.
        let plain = History::created(1).started().initialized().round(1);
        assert_eq!(decide(&plain.job(), 0, None), vec![Action::Handle(JobCommand::Complete)]);
    }

    #[test]
    fn a_due_timer_comes_first_and_stopping_terminates() {
        let open = History::created(2).started().initialized().round_started(1);
        let due = crate::job::DEFAULT_ROUND_TIMEOUT_S * 1000;
        assert_eq!(decide(&open.job(), due, None), vec![Action::Handle(JobCommand::Fire { timer: "round-1".into(), now_ms: due })]);
        assert!(matches!(decide(&open.job(), due - 1, None)[0], Action::Send { .. }));
        let stopping = open.then(JobEvent::JobStopping { reason: "user".into() });
        assert_eq!(decide(&stopping.job(), 0, None), vec![Action::Handle(JobCommand::Terminate)]);
    }

    #[test]
    fn a_worker_missing_from_the_registry_is_lost_and_replaced_by_a_free_one() {
        let open = History::created(2).started().initialized().round_started(1);
        let mut live = everyone();
        live.retain(|w| w.id != "w-t1");
        assert_eq!(
            decide(&open.job(), 0, Some(&live)),
            vec![Action::Handle(JobCommand::LoseWorker { worker_id: "w-t1".into(), replacements: BTreeMap::new() })],
            "busy workers are not replacements"
        );
        live.push(worker("w-spare", &["trainer"], "default"));
        assert_eq!(
            decide(&open.job(), 0, Some(&live)),
            vec![Action::Handle(JobCommand::LoseWorker {
                worker_id: "w-t1".into(),
                replacements: BTreeMap::from([("t1".into(), "w-spare".into())])
            })]
        );
        let moved = open
            .then(JobEvent::TaskAssigned { task_id: "t1".into(), worker_id: "w-spare".into() })
            .then(JobEvent::WorkerLost { worker_id: "w-t1".into(), orphaned: vec![] });
        assert_eq!(
            sends(&decide(&moved.job(), 0, Some(&live))),
            vec![("w-t0".into(), "job-1/r1/train/t0".into()), ("w-spare".into(), "job-1/r1/train/t1".into())]
        );
    }

    /// The hierarchical test job, running with the initial model and round 1 open.
    fn aggregate_of<'a>(actions: &'a [Action], worker: &str) -> (&'a str, &'a Vec<flame_events::protocol::UpdateRef>, bool) {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Send { worker_id, command } if worker_id == worker => match &command.body {
                    CommandBody::Aggregate { optimizer, updates, eval_dataset, .. } => {
                        Some((optimizer.name(), updates, eval_dataset.is_some()))
                    }
                    _ => None,
                },
                _ => None,
            })
            .unwrap_or_else(|| panic!("no aggregate for {worker} in {actions:?}"))
    }

    #[test]
    fn hierarchical_rounds_aggregate_each_group_then_the_groups() {
        use crate::testing::report;
        use flame_events::protocol::{Excluded, ReportBody};
        let aggregated = |d: &str, excluded: Vec<Excluded>| ReportBody::Aggregated {
            digest: d.into(),
            metrics: Default::default(),
            optimizer_state: None,
            excluded,
        };
        let mut h = crate::testing::hierarchical_round();
        if let JobEvent::JobCreated { spec, .. } = &mut h.events[0] {
            spec.quorum = Some(3);
        }
        assert_eq!(h.job().aggregator().map(|t| t.task_id.as_str()), Some("top"));
        assert_eq!(sends(&decide(&h.job(), 0, None)).len(), 4, "all four trainers train");

        // Group eu is complete: its middle aggregator averages it while na still trains.
        let h = h.then(update(1, "t0")).then(update(1, "t1"));
        let actions = decide(&h.job(), 0, None);
        assert_eq!(sends(&actions).iter().filter(|(_, id)| id.contains("/train/")).count(), 2);
        let (optimizer, updates, evaluates) = aggregate_of(&actions, "w-m-eu");
        assert_eq!((optimizer, evaluates), ("fedavg", false), "middle tiers average and do not evaluate");
        assert_eq!(updates.iter().map(|u| u.digest.as_str()).collect::<Vec<_>>(), ["u1t0", "u1t1"]);
        assert!(!sends(&actions).iter().any(|(w, _)| w == "w-top" || w == "w-m-na"));

        let h = handle(h, report("m-eu", 1, aggregated("g-eu", vec![])));
        assert!(matches!(h.events.last(), Some(JobEvent::GroupAggregated { samples: 20, inputs, .. }) if inputs == &["u1t0", "u1t1"]));
        assert!(matches!(h.job().handle(report("m-eu", 1, aggregated("g-eu", vec![]))), Err(crate::job::Rejection::Duplicate { .. })));
        let early = h.job().handle(report("top", 1, aggregated("m1", vec![])));
        assert!(matches!(early, Err(crate::job::Rejection::Unexpected(m)) if m.contains("before 1 input(s)")), "top waits for na");

        // Group na: t3's update is unusable; the middle aggregator leaves it out.
        let h = h.then(update(1, "t2")).then(update(1, "t3"));
        let bad = || vec![Excluded { task_id: "t3".into(), digest: "u1t3".into(), reason: "NaN".into() }];
        let foreign = vec![Excluded { task_id: "t0".into(), digest: "u1t0".into(), reason: "x".into() }];
        assert!(h.job().handle(report("m-na", 1, aggregated("g-na", foreign))).is_err(), "m-na cannot exclude eu's updates");
        let h = handle(h, report("m-na", 1, aggregated("g-na", bad())));
        let n = h.events.len();
        assert!(matches!(&h.events[n - 2], JobEvent::UpdateExcluded { task_id, .. } if task_id == "t3"));
        assert!(matches!(&h.events[n - 1], JobEvent::GroupAggregated { samples: 10, inputs, .. } if inputs == &["u1t2"]));

        // The top aggregator combines the two groups, weighted by their samples, with the job's optimizer.
        let actions = decide(&h.job(), 0, None);
        assert_eq!(sends(&actions), vec![("w-top".to_string(), "job-1/r1/aggregate".to_string())]);
        let (_, updates, evaluates) = aggregate_of(&actions, "w-top");
        assert!(evaluates);
        let got: Vec<(&str, &str, u64)> = updates.iter().map(|u| (u.task_id.as_str(), u.digest.as_str(), u.samples)).collect();
        assert_eq!(got, [("m-eu", "g-eu", 20), ("m-na", "g-na", 10)]);
        let h = handle(h, report("top", 1, aggregated("m1", vec![])));
        assert!(
            matches!(h.events.last(), Some(JobEvent::RoundAggregated { inputs, .. }) if inputs == &["u1t0", "u1t1", "u1t2"]),
            "the round's inputs are the trainers' updates inside the groups"
        );
        assert_eq!(decide(&h.job(), 0, None), vec![Action::Handle(JobCommand::Complete)]);
    }

    #[test]
    fn a_group_whose_trainers_all_missed_the_deadline_sits_the_round_out() {
        let h = crate::testing::hierarchical_round()
            .then(update(1, "t2"))
            .then(update(1, "t3"))
            .then(JobEvent::TrainingClosed { round: 1, dropped: vec!["t0".into(), "t1".into()] });
        let actions = decide(&h.job(), 0, None);
        assert_eq!(sends(&actions), vec![("w-m-na".to_string(), "job-1/r1/aggregate/m-na".to_string())]);
        let h = h.then(JobEvent::GroupAggregated {
            round: 1,
            task_id: "m-na".into(),
            worker_id: "w-m-na".into(),
            digest: "g-na".into(),
            samples: 20,
            inputs: vec!["u1t2".into(), "u1t3".into()],
            metrics: Default::default(),
        });
        let actions = decide(&h.job(), 0, None);
        let (_, updates, _) = aggregate_of(&actions, "w-top");
        assert_eq!(updates.len(), 1, "the top aggregator does not wait for the empty group");
    }

    fn fedbuff(goal: u32, concurrency: u32) -> History {
        History::created_with(3, |s| {
            s.optimizer = ServerOptimizer::FedBuff { eta: 1.0 };
            s.selection = Selection::Buffered { goal, concurrency: Some(concurrency) };
        })
        .started()
        .initialized()
    }

    fn trains(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { command, .. } => match &command.body {
                    CommandBody::Train { global_model, .. } => Some((command.id.clone(), global_model.clone())),
                    _ => None,
                },
                Action::Handle(_) => None,
            })
            .collect()
    }

    #[test]
    fn fedbuff_aggregates_every_goal_updates_and_late_ones_join_the_next_buffer_stale() {
        use crate::testing::{report, trained};
        use flame_events::protocol::ReportBody;
        let start = |h: History| {
            let actions = decide(&h.job(), 0, None);
            assert!(matches!(&actions[..], [Action::Handle(JobCommand::StartRound { .. })]), "{actions:?}");
            handle(h, JobCommand::StartRound { now_ms: 0, spent: Default::default() })
        };
        let h = start(fedbuff(1, 2));
        assert!(matches!(&h.events[h.events.len() - 2], JobEvent::RoundStarted { selected, .. } if selected == &["t0", "t1"]));
        assert_eq!(
            trains(&decide(&h.job(), 0, None)),
            [("job-1/r1/train/t0".to_string(), "m0".to_string()), ("job-1/r1/train/t1".into(), "m0".into())]
        );

        // t0 fills the buffer (aggGoal 1): the aggregator is asked while t1 keeps training.
        let h = handle(h, report("t0", 1, trained(1, "t0")));
        assert!(matches!(h.events.last(), Some(JobEvent::UpdateReported { round: 1, staleness: 0, .. })));
        let actions = decide(&h.job(), 0, None);
        assert_eq!(trains(&actions), [("job-1/r1/train/t1".to_string(), "m0".to_string())]);
        let (optimizer, updates, _) = aggregate_of(&actions, "w-agg");
        assert_eq!(optimizer, "fedbuff");
        assert_eq!(updates.iter().map(|u| (u.task_id.as_str(), u.staleness, u.base_model.clone())).collect::<Vec<_>>(), [("t0", 0, None)]);

        // t1 reports while the buffer is full: it joins round 2's buffer, one model stale.
        let h = handle(h, report("t1", 1, trained(1, "t1")));
        assert!(matches!(h.events.last(), Some(JobEvent::UpdateReported { round: 2, staleness: 1, .. })));
        let actions = decide(&h.job(), 0, None);
        let (_, updates, _) = aggregate_of(&actions, "w-agg");
        assert_eq!(updates.len(), 1, "the aggregate asked for is not changed by a late update");
        assert!(h.job().handle(report("t1", 1, trained(1, "t1"))).is_err(), "a second report of the same training is refused");

        let aggregated =
            ReportBody::Aggregated { digest: "m1".into(), metrics: Default::default(), optimizer_state: None, excluded: vec![] };
        let h = handle(h, report("agg", 1, aggregated));
        assert!(matches!(h.events.last(), Some(JobEvent::RoundAggregated { round: 1, inputs, .. }) if inputs == &["u1t0"]));

        // Round 2 starts with t1's stale update already in its buffer, and sends both idle trainers the new model.
        let h = start(h);
        let actions = decide(&h.job(), 0, None);
        let (_, updates, _) = aggregate_of(&actions, "w-agg");
        let got: Vec<_> = updates.iter().map(|u| (u.task_id.as_str(), u.staleness, u.base_model.as_deref())).collect();
        assert_eq!(got, [("t1", 1, Some("m0"))], "the stale update names the model it trained from");
        assert_eq!(trains(&actions), [("job-1/r2/train/t0".to_string(), "m1".to_string()), ("job-1/r2/train/t1".into(), "m1".into())]);
        assert!(matches!(
            h.job().handle(report("t1", 1, trained(1, "t1"))),
            Err(crate::job::Rejection::WrongRound { got: 1, open: 2, .. })
        ));
    }

    #[test]
    fn a_fedbuff_trainer_whose_training_fails_goes_idle_and_is_picked_again() {
        use crate::testing::{report, trained};
        use flame_events::protocol::ReportBody;
        let failed = |task: &str, round: u32| {
            let JobCommand::Report(mut r) = report(task, round, ReportBody::Failed { error: "ValueError: bad batch".into() }) else {
                unreachable!()
            };
            r.command_id = format!("{}/r{round}/train/{task}", crate::testing::JOB);
            JobCommand::Report(r)
        };
        let h = handle(fedbuff(1, 2), JobCommand::StartRound { now_ms: 0, spent: Default::default() });
        let events = h.job().handle(failed("t0", 1)).expect("handled");
        assert!(
            matches!(&events[..], [JobEvent::TrainingFailed { round: 1, task_id, error, .. }] if task_id == "t0" && error.contains("bad batch")),
            "the job goes on: {events:?}"
        );
        let h = handle(h, failed("t0", 1));
        assert_eq!(h.job().status, crate::job::Status::Running);
        assert_eq!(trains(&decide(&h.job(), 0, None)), [("job-1/r1/train/t1".to_string(), "m0".to_string())], "t0 is no longer asked");
        assert!(matches!(h.job().handle(failed("t0", 1)), Err(crate::job::Rejection::Duplicate { .. })), "a redelivery changes nothing");
        assert!(h.job().handle(report("t0", 1, trained(1, "t0"))).is_err(), "nor does a late update of the failed training");

        // t1 fills the buffer; round 2 sends the idle t0 the new model.
        let h = handle(h, report("t1", 1, trained(1, "t1")));
        let aggregated =
            ReportBody::Aggregated { digest: "m1".into(), metrics: Default::default(), optimizer_state: None, excluded: vec![] };
        let h = handle(handle(h, report("agg", 1, aggregated)), JobCommand::StartRound { now_ms: 0, spent: Default::default() });
        assert!(trains(&decide(&h.job(), 0, None)).contains(&("job-1/r2/train/t0".to_string(), "m1".to_string())), "t0 trains again");
    }

    /// The hierarchical test job, asynchronous: FedBuff buffers of `goal` at
    /// each middle aggregator, `c` trainers busy under each, initial model in.
    fn async_hierarchical(goal: u32, c: u32) -> History {
        let mut h = crate::testing::hierarchical_round();
        h.events.truncate(h.events.len() - 2);
        if let JobEvent::JobCreated { spec, .. } = &mut h.events[0] {
            spec.rounds = 3;
            spec.optimizer = ServerOptimizer::FedBuff { eta: 1.0 };
            spec.selection = Selection::Buffered { goal, concurrency: Some(c) };
        }
        h
    }

    #[test]
    fn async_hierarchical_buffers_at_each_middle_and_the_top_combines_every_group() {
        use crate::testing::{report, trained};
        use flame_events::protocol::ReportBody;
        let aggregated =
            |d: &str| ReportBody::Aggregated { digest: d.into(), metrics: Default::default(), optimizer_state: None, excluded: vec![] };
        // One trainer busy under each middle aggregator, buffers of one update.
        let h = handle(async_hierarchical(1, 1), JobCommand::StartRound { now_ms: 0, spent: Default::default() });
        let JobEvent::RoundStarted { selected, .. } = &h.events[h.events.len() - 2] else { panic!("{:?}", h.events) };
        assert_eq!(selected.len(), 2, "c = 1 under each of the two middle aggregators: {selected:?}");
        let (eu, na) = (
            selected.iter().find(|t| ["t0", "t1"].contains(&t.as_str())).expect("eu").clone(),
            selected.iter().find(|t| ["t2", "t3"].contains(&t.as_str())).expect("na").clone(),
        );

        // eu's trainer fills eu's buffer: m-eu takes FedBuff's step over it; the top waits for na.
        let h = handle(h, report(&eu, 1, trained(1, &eu)));
        let actions = decide(&h.job(), 0, None);
        let (optimizer, updates, evaluates) = aggregate_of(&actions, "w-m-eu");
        assert_eq!((optimizer, updates.len(), evaluates), ("fedbuff", 1, false));
        assert!(!sends(&actions).iter().any(|(w, _)| w == "w-top" || w == "w-m-na"));
        let h = handle(h, report("m-eu", 1, aggregated("g-eu")));
        assert!(!h.job().ready("top"), "the top combines every group");

        // A second eu update now joins round 2's buffer, one model stale.
        let other_eu = if eu == "t0" { "t1" } else { "t0" };
        let mut job = h.job();
        job.round.buffer.in_flight.insert(other_eu.into(), crate::job::Dispatch { round: 1, model: "m0".into() });
        let late = job.handle(report(other_eu, 1, trained(1, other_eu))).expect("late update");
        assert!(matches!(&late[..], [JobEvent::UpdateReported { round: 2, staleness: 1, .. }]), "{late:?}");

        // na's trainer fills na's buffer; once m-na has aggregated, the top combines both groups with the job's optimizer.
        let h = handle(h, report(&na, 1, trained(1, &na)));
        let h = handle(h, report("m-na", 1, aggregated("g-na")));
        let actions = decide(&h.job(), 0, None);
        let (optimizer, updates, evaluates) = aggregate_of(&actions, "w-top");
        assert_eq!((optimizer, evaluates), ("fedbuff", true));
        assert_eq!(updates.iter().map(|u| u.digest.as_str()).collect::<Vec<_>>(), ["g-eu", "g-na"]);
        let h = handle(h, report("top", 1, aggregated("m1")));
        assert!(matches!(h.events.last(), Some(JobEvent::RoundAggregated { round: 1, inputs, .. }) if inputs.len() == 2));

        // Round 2 keeps one trainer busy under each middle again, from the new model.
        let h = handle(h, JobCommand::StartRound { now_ms: 0, spent: Default::default() });
        let JobEvent::RoundStarted { selected, .. } = &h.events[h.events.len() - 2] else { panic!() };
        assert_eq!(selected.len(), 2, "{selected:?}");
        assert!(trains(&decide(&h.job(), 0, None)).iter().all(|(_, m)| m == "m1"));
    }

    #[test]
    fn fedbuff_keeps_concurrency_trainers_busy_and_its_deadline_takes_min_clients() {
        use crate::testing::{report, trained};
        let h = handle(fedbuff(2, 1), JobCommand::StartRound { now_ms: 0, spent: Default::default() });
        let job = h.job();
        assert_eq!(job.round.buffer.in_flight.len(), 1, "c = 1: one trainer at a time");
        let busy = job.round.buffer.in_flight.keys().next().cloned().expect("one");
        let h = handle(h, report(&busy, 1, trained(1, &busy)));
        // The buffer wants 2; at the deadline 1 update is fewer than the quorum (aggGoal) and the job fails...
        let late = crate::job::DEFAULT_ROUND_TIMEOUT_S * 1000;
        let events = h.job().handle(JobCommand::Fire { timer: "round-1".into(), now_ms: late }).expect("fire");
        assert!(matches!(events.last(), Some(JobEvent::JobFailed { .. })), "{events:?}");
        // ...unless minClients allows a smaller buffer: training closes and nobody is dropped.
        let mut lenient = h;
        if let JobEvent::JobCreated { spec, .. } = &mut lenient.events[0] {
            spec.quorum = Some(1);
        }
        let events = lenient.job().handle(JobCommand::Fire { timer: "round-1".into(), now_ms: late }).expect("fire");
        assert!(events.iter().any(|e| matches!(e, JobEvent::TrainingClosed { dropped, .. } if dropped.is_empty())), "{events:?}");
    }

    #[test]
    fn oort_closes_the_round_at_aggr_num_and_learns_from_updates() {
        use crate::testing::{report, trained};
        use flame_events::protocol::ReportBody;
        let h = History::created_with(2, |s| s.selection = Selection::Oort { aggr_num: 1 }).started().initialized();
        let h = handle(h, JobCommand::StartRound { now_ms: 0, spent: Default::default() });
        assert!(
            matches!(&h.events[h.events.len() - 2], JobEvent::RoundStarted { selected, .. } if selected.len() == 2),
            "1.3 x aggr_num, rounded up"
        );
        assert_eq!(h.job().quorum(), 1);
        let body = ReportBody::Trained {
            digest: "u1t1".into(),
            samples: 50,
            metrics: [("loss".to_string(), 0.7), ("train_seconds".to_string(), 2.0)].into(),
            state: None,
        };
        let h = handle(h, report("t1", 1, body));
        assert!(matches!(h.events.last(), Some(JobEvent::TrainingClosed { dropped, .. }) if dropped == &["t0"]));
        assert!(h.job().training_done());
        assert!(h.job().handle(report("t0", 1, trained(1, "t0"))).is_err(), "the straggler's late update is refused");
        let stats = &h.job().records.oort["t1"];
        assert_eq!((stats.samples, stats.loss, stats.seconds, stats.last_round), (50, 0.7, Some(2.0), 1));
        let actions = decide(&h.job(), 0, None);
        assert_eq!(aggregate_of(&actions, "w-agg").1.len(), 1);
    }

    #[test]
    fn a_coordinated_round_waits_for_a_valid_pairing() {
        use crate::testing::{report, task};
        use flame_events::protocol::ReportBody;
        let mut h = crate::testing::hierarchical_round();
        if let JobEvent::JobCreated { spec, tasks, .. } = &mut h.events[0] {
            let mut c = task("coord", false);
            c.role = "coordinator".into();
            tasks.push(c);
            spec.coordinator = Some("coord".into());
            for t in ["t0", "t1", "t2", "t3"] {
                spec.candidates.insert(t.into(), vec!["m-eu".into(), "m-na".into()]);
            }
        }
        h.events.insert(h.events.len() - 2, JobEvent::TaskAssigned { task_id: "coord".into(), worker_id: "w-coord".into() });
        let h = h.then(update(1, "t0")).then(update(1, "t1"));
        let job = h.job();
        assert_eq!(job.aggregator().map(|t| t.task_id.as_str()), Some("top"), "the coordinator is not an aggregator");
        let actions = decide(&job, 0, None);
        assert!(sends(&actions).contains(&("w-coord".to_string(), "job-1/r1/coordinate".to_string())));
        assert!(!sends(&actions).iter().any(|(_, id)| id.contains("aggregate")), "no aggregation before the pairing");

        let pair =
            |p: &[(&str, &str)]| ReportBody::Coordinated { pairing: p.iter().map(|(t, a)| (t.to_string(), a.to_string())).collect() };
        let partial = pair(&[("t0", "m-na"), ("t1", "m-na"), ("t2", "m-eu")]);
        assert!(
            matches!(job.handle(report("coord", 1, partial)), Err(crate::job::Rejection::Unexpected(m)) if m.contains("leaves out trainer 't3'"))
        );
        let foreign = pair(&[("t0", "top"), ("t1", "m-na"), ("t2", "m-eu"), ("t3", "m-eu")]);
        assert!(
            matches!(job.handle(report("coord", 1, foreign)), Err(crate::job::Rejection::Unexpected(m)) if m.contains("not one of its aggregators"))
        );
        assert!(job.handle(report("m-eu", 1, pair(&[]))).is_err(), "only the coordinator pairs");

        // t0 and t1 (both reported) go to m-na: that middle aggregator is ready, m-eu waits for t2 and t3.
        let good = pair(&[("t0", "m-na"), ("t1", "m-na"), ("t2", "m-eu"), ("t3", "m-eu")]);
        let h = handle(h, report("coord", 1, good.clone()));
        assert!(matches!(h.events.last(), Some(JobEvent::RoundCoordinated { round: 1, .. })));
        assert!(matches!(h.job().handle(report("coord", 1, good)), Err(crate::job::Rejection::Duplicate { .. })));
        let actions = decide(&h.job(), 0, None);
        let (_, updates, _) = aggregate_of(&actions, "w-m-na");
        assert_eq!(updates.iter().map(|u| u.task_id.as_str()).collect::<Vec<_>>(), ["t0", "t1"]);
        assert!(!sends(&actions).iter().any(|(w, _)| w == "w-m-eu"));
    }

    #[test]
    fn decisions_are_deterministic() {
        let h = History::created(2).started().initialized().round_started(1);
        assert_eq!(decide(&h.job(), 5, Some(&everyone())), decide(&h.job(), 5, Some(&everyone())));
    }

    fn sent_to(worker: &str, n: u32) -> (String, Command) {
        let job = History::created(1).job();
        (worker.to_string(), command(&job, "t0", n, &format!("c{n}"), CommandBody::Deploy { role: "trainer".into(), dataset: None }))
    }

    #[test]
    fn commands_of_a_groups_workers_go_together_and_the_others_one_by_one() {
        let groups = HashMap::from([
            ("v-1".to_string(), "g-a".to_string()),
            ("v-2".to_string(), "g-b".to_string()),
            ("v-3".to_string(), "g-a".to_string()),
        ]);
        let sends = vec![sent_to("v-1", 1), sent_to("solo", 2), sent_to("v-2", 3), sent_to("v-3", 4), sent_to("v-1", 5)];
        let out = outgoing(sends.clone(), &groups);
        assert_eq!(
            out,
            vec![
                Outgoing::Group("g-a".into(), vec![sends[0].clone(), sends[3].clone(), sends[4].clone()]),
                Outgoing::One("solo".into(), Box::new(sends[1].1.clone())),
                Outgoing::Group("g-b".into(), vec![sends[2].clone()]),
            ]
        );
        // Every command goes out exactly once, and a failed send names each of its commands.
        let mut all: Vec<(String, String)> = out.iter().flat_map(Outgoing::addressed).collect();
        all.sort();
        let mut want: Vec<(String, String)> = sends.iter().map(|(w, c)| (w.clone(), c.id.clone())).collect();
        want.sort();
        assert_eq!(all, want);
        // No groups: one by one, in order.
        assert_eq!(
            outgoing(sends.clone(), &HashMap::new()),
            sends.into_iter().map(|(w, c)| Outgoing::One(w, Box::new(c))).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_group_speaks_only_for_the_workers_whose_registration_names_it() {
        let groups = HashMap::from([("w-t0".to_string(), "g-a".to_string())]);
        let on = |worker: &str, via: Option<&str>| {
            let JobCommand::Report(mut r) = crate::testing::report("t0", 1, crate::testing::trained(1, "t0")) else { unreachable!() };
            r.worker_id = worker.into();
            r.via = via.map(str::to_string);
            r
        };
        let mut reports = vec![
            on("w-t0", Some("g-a")),  // its group: stands as its own
            on("w-t0", Some("g-b")),  // another group: keeps the subject it came on
            on("w-t1", Some("g-a")),  // a group w-t1 does not name
            on("w-t1", Some("w-t1")), // its own subject
            on("w-t0", None),         // in-process
        ];
        vouch(&mut reports, &groups);
        let vias: Vec<Option<&str>> = reports.iter().map(|r| r.via.as_deref()).collect();
        assert_eq!(vias, vec![Some("w-t0"), Some("g-b"), Some("g-a"), Some("w-t1"), None]);
        // The job then refuses the two that came on a subject not their worker's.
        let job = History::created(2).started().initialized().round_started(1).job();
        let refused: Vec<bool> = reports.into_iter().map(|r| job.handle(JobCommand::Report(r)).is_err()).collect();
        assert_eq!(refused[1..3], [true, true]);
    }
}
