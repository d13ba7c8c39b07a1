//! The user's own PyTorch module, trained on libtorch: a TorchScript
//! archive ([`flame_torchscript::Archive`]) loaded with a model state's
//! parameters, buffers and counters, trained with the job's loss and client
//! optimizer, its new state read back with PyTorch's `state_dict` names.

use flame_events::algorithm::Loss;
use flame_events::job::Metrics;
use flame_torchscript::Archive;
use tch::{Device, Tensor as TchTensor, nn};

use crate::archive::{state_of, with_state};
use crate::model::{Error, TrainSettings, Trainer};
use crate::split::Split;
use crate::weights::{State, Weights};

fn torch(e: tch::TchError) -> Error {
    Error::Torch(e.to_string())
}

/// A TorchScript module on libtorch with a state loaded.
pub struct ScriptNet {
    archive: std::sync::Arc<Archive>,
    module: tch::CModule,
    vs: nn::VarStore,
    params: Vec<(String, TchTensor)>,
    input_shape: Vec<usize>,
    loss: Loss,
}

impl ScriptNet {
    /// Loads the module with `state`; examples are shaped `input_shape` (flat when empty).
    pub fn new(archive: std::sync::Arc<Archive>, state: &State, input_shape: &[usize], loss: Loss) -> Result<Self, Error> {
        let bytes = with_state(&archive, state)?;
        let module = tch::CModule::load_data_on_device(&mut bytes.as_slice(), Device::Cpu).map_err(torch)?;
        let vs = nn::VarStore::new(Device::Cpu);
        let mut params = Vec::new();
        for (name, t) in module.named_parameters().map_err(torch)? {
            // The var store holds the module's own tensors: its optimizer steps the module.
            let t = vs.root().add(&name.replace('.', "_"), t, true);
            params.push((name, t));
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { archive, module, vs, params, input_shape: input_shape.to_vec(), loss })
    }

    /// One example's shape: the model's `inputShape`, else the data's own (a `.npz` of images), else flat.
    fn shape<'a>(&'a self, data: &'a Split) -> &'a [usize] {
        if self.input_shape.is_empty() { &data.shape } else { &self.input_shape }
    }

    fn forward(&self, x: &TchTensor) -> Result<TchTensor, Error> {
        self.module.forward_ts(&[x]).map_err(|e| Error::Torch(format!("the model's forward failed: {e}")))
    }

    /// Runs the module on a few rows in evaluation mode and checks its output against the loss.
    pub fn check(&mut self, data: &Split) -> Result<(), Error> {
        let rows: Vec<usize> = (0..data.len().min(8)).collect();
        let sample = data.select(&rows);
        let (x, y) = (crate::fit::inputs(&sample, self.shape(&sample))?, crate::fit::targets(&sample, self.loss)?);
        self.module.set_eval();
        let out = tch::no_grad(|| self.forward(&x));
        self.module.set_train();
        crate::fit::check_output(&out?, &y, self.loss)
    }

    /// The module's state: parameters, buffers and counters, as saved.
    pub fn state(&self) -> Result<State, Error> {
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("flame-script-{}-{n}.pt", std::process::id()));
        self.module.save(&path).map_err(torch)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::Torch(format!("reading the saved module: {e}")));
        let _ = std::fs::remove_file(&path);
        let archive = Archive::read(bytes?).map_err(|e| Error::Torch(e.to_string()))?;
        let state = state_of(&archive)?;
        if let Some(name) = self
            .archive
            .tensors()
            .iter()
            .map(|t| &t.name)
            .find(|n| !state.params.contains_key(*n) && !state.buffers.contains_key(*n) && !state.counters.contains_key(*n))
        {
            return Err(Error::Torch(format!("the trained module lost tensor '{name}'")));
        }
        Ok(state)
    }
}

