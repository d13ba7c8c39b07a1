//! The federated-learning algorithms a job can name, as types, and the one
//! list of them. Job files name an algorithm with Flame's `{sort, kwargs}`;
//! compilation turns that into a [`ServerOptimizer`] or [`Selection`] once,
//! with every argument checked against [`OPTIMIZERS`] and [`SELECTORS`]
//! (which validation and the JSON Schema read too). Everything downstream,
//! the engine, the protocol and the workers, matches on the types.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What values an algorithm's argument takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Any finite number.
    Number,
    /// A number greater than 0.
    Positive,
    /// A number of at least 0.
    NonNegative,
    /// A number in [0, 0.5): a share trimmed from each end.
    Share,
    /// A number in [0, 1): a decay or momentum.
    Decay,
    /// A whole number of at least 1.
    Count,
}

/// One argument (`kwargs` entry) of an algorithm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Param {
    /// Its name in `kwargs`.
    pub name: &'static str,
    /// What values it takes.
    pub kind: ParamKind,
    /// Its value when the job leaves it out (`None`: it depends on the job, as said in `doc`).
    pub default: Option<f64>,
    /// What it means.
    pub doc: &'static str,
}

/// An algorithm a job may name, with its arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Algorithm {
    /// The name a job gives it (Flame's `sort`).
    pub name: &'static str,
    /// Its arguments.
    pub params: &'static [Param],
    /// What it does.
    pub doc: &'static str,
}

const fn param(name: &'static str, kind: ParamKind, default: f64, doc: &'static str) -> Param {
    Param { name, kind, default: Some(default), doc }
}

const ADAPTIVE: &[Param] = &[
    param("eta", ParamKind::Positive, 1e-2, "server learning rate"),
    param("beta_1", ParamKind::Decay, 0.9, "first-moment decay"),
    param("beta_2", ParamKind::Decay, 0.99, "second-moment decay"),
    param("tau", ParamKind::Positive, 1e-3, "adaptivity: the smallest denominator"),
];

/// Every server optimizer, by the name a job gives it.
pub const OPTIMIZERS: &[Algorithm] = &[
    Algorithm { name: "fedavg", params: &[], doc: "FedAvg: the updates' mean, weighted by training samples" },
    Algorithm {
        name: "fedprox",
        params: &[param("mu", ParamKind::NonNegative, 0.01, "the trainers' proximal weight")],
        doc: "FedProx: trainers add (mu / 2) ||w - w_global||^2 to their loss; the server averages as FedAvg",
    },
    Algorithm {
        name: "fedavgm",
        params: &[
            param("eta", ParamKind::Positive, 1.0, "server learning rate"),
            param("momentum", ParamKind::Decay, 0.9, "server momentum: the share of the last step kept"),
        ],
        doc: "FedAvgM: FedAvg with server momentum (Hsu et al. 2019); eta 1 and momentum 0 is FedAvg",
    },
    Algorithm { name: "fedadam", params: ADAPTIVE, doc: "FedAdam: Adam on the averaged change (Reddi et al. 2021)" },
    Algorithm { name: "fedyogi", params: ADAPTIVE, doc: "FedYogi: Yogi on the averaged change" },
    Algorithm { name: "fedadagrad", params: ADAPTIVE, doc: "FedAdaGrad: AdaGrad on the averaged change" },
    Algorithm {
        name: "fedbuff",
        params: &[param("eta", ParamKind::Positive, 1.0, "server learning rate")],
        doc: "FedBuff: asynchronous; every aggGoal updates move the model, stale ones discounted by 1 / sqrt(1 + staleness)",
    },
    Algorithm {
        name: "scaffold",
        params: &[param("eta", ParamKind::Positive, 1.0, "server learning rate")],
        doc: "SCAFFOLD: control variates correct the trainers' drift",
    },
    Algorithm {
        name: "feddyn",
        params: &[param("alpha", ParamKind::Positive, 0.01, "weight of the dynamic regulariser")],
        doc: "FedDyn: a dynamic regulariser aligns the trainers' optima with the global one",
    },
    Algorithm { name: "median", params: &[], doc: "coordinate-wise median of the updates (robust)" },
    Algorithm {
        name: "trimmed_mean",
        params: &[param("beta", ParamKind::Share, 0.1, "share of the updates dropped from each end, per coordinate")],
        doc: "coordinate-wise trimmed mean (robust)",
    },
    Algorithm {
        name: "krum",
        params: &[
            param("f", ParamKind::Count, 1.0, "Byzantine updates tolerated (needs at least 2f + 3 updates)"),
            param("m", ParamKind::Count, 1.0, "updates averaged (Multi-Krum); 1 is Krum"),
        ],
        doc: "(Multi-)Krum: the updates closest to their neighbours (robust)",
    },
];

