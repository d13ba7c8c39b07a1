//! What one round of local training is asked to do, and what can go wrong
//! building, loading or training a model: shared by the built-in models
//! (`model`), the user's TorchScript modules (`script`) and the training
//! loop they share (`fit`).

use flame_events::algorithm::{ClientObjective, ClientOptimizer, Loss, Training};

/// Errors building, loading or training a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model description is not usable.
    #[error("model: {0}")]
    Config(String),
    /// Weights do not fit the model.
    #[error("weights do not fit the model: {0}")]
    Weights(String),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(String),
}

/// Training settings from the job's hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    /// Passes over the local data per round.
    pub epochs: usize,
    /// Minibatch size.
    pub batch_size: usize,
    /// SGD learning rate.
    pub learning_rate: f64,
    /// FedProx's proximal weight: the local loss gains `mu / 2 * ||w - w_global||^2` (0: plain SGD).
    pub mu: f64,
    /// The loss minimized.
    pub loss: Loss,
    /// The local optimizer.
    pub optimizer: ClientOptimizer,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self::new(&Training::default(), &ClientObjective::Plain)
    }
}

impl TrainSettings {
    /// The settings a `train` command asks for: its training settings, and the
    /// proximal weight of its objective (FedProx's `mu`; FedDyn's `alpha`
    /// weighs the same quadratic term).
    pub fn new(training: &Training, objective: &ClientObjective) -> Self {
        let mu = match *objective {
            ClientObjective::Proximal { mu } => mu,
            ClientObjective::FedDyn { alpha } => alpha,
            ClientObjective::Plain | ClientObjective::Scaffold => 0.0,
        };
        Self {
            epochs: training.epochs.max(1) as usize,
            batch_size: training.batch_size.max(1) as usize,
            learning_rate: training.learning_rate,
            mu,
            loss: training.loss,
            optimizer: training.optimizer,
        }
    }
}
