//! The coordinator's decision in coordinated topologies: which aggregator
//! each of the round's trainers uploads to. It balances the aggregators'
//! load by training samples (the largest trainers placed first, each on its
//! least-loaded candidate), and breaks ties differently each round so that
//! trainers of equal size rotate over the aggregators.

use std::collections::BTreeMap;

/// Trainer -> aggregator for `round`, from each trainer's candidate
/// aggregators and its last reported samples (unknown: the mean of the known, or 1).
pub fn pair(candidates: &BTreeMap<String, Vec<String>>, samples: &BTreeMap<String, u64>, round: u32) -> BTreeMap<String, String> {
    let known: Vec<u64> = candidates.keys().filter_map(|t| samples.get(t).copied()).collect();
    let fallback = if known.is_empty() { 1 } else { known.iter().sum::<u64>() / known.len() as u64 };
    let mut order: Vec<(&String, u64)> = candidates.keys().map(|t| (t, samples.get(t).copied().unwrap_or(fallback).max(1))).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut load: BTreeMap<&str, u64> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (t, n) in order {
        let options = &candidates[t];
        if options.is_empty() {
            continue;
        }
        let start = round as usize % options.len();
        let pick = (0..options.len())
            .map(|i| &options[(start + i) % options.len()])
            .min_by_key(|a| load.get(a.as_str()).copied().unwrap_or(0))
            .unwrap_or(&options[0]);
        *load.entry(pick.as_str()).or_default() += n;
        out.insert(t.clone(), pick.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_to(aggs: &[&str], trainers: &[&str]) -> BTreeMap<String, Vec<String>> {
        trainers.iter().map(|t| (t.to_string(), aggs.iter().map(|a| a.to_string()).collect())).collect()
    }

    #[test]
    fn balances_samples_over_the_aggregators() {
        let c = all_to(&["m0", "m1"], &["t0", "t1", "t2", "t3"]);
        let samples = BTreeMap::from([("t0".into(), 400), ("t1".into(), 100), ("t2".into(), 100), ("t3".into(), 200)]);
        let p = pair(&c, &samples, 1);
        let load = |m: &str| p.iter().filter(|(_, a)| a.as_str() == m).map(|(t, _)| samples[t]).sum::<u64>();
        assert_eq!((load("m0"), load("m1")), (400, 400));
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn equal_trainers_rotate_between_rounds_and_candidates_are_respected() {
        let c = all_to(&["m0", "m1"], &["t0", "t1"]);
        let (a, b) = (pair(&c, &BTreeMap::new(), 1), pair(&c, &BTreeMap::new(), 2));
        assert_ne!(a, b, "the pairing moves from round to round");
        assert_ne!(a["t0"], a["t1"], "one trainer each");
        let mut only = c.clone();
        only.insert("t1".into(), vec!["m1".into()]);
        for round in 1..5 {
            assert_eq!(pair(&only, &BTreeMap::new(), round)["t1"], "m1");
        }
    }
}
