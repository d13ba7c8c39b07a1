//! Contribution of each participant to a round's gain: leave-one-out and a
//! Shapley estimate, by GTG-Shapley (Liu et al., "GTG-Shapley: Efficient and
//! Accurate Participant Contribution Evaluation in Federated Learning", ACM
//! TIST 2022). Pure: the utility of a set of participants (for a round, the
//! held-out accuracy of the model aggregated from their updates) is a
//! function the caller gives.
//!
//! GTG-Shapley samples permutations of the participants and averages each
//! one's marginal gain where it joins. Three things keep it cheap:
//! - between rounds: a round whose gain `v(N) - v(∅)` is within
//!   `between` of zero gives everyone 0, with no sampling;
//! - within a permutation: once a prefix's utility is within `within` of
//!   `v(N)`, the participants after it get 0 without evaluating;
//! - guided sampling: permutation k starts with participant k mod n, so every
//!   participant is first equally often.
//!
//! It stops when the estimates settle (the mean relative change over the last
//! n permutations is below `tolerance`) or after `max_permutations`. Utilities
//! are cached by set: n participants cost at most 2^n evaluations however
//! many permutations are drawn. Each permutation's marginals add up to the
//! utility where it was truncated, so the estimates add up to the round's gain
//! within `within` (efficiency).

use std::collections::HashMap;

use flame_events::rng::SplitMix;

/// The estimator's knobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// A round whose gain is within this of zero gives everyone 0.
    pub between: f64,
    /// A permutation stops evaluating once its prefix is within this of the full set's utility.
    pub within: f64,
    /// Stop when the mean relative change of the estimates over the last n permutations is below this.
    pub tolerance: f64,
    /// Permutations at most.
    pub max_permutations: usize,
    /// Seed of the permutations.
    pub seed: u64,
    /// Up to this many participants the values are exact (every one of the
    /// 2^n sets evaluated) rather than estimated.
    pub exact_up_to: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self { between: 1e-3, within: 1e-3, tolerance: 0.002, max_permutations: 2000, seed: 0x005a_41e7, exact_up_to: 6 }
    }
}

/// One round's contributions.
#[derive(Clone, Debug, PartialEq)]
pub struct Contributions {
    /// Utility of no participant (the model the round started from).
    pub empty: f64,
    /// Utility of all of them (the round's model).
    pub full: f64,
    /// Shapley estimate per participant, in input order.
    pub shapley: Vec<f64>,
    /// Leave-one-out per participant: `v(N) - v(N \ {i})`.
    pub leave_one_out: Vec<f64>,
    /// Permutations sampled (0: the values are exact, or the round had no gain).
    pub permutations: usize,
    /// Distinct sets whose utility was evaluated.
    pub evaluations: usize,
}

/// The contributions of `n` participants, `utility` giving the value of a set
/// (participant indices, ascending).
pub fn contributions<E>(n: usize, settings: &Settings, mut utility: impl FnMut(&[usize]) -> Result<f64, E>) -> Result<Contributions, E> {
    let mut cache: HashMap<Vec<usize>, f64> = HashMap::new();
    let mut value = |set: &[usize]| -> Result<f64, E> {
        let mut key = set.to_vec();
        key.sort_unstable();
        if let Some(v) = cache.get(&key) {
            return Ok(*v);
        }
        let v = utility(&key)?;
        cache.insert(key, v);
        Ok(v)
    };
    let all: Vec<usize> = (0..n).collect();
    let empty = value(&[])?;
    let full = value(&all)?;
    let mut leave_one_out = Vec::with_capacity(n);
    for i in 0..n {
        let others: Vec<usize> = all.iter().copied().filter(|&j| j != i).collect();
        leave_one_out.push(full - value(&others)?);
    }
    let mut shapley = vec![0.0; n];
    let mut permutations = 0;
    if n > 0 && n <= settings.exact_up_to && (full - empty).abs() > settings.between {
        shapley = exact(n, |set| value(set))?;
    } else if n > 0 && (full - empty).abs() > settings.between {
        let mut rng = SplitMix::new(settings.seed);
        let mut changes: Vec<f64> = Vec::new();
        while permutations < settings.max_permutations.max(n) {
            // Guided: participant k mod n first, the rest shuffled.
            let first = permutations % n;
            let mut rest: Vec<usize> = all.iter().copied().filter(|&j| j != first).collect();
            rng.shuffle(&mut rest);
            let order: Vec<usize> = std::iter::once(first).chain(rest).collect();
            let before = shapley.clone();
            permutations += 1;
            let k = permutations as f64;
            let mut prefix: Vec<usize> = Vec::with_capacity(n);
            let mut last = empty;
            for &p in &order {
                let marginal = if (full - last).abs() < settings.within {
                    0.0
                } else {
                    prefix.push(p);
                    let v = value(&prefix)?;
                    let m = v - last;
                    last = v;
                    m
                };
                if !prefix.contains(&p) {
                    prefix.push(p);
                }
                shapley[p] += (marginal - shapley[p]) / k;
            }
            let size: f64 = shapley.iter().map(|v| v.abs()).sum();
            let moved: f64 = shapley.iter().zip(&before).map(|(a, b)| (a - b).abs()).sum();
            changes.push(if size > 0.0 { moved / size } else { 0.0 });
            if permutations >= 2 * n && changes[changes.len() - n..].iter().sum::<f64>() / (n as f64) < settings.tolerance {
                break;
            }
        }
    }
    Ok(Contributions { empty, full, shapley, leave_one_out, permutations, evaluations: cache.len() })
}

