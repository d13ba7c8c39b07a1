//! Built-in models: their description, initial weights and evaluation in
//! plain Rust (all an aggregator needs), and training on the tch (libtorch)
//! backend when the `tch` feature is on (the default).
//!
//! Initial weights are drawn in Rust from a seeded generator and batches are
//! shuffled the same way, so training is deterministic for a seed even when
//! several workers share one process (libtorch's global RNG is not touched).

#[cfg(feature = "tch")]
use tch::nn::{self, Module};
#[cfg(feature = "tch")]
use tch::{Device, Tensor as TchTensor};

pub use crate::training::{Error, TrainSettings};
use flame_events::job::Metrics;
use flame_events::model::Model;

use crate::split::Split;
use crate::weights::{State, Tensor, Weights};
use flame_events::rng::SplitMix;

#[cfg(feature = "tch")]
fn torch(e: tch::TchError) -> Error {
    Error::Torch(e.to_string())
}

/// A model a worker builds: the job's typed [`Model`], checked for what this
/// worker can make of it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The model.
    pub model: Model,
}

impl ModelConfig {
    /// The model a command names.
    pub fn new(model: &Model) -> Result<Self, Error> {
        if let Model::Cnn { channels, .. } = model
            && (channels.is_empty() || channels.contains(&0))
        {
            return Err(Error::Config(format!("model 'cnn' needs at least one convolution with channels > 0, not {channels:?}")));
        }
        Ok(Self { model: model.clone() })
    }

    /// Reads a model from its JSON form (`{"name": "mlp", "hidden": [32]}`).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, Error> {
        let model: Model = serde_json::from_value(v.clone()).map_err(|e| Error::Config(format!("bad model description {v}: {e}")))?;
        Self::new(&model)
    }

    /// Whether it is the CNN.
    pub fn is_cnn(&self) -> bool {
        matches!(self.model, Model::Cnn { .. })
    }

    fn channels(&self) -> &[usize] {
        self.model.channels()
    }

    /// `cnn`: the side of the square one-channel images `inputs` features make,
    /// which each convolution's 2x2 pooling halves.
    pub fn image_side(&self, inputs: usize) -> Result<usize, Error> {
        let side = (inputs as f64).sqrt().round() as usize;
        let shrink = 1usize << self.channels().len();
        if side * side != inputs || !side.is_multiple_of(shrink) {
            return Err(Error::Config(format!(
                "model 'cnn' needs square images whose side divides by {shrink} ({} poolings); {inputs} features are not",
                self.channels().len()
            )));
        }
        Ok(side)
    }

    /// Fully connected layer sizes from inputs (for a `cnn`: the flattened
    /// output of its convolutions) to classes.
    pub fn layers(&self, inputs: usize, classes: usize) -> Vec<(usize, usize)> {
        let mut sizes = vec![inputs];
        if self.is_cnn() {
            let side = (inputs as f64).sqrt().round() as usize >> self.channels().len();
            sizes = vec![self.channels().last().copied().unwrap_or(1) * side * side];
        }
        sizes.extend(self.model.hidden());
        sizes.push(classes);
        sizes.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Fresh weights, uniform in ±1/sqrt(fan_in) as PyTorch's Linear does.
    pub fn init(&self, inputs: usize, classes: usize, seed: u64) -> Weights {
        let mut rng = SplitMix::new(seed);
        let mut uniform = |bound: f64| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound;
        let mut w = Weights::new();
        if self.is_cnn() {
            let mut c_in = 1;
            for (i, &c_out) in self.channels().iter().enumerate() {
                let bound = 1.0 / ((c_in * 9) as f64).sqrt();
                let weight = (0..c_out * c_in * 9).map(|_| uniform(bound) as f32).collect();
                let bias = (0..c_out).map(|_| uniform(bound) as f32).collect();
                w.insert(format!("conv{}.weight", i + 1), Tensor { shape: vec![c_out, c_in, 3, 3], data: weight });
                w.insert(format!("conv{}.bias", i + 1), Tensor { shape: vec![c_out], data: bias });
                c_in = c_out;
            }
        }
        for (i, (fan_in, fan_out)) in self.layers(inputs, classes).into_iter().enumerate() {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let weight = (0..fan_in * fan_out).map(|_| uniform(bound) as f32).collect();
            let bias = (0..fan_out).map(|_| uniform(bound) as f32).collect();
            w.insert(format!("fc{}.weight", i + 1), Tensor { shape: vec![fan_out, fan_in], data: weight });
            w.insert(format!("fc{}.bias", i + 1), Tensor { shape: vec![fan_out], data: bias });
        }
        w
    }
}

