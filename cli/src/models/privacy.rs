//! `flamectl privacy`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;

use flame_events::job::JobEvent;

use crate::Output;
use crate::inspect::{Events, Source};

/// `flamectl privacy DATASET`: the privacy each job spent on a dataset (its
/// URL as the jobs name it), in order, with the budget and what is left.
pub async fn privacy(dataset: &str, source: &Source, delta: Option<f64>, output: Output) -> anyhow::Result<ExitCode> {
    let events = Events::open(source).await?;
    let mut jobs = Vec::new();
    let mut refused: Vec<(String, u32)> = Vec::new();
    for id in events.job_ids().await? {
        let envelopes = events.read(&id, 1).await?;
        let decoded = envelopes.iter().map(JobEvent::from_envelope).collect::<Result<Vec<_>, _>>()?;
        for e in &decoded {
            if let JobEvent::PrivacyRefused { round, dataset: d, .. } = e
                && d == dataset
            {
                refused.push((id.clone(), *round));
            }
        }
        jobs.push(flame_engine::job::Job::from_events(&decoded));
    }
    let budget = flame_engine::ledger::budget(dataset, &jobs);
    let Some(delta) = delta.or(budget.map(|b| b.delta)) else {
        bail!("no job gives dataset '{dataset}' a privacy budget: say at which delta to count with --delta (e.g. 1e-5)");
    };
    let rows = flame_engine::ledger::ledger(dataset, &jobs, &refused, delta);
    let total = rows.last().map_or(0.0, |r| r.cumulative);
    match output {
        Output::Json => {
            for r in &rows {
                outln!("{}", serde_json::to_string(r)?)?;
            }
            outln!("{}", serde_json::json!({"dataset": dataset, "delta": delta, "spent": total, "budget": budget.map(|b| b.epsilon)}))?;
        }
        Output::Table => {
            outln!("privacy ledger of {dataset} (epsilon at delta {delta:e}; RDP accounting, one Gaussian run per noised update)")?;
            outln!(
                "{:<38} {:<24} {:>6} {:>8} {:>9} {:>11}  refused in rounds",
                "job",
                "name",
                "noise",
                "updates",
                "epsilon",
                "cumulative"
            )?;
            for r in &rows {
                let refused = r.refused.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                outln!(
                    "{:<38} {:<24} {:>6.2} {:>8} {:>9.3} {:>11.3}  {}",
                    r.job_id,
                    r.name,
                    r.noise_multiplier,
                    r.updates,
                    r.epsilon,
                    r.cumulative,
                    if refused.is_empty() { "-".to_string() } else { refused }
                )?;
            }
            match budget {
                Some(b) => {
                    outln!("spent {total:.3} of a budget of {} (delta {:e}): {:.3} left", b.epsilon, b.delta, (b.epsilon - total).max(0.0))?
                }
                None => outln!("spent {total:.3}; no job gives this dataset a budget")?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
