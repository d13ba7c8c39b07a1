//! Byzantine-robust aggregation: coordinate-wise median, trimmed mean and
//! (multi-)Krum (Blanchard et al. 2017).
//!
//! Unlike FedAvg, these rules need every update at once. Each reads them a
//! block of coordinates at a time through [`Updates`]: from memory
//! ([`InMemory`]), or from files on disk ([`crate::spill`]) when all of them
//! would not fit, so that only one block of every update is in memory at
//! once. The result does not depend on the block size or on where the
//! updates are: the values of a coordinate, and the terms of every sum, meet
//! in the same order either way.

use crate::weights::{Error, Tensor, Weights, check_same_layout};

/// A model's tensors in order (by name), with their shapes.
pub type Layout = Vec<(String, Vec<usize>)>;

/// The layout of a model.
pub fn layout(model: &Weights) -> Layout {
    model.iter().map(|(name, t)| (name.clone(), t.shape.clone())).collect()
}

/// The number of values of a tensor of this shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Every update of a round, read a block of one tensor at a time.
pub trait Updates: Sync {
    /// How many updates there are.
    fn count(&self) -> usize;
    /// The tensors every update has.
    fn layout(&self) -> &Layout;
    /// Fills `out` with the values of tensor number `tensor` of update
    /// number `update`, from value `start` on.
    fn read(&self, update: usize, tensor: usize, start: usize, out: &mut [f32]) -> Result<(), Error>;
}

/// Updates held in memory.
pub struct InMemory<'a> {
    layout: Layout,
    /// Each update's tensors, in the layout's order.
    values: Vec<Vec<&'a [f32]>>,
}

impl<'a> InMemory<'a> {
    /// The updates, once each is checked to have the first one's layout.
    pub fn new(updates: impl IntoIterator<Item = &'a Weights>) -> Result<Self, Error> {
        let updates: Vec<&Weights> = updates.into_iter().collect();
        let first = updates.first().ok_or_else(|| Error::Mismatch("no updates to aggregate".into()))?;
        for u in &updates[1..] {
            check_same_layout(first, u)?;
        }
        let values = updates.iter().map(|u| u.values().map(|t| t.data.as_slice()).collect()).collect();
        Ok(Self { layout: layout(first), values })
    }
}

impl Updates for InMemory<'_> {
    fn count(&self) -> usize {
        self.values.len()
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read(&self, update: usize, tensor: usize, start: usize, out: &mut [f32]) -> Result<(), Error> {
        let values = self.values.get(update).and_then(|u| u.get(tensor)).and_then(|t| t.get(start..start + out.len()));
        out.copy_from_slice(values.ok_or_else(|| Error::Mismatch(format!("no values {start}.. of tensor {tensor} of update {update}")))?);
        Ok(())
    }
}

/// The bytes of every update's block that the rules hold at once.
const BLOCK_BYTES: usize = 32 << 20;

/// Values per block for `k` updates: at most [`BLOCK_BYTES`] of them all,
/// and between 1,024 and 65,536 values of each (reads of 4 to 256 KiB).
pub fn block_len(k: usize) -> usize {
    (BLOCK_BYTES / 4 / k.max(1)).clamp(1 << 10, 1 << 16)
}

/// Reads the block `start..start + n` of tensor `tensor` of every update
/// into `buf`, update after update (`buf[u * n + i]`).
fn load<U: Updates + ?Sized>(updates: &U, tensor: usize, start: usize, n: usize, buf: &mut Vec<f32>) -> Result<(), Error> {
    buf.resize(updates.count() * n, 0.0);
    for (u, part) in buf.chunks_mut(n).enumerate() {
        updates.read(u, tensor, start, part)?;
    }
    Ok(())
}