/// Loss (mean cross-entropy) and accuracy of weights on a split, computed in
/// plain Rust (f32 layers, f64 loss): what an aggregator reports for a new
/// global model, with or without libtorch.
pub fn evaluate(cfg: &ModelConfig, weights: &Weights, data: &Split) -> Result<Metrics, Error> {
    let mut layers = Vec::new();
    for i in 1.. {
        let Some(w) = weights.get(&format!("fc{i}.weight")) else { break };
        let b = weights.get(&format!("fc{i}.bias")).ok_or_else(|| Error::Weights(format!("fc{i}.bias is missing")))?;
        let [fan_out, fan_in] = w.shape[..] else {
            return Err(Error::Weights(format!("fc{i}.weight has shape {:?}; expected [out, in]", w.shape)));
        };
        if b.data.len() != fan_out || w.data.len() != fan_out * fan_in {
            return Err(Error::Weights(format!(
                "fc{i} has {} weights and {} biases for [{fan_out}, {fan_in}]",
                w.data.len(),
                b.data.len()
            )));
        }
        layers.push((w, b, fan_in, fan_out));
    }
    if layers.is_empty() || (cfg.model == Model::Logreg && layers.len() != 1) {
        return Err(Error::Weights(format!("{} layer(s) found for model '{}'", layers.len(), cfg.model.name())));
    }
    let convs = convolutions(weights)?;
    let side = if convs.is_empty() { 0 } else { cfg.image_side(data.features)? };
    let flat = if convs.is_empty() { data.features } else { convs.last().map_or(0, |c| c.0.shape[0]) * (side >> convs.len()).pow(2) };
    if layers[0].2 != flat {
        return Err(Error::Weights(format!("the model takes {} features, the data gives {flat}", layers[0].2)));
    }
    if data.is_empty() {
        return Ok(Metrics::new());
    }
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let last = layers.len() - 1;
    for (row, &label) in data.x.chunks_exact(data.features).zip(&data.y) {
        let mut h = row.to_vec();
        let mut s = side;
        for (w, b) in &convs {
            h = conv3x3_relu_pool(&h, s, w, b);
            s /= 2;
        }
        for (i, (w, b, fan_in, _)) in layers.iter().enumerate() {
            h = w
                .data
                .chunks_exact(*fan_in)
                .zip(&b.data)
                .map(|(wr, bias)| {
                    let z = wr.iter().zip(&h).map(|(a, x)| a * x).sum::<f32>() + bias;
                    if i < last { z.max(0.0) } else { z }
                })
                .collect();
        }
        let max = h.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = h.iter().map(|z| f64::from(z - max).exp()).sum::<f64>().ln() + f64::from(max);
        let label = usize::try_from(label).unwrap_or(usize::MAX);
        let Some(&target) = h.get(label) else {
            return Err(Error::Config(format!("label {label} is outside the model's {} classes", h.len())));
        };
        loss += log_sum - f64::from(target);
        // The first maximum wins ties, as argmax does.
        let best = h.iter().enumerate().fold(0, |best, (j, z)| if *z > h[best] { j } else { best });
        correct += usize::from(best == label);
    }
    let n = data.len() as f64;
    Ok(Metrics::from([("loss".to_string(), loss / n), ("accuracy".to_string(), correct as f64 / n), ("test_samples".to_string(), n)]))
}

