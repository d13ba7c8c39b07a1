//! Server-side adaptive optimizers (Reddi et al. 2021, "Adaptive Federated
//! Optimization"): the averaged client change is a pseudo-gradient that
//! FedAdaGrad, FedYogi or FedAdam apply to the global model. Pure functions;
//! the state (first and second moments) is plain weights that travel between
//! rounds like a model.

use crate::weights::{Error, Weights, check_same_layout};

/// Which adaptive rule (the vocabulary's, so the worker and the job file agree).
pub use flame_events::algorithm::AdaptiveRule as Rule;

/// Hyperparameters, with Flame's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// First-moment decay.
    pub beta_1: f64,
    /// Second-moment decay.
    pub beta_2: f64,
    /// Server learning rate.
    pub eta: f64,
    /// Adaptivity (smallest denominator); v starts at tau².
    pub tau: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self { beta_1: 0.9, beta_2: 0.99, eta: 1e-2, tau: 1e-3 }
    }
}

/// Moments carried from round to round.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct State {
    /// First moment, same layout as the model (empty before the first step).
    pub m: Weights,
    /// Second moment.
    pub v: Weights,
}

/// One server step: from the global model and the (FedAvg) average of the
/// clients' models, the new global model. Updates `state`.
pub fn step(rule: Rule, s: &Settings, state: &mut State, global: &Weights, average: &Weights) -> Result<Weights, Error> {
    check_same_layout(global, average)?;
    if state.m.is_empty() {
        state.m = global
            .iter()
            .map(|(k, t)| (k.clone(), crate::weights::Tensor { shape: t.shape.clone(), data: vec![0.0; t.data.len()] }))
            .collect();
        state.v = global
            .iter()
            .map(|(k, t)| (k.clone(), crate::weights::Tensor { shape: t.shape.clone(), data: vec![(s.tau * s.tau) as f32; t.data.len()] }))
            .collect();
    }
    check_same_layout(global, &state.m)?;
    check_same_layout(global, &state.v)?;
    let mut out = global.clone();
    for (name, x) in &mut out {
        let avg = &average[name].data;
        let (Some(m), Some(v)) = (state.m.get_mut(name), state.v.get_mut(name)) else {
            return Err(Error::Mismatch(format!("optimizer state has no tensor '{name}'")));
        };
        let (m, v) = (&mut m.data, &mut v.data);
        for i in 0..x.data.len() {
            let delta = f64::from(avg[i]) - f64::from(x.data[i]);
            let mi = s.beta_1 * f64::from(m[i]) + (1.0 - s.beta_1) * delta;
            let d2 = delta * delta;
            let vp = f64::from(v[i]);
            let vi = match rule {
                Rule::AdaGrad => vp + d2,
                Rule::Yogi => vp - (1.0 - s.beta_2) * d2 * (vp - d2).signum(),
                Rule::Adam => s.beta_2 * vp + (1.0 - s.beta_2) * d2,
            };
            m[i] = mi as f32;
            v[i] = vi as f32;
            x.data[i] = (f64::from(x.data[i]) + s.eta * mi / (vi.sqrt() + s.tau)) as f32;
        }
    }
    Ok(out)
}

