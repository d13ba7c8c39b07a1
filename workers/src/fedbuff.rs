//! FedBuff's server step (Nguyen et al. 2022, "Federated Learning with
//! Buffered Asynchronous Aggregation"). Clients train from whatever global
//! model was current when they started; the server buffers their changes and,
//! every `aggGoal` of them, moves the global model by their average, each
//! change discounted by its staleness `τ` (global models made since its base)
//! with `s(τ) = 1 / sqrt(1 + τ)`:
//!
//! `w ← w + η · Σ_i n_i s(τ_i) (w_i − b_i) / Σ_i n_i`
//!
//! where `w_i` is client i's trained model, `b_i` the model it started from and
//! `n_i` its samples. With every update fresh (`b_i = w`, `τ = 0`) and `η = 1`
//! this is FedAvg.

use crate::weights::{Error, Weights, check_same_layout};

/// One buffered update.
pub struct Buffered<'a> {
    /// The client's trained model.
    pub trained: &'a Weights,
    /// The global model it trained from.
    pub base: &'a Weights,
    /// Its training samples.
    pub samples: u64,
    /// Global models made since its base.
    pub staleness: u32,
}

/// The staleness discount `1 / sqrt(1 + τ)`.
pub fn discount(staleness: u32) -> f64 {
    1.0 / (1.0 + f64::from(staleness)).sqrt()
}

