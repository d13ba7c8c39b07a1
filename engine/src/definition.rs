//! Job definitions in Flame's folder layout: `job.json`, the design
//! (`schema.json`), `dataSpec.json`, `modelSpec.json` and dataset files.
//! Unknown fields are kept in `extra`, never dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Fields nobody here knows about, kept as they were.
pub type Extra = BTreeMap<String, Value>;

/// Flame's `job.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobFile {
    /// The design this job runs.
    #[serde(default)]
    pub design_id: String,
    /// Scheduling priority (`low`, `medium`, `high`).
    #[serde(default)]
    pub priority: Option<String>,
    /// Seconds the job may run before it is terminated.
    #[serde(default)]
    pub max_run_time: Option<f64>,
    /// Flame's messaging backend (kept; we always use our transport).
    #[serde(default)]
    pub backend: Option<String>,
    /// Data spec file, relative to the folder.
    #[serde(default = "default_data_spec")]
    pub data_spec_path: String,
    /// Model spec file, relative to the folder.
    #[serde(default = "default_model_spec")]
    pub model_spec_path: String,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

pub(crate) fn default_data_spec() -> String {
    "dataSpec.json".into()
}
pub(crate) fn default_model_spec() -> String {
    "modelSpec.json".into()
}

/// Flame's design schema: roles and channels (the TAG).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Design {
    /// Design name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Roles (vertices).
    pub roles: Vec<Role>,
    /// Channels (edges).
    pub channels: Vec<Channel>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A role in a design.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    /// Role name (`trainer`, `aggregator`, ...).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Whether the role consumes data: one task per dataset.
    #[serde(default)]
    pub is_data_consumer: bool,
    /// Tasks per group association for roles that do not consume data.
    #[serde(default)]
    pub replica: Option<u32>,
    /// Each entry maps channel name -> group.
    #[serde(default)]
    pub group_association: Vec<BTreeMap<String, String>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A channel between two roles (the same role twice for a ring).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Channel {
    /// Channel name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// The two roles it connects.
    pub pair: Vec<String>,
    /// How tasks on it are grouped.
    #[serde(default)]
    pub group_by: Option<GroupBy>,
    /// Role name -> functions it performs on this channel.
    #[serde(default)]
    pub func_tags: BTreeMap<String, Vec<String>>,
    /// Per-channel backend (kept).
    #[serde(default)]
    pub backend: Option<String>,
    /// One-way channel.
    #[serde(default)]
    pub is_unidirectional: Option<bool>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Grouping of a channel's tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GroupBy {
    /// Grouping kind (`tag`).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Group names.
    #[serde(default)]
    pub value: Vec<String>,
}

/// One entry of `dataSpec.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSpecEntry {
    /// The data-consuming role.
    pub role: String,
    /// Group name -> dataset ids or dataset file paths.
    pub dataset_groups: BTreeMap<String, Vec<String>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `{sort, kwargs}` as Flame writes optimizers and selectors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Sort {
    /// The algorithm's name.
    #[serde(default)]
    pub sort: String,
    /// Its arguments.
    #[serde(default)]
    pub kwargs: serde_json::Map<String, Value>,
}

/// Flame's `modelSpec.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// `{name, version}` of the model to start from.
    #[serde(default)]
    pub base_model: Option<Value>,
    /// Server-side optimizer.
    #[serde(default)]
    pub optimizer: Option<Sort>,
    /// Trainer selector.
    #[serde(default)]
    pub selector: Option<Sort>,
    /// `rounds`, `epochs`, `batchSize`, `learningRate`, and anything else.
    #[serde(default)]
    pub hyperparameters: serde_json::Map<String, Value>,
    /// Package requirements (kept).
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A dataset file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dataset {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Where the data is (`builtin://digits?part=0&of=3`, a path, ...).
    pub url: String,
    /// Format of the data.
    #[serde(default)]
    pub data_format: Option<String>,
    /// Where the data lives, e.g. `default/us/west`.
    #[serde(default)]
    pub realm: Option<String>,
    /// Whether anyone may use it.
    #[serde(default)]
    pub is_public: Option<bool>,
    /// Differential privacy: the most (ε, δ) all jobs together may spend on this data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_budget: Option<DatasetBudget>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A dataset's privacy budget, as its file gives it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetBudget {
    /// ε, > 0.
    pub epsilon: f64,
    /// δ, in (0, 1).
    pub delta: f64,
}

impl Dataset {
    /// A dataset with just a name and a URL.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: None,
            url: url.into(),
            data_format: None,
            realm: None,
            is_public: None,
            privacy_budget: None,
            extra: Extra::new(),
        }
    }
}

/// A whole job, as loaded from a folder.
#[derive(Clone, Debug, PartialEq)]
pub struct JobDefinition {
    /// The folder it came from.
    pub folder: PathBuf,
    /// `job.json`.
    pub job: JobFile,
    /// The design.
    pub design: Design,
    /// The data spec.
    pub data_spec: Vec<DataSpecEntry>,
    /// The model spec.
    pub model_spec: ModelSpec,
    /// Datasets by the reference used in the data spec.
    pub datasets: BTreeMap<String, Dataset>,
    /// The model file a TorchScript model spec names, as read from the folder.
    pub model_file: Option<ModelFile>,
}

/// A file of the job folder the model spec names (`baseModel.file`): its
/// bytes, read once at load, and their sha256.
#[derive(Clone, PartialEq)]
pub struct ModelFile {
    /// Its name in the folder.
    pub name: String,
    /// The sha256 of its bytes, lower-case hex.
    pub sha256: String,
    /// Its bytes.
    pub bytes: std::sync::Arc<Vec<u8>>,
}

impl ModelFile {
    /// A file's bytes with their digest.
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        use sha2::Digest;
        Self { name: name.into(), sha256: hex::encode(sha2::Sha256::digest(&bytes)), bytes: std::sync::Arc::new(bytes) }
    }
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelFile({}, {} bytes, sha256 {})", self.name, self.bytes.len(), self.sha256)
    }
}

/// One thing wrong with a definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    /// File and place: `modelSpec.json#/optimizer/sort` or `job.json:3:7`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

/// Everything wrong with a definition, reported at once.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", render(.0))]
pub struct Problems(pub Vec<Problem>);

fn render(problems: &[Problem]) -> String {
    let mut out = format!("the job definition has {} problem(s):", problems.len());
    for p in problems {
        out.push_str(&format!("\n  {}: {} ({})", p.path, p.message, p.hint));
    }
    out
}

/// A problem at a place.
pub fn problem(path: impl Into<String>, message: impl Into<String>, hint: impl Into<String>) -> Problem {
    Problem { path: path.into(), message: message.into(), hint: hint.into() }
}

impl JobDefinition {
    /// The job's name: the design's, else the folder's.
    pub fn name(&self) -> String {
        if self.design.name.is_empty() {
            self.folder.file_name().map_or_else(|| "job".into(), |n| n.to_string_lossy().into_owned())
        } else {
            self.design.name.clone()
        }
    }

    /// A hyperparameter as an unsigned number.
    pub fn hyper_u64(&self, key: &str) -> Option<u64> {
        self.model_spec.hyperparameters.get(key).and_then(Value::as_u64)
    }
}
