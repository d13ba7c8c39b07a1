//! FedAvg throughput against Flower's numpy FedAvg and a memory-bandwidth baseline.
//!
//! For K = 10, 100 updates of P = 1M, 10M f32 parameters (4 layers), in one run:
//! - ours: `flame_workers::fedavg::fedavg_into_first`, FedAvg over updates in memory (f64
//!   accumulation, blocked, all cores, written over the first update), and
//!   `fedavg` on borrowed updates (a fresh output buffer), and the fold an
//!   aggregator runs as updates arrive (`Running`: one update at a time into
//!   an f64 accumulator of the model's size, so it reads and writes 16 bytes
//!   of accumulator for every 4 of update);
//! - baseline: summing the same K x P floats once, on all cores (what reading
//!   the bytes costs: no aggregation can beat it), over a fresh copy each run
//!   as ours is;
//! - Flower: `flwr.server.strategy.aggregate.aggregate` on numpy arrays of the
//!   same sizes, run by `scripts/flower_fedavg.py` with `FLOWER_PYTHON` (a venv
//!   with flwr; `scripts/bench.sh flower` makes one). Skipped when unset.
//!
//! GB/s = K x P x 4 bytes of updates read / median seconds (5 runs; Flower 3).
//!
//! `bash scripts/bench.sh flower` (or `cargo bench -p flame-workers --bench aggregate`).

use std::time::Instant;

use flame_workers::fedavg::{Running, fedavg, fedavg_into_first};
use flame_workers::weights::{Tensor, Weights};

/// Updates with their sample counts.
type Updates = Vec<(Weights, u64)>;

fn update(seed: u64, p: usize) -> Weights {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let sizes = [p / 4, p / 4, p / 4, p - 3 * (p / 4)];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let data = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            (format!("layer{i}.weight"), Tensor { shape: vec![n], data })
        })
        .collect()
}

/// Sums every float of every update once, split over all cores.
fn bandwidth_baseline(updates: &[(Weights, u64)]) -> f32 {
    let slices: Vec<&[f32]> = updates.iter().flat_map(|(w, _)| w.values().map(|t| t.data.as_slice())).collect();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let slices = &slices;
                scope.spawn(move || {
                    let mut acc = [0.0f32; 16];
                    for s in slices {
                        let per = s.len().div_ceil(threads);
                        let part = &s[(t * per).min(s.len())..((t + 1) * per).min(s.len())];
                        for chunk in part.chunks_exact(16) {
                            for (a, v) in acc.iter_mut().zip(chunk) {
                                *a += v;
                            }
                        }
                    }
                    acc.iter().sum::<f32>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(f());
                started.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn flower(k: usize, p: usize) -> Option<f64> {
    let python = std::env::var("FLOWER_PYTHON").ok()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/flower_fedavg.py");
    let out = std::process::Command::new(python).args([script, &k.to_string(), &p.to_string(), "3"]).output().ok()?;
    if !out.status.success() {
        eprintln!("flower run failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["median_s"].as_f64()
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!("FedAvg, {threads} threads; GB/s = K x P x 4 bytes read / median seconds");
    println!(
        "{:>4} {:>6}  {:>10} {:>8}  {:>12}  {:>10} {:>8}  {:>10} {:>8}  {:>7}  {:>10} {:>8}  {:>8}",
        "K", "P", "ours s", "GB/s", "borrowed s", "fold s", "GB/s", "sum s", "GB/s", "of sum", "Flower s", "GB/s", "vs Flower"
    );
    for (k, p) in [(10, 1_000_000), (100, 1_000_000), (10, 10_000_000), (100, 10_000_000)] {
        let updates: Vec<(Weights, u64)> = (0..k).map(|i| (update(i as u64 + 1, p), 50 + (i as u64 * 37) % 450)).collect();
        let gb = (k * p * 4) as f64 / 1e9;
        // As the aggregator runs it (`fedavg_into_first`), and the baseline: each run gets a
        // fresh copy, made and dropped untimed, so that both read updates in the same state
        // (the same run over the same updates again finds a 40 MB case partly in the cache).
        let fresh = |f: &dyn Fn(&mut Updates) -> usize| {
            median(
                (0..5)
                    .map(|_| {
                        let mut copy = updates.clone();
                        let started = Instant::now();
                        std::hint::black_box(f(&mut copy));
                        let secs = started.elapsed().as_secs_f64();
                        drop(copy);
                        secs
                    })
                    .collect(),
            )
        };
        let ours = fresh(&|copy| fedavg_into_first(copy).map(|w| w.len()).unwrap_or(0));
        // What an aggregator runs as the updates arrive: one at a time into an f64 accumulator.
        let fold = fresh(&|copy| {
            let samples: Vec<u64> = copy.iter().map(|(_, n)| *n).collect();
            let Ok(mut running) = Running::new(&samples) else { return 0 };
            for (w, _) in copy.iter() {
                if running.add(w).is_err() {
                    return 0;
                }
            }
            running.finish().map(|w| w.len()).unwrap_or(0)
        });
        let sum = fresh(&|copy| bandwidth_baseline(copy) as usize);
        let borrowed = time(5, || fedavg(&updates).map(|w| w.len()).unwrap_or(0));
        drop(updates);
        let fl = flower(k, p);
        let fmt = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.4}"));
        let rate = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{:.2}", gb / s));
        println!(
            "{:>4} {:>5}M  {:>10.4} {:>8.2}  {:>12.4}  {:>10.4} {:>8.2}  {:>10.4} {:>8.2}  {:>6.0}%  {:>10} {:>8}  {:>8}",
            k,
            p / 1_000_000,
            ours,
            gb / ours,
            borrowed,
            fold,
            gb / fold,
            sum,
            gb / sum,
            100.0 * sum / ours,
            fmt(fl),
            rate(fl),
            fl.map_or("-".into(), |f| format!("{:.1}x", f / ours))
        );
    }
}
