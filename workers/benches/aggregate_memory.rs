//! Peak memory of an aggregator: K updates of M float32 parameters are put
//! in a blob folder, then one `aggregate` command runs through the worker's
//! own code path. Prints the peak resident memory during the aggregation
//! (VmHWM, reset before it) against the size of one update and of all K.
//!
//! RULE is `fedavg` (the default: each update folded in as it arrives),
//! `median`, `trimmed` (beta 0.1) or `krum` (f = K/10, m = K/2): these need
//! every update at once, and hold them in memory up to MB megabytes in all
//! (default: the worker's default, 1,024), on disk above. FedAvg folds an
//! update larger than MB from its file, a block at a time.
//!
//! `scaffold` and `feddyn` give each update its trainer's state (two
//! models' worth: a control variate and its change) and the aggregator a
//! server state of the last round (one); SCAFFOLD folds the update and the
//! state's change, FedDyn's step reads only the update;
//! `fedbuff` trains every other update from an older base model, one
//! version stale, and folds each update's change from its base.
//!
//! usage: cargo bench -p flame-workers --no-default-features --bench aggregate_memory -- K M [RULE [MB]]

use std::sync::Arc;
use std::time::Instant;

use flame_events::algorithm::ServerOptimizer;
use flame_events::model::Model;
use flame_events::protocol::{self, Command, CommandBody, ReportBody, UpdateRef, WorkerInfo};
use flame_transport::InProcess;
use flame_workers::blob::{BlobStore, LocalBlobs};
use flame_workers::runtime::Worker;
use flame_workers::weights::{self, Tensor, Weights};

