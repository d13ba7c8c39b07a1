//! FedAvg (McMahan et al. 2017): the sample-weighted mean of client models.

use crate::weights::{Block, Blocks, Error, Tensor, Weights, check_same_layout};

/// Elements per block: the f64 accumulator of a block (64 KiB) stays in L2
/// while every update's slice of it streams through once.
const BLOCK: usize = 8192;

/// Sums over fewer values than this (tensor length x updates) run on the calling thread.
const PARALLEL_FROM: usize = 1 << 21;

/// Averages models weighted by their sample counts. Every model must have the
/// layout of the first; the total weight must be positive. Sums run in f64,
/// update by update in the given order, so the result does not depend on how
/// the work is split.
pub fn fedavg(updates: &[(Weights, u64)]) -> Result<Weights, Error> {
    let scales = scales(updates)?;
    let mut out = Weights::new();
    for (name, t) in &updates[0].0 {
        let inputs: Vec<&[f32]> = updates.iter().filter_map(|(w, _)| w.get(name)).map(|t| t.data.as_slice()).collect();
        let mut data = vec![0.0f32; t.data.len()];
        weighted_sum(&mut data, &inputs, &scales);
        out.insert(name.clone(), Tensor { shape: t.shape.clone(), data });
    }
    Ok(out)
}

/// FedAvg written over the first update: its tensors become the result (the
/// first entry is left empty), so the output goes to memory that is already
/// mapped (on a VM, faulting in a fresh 40 MB buffer costs about as much as
/// reading 400 MB). The sums are the same, in the same order, as `fedavg`'s.
pub fn fedavg_into_first(updates: &mut [(Weights, u64)]) -> Result<Weights, Error> {
    let scales = scales(updates)?;
    let (head, rest) = updates.split_at_mut(1);
    let mut out = std::mem::take(&mut head[0].0);
    for (name, t) in &mut out {
        let inputs: Vec<&[f32]> = rest.iter().filter_map(|(w, _)| w.get(name)).map(|t| t.data.as_slice()).collect();
        weighted_sum_in_place(&mut t.data, &inputs, &scales);
    }
    Ok(out)
}

/// FedAvg folded one update at a time, in constant memory: an f64
/// accumulator per parameter (two models' worth of bytes) however many
/// updates there are. The sample counts of all updates are known first (the
/// aggregate command carries them), so each update enters with its final
/// weight and the sums are the same, in the same order, as [`fedavg`]'s: the
/// result is equal bit for bit.
#[derive(Debug)]
pub struct Running {
    sums: Sums,
}

/// Sums of updates folded in one at a time, each with a weight known before
/// the first goes in: what [`Running`] and FedBuff's fold keep.
#[derive(Debug)]
pub(crate) struct Sums {
    scales: Vec<f64>,
    added: usize,
    /// Each parameter's shape and f64 sums.
    pub(crate) acc: std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Sums {
    /// Sums with these weights, to be added in this order, starting from `acc`.
    pub(crate) fn new(scales: Vec<f64>, acc: std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)>) -> Self {
        Self { scales, added: 0, acc }
    }

    /// The weight of the next update.
    pub(crate) fn scale(&self) -> Result<f64, Error> {
        self.scales
            .get(self.added)
            .copied()
            .ok_or_else(|| Error::Mismatch(format!("more updates than the {} announced", self.scales.len())))
    }

    /// Counts an update in.
    pub(crate) fn added(&mut self) {
        self.added += 1;
    }

    /// The sums as f32, once every announced update went in.
    pub(crate) fn finish(self) -> Result<Weights, Error> {
        if self.added != self.scales.len() {
            return Err(Error::Mismatch(format!("{} of the {} announced updates went in", self.added, self.scales.len())));
        }
        Ok(self.acc.into_iter().map(|(k, (shape, acc))| (k, Tensor { shape, data: narrow(acc) })).collect())
    }
}

impl Running {
    /// A fold over updates with these sample counts, to be added in this order.
    pub fn new(samples: &[u64]) -> Result<Self, Error> {
        if samples.is_empty() {
            return Err(Error::Mismatch("no updates to aggregate".into()));
        }
        let total: f64 = samples.iter().map(|n| *n as f64).sum();
        if total <= 0.0 {
            return Err(Error::Mismatch("updates carry no samples".into()));
        }
        Ok(Self { sums: Sums::new(samples.iter().map(|n| *n as f64 / total).collect(), Default::default()) })
    }

