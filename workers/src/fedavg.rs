//! FedAvg (McMahan et al. 2017): the sample-weighted mean of client models.

use crate::weights::{Error, Tensor, Weights, check_same_layout};

/// Elements per block: the f64 accumulator of a block (64 KiB) stays in L2
/// while every update's slice of it streams through once.
const BLOCK: usize = 8192;

/// Tensors smaller than this are averaged on the calling thread.
const PARALLEL_FROM: usize = 1 << 18;

/// Averages models weighted by their sample counts. Every model must have the
/// layout of the first; the total weight must be positive. Sums run in f64,
/// update by update in the given order, so the result does not depend on how
/// the work is split.
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
    let scales: Vec<f64> = updates.iter().map(|(_, n)| *n as f64 / total).collect();
    let mut out = Weights::new();
    for (name, t) in first {
        let inputs: Vec<&[f32]> = updates.iter().filter_map(|(w, _)| w.get(name)).map(|t| t.data.as_slice()).collect();
        let mut data = vec![0.0f32; t.data.len()];
        weighted_sum(&mut data, &inputs, &scales);
        out.insert(name.clone(), Tensor { shape: t.shape.clone(), data });
    }
    Ok(out)
}

/// `out[i] = sum_k scales[k] * inputs[k][i]`, block by block, on every core for large tensors.
pub fn weighted_sum(out: &mut [f32], inputs: &[&[f32]], scales: &[f64]) {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    if threads <= 1 || out.len() < PARALLEL_FROM {
        sum_range(out, 0, inputs, scales);
        return;
    }
    let per = out.len().div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per).enumerate() {
            scope.spawn(move || sum_range(part, i * per, inputs, scales));
        }
    });
}

fn sum_range(out: &mut [f32], offset: usize, inputs: &[&[f32]], scales: &[f64]) {
    let mut acc = vec![0.0f64; BLOCK.min(out.len())];
    for (b, block) in out.chunks_mut(BLOCK).enumerate() {
        let start = offset + b * BLOCK;
        let acc = &mut acc[..block.len()];
        acc.fill(0.0);
        for (input, &s) in inputs.iter().zip(scales) {
            for (a, &v) in acc.iter_mut().zip(&input[start..start + block.len()]) {
                *a += s * f64::from(v);
            }
        }
        for (o, a) in block.iter_mut().zip(acc.iter()) {
            *o = *a as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The blocked, threaded sum equals the plain per-element f64 sum bit for
    /// bit, on sizes that are not multiples of the block or the thread split.
    #[test]
    fn blocked_parallel_sum_equals_the_plain_sum() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for len in [1, BLOCK - 1, BLOCK + 3, PARALLEL_FROM + 12_345] {
            let inputs: Vec<Vec<f32>> = (0..5).map(|_| (0..len).map(|_| next()).collect()).collect();
            let scales = [0.1, 0.2, 0.3, 0.15, 0.25];
            let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let mut out = vec![0.0; len];
            weighted_sum(&mut out, &refs, &scales);
            for i in (0..len).step_by(997).chain([len - 1]) {
                let plain = inputs.iter().zip(scales).fold(0.0f64, |a, (x, s)| a + s * f64::from(x[i])) as f32;
                assert_eq!(out[i], plain, "element {i} of {len}");
            }
        }
    }
}