/// Every trainer selector, by the name a job gives it.
pub const SELECTORS: &[Algorithm] = &[
    Algorithm { name: "default", params: &[], doc: "every trainer, every round" },
    Algorithm {
        name: "random",
        params: &[param("k", ParamKind::Count, 1.0, "trainers per aggregation group each round")],
        doc: "k trainers per aggregation group each round, seeded by the job's seed and the round",
    },
    Algorithm {
        name: "fedbuff",
        params: &[Param { name: "c", kind: ParamKind::Count, default: None, doc: "trainers training at once (default: all)" }],
        doc: "asynchronous: keeps c trainers busy (with optimizer fedbuff)",
    },
    Algorithm {
        name: "oort",
        params: &[Param {
            name: "aggr_num",
            kind: ParamKind::Count,
            default: None,
            doc: "updates that close a round (default: all trainers)",
        }],
        doc: "Oort: picks 30% more than aggr_num trainers by utility and speed, closes the round at aggr_num updates",
    },
];

/// An argument that does not fit its algorithm.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// The argument (`kwargs` key), or empty when the algorithm's name is unknown.
    pub param: String,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub hint: String,
}

/// Looks an algorithm up by name, case-insensitively.
pub fn find(list: &'static [Algorithm], name: &str) -> Option<&'static Algorithm> {
    list.iter().find(|a| a.name.eq_ignore_ascii_case(name))
}

/// The names in a list, comma-separated (for messages and hints).
pub fn names(list: &[Algorithm]) -> String {
    list.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

impl Param {
    /// Checks one value of this argument.
    pub fn check(&self, v: &Value) -> Result<f64, ParamError> {
        let name = self.name;
        let err = |what: &str, example: &str| ParamError {
            param: name.to_string(),
            message: format!("'{name}' must be {what}, not {v}"),
            hint: format!("write \"{name}\": {example}"),
        };
        let x = v.as_f64().filter(|x| x.is_finite());
        match self.kind {
            ParamKind::Number => x.ok_or_else(|| err("a number", "0.1")),
            ParamKind::Positive => x.filter(|x| *x > 0.0).ok_or_else(|| err("a number greater than 0", "0.1")),
            ParamKind::NonNegative => x.filter(|x| *x >= 0.0).ok_or_else(|| err("a number of at least 0", "0.1")),
            ParamKind::Share => x.filter(|x| (0.0..0.5).contains(x)).ok_or_else(|| err("a number from 0 up to (not including) 0.5", "0.1")),
            ParamKind::Decay => x.filter(|x| (0.0..1.0).contains(x)).ok_or_else(|| err("a number from 0 up to (not including) 1", "0.9")),
            ParamKind::Count => v
                .as_u64()
                .filter(|n| *n >= 1 && *n <= u64::from(u32::MAX))
                .map(|n| n as f64)
                .ok_or_else(|| err("a whole number of at least 1", "2")),
        }
    }
}

impl Algorithm {
    /// Every argument's value: the job's where it gives one (checked), else the
    /// default; `None` for an argument without a default that the job left out.
    /// Arguments this algorithm does not take are ignored (Flame's jobs carry
    /// some for other implementations).
    pub fn values(&self, kwargs: &Map<String, Value>) -> Result<Vec<Option<f64>>, ParamError> {
        self.params.iter().map(|p| kwargs.get(p.name).map(|v| p.check(v)).transpose().map(|v| v.or(p.default))).collect()
    }

    /// Every problem with the job's arguments, not only the first.
    pub fn problems(&self, kwargs: &Map<String, Value>) -> Vec<ParamError> {
        self.params.iter().filter_map(|p| kwargs.get(p.name).and_then(|v| p.check(v).err())).collect()
    }
}

fn unknown(kind: &str, name: &str, list: &[Algorithm]) -> ParamError {
    ParamError { param: String::new(), message: format!("unknown {kind} '{name}'"), hint: format!("use one of: {}", names(list)) }
}

/// Which rule an adaptive server optimizer applies to the averaged change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaptiveRule {
    /// v += Δ²
    AdaGrad,
    /// v -= (1-β2) Δ² sign(v - Δ²)
    Yogi,
    /// v = β2 v + (1-β2) Δ²
    Adam,
}

/// How the top aggregator turns a round's updates into the next global model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerOptimizer {
    /// The updates' mean, weighted by training samples.
    #[default]
    #[serde(rename = "fedavg")]
    FedAvg,
    /// FedAvg with server momentum: `v = momentum v + (mean - w)`, `w += eta v`.
    #[serde(rename = "fedavgm")]
    FedAvgM {
        /// Server learning rate.
        eta: f64,
        /// The share of the last step kept.
        momentum: f64,
    },
    /// FedAvg on the server; the trainers add a proximal term with weight `mu`.
    #[serde(rename = "fedprox")]
    FedProx {
        /// The trainers' proximal weight.
        mu: f64,
    },
    /// FedAdam, FedYogi or FedAdaGrad: an adaptive step on the averaged change.
    Adaptive {
        /// Which rule.
        rule: AdaptiveRule,
        /// Server learning rate.
        eta: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity.
        tau: f64,
    },
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean, dropping a share `beta` at each end.
    TrimmedMean {
        /// Share trimmed from each end.
        beta: f64,
    },
    /// (Multi-)Krum.
    Krum {
        /// Byzantine updates tolerated.
        f: u32,
        /// Updates averaged.
        m: u32,
    },
    /// FedBuff's staleness-discounted step (asynchronous jobs).
    #[serde(rename = "fedbuff")]
    FedBuff {
        /// Server learning rate.
        eta: f64,
    },
    /// SCAFFOLD's server step over the trainers' control variates.
    Scaffold {
        /// Server learning rate.
        eta: f64,
    },
    /// FedDyn's server step.
    #[serde(rename = "feddyn")]
    FedDyn {
        /// Weight of the dynamic regulariser.
        alpha: f64,
    },
}

