//! Training throughput of a TorchScript module in the worker's training loop
//! (`ScriptNet`: libtorch through tch, one thread as workers train), for
//! `scripts/bench.sh torchscript`, which alternates it with the same module
//! trained by PyTorch's own Python loop (`scripts/bench_torchscript.py`) on
//! the same data. Prints one line: `loop=rust samples_per_s=... seconds=...`.
//!
//! Arguments: MODEL.pt DATA.npz EPOCHS BATCH.

use std::sync::Arc;

use flame_events::algorithm::{ClientOptimizer, Loss};
use flame_workers::model::{TrainSettings, Trainer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let [model, data, epochs, batch] = &args[..] else {
        eprintln!("usage: torchscript MODEL.pt DATA.npz EPOCHS BATCH");
        std::process::exit(2);
    };
    flame_workers::model::init_backend();
    let archive = Arc::new(flame_torchscript::Archive::read(std::fs::read(model).expect("model")).expect("archive"));
    let state = flame_workers::archive::state_of(&archive).expect("state");
    let d = flame_workers::data::load(data).expect("data");
    let settings = TrainSettings {
        epochs: epochs.parse().expect("epochs"),
        batch_size: batch.parse().expect("batch"),
        learning_rate: 0.05,
        mu: 0.0,
        loss: Loss::CrossEntropy,
        optimizer: ClientOptimizer::Sgd { momentum: 0.9, weight_decay: 0.0 },
    };
    let mut net = flame_workers::script::ScriptNet::new(archive, &state, &[], Loss::CrossEntropy).expect("module");
    let started = std::time::Instant::now();
    let metrics = net.train(&d.train, &settings, 1, None).expect("train");
    let seconds = started.elapsed().as_secs_f64();
    let samples = (d.train.len() * settings.epochs) as f64;
    println!("loop=rust samples_per_s={:.1} seconds={seconds:.3} loss={:.4}", samples / seconds, metrics["loss"]);
}