/// The convolutions of a `cnn`'s weights (`conv1.*`, `conv2.*`, ...), checked.
fn convolutions(weights: &Weights) -> Result<Vec<(&Tensor, &Tensor)>, Error> {
    let mut out: Vec<(&Tensor, &Tensor)> = Vec::new();
    for i in 1.. {
        let Some(w) = weights.get(&format!("conv{i}.weight")) else { break };
        let b = weights.get(&format!("conv{i}.bias")).ok_or_else(|| Error::Weights(format!("conv{i}.bias is missing")))?;
        let c_in = out.last().map_or(1, |(w, _)| w.shape[0]);
        match w.shape[..] {
            [c_out, ci, 3, 3] if ci == c_in && b.shape == [c_out] && w.data.len() == c_out * ci * 9 && b.data.len() == c_out => {
                out.push((w, b))
            }
            _ => {
                return Err(Error::Weights(format!(
                    "conv{i}.weight has shape {:?} (bias {:?}); expected [out, {c_in}, 3, 3] and [out]",
                    w.shape, b.shape
                )));
            }
        }
    }
    Ok(out)
}

/// One 3x3 convolution (padding 1) over `side` x `side` channels, ReLU, then
/// 2x2 max pooling: channel-major in and out, as PyTorch lays out NCHW.
fn conv3x3_relu_pool(input: &[f32], side: usize, w: &Tensor, b: &Tensor) -> Vec<f32> {
    let (c_out, c_in) = (w.shape[0], w.shape[1]);
    let half = side / 2;
    let mut out = vec![0f32; c_out * half * half];
    let mut plane = vec![0f32; side * side];
    for co in 0..c_out {
        for y in 0..side {
            for x in 0..side {
                let mut z = b.data[co];
                for ci in 0..c_in {
                    for ky in 0..3 {
                        let Some(iy) = (y + ky).checked_sub(1).filter(|v| *v < side) else { continue };
                        for kx in 0..3 {
                            let Some(ix) = (x + kx).checked_sub(1).filter(|v| *v < side) else { continue };
                            z += w.data[((co * c_in + ci) * 3 + ky) * 3 + kx] * input[(ci * side + iy) * side + ix];
                        }
                    }
                }
                plane[y * side + x] = z.max(0.0);
            }
        }
        for y in 0..half {
            for x in 0..half {
                let at = |dy: usize, dx: usize| plane[(2 * y + dy) * side + 2 * x + dx];
                out[(co * half + y) * half + x] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
            }
        }
    }
    out
}

/// A training backend: the model a trainer task trains from a global model.
/// [`Net`] (libtorch) is the built-in one; [`trainer`] picks it for a model
/// description. Another backend implements this and is returned there.
pub trait Trainer {
    /// One round of local training; `correction` is added to every gradient
    /// (SCAFFOLD's `c - c_i`, FedDyn's `-g_i`). Returns the training metrics
    /// (at least `loss`, the mean training loss of the last epoch).
    fn train(&mut self, data: &Split, settings: &TrainSettings, seed: u64, correction: Option<&Weights>) -> Result<Metrics, Error>;
    /// Loss and accuracy on a split.
    fn evaluate(&mut self, data: &Split) -> Metrics;
    /// The current weights.
    fn weights(&self) -> Result<Weights, Error>;
    /// The whole state: the weights, and buffers and counters where the model has them.
    fn state(&self) -> Result<State, Error> {
        Ok(State::params(self.weights()?))
    }
}

/// The backend that trains `cfg`, starting from `weights`.
#[cfg(feature = "tch")]
pub fn trainer(cfg: &ModelConfig, weights: &Weights) -> Result<Box<dyn Trainer>, Error> {
    Ok(Box::new(Net::new(cfg, weights)?))
}

#[cfg(feature = "tch")]
impl Trainer for Net {
    fn train(&mut self, data: &Split, settings: &TrainSettings, seed: u64, correction: Option<&Weights>) -> Result<Metrics, Error> {
        self.train_corrected(data, settings, seed, correction)
    }

    fn evaluate(&mut self, data: &Split) -> Metrics {
        Net::evaluate(self, data)
    }

    fn weights(&self) -> Result<Weights, Error> {
        Net::weights(self)
    }
}

/// A built-in model on libtorch.
#[cfg(feature = "tch")]
pub struct Net {
    vs: nn::VarStore,
    convs: Vec<nn::Conv2D>,
    side: i64,
    layers: Vec<nn::Linear>,
}

