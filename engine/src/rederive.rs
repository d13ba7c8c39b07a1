//! The aggregations a job's log records, each with the command that made it,
//! re-derived from the events: what `flamectl verify --models` runs again and
//! `flamectl whatif` runs with another rule. Pure: events in, commands out.
//!
//! The engine accepts an aggregator's report against the job's state just
//! before the report's events (the updates it excluded, then the group's or
//! round's aggregate); the aggregate command built from that same state holds
//! exactly the inputs the engine checked the report against: the global
//! model, the updates (with their base models and client states), the
//! optimizer and its state from the round before.

use std::collections::BTreeMap;

use flame_events::job::JobEvent;
use flame_events::protocol::{Command, CommandBody, UpdateRef};

use crate::controller::aggregate_command;
use crate::job::Job;

/// One recorded aggregation and the command that made it.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregation {
    /// Round number.
    pub round: u32,
    /// The aggregator task.
    pub task_id: String,
    /// Whether it made the round's global model (the top aggregator), not a group's.
    pub top: bool,
    /// Stream version of the recorded `RoundAggregated` / `GroupAggregated`.
    pub version: u64,
    /// The aggregate command, as built from the state the report was checked against.
    pub command: Command,
    /// The recorded result's digest.
    pub digest: String,
    /// The recorded optimizer state after it (top aggregations of optimizers that keep one).
    pub optimizer_state: Option<String>,
    /// Updates the aggregator left out (task, digest): they did not enter the result.
    pub excluded: Vec<(String, String)>,
    /// The trainers' update digests behind the result, as recorded.
    pub inputs: Vec<String>,
    /// Trainer task -> the worker whose update of this round it is.
    pub workers: BTreeMap<String, String>,
}

impl Aggregation {
    /// The updates that entered the result: the command's, less the excluded.
    pub fn used(&self) -> Vec<&UpdateRef> {
        self.updates().iter().filter(|u| !self.excluded.iter().any(|(t, d)| *t == u.task_id && *d == u.digest)).collect()
    }

    /// The command's updates.
    pub fn updates(&self) -> &[UpdateRef] {
        match &self.command.body {
            CommandBody::Aggregate { updates, .. } => updates,
            _ => &[],
        }
    }

    /// The global model the command starts from.
    pub fn global_model(&self) -> &str {
        match &self.command.body {
            CommandBody::Aggregate { global_model, .. } => global_model,
            _ => "",
        }
    }
}

/// Why a recorded aggregation could not be re-derived from the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Underivable {
    /// Stream version of the aggregated event.
    pub version: u64,
    /// Round.
    pub round: u32,
    /// Aggregator task.
    pub task_id: String,
    /// Why.
    pub reason: String,
}

