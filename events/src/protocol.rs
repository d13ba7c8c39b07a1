//! Commands the engine sends to workers and the reports workers send back.
//! JSON on the wire; see docs/protocol.md.

use serde::{Deserialize, Serialize};

use crate::algorithm::{ClientObjective, ServerOptimizer, Training};
use crate::job::Metrics;
use crate::model::Model;

/// Protocol version carried by every command and report. Version 2 carries
/// typed algorithms (`Train.training`, `Train.objective`,
/// `Aggregate.optimizer`) where version 1 carried names and raw hyperparameters.
pub const VERSION: u32 = 2;

/// A worker announcing itself (and, repeated, its heartbeat).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Worker id, unique across the deployment.
    pub id: String,
    /// Roles it can run (`trainer`, `aggregator`).
    pub roles: Vec<String>,
    /// Where it runs, e.g. `default/us/west`: it takes data tasks whose dataset realm is this or above it.
    pub realm: String,
    /// Compute device it trains on (`cpu`, `cuda:0`).
    #[serde(default = "cpu")]
    pub device: String,
    /// The group that reads its commands and publishes its reports (a process
    /// of virtual workers), if any. A worker that names a group lets it speak
    /// for it: the engine sends the group's commands in batches on the group's
    /// subject and takes a member's report published on the group's subject.
    /// Only the worker itself writes its registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

fn cpu() -> String {
    "cpu".into()
}

impl WorkerInfo {
    /// Whether this worker may run a task that needs `role` on data in `realm` (none: anywhere).
    /// Realms are paths: a worker in `default/eu/uk` serves datasets in `default/eu/uk`,
    /// `default/eu` and `default`, not in `default/us`.
    pub fn can_run(&self, role: &str, generic_role: &str, realm: Option<&str>) -> bool {
        let role_ok = self.roles.iter().any(|r| r == role || r == generic_role);
        let realm_ok = match realm.map(|r| r.trim_matches('/')).filter(|r| !r.is_empty()) {
            None => true,
            Some(want) => {
                let have = self.realm.trim_matches('/');
                have == want || have.strip_prefix(want).is_some_and(|rest| rest.starts_with('/'))
            }
        };
        role_ok && realm_ok
    }
}

/// Whether a worker offering `roles` takes a task of `role`: by its name, or
/// by its generic role (`trainer` for a task with a dataset, `aggregator` for
/// one without); a ring's reducer runs beside a trainer, so a trainer takes it.
pub fn offers(roles: &[String], role: &str, has_dataset: bool) -> bool {
    let generic = if has_dataset { "trainer" } else { "aggregator" };
    roles.iter().any(|r| r == role || r == generic || (role == "ring-reducer" && r == "trainer"))
}

/// An update a trainer produced, as an aggregator input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateRef {
    /// Task that produced it.
    pub task_id: String,
    /// sha256 of the safetensors blob.
    pub digest: String,
    /// Training samples behind it.
    pub samples: u64,
    /// Asynchronous (FedBuff) jobs: the model it trained from, when not the current global model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Asynchronous jobs: how many global models have been made since its base model.
    #[serde(default, skip_serializing_if = "crate::is_zero")]
    pub staleness: u32,
    /// SCAFFOLD: digest of the trainer's state after this update (its control variate and the change in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_state: Option<String>,
}

impl UpdateRef {
    /// A synchronous update: trained from the current global model.
    pub fn new(task_id: impl Into<String>, digest: impl Into<String>, samples: u64) -> Self {
        Self { task_id: task_id.into(), digest: digest.into(), samples, base_model: None, staleness: 0, client_state: None }
    }
}

/// An update an aggregator refused to use, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    /// Task that produced it.
    pub task_id: String,
    /// Its digest.
    pub digest: String,
    /// What was wrong with it.
    pub reason: String,
}

