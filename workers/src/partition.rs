//! Dealing a training split's rows to N parts: IID (round robin), label skew
//! by Dirichlet(alpha) (Hsu et al. 2019), and label shards (McMahan et al.
//! 2017: rows sorted by label, cut into shards, each part takes `shards`).
//! Every part computes the same deal from the seed, so parts are disjoint
//! and together cover the split.

use flame_events::rng::SplitMix;

/// How rows are dealt.
#[derive(Clone, Debug, PartialEq)]
pub enum Scheme {
    /// Round robin over the (shuffled) rows.
    Iid,
    /// Per class, proportions over the parts drawn from Dirichlet(alpha).
    Dirichlet {
        /// Concentration: small = skewed, large = near IID.
        alpha: f64,
    },
    /// Sorted by label, cut into `parts x shards` shards, `shards` per part.
    Shards {
        /// Shards per part.
        shards: usize,
    },
}

/// A Gamma(shape, 1) draw (Marsaglia and Tsang; boosted for shape < 1).
fn gamma(shape: f64, rng: &mut SplitMix) -> f64 {
    let uniform = |rng: &mut SplitMix| rng.unit_open();
    if shape < 1.0 {
        return gamma(shape + 1.0, rng) * uniform(rng).powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v > 0.0 && uniform(rng).ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// The rows (indexes into `labels`) of part `part` of `parts`.
pub fn deal(labels: &[i64], parts: usize, part: usize, scheme: &Scheme, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix::new(seed ^ 0xD1_5EA5E);
    match scheme {
        Scheme::Iid => (part..labels.len()).step_by(parts.max(1)).collect(),
        Scheme::Dirichlet { alpha } => {
            let mut classes: Vec<i64> = labels.to_vec();
            classes.sort_unstable();
            classes.dedup();
            let mut mine = Vec::new();
            for c in classes {
                let mut rows: Vec<usize> = (0..labels.len()).filter(|&r| labels[r] == c).collect();
                rng.shuffle(&mut rows);
                let draws: Vec<f64> = (0..parts).map(|_| gamma(*alpha, &mut rng).max(1e-300)).collect();
                let total: f64 = draws.iter().sum();
                // Cut points at the cumulative proportions: disjoint, covering.
                let cut = |k: usize| ((draws[..k].iter().sum::<f64>() / total) * rows.len() as f64).round() as usize;
                mine.extend_from_slice(&rows[cut(part).min(rows.len())..cut(part + 1).min(rows.len())]);
            }
            mine.sort_unstable();
            mine
        }
        Scheme::Shards { shards } => {
            let mut rows: Vec<usize> = (0..labels.len()).collect();
            rows.sort_by_key(|&r| (labels[r], r));
            let count = parts * shards.max(&1);
            let mut order: Vec<usize> = (0..count).collect();
            rng.shuffle(&mut order);
            let bound = |s: usize| s * rows.len() / count;
            let mut mine: Vec<usize> = order[part * shards.max(&1)..(part + 1) * shards.max(&1)]
                .iter()
                .flat_map(|&s| rows[bound(s)..bound(s + 1)].iter().copied())
                .collect();
            mine.sort_unstable();
            mine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000 rows of 10 classes in a shuffled order (as the digits train split is).
    fn labels() -> Vec<i64> {
        let mut labels: Vec<i64> = (0..1000).map(|i| (i % 10) as i64).collect();
        SplitMix::new(9).shuffle(&mut labels);
        labels
    }

    fn max_class_share(rows: &[usize], labels: &[i64]) -> f64 {
        let mut counts = [0usize; 10];
        for &r in rows {
            counts[labels[r] as usize] += 1;
        }
        *counts.iter().max().unwrap_or(&0) as f64 / rows.len().max(1) as f64
    }

    #[test]
    fn every_scheme_deals_disjoint_parts_that_cover_the_rows() {
        let labels = labels();
        for scheme in [Scheme::Iid, Scheme::Dirichlet { alpha: 0.1 }, Scheme::Dirichlet { alpha: 100.0 }, Scheme::Shards { shards: 2 }] {
            let mut all: Vec<usize> = (0..7).flat_map(|p| deal(&labels, 7, p, &scheme, 3)).collect();
            all.sort_unstable();
            assert_eq!(all, (0..labels.len()).collect::<Vec<_>>(), "{scheme:?}");
            assert_eq!(deal(&labels, 7, 2, &scheme, 3), deal(&labels, 7, 2, &scheme, 3), "{scheme:?} is seeded");
        }
    }

    #[test]
    fn small_alpha_and_shards_skew_labels_large_alpha_does_not() {
        let labels = labels();
        let mean_share = |scheme: &Scheme| (0..10).map(|p| max_class_share(&deal(&labels, 10, p, scheme, 1), &labels)).sum::<f64>() / 10.0;
        let (skewed, even, iid) =
            (mean_share(&Scheme::Dirichlet { alpha: 0.1 }), mean_share(&Scheme::Dirichlet { alpha: 100.0 }), mean_share(&Scheme::Iid));
        assert!(skewed > 0.5, "Dirichlet(0.1): one class dominates a part ({skewed})");
        assert!(even < 0.2 && iid < 0.15, "Dirichlet(100) {even} and IID {iid} stay near 1/10");
        for p in 0..10 {
            let mut classes: Vec<i64> = deal(&labels, 10, p, &Scheme::Shards { shards: 2 }, 1).iter().map(|&r| labels[r]).collect();
            classes.sort_unstable();
            classes.dedup();
            assert!(classes.len() <= 4, "two shards span at most four classes: {classes:?}");
        }
    }
}