/// Every aggregation of a job's log (events with their stream versions), in
/// log order, or the first that cannot be re-derived.
pub fn aggregations<'a>(events: impl IntoIterator<Item = (u64, &'a JobEvent)>) -> Result<Vec<Aggregation>, Underivable> {
    let mut job = Job::default();
    let mut out = Vec::new();
    // The state before a report's first event (its exclusions), and the exclusions so far.
    let mut before: Option<Job> = None;
    let mut excluded: Vec<(String, String)> = Vec::new();
    // Round -> trainer task -> worker, from the accepted updates.
    let mut workers: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    for (version, event) in events {
        match event {
            JobEvent::UpdateExcluded { task_id, digest, .. } => {
                before.get_or_insert_with(|| job.clone());
                excluded.push((task_id.clone(), digest.clone()));
            }
            JobEvent::UpdateReported { round, task_id, worker_id, .. } => {
                workers.entry(*round).or_default().insert(task_id.clone(), worker_id.clone());
            }
            _ => {}
        }
        let recorded = match event {
            JobEvent::RoundAggregated { round, digest, inputs, optimizer_state, .. } => {
                Some((*round, job.aggregator().map(|a| a.task_id.clone()).unwrap_or_default(), digest, inputs, optimizer_state.clone()))
            }
            JobEvent::GroupAggregated { round, task_id, digest, inputs, .. } => Some((*round, task_id.clone(), digest, inputs, None)),
            _ => None,
        };
        if let Some((round, task_id, digest, inputs, optimizer_state)) = recorded {
            let state = before.take().unwrap_or_else(|| job.clone());
            let fail = |reason: String| Underivable { version, round, task_id: task_id.clone(), reason };
            if state.round.number != round {
                return Err(fail(format!("the log's open round is {}, not {round}", state.round.number)));
            }
            let command = aggregate_command(&state, &task_id)
                .ok_or_else(|| fail(format!("no aggregate command for '{task_id}' follows from the job's state")))?;
            let top = state.aggregator().is_some_and(|a| a.task_id == task_id);
            out.push(Aggregation {
                round,
                task_id: task_id.clone(),
                top,
                version,
                command,
                digest: digest.clone(),
                optimizer_state,
                excluded: std::mem::take(&mut excluded),
                inputs: inputs.clone(),
                workers: workers.get(&round).cloned().unwrap_or_default(),
            });
        } else if !matches!(event, JobEvent::UpdateExcluded { .. }) {
            // A report whose exclusions led to no aggregate (the job failed): nothing to re-derive.
            before = None;
            excluded.clear();
        }
        job.apply(event);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use flame_events::algorithm::{AdaptiveRule as Rule, ServerOptimizer};
    use flame_events::job::Metrics;

    use super::*;
    use crate::testing::{History, update};

    fn pairs(h: &History) -> Vec<(u64, &JobEvent)> {
        h.events.iter().enumerate().map(|(i, e)| (i as u64 + 1, e)).collect()
    }

    fn digests(updates: &[&UpdateRef]) -> Vec<String> {
        updates.iter().map(|u| u.digest.clone()).collect()
    }

    #[test]
    fn each_round_is_re_derived_from_its_own_global_model_and_updates() {
        let h = History::created(3).started().initialized().round(1).round(2).round(3);
        let aggs = aggregations(pairs(&h)).expect("derivable");
        assert_eq!(aggs.len(), 3);
        for (i, a) in aggs.iter().enumerate() {
            let r = i as u32 + 1;
            assert_eq!((a.round, a.task_id.as_str(), a.top), (r, "agg", true));
            assert_eq!(a.global_model(), format!("m{}", r - 1), "round {r} starts from the model before it");
            assert_eq!(digests(&a.used()), vec![format!("u{r}t0"), format!("u{r}t1")]);
            assert_eq!(a.digest, format!("m{r}"));
            assert_eq!(a.command.id, format!("job-1/r{r}/aggregate"), "the very command the engine sends");
            assert_eq!(a.workers.get("t1").map(String::as_str), Some("w-t1"));
        }
    }

    #[test]
    fn adaptive_optimizer_state_is_carried_from_the_round_before() {
        let adam = ServerOptimizer::Adaptive { rule: Rule::Adam, eta: 0.1, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 };
        let mut h = History::created_with(2, |s| s.optimizer = adam).started().initialized();
        for r in 1..=2u32 {
            h = h.round_started(r).then(update(r, "t0")).then(update(r, "t1")).then(JobEvent::RoundAggregated {
                round: r,
                digest: format!("m{r}"),
                inputs: vec![format!("u{r}t0"), format!("u{r}t1")],
                metrics: Metrics::new(),
                optimizer_state: Some(format!("s{r}")),
            });
        }
        let aggs = aggregations(pairs(&h)).expect("derivable");
        let state_in = |a: &Aggregation| match &a.command.body {
            CommandBody::Aggregate { optimizer_state, optimizer, .. } => (optimizer_state.clone(), *optimizer),
            _ => panic!("aggregate"),
        };
        assert_eq!(state_in(&aggs[0]), (None, adam), "round 1 starts with no state");
        assert_eq!(state_in(&aggs[1]), (Some("s1".into()), adam), "round 2 gets round 1's state");
        assert_eq!(aggs[1].optimizer_state.as_deref(), Some("s2"));
    }

    #[test]
    fn excluded_updates_are_in_the_command_and_out_of_the_result() {
        let h = History::created(1)
            .started()
            .initialized()
            .round_started(1)
            .then(update(1, "t0"))
            .then(update(1, "t1"))
            .then(JobEvent::UpdateExcluded { round: 1, task_id: "t1".into(), digest: "u1t1".into(), reason: "NaN".into() })
            .then(JobEvent::RoundAggregated {
                round: 1,
                digest: "m1".into(),
                inputs: vec!["u1t0".into()],
                metrics: Metrics::new(),
                optimizer_state: None,
            });
        let aggs = aggregations(pairs(&h)).expect("derivable");
        assert_eq!(digests(&aggs[0].updates().iter().collect::<Vec<_>>()), vec!["u1t0", "u1t1"]);
        assert_eq!(digests(&aggs[0].used()), vec!["u1t0"]);
        assert_eq!(aggs[0].excluded, vec![("t1".to_string(), "u1t1".to_string())]);
    }

    #[test]
    fn hierarchical_rounds_re_derive_each_group_then_the_top() {
        use crate::testing::{handle, hierarchical_round, report};
        use flame_events::protocol::ReportBody;
        let aggregated =
            |d: &str| ReportBody::Aggregated { digest: d.into(), metrics: Metrics::new(), optimizer_state: None, excluded: vec![] };
        let mut h = hierarchical_round();
        for t in ["t0", "t1"] {
            h = h.then(update(1, t));
        }
        h = handle(h, report("m-eu", 1, aggregated("geu")));
        for t in ["t2", "t3"] {
            h = h.then(update(1, t));
        }
        h = handle(h, report("m-na", 1, aggregated("gna")));
        h = handle(h, report("top", 1, aggregated("m1")));
        assert!(matches!(h.events.last(), Some(JobEvent::RoundAggregated { .. })), "{:?}", h.events.last());
        let aggs = aggregations(pairs(&h)).expect("derivable");
        let seen: Vec<(&str, bool, Vec<String>, &str)> =
            aggs.iter().map(|a| (a.task_id.as_str(), a.top, digests(&a.used()), a.digest.as_str())).collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            seen,
            vec![
                ("m-eu", false, s(&["u1t0", "u1t1"]), "geu"),
                ("m-na", false, s(&["u1t2", "u1t3"]), "gna"),
                ("top", true, s(&["geu", "gna"]), "m1"),
            ],
            "each group from its trainers' updates, the top from the groups' models"
        );
        assert_eq!(aggs[2].inputs, s(&["u1t0", "u1t1", "u1t2", "u1t3"]), "the round's inputs are the trainers' updates");
    }
}
