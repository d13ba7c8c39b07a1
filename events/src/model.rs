//! The model a job trains, as a type: compiled from the model spec's
//! `baseModel.name` and its architecture hyperparameters (`hidden`,
//! `channels`), handed to workers in every command that builds one. Its JSON
//! form is `{"name": "mlp", "hidden": [32]}`, as before it was typed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::algorithm::ParamError;

/// The built-in models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Model {
    /// A multilayer perceptron: ReLU hidden layers of these widths.
    Mlp {
        /// Hidden layer widths.
        #[serde(default = "default_hidden")]
        hidden: Vec<usize>,
    },
    /// Multinomial logistic regression: one linear layer.
    Logreg,
    /// A small CNN on square one-channel images: 3x3 convolutions of these
    /// channels, each with ReLU and 2x2 max pooling, then fully connected
    /// layers of these widths.
    Cnn {
        /// Output channels of each convolution.
        #[serde(default = "default_channels")]
        channels: Vec<usize>,
        /// Fully connected widths after the convolutions.
        #[serde(default = "default_hidden")]
        hidden: Vec<usize>,
    },
    /// The user's own PyTorch module, saved as TorchScript
    /// (`torch.jit.script(model).save("model.pt")`) in the job folder.
    #[serde(rename = "torchscript")]
    TorchScript {
        /// The file in the job folder.
        file: String,
        /// The sha256 of its bytes: the blob workers fetch, and exactly which
        /// architecture ran.
        sha256: String,
        /// The shape of one example as the module takes it (`[1, 8, 8]`);
        /// empty: a flat row of features, or the data's own shape.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        input_shape: Vec<usize>,
        /// FedBN: trainers keep their own buffers (BatchNorm statistics)
        /// across rounds instead of taking the averaged ones.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        local_buffers: bool,
    },
    /// A model defined by the workers' own code (a Python SDK trainer, or
    /// any program speaking the worker protocol): the platform moves,
    /// checks and aggregates its tensors and never runs it. The job folder
    /// holds its initial weights as a safetensors file (PyTorch names).
    External {
        /// The safetensors file in the job folder.
        file: String,
        /// The sha256 of its bytes: the blob the initial model is read from.
        sha256: String,
    },
}

/// The names a model spec may give (`baseModel.name`).
pub const MODELS: &[&str] = &["mlp", "logreg", "cnn", "torchscript", "external"];

fn default_hidden() -> Vec<usize> {
    vec![32]
}

fn default_channels() -> Vec<usize> {
    vec![8, 16]
}

impl Default for Model {
    fn default() -> Self {
        Self::Mlp { hidden: default_hidden() }
    }
}

impl Model {
    /// The model a spec names (an empty name is the MLP), with `hidden` and
    /// `channels` from its hyperparameters. An error names the hyperparameter
    /// (`param`), or nothing when the name is unknown.
    pub fn parse(name: &str, h: &Map<String, Value>) -> Result<Self, ParamError> {
        let widths = |key: &str, default: Vec<usize>| -> Result<Vec<usize>, ParamError> {
            let Some(v) = h.get(key) else { return Ok(default) };
            v.as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().filter(|n| *n >= 1).map(|n| n as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| ParamError {
                    param: key.to_string(),
                    message: format!("'{key}' must be a list of whole numbers of at least 1, not {v}"),
                    hint: format!("write \"{key}\": [32]"),
                })
        };
        match name.to_ascii_lowercase().as_str() {
            "" | "mlp" => Ok(Self::Mlp { hidden: widths("hidden", default_hidden())? }),
            "logreg" => Ok(Self::Logreg),
            "cnn" => {
                let channels = widths("channels", default_channels())?;
                if channels.is_empty() {
                    return Err(ParamError {
                        param: "channels".into(),
                        message: "model 'cnn' needs at least one convolution".into(),
                        hint: "write \"channels\": [8, 16]".into(),
                    });
                }
                Ok(Self::Cnn { channels, hidden: widths("hidden", default_hidden())? })
            }
            "torchscript" => Err(ParamError {
                param: String::new(),
                message: "a TorchScript model needs its file: baseModel.file".into(),
                hint: "write \"baseModel\": {\"name\": \"torchscript\", \"file\": \"model.pt\"}".into(),
            }),
            "external" => Err(ParamError {
                param: String::new(),
                message: "a model defined by the workers' code needs its initial weights: baseModel.file".into(),
                hint: "write \"baseModel\": {\"name\": \"external\", \"file\": \"initial.safetensors\"}".into(),
            }),
            other => Err(ParamError {
                param: String::new(),
                message: format!("unknown model '{other}'"),
                hint: format!("the models are {}", MODELS.join(", ")),
            }),
        }
    }

