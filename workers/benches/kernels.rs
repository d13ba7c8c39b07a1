//! Training time and result with native and portable CPU kernels
//! (`flame_workers::kernels`). One process trains two models on the digits'
//! training split with libtorch and prints one line per model: the kernels,
//! the model, the seconds spent training, and the digest of the trained
//! weights. `scripts/bench.sh kernels` runs it alternately with
//! FLAME_KERNELS=native and FLAME_KERNELS=portable and prints the medians.

use std::time::Instant;

use flame_workers::data;
use flame_workers::kernels::Kernels;
use flame_workers::model::{ModelConfig, Net, TrainSettings, init_backend};
use flame_workers::weights;

fn main() {
    let kernels = match std::env::var("FLAME_KERNELS").as_deref() {
        Ok("portable") => Kernels::Portable,
        _ => Kernels::Native,
    };
    kernels.select().expect("kernels");
    init_backend();
    let digits = data::load("builtin://digits").expect("digits");
    let models = [
        ("mlp-1024x1024", serde_json::json!({"name": "mlp", "hidden": [1024, 1024]}), 64),
        ("cnn-32x64", serde_json::json!({"name": "cnn", "channels": [32, 64], "hidden": [128]}), 32),
    ];
    for (label, spec, batch_size) in models {
        let cfg = ModelConfig::from_json(&spec).expect("model");
        let mut net = Net::new(&cfg, &cfg.init(64, 10, 1)).expect("net");
        let settings = TrainSettings { epochs: 2, batch_size, learning_rate: 0.05, mu: 0.0, ..TrainSettings::default() };
        let started = Instant::now();
        net.train(&digits.train, &settings, 7).expect("train");
        let seconds = started.elapsed().as_secs_f64();
        let digest = weights::digest(&weights::encode(&net.weights().expect("weights")).expect("encode"));
        println!("kernels={} model={label} seconds={seconds:.3} digest={}", Kernels::current().name(), &digest[..16]);
    }
}
