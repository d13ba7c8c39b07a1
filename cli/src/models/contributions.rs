//! `flamectl contributions`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::Serialize;

use flame_engine::rederive::Aggregation;
use flame_events::algorithm::ServerOptimizer;
use flame_events::protocol::CommandBody;

use super::*;
use crate::Output;
use crate::export::Blobs;
use crate::inspect::Source;

/// One trainer's contribution to one round.
#[derive(Serialize)]
struct RoundShare {
    round: u32,
    task: String,
    worker: Option<String>,
    shapley: f64,
    leave_one_out: f64,
}

/// One trainer's contribution to the whole job.
#[derive(Serialize)]
struct JobShare {
    task: String,
    workers: Vec<String>,
    rounds: usize,
    shapley: f64,
    leave_one_out: f64,
}

/// `flamectl contributions JOB`: per round and over the job, each trainer's
/// share of the held-out accuracy gain (the loss's fall where the job reports
/// no accuracy): leave-one-out and Shapley values. A round's utility of a set
/// of trainers is the accuracy of the model the round's aggregations make
/// from their updates alone (the job's rule, the recorded optimizer state);
/// the round's gain is that of all of them less that of none (the model the
/// round started from). Values are exact up to six trainers a round and
/// GTG-Shapley estimates above ([`flame_engine::shapley`]); a job's value is
/// the sum of its rounds'. Trainers are not re-run.
pub async fn contributions(
    job_id: &str,
    source: &Source,
    blobs: &Blobs,
    roots: &[std::path::PathBuf],
    plot: Option<&std::path::Path>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    use flame_engine::shapley;
    let started = std::time::Instant::now();
    let (_, aggs) = job_aggregations(job_id, source).await?;
    let roots = data_roots(roots)?;
    let rerun = Rerun::new(blobs.open().await?, Some(roots));
    let handle = tokio::runtime::Handle::current();
    let mut rounds: std::collections::BTreeMap<u32, Vec<&Aggregation>> = Default::default();
    for a in &aggs {
        rounds.entry(a.round).or_default().push(a);
    }
    let mut shares: Vec<RoundShare> = Vec::new();
    let mut gains: Vec<serde_json::Value> = Vec::new();
    let (mut evaluations, mut permutations, mut metric) = (0usize, 0usize, "accuracy");
    for (round, of_round) in &rounds {
        let Some(top) = of_round.iter().find(|a| a.top) else { continue };
        let rule = match &top.command.body {
            CommandBody::Aggregate { optimizer, .. } => *optimizer,
            _ => ServerOptimizer::FedAvg,
        };
        let state = match &top.command.body {
            CommandBody::Aggregate { optimizer_state, .. } => optimizer_state.clone(),
            _ => None,
        };
        // The round's trainers: the tasks whose updates went into it (through groups too).
        let mut players: Vec<String> = of_round
            .iter()
            .flat_map(|a| a.used().into_iter().filter(|u| a.workers.contains_key(&u.task_id)).map(|u| u.task_id.clone()))
            .collect();
        players.sort();
        players.dedup();
        let utility = |set: &[usize]| -> anyhow::Result<f64> {
            let keep: std::collections::BTreeSet<&str> = set.iter().map(|&i| players[i].as_str()).collect();
            let out = tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let mut world = Counterfactual::new(state.clone());
                    let mut made = None;
                    for a in of_round {
                        let left_out = |task: &str, _: &Aggregation| !keep.contains(task);
                        if let Some(t) = world.step(&rerun, a, rule, &left_out, "contributions").await? {
                            made = Some(t);
                        }
                    }
                    made.context("the round has no top aggregation")
                })
            })?;
            match (out.metrics.get("accuracy"), out.metrics.get("loss")) {
                (Some(a), _) => Ok(*a),
                (None, Some(l)) => {
                    metric = "loss";
                    Ok(-l)
                }
                (None, None) => bail!("round {round}: the model was not evaluated (no held-out data readable here? see --data-root)"),
            }
        };
        let c = shapley::contributions(players.len(), &shapley::Settings::default(), utility)?;
        gains.push(serde_json::json!({"round": round, "gain": c.full - c.empty, "empty": c.empty, "full": c.full, "trainers": players.len(), "evaluations": c.evaluations, "permutations": c.permutations}));
        evaluations += c.evaluations;
        permutations += c.permutations;
        for (i, task) in players.iter().enumerate() {
            shares.push(RoundShare {
                round: *round,
                task: task.clone(),
                worker: top.workers.get(task).or_else(|| of_round.iter().find_map(|a| a.workers.get(task))).cloned(),
                shapley: c.shapley[i],
                leave_one_out: c.leave_one_out[i],
            });
        }
    }
    let mut totals: std::collections::BTreeMap<String, JobShare> = Default::default();
    for s in &shares {
        let t = totals.entry(s.task.clone()).or_insert_with(|| JobShare {
            task: s.task.clone(),
            workers: vec![],
            rounds: 0,
            shapley: 0.0,
            leave_one_out: 0.0,
        });
        t.rounds += 1;
        t.shapley += s.shapley;
        t.leave_one_out += s.leave_one_out;
        if let Some(w) = s.worker.as_ref().filter(|w| !t.workers.contains(w)) {
            t.workers.push(w.clone());
        }
    }
    let mut ranked: Vec<&JobShare> = totals.values().collect();
    ranked.sort_by(|a, b| b.shapley.total_cmp(&a.shapley));
    let gain = if metric == "loss" { "fall in held-out loss" } else { "held-out accuracy gain" };
    match output {
        Output::Json => {
            for s in &shares {
                outln!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({"round": s.round, "task": s.task, "worker": s.worker, "shapley": s.shapley, "leave_one_out": s.leave_one_out})
                    )?
                )?;
            }
            for g in &gains {
                outln!("{}", serde_json::to_string(&serde_json::json!({"round_gain": g}))?)?;
            }
            for t in &ranked {
                outln!("{}", serde_json::to_string(&serde_json::json!({"job": t}))?)?;
            }
        }
        Output::Table => {
            outln!("contributions to job {job_id}'s {gain}, summed over {} round(s)", rounds.len())?;
            outln!("{:<24} {:<24} {:>6} {:>10} {:>14}", "trainer", "worker(s)", "rounds", "shapley", "leave-one-out")?;
            for t in &ranked {
                outln!("{:<24} {:<24} {:>6} {:>10.4} {:>14.4}", t.task, t.workers.join(","), t.rounds, t.shapley, t.leave_one_out)?;
            }
        }
    }
    if let Some(path) = plot {
        let named: Vec<(String, Vec<(f64, f64)>)> = ranked
            .iter()
            .map(|t| {
                let mut sum = 0.0;
                let points = shares.iter().filter(|s| s.task == t.task).map(|s| {
                    sum += s.shapley;
                    (f64::from(s.round), sum)
                });
                (format!("{} (shapley, cumulative)", t.task), points.collect())
            })
            .collect();
        let named: Vec<(&str, Vec<(f64, f64)>)> = named.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
        crate::plot::lines(path, &format!("job {job_id}: each trainer's share of the {gain}"), &named)?;
        eprintln!("contributions: wrote {}", path.display());
    }
    eprintln!(
        "contributions: {evaluations} models aggregated and evaluated ({permutations} permutations sampled) in {:.1} s; exact Shapley values up to 6 trainers a round, GTG-Shapley estimates above; trainers were not re-run",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