    /// A TorchScript model from the model spec's `baseModel` object (`file`,
    /// optional `inputShape` and `localBuffers`) and the sha256 of the file's
    /// bytes. An error names the field of `baseModel`.
    pub fn torchscript(base: &Map<String, Value>, sha256: String) -> Result<Self, ParamError> {
        let file = base.get("file").and_then(Value::as_str).unwrap_or_default().to_string();
        let input_shape = match base.get("inputShape") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().filter(|n| *n >= 1).map(|n| n as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| ParamError {
                    param: "inputShape".into(),
                    message: format!("'inputShape' must be a list of whole numbers of at least 1, not {v}"),
                    hint: "the shape of one example without the batch dimension, e.g. [1, 28, 28]".into(),
                })?,
        };
        let local_buffers = match base.get("localBuffers") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ParamError {
                    param: "localBuffers".into(),
                    message: format!("'localBuffers' must be true or false, not {v}"),
                    hint: "true keeps each trainer's BatchNorm statistics local (FedBN)".into(),
                });
            }
        };
        Ok(Self::TorchScript { file, sha256, input_shape, local_buffers })
    }

    /// The name a model spec gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mlp { .. } => "mlp",
            Self::Logreg => "logreg",
            Self::Cnn { .. } => "cnn",
            Self::TorchScript { .. } => "torchscript",
            Self::External { .. } => "external",
        }
    }

    /// The file of the job folder the model comes from, and its sha256
    /// (a TorchScript module, or an external model's initial weights).
    pub fn file(&self) -> Option<(&str, &str)> {
        match self {
            Self::TorchScript { file, sha256, .. } | Self::External { file, sha256 } => Some((file, sha256)),
            _ => None,
        }
    }

    /// Whether only the workers' own code can train and evaluate it.
    pub fn is_external(&self) -> bool {
        matches!(self, Self::External { .. })
    }

    /// Fully connected hidden widths (none for logistic regression).
    pub fn hidden(&self) -> &[usize] {
        match self {
            Self::Mlp { hidden } | Self::Cnn { hidden, .. } => hidden,
            Self::Logreg | Self::TorchScript { .. } | Self::External { .. } => &[],
        }
    }

    /// The shape of one example for a TorchScript model (empty: as the data gives it).
    pub fn input_shape(&self) -> &[usize] {
        match self {
            Self::TorchScript { input_shape, .. } => input_shape,
            _ => &[],
        }
    }

    /// Convolution channels (none but for the CNN).
    pub fn channels(&self) -> &[usize] {
        match self {
            Self::Cnn { channels, .. } => channels,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).expect("map")
    }

    #[test]
    fn models_keep_their_json_form_and_defaults() {
        let mlp = Model::parse("mlp", &h(serde_json::json!({"hidden": [64, 16], "epochs": 2}))).expect("mlp");
        assert_eq!(serde_json::to_value(&mlp).expect("json"), serde_json::json!({"name": "mlp", "hidden": [64, 16]}));
        // What events recorded before the type existed reads back the same.
        for (json, want) in [
            (serde_json::json!({"name": "mlp"}), Model::Mlp { hidden: vec![32] }),
            (serde_json::json!({"name": "logreg", "hidden": [5]}), Model::Logreg),
            (serde_json::json!({"name": "cnn", "hidden": [16]}), Model::Cnn { channels: vec![8, 16], hidden: vec![16] }),
        ] {
            assert_eq!(serde_json::from_value::<Model>(json).expect("model"), want);
        }
        assert_eq!(Model::parse("", &Map::new()), Ok(Model::default()));
        assert_eq!(Model::parse("CNN", &Map::new()).expect("cnn").channels(), [8, 16]);
        assert!(Model::parse("resnet", &Map::new()).expect_err("unknown").hint.contains("mlp, logreg, cnn, torchscript"));
        assert_eq!(Model::parse("cnn", &h(serde_json::json!({"channels": []}))).expect_err("empty").param, "channels");
        assert_eq!(Model::parse("mlp", &h(serde_json::json!({"hidden": [0]}))).expect_err("zero").param, "hidden");
    }

    #[test]
    fn a_torchscript_model_names_its_file_and_digest() {
        let base = h(serde_json::json!({"name": "torchscript", "file": "model.pt", "inputShape": [1, 8, 8]}));
        let m = Model::torchscript(&base, "ab".repeat(32)).expect("torchscript");
        assert_eq!(
            serde_json::to_value(&m).expect("json"),
            serde_json::json!({"name": "torchscript", "file": "model.pt", "sha256": "ab".repeat(32), "input_shape": [1, 8, 8]})
        );
        assert_eq!(serde_json::from_value::<Model>(serde_json::to_value(&m).expect("json")).expect("back"), m);
        let bad = h(serde_json::json!({"file": "model.pt", "inputShape": [0]}));
        assert_eq!(Model::torchscript(&bad, String::new()).expect_err("zero").param, "inputShape");
        let bad = h(serde_json::json!({"file": "model.pt", "localBuffers": "yes"}));
        assert_eq!(Model::torchscript(&bad, String::new()).expect_err("bool").param, "localBuffers");
        assert!(Model::parse("torchscript", &Map::new()).expect_err("no file").message.contains("baseModel.file"));
        let external = Model::External { file: "initial.safetensors".into(), sha256: "cd".repeat(32) };
        let json = serde_json::json!({"name": "external", "file": "initial.safetensors", "sha256": "cd".repeat(32)});
        assert_eq!(serde_json::to_value(&external).expect("json"), json);
        assert_eq!(serde_json::from_value::<Model>(json).expect("back"), external);
        assert_eq!(external.file(), Some(("initial.safetensors", "cd".repeat(32).as_str())));
        assert!(external.is_external() && !Model::default().is_external());
        assert!(Model::parse("external", &Map::new()).expect_err("no file").message.contains("baseModel.file"));
    }
}
