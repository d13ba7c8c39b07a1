//! The privacy ledger: what each job spent on each dataset, from the jobs'
//! states. Pure. A trainer's update with noise is one run of the Gaussian
//! mechanism on its dataset (q = 1, the job's noise multiplier); an update
//! without noise releases the data without bound, so it counts as a run with
//! no noise (ε = ∞) for a dataset anyone budgets.

use flame_events::job::PrivacyBudget;

use crate::accountant::{Runs, default_orders, epsilon};
use crate::job::Job;

/// The runs a job made on each of its datasets (dataset URL, runs).
pub fn runs_of(job: &Job) -> Vec<(String, Runs)> {
    let Some(spec) = &job.spec else { return Vec::new() };
    let z = spec.training.privacy.map_or(0.0, |p| p.noise_factor);
    let mut out: Vec<(String, Runs)> = Vec::new();
    for t in job.trainers() {
        let (Some(dataset), Some(&steps)) = (t.dataset.as_ref(), job.records.updates_made.get(&t.task_id)) else { continue };
        match out.iter_mut().find(|(d, _)| d == dataset) {
            Some((_, r)) => r.steps += steps,
            None => out.push((dataset.clone(), Runs { q: 1.0, z, steps })),
        }
    }
    out.retain(|(_, r)| r.steps > 0);
    out
}

/// One job's line in a dataset's ledger.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Entry {
    /// The job.
    pub job_id: String,
    /// Its name.
    pub name: String,
    /// Its noise multiplier (0: no noise).
    pub noise_multiplier: f64,
    /// Updates it made on the dataset.
    pub updates: u64,
    /// ε of its updates alone, at the ledger's δ.
    pub epsilon: f64,
    /// ε of every job up to and including this one.
    pub cumulative: f64,
    /// Rounds in which a trainer of it sat out for the budget.
    pub refused: Vec<u32>,
}

/// A dataset's ledger over `jobs` (oldest first), at `delta`.
pub fn ledger(dataset: &str, jobs: &[Job], refused: &[(String, u32)], delta: f64) -> Vec<Entry> {
    let orders = default_orders();
    let mut all: Vec<Runs> = Vec::new();
    let mut out = Vec::new();
    for job in jobs {
        let mine: Vec<Runs> = runs_of(job).into_iter().filter(|(d, _)| d == dataset).map(|(_, r)| r).collect();
        let rounds: Vec<u32> = refused.iter().filter(|(j, _)| *j == job.job_id).map(|(_, r)| *r).collect();
        if mine.is_empty() && rounds.is_empty() {
            continue;
        }
        all.extend(mine.iter().copied());
        out.push(Entry {
            job_id: job.job_id.clone(),
            name: job.name.clone(),
            noise_multiplier: mine.first().map_or(0.0, |r| r.z),
            updates: mine.iter().map(|r| r.steps).sum(),
            epsilon: epsilon(&mine, delta, &orders).0,
            cumulative: epsilon(&all, delta, &orders).0,
            refused: rounds,
        });
    }
    out
}

/// The budget the newest job that declares one gives `dataset`.
pub fn budget(dataset: &str, jobs: &[Job]) -> Option<PrivacyBudget> {
    jobs.iter().rev().find_map(|j| j.spec.as_ref()?.privacy_budgets.get(dataset).copied())
}

#[cfg(test)]
mod tests {
    use flame_events::algorithm::Privacy;
    use flame_events::job::{JobEvent, Metrics};

    use super::*;
    use crate::testing::{History, update};

    /// A two-round job whose trainers train on `data` with noise `z`, budgeted at ε 10.
    fn job(id: &str, z: Option<f64>, rounds: u32, data: &str) -> Job {
        let mut h = History::created_with(rounds, |s| {
            s.training.privacy = z.map(|noise_factor| Privacy { clip_threshold: 1.0, noise_factor });
            s.privacy_budgets.insert(data.into(), PrivacyBudget { epsilon: 10.0, delta: 1e-5 });
        });
        if let JobEvent::JobCreated { job_id, tasks, .. } = &mut h.events[0] {
            *job_id = id.into();
            for t in tasks.iter_mut().filter(|t| t.is_data_consumer) {
                t.dataset = Some(data.into());
            }
        }
        let mut h = h.started().initialized();
        for r in 1..=rounds {
            h = h.round_started(r).then(update(r, "t0")).then(update(r, "t1")).then(JobEvent::RoundAggregated {
                round: r,
                digest: format!("m{r}"),
                inputs: vec![],
                metrics: Metrics::new(),
                optimizer_state: None,
            });
        }
        h.job()
    }