/// The exact Shapley values from every subset's utility (2^n evaluations):
/// the reference the estimate is checked against.
pub fn exact<E>(n: usize, mut utility: impl FnMut(&[usize]) -> Result<f64, E>) -> Result<Vec<f64>, E> {
    let mut values = vec![0.0; 1 << n];
    for (mask, slot) in values.iter_mut().enumerate() {
        let set: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
        *slot = utility(&set)?;
    }
    let factorial = |k: usize| (1..=k).map(|x| x as f64).product::<f64>();
    let mut out = vec![0.0; n];
    for (i, slot) in out.iter_mut().enumerate() {
        for mask in 0..(1usize << n) {
            if mask & (1 << i) != 0 {
                continue;
            }
            let s = mask.count_ones() as usize;
            let weight = factorial(s) * factorial(n - s - 1) / factorial(n);
            *slot += weight * (values[mask | (1 << i)] - values[mask]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_err(v: f64) -> Result<f64, ()> {
        Ok(v)
    }

    #[test]
    fn an_additive_game_gives_each_its_own_weight() {
        let w = [0.3, 0.1, -0.05, 0.0];
        let mut calls = 0;
        let c = contributions(4, &Settings { exact_up_to: 0, within: 0.0, ..Settings::default() }, |s| {
            calls += 1;
            no_err(s.iter().map(|&i| w[i]).sum())
        })
        .expect("ok");
        for (i, want) in w.iter().enumerate() {
            assert!((c.shapley[i] - want).abs() < 1e-12, "{:?}", c.shapley);
            assert!((c.leave_one_out[i] - want).abs() < 1e-12);
        }
        assert!(c.permutations >= 8 && calls == c.evaluations && calls <= 16, "each set at most once: {calls} calls, {c:?}");
    }

    #[test]
    fn the_estimate_matches_the_exact_values_and_adds_up_to_the_gain() {
        // A saturating game (accuracy-like): redundant participants share credit, a harmful one loses it.
        let u = |s: &[usize]| {
            let good = s.iter().filter(|&&i| i < 3).count() as f64;
            let bad = if s.contains(&3) { 0.2 } else { 0.0 };
            no_err(0.1 + 0.8 * (1.0 - (-good).exp()) - bad)
        };
        let settings = Settings { within: 0.0, exact_up_to: 0, ..Settings::default() };
        let c = contributions(4, &settings, u).expect("ok");
        let want = exact(4, u).expect("ok");
        for (got, w) in c.shapley.iter().zip(&want) {
            assert!((got - w).abs() < 0.02, "{:?} against exact {want:?} after {} permutations", c.shapley, c.permutations);
        }
        // Up to `exact_up_to` participants they are exact.
        let small = contributions(4, &Settings::default(), u).expect("ok");
        assert_eq!((small.shapley, small.permutations, small.evaluations), (want, 0, 16));
        let total: f64 = c.shapley.iter().sum();
        assert!((total - (c.full - c.empty)).abs() < 1e-9, "efficiency: {total} against {}", c.full - c.empty);
        let lowest = (0..4).min_by(|&a, &b| c.shapley[a].total_cmp(&c.shapley[b])).expect("some");
        assert_eq!(lowest, 3, "the harmful participant scores lowest");
        assert!(c.leave_one_out[3] < 0.0);
    }

    #[test]
    fn a_round_without_gain_costs_two_evaluations_and_gives_zeros() {
        let mut calls = 0;
        let c = contributions(5, &Settings { exact_up_to: 0, ..Settings::default() }, |_| {
            calls += 1;
            no_err(0.5)
        })
        .expect("ok");
        assert_eq!(c.shapley, vec![0.0; 5]);
        assert_eq!(c.permutations, 0);
        // v(∅), v(N) and the five leave-one-out sets.
        assert_eq!(calls, 7);
    }

    #[test]
    fn truncation_skips_sets_once_a_prefix_reaches_the_full_utility() {
        // Anyone alone already gets everything: after the first, the rest are 0 and never evaluated.
        let c = contributions(6, &Settings { exact_up_to: 0, ..Settings::default() }, |s| no_err(if s.is_empty() { 0.0 } else { 1.0 }))
            .expect("ok");
        let total: f64 = c.shapley.iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(c.shapley.iter().all(|v| (v - 1.0 / 6.0).abs() < 0.05), "guided sampling shares it: {:?}", c.shapley);
        // ∅, N, six leave-one-out sets and the six singletons, no other set.
        assert_eq!(c.evaluations, 14);
    }
}