impl ServerOptimizer {
    /// The optimizer a job names with `{sort, kwargs}` (an empty name is FedAvg).
    pub fn parse(name: &str, kwargs: &Map<String, Value>) -> Result<Self, ParamError> {
        let name = if name.is_empty() { "fedavg" } else { name };
        let algorithm = find(OPTIMIZERS, name).ok_or_else(|| unknown("optimizer", name, OPTIMIZERS))?;
        Ok(Self::build(algorithm, &algorithm.values(kwargs)?))
    }

    /// The optimizer a recorded job ran with: its arguments as they were
    /// recorded (any number), without today's checks; for upcasting old events.
    pub fn from_record(name: &str, kwargs: &Map<String, Value>) -> Result<Self, String> {
        let name = if name.is_empty() { "fedavg" } else { name };
        let algorithm = find(OPTIMIZERS, name).ok_or_else(|| format!("unknown optimizer '{name}'"))?;
        let values: Vec<Option<f64>> =
            algorithm.params.iter().map(|p| kwargs.get(p.name).and_then(Value::as_f64).filter(|x| x.is_finite()).or(p.default)).collect();
        Ok(Self::build(algorithm, &values))
    }

    fn build(algorithm: &Algorithm, v: &[Option<f64>]) -> Self {
        let x = |i: usize| v[i].unwrap_or_default();
        let adaptive = |rule| Self::Adaptive { rule, eta: x(0), beta_1: x(1), beta_2: x(2), tau: x(3) };
        match algorithm.name {
            "fedavg" => Self::FedAvg,
            "fedavgm" => Self::FedAvgM { eta: x(0), momentum: x(1) },
            "fedprox" => Self::FedProx { mu: x(0) },
            "fedadam" => adaptive(AdaptiveRule::Adam),
            "fedyogi" => adaptive(AdaptiveRule::Yogi),
            "fedadagrad" => adaptive(AdaptiveRule::AdaGrad),
            "fedbuff" => Self::FedBuff { eta: x(0) },
            "scaffold" => Self::Scaffold { eta: x(0) },
            "feddyn" => Self::FedDyn { alpha: x(0) },
            "median" => Self::Median,
            "trimmed_mean" => Self::TrimmedMean { beta: x(0) },
            "krum" => Self::Krum { f: x(0) as u32, m: x(1) as u32 },
            other => unreachable!("OPTIMIZERS lists '{other}' without a type"),
        }
    }

