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
