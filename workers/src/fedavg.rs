//! FedAvg (McMahan et al. 2017): the sample-weighted mean of client models.

use crate::weights::{Error, Weights, check_same_layout};

/// Averages models weighted by their sample counts. Every model must have the
/// layout of the first; the total weight must be positive.
pub fn fedavg(updates: &[(Weights, u64)]) -> Result<Weights, Error> {
    let Some((first, _)) = updates.first() else {
        return Err(Error::Mismatch("no updates to aggregate".into()));
    };
    for (w, _) in &updates[1..] {
        check_same_layout(first, w)?;
    }
    let total: f64 = updates.iter().map(|(_, n)| *n as f64).sum();
    if total <= 0.0 {
        return Err(Error::Mismatch("updates carry no samples".into()));
    }
    let mut out = first.clone();
    for (name, t) in &mut out {
        let mut acc = vec![0.0f64; t.data.len()];
        for (w, n) in updates {
            let scale = *n as f64 / total;
            for (a, v) in acc.iter_mut().zip(&w[name].data) {
                *a += scale * f64::from(*v);
            }
        }
        t.data = acc.into_iter().map(|v| v as f32).collect();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn model(values: &[f32]) -> Weights {
        let mut w = Weights::new();
        w.insert("w".into(), Tensor { shape: vec![values.len()], data: values.to_vec() });
        w
    }

    #[test]
    fn is_the_sample_weighted_mean() {
        let out = fedavg(&[(model(&[1.0, 2.0]), 1), (model(&[4.0, -1.0]), 3)]).expect("fedavg");
        assert_eq!(out["w"].data, vec![(1.0 + 3.0 * 4.0) / 4.0, (2.0 - 3.0) / 4.0]);
    }

    #[test]
    fn refuses_mismatched_layouts_and_empty_input() {
        assert!(fedavg(&[]).is_err());
        assert!(fedavg(&[(model(&[1.0]), 1), (model(&[1.0, 2.0]), 1)]).is_err());
        assert!(fedavg(&[(model(&[1.0]), 0)]).is_err());
    }
}