fn status(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

/// An update of `m` values from a seed (a 64 x (m/64) "layer" and a bias).
fn update(m: usize, seed: u64) -> Weights {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let cols = m / 64;
    let mut w = Weights::new();
    w.insert("fc.weight".into(), Tensor { shape: vec![64, cols], data: (0..64 * cols).map(|_| next()).collect() });
    w.insert("fc.bias".into(), Tensor { shape: vec![64], data: (0..64).map(|_| next()).collect() });
    w
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let k: usize = raw.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let m: usize = raw.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000_000);
    let (rule, optimizer) = match raw.get(2).map(String::as_str).unwrap_or("fedavg") {
        "fedavg" => ("FedAvg", ServerOptimizer::FedAvg),
        "median" => ("median", ServerOptimizer::Median),
        "trimmed" => ("trimmed mean", ServerOptimizer::TrimmedMean { beta: 0.1 }),
        "krum" => ("multi-Krum", ServerOptimizer::Krum { f: (k / 10) as u32, m: (k / 2).max(1) as u32 }),
        "scaffold" => ("SCAFFOLD", ServerOptimizer::Scaffold { eta: 1.0 }),
        "feddyn" => ("FedDyn", ServerOptimizer::FedDyn { alpha: 0.1 }),
        "fedbuff" => ("FedBuff", ServerOptimizer::FedBuff { eta: 1.0 }),
        other => panic!("RULE is fedavg, median, trimmed, krum, scaffold, feddyn or fedbuff, not {other}"),
    };
    let budget_mb: u64 = raw.get(3).and_then(|a| a.parse().ok()).unwrap_or(flame_workers::spill::DEFAULT_IN_MEMORY >> 20);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
    let states = optimizer.keeps_client_state();
    let buffered = optimizer.is_asynchronous();
    let (global, refs, server_state) = rt.block_on(async {
        let put = |w: Weights| {
            let blobs = blobs.clone();
            async move { blobs.put(weights::encode(&w).expect("encode")).await.expect("put") }
        };
        let global = put(update(m, 0)).await;
        let older = if buffered { Some(put(update(m, u64::MAX)).await) } else { None };
        let mut refs = Vec::new();
        for i in 0..k as u64 {
            let mut u = UpdateRef::new(format!("t{i}"), put(update(m, i + 1)).await, 100 + i);
            if states {
                let (c, dc) = (update(m, 1_000_000 + i), update(m, 2_000_000 + i));
                u.client_state = Some(put(flame_workers::control::pack(&[("c", &c), ("dc", &dc)])).await);
            }
            if i % 2 == 1
                && let Some(older) = &older
            {
                u.base_model = Some(older.clone());
                u.staleness = 1;
            }
            refs.push(u);
        }
        // SCAFFOLD's and FedDyn's own state from the last round (one model's worth), as from round 2 on.
        let server_state = match optimizer {
            ServerOptimizer::Scaffold { .. } => Some(put(flame_workers::control::pack(&[("c", &update(m, 3_000_000))])).await),
            ServerOptimizer::FedDyn { .. } => Some(put(flame_workers::control::pack(&[("h", &update(m, 3_000_000))])).await),
            _ => None,
        };
        (global, refs, server_state)
    });
    let update_mb = (m * 4) as f64 / 1e6;
    // Forget the peak of making the updates: measure the aggregation alone.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status("VmRSS:");
    let info =
        WorkerInfo { id: "agg".into(), roles: vec!["aggregator".into()], realm: "default".into(), device: "cpu".into(), group: None };
    let worker =
        Worker::new(info, Arc::new(InProcess::default()), blobs).with_updates_in_memory(budget_mb << 20, dir.path().join("updates"));
    let held = match flame_workers::aggregate::needs(&optimizer) {
        flame_workers::aggregate::Needs::Blocks if (m * 4 * k) as u64 > budget_mb << 20 => {
            format!("; updates on disk (over {budget_mb} MB)")
        }
        flame_workers::aggregate::Needs::Blocks => format!("; updates in memory (within {budget_mb} MB)"),
        // The worker reads one large update ahead of its fold (16 MiB's worth of small ones).
        flame_workers::aggregate::Needs::Mean if (m * 4).max(16 << 20) as u64 > budget_mb << 20 => {
            format!("; each folded from its file (over {budget_mb} MB)")
        }
        flame_workers::aggregate::Needs::Mean => "; each folded from its bytes".to_string(),
        // The trainers' states are read as their updates are: from the bytes, or from files over the budget.
        flame_workers::aggregate::Needs::MeanAndStates => {
            let from = if (m * 4).max(16 << 20) as u64 > budget_mb << 20 { format!("files (over {budget_mb} MB)") } else { "bytes".into() };
            match flame_workers::aggregate::reads_client_states(&optimizer) {
                true => format!("; each folded with its trainer's state (two models' worth), from their {from}"),
                false => format!("; each folded from its {from}; the trainers' states (two models' worth each) are not read"),
            }
        }
        _ => "; each folded with its base model (every other one an older base, one version stale)".to_string(),
    };
    let command = Command {
        v: protocol::VERSION,
        id: "agg".into(),
        job_id: "bench".into(),
        task_id: "aggregator".into(),
        round: 1,
        traceparent: None,
        body: CommandBody::Aggregate {
            model: Model::Mlp { hidden: vec![] },
            optimizer,
            trainers: k as u32,
            optimizer_state: server_state,
            global_model: global,
            updates: refs,
            eval_dataset: None,
            loss: Default::default(),
        },
    };
    let started = Instant::now();
    let report = rt.block_on(worker.execute(&command));
    let seconds = started.elapsed().as_secs_f64();
    assert!(matches!(report.body, ReportBody::Aggregated { ref excluded, .. } if excluded.is_empty()), "{:?}", report.body);
    let peak = status("VmHWM:") as f64 / 1e3;
    println!(
        "{rule} of {k} updates x {m} params ({update_mb:.0} MB each, {:.0} MB in all{held}): peak RSS {peak:.0} MB while aggregating ({:.1} updates' worth; {:.0} MB resident before), {seconds:.2} s",
        update_mb * k as f64,
        peak / update_mb,
        before as f64 / 1e3
    );
}
