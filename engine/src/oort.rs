//! Oort's participant selection (Lai et al., OSDI 2021), as a pure function:
//! mostly exploit the trainers whose recent updates were most useful per
//! second, keep exploring ones never tried, and over-commit so that a round
//! can close at `aggr_num` updates without waiting for the slowest.
//!
//! - Statistical utility of trainer i: `n_i * loss_i` (samples times its last
//!   mean training loss: Oort's `|B_i| sqrt(mean loss^2)` with the loss it reports),
//!   plus the staleness bonus `sqrt(0.1 ln r / last_i)` for a trainer last
//!   heard from in round `last_i`.
//! - System utility: a trainer slower than the preferred duration `T` (here
//!   the median of the known training times) is scaled by `(T / t_i)^alpha`, alpha = 2.
//! - Exploration share `eps = max(0.9 * 0.98^(r-1), 0.2)` of the picks go to
//!   never-tried trainers at random; the rest are drawn, with probability
//!   proportional to utility, from the trainers within 95% of the cut-off
//!   utility.
//! - Over-commitment: `ceil(1.3 * aggr_num)` trainers are picked; the round
//!   closes at `aggr_num` updates.

use std::collections::BTreeMap;

/// What is known of a trainer from its last accepted update.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Samples it trained on.
    pub samples: u64,
    /// Its mean training loss.
    pub loss: f64,
    /// Seconds its training took (as the worker measured), if reported.
    pub seconds: Option<f64>,
    /// The round it last delivered an update in.
    pub last_round: u32,
}

pub use flame_events::algorithm::over_commit;
use flame_events::rng::SplitMix;

/// Each explored trainer's utility in round `round`.
pub fn utilities(stats: &BTreeMap<String, Stats>, round: u32) -> BTreeMap<String, f64> {
    let mut times: Vec<f64> = stats.values().filter_map(|s| s.seconds).filter(|t| *t > 0.0).collect();
    times.sort_by(f64::total_cmp);
    let preferred = times.get(times.len() / 2).copied();
    stats
        .iter()
        .map(|(id, s)| {
            let statistical = s.samples as f64 * s.loss.max(0.0);
            let staleness = (0.1 * f64::from(round.max(1)).ln() / f64::from(s.last_round.max(1))).sqrt();
            let mut u = statistical + staleness;
            if let (Some(t), Some(preferred)) = (s.seconds, preferred)
                && t > preferred
            {
                u *= (preferred / t).powi(2);
            }
            (id.clone(), u)
        })
        .collect()
}

