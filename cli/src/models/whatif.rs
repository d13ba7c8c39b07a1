//! `flamectl whatif`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use serde::Serialize;

use flame_engine::rederive::Aggregation;
use flame_events::algorithm::ServerOptimizer;
use flame_events::job::JobEvent;
use flame_events::protocol::CommandBody;

use super::*;
use crate::Output;
use crate::export::Blobs;
use crate::inspect::Source;

/// What `flamectl whatif` changes.
pub struct WhatIf {
    /// The top aggregator's rule instead of the job's.
    pub optimizer: Option<ServerOptimizer>,
    /// Tasks or workers whose updates are left out.
    pub exclude: Vec<String>,
    /// Folders the evaluation data may be read from.
    pub roots: Vec<std::path::PathBuf>,
    /// Draw accuracy and loss beside the real run's here.
    pub plot: Option<std::path::PathBuf>,
}

/// One round of the counterfactual run beside the real one.
#[derive(Serialize)]
struct Compared {
    round: u32,
    /// Updates that entered the counterfactual model.
    updates: usize,
    real_model: String,
    whatif_model: String,
    /// Whether the two models are the same bits.
    same: bool,
    real: flame_events::job::Metrics,
    whatif: flame_events::job::Metrics,
}

/// `flamectl whatif JOB --optimizer R [--exclude task|worker ...]`: the job's
/// logged updates aggregated again with another rule, or without some
/// trainers, each counterfactual global model evaluated on the held-out split.
/// Trainers are not run again: a round's updates are the ones recorded,
/// trained from the real global model; where the counterfactual model differs,
/// each update's change (the update less the model it trained from) is applied
/// to the counterfactual model instead.
pub async fn whatif(job_id: &str, source: &Source, blobs: &Blobs, change: &WhatIf, output: Output) -> anyhow::Result<ExitCode> {
    let (events, aggs) = job_aggregations(job_id, source).await?;
    let Some(real) = aggs.iter().find(|a| a.top).map(|a| match &a.command.body {
        CommandBody::Aggregate { optimizer, .. } => *optimizer,
        _ => ServerOptimizer::FedAvg,
    }) else {
        bail!("job '{job_id}' has no aggregated round yet: nothing to compare");
    };
    let rule = change.optimizer.unwrap_or(real);
    if rule.is_asynchronous() != real.is_asynchronous() {
        bail!(
            "job '{job_id}' ran {} rounds with {}; a what-if keeps the rounds as they ran, so it takes {} rule",
            if real.is_asynchronous() { "asynchronous" } else { "synchronous" },
            real.name(),
            if real.is_asynchronous() { "FedBuff's (--optimizer fedbuff)" } else { "a synchronous" }
        );
    }
    if rule.keeps_client_state() && !real.keeps_client_state() {
        bail!("{} needs the trainers' states, which a job run with {} did not record", rule.name(), real.name());
    }
    let known: std::collections::BTreeSet<&str> =
        aggs.iter().flat_map(|a| a.updates().iter().map(|u| u.task_id.as_str()).chain(a.workers.values().map(String::as_str))).collect();
    if let Some(x) = change.exclude.iter().find(|x| !known.contains(x.as_str())) {
        bail!("--exclude {x}: no update of job '{job_id}' came from a task or worker of that name");
    }
    let roots = data_roots(&change.roots)?;
    let rerun = Rerun::new(blobs.open().await?, Some(roots));
    let excluded = |task: &str, a: &Aggregation| change.exclude.iter().any(|x| x == task || a.workers.get(task).is_some_and(|w| w == x));
    let mut world = Counterfactual::new(None);
    let mut rows = Vec::new();
    for a in &aggs {
        if let Some(top) = world.step(&rerun, a, rule, &excluded, "whatif").await? {
            rows.push(compared(a, &events, top.digest, top.updates, top.metrics));
        }
    }
    let what = format!(
        "{}{}",
        if rule == real { format!("{} (as the job ran)", rule.name()) } else { format!("{} instead of {}", rule.name(), real.name()) },
        if change.exclude.is_empty() { String::new() } else { format!(", without {}", change.exclude.join(", ")) }
    );
    let caveat = "trainers were not re-run: each round's updates are the recorded ones, trained from the real global models (where the what-if model differs, each update's change is applied to it)";
    let metric = |m: &flame_events::job::Metrics, k: &str| m.get(k).map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    match output {
        Output::Json => {
            for r in &rows {
                outln!("{}", serde_json::to_string(r)?)?;
            }
        }
        Output::Table => {
            outln!("what if job {job_id} had aggregated with {what}")?;
            outln!("{caveat}")?;
            outln!(
                "{:>5}  {:>8} {:>10} {:>10} {:>11} {:>12}  model",
                "round",
                "updates",
                "real acc",
                "whatif acc",
                "real loss",
                "whatif loss"
            )?;
            for r in &rows {
                outln!(
                    "{:>5}  {:>8} {:>10} {:>10} {:>11} {:>12}  {}",
                    r.round,
                    r.updates,
                    metric(&r.real, "accuracy"),
                    metric(&r.whatif, "accuracy"),
                    metric(&r.real, "loss"),
                    metric(&r.whatif, "loss"),
                    if r.same { "same bits" } else { "differs" }
                )?;
            }
        }
    }
    if let Some(path) = &change.plot {
        let series =
            |f: &dyn Fn(&Compared) -> Option<f64>| rows.iter().filter_map(|r| f(r).map(|v| (f64::from(r.round), v))).collect::<Vec<_>>();
        crate::plot::lines(
            path,
            &format!("job {job_id}: what if {what}"),
            &[
                ("real accuracy", series(&|r| r.real.get("accuracy").copied())),
                ("what-if accuracy", series(&|r| r.whatif.get("accuracy").copied())),
                ("real loss", series(&|r| r.real.get("loss").copied())),
                ("what-if loss", series(&|r| r.whatif.get("loss").copied())),
            ],
        )?;
        eprintln!("whatif: wrote {}", path.display());
    }
    if output == Output::Json {
        eprintln!("whatif: {caveat}");
    }
    Ok(ExitCode::SUCCESS)
}

fn compared(
    a: &Aggregation,
    events: &[(u64, JobEvent)],
    whatif_model: String,
    updates: usize,
    whatif: flame_events::job::Metrics,
) -> Compared {
    let real = events
        .iter()
        .find_map(|(v, e)| match e {
            JobEvent::RoundAggregated { metrics, .. } if *v == a.version => Some(metrics.clone()),
            _ => None,
        })
        .unwrap_or_default();
    Compared { round: a.round, updates, same: whatif_model == a.digest, real_model: a.digest.clone(), whatif_model, real, whatif }
}
