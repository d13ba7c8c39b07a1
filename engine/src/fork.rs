//! Forks: a new job that starts from another job's global model after a
//! round and runs on from there, without some trainers or with other
//! hyperparameters. Unlearning a participant is a fork from the round before
//! its first update, without it: retraining without it, exactly. Pure: the
//! parent's events in, the new job's settings, tasks and origin out.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use flame_events::algorithm::Training;
use flame_events::job::{ForkOrigin, JobEvent, RunSpec, TaskSpec};

use crate::job::Job;

/// What a fork asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// The first round the fork runs (from the parent's model after the round before).
    pub from_round: Option<u32>,
    /// Trainer tasks or workers to leave out.
    pub exclude: Vec<String>,
    /// Trainer tasks or workers to unlearn: left out, and the fork starts
    /// before their first update (at `from_round` if that is earlier).
    pub unlearn: Vec<String>,
    /// Hyperparameters to change (see [`SETTABLE`]).
    pub set: Map<String, Value>,
}

/// The hyperparameters a fork may change: how training goes on, not what the
/// model is or how the rounds are laid out.
pub const SETTABLE: &[&str] = &["rounds", "learningRate", "epochs", "batchSize", "minClients", "roundTimeout", "evalEvery"];

/// The forked job's definition.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// Its name.
    pub name: String,
    /// Where it came from, in words.
    pub source: String,
    /// Its settings.
    pub spec: RunSpec,
    /// Its tasks: the parent's, less the excluded trainers.
    pub tasks: Vec<TaskSpec>,
    /// Where it starts.
    pub origin: ForkOrigin,
}