    /// Folds in the next update; it must have the first one's layout. Its
    /// parameters are read where they are held, a block at a time: decoded,
    /// in the blob's bytes or in a file (the same sums whichever, with no
    /// decoded copy of the latter two).
    pub fn add(&mut self, update: &dyn Blocks) -> Result<(), Error> {
        let scale = self.next(update.shapes().into_iter())?;
        for (name, (_, acc)) in &mut self.sums.acc {
            update.read_blocks(name, &mut |at, block| accumulate_block(acc, at, block, scale))?;
        }
        self.sums.added();
        Ok(())
    }

    /// The next update's weight, once its layout is the first one's (the
    /// first one's makes the accumulator).
    fn next<'a>(&mut self, layout: impl Iterator<Item = (&'a String, &'a Vec<usize>)>) -> Result<f64, Error> {
        let scale = self.sums.scale()?;
        if self.sums.added == 0 {
            self.sums.acc = layout.map(|(k, shape)| (k.clone(), (shape.clone(), vec![0.0f64; shape.iter().product()]))).collect();
            return Ok(scale);
        }
        crate::weights::check_shapes(self.sums.acc.iter().map(|(name, (shape, _))| (name, shape)), layout)?;
        Ok(scale)
    }

    /// The mean, once every announced update went in.
    pub fn finish(self) -> Result<Weights, Error> {
        self.sums.finish()
    }
}

/// The f64 sums as f32, a block at a time from the end, each block of sums
/// given back as its values are written: a large tensor is held at most
/// once in f64 (two models' worth), not in f64 and f32 at once.
pub(crate) fn narrow(mut sums: Vec<f64>) -> Vec<f32> {
    const BLOCK: usize = 1 << 20;
    // Zeroed pages fresh from the system take no memory until written.
    let mut out = vec![0f32; sums.len()];
    while !sums.is_empty() {
        let from = sums.len().saturating_sub(BLOCK);
        out[from..].iter_mut().zip(&sums[from..]).for_each(|(o, s)| *o = *s as f32);
        sums.truncate(from);
        if sums.capacity() > 2 * BLOCK {
            sums.shrink_to_fit();
        }
    }
    out
}

/// The cores this process may use, asked once: the standard library reads the
/// cgroup's quota files on every call (0.1 ms; a round of a thousand small
/// updates called it four thousand times).
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// As [`accumulate`] from little-endian f32 bytes.
fn accumulate_le(acc: &mut [f64], bytes: &[u8], scale: f64) {
    on_cores(acc, bytes, 4, |acc, bytes| {
        acc.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(a, b)| *a += scale * f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    });
}

/// `acc[at + i] += scale * v[i]` for a block of values from `at` on, decoded or little-endian bytes.
pub(crate) fn accumulate_block(acc: &mut [f64], at: usize, block: Block<'_>, scale: f64) {
    match block {
        Block::F32(values) => accumulate(&mut acc[at..at + values.len()], values, scale),
        Block::Le(bytes) => accumulate_le(&mut acc[at..at + bytes.len() / 4], bytes, scale),
    }
}

/// `acc[i] += scale * v[i]`, on every core for large tensors.
fn accumulate(acc: &mut [f64], values: &[f32], scale: f64) {
    on_cores(acc, values, 1, |acc, values| acc.iter_mut().zip(values).for_each(|(a, &v)| *a += scale * f64::from(v)));
}

/// Runs `add` over parts of `acc` and the matching parts of `input`
/// (`width` items of it per value of `acc`), on every core for large tensors.
fn on_cores<T: Sync>(acc: &mut [f64], input: &[T], width: usize, add: impl Fn(&mut [f64], &[T]) + Sync) {
    let threads = if acc.len() < PARALLEL_FROM { 1 } else { cores() };
    if threads <= 1 {
        add(acc, input);
        return;
    }
    let per = acc.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (a, v) in acc.chunks_mut(per).zip(input.chunks(per * width)) {
            let add = &add;
            scope.spawn(move || add(a, v));
        }
    });
}

