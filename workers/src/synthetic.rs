//! The FedProx paper's Synthetic(alpha, beta) data (Li et al., 2020), seeded.
//!
//! 30 devices, 60 features, 10 classes. Device k draws u_k ~ N(0, alpha) and
//! B_k ~ N(0, beta) (alpha and beta used as standard deviations); its model
//! W_k (60x10) and b_k (10) have entries ~ N(u_k, 1); its feature means v_k
//! have entries ~ N(B_k, 1); it has n_k = int(LogNormal(4, 2)) + 50 samples
//! x ~ N(v_k, diag((j+1)^-1.2)) labelled y = argmax(x W_k + b_k) (softmax is
//! monotone, so the argmax of the logits); 90% train, 10% test. beta moves
//! each device's features as a whole; alpha shifts all of W_k and b_k by the
//! same u_k, which (as in the paper's definition) leaves every argmax as it
//! is, so the devices' models differ through their N(., 1) draws.
//! Unlike the paper's script, every draw comes from a generator seeded by
//! (seed, device), so any worker regenerates exactly its device's data.

use flame_events::rng::SplitMix;

use crate::split::{Data, Split};

/// Devices in the paper's setting.
pub const DEVICES: usize = 30;
/// Features per sample.
pub const FEATURES: usize = 60;
/// Classes.
pub const CLASSES: usize = 10;

/// Device `device`'s data for Synthetic(`alpha`, `beta`) under `seed`.
pub fn fedprox(alpha: f64, beta: f64, device: usize, seed: u64) -> Data {
    let mut rng = SplitMix::new(seed ^ (device as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let u = alpha * rng.normal();
    let b_mean = beta * rng.normal();
    let w: Vec<f64> = (0..FEATURES * CLASSES).map(|_| u + rng.normal()).collect();
    let bias: Vec<f64> = (0..CLASSES).map(|_| u + rng.normal()).collect();
    let v: Vec<f64> = (0..FEATURES).map(|_| b_mean + rng.normal()).collect();
    let n = (4.0 + 2.0 * rng.normal()).exp() as usize + 50;
    let sd: Vec<f64> = (0..FEATURES).map(|j| ((j + 1) as f64).powf(-1.2).sqrt()).collect();
    let mut x = Vec::with_capacity(n * FEATURES);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let row: Vec<f64> = (0..FEATURES).map(|j| v[j] + sd[j] * rng.normal()).collect();
        let label = (0..CLASSES)
            .map(|c| (c, bias[c] + row.iter().enumerate().map(|(j, xj)| xj * w[j * CLASSES + c]).sum::<f64>()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0, |(c, _)| c);
        x.extend(row.iter().map(|v| *v as f32));
        y.push(label as i64);
    }
    let all = Split::classes(x, y, FEATURES);
    let cut = (n as f64 * 0.9).round() as usize;
    let rows: Vec<usize> = (0..n).collect();
    Data { train: all.select(&rows[..cut]), test: all.select(&rows[cut..]), classes: CLASSES }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load;

    #[test]
    fn devices_have_the_papers_shape_and_are_reproducible() {
        let a = load("synthetic://fedprox?alpha=1&beta=1&device=3&seed=7").expect("device 3");
        assert_eq!((a.train.features, a.classes), (FEATURES, CLASSES));
        let n = a.train.len() + a.test.len();
        assert!(n >= 50, "at least 50 samples, got {n}");
        assert_eq!(a.train.len(), (n as f64 * 0.9).round() as usize);
        assert!(a.train.y.iter().chain(&a.test.y).all(|c| (0..CLASSES as i64).contains(c)));
        assert_eq!(a, load("synthetic://fedprox?alpha=1&beta=1&device=3&seed=7").expect("again"), "same URL, same data");
        assert_ne!(a, load("synthetic://fedprox?alpha=1&beta=1&device=3&seed=8").expect("other seed"));
        assert_ne!(a, load("synthetic://fedprox?alpha=1&beta=1&device=4&seed=7").expect("other device"));
        let sizes: Vec<usize> = (0..DEVICES).map(|k| fedprox(1.0, 1.0, k, 0).train.len()).collect();
        assert!(sizes.iter().max() > sizes.iter().min(), "sizes vary (log-normal): {sizes:?}");
    }

    #[test]
    fn beta_spreads_the_devices_feature_distributions() {
        // Each device's mean feature value; beta shifts all of a device's feature means together.
        let spread = |beta: f64| {
            let means: Vec<f64> = (0..DEVICES)
                .map(|k| {
                    let d = fedprox(1.0, beta, k, 1);
                    d.train.x.iter().map(|v| f64::from(*v)).sum::<f64>() / d.train.x.len() as f64
                })
                .collect();
            let mean = means.iter().sum::<f64>() / means.len() as f64;
            (means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / means.len() as f64).sqrt()
        };
        let (same, apart) = (spread(0.0), spread(1.0));
        assert!(apart > 3.0 * same, "beta = 1 should spread device means well beyond beta = 0: {apart} vs {same}");
    }

    #[test]
    fn bad_synthetic_urls_say_what_is_wrong() {
        assert!(load("synthetic://fedprox?alpha=1&beta=1").expect_err("no device").to_string().contains("device=K"));
        assert!(load("synthetic://fedprox?alpha=x&beta=1&device=0").expect_err("alpha").to_string().contains("alpha"));
        assert!(load("synthetic://fedprox?alpha=1&beta=1&device=30").expect_err("range").to_string().contains("device < devices"));
        assert!(load("synthetic://mnist?device=0").is_err());
    }
}