/// Plans a fork of job `parent_id` (its events, in order).
pub fn plan(parent_id: &str, events: &[JobEvent], req: &Request) -> Result<Planned, String> {
    let parent = Job::from_events(events);
    let Some(spec) = parent.spec.as_deref().cloned() else { return Err(format!("job '{parent_id}' has no definition")) };
    if spec.selection.is_asynchronous() {
        return Err(format!(
            "job '{parent_id}' runs asynchronous (FedBuff) rounds: its updates in flight cannot be carried into a fork; fork synchronous jobs"
        ));
    }
    let trainers: BTreeSet<&str> = parent.tasks.iter().filter(|t| t.is_data_consumer).map(|t| t.task_id.as_str()).collect();
    // Who ran each trainer task: its placements and the workers of its updates.
    let mut ran_by: Vec<(&str, &str)> = parent.assignments.iter().map(|(t, w)| (t.as_str(), w.as_str())).collect();
    for e in events {
        match e {
            JobEvent::TaskAssigned { task_id, worker_id } | JobEvent::UpdateReported { task_id, worker_id, .. } => {
                ran_by.push((task_id, worker_id));
            }
            _ => {}
        }
    }
    let tasks_of = |name: &str| -> Result<Vec<String>, String> {
        if trainers.contains(name) {
            return Ok(vec![name.to_string()]);
        }
        if parent.tasks.iter().any(|t| t.task_id == name) {
            return Err(format!("'{name}' is not a trainer of job '{parent_id}': only trainers can be left out"));
        }
        let mut found: Vec<String> =
            ran_by.iter().filter(|(t, w)| *w == name && trainers.contains(t)).map(|(t, _)| t.to_string()).collect();
        found.sort();
        found.dedup();
        if found.is_empty() {
            return Err(format!(
                "no trainer task or worker named '{name}' in job '{parent_id}' (its trainers: {})",
                trainers.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(found)
    };
    let mut excluded = BTreeSet::new();
    for name in &req.exclude {
        excluded.extend(tasks_of(name)?);
    }
    let mut unlearned = BTreeSet::new();
    for name in &req.unlearn {
        unlearned.extend(tasks_of(name)?);
    }
    excluded.extend(unlearned.iter().cloned());

    // Where it starts: before the first update of anything unlearned, or where asked.
    let first_update = events.iter().find_map(|e| match e {
        JobEvent::UpdateReported { round, task_id, .. } if unlearned.contains(task_id) => Some(*round),
        _ => None,
    });
    if !unlearned.is_empty() && first_update.is_none() {
        return Err(format!("job '{parent_id}' has no update from {} to unlearn", req.unlearn.join(", ")));
    }
    let from_round = match (req.from_round, first_update) {
        (Some(n), Some(first)) if n > first => {
            return Err(format!(
                "--from-round {n} is after the first update to unlearn (round {first}): its influence would stay in the model; fork from round {first} or earlier"
            ));
        }
        (Some(n), _) => n,
        (None, Some(first)) => first,
        (None, None) => return Err("say where the fork starts: --from-round N (or --unlearn a worker)".into()),
    };
    if from_round == 0 {
        return Err("rounds are numbered from 1: --from-round 1 starts from the initial model".into());
    }
    // The parent's state once round `from_round - 1` was done.
    let mut at = Job::default();
    let mut start = None;
    for e in events {
        at.apply(e);
        if at.global_model.is_some() && at.rounds_completed == from_round - 1 && !at.round_open() {
            start = Some(at.clone());
            break;
        }
    }
    let Some(start) = start else {
        let first = parent.forked_from.as_ref().map_or(1, |o| o.from_round);
        return Err(if from_round < first {
            format!(
                "job '{parent_id}' begins at round {first} (it is a fork of job '{}'); fork that job for earlier rounds",
                parent.forked_from.as_ref().map_or("", |o| o.parent_job.as_str())
            )
        } else {
            format!(
                "job '{parent_id}' has no global model after round {} (it completed {} round(s))",
                from_round - 1,
                parent.rounds_completed
            )
        });
    };
    let model = start.global_model.clone().unwrap_or_default();

    // The tasks without the excluded trainers, and the settings that name them.
    let tasks: Vec<TaskSpec> = parent.tasks.iter().filter(|t| !excluded.contains(&t.task_id)).cloned().collect();
    let left = tasks.iter().filter(|t| t.is_data_consumer).count();
    if left == 0 {
        return Err(format!(
            "leaving out {} leaves job '{parent_id}' with no trainer",
            excluded.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut spec = spec;
    spec.uplinks.retain(|t, _| !excluded.contains(t));
    spec.candidates.retain(|t, _| !excluded.contains(t));
    for agg in tasks.iter().filter(|t| !t.is_data_consumer && t.colocate.is_none()) {
        let feeds = spec.uplinks.values().any(|a| *a == agg.task_id) || spec.candidates.values().any(|c| c.contains(&agg.task_id));
        let top = !spec.uplinks.contains_key(&agg.task_id);
        if !feeds && !top && spec.coordinator.as_deref() != Some(agg.task_id.as_str()) {
            return Err(format!("leaving out its trainers leaves aggregator '{}' with no input; leave out fewer", agg.task_id));
        }
    }
    apply_settings(&mut spec, &req.set)?;
    if let Some(q) = spec.quorum
        && q as usize > left
    {
        spec.quorum = Some(left as u32);
    }
    if from_round > spec.rounds {
        return Err(format!("--from-round {from_round} is past the job's last round ({})", spec.rounds));
    }
    let mut client_states = start.records.client_states.clone();
    client_states.retain(|t, _| !excluded.contains(t));
    let origin = ForkOrigin {
        parent_job: parent_id.to_string(),
        from_round,
        model,
        optimizer_state: start.optimizer_state.clone(),
        client_states,
        excluded: excluded.into_iter().collect(),
        changed: req.set.clone(),
    };
    Ok(Planned {
        name: format!("{}-fork", parent.name),
        source: format!("fork of job {parent_id} from round {from_round}"),
        spec,
        tasks,
        origin,
    })
}

/// Changes the settings `set` names, through the same checks a job file's
/// hyperparameters get.
fn apply_settings(spec: &mut RunSpec, set: &Map<String, Value>) -> Result<(), String> {
    if set.is_empty() {
        return Ok(());
    }
    if let Some(k) = set.keys().find(|k| !SETTABLE.contains(&k.as_str())) {
        return Err(format!("--set {k}: a fork may change only {}", SETTABLE.join(", ")));
    }
    let mut h = match &spec.hyperparameters {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in set {
        h.insert(k.clone(), v.clone());
    }
    let whole = |key: &str, min: u64| -> Result<Option<u64>, String> {
        match h.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| *n >= min)
                .map(Some)
                .ok_or_else(|| format!("--set {key}: {v} is not a whole number of at least {min}")),
        }
    };
    spec.rounds = whole("rounds", 1)?.map_or(spec.rounds, |n| n as u32);
    spec.round_timeout_s = whole("roundTimeout", 1)?.or(spec.round_timeout_s);
    spec.quorum = whole("minClients", 1)?.map(|n| n as u32).or(spec.quorum);
    spec.eval_every = whole("evalEvery", 0)?.map_or(spec.eval_every, |n| n as u32);
    let training = Training::from_hyperparameters(&h).map_err(|e| format!("--set {}: {} ({})", e.param, e.message, e.hint))?;
    // Only what it asked for changes: the rest of the training settings stay as recorded.
    let had = spec.training;
    spec.training = Training { epochs: training.epochs, batch_size: training.batch_size, learning_rate: training.learning_rate, ..had };
    spec.hyperparameters = Value::Object(h);
    Ok(())
}

#[cfg(test)]
mod tests {
    use flame_events::job::Metrics;
    use serde_json::json;

    use super::*;
    use crate::testing::{History, update};

    fn events(h: &History) -> Vec<JobEvent> {
        h.events.clone()
    }

    fn req(f: impl FnOnce(&mut Request)) -> Request {
        let mut r = Request::default();
        f(&mut r);
        r
    }

    #[test]
    fn a_fork_starts_from_the_model_after_the_round_before() {
        let h = History::created(4).started().initialized().round(1).round(2).round(3);
        let p = plan("p", &events(&h), &req(|r| r.from_round = Some(3))).expect("plans");
        assert_eq!((p.origin.from_round, p.origin.model.as_str(), p.origin.parent_job.as_str()), (3, "m2", "p"));
        assert_eq!(p.tasks.len(), 3);
        let first = plan("p", &events(&h), &req(|r| r.from_round = Some(1))).expect("plans");
        assert_eq!(first.origin.model, "m0", "round 1 starts from the initial model");
        assert!(plan("p", &events(&h), &req(|r| r.from_round = Some(5))).is_err_and(|e| e.contains("no global model after round 4")));
        assert!(plan("p", &events(&h), &Request::default()).is_err_and(|e| e.contains("--from-round")));
    }

    #[test]
    fn the_fork_folds_to_the_parents_state_and_starts_its_next_round() {
        let h = History::created(4).started().initialized().round(1).round(2);
        let p = plan("p", &events(&h), &req(|r| r.from_round = Some(3))).expect("plans");
        let created = crate::job::Job::default()
            .handle(crate::job::JobCommand::Create {
                job_id: "f".into(),
                name: p.name.clone(),
                source: p.source.clone(),
                spec: p.spec.clone(),
                tasks: p.tasks.clone(),
                fork: Some(Box::new(p.origin.clone())),
            })
            .expect("create");
        assert!(matches!(&created[..], [JobEvent::JobCreated { .. }, JobEvent::JobForked(o)] if o.model == "m2"));
        let job = crate::job::Job::from_events(&created);
        assert_eq!((job.global_model.as_deref(), job.rounds_completed, job.round_open()), (Some("m2"), 2, false));
        let running = History { events: created }.started().job();
        assert_eq!((running.global_model.as_deref(), running.rounds_completed), (Some("m2"), 2), "placing and deploying keep it");
        let started = running.handle(crate::job::JobCommand::StartRound { now_ms: 0, spent: Default::default() }).expect("round");
        assert!(matches!(&started[0], JobEvent::RoundStarted { round: 3, global_model, .. } if global_model == "m2"), "{started:?}");
    }

    #[test]
    fn unlearning_a_worker_forks_before_its_first_update_and_leaves_it_out() {
        // t1 first reports in round 2 (it sat out round 1).
        let mut h = History::created(3).started().initialized().round_started(1).then(update(1, "t0"));
        h = h.then(JobEvent::RoundAggregated {
            round: 1,
            digest: "m1".into(),
            inputs: vec!["u1t0".into()],
            metrics: Metrics::new(),
            optimizer_state: None,
        });
        let h = h.round(2);
        let p = plan("p", &events(&h), &req(|r| r.unlearn = vec!["w-t1".into()])).expect("plans");
        assert_eq!((p.origin.from_round, p.origin.model.as_str()), (2, "m1"));
        assert_eq!(p.origin.excluded, vec!["t1".to_string()]);
        assert!(p.tasks.iter().all(|t| t.task_id != "t1"));
        let late = plan(
            "p",
            &events(&h),
            &req(|r| {
                r.unlearn = vec!["t1".into()];
                r.from_round = Some(3);
            }),
        );
        assert!(late.is_err_and(|e| e.contains("after the first update to unlearn (round 2)")));
        assert!(
            plan("p", &events(&h), &req(|r| r.exclude = vec!["nobody".into()]))
                .is_err_and(|e| e.contains("no trainer task or worker named 'nobody'"))
        );
        assert!(
            plan(
                "p",
                &events(&h),
                &req(|r| {
                    r.exclude = vec!["agg".into()];
                    r.from_round = Some(1);
                })
            )
            .is_err_and(|e| e.contains("only trainers"))
        );
        assert!(
            plan(
                "p",
                &events(&h),
                &req(|r| {
                    r.exclude = vec!["t0".into(), "t1".into()];
                    r.from_round = Some(1);
                })
            )
            .is_err_and(|e| e.contains("no trainer"))
        );
    }

    #[test]
    fn settings_change_through_the_same_checks() {
        let h = History::created(2).started().initialized().round(1);
        let p = plan(
            "p",
            &events(&h),
            &req(|r| {
                r.from_round = Some(2);
                r.set = json!({"rounds": 4, "learningRate": 0.5}).as_object().cloned().expect("map");
            }),
        )
        .expect("plans");
        assert_eq!((p.spec.rounds, p.spec.training.learning_rate), (4, 0.5));
        assert_eq!(p.spec.hyperparameters["rounds"], 4);
        assert_eq!(p.origin.changed["learningRate"], 0.5);
        let bad = |set: Value| {
            plan(
                "p",
                &events(&h),
                &req(|r| {
                    r.from_round = Some(2);
                    r.set = set.as_object().cloned().expect("map");
                }),
            )
        };
        assert!(bad(json!({"hidden": [8]})).is_err_and(|e| e.contains("may change only")));
        assert!(bad(json!({"rounds": 0})).is_err_and(|e| e.contains("rounds")));
        assert!(bad(json!({"learningRate": -1})).is_err_and(|e| e.contains("learningRate")));
    }
}