/// A libtorch tensor holding a copy of `t`'s values, in its shape.
#[cfg(feature = "tch")]
fn tensor_of(name: &str, t: &Tensor) -> Result<TchTensor, Error> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    TchTensor::from_slice(&t.data)
        .f_view(shape.as_slice())
        .map_err(|e| Error::Weights(format!("tensor '{name}' has {} values, not its shape {:?}'s: {e}", t.data.len(), t.shape)))
}

#[cfg(feature = "tch")]
fn to_tensors(split: &Split) -> (TchTensor, TchTensor) {
    let x = TchTensor::from_slice(&split.x).view([split.len() as i64, split.features as i64]);
    let y = TchTensor::from_slice(&split.y);
    (x, y)
}

#[cfg(feature = "tch")]
impl Net {
    /// Builds the model with the given weights.
    pub fn new(cfg: &ModelConfig, weights: &Weights) -> Result<Self, Error> {
        let vs = nn::VarStore::new(Device::Cpu);
        // Every tensor is overwritten by `weights` below: initialising them at random first
        // only cost time (training draws from its own seeded generator, not torch's).
        let zero = nn::Init::Const(0.0);
        let mut convs = Vec::new();
        for (i, (w, _)) in convolutions(weights)?.iter().enumerate() {
            let config = nn::ConvConfig { padding: 1, ws_init: zero, bs_init: zero, ..Default::default() };
            convs.push(nn::conv2d(vs.root() / format!("conv{}", i + 1), w.shape[1] as i64, w.shape[0] as i64, 3, config));
        }
        let mut layers = Vec::new();
        for i in 1.. {
            let Some(w) = weights.get(&format!("fc{i}.weight")) else {
                break;
            };
            let [fan_out, _] = w.shape[..] else {
                return Err(Error::Weights(format!("fc{i}.weight has shape {:?}; expected [out, in]", w.shape)));
            };
            let name = format!("fc{i}.bias");
            let b = weights.get(&name).ok_or_else(|| Error::Weights(format!("tensor '{name}' is missing")))?;
            if b.shape != [fan_out] {
                return Err(Error::Weights(format!("tensor '{name}' has shape {:?}, the model needs [{fan_out}]", b.shape)));
            }
            // The linear layers (where a large model's size is) are made from the weights
            // themselves: made at zero and then copied into, they would need the model a third time.
            let path = vs.root() / format!("fc{i}");
            let (ws, bs) =
                (path.add("weight", tensor_of(&format!("fc{i}.weight"), w)?, true), path.add("bias", tensor_of(&name, b)?, true));
            layers.push(nn::Linear { ws, bs: Some(bs) });
        }
        if layers.is_empty() || (cfg.model == Model::Logreg && layers.len() != 1) {
            return Err(Error::Weights(format!("{} layer(s) found for model '{}'", layers.len(), cfg.model.name())));
        }
        // The image side follows from the first linear layer: channels x (side / 2^convs)^2 inputs.
        let side = match (weights.get("fc1.weight"), convs.len()) {
            (_, 0) => 0,
            (Some(fc1), n) => {
                let channels = weights.get(&format!("conv{n}.weight")).map_or(1, |w| w.shape[0]);
                let cells = fc1.shape.get(1).copied().unwrap_or(0) / channels;
                ((cells as f64).sqrt().round() as i64) << n
            }
            (None, _) => 0,
        };
        if cfg.is_cnn() && convs.is_empty() {
            return Err(Error::Weights("model 'cnn' needs conv1.weight".into()));
        }
        let mut net = Self { vs, convs, side, layers };
        net.load(weights)?;
        Ok(net)
    }

    /// Copies the weights into the convolutions (the linear layers were made from them).
    fn load(&mut self, weights: &Weights) -> Result<(), Error> {
        let vars = self.vs.variables();
        if vars.len() != weights.len() {
            return Err(Error::Weights(format!("model has {} tensors, weights have {}", vars.len(), weights.len())));
        }
        tch::no_grad(|| {
            for (name, mut var) in vars.into_iter().filter(|(name, _)| name.starts_with("conv")) {
                let w = weights.get(&name).ok_or_else(|| Error::Weights(format!("tensor '{name}' is missing")))?;
                let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
                if var.size() != shape {
                    return Err(Error::Weights(format!("tensor '{name}' has shape {:?}, the model needs {:?}", w.shape, var.size())));
                }
                var.copy_(&tensor_of(&name, w)?);
            }
            Ok(())
        })
    }