    #[test]
    fn each_update_with_noise_is_one_run_and_jobs_add_up() {
        let a = job("a", Some(2.0), 2, "d.csv");
        assert_eq!(runs_of(&a), vec![("d.csv".to_string(), Runs { q: 1.0, z: 2.0, steps: 4 })]);
        let b = job("b", Some(2.0), 3, "d.csv");
        let other = job("c", Some(2.0), 3, "e.csv");
        let rows = ledger("d.csv", &[a.clone(), other, b.clone()], &[("b".into(), 3)], 1e-5);
        assert_eq!(rows.iter().map(|r| (r.job_id.as_str(), r.updates)).collect::<Vec<_>>(), vec![("a", 4), ("b", 6)]);
        let together = epsilon(&[Runs { q: 1.0, z: 2.0, steps: 10 }], 1e-5, &default_orders()).0;
        assert!((rows[1].cumulative - together).abs() < 1e-12 && rows[1].cumulative > rows[1].epsilon);
        assert_eq!(rows[1].refused, vec![3]);
        assert_eq!(budget("d.csv", &[a, b]).map(|b| b.epsilon), Some(10.0));
    }

    #[test]
    fn training_without_noise_spends_without_bound() {
        let plain = job("p", None, 1, "d.csv");
        let rows = ledger("d.csv", &[plain], &[], 1e-5);
        assert_eq!(rows[0].epsilon, f64::INFINITY);
    }

    #[test]
    fn a_round_that_would_overspend_is_refused_before_it_starts() {
        // z = 2: ε(δ=1e-5) passes 10 somewhere between 40 and 60 runs.
        let fresh = History::created_with(3, |s| {
            s.training.privacy = Some(Privacy { clip_threshold: 1.0, noise_factor: 2.0 });
            s.privacy_budgets.insert("builtin://digits?part=0&of=2".into(), PrivacyBudget { epsilon: 10.0, delta: 1e-5 });
            s.quorum = Some(1);
        })
        .started()
        .initialized();
        let job = fresh.job();
        let start = |spent: u64| {
            let spent = std::collections::BTreeMap::from([(
                "builtin://digits?part=0&of=2".to_string(),
                vec![Runs { q: 1.0, z: 2.0, steps: spent }],
            )]);
            job.handle(crate::job::JobCommand::StartRound { now_ms: 0, spent }).expect("start")
        };
        // Little spent elsewhere: both train.
        assert!(matches!(&start(1)[..], [JobEvent::RoundStarted { selected, .. }, _] if selected.is_empty()));
        // t0's dataset (part 0) is spent by other jobs: t0 sits out, t1 trains; the quorum of 1 holds.
        let events = start(200);
        match &events[..] {
            [
                JobEvent::PrivacyRefused { task_id, spent_epsilon, epsilon_after, budget, .. },
                JobEvent::RoundStarted { selected, .. },
                _,
            ] => {
                assert_eq!(task_id, "t0");
                assert!(*spent_epsilon <= *epsilon_after && *epsilon_after > budget.epsilon);
                assert_eq!(selected, &vec!["t1".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        // With a quorum of 2 the round cannot start: the job fails, saying why.
        let strict = History { events: fresh.events.clone() }.job();
        let mut strict = strict;
        if let Some(s) = strict.spec.as_mut() {
            std::sync::Arc::make_mut(s).quorum = Some(2);
        }
        let spent =
            std::collections::BTreeMap::from([("builtin://digits?part=0&of=2".to_string(), vec![Runs { q: 1.0, z: 2.0, steps: 200 }])]);
        let events = strict.handle(crate::job::JobCommand::StartRound { now_ms: 0, spent }).expect("start");
        assert!(
            matches!(&events[..], [JobEvent::PrivacyRefused { .. }, JobEvent::JobFailed { reason }] if reason.contains("privacy budgets")),
            "{events:?}"
        );
    }
}