/// Each update's weight (its share of the samples), once every update is
/// checked to have the first one's layout and the samples add up to more than 0.
fn scales(updates: &[(Weights, u64)]) -> Result<Vec<f64>, Error> {
    let Some(((first, _), rest)) = updates.split_first() else {
        return Err(Error::Mismatch("no updates to aggregate".into()));
    };
    for (w, _) in rest {
        check_same_layout(first, w)?;
    }
    let total: f64 = updates.iter().map(|(_, n)| *n as f64).sum();
    if total <= 0.0 {
        return Err(Error::Mismatch("updates carry no samples".into()));
    }
    Ok(updates.iter().map(|(_, n)| *n as f64 / total).collect())
}

/// `out[i] = sum_k scales[k] * inputs[k][i]`, block by block, on every core for large tensors.
pub fn weighted_sum(out: &mut [f32], inputs: &[&[f32]], scales: &[f64]) {
    split(out, inputs.len(), |part, offset| sum_range(part, offset, Start::Zero, inputs, scales));
}

/// As `weighted_sum` where `out` holds input 0 (weight `scales[0]`) and
/// `rest` the others: each block reads `out` before it writes it.
pub fn weighted_sum_in_place(out: &mut [f32], rest: &[&[f32]], scales: &[f64]) {
    split(out, rest.len() + 1, |part, offset| sum_range(part, offset, Start::Own(scales[0]), rest, &scales[1..]));
}

/// Runs `f` over parts of `out` (whole blocks) on every core, or on this
/// thread when the sum (`out.len()` x `updates`) is small.
fn split(out: &mut [f32], updates: usize, f: impl Fn(&mut [f32], usize) + Sync) {
    let small = out.len().saturating_mul(updates) < PARALLEL_FROM || out.len() < 2 * BLOCK;
    on_parts(out, !small, BLOCK, f);
}

/// Runs `f(part, offset)` over parts of `out` (each a multiple of `align`
/// long, but the last) on every core when `parallel`, else once over all of it.
pub(crate) fn on_parts<T: Send>(out: &mut [T], parallel: bool, align: usize, f: impl Fn(&mut [T], usize) + Sync) {
    let threads = if parallel { cores() } else { 1 };
    if threads <= 1 || out.len() < 2 {
        f(out, 0);
        return;
    }
    let per = out.len().div_ceil(threads).div_ceil(align) * align;
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per).enumerate() {
            let f = &f;
            scope.spawn(move || f(part, i * per));
        }
    });
}

/// Where a block's sum starts.
#[derive(Clone, Copy)]
enum Start {
    /// From zero.
    Zero,
    /// From the block's own values times this weight (the first input).
    Own(f64),
}

fn sum_range(out: &mut [f32], offset: usize, start: Start, inputs: &[&[f32]], scales: &[f64]) {
    let mut acc = vec![0.0f64; BLOCK.min(out.len())];
    for (b, block) in out.chunks_mut(BLOCK).enumerate() {
        let begin = offset + b * BLOCK;
        let acc = &mut acc[..block.len()];
        match start {
            Start::Zero => acc.fill(0.0),
            // 0 + s*v, as the plain sum's first step.
            Start::Own(s) => {
                for (a, &v) in acc.iter_mut().zip(block.iter()) {
                    *a = 0.0 + s * f64::from(v);
                }
            }
        }
        add_inputs(acc, inputs, scales, begin);
        for (o, a) in block.iter_mut().zip(acc.iter()) {
            *o = *a as f32;
        }
    }
}