/// FedAvgM's server step (Hsu, Qi and Brown 2019): the averaged change
/// `mean - w` goes into the momentum buffer `v = momentum v + (mean - w)` (zero
/// before the first round), and the model moves by `eta v`. With `eta` 1 and
/// `momentum` 0 this is FedAvg. Updates `velocity`.
pub fn momentum_step(eta: f64, momentum: f64, velocity: &mut Weights, global: &Weights, average: &Weights) -> Result<Weights, Error> {
    check_same_layout(global, average)?;
    if velocity.is_empty() {
        *velocity = global
            .iter()
            .map(|(k, t)| (k.clone(), crate::weights::Tensor { shape: t.shape.clone(), data: vec![0.0; t.data.len()] }))
            .collect();
    }
    check_same_layout(global, velocity)?;
    let mut out = global.clone();
    for (name, x) in out.iter_mut() {
        let (avg, v) = (&average[name].data, &mut velocity.get_mut(name).expect("same layout").data);
        for i in 0..x.data.len() {
            let vi = momentum * f64::from(v[i]) + (f64::from(avg[i]) - f64::from(x.data[i]));
            v[i] = vi as f32;
            x.data[i] = (f64::from(x.data[i]) + eta * vi) as f32;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn w(v: f32) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![1], data: vec![v] })])
    }

    /// One step by hand, x = 1, average = 3 (Δ = 2), β1 = 0.9, β2 = 0.99, η = 0.1, τ = 0.01:
    /// m = 0.1·2 = 0.2; v0 = τ² = 1e-4.
    fn by_hand(v: f64) -> f64 {
        1.0 + 0.1 * 0.2 / (v.sqrt() + 0.01)
    }

    #[test]
    fn one_step_matches_the_paper_by_hand() {
        let s = Settings { beta_1: 0.9, beta_2: 0.99, eta: 0.1, tau: 0.01 };
        let cases = [
            (Rule::AdaGrad, 1e-4 + 4.0),
            (Rule::Adam, 0.99 * 1e-4 + 0.01 * 4.0),
            // v0 - Δ² < 0, so sign = -1: v = v0 + (1-β2)Δ²
            (Rule::Yogi, 1e-4 + 0.01 * 4.0),
        ];
        for (rule, v) in cases {
            let mut state = State::default();
            let out = step(rule, &s, &mut state, &w(1.0), &w(3.0)).expect("step");
            let want = by_hand(v);
            assert!((f64::from(out["p"].data[0]) - want).abs() < 1e-5, "{rule:?}: {} vs {want}", out["p"].data[0]);
            assert!((f64::from(state.v["p"].data[0]) - v).abs() < 1e-6, "{rule:?} v");
            assert!((f64::from(state.m["p"].data[0]) - 0.2).abs() < 1e-6);
        }
    }

    #[test]
    fn server_momentum_by_hand_and_fedavg_without_it() {
        // w = 1, mean = 3: round 1 v = 2, w = 1 + 0.5 * 2 = 2; round 2 (mean 3 again) v = 0.9 * 2 + 1 = 2.8, w = 2 + 1.4 = 3.4.
        let mut v = Weights::new();
        let a = momentum_step(0.5, 0.9, &mut v, &w(1.0), &w(3.0)).expect("round 1");
        assert!((a["p"].data[0] - 2.0).abs() < 1e-6 && (v["p"].data[0] - 2.0).abs() < 1e-6);
        let b = momentum_step(0.5, 0.9, &mut v, &a, &w(3.0)).expect("round 2");
        assert!((v["p"].data[0] - 2.8).abs() < 1e-6, "{}", v["p"].data[0]);
        assert!((b["p"].data[0] - 3.4).abs() < 1e-6, "momentum carries it past the mean: {}", b["p"].data[0]);
        // eta 1, momentum 0: exactly the mean, whatever the buffer held.
        let plain = momentum_step(1.0, 0.0, &mut v, &w(1.0), &w(3.0)).expect("fedavg");
        assert_eq!(plain["p"].data[0], 3.0);
        let other = Weights::from([("q".to_string(), Tensor { shape: vec![1], data: vec![0.0] })]);
        assert!(momentum_step(1.0, 0.9, &mut Weights::new(), &w(0.0), &other).is_err());
    }

    #[test]
    fn moments_carry_over_and_layouts_are_checked() {
        let s = Settings::default();
        let mut state = State::default();
        let a = step(Rule::Adam, &s, &mut state, &w(0.0), &w(1.0)).expect("step");
        let b = step(Rule::Adam, &s, &mut state, &a, &w(1.0)).expect("step");
        assert!(b["p"].data[0] > a["p"].data[0], "keeps moving toward the average");
        let other = Weights::from([("q".to_string(), Tensor { shape: vec![1], data: vec![0.0] })]);
        assert!(step(Rule::Adam, &s, &mut state, &w(0.0), &other).is_err());
    }
}