/// The trainers (of `candidates`) round `round` asks to train: `take` of them.
pub fn select(candidates: &[String], stats: &BTreeMap<String, Stats>, take: usize, seed: u64, round: u32) -> Vec<String> {
    let take = take.min(candidates.len());
    let mut rng = SplitMix::new(seed ^ u64::from(round).wrapping_mul(0xA076_1D64_78BD_642F));
    let eps = (0.9 * 0.98f64.powi(round.saturating_sub(1) as i32)).max(0.2);
    let util = utilities(stats, round);
    let (mut explored, mut fresh): (Vec<&String>, Vec<&String>) = candidates.iter().partition(|c| util.contains_key(*c));
    let explore = ((eps * take as f64).round() as usize).min(fresh.len());
    let exploit = (take - explore).min(explored.len());
    let mut out: Vec<String> = Vec::with_capacity(take);
    // Exploitation: proportional to utility among those within 95% of the cut-off.
    explored.sort_by(|a, b| util[*b].total_cmp(&util[*a]).then_with(|| a.cmp(b)));
    if exploit > 0 {
        let cutoff = 0.95 * util[explored[exploit - 1]];
        let mut pool: Vec<&String> = explored.iter().copied().filter(|c| util[*c] >= cutoff).collect();
        for _ in 0..exploit {
            if pool.is_empty() {
                break;
            }
            let total: f64 = pool.iter().map(|c| util[*c].max(1e-12)).sum();
            let mut at = rng.unit() * total;
            let mut pick = pool.len() - 1;
            for (i, c) in pool.iter().enumerate() {
                at -= util[*c].max(1e-12);
                if at <= 0.0 {
                    pick = i;
                    break;
                }
            }
            out.push(pool.remove(pick).clone());
        }
    }
    // Exploration (and any shortfall): never-tried trainers at random, then the best of the rest.
    for _ in 0..explore {
        let i = (rng.next_u64() % fresh.len() as u64) as usize;
        out.push(fresh.remove(i).clone());
    }
    let short = take - out.len();
    let rest: Vec<String> = explored.iter().copied().filter(|c| !out.contains(*c)).chain(fresh).take(short).cloned().collect();
    out.extend(rest);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i:02}")).collect()
    }

    fn stat(samples: u64, loss: f64, seconds: f64, last_round: u32) -> Stats {
        Stats { samples, loss, seconds: Some(seconds), last_round }
    }

    #[test]
    fn over_commits_by_thirty_percent() {
        assert_eq!(over_commit(10), 13);
        assert_eq!(over_commit(3), 4);
        assert_eq!(over_commit(1), 2);
    }

    #[test]
    fn the_first_round_explores_at_random_and_picks_are_reproducible() {
        let all = ids(20);
        let a = select(&all, &BTreeMap::new(), 5, 7, 1);
        assert_eq!(a.len(), 5);
        assert_eq!(a, select(&all, &BTreeMap::new(), 5, 7, 1), "same seed and round, same pick");
        assert_ne!(a, select(&all, &BTreeMap::new(), 5, 8, 1), "another seed, another pick");
        let mut unique = a.clone();
        unique.dedup();
        assert_eq!(unique.len(), 5);
    }

    #[test]
    fn useful_fast_trainers_are_exploited_and_slow_ones_penalised() {
        // Ten trainers tried: t00..t04 have high loss (useful), t05..t09 low loss.
        let all = ids(20);
        let mut stats = BTreeMap::new();
        for (i, id) in all.iter().take(10).enumerate() {
            let loss = if i < 5 { 2.0 } else { 0.1 };
            stats.insert(id.clone(), stat(100, loss, 1.0, 9));
        }
        // Late in the job exploration is at its floor (20%): of 5 picks, 4 exploit.
        let picks = select(&all, &stats, 5, 3, 80);
        let exploited: Vec<&String> = picks.iter().filter(|p| stats.contains_key(*p)).collect();
        assert_eq!(exploited.len(), 4, "{picks:?}");
        assert!(exploited.iter().all(|p| p.as_str() < "t05"), "the high-loss trainers win: {picks:?}");

        // Make three useful ones 10x slower than the median: their utility drops 100x.
        for id in all.iter().take(3) {
            stats.get_mut(id).expect("stat").seconds = Some(10.0);
        }
        let u = utilities(&stats, 80);
        assert!(u["t00"] < u["t05"], "slow and useful {} < fast and less useful {}", u["t00"], u["t05"]);
    }

    #[test]
    fn extreme_reports_still_give_a_full_pick() {
        let all = ids(6);
        let mut stats = BTreeMap::new();
        stats.insert("t00".to_string(), stat(u64::MAX, f64::MAX, 1.0, 1));
        stats.insert("t01".to_string(), stat(10, -5.0, 0.0, 1));
        stats.insert("t02".to_string(), stat(0, 0.0, f64::MAX, 1));
        for round in [1, 50, 500] {
            let picks = select(&all, &stats, 4, 1, round);
            assert_eq!(picks.len(), 4, "round {round}: {picks:?}");
        }
    }

    #[test]
    fn exploration_decays_to_its_floor() {
        let all = ids(40);
        let mut stats = BTreeMap::new();
        for id in all.iter().take(20) {
            stats.insert(id.clone(), stat(100, 1.0, 1.0, 1));
        }
        let fresh = |round: u32| select(&all, &stats, 10, 1, round).iter().filter(|p| !stats.contains_key(*p)).count();
        assert_eq!(fresh(1), 9, "round 1: 90% explore");
        assert_eq!(fresh(200), 2, "late: 20% explore");
    }
}