fn per_coordinate<U: Updates + ?Sized>(updates: &U, block: usize, f: impl Fn(&[f32]) -> f32 + Sync) -> Result<Weights, Error> {
    let k = updates.count();
    if k == 0 {
        return Err(Error::Mismatch("no updates to aggregate".into()));
    }
    let mut out = Weights::new();
    let mut buf = Vec::new();
    for (t, (name, shape)) in updates.layout().iter().enumerate() {
        let mut data = vec![0.0f32; numel(shape)];
        for (b, chunk) in data.chunks_mut(block.max(1)).enumerate() {
            let n = chunk.len();
            load(updates, t, b * block.max(1), n, &mut buf)?;
            let buf = &buf;
            crate::fedavg::on_parts(chunk, n * k >= 1 << 20, 1, |part, first| {
                let mut column = Vec::with_capacity(k);
                for (j, o) in part.iter_mut().enumerate() {
                    column.clear();
                    column.extend((0..k).map(|u| buf[u * n + first + j]));
                    column.sort_by(f32::total_cmp);
                    *o = f(&column);
                }
            });
        }
        out.insert(name.clone(), Tensor { shape: shape.clone(), data });
    }
    Ok(out)
}

/// The coordinate-wise median.
pub fn median<U: Updates + ?Sized>(updates: &U) -> Result<Weights, Error> {
    median_in_blocks(updates, block_len(updates.count()))
}

fn median_in_blocks<U: Updates + ?Sized>(updates: &U, block: usize) -> Result<Weights, Error> {
    per_coordinate(updates, block, |c| {
        let n = c.len();
        if n % 2 == 1 { c[n / 2] } else { (c[n / 2 - 1] + c[n / 2]) / 2.0 }
    })
}

/// The coordinate-wise mean after dropping the `beta` fraction of values at each end (0 <= beta < 0.5).
pub fn trimmed_mean<U: Updates + ?Sized>(updates: &U, beta: f64) -> Result<Weights, Error> {
    trimmed_mean_in_blocks(updates, beta, block_len(updates.count()))
}

fn trimmed_mean_in_blocks<U: Updates + ?Sized>(updates: &U, beta: f64, block: usize) -> Result<Weights, Error> {
    if !(0.0..0.5).contains(&beta) {
        return Err(Error::Mismatch(format!("trimmed mean needs 0 <= beta < 0.5, got {beta}")));
    }
    let cut = (updates.count() as f64 * beta).floor() as usize;
    per_coordinate(updates, block, |c| {
        let kept = &c[cut..c.len() - cut];
        (kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64) as f32
    })
}

/// The squared distance between every two updates (`n x n`, row by row), in
/// one pass over the blocks. Each pair's sum runs over every tensor's values
/// in order, then over the tensors, whatever the block size.
fn distances<U: Updates + ?Sized>(updates: &U, block: usize) -> Result<Vec<f64>, Error> {
    let n = updates.count();
    let mut total = vec![0.0f64; n * n];
    let mut partial = vec![0.0f64; n * n];
    let mut buf = Vec::new();
    for (t, (_, shape)) in updates.layout().iter().enumerate() {
        let len = numel(shape);
        partial.fill(0.0);
        for start in (0..len).step_by(block.max(1)) {
            let m = block.max(1).min(len - start);
            load(updates, t, start, m, &mut buf)?;
            let buf = &buf;
            let pairs = |i: usize, row: &mut [f64]| {
                let a = &buf[i * m..(i + 1) * m];
                for (j, d) in row.iter_mut().enumerate().skip(i + 1) {
                    let b = &buf[j * m..(j + 1) * m];
                    for (x, y) in a.iter().zip(b) {
                        *d += (f64::from(*x) - f64::from(*y)).powi(2);
                    }
                }
            };
            let threads = if m * n * n / 2 < 1 << 20 { 1 } else { crate::fedavg::cores() };
            // Rows are dealt round-robin to the threads: row i has n - i - 1 pairs.
            let mut dealt: Vec<Vec<(usize, &mut [f64])>> = (0..threads).map(|_| Vec::new()).collect();
            for (i, row) in partial.chunks_mut(n).enumerate() {
                dealt[i % threads].push((i, row));
            }
            std::thread::scope(|scope| {
                for rows in dealt {
                    let pairs = &pairs;
                    scope.spawn(move || rows.into_iter().for_each(|(i, row)| pairs(i, row)));
                }
            });
        }
        for (s, p) in total.iter_mut().zip(&partial) {
            *s += p;
        }
    }
    for i in 0..n {
        for j in 0..i {
            total[i * n + j] = total[j * n + i];
        }
    }
    Ok(total)
}