/// The new global model from the current one and a buffer of updates, with server learning rate `eta`.
pub fn step(global: &Weights, buffer: &[Buffered], eta: f64) -> Result<Weights, Error> {
    if buffer.is_empty() {
        return Err(Error::Mismatch("FedBuff needs at least one update".into()));
    }
    for b in buffer {
        check_same_layout(global, b.trained)?;
        check_same_layout(global, b.base)?;
    }
    let total: u64 = buffer.iter().map(|b| b.samples).sum();
    if total == 0 {
        return Err(Error::Mismatch("the buffered updates carry no samples".into()));
    }
    let scales: Vec<f64> = buffer.iter().map(|b| eta * b.samples as f64 * discount(b.staleness) / total as f64).collect();
    let mut next = global.clone();
    for (name, out) in next.iter_mut() {
        let mut acc: Vec<f64> = out.data.iter().map(|&x| f64::from(x)).collect();
        for (b, scale) in buffer.iter().zip(&scales) {
            let (w, base) = (&b.trained[name].data, &b.base[name].data);
            for ((a, x), y) in acc.iter_mut().zip(w).zip(base) {
                *a += scale * (f64::from(*x) - f64::from(*y));
            }
        }
        for (o, a) in out.data.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    Ok(next)
}

/// [`step`] folded one update at a time: the same sums in the same order
/// (so the same bits), holding the f64 sums and not the buffer. Each
/// update's samples and staleness are known first (the aggregate command
/// carries them), so each enters with its final weight.
#[derive(Debug)]
pub struct Running {
    sums: crate::fedavg::Sums,
}

impl Running {
    /// A step from `global` over updates with these (samples, staleness), to be added in this order.
    pub fn new(global: &Weights, updates: &[(u64, u32)], eta: f64) -> Result<Self, Error> {
        if updates.is_empty() {
            return Err(Error::Mismatch("FedBuff needs at least one update".into()));
        }
        let total: u64 = updates.iter().map(|(n, _)| n).sum();
        if total == 0 {
            return Err(Error::Mismatch("the buffered updates carry no samples".into()));
        }
        let scales = updates.iter().map(|(n, s)| eta * *n as f64 * discount(*s) / total as f64).collect();
        let acc = global.iter().map(|(k, t)| (k.clone(), (t.shape.clone(), t.data.iter().map(|&x| f64::from(x)).collect()))).collect();
        Ok(Self { sums: crate::fedavg::Sums::new(scales, acc) })
    }

    /// Folds in the next update: the client's trained model and the model it trained from.
    pub fn add(&mut self, trained: &Weights, base: &Weights) -> Result<(), Error> {
        let scale = self.sums.scale()?;
        let layout = || self.sums.acc.iter().map(|(k, (shape, _))| (k, shape));
        crate::weights::check_shapes(layout(), trained.iter().map(|(k, t)| (k, &t.shape)))?;
        crate::weights::check_shapes(layout(), base.iter().map(|(k, t)| (k, &t.shape)))?;
        for (name, (_, acc)) in &mut self.sums.acc {
            for ((a, x), y) in acc.iter_mut().zip(&trained[name].data).zip(&base[name].data) {
                *a += scale * (f64::from(*x) - f64::from(*y));
            }
        }
        self.sums.added();
        Ok(())
    }

    /// The new global model, once every announced update went in.
    pub fn finish(self) -> Result<Weights, Error> {
        self.sums.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn w(values: &[f32]) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![values.len()], data: values.to_vec() })])
    }

    #[test]
    fn fresh_updates_with_unit_rate_are_fedavg() {
        let global = w(&[0.0, 1.0]);
        let (a, b) = (w(&[1.0, 3.0]), w(&[4.0, -1.0]));
        let buffer = [
            Buffered { trained: &a, base: &global, samples: 1, staleness: 0 },
            Buffered { trained: &b, base: &global, samples: 3, staleness: 0 },
        ];
        let next = step(&global, &buffer, 1.0).expect("step");
        let avg = crate::fedavg::fedavg(&[(a.clone(), 1), (b.clone(), 3)]).expect("fedavg");
        assert_eq!(next, avg);
        assert_eq!(next["p"].data, vec![3.25, 0.0]);
    }

    #[test]
    fn a_stale_update_moves_the_model_by_its_own_change_discounted() {
        // Hand computation: global 10; a fresh update from 10 to 12 (n = 1) and
        // an update trained from an older model 4 to 8 (n = 1, two models
        // stale): 10 + 0.5 * (1 * 2 + (1 / sqrt 3) * 4) = 12.1547...
        let (global, old) = (w(&[10.0]), w(&[4.0]));
        let (fresh, stale) = (w(&[12.0]), w(&[8.0]));
        let buffer = [
            Buffered { trained: &fresh, base: &global, samples: 1, staleness: 0 },
            Buffered { trained: &stale, base: &old, samples: 1, staleness: 2 },
        ];
        let next = step(&global, &buffer, 1.0).expect("step");
        let want = 10.0 + 0.5 * (2.0 + 4.0 / 3f64.sqrt());
        assert!((f64::from(next["p"].data[0]) - want).abs() < 1e-5, "{:?} vs {want}", next["p"].data);
        // Its change is applied to the current model, not its own base: no jump back to 8.
        assert!(next["p"].data[0] > 12.0);
        // The discount falls with staleness; eta scales the step.
        assert!(discount(0) > discount(1) && discount(1) > discount(5));
        let half = step(&global, &buffer, 0.5).expect("step");
        assert!((f64::from(half["p"].data[0]) - (10.0 + (want - 10.0) / 2.0)).abs() < 1e-5);
    }

    #[test]
    fn mismatched_layouts_and_empty_buffers_are_refused() {
        let global = w(&[0.0]);
        let wide = w(&[0.0, 1.0]);
        assert!(step(&global, &[], 1.0).is_err());
        assert!(step(&global, &[Buffered { trained: &wide, base: &global, samples: 1, staleness: 0 }], 1.0).is_err());
        assert!(step(&global, &[Buffered { trained: &global, base: &wide, samples: 1, staleness: 0 }], 1.0).is_err());
    }

    /// The fold gives the step's bits, update by update, for stale and fresh
    /// updates from different bases; it refuses other layouts and counts.
    #[test]
    fn the_running_step_equals_the_step_over_the_buffer_bit_for_bit() {
        let mut rng = flame_events::rng::SplitMix::new(9);
        let mut model = |n: usize| w(&(0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>());
        let global = model(40);
        let bases = [global.clone(), model(40), model(40)];
        let trained: Vec<Weights> = (0..6).map(|_| model(40)).collect();
        let buffer: Vec<Buffered> = trained
            .iter()
            .enumerate()
            .map(|(i, t)| Buffered { trained: t, base: &bases[i % 3], samples: 3 + 5 * i as u64, staleness: (i % 3) as u32 })
            .collect();
        let whole = step(&global, &buffer, 0.8).expect("step");
        let mut running =
            Running::new(&global, &buffer.iter().map(|b| (b.samples, b.staleness)).collect::<Vec<_>>(), 0.8).expect("running");
        for b in &buffer {
            running.add(b.trained, b.base).expect("same layout");
        }
        let folded = running.finish().expect("all in");
        assert!(folded["p"].data.iter().zip(&whole["p"].data).all(|(a, b)| a.to_bits() == b.to_bits()), "the step's bits");

        let mut short = Running::new(&global, &[(1, 0), (1, 0)], 1.0).expect("running");
        assert!(short.add(&w(&[0.0]), &global).is_err(), "another layout");
        short.add(&trained[0], &global).expect("first");
        assert!(short.finish().is_err(), "an announced update missing");
        assert!(Running::new(&global, &[], 1.0).is_err() && Running::new(&global, &[(0, 0)], 1.0).is_err());
    }
}
