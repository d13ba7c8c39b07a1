//! Byzantine-robust aggregation: coordinate-wise median, trimmed mean and
//! (multi-)Krum (Blanchard et al. 2017). Pure functions over client models.

use crate::weights::{Error, Tensor, Weights, check_same_layout};

fn check(updates: &[Weights]) -> Result<&Weights, Error> {
    let first = updates.first().ok_or_else(|| Error::Mismatch("no updates to aggregate".into()))?;
    for u in &updates[1..] {
        check_same_layout(first, u)?;
    }
    Ok(first)
}

fn per_coordinate(updates: &[Weights], f: impl Fn(&mut Vec<f32>) -> f32) -> Result<Weights, Error> {
    let first = check(updates)?;
    let mut out = Weights::new();
    let mut column = Vec::with_capacity(updates.len());
    for (name, t) in first {
        let mut data = Vec::with_capacity(t.data.len());
        for i in 0..t.data.len() {
            column.clear();
            column.extend(updates.iter().map(|u| u[name].data[i]));
            column.sort_by(f32::total_cmp);
            data.push(f(&mut column));
        }
        out.insert(name.clone(), Tensor { shape: t.shape.clone(), data });
    }
    Ok(out)
}

/// The coordinate-wise median.
pub fn median(updates: &[Weights]) -> Result<Weights, Error> {
    per_coordinate(updates, |c| {
        let n = c.len();
        if n % 2 == 1 { c[n / 2] } else { (c[n / 2 - 1] + c[n / 2]) / 2.0 }
    })
}

/// The coordinate-wise mean after dropping the `beta` fraction of values at each end (0 <= beta < 0.5).
pub fn trimmed_mean(updates: &[Weights], beta: f64) -> Result<Weights, Error> {
    if !(0.0..0.5).contains(&beta) {
        return Err(Error::Mismatch(format!("trimmed mean needs 0 <= beta < 0.5, got {beta}")));
    }
    let cut = (updates.len() as f64 * beta).floor() as usize;
    per_coordinate(updates, |c| {
        let kept = &c[cut..c.len() - cut];
        (kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64) as f32
    })
}

fn distance2(a: &Weights, b: &Weights) -> f64 {
    a.iter().map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>()).sum()
}

/// Krum scores: for each update, the summed squared distance to its n - f - 2 nearest others.
pub fn krum_scores(updates: &[Weights], f: usize) -> Result<Vec<f64>, Error> {
    check(updates)?;
    let n = updates.len();
    if n < 2 * f + 3 {
        return Err(Error::Mismatch(format!("Krum with f = {f} needs at least {} updates, got {n}", 2 * f + 3)));
    }
    let k = n - f - 2;
    Ok((0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| distance2(&updates[i], &updates[j])).collect();
            d.sort_by(f64::total_cmp);
            d[..k].iter().sum()
        })
        .collect())
}

/// Multi-Krum: the mean of the `m` updates with the lowest Krum scores (`m = 1` is Krum).
/// Returns the model and the indices chosen.
pub fn multi_krum(updates: &[Weights], f: usize, m: usize) -> Result<(Weights, Vec<usize>), Error> {
    let scores = krum_scores(updates, f)?;
    let mut order: Vec<usize> = (0..updates.len()).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    let chosen: Vec<usize> = order.into_iter().take(m.clamp(1, updates.len())).collect();
    let picked: Vec<(Weights, u64)> = chosen.iter().map(|&i| (updates[i].clone(), 1)).collect();
    Ok((crate::fedavg::fedavg(&picked)?, chosen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(values: &[f32]) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![values.len()], data: values.to_vec() })])
    }

    fn honest_and_poisoned() -> Vec<Weights> {
        vec![w(&[1.0, 2.0]), w(&[1.1, 2.1]), w(&[0.9, 1.9]), w(&[1.05, 2.05]), w(&[1000.0, -1000.0])]
    }

    #[test]
    fn median_and_trimmed_mean_resist_one_poisoned_update() {
        let ups = honest_and_poisoned();
        let plain = crate::fedavg::fedavg(&ups.iter().map(|u| (u.clone(), 1)).collect::<Vec<_>>()).expect("fedavg");
        assert!(plain["p"].data[0] > 100.0, "FedAvg is dragged away: {:?}", plain["p"].data);
        let med = median(&ups).expect("median");
        assert_eq!(med["p"].data, vec![1.05, 2.0]);
        let tm = trimmed_mean(&ups, 0.2).expect("trimmed");
        assert!((tm["p"].data[0] - (1.0 + 1.1 + 1.05) / 3.0).abs() < 1e-6, "{:?}", tm["p"].data);
        assert!((tm["p"].data[1] - (2.0 + 1.9 + 2.05) / 3.0).abs() < 1e-6, "{:?}", tm["p"].data);
        assert!(trimmed_mean(&ups, 0.5).is_err());
    }

    #[test]
    fn krum_picks_from_the_honest_cluster() {
        let ups = honest_and_poisoned();
        let (model, chosen) = multi_krum(&ups, 1, 1).expect("krum");
        assert!(!chosen.contains(&4));
        assert!(model["p"].data[0] < 2.0);
        let (model, chosen) = multi_krum(&ups, 1, 3).expect("multi-krum");
        assert_eq!(chosen.len(), 3);
        assert!(!chosen.contains(&4) && (model["p"].data[0] - 1.0).abs() < 0.1);
        assert!(multi_krum(&ups[..4], 1, 1).is_err(), "too few updates for f = 1");
    }
}