/// `acc[i] += scales[k] * inputs[k][begin + i]` for every input k in order.
/// Four inputs go through each value of `acc` at once: the same additions in
/// the same order (so the same bits), with a quarter of the accumulator's
/// loads and stores.
fn add_inputs(acc: &mut [f64], inputs: &[&[f32]], scales: &[f64], begin: usize) {
    let end = begin + acc.len();
    let mut fours = inputs.chunks_exact(4).zip(scales.chunks_exact(4));
    for (x, s) in fours.by_ref() {
        let (x0, x1, x2, x3) = (&x[0][begin..end], &x[1][begin..end], &x[2][begin..end], &x[3][begin..end]);
        for ((((a, &v0), &v1), &v2), &v3) in acc.iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
            let mut sum = *a;
            sum += s[0] * f64::from(v0);
            sum += s[1] * f64::from(v1);
            sum += s[2] * f64::from(v2);
            sum += s[3] * f64::from(v3);
            *a = sum;
        }
    }
    let done = inputs.len() / 4 * 4;
    for (input, &s) in inputs[done..].iter().zip(&scales[done..]) {
        for (a, &v) in acc.iter_mut().zip(&input[begin..end]) {
            *a += s * f64::from(v);
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

    #[test]
    fn the_owned_fedavg_equals_the_borrowed_one_bit_for_bit() {
        let mut seed = 3u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for len in [5, BLOCK + 1, PARALLEL_FROM + 777] {
            let updates: Vec<(Weights, u64)> =
                (0..4).map(|k| (model(&(0..len).map(|_| next()).collect::<Vec<_>>()), 10 + k as u64 * 7)).collect();
            let borrowed = fedavg(&updates).expect("fedavg");
            let mut updates = updates;
            let owned = fedavg_into_first(&mut updates).expect("in place");
            assert!(updates[0].0.is_empty(), "the first update's tensors became the result");
            assert!(borrowed["w"].data.iter().zip(&owned["w"].data).all(|(a, b)| a.to_bits() == b.to_bits()), "length {len}");
        }
        assert!(fedavg_into_first(&mut []).is_err());
        assert!(fedavg_into_first(&mut [(model(&[1.0]), 1), (model(&[1.0, 2.0]), 1)]).is_err());
    }

    /// Folding updates one at a time gives FedAvg's result bit for bit, in
    /// one thread and in many, and refuses what FedAvg refuses.
    #[test]
    fn the_running_fold_equals_fedavg_bit_for_bit() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        // Nine: two groups of four inputs at once in `fedavg`'s sums, and one alone.
        for len in [5, BLOCK + 1, PARALLEL_FROM + 777] {
            let updates: Vec<(Weights, u64)> = (0..9)
                .map(|k| {
                    let mut w = model(&(0..len).map(|_| next()).collect::<Vec<_>>());
                    w.insert("b".into(), Tensor { shape: vec![3], data: vec![next(), next(), next()] });
                    (w, 3 + k as u64 * 11)
                })
                .collect();
            let samples: Vec<u64> = updates.iter().map(|(_, n)| *n).collect();
            let mut running = Running::new(&samples).expect("running");
            // And from the blobs' bytes, with no decoded copy.
            let mut from_bytes = Running::new(&samples).expect("running");
            // And from files, a block at a time (the longest tensor is three blocks).
            let mut from_files = Running::new(&samples).expect("running");
            let dir = tempfile::tempdir().expect("tempdir");
            for (k, (w, _)) in updates.iter().enumerate() {
                running.add(w).expect("same layout");
                let bytes = crate::weights::encode(w).expect("encode");
                let path = dir.path().join(k.to_string());
                std::fs::write(&path, &bytes).expect("write");
                from_files.add(&crate::weights::PackedFile::open(&path).expect("file")).expect("same layout");
                let packed = crate::weights::decode_packed(bytes).expect("packed");
                from_bytes.add(&packed).expect("same layout");
            }
            let reference = fedavg(&updates).expect("fedavg");
            let folds = [
                ("decoded", running.finish().expect("all in")),
                ("from bytes", from_bytes.finish().expect("all in")),
                ("from files", from_files.finish().expect("all in")),
            ];
            for (how, folded) in folds {
                for name in ["w", "b"] {
                    assert_eq!(folded[name].shape, reference[name].shape);
                    assert!(
                        folded[name].data.iter().zip(&reference[name].data).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{name}, length {len}, {how}"
                    );
                }
            }
        }
        assert!(Running::new(&[]).is_err());
        assert!(Running::new(&[0, 0]).is_err());
        let mut r = Running::new(&[1, 1]).expect("running");
        r.add(&model(&[1.0])).expect("first");
        assert!(r.add(&model(&[1.0, 2.0])).is_err(), "another layout");
        let mut other = model(&[1.0]);
        other.insert("extra".into(), Tensor { shape: vec![1], data: vec![0.0] });
        assert!(r.add(&other).is_err(), "an extra tensor");
        assert!(Running::new(&[1, 1]).expect("running").finish().is_err(), "updates missing");
        let mut r = Running::new(&[1]).expect("running");
        r.add(&model(&[1.0])).expect("first");
        assert!(r.add(&model(&[1.0])).is_err(), "more than announced");
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
