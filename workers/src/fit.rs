//! One round of local training on libtorch, shared by the built-in models
//! and the user's TorchScript modules: minibatches shuffled by a seeded
//! generator, the job's loss and client optimizer, FedProx's proximal term
//! and SCAFFOLD's / FedDyn's gradient correction.

use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Reduction, Tensor as TchTensor};

use flame_events::algorithm::{ClientOptimizer, Loss};
use flame_events::job::Metrics;
use flame_events::rng::SplitMix;

use crate::split::Split;
use crate::training::{Error, TrainSettings};
use crate::weights::Weights;

fn torch(e: tch::TchError) -> Error {
    Error::Torch(e.to_string())
}

/// The local optimizer a job asks for, over a var store's trainable variables.
pub(crate) fn optimizer(vs: &nn::VarStore, settings: &TrainSettings) -> Result<nn::Optimizer, Error> {
    match settings.optimizer {
        ClientOptimizer::Sgd { momentum, weight_decay } => {
            nn::Sgd { momentum, wd: weight_decay, ..Default::default() }.build(vs, settings.learning_rate)
        }
        ClientOptimizer::Adam { beta1, beta2, eps, weight_decay } => {
            nn::Adam { beta1, beta2, eps, wd: weight_decay, amsgrad: false }.build(vs, settings.learning_rate)
        }
    }
    .map_err(torch)
}

/// A split's features as a batch of examples of `shape` (flat rows when empty).
pub(crate) fn inputs(split: &Split, shape: &[usize]) -> Result<TchTensor, Error> {
    let mut dims = vec![split.len() as i64];
    if shape.is_empty() {
        dims.push(split.features as i64);
    } else {
        let per: usize = shape.iter().product();
        if per != split.features {
            return Err(Error::Config(format!(
                "examples of shape {shape:?} take {per} features; the data has {} per example",
                split.features
            )));
        }
        dims.extend(shape.iter().map(|&d| d as i64));
    }
    Ok(TchTensor::from_slice(&split.x).view(dims.as_slice()))
}

/// The targets a loss compares outputs with: class numbers for
/// cross-entropy; for the other losses the numeric targets (`[rows, width]`),
/// or the class labels as numbers when the data has only those.
pub(crate) fn targets(split: &Split, loss: Loss) -> Result<TchTensor, Error> {
    if loss.is_classification() {
        if split.y.is_empty() && !split.is_empty() {
            return Err(Error::Config(
                "cross-entropy needs class labels (whole numbers 0, 1, 2, ...); this data's targets are other numbers: use loss mse".into(),
            ));
        }
        return Ok(TchTensor::from_slice(&split.y));
    }
    if split.target_width > 0 {
        return Ok(TchTensor::from_slice(&split.targets).view([split.len() as i64, split.target_width as i64]));
    }
    Ok(TchTensor::from_slice(&split.y).to_kind(Kind::Float))
}

/// Checks that a model's output fits the loss and the labels, on a batch's output.
pub(crate) fn check_output(output: &TchTensor, targets: &TchTensor, loss: Loss) -> Result<(), Error> {
    let (out, want) = (output.size(), targets.size());
    match loss {
        Loss::CrossEntropy => {
            let classes = targets.max().int64_value(&[]) + 1;
            match out[..] {
                [n, c] if n == want[0] && c >= classes => Ok(()),
                _ => Err(Error::Config(format!(
                    "the model outputs shape {out:?} for {} examples; cross-entropy needs [{}, classes] with at least {classes} classes (labels go up to {})",
                    want[0],
                    want[0],
                    classes - 1
                ))),
            }
        }
        Loss::Mse | Loss::BceWithLogits => {
            if output.numel() == targets.numel() {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "the model outputs shape {out:?}; the {} loss needs one output per target ({} targets)",
                    loss.name(),
                    targets.numel()
                )))
            }
        }
    }
}