    /// The name a job gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedAvgM { .. } => "fedavgm",
            Self::FedProx { .. } => "fedprox",
            Self::Adaptive { rule: AdaptiveRule::Adam, .. } => "fedadam",
            Self::Adaptive { rule: AdaptiveRule::Yogi, .. } => "fedyogi",
            Self::Adaptive { rule: AdaptiveRule::AdaGrad, .. } => "fedadagrad",
            Self::Median => "median",
            Self::TrimmedMean { .. } => "trimmed_mean",
            Self::Krum { .. } => "krum",
            Self::FedBuff { .. } => "fedbuff",
            Self::Scaffold { .. } => "scaffold",
            Self::FedDyn { .. } => "feddyn",
        }
    }

    /// What the trainers optimise locally under this server optimizer.
    pub fn objective(&self) -> ClientObjective {
        match *self {
            Self::FedProx { mu } => ClientObjective::Proximal { mu },
            Self::Scaffold { .. } => ClientObjective::Scaffold,
            Self::FedDyn { alpha } => ClientObjective::FedDyn { alpha },
            _ => ClientObjective::Plain,
        }
    }

    /// Whether trainers keep a state between rounds that goes with each update (SCAFFOLD, FedDyn).
    pub fn keeps_client_state(&self) -> bool {
        self.objective().keeps_state()
    }

    /// Whether updates are buffered and aggregated without a round barrier (FedBuff).
    pub fn is_asynchronous(&self) -> bool {
        matches!(self, Self::FedBuff { .. })
    }

    /// Whether the trainers need the server's state to train (SCAFFOLD's control variate).
    pub fn trainers_need_server_state(&self) -> bool {
        matches!(self, Self::Scaffold { .. })
    }
}

/// What a trainer minimises locally, besides the loss on its data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ClientObjective {
    /// The loss alone (SGD on local data).
    #[default]
    Plain,
    /// FedProx: plus (mu / 2) ||w - w_global||^2.
    Proximal {
        /// The proximal weight.
        mu: f64,
    },
    /// SCAFFOLD: gradients corrected by the control variates (c - c_i).
    Scaffold,
    /// FedDyn: minus <g_i, w> plus (alpha / 2) ||w - w_global||^2.
    #[serde(rename = "feddyn")]
    FedDyn {
        /// Weight of the dynamic regulariser.
        alpha: f64,
    },
}

impl ClientObjective {
    /// Whether the trainer keeps a state between rounds (handed back with its next training).
    pub fn keeps_state(&self) -> bool {
        matches!(self, Self::Scaffold | Self::FedDyn { .. })
    }
}

/// Which trainers take part in a round, and when it closes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Selection {
    /// Every trainer with a worker, every round (Flame's `default`).
    #[default]
    All,
    /// `k` trainers per aggregation group each round, seeded (Flame's `random`).
    Random {
        /// Trainers per group.
        k: u32,
    },
    /// Oort: 30% more than `aggr_num` trainers picked by utility; the round closes at `aggr_num` updates.
    Oort {
        /// Updates that close a round.
        aggr_num: u32,
    },
    /// Asynchronous (FedBuff): `concurrency` trainers busy at once (all when absent); every `goal` updates fill a buffer.
    Buffered {
        /// Updates per aggregation (Flame's `aggGoal`).
        goal: u32,
        /// Trainers training at once (the fedbuff selector's `c`).
        concurrency: Option<u32>,
    },
}