/// Krum scores: for each update, the summed squared distance to its n - f - 2 nearest others.
pub fn krum_scores<U: Updates + ?Sized>(updates: &U, f: usize) -> Result<Vec<f64>, Error> {
    krum_scores_in_blocks(updates, f, block_len(updates.count()))
}

fn krum_scores_in_blocks<U: Updates + ?Sized>(updates: &U, f: usize, block: usize) -> Result<Vec<f64>, Error> {
    let n = updates.count();
    if n < 2 * f + 3 {
        return Err(Error::Mismatch(format!("Krum with f = {f} needs at least {} updates, got {n}", 2 * f + 3)));
    }
    let k = n - f - 2;
    let d = distances(updates, block)?;
    Ok((0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i * n + j]).collect();
            row.sort_by(f64::total_cmp);
            row[..k].iter().sum()
        })
        .collect())
}

/// Multi-Krum: the mean of the `m` updates with the lowest Krum scores (`m = 1` is Krum).
/// Returns the model and the indices chosen.
pub fn multi_krum<U: Updates + ?Sized>(updates: &U, f: usize, m: usize) -> Result<(Weights, Vec<usize>), Error> {
    multi_krum_in_blocks(updates, f, m, block_len(updates.count()))
}

fn multi_krum_in_blocks<U: Updates + ?Sized>(updates: &U, f: usize, m: usize, block: usize) -> Result<(Weights, Vec<usize>), Error> {
    let scores = krum_scores_in_blocks(updates, f, block)?;
    let mut order: Vec<usize> = (0..updates.count()).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    let chosen: Vec<usize> = order.into_iter().take(m.clamp(1, updates.count())).collect();
    Ok((mean_of(updates, &chosen, block)?, chosen))
}

