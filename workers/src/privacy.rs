//! Differential privacy on trainer updates: clip the update (trained minus
//! global) to an L2 norm bound, then add Gaussian noise scaled to that bound.

use crate::weights::{Error, Weights, check_same_layout};
use flame_events::rng::SplitMix;

/// What was done to an update, reported as metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Applied {
    /// L2 norm of the update before clipping.
    pub norm_before: f64,
    /// The clipping factor applied (1 = unclipped).
    pub scale: f64,
    /// Standard deviation of the added noise.
    pub sigma: f64,
}

/// Clips `trained - global` to `clip` and adds N(0, (noise_factor * clip)²) per
/// coordinate; returns the private model (written over `trained`, so that a
/// large model is not held a third time) and what was applied.
pub fn privatize(global: &Weights, mut trained: Weights, clip: f64, noise_factor: f64, seed: u64) -> Result<(Weights, Applied), Error> {
    check_same_layout(global, &trained)?;
    if clip <= 0.0 || noise_factor < 0.0 {
        return Err(Error::Mismatch(format!("DP needs clip_threshold > 0 and noise_factor >= 0, got {clip} and {noise_factor}")));
    }
    let norm: f64 = global
        .iter()
        .map(|(k, g)| g.data.iter().zip(&trained[k].data).map(|(a, b)| (f64::from(*b) - f64::from(*a)).powi(2)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    let scale = if norm > clip { clip / norm } else { 1.0 };
    let sigma = noise_factor * clip;
    let mut rng = SplitMix::new(seed);
    for (k, t) in &mut trained {
        for (b, a) in t.data.iter_mut().zip(&global[k].data) {
            let delta = (f64::from(*b) - f64::from(*a)) * scale + sigma * rng.normal();
            *b = (f64::from(*a) + delta) as f32;
        }
    }
    Ok((trained, Applied { norm_before: norm, scale, sigma }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn w(values: Vec<f32>) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![values.len()], data: values })])
    }

    fn norm(a: &Weights, b: &Weights) -> f64 {
        a["p"].data.iter().zip(&b["p"].data).map(|(x, y)| (f64::from(*y) - f64::from(*x)).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn clipping_bounds_the_update_norm() {
        let global = w(vec![0.0; 100]);
        let trained = w((0..100).map(|i| i as f32).collect());
        let (private, applied) = privatize(&global, trained.clone(), 1.0, 0.0, 7).expect("dp");
        assert!(applied.norm_before > 500.0 && applied.scale < 0.01);
        assert!((norm(&global, &private) - 1.0).abs() < 1e-4, "clipped to the bound");
        let small = w(vec![0.001; 100]);
        let (unclipped, applied) = privatize(&global, small.clone(), 1.0, 0.0, 7).expect("dp");
        assert_eq!(applied.scale, 1.0);
        assert_eq!(unclipped, small);
    }

    #[test]
    fn noise_has_the_promised_scale_and_is_seeded() {
        let global = w(vec![0.0; 20_000]);
        let (a, applied) = privatize(&global, global.clone(), 0.5, 2.0, 1).expect("dp");
        assert_eq!(applied.sigma, 1.0);
        let sd = (a["p"].data.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 20_000.0).sqrt();
        assert!((sd - 1.0).abs() < 0.03, "sample sd {sd}");
        assert_eq!(privatize(&global, global.clone(), 0.5, 2.0, 1).expect("dp").0, a);
        assert_ne!(privatize(&global, global.clone(), 0.5, 2.0, 2).expect("dp").0, a);
        assert!(privatize(&global, global.clone(), 0.0, 1.0, 1).is_err());
    }
}