impl Selection {
    /// The selection a job names: its selector `{sort, kwargs}`, with the
    /// asynchronous settings (`aggGoal`, `concurrency` hyperparameters), for
    /// a job of `trainers` trainers aggregated by `optimizer`.
    pub fn parse(
        sort: &str,
        kwargs: &Map<String, Value>,
        agg_goal: Option<&Value>,
        concurrency: Option<&Value>,
        optimizer: &ServerOptimizer,
        trainers: usize,
    ) -> Result<Self, ParamError> {
        let sort = if sort.is_empty() { "default" } else { sort };
        let algorithm = find(SELECTORS, sort).ok_or_else(|| unknown("selector", sort, SELECTORS))?;
        let v = algorithm.values(kwargs)?;
        let count = |name: &'static str, v: Option<&Value>| -> Result<Option<u32>, ParamError> {
            v.map(|v| Param { name, kind: ParamKind::Count, default: None, doc: "" }.check(v).map(|n| n as u32)).transpose()
        };
        let asynchronous = optimizer.is_asynchronous() || algorithm.name == "fedbuff" || agg_goal.is_some();
        if asynchronous && !optimizer.is_asynchronous() {
            return Err(ParamError {
                param: String::new(),
                message: format!(
                    "an asynchronous job (the fedbuff selector or aggGoal) needs optimizer 'fedbuff', not '{}'",
                    optimizer.name()
                ),
                hint: "set optimizer.sort to fedbuff, or drop aggGoal and use another selector".into(),
            });
        }
        if asynchronous {
            if !matches!(algorithm.name, "fedbuff" | "default") {
                return Err(ParamError {
                    param: String::new(),
                    message: format!("selector '{}' does not run in an asynchronous (FedBuff) job", algorithm.name),
                    hint: "use selector default or fedbuff".into(),
                });
            }
            let goal = count("aggGoal", agg_goal)?.unwrap_or(1);
            let c = v.first().copied().flatten().map(|c| c as u32);
            let concurrency = match c {
                Some(c) => Some(c),
                None => count("concurrency", concurrency)?,
            };
            if let Some(c) = concurrency.filter(|c| *c < goal) {
                return Err(ParamError {
                    param: if c_given(kwargs) { "c".into() } else { "concurrency".into() },
                    message: format!("{c} trainer(s) at once can never fill a buffer of aggGoal {goal} updates"),
                    hint: format!("keep at least {goal} trainers busy, or lower aggGoal"),
                });
            }
            return Ok(Self::Buffered { goal, concurrency });
        }
        let trainers = u32::try_from(trainers.max(1)).unwrap_or(u32::MAX);
        Ok(match algorithm.name {
            "random" => Self::Random { k: v[0].map_or(1, |k| k as u32) },
            "oort" => Self::Oort { aggr_num: v[0].map_or(trainers, |n| n as u32).clamp(1, trainers) },
            _ => Self::All,
        })
    }

    /// The name of the selector a job gives.
    pub fn name(&self) -> &'static str {
        match self {
            Self::All => "default",
            Self::Random { .. } => "random",
            Self::Oort { .. } => "oort",
            Self::Buffered { .. } => "fedbuff",
        }
    }

    /// Whether rounds run without a barrier (FedBuff).
    pub fn is_asynchronous(&self) -> bool {
        matches!(self, Self::Buffered { .. })
    }
}

fn c_given(kwargs: &Map<String, Value>) -> bool {
    kwargs.contains_key("c")
}

/// Oort's over-commitment: trainers asked to train for a round that closes at `aggr_num` updates (30% more, rounded up).
pub fn over_commit(aggr_num: usize) -> usize {
    aggr_num.saturating_mul(13).div_ceil(10)
}

/// Differential privacy on each trainer's update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Privacy {
    /// L2 bound each update's change is clipped to.
    pub clip_threshold: f64,
    /// Gaussian noise std as a multiple of the bound.
    pub noise_factor: f64,
}

/// How trainers train each round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Training {
    /// Passes over the local data per round.
    pub epochs: u32,
    /// Minibatch size.
    pub batch_size: u32,
    /// SGD learning rate.
    pub learning_rate: f64,
    /// Differential privacy, when the job asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Privacy>,
    /// The loss trainers minimize (cross-entropy unless the job says).
    #[serde(default, skip_serializing_if = "Loss::is_default")]
    pub loss: Loss,
    /// The optimizer trainers take local steps with (plain SGD unless the job says).
    #[serde(default, skip_serializing_if = "ClientOptimizer::is_default")]
    pub optimizer: ClientOptimizer,
}

impl Default for Training {
    fn default() -> Self {
        Self { epochs: 1, batch_size: 32, learning_rate: 0.01, privacy: None, loss: Loss::default(), optimizer: ClientOptimizer::default() }
    }
}