    /// The current weights as plain values.
    pub fn weights(&self) -> Result<Weights, Error> {
        let mut out = Weights::new();
        for (name, var) in self.vs.variables() {
            let shape = var.size().iter().map(|&d| d as usize).collect();
            let data = Vec::<f32>::try_from(&var.detach().flatten(0, -1)).map_err(torch)?;
            out.insert(name, Tensor { shape, data });
        }
        Ok(out)
    }

    fn forward(&self, x: &TchTensor) -> TchTensor {
        let last = self.layers.len() - 1;
        let x = if self.convs.is_empty() {
            x.shallow_clone()
        } else {
            let h = x.view([-1, 1, self.side, self.side]);
            self.convs.iter().fold(h, |h, c| h.apply(c).relu().max_pool2d_default(2)).flatten(1, -1)
        };
        self.layers.iter().enumerate().fold(x, |h, (i, l)| {
            let z = l.forward(&h);
            if i < last { z.relu() } else { z }
        })
    }

    /// Minibatch SGD on a split; returns the mean training loss of the last epoch.
    pub fn train(&mut self, data: &Split, settings: &TrainSettings, seed: u64) -> Result<Metrics, Error> {
        self.train_corrected(data, settings, seed, None)
    }

    /// Minibatch steps one round of training takes on `rows` rows.
    pub fn steps(rows: usize, settings: &TrainSettings) -> usize {
        settings.epochs.max(1) * rows.div_ceil(settings.batch_size.max(1))
    }

    /// As `train`, with a fixed vector added to every gradient (SCAFFOLD's
    /// `c - c_i`, FedDyn's `-g_i`): the objective gains `<correction, w>`.
    pub fn train_corrected(
        &mut self,
        data: &Split,
        settings: &TrainSettings,
        seed: u64,
        correction: Option<&Weights>,
    ) -> Result<Metrics, Error> {
        if data.is_empty() {
            return Err(Error::Config("no training rows".into()));
        }
        let mut params: Vec<(String, TchTensor)> = self.vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let (x, y) = (crate::fit::inputs(data, &[])?, crate::fit::targets(data, settings.loss)?);
        crate::fit::fit(&self.vs, &params, &|bx| Ok(self.forward(bx)), &x, &y, settings, seed, correction)
    }

    /// Loss and accuracy on a split.
    pub fn evaluate(&self, data: &Split) -> Metrics {
        if data.is_empty() {
            return Metrics::new();
        }
        let (x, y) = to_tensors(data);
        tch::no_grad(|| {
            let logits = self.forward(&x);
            Metrics::from([
                ("loss".to_string(), logits.cross_entropy_for_logits(&y).double_value(&[])),
                ("accuracy".to_string(), logits.accuracy_for_logits(&y).double_value(&[])),
                ("test_samples".to_string(), data.len() as f64),
            ])
        })
    }
}

/// Uses one libtorch thread per process: on small machines more threads make
/// training erratic (see docs).
/// Safe to call more than once (libtorch refuses a second interop setting).
pub fn init_backend() {
    #[cfg(feature = "tch")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tch::set_num_threads(1);
            tch::set_num_interop_threads(1);
        });
    }
}

/// Whether this build can train (the `tch` feature).
pub const CAN_TRAIN: bool = cfg!(feature = "tch");

#[cfg(all(test, feature = "tch"))]
mod tests {
    use super::*;
    use crate::data;
    use flame_events::algorithm::{ClientObjective, Training};