/// The loss of outputs against targets (mean over the batch).
pub(crate) fn loss(kind: Loss, output: &TchTensor, targets: &TchTensor) -> TchTensor {
    match kind {
        Loss::CrossEntropy => output.cross_entropy_for_logits(targets),
        Loss::Mse => output.mse_loss(&targets.view_as(output), Reduction::Mean),
        Loss::BceWithLogits => output.binary_cross_entropy_with_logits::<TchTensor>(&targets.view_as(output), None, None, Reduction::Mean),
    }
}

/// Loss (and accuracy for classification) of outputs on a whole split.
pub(crate) fn metrics(kind: Loss, output: &TchTensor, targets: &TchTensor, rows: usize) -> Metrics {
    let mut m =
        Metrics::from([("loss".to_string(), loss(kind, output, targets).double_value(&[])), ("test_samples".to_string(), rows as f64)]);
    if kind.is_classification() {
        m.insert("accuracy".into(), output.accuracy_for_logits(targets).double_value(&[]));
    }
    m
}

/// Trains `params` (named, in the var store `vs`) for one round: `forward`
/// maps a batch of inputs to outputs. Returns the mean training loss of the
/// last epoch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit(
    vs: &nn::VarStore,
    params: &[(String, TchTensor)],
    forward: &dyn Fn(&TchTensor) -> Result<TchTensor, Error>,
    x: &TchTensor,
    y: &TchTensor,
    settings: &TrainSettings,
    seed: u64,
    correction: Option<&Weights>,
) -> Result<Metrics, Error> {
    let rows = y.size().first().copied().unwrap_or(0);
    if rows == 0 {
        return Err(Error::Config("no training rows".into()));
    }
    // SCAFFOLD / FedDyn: a fixed vector added to every gradient, as the linear term <c, w>.
    let linear: Vec<(TchTensor, TchTensor)> = match correction {
        None => Vec::new(),
        Some(c) => params
            .iter()
            .map(|(name, p)| {
                let t = c.get(name).ok_or_else(|| Error::Weights(format!("the gradient correction has no tensor '{name}'")))?;
                let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                Ok((TchTensor::from_slice(&t.data).view(shape.as_slice()), p.shallow_clone()))
            })
            .collect::<Result<_, Error>>()?,
    };
    let mut opt = optimizer(vs, settings)?;
    // FedProx: the weights this round started from anchor the proximal term.
    let anchors: Vec<(TchTensor, TchTensor)> =
        if settings.mu > 0.0 { params.iter().map(|(_, p)| (p.detach().copy(), p.shallow_clone())).collect() } else { Vec::new() };
    let mut rng = SplitMix::new(seed);
    let mut order: Vec<i64> = (0..rows).collect();
    let mut last_loss = 0.0;
    for _ in 0..settings.epochs.max(1) {
        rng.shuffle(&mut order);
        let (mut sum, mut seen) = (0.0, 0usize);
        for batch in order.chunks(settings.batch_size.max(1)) {
            let idx = TchTensor::from_slice(batch);
            let (bx, by) = (x.index_select(0, &idx), y.index_select(0, &idx));
            let output = forward(&bx)?;
            let loss = loss(settings.loss, &output, &by);
            let objective = anchors
                .iter()
                .fold(loss.shallow_clone(), |acc, (anchor, p)| acc + (p - anchor).square().sum(Kind::Float) * (settings.mu / 2.0));
            let objective = linear.iter().fold(objective, |acc, (c, p)| acc + (c * p).sum(Kind::Float));
            opt.backward_step(&objective);
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(Error::Config(format!("the training loss became {value}: lower the learning rate, or check the data for NaN")));
            }
            sum += value * batch.len() as f64;
            seen += batch.len();
        }
        last_loss = sum / seen as f64;
    }
    // libtorch sets the gradients to none (it frees them): what follows
    // training holds the weights without a second model's worth beside them.
    opt.zero_grad();
    Ok(Metrics::from([("loss".to_string(), last_loss)]))
}