/// Work for one worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Protocol version.
    pub v: u32,
    /// Idempotency key: a worker runs each id once and answers repeats with the same report.
    pub id: String,
    /// Job id.
    pub job_id: String,
    /// Task id inside the job.
    pub task_id: String,
    /// Round number (0 before the first round).
    pub round: u32,
    /// What to do.
    pub body: CommandBody,
    /// W3C trace context: the engine's span of this step in the job's trace
    /// (`00-<trace id>-<span id>-01`), for the worker's own span to join as
    /// a child. Absent from engines that predate it; workers may ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The kinds of work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandBody {
    /// Check that the task can run here (its dataset loads) before rounds begin.
    Deploy {
        /// The task's role.
        role: String,
        /// The task's dataset, if it consumes data.
        dataset: Option<String>,
    },
    /// Create the initial global model.
    InitModel {
        /// The model.
        model: Model,
        /// A dataset URL whose shape the model must fit.
        dataset: String,
        /// Seed for the initial weights.
        seed: u64,
        /// The loss the job trains with: a user's model is checked against it.
        #[serde(default, skip_serializing_if = "crate::algorithm::Loss::is_default")]
        loss: crate::algorithm::Loss,
    },
    /// Train from a global model on the task's dataset.
    Train {
        /// The model.
        model: Model,
        /// Digest of the global model to start from.
        global_model: String,
        /// Dataset URL.
        dataset: String,
        /// Epochs, batch size, learning rate, differential privacy.
        training: Training,
        /// What the trainer minimises besides its loss (FedProx, SCAFFOLD, FedDyn).
        #[serde(default)]
        objective: ClientObjective,
        /// Seed for this round's shuffling.
        seed: u64,
        /// SCAFFOLD / FedDyn: digest of this task's state from its last update (none before its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_state: Option<String>,
        /// SCAFFOLD: digest of the server's state (its control variate), none before the first aggregate.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_state: Option<String>,
    },
    /// Coordinated jobs: pair this round's trainers with aggregators.
    Coordinate {
        /// The round's trainers, each with the aggregators it may upload to.
        candidates: std::collections::BTreeMap<String, Vec<String>>,
        /// Training samples each trainer reported last (absent before its first update).
        #[serde(default)]
        samples: std::collections::BTreeMap<String, u64>,
    },
    /// Federated evaluation: evaluate a global model on the task's own held-out data.
    Evaluate {
        /// The model.
        model: Model,
        /// Digest of the global model to evaluate.
        global_model: String,
        /// The task's dataset (its test split is used).
        dataset: String,
        /// The loss to report.
        #[serde(default, skip_serializing_if = "crate::algorithm::Loss::is_default")]
        loss: crate::algorithm::Loss,
        /// The task's own state (FedBN: its local buffers), when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_state: Option<String>,
    },
    /// Combine updates into a new global model and evaluate it.
    Aggregate {
        /// The model.
        model: Model,
        /// How to combine the updates (middle aggregators: FedAvg).
        optimizer: ServerOptimizer,
        /// Trainers in the whole job (SCAFFOLD and FedDyn average their server step over all of them).
        #[serde(default)]
        trainers: u32,
        /// Digest of the optimizer's state from the previous round, if it keeps one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        optimizer_state: Option<String>,
        /// Digest of the current global model.
        global_model: String,
        /// The round's updates.
        updates: Vec<UpdateRef>,
        /// Dataset whose held-out split evaluates the new model.
        eval_dataset: Option<String>,
        /// The loss the evaluation reports (the job's training loss).
        #[serde(default, skip_serializing_if = "crate::algorithm::Loss::is_default")]
        loss: crate::algorithm::Loss,
    },
    /// A command whose head (version, id, job, task, round) was read but
    /// whose body was not: a kind this worker does not know, or fields it
    /// cannot decode. Never sent; a worker's transport makes it from what
    /// arrived ([`Command::decode`]) so that the worker answers `failed`
    /// instead of leaving the engine waiting.
    #[serde(skip)]
    Unreadable {
        /// What was wrong, for the `failed` report.
        reason: String,
    },
}

impl CommandBody {
    /// Its kind as on the wire (`body.kind`), `unreadable` for one that did not decode.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => "deploy",
            Self::InitModel { .. } => "init_model",
            Self::Train { .. } => "train",
            Self::Coordinate { .. } => "coordinate",
            Self::Evaluate { .. } => "evaluate",
            Self::Aggregate { .. } => "aggregate",
            Self::Unreadable { .. } => "unreadable",
        }
    }
}

