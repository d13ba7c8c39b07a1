//! FedProx against FedAvg with stragglers, on Synthetic(1, 1), as in the
//! FedProx paper's straggler experiment (Li et al., 2020, section 5.2).
//!
//! 30 devices; each round 10 are chosen (seeded, uniformly); 90% of the chosen
//! are stragglers that run x ~ U{1..E-1} local epochs instead of E = 20.
//! FedAvg drops the stragglers' updates; FedProx (mu = 1) keeps them. Both
//! average the kept updates weighted by samples, train multinomial logistic
//! regression with SGD (learning rate 0.01, batch 10) from the same seeds, and
//! report the training loss: the sample-weighted loss of the global model on
//! every device's training split. Run: `cargo bench -p flame-workers --bench fedprox`
//! (FLAME_BENCH_ROUNDS sets the rounds, default 100).

use flame_events::rng::SplitMix;
use flame_workers::model::{ModelConfig, Net, TrainSettings, init_backend};
use flame_workers::synthetic::{self, CLASSES, DEVICES, FEATURES};
use flame_workers::weights::Weights;

const PER_ROUND: usize = 10;
const EPOCHS: usize = 20;
const STRAGGLERS: f64 = 0.9;

fn training_loss(cfg: &ModelConfig, w: &Weights, devices: &[flame_workers::data::Data]) -> f64 {
    let net = Net::new(cfg, w).expect("net");
    let (mut sum, mut n) = (0.0, 0usize);
    for d in devices {
        sum += net.evaluate(&d.train)["loss"] * d.train.len() as f64;
        n += d.train.len();
    }
    sum / n as f64
}

fn run(mu: f64, drop_stragglers: bool, rounds: usize, devices: &[flame_workers::data::Data], cfg: &ModelConfig) -> Vec<f64> {
    let mut global = cfg.init(FEATURES, CLASSES, 42);
    let mut rng = SplitMix::new(2020);
    let mut losses = vec![training_loss(cfg, &global, devices)];
    for round in 0..rounds {
        let mut ids: Vec<usize> = (0..DEVICES).collect();
        rng.shuffle(&mut ids);
        let chosen = &ids[..PER_ROUND];
        let mut kept = Vec::new();
        for (i, &k) in chosen.iter().enumerate() {
            let straggler = (i as f64) < STRAGGLERS * PER_ROUND as f64;
            let epochs = if straggler { 1 + (rng.next_u64() % (EPOCHS as u64 - 1)) as usize } else { EPOCHS };
            if straggler && drop_stragglers {
                continue;
            }
            let mut net = Net::new(cfg, &global).expect("net");
            let settings = TrainSettings { epochs, batch_size: 10, learning_rate: 0.01, mu, ..TrainSettings::default() };
            net.train(&devices[k].train, &settings, (round * DEVICES + k) as u64).expect("train");
            kept.push((net.weights().expect("weights"), devices[k].train.len() as u64));
        }
        global = flame_workers::fedavg::fedavg(&kept).expect("fedavg");
        losses.push(training_loss(cfg, &global, devices));
    }
    losses
}

fn main() {
    init_backend();
    let rounds: usize = std::env::var("FLAME_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(100);
    let devices: Vec<_> = (0..DEVICES).map(|k| synthetic::fedprox(1.0, 1.0, k, 0)).collect();
    let samples: usize = devices.iter().map(|d| d.train.len()).sum();
    let cfg = ModelConfig::from_json(&serde_json::json!({"name": "logreg"})).expect("cfg");
    println!(
        "Synthetic(1,1), seed 0: {DEVICES} devices, {samples} training samples; {PER_ROUND} devices a round, {:.0}% stragglers, E = {EPOCHS}, lr 0.01, batch 10, {rounds} rounds",
        STRAGGLERS * 100.0
    );
    let started = std::time::Instant::now();
    let fedavg = run(0.0, true, rounds, &devices, &cfg);
    let fedprox = run(1.0, false, rounds, &devices, &cfg);
    println!("round  FedAvg (drops stragglers)  FedProx mu=1 (keeps them)");
    for r in (0..=rounds).filter(|r| r % (rounds / 10).max(1) == 0 || *r == rounds) {
        println!("{r:>5}  {:>25.4}  {:>25.4}", fedavg[r], fedprox[r]);
    }
    let tail = |xs: &[f64]| xs[xs.len() - 10.min(xs.len())..].iter().sum::<f64>() / 10.min(xs.len()) as f64;
    println!(
        "mean training loss over the last 10 rounds: FedAvg {:.4}, FedProx {:.4} ({:.1} s)",
        tail(&fedavg),
        tail(&fedprox),
        started.elapsed().as_secs_f64()
    );
}