    #[test]
    fn plain_rust_evaluation_agrees_with_libtorch() {
        init_backend();
        let d = data::load("builtin://digits?part=2&of=3").expect("digits");
        for (cfg, seed) in [
            (serde_json::json!({"name": "mlp", "hidden": [32, 16]}), 4),
            (serde_json::json!({"name": "logreg"}), 9),
            (serde_json::json!({"name": "cnn", "channels": [4, 8], "hidden": [16]}), 2),
        ] {
            let cfg = ModelConfig::from_json(&cfg).expect("cfg");
            let mut net = Net::new(&cfg, &cfg.init(64, 10, seed)).expect("net");
            net.train(&d.train, &TrainSettings { epochs: 5, batch_size: 16, learning_rate: 0.3, mu: 0.0, ..TrainSettings::default() }, 1)
                .expect("train");
            let w = net.weights().expect("w");
            let (torch, plain) = (net.evaluate(&d.test), evaluate(&cfg, &w, &d.test).expect("evaluate"));
            // libtorch reports accuracy as an f32; ours is the exact fraction.
            assert!((plain["accuracy"] - torch["accuracy"]).abs() < 1e-6, "{cfg:?}: {plain:?} vs {torch:?}");
            assert!((plain["loss"] - torch["loss"]).abs() < 1e-5, "{cfg:?}: {plain:?} vs {torch:?}");
            assert!(torch["accuracy"] > 0.5);
        }
        let cfg = ModelConfig::from_json(&serde_json::json!({"name": "logreg"})).expect("cfg");
        assert!(evaluate(&cfg, &cfg.init(63, 10, 0), &d.test).is_err(), "feature count checked");
    }

    #[test]
    fn training_learns_digits_and_is_deterministic() {
        init_backend();
        let d = data::load("builtin://digits?part=0&of=3").expect("digits");
        let cfg = ModelConfig::from_json(&serde_json::json!({"name": "mlp", "hidden": [32]})).expect("cfg");
        let init = cfg.init(64, 10, 7);
        assert_eq!(init["fc1.weight"].shape, vec![32, 64]);
        assert_eq!(init["fc2.bias"].shape, vec![10]);
        let settings = TrainSettings { epochs: 5, batch_size: 16, learning_rate: 0.3, mu: 0.0, ..TrainSettings::default() };
        let before = Net::new(&cfg, &init).expect("net").evaluate(&d.test)["accuracy"];
        let mut a = Net::new(&cfg, &init).expect("net");
        a.train(&d.train, &settings, 1).expect("train");
        let mut b = Net::new(&cfg, &init).expect("net");
        b.train(&d.train, &settings, 1).expect("train");
        assert_eq!(a.weights().expect("w"), b.weights().expect("w"));
        // The gradients are freed when training ends, so reading the weights out holds two models, not three.
        let vars = a.vs.variables();
        assert!(vars.values().all(|v| v.requires_grad() && !v.grad().defined()), "gradients left after training");
        let after = a.evaluate(&d.test)["accuracy"];
        assert!(after > 0.8 && after > before + 0.5, "accuracy {before} -> {after}");
    }

    #[test]
    fn the_proximal_term_keeps_local_weights_near_the_global_model() {
        init_backend();
        let d = data::load("builtin://digits?part=1&of=3").expect("digits");
        let cfg = ModelConfig::from_json(&serde_json::json!({"name": "mlp", "hidden": [16]})).expect("cfg");
        let init = cfg.init(64, 10, 3);
        let drift = |mu: f64| {
            let mut net = Net::new(&cfg, &init).expect("net");
            net.train(&d.train, &TrainSettings { epochs: 3, batch_size: 16, learning_rate: 0.3, mu, ..TrainSettings::default() }, 5)
                .expect("train");
            let w = net.weights().expect("w");
            w.iter().map(|(k, t)| t.data.iter().zip(&init[k].data).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>()).sum::<f64>().sqrt()
        };
        let (plain, prox) = (drift(0.0), drift(1.0));
        assert!(prox < 0.8 * plain, "mu = 1 should pull the weights back: drift {prox} vs {plain}");
        assert!(prox > 0.0);
        let training = Training { epochs: 3, batch_size: 16, learning_rate: 0.3, ..Training::default() };
        assert_eq!(TrainSettings::new(&training, &ClientObjective::Proximal { mu: 0.5 }).mu, 0.5);
        assert_eq!(TrainSettings::new(&training, &ClientObjective::FedDyn { alpha: 0.01 }).mu, 0.01);
        assert_eq!(TrainSettings::new(&training, &ClientObjective::Scaffold).mu, 0.0);
    }