impl Command {
    /// A command from its JSON bytes. One whose head reads but whose body
    /// does not becomes [`CommandBody::Unreadable`] (answered `failed`);
    /// an error only when not even the head reads (nothing to answer).
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let err = match serde_json::from_slice::<Self>(bytes) {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        #[derive(Deserialize)]
        struct Head {
            v: u32,
            id: String,
            job_id: String,
            task_id: String,
            round: u32,
            body: serde_json::Value,
            #[serde(default)]
            traceparent: Option<String>,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        let reason = match head.body.get("kind").and_then(serde_json::Value::as_str) {
            Some(kind) if !KINDS.contains(&kind) => {
                format!("unknown command kind '{kind}' (protocol version {VERSION} knows {})", KINDS.join(", "))
            }
            Some(kind) => format!("command '{kind}' does not decode: {err}"),
            None => format!("the command's body has no 'kind': {err}"),
        };
        Ok(Self {
            v: head.v,
            id: head.id,
            job_id: head.job_id,
            task_id: head.task_id,
            round: head.round,
            traceparent: head.traceparent,
            body: CommandBody::Unreadable { reason },
        })
    }
}

/// The command kinds of this protocol version (`body.kind`).
pub const KINDS: &[&str] = &["deploy", "init_model", "train", "coordinate", "evaluate", "aggregate"];

/// A worker's answer to a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Protocol version.
    pub v: u32,
    /// The command answered.
    pub command_id: String,
    /// Job id.
    pub job_id: String,
    /// Task id.
    pub task_id: String,
    /// The reporting worker.
    pub worker_id: String,
    /// Round number.
    pub round: u32,
    /// The outcome.
    pub body: ReportBody,
    /// The id in the subject it arrived on (`flame.report.<job>.<id>`): who
    /// published it, the worker or a group that speaks for it. Set by the
    /// transport, never sent; `None` for a report on the job's bare subject
    /// (older workers) or in-process. The engine sets it to the worker's id
    /// once the registry shows the group may speak for the worker.
    #[serde(skip)]
    pub via: Option<String>,
}

impl Report {
    /// A worker's answer to `command`.
    pub fn answering(command: &Command, worker_id: &str, body: ReportBody) -> Self {
        Self {
            v: VERSION,
            command_id: command.id.clone(),
            job_id: command.job_id.clone(),
            task_id: command.task_id.clone(),
            worker_id: worker_id.to_string(),
            round: command.round,
            body,
            via: None,
        }
    }
}

/// Outcomes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportBody {
    /// The task can run on this worker.
    Deployed {
        /// The training rows of the task's dataset, for a task with data: the
        /// engine refuses an update of the task that claims more samples.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        samples: Option<u64>,
    },
    /// The initial model is stored.
    Initialized {
        /// Its digest.
        digest: String,
    },
    /// A local update is stored.
    Trained {
        /// Its digest.
        digest: String,
        /// Samples trained on.
        samples: u64,
        /// Local metrics.
        metrics: Metrics,
        /// SCAFFOLD / FedDyn: digest of the task's new state (the next `train` gets it back as `client_state`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<String>,
    },
    /// The coordinator's pairing for the round.
    Coordinated {
        /// Trainer task id -> aggregator task id.
        pairing: std::collections::BTreeMap<String, String>,
    },
    /// The new global model is stored.
    Aggregated {
        /// Its digest.
        digest: String,
        /// Evaluation metrics.
        metrics: Metrics,
        /// Digest of the server optimizer's state after this round (adaptive optimizers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        optimizer_state: Option<String>,
        /// Updates left out because their blob was unusable (missing, wrong digest, wrong tensors, NaN).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        excluded: Vec<Excluded>,
    },
    /// The global model's metrics on the task's held-out data (`loss`, `accuracy`, `test_samples`).
    Evaluated {
        /// The metrics.
        metrics: Metrics,
    },
    /// The command failed.
    Failed {
        /// Why, for people.
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_body_names_its_kind_as_on_the_wire() {
        let body = CommandBody::Deploy { role: "trainer".into(), dataset: None };
        assert_eq!(serde_json::to_value(&body).expect("json")["kind"], body.kind());
        assert!(KINDS.contains(&body.kind()));
    }
}