/// The loss a trainer minimizes, as PyTorch defines it (means over the batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Classification: `cross_entropy(logits, class)`; labels are class numbers.
    #[default]
    CrossEntropy,
    /// Regression: `mse_loss(output, target)`; targets are numbers.
    Mse,
    /// Multi-label: `binary_cross_entropy_with_logits(logits, targets)`; targets are 0/1 per output.
    BceWithLogits,
}

/// The losses a job may name (`hyperparameters.loss`).
pub const LOSSES: &[&str] = &["cross_entropy", "mse", "bce_with_logits"];

impl Loss {
    /// Whether it is the default (cross-entropy), which records leave out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Its name in a model spec.
    pub fn name(self) -> &'static str {
        match self {
            Self::CrossEntropy => "cross_entropy",
            Self::Mse => "mse",
            Self::BceWithLogits => "bce_with_logits",
        }
    }

    /// Whether labels are class numbers (and accuracy is the share predicted).
    pub fn is_classification(self) -> bool {
        self == Self::CrossEntropy
    }
}

/// A trainer's local optimizer, as `torch.optim` defines it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "sort", rename_all = "snake_case")]
pub enum ClientOptimizer {
    /// `torch.optim.SGD(lr, momentum, weight_decay)`.
    Sgd {
        /// Momentum (0: none).
        #[serde(default)]
        momentum: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
    /// `torch.optim.Adam(lr, betas, eps, weight_decay)`.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
}

impl Default for ClientOptimizer {
    fn default() -> Self {
        Self::Sgd { momentum: 0.0, weight_decay: 0.0 }
    }
}

/// The client optimizers a job may name (`hyperparameters.clientOptimizer`).
pub const CLIENT_OPTIMIZERS: &[&str] = &["sgd", "adam"];

impl ClientOptimizer {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Its name in a model spec.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adam { .. } => "adam",
        }
    }
}

impl Training {
    /// The training settings in a job's hyperparameters (`epochs`, `batchSize`,
    /// `learningRate`, and `clip_threshold` with `noise_factor` for
    /// differential privacy); defaults 1, 32 and 0.01, as in Flame's examples.
    /// An error names the hyperparameter.
    pub fn from_hyperparameters(h: &Map<String, Value>) -> Result<Self, ParamError> {
        let d = Self::default();
        let get = |name: &'static str, kind: ParamKind, default: f64| -> Result<f64, ParamError> {
            h.get(name).map_or(Ok(default), |v| Param { name, kind, default: Some(default), doc: "" }.check(v))
        };
        let privacy = match h.get("clip_threshold") {
            None => None,
            Some(_) => Some(Privacy {
                clip_threshold: get("clip_threshold", ParamKind::Positive, 0.0)?,
                noise_factor: get("noise_factor", ParamKind::NonNegative, 0.0)?,
            }),
        };
        let loss = match h.get("loss") {
            None => Loss::default(),
            Some(v) => match v.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("cross_entropy") => Loss::CrossEntropy,
                Some("mse") => Loss::Mse,
                Some("bce_with_logits") => Loss::BceWithLogits,
                _ => {
                    return Err(ParamError {
                        param: "loss".into(),
                        message: format!("unknown loss {v}"),
                        hint: format!("the losses are {}", LOSSES.join(", ")),
                    });
                }
            },
        };
        let weight_decay = get("weightDecay", ParamKind::NonNegative, 0.0)?;
        let optimizer = match h.get("clientOptimizer") {
            None => ClientOptimizer::Sgd { momentum: get("momentum", ParamKind::Decay, 0.0)?, weight_decay },
            Some(v) => match v.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("sgd") => ClientOptimizer::Sgd { momentum: get("momentum", ParamKind::Decay, 0.0)?, weight_decay },
                Some("adam") => ClientOptimizer::Adam {
                    beta1: get("beta1", ParamKind::Decay, 0.9)?,
                    beta2: get("beta2", ParamKind::Decay, 0.999)?,
                    eps: get("eps", ParamKind::Positive, 1e-8)?,
                    weight_decay,
                },
                _ => {
                    return Err(ParamError {
                        param: "clientOptimizer".into(),
                        message: format!("unknown client optimizer {v}"),
                        hint: format!(
                            "the client optimizers are {} (with momentum, weightDecay; beta1, beta2, eps)",
                            CLIENT_OPTIMIZERS.join(", ")
                        ),
                    });
                }
            },
        };
        Ok(Self {
            epochs: get("epochs", ParamKind::Count, f64::from(d.epochs))? as u32,
            batch_size: get("batchSize", ParamKind::Count, f64::from(d.batch_size))? as u32,
            learning_rate: get("learningRate", ParamKind::Positive, d.learning_rate)?,
            privacy,
            loss,
            optimizer,
        })
    }
}