    #[test]
    fn a_small_cnn_learns_digits_and_checks_its_images() {
        init_backend();
        let d = data::load("builtin://digits?part=0&of=1").expect("digits");
        let cfg = ModelConfig::from_json(&serde_json::json!({"name": "cnn"})).expect("cnn");
        let init = cfg.init(64, 10, 3);
        let shapes: Vec<(&str, &[usize])> = init.iter().map(|(k, t)| (k.as_str(), t.shape.as_slice())).collect();
        assert_eq!(
            shapes,
            [
                ("conv1.bias", &[8][..]),
                ("conv1.weight", &[8, 1, 3, 3][..]),
                ("conv2.bias", &[16][..]),
                ("conv2.weight", &[16, 8, 3, 3][..]),
                ("fc1.bias", &[32][..]),
                ("fc1.weight", &[32, 64][..]),
                ("fc2.bias", &[10][..]),
                ("fc2.weight", &[10, 32][..]),
            ]
        );
        let mut net = Net::new(&cfg, &init).expect("net");
        net.train(&d.train, &TrainSettings { epochs: 10, batch_size: 16, learning_rate: 0.3, mu: 0.0, ..TrainSettings::default() }, 1)
            .expect("train");
        let accuracy = evaluate(&cfg, &net.weights().expect("w"), &d.test).expect("evaluate")["accuracy"];
        assert!(accuracy > 0.9, "CNN test accuracy {accuracy}");
        assert!(cfg.image_side(64).is_ok());
        assert!(cfg.image_side(63).is_err(), "not square");
        assert!(cfg.image_side(36).is_err(), "6 does not halve twice");
        let bad = ModelConfig::from_json(&serde_json::json!({"name": "cnn", "channels": []}));
        assert!(bad.is_err());
        // A convolution of the wrong shape is named.
        let mut wrong = init.clone();
        wrong.insert("conv2.weight".into(), Tensor { shape: vec![16, 4, 3, 3], data: vec![0.0; 16 * 4 * 9] });
        assert!(matches!(evaluate(&cfg, &wrong, &d.test), Err(Error::Weights(m)) if m.contains("conv2.weight")));
    }

    /// One client, one full-batch epoch a round, FedAvg over the one update:
    /// the same as training centrally for as many full-batch epochs.
    #[test]
    fn one_client_fedavg_with_full_batch_sgd_is_centralized_training() {
        init_backend();
        let d = data::load("builtin://digits?part=0&of=1").expect("digits");
        let cfg = ModelConfig::from_json(&serde_json::json!({"name": "mlp", "hidden": [16]})).expect("cfg");
        let init = cfg.init(64, 10, 5);
        let n = d.train.len();
        let full = TrainSettings { epochs: 1, batch_size: n, learning_rate: 0.5, mu: 0.0, ..TrainSettings::default() };
        let mut global = init.clone();
        for round in 0..6 {
            let mut client = trainer(&cfg, &global).expect("trainer");
            client.train(&d.train, &full, round, None).expect("train");
            global = crate::fedavg::fedavg(&[(client.weights().expect("w"), n as u64)]).expect("fedavg");
        }
        let mut central = Net::new(&cfg, &init).expect("net");
        central.train(&d.train, &TrainSettings { epochs: 6, ..full.clone() }, 99).expect("train");
        let central = central.weights().expect("w");
        assert_ne!(global, init, "it trained");
        for (name, t) in &global {
            let worst = t.data.iter().zip(&central[name].data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // Equal up to the order the full batch is summed in.
            assert!(worst < 1e-5, "{name}: FedAvg of one client and central training differ by {worst}");
        }
    }

    #[test]
    fn refuses_unknown_models_and_wrong_weights() {
        assert!(ModelConfig::from_json(&serde_json::json!({"name": "resnet"})).is_err());
        let cfg = ModelConfig::from_json(&serde_json::json!({"name": "logreg"})).expect("cfg");
        let mut w = cfg.init(64, 10, 0);
        w.get_mut("fc1.bias").expect("bias").shape = vec![11];
        w.get_mut("fc1.bias").expect("bias").data.push(0.0);
        assert!(Net::new(&cfg, &w).is_err());
    }
}