/// The plain mean of the chosen updates, block by block: the same sums, in
/// the same order, as [`crate::fedavg::fedavg`] of them with one sample each.
fn mean_of<U: Updates + ?Sized>(updates: &U, chosen: &[usize], block: usize) -> Result<Weights, Error> {
    let scales = vec![1.0 / chosen.len() as f64; chosen.len()];
    let mut out = Weights::new();
    let mut parts = vec![Vec::new(); chosen.len()];
    for (t, (name, shape)) in updates.layout().iter().enumerate() {
        let mut data = vec![0.0f32; numel(shape)];
        for (b, chunk) in data.chunks_mut(block.max(1)).enumerate() {
            for (part, &u) in parts.iter_mut().zip(chosen) {
                part.resize(chunk.len(), 0.0);
                updates.read(u, t, b * block.max(1), part)?;
            }
            crate::fedavg::weighted_sum(chunk, &parts.iter().map(Vec::as_slice).collect::<Vec<_>>(), &scales);
        }
        out.insert(name.clone(), Tensor { shape: shape.clone(), data });
    }
    Ok(out)
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

    fn held(updates: &[Weights]) -> InMemory<'_> {
        InMemory::new(updates).expect("same layout")
    }

    #[test]
    fn median_and_trimmed_mean_resist_one_poisoned_update() {
        let ups = honest_and_poisoned();
        let plain = crate::fedavg::fedavg(&ups.iter().map(|u| (u.clone(), 1)).collect::<Vec<_>>()).expect("fedavg");
        assert!(plain["p"].data[0] > 100.0, "FedAvg is dragged away: {:?}", plain["p"].data);
        let med = median(&held(&ups)).expect("median");
        assert_eq!(med["p"].data, vec![1.05, 2.0]);
        let tm = trimmed_mean(&held(&ups), 0.2).expect("trimmed");
        assert!((tm["p"].data[0] - (1.0 + 1.1 + 1.05) / 3.0).abs() < 1e-6, "{:?}", tm["p"].data);
        assert!((tm["p"].data[1] - (2.0 + 1.9 + 2.05) / 3.0).abs() < 1e-6, "{:?}", tm["p"].data);
        assert!(trimmed_mean(&held(&ups), 0.5).is_err());
    }

    #[test]
    fn krum_picks_from_the_honest_cluster() {
        let ups = honest_and_poisoned();
        let (model, chosen) = multi_krum(&held(&ups), 1, 1).expect("krum");
        assert!(!chosen.contains(&4));
        assert!(model["p"].data[0] < 2.0);
        let (model, chosen) = multi_krum(&held(&ups), 1, 3).expect("multi-krum");
        assert_eq!(chosen.len(), 3);
        assert!(!chosen.contains(&4) && (model["p"].data[0] - 1.0).abs() < 0.1);
        assert!(multi_krum(&held(&ups[..4]), 1, 1).is_err(), "too few updates for f = 1");
    }

    #[test]
    fn updates_of_other_layouts_and_no_updates_are_refused() {
        assert!(InMemory::new(&[]).is_err());
        assert!(InMemory::new(&[w(&[1.0, 2.0]), w(&[1.0])]).is_err());
    }

    /// Models of three tensors (one a scalar) with values from a seed.
    fn model(seed: u64, lens: &[usize]) -> Weights {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut m = Weights::new();
        for (i, &len) in lens.iter().enumerate() {
            let shape = if len == 1 { vec![] } else { vec![len] };
            m.insert(format!("t{i}"), Tensor { shape, data: (0..len).map(|_| next()).collect() });
        }
        m
    }

    /// The rules as they were before blocks: every coordinate and every pair at once.
    mod whole {
        use super::*;

        pub fn per_coordinate(updates: &[Weights], f: impl Fn(&[f32]) -> f32) -> Weights {
            updates[0]
                .iter()
                .map(|(name, t)| {
                    let data = (0..t.data.len())
                        .map(|i| {
                            let mut c: Vec<f32> = updates.iter().map(|u| u[name].data[i]).collect();
                            c.sort_by(f32::total_cmp);
                            f(&c)
                        })
                        .collect();
                    (name.clone(), Tensor { shape: t.shape.clone(), data })
                })
                .collect()
        }

        pub fn distance2(a: &Weights, b: &Weights) -> f64 {
            a.iter().map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>()).sum()
        }
    }

    #[test]
    fn every_block_size_gives_the_result_of_the_whole_bit_for_bit() {
        // Tensors longer and shorter than the blocks, of lengths no block divides.
        for k in [7, 8] {
            let ups: Vec<Weights> = (0..k).map(|s| model(s as u64 + 1, &[37, 1, 100])).collect();
            let mem = held(&ups);
            let median_whole = whole::per_coordinate(&ups, |c| if k % 2 == 1 { c[k / 2] } else { (c[k / 2 - 1] + c[k / 2]) / 2.0 });
            let cut = 1;
            let trimmed_whole =
                whole::per_coordinate(&ups, |c| (c[cut..k - cut].iter().map(|v| f64::from(*v)).sum::<f64>() / (k - 2 * cut) as f64) as f32);
            let scores_whole: Vec<f64> = (0..k)
                .map(|i| {
                    let mut d: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| whole::distance2(&ups[i], &ups[j])).collect();
                    d.sort_by(f64::total_cmp);
                    d[..k - 2 - 2].iter().sum()
                })
                .collect();
            for block in [1, 3, 8, 64, 1000] {
                assert_eq!(median_in_blocks(&mem, block).expect("median"), median_whole, "median of {k}, blocks of {block}");
                assert_eq!(
                    trimmed_mean_in_blocks(&mem, 0.2, block).expect("trimmed"),
                    trimmed_whole,
                    "trimmed mean of {k}, blocks of {block}"
                );
                assert_eq!(krum_scores_in_blocks(&mem, 2, block).expect("scores"), scores_whole, "Krum scores of {k}, blocks of {block}");
                let (model, chosen) = multi_krum_in_blocks(&mem, 2, 3, block).expect("multi-krum");
                let picked: Vec<(Weights, u64)> = chosen.iter().map(|&i| (ups[i].clone(), 1)).collect();
                assert_eq!(model, crate::fedavg::fedavg(&picked).expect("fedavg"), "multi-Krum's mean of {k}, blocks of {block}");
            }
        }
    }

    #[test]
    fn the_blocks_of_many_updates_stay_within_their_budget() {
        assert_eq!(block_len(1), 1 << 16);
        assert_eq!(block_len(100), 1 << 16);
        assert!(block_len(1000) * 1000 * 4 <= BLOCK_BYTES);
        assert_eq!(block_len(1_000_000), 1 << 10);
    }
}