impl Training {
    /// The training settings a recorded job ran with, for upcasting old
    /// events: valid values as recorded, defaults for the rest.
    pub fn from_record(h: &Map<String, Value>) -> Self {
        let d = Self::default();
        let whole = |k: &str, default: u32| h.get(k).and_then(Value::as_f64).filter(|x| *x >= 1.0).map_or(default, |x| x as u32);
        let positive = |k: &str| h.get(k).and_then(Value::as_f64).filter(|x| *x > 0.0 && x.is_finite());
        Self {
            epochs: whole("epochs", d.epochs),
            batch_size: whole("batchSize", d.batch_size),
            learning_rate: positive("learningRate").unwrap_or(d.learning_rate),
            privacy: positive("clip_threshold").map(|clip_threshold| Privacy {
                clip_threshold,
                noise_factor: h.get("noise_factor").and_then(Value::as_f64).filter(|x| *x >= 0.0).unwrap_or(0.0),
            }),
            loss: Loss::default(),
            optimizer: ClientOptimizer::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kwargs(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).expect("kwargs")
    }

    #[test]
    fn every_listed_optimizer_parses_to_a_type_with_the_same_name() {
        for a in OPTIMIZERS {
            let o = ServerOptimizer::parse(a.name, &Map::new()).unwrap_or_else(|e| panic!("{}: {e}", a.name));
            assert_eq!(o.name(), a.name);
            let json = serde_json::to_value(o).expect("json");
            assert_eq!(serde_json::from_value::<ServerOptimizer>(json).expect("back"), o, "{} round-trips", a.name);
        }
        for a in SELECTORS {
            let optimizer = if a.name == "fedbuff" { ServerOptimizer::FedBuff { eta: 1.0 } } else { ServerOptimizer::FedAvg };
            let s = Selection::parse(a.name, &Map::new(), None, None, &optimizer, 4).unwrap_or_else(|e| panic!("{}: {e}", a.name));
            assert_eq!(s.name(), a.name);
        }
    }

    #[test]
    fn arguments_take_defaults_and_are_checked() {
        let adam = ServerOptimizer::parse("FedAdam", &kwargs(serde_json::json!({"eta": 0.05, "other": "kept by Flame"}))).expect("adam");
        assert_eq!(adam, ServerOptimizer::Adaptive { rule: AdaptiveRule::Adam, eta: 0.05, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 });
        assert_eq!(ServerOptimizer::parse("", &Map::new()), Ok(ServerOptimizer::FedAvg));
        for (name, bad) in [
            ("feddyn", serde_json::json!({"alpha": 0})),
            ("trimmed_mean", serde_json::json!({"beta": 0.5})),
            ("krum", serde_json::json!({"f": 0})),
            ("fedprox", serde_json::json!({"mu": "0.1"})),
            ("fedadam", serde_json::json!({"beta_1": 1.0})),
        ] {
            let err = ServerOptimizer::parse(name, &kwargs(bad.clone())).expect_err(name);
            let key = bad.as_object().and_then(|o| o.keys().next().cloned()).expect("key");
            assert_eq!(err.param, key, "{name}");
            assert!(err.message.contains(&format!("'{key}'")), "{err:?}");
        }
        let unknown = ServerOptimizer::parse("fedmagic", &Map::new()).expect_err("unknown");
        assert!(unknown.hint.contains("fedavg") && unknown.hint.contains("krum"), "{unknown:?}");
    }

    #[test]
    fn selections_follow_the_job() {
        let avg = ServerOptimizer::FedAvg;
        let buff = ServerOptimizer::FedBuff { eta: 1.0 };
        let none = Map::new();
        assert_eq!(Selection::parse("random", &kwargs(serde_json::json!({"k": 3})), None, None, &avg, 10), Ok(Selection::Random { k: 3 }));
        assert_eq!(Selection::parse("oort", &none, None, None, &avg, 10), Ok(Selection::Oort { aggr_num: 10 }));
        assert_eq!(
            Selection::parse("oort", &kwargs(serde_json::json!({"aggr_num": 40})), None, None, &avg, 10),
            Ok(Selection::Oort { aggr_num: 10 })
        );
        let goal = serde_json::json!(2);
        assert_eq!(
            Selection::parse("fedbuff", &kwargs(serde_json::json!({"c": 3})), Some(&goal), None, &buff, 6),
            Ok(Selection::Buffered { goal: 2, concurrency: Some(3) })
        );
        assert_eq!(Selection::parse("default", &none, None, None, &buff, 6), Ok(Selection::Buffered { goal: 1, concurrency: None }));
        assert!(Selection::parse("default", &none, Some(&goal), None, &avg, 6).is_err(), "aggGoal needs fedbuff");
        assert!(Selection::parse("random", &none, None, None, &buff, 6).is_err(), "random is synchronous");
        assert!(Selection::parse("fedbuff", &none, Some(&serde_json::json!(0)), None, &buff, 6).is_err());
        let starved =
            Selection::parse("fedbuff", &kwargs(serde_json::json!({"c": 1})), Some(&goal), None, &buff, 6).expect_err("c < aggGoal");
        assert_eq!(starved.param, "c");
        assert_eq!(over_commit(4), 6);
    }

    #[test]
    fn training_settings_from_hyperparameters() {
        let h = kwargs(serde_json::json!({"epochs": 2, "batchSize": 16, "learningRate": 0.3, "hidden": [32]}));
        assert_eq!(
            Training::from_hyperparameters(&h),
            Ok(Training { epochs: 2, batch_size: 16, learning_rate: 0.3, ..Training::default() })
        );
        let dp = kwargs(serde_json::json!({"clip_threshold": 1.5}));
        assert_eq!(Training::from_hyperparameters(&dp).expect("dp").privacy, Some(Privacy { clip_threshold: 1.5, noise_factor: 0.0 }));
        let bad = Training::from_hyperparameters(&kwargs(serde_json::json!({"batchSize": "32"}))).expect_err("bad");
        assert_eq!(bad.param, "batchSize");
    }

    #[test]
    fn loss_and_client_optimizer_from_hyperparameters_and_absent_from_old_records() {
        let h = kwargs(serde_json::json!({"loss": "mse", "clientOptimizer": "adam", "beta2": 0.99, "weightDecay": 1e-4}));
        let t = Training::from_hyperparameters(&h).expect("adam");
        assert_eq!(t.loss, Loss::Mse);
        assert_eq!(t.optimizer, ClientOptimizer::Adam { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 1e-4 });
        let sgd = Training::from_hyperparameters(&kwargs(serde_json::json!({"momentum": 0.9}))).expect("sgd");
        assert_eq!(sgd.optimizer, ClientOptimizer::Sgd { momentum: 0.9, weight_decay: 0.0 });
        for (bad, param) in [
            (serde_json::json!({"loss": "hinge"}), "loss"),
            (serde_json::json!({"clientOptimizer": "lbfgs"}), "clientOptimizer"),
            (serde_json::json!({"momentum": 1.5}), "momentum"),
            (serde_json::json!({"clientOptimizer": "adam", "beta1": 1.0}), "beta1"),
        ] {
            assert_eq!(Training::from_hyperparameters(&kwargs(bad.clone())).expect_err("refused").param, param, "{bad}");
        }
        // Defaults are left out of the JSON, so records written before these fields read and write as they did.
        let plain = Training::default();
        let json = serde_json::to_value(plain).expect("json");
        assert_eq!(json, serde_json::json!({"epochs": 1, "batch_size": 32, "learning_rate": 0.01}));
        assert_eq!(serde_json::from_value::<Training>(json).expect("back"), plain);
        let json = serde_json::to_value(t).expect("json");
        assert_eq!(json["optimizer"]["sort"], "adam");
        assert_eq!(serde_json::from_value::<Training>(json).expect("back"), t);
    }
}
