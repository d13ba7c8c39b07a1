//! `flamectl verify --models`.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;

use flame_events::job::JobEvent;
use flame_workers::weights;

use super::*;
use crate::Output;
use crate::export::Blobs;
use crate::inspect::Source;

/// One aggregation's check.
#[derive(Serialize)]
struct Checked {
    round: u32,
    aggregator: String,
    /// `round` (a global model) or `group` (a middle aggregator's).
    kind: &'static str,
    version: u64,
    inputs: usize,
    excluded: usize,
    recorded: String,
    rederived: Option<String>,
    ok: bool,
    problems: Vec<String>,
    /// What went in: task, worker (trainers' updates) and digest.
    input_blobs: Vec<serde_json::Value>,
}

/// `flamectl verify JOB --models`.
pub async fn verify(job_id: &str, source: &Source, blobs: &Blobs, output: Output) -> anyhow::Result<ExitCode> {
    let (events, aggs) = job_aggregations(job_id, source).await?;
    let rerun = Rerun::new(blobs.open().await?, None);
    let mut checked = Vec::new();
    for a in &aggs {
        let mut problems = rerun.unavailable(&needs(a)).await?;
        let mut rederived = None;
        if problems.is_empty() {
            match rerun.aggregate(&rerun_command(a, false, "verify")).await {
                Ok(out) => {
                    if out.digest != a.digest {
                        let why = match (rerun.state(&a.digest).await, rerun.state(&out.digest).await) {
                            (Ok(recorded), Ok(again)) => weights::first_difference(&recorded, &again).map_or_else(
                                || "the same tensors, written differently".to_string(),
                                |d| format!("first difference: {d} (recorded against re-derived)"),
                            ),
                            (Err(e), _) => format!("the recorded model cannot be read to compare: {e:#}"),
                            (_, Err(e)) => format!("{e:#}"),
                        };
                        problems.push(format!("the re-derived model differs from the recorded one; {why}"));
                    }
                    if a.top && a.optimizer_state.is_some() && out.optimizer_state != a.optimizer_state {
                        problems.push(format!(
                            "the optimizer state differs: recorded {}, re-derived {}",
                            a.optimizer_state.as_deref().unwrap_or("none"),
                            out.optimizer_state.as_deref().unwrap_or("none")
                        ));
                    }
                    rederived = Some(out.digest);
                }
                Err(e) => problems.push(format!("the aggregation could not run again: {e}")),
            }
        }
        checked.push(Checked {
            round: a.round,
            aggregator: a.task_id.clone(),
            kind: if a.top { "round" } else { "group" },
            version: a.version,
            inputs: a.used().len(),
            excluded: a.excluded.len(),
            recorded: a.digest.clone(),
            ok: problems.is_empty(),
            rederived,
            problems,
            input_blobs: a
                .used()
                .iter()
                .map(|u| serde_json::json!({"task": u.task_id, "worker": a.workers.get(&u.task_id), "digest": u.digest}))
                .collect(),
        });
    }
    // The final model is the last round's.
    let mut end_problems = Vec::new();
    if let Some((v, JobEvent::JobCompleted { final_model, .. })) =
        events.iter().rev().find(|(_, e)| matches!(e, JobEvent::JobCompleted { .. }))
    {
        let last = aggs.iter().rev().find(|a| a.top).map(|a| a.digest.as_str());
        if last != Some(final_model.as_str()) {
            end_problems.push(format!(
                "JobCompleted (v{v}) names the final model {final_model}, but the last round made {}",
                last.unwrap_or("none")
            ));
        }
    }
    let failed = checked.iter().filter(|c| !c.ok).count();
    match output {
        Output::Json => {
            for c in &checked {
                outln!("{}", serde_json::to_string(c)?)?;
            }
        }
        Output::Table => {
            outln!(
                "{:>5}  {:<20} {:>6} {:>8}  {:<14} {:<14} result",
                "round",
                "aggregator",
                "inputs",
                "excluded",
                "recorded",
                "re-derived"
            )?;
            for c in &checked {
                let short = |d: &str| d.chars().take(12).collect::<String>();
                outln!(
                    "{:>5}  {:<20} {:>6} {:>8}  {:<14} {:<14} {}",
                    c.round,
                    c.aggregator,
                    c.inputs,
                    c.excluded,
                    short(&c.recorded),
                    c.rederived.as_deref().map(short).unwrap_or_else(|| "-".into()),
                    if c.ok { "same bits" } else { "MISMATCH" }
                )?;
                for p in &c.problems {
                    outln!("       round {}, {}: {p}", c.round, c.aggregator)?;
                }
                if !c.ok {
                    let inputs: Vec<String> = c
                        .input_blobs
                        .iter()
                        .map(|i| {
                            format!(
                                "{} {}",
                                i["task"].as_str().unwrap_or("?"),
                                i["digest"].as_str().unwrap_or("?").chars().take(12).collect::<String>()
                            )
                        })
                        .collect();
                    outln!("       its inputs: {}", inputs.join(", "))?;
                }
            }
        }
    }
    for p in &end_problems {
        eprintln!("verify: {p}");
    }
    let groups = checked.iter().filter(|c| c.kind == "group").count();
    let updates: usize = aggs.iter().map(|a| a.used().len()).sum();
    if failed > 0 || !end_problems.is_empty() {
        let first = checked.iter().find(|c| !c.ok);
        eprintln!(
            "verify: job '{job_id}': {failed} of {} aggregation(s) do not re-derive{}",
            checked.len(),
            first.map(|c| format!("; the first is round {} ({}): {}", c.round, c.aggregator, c.problems.join("; "))).unwrap_or_default()
        );
        return Ok(ExitCode::from(6));
    }
    eprintln!(
        "verify: job '{job_id}': all {} aggregation(s) ({} round(s), {groups} group(s)) re-derived bit for bit from {updates} logged update(s); trainers were not re-run (their updates are the logged blobs)",
        checked.len(),
        checked.len() - groups
    );
    Ok(ExitCode::SUCCESS)
}