impl Trainer for ScriptNet {
    fn train(&mut self, data: &Split, settings: &TrainSettings, seed: u64, correction: Option<&Weights>) -> Result<Metrics, Error> {
        self.check(data)?;
        let (x, y) = (crate::fit::inputs(data, self.shape(data))?, crate::fit::targets(data, settings.loss)?);
        self.module.set_train();
        let forward = |bx: &TchTensor| self.forward(bx);
        crate::fit::fit(&self.vs, &self.params, &forward, &x, &y, settings, seed, correction)
    }

    fn evaluate(&mut self, data: &Split) -> Metrics {
        self.evaluate_checked(data).unwrap_or_default()
    }

    fn weights(&self) -> Result<Weights, Error> {
        Ok(self.state()?.params)
    }

    fn state(&self) -> Result<State, Error> {
        ScriptNet::state(self)
    }
}

impl ScriptNet {
    /// Loss (and accuracy for classification) on a split, in evaluation mode
    /// (BatchNorm takes its running statistics).
    pub fn evaluate_checked(&mut self, data: &Split) -> Result<Metrics, Error> {
        if data.is_empty() {
            return Ok(Metrics::new());
        }
        let (x, y) = (crate::fit::inputs(data, self.shape(data))?, crate::fit::targets(data, self.loss)?);
        self.module.set_eval();
        let out = tch::no_grad(|| self.forward(&x));
        self.module.set_train();
        let out = out?;
        crate::fit::check_output(&out, &y, self.loss)?;
        Ok(tch::no_grad(|| crate::fit::metrics(self.loss, &out, &y, data.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flame_events::algorithm::ClientOptimizer;

    fn fixture() -> std::sync::Arc<Archive> {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../torchscript/fixtures/bn.pt")).expect("bn.pt");
        std::sync::Arc::new(Archive::read(bytes).expect("archive"))
    }

    #[test]
    fn multi_label_targets_train_with_bce_and_class_labels_are_refused_for_them() {
        crate::model::init_backend();
        let archive = fixture();
        let state = crate::archive::state_of(&archive).expect("state");
        // 3 outputs, 3 labels per example: label k is on when pixel block k is bright.
        let rows = 60;
        let mut rng = flame_events::rng::SplitMix::new(4);
        let mut x = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..rows {
            let on: Vec<bool> = (0..3).map(|_| rng.next_u64().is_multiple_of(2)).collect();
            x.extend((0..64).map(|i| if on[(i / 8) % 3] { 1.0 } else { 0.0 }));
            targets.extend(on.iter().map(|b| f32::from(u8::from(*b))));
        }
        let data = Split { targets, target_width: 3, shape: vec![1, 8, 8], ..Split::classes(x, Vec::new(), 64) };
        let mut net = ScriptNet::new(archive.clone(), &state, &[], Loss::BceWithLogits).expect("module");
        let before = net.evaluate_checked(&data).expect("evaluate")["loss"];
        let settings = TrainSettings {
            epochs: 30,
            batch_size: 20,
            learning_rate: 0.05,
            loss: Loss::BceWithLogits,
            optimizer: ClientOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            ..TrainSettings::default()
        };
        net.train(&data, &settings, 1, None).expect("train");
        let after = net.evaluate_checked(&data).expect("evaluate")["loss"];
        assert!(after < before / 2.0, "binary cross-entropy fell from {before} to {after}");
        // The buffers moved with training and travel with the state.
        let trained = net.state().expect("state");
        assert_ne!(trained.buffers, state.buffers);
        assert_eq!(trained.counters["bn1.num_batches_tracked"].data, vec![1 + 30 * 3], "one count per batch");
        // Cross-entropy needs class labels, and these rows have none.
        let mut ce = ScriptNet::new(archive, &state, &[], Loss::CrossEntropy).expect("module");
        let e = ce.train(&data, &TrainSettings::default(), 1, None).expect_err("no class labels").to_string();
        assert!(e.contains("class labels") && e.contains("mse"), "{e}");
    }
}
