//! Our single-file workflow definition: everything a Flame job folder holds
//! (job settings, design, data spec, model spec, datasets) in one JSON
//! document, convertible both ways with the folder form. Its JSON Schema is
//! `docs/workflow.schema.json` (`flamectl schema`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flame_events::algorithm;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::definition::{DataSpecEntry, Dataset, Design, JobDefinition, JobFile, ModelSpec, Problem, Problems, problem};

/// A whole FL job in one document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    /// Optional link to the JSON Schema, for editors.
    #[serde(rename = "$schema", default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Job settings (Flame's job.json; `dataSpecPath` and `modelSpecPath` name the files of the folder form).
    pub job: JobFile,
    /// The topology: roles and channels (Flame's schema.json).
    pub design: Design,
    /// Which datasets each data-consuming role trains on, by group (Flame's dataSpec.json).
    pub data_spec: Vec<DataSpecEntry>,
    /// Model, optimizer, selector and hyperparameters (Flame's modelSpec.json).
    pub model_spec: ModelSpec,
    /// Datasets by the name the data spec uses (a file name in the folder form).
    #[serde(default)]
    pub datasets: BTreeMap<String, Dataset>,
    /// The file `modelSpec.baseModel.file` names (a TorchScript module), carried inside the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_file: Option<EmbeddedFile>,
}

/// A file of the job folder carried in the single-file form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EmbeddedFile {
    /// Its name in the folder (`model.pt`).
    pub name: String,
    /// Its bytes, base64 (standard alphabet, padded).
    pub base64: String,
}

fn decode(f: &EmbeddedFile) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(&f.base64).ok()
}

/// The JSON Schema of the single-file form. The optimizer and the selector
/// are described from the one list of algorithms (each name with its
/// arguments, their kinds and defaults), so editors offer what the engine runs.
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Workflow)).unwrap_or_default();
    let defs = &mut schema["$defs"];
    defs["Optimizer"] = algorithms_schema("A server optimizer: `sort` names it, `kwargs` holds its arguments.", algorithm::OPTIMIZERS);
    defs["Selector"] = algorithms_schema("A trainer selector: `sort` names it, `kwargs` holds its arguments.", algorithm::SELECTORS);
    let props = &mut defs["ModelSpec"]["properties"];
    for (key, def) in [("optimizer", "Optimizer"), ("selector", "Selector")] {
        props[key]["anyOf"][0] = serde_json::json!({ "$ref": format!("#/$defs/{def}") });
    }
    schema
}

fn algorithms_schema(description: &str, list: &[algorithm::Algorithm]) -> serde_json::Value {
    use algorithm::ParamKind;
    let one = |a: &algorithm::Algorithm| {
        let params: serde_json::Map<String, serde_json::Value> = a
            .params
            .iter()
            .map(|p| {
                let mut v = match p.kind {
                    ParamKind::Count => serde_json::json!({"type": "integer", "minimum": 1}),
                    ParamKind::Number => serde_json::json!({"type": "number"}),
                    ParamKind::Positive => serde_json::json!({"type": "number", "exclusiveMinimum": 0}),
                    ParamKind::NonNegative => serde_json::json!({"type": "number", "minimum": 0}),
                    ParamKind::Share => serde_json::json!({"type": "number", "minimum": 0, "exclusiveMaximum": 0.5}),
                    ParamKind::Decay => serde_json::json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1}),
                };
                v["description"] = p.doc.into();
                if let Some(d) = p.default {
                    v["default"] = d.into();
                }
                (p.name.to_string(), v)
            })
            .collect();
        serde_json::json!({
            "description": a.doc,
            "type": "object",
            "properties": {
                "sort": {"const": a.name},
                "kwargs": {"type": "object", "properties": params, "additionalProperties": true, "default": {}}
            },
            "required": ["sort"]
        })
    };
    serde_json::json!({ "description": description, "oneOf": list.iter().map(one).collect::<Vec<_>>() })
}

impl Workflow {
    /// The single-file form of a loaded definition.
    pub fn from_definition(def: &JobDefinition) -> Self {
        Self {
            schema: None,
            job: def.job.clone(),
            design: def.design.clone(),
            data_spec: def.data_spec.clone(),
            model_spec: def.model_spec.clone(),
            datasets: def.datasets.clone(),
            model_file: def.model_file.as_ref().map(|f| {
                use base64::Engine;
                EmbeddedFile { name: f.name.clone(), base64: base64::engine::general_purpose::STANDARD.encode(f.bytes.as_slice()) }
            }),
        }
    }

    /// Loads and checks a single-file workflow; problems name the file and the JSON path in it.
    pub fn load(path: &Path) -> Result<JobDefinition, Problems> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problems(vec![problem(&name, format!("cannot read the workflow: {e}"), "check the path")]))?;
        Self::parse(&text, &name, &BTreeMap::new())
    }

    /// Parses and checks a workflow document called `name` (a file name, or
    /// `request body`). Data spec entries may also name `registered` datasets.
    pub fn parse(text: &str, name: &str, registered: &BTreeMap<String, Dataset>) -> Result<JobDefinition, Problems> {
        let mut wf: Self = serde_json::from_str(text).map_err(|e| {
            Problems(vec![problem(
                format!("{name}:{}:{}", e.line(), e.column()),
                format!("invalid workflow JSON: {e}"),
                "fix the JSON at that line and column; see docs/workflow.schema.json",
            )])
        })?;
        let wanted: Vec<String> = wf.data_spec.iter().flat_map(|e| e.dataset_groups.values().flatten().cloned()).collect();
        for r in wanted {
            if let (false, Some(d)) = (wf.datasets.contains_key(&r), registered.get(&r)) {
                wf.datasets.insert(r, d.clone());
            }
        }
        let mut problems = Vec::new();
        for (i, entry) in wf.data_spec.iter().enumerate() {
            for (group, refs) in &entry.dataset_groups {
                for (j, r) in refs.iter().enumerate() {
                    if !wf.datasets.contains_key(r) {
                        problems.push(problem(
                            format!("{name}#/dataSpec/{i}/datasetGroups/{group}/{j}"),
                            format!("dataset '{r}' is not in the workflow's datasets"),
                            format!(
                                "add \"{r}\" under \"datasets\", or name one of: {}",
                                wf.datasets.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(f) = &wf.model_file
            && decode(f).is_none()
        {
            problems.push(problem(
                format!("{name}#/modelFile/base64"),
                format!("the model file {} is not valid base64", f.name),
                "encode its bytes with standard, padded base64",
            ));
        }
        let def = wf.into_definition(PathBuf::from(name));
        problems.extend(def.check().into_iter().map(|p| relocate(p, name, &def)));
        if problems.is_empty() { Ok(def) } else { Err(Problems(problems)) }
    }

    /// The definition this workflow describes, as if loaded from `source`.
    pub fn into_definition(self, source: PathBuf) -> JobDefinition {
        let model_file =
            self.model_file.as_ref().and_then(|f| decode(f).map(|bytes| crate::definition::ModelFile::new(f.name.clone(), bytes)));
        JobDefinition {
            folder: source,
            job: self.job,
            design: self.design,
            data_spec: self.data_spec,
            model_spec: self.model_spec,
            datasets: self.datasets,
            model_file,
        }
    }

    /// Writes the folder form: job.json, schema.json, the data and model specs
    /// and one file per dataset. Dataset names must be plain `.json` file names.
    pub fn write_folder(&self, dir: &Path) -> Result<(), Problems> {
        let fail = |path: String, message: String| Problems(vec![problem(path, message, "choose another folder, or fix the name")]);
        std::fs::create_dir_all(dir).map_err(|e| fail(dir.display().to_string(), format!("cannot create the folder: {e}")))?;
        let mut files: Vec<(String, serde_json::Value)> = vec![
            ("job.json".into(), to_value(&self.job)),
            ("schema.json".into(), to_value(&self.design)),
            (self.job.data_spec_path.clone(), to_value(&self.data_spec)),
            (self.job.model_spec_path.clone(), to_value(&self.model_spec)),
        ];
        for (name, d) in &self.datasets {
            let plain = name.ends_with(".json") && !name.contains('/') && !name.contains('\\') && !name.starts_with('.');
            if !plain {
                return Err(fail(
                    format!("#/datasets/{name}"),
                    format!("dataset name '{name}' is not a plain .json file name, so it cannot become a file of the folder"),
                ));
            }
            files.push((name.clone(), to_value(d)));
        }
        for (name, value) in files {
            let path = dir.join(&name);
            let text = serde_json::to_string_pretty(&value).unwrap_or_default() + "\n";
            std::fs::write(&path, text).map_err(|e| fail(path.display().to_string(), format!("cannot write: {e}")))?;
        }
        if let Some(f) = &self.model_file {
            let plain = !f.name.is_empty() && !f.name.contains('/') && !f.name.contains('\\') && !f.name.starts_with('.');
            let bytes = decode(f).filter(|_| plain).ok_or_else(|| {
                fail("#/modelFile".into(), format!("the model file '{}' needs a plain file name and base64 bytes", f.name))
            })?;
            let path = dir.join(&f.name);
            std::fs::write(&path, bytes).map_err(|e| fail(path.display().to_string(), format!("cannot write: {e}")))?;
        }
        Ok(())
    }
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// Moves a folder-form problem path (`schema.json#/roles/0`) into the single file (`wf.json#/design/roles/0`).
fn relocate(mut p: Problem, file: &str, def: &JobDefinition) -> Problem {
    let sections = [
        ("schema.json", "design"),
        ("job.json", "job"),
        (def.job.data_spec_path.as_str(), "dataSpec"),
        (def.job.model_spec_path.as_str(), "modelSpec"),
    ];
    for (prefix, section) in sections {
        if let Some(rest) = p.path.strip_prefix(prefix) {
            let pointer = rest.strip_prefix('#').unwrap_or(rest);
            p.path = format!("{file}#/{section}{pointer}");
            break;
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TOPOLOGIES, fixture};

    #[test]
    fn folder_to_file_to_folder_round_trips() {
        for name in TOPOLOGIES {
            let (def, tasks) = fixture(name);
            let wf = Workflow::from_definition(&def);
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join("wf.json");
            std::fs::write(&file, serde_json::to_string_pretty(&wf).expect("json")).expect("write");
            let from_file = Workflow::load(&file).unwrap_or_else(|p| panic!("{name}: {p}"));
            assert_eq!(crate::expand::tasks(&from_file).expect("expand"), tasks, "{name}");
            let folder = dir.path().join("folder");
            wf.write_folder(&folder).expect("folder");
            let again = JobDefinition::load(&folder).unwrap_or_else(|p| panic!("{name}: {p}"));
            assert_eq!(Workflow::from_definition(&again), wf, "{name}: folder form keeps every field");
        }
    }

    #[test]
    fn a_model_file_travels_inside_the_single_file() {
        let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/torchscript-digits");
        let def = JobDefinition::load(&example).expect("example");
        let original = def.model_file.clone().expect("model.pt");
        let wf = Workflow::from_definition(&def);
        assert_eq!(wf.model_file.as_ref().map(|f| f.name.as_str()), Some("model.pt"));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("wf.json");
        std::fs::write(&file, serde_json::to_string(&wf).expect("json")).expect("write");
        let from_file = Workflow::load(&file).unwrap_or_else(|p| panic!("{p}"));
        assert_eq!(from_file.model_file.as_ref().map(|f| &f.sha256), Some(&original.sha256), "the same bytes");
        assert!(crate::compile::compile(&from_file).is_ok(), "and it compiles to a TorchScript job");
        let folder = dir.path().join("folder");
        wf.write_folder(&folder).expect("folder");
        assert_eq!(std::fs::read(folder.join("model.pt")).expect("written"), *original.bytes);
        // Bytes that are not base64 are named.
        let mut bad = wf.clone();
        bad.model_file = Some(EmbeddedFile { name: "model.pt".into(), base64: "not base64!".into() });
        std::fs::write(&file, serde_json::to_string(&bad).expect("json")).expect("write");
        let err = Workflow::load(&file).expect_err("bad base64");
        assert!(err.0.iter().any(|p| p.path.ends_with("#/modelFile/base64")), "{err}");
    }

    #[test]
    fn problems_point_into_the_single_file() {
        let (def, _) = fixture("two-tier");
        let mut wf = Workflow::from_definition(&def);
        wf.design.channels[0].pair[1] = "nobody".into();
        wf.data_spec[0].dataset_groups.get_mut("default").expect("default").push("missing.json".into());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("wf.json");
        std::fs::write(&file, serde_json::to_string(&wf).expect("json")).expect("write");
        let err = Workflow::load(&file).expect_err("invalid");
        let paths: Vec<String> = err.0.iter().map(|p| p.path.replace(&file.display().to_string(), "wf.json")).collect();
        assert!(paths.contains(&"wf.json#/design/channels/0/pair/1".to_string()), "{paths:?}");
        assert!(paths.contains(&"wf.json#/dataSpec/0/datasetGroups/default/3".to_string()), "{paths:?}");
    }

    #[test]
    fn the_published_schema_is_current() {
        let published: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/workflow.schema.json")).expect("docs/workflow.schema.json");
        assert_eq!(published, json_schema(), "regenerate with: flamectl schema > docs/workflow.schema.json");
        let props = &json_schema()["properties"];
        for key in ["job", "design", "dataSpec", "modelSpec", "datasets"] {
            assert!(props.get(key).is_some(), "schema has {key}");
        }
        // Every algorithm of the one list, with its arguments.
        let schema = json_schema();
        let sorts = |def: &str| -> Vec<String> {
            schema["$defs"][def]["oneOf"]
                .as_array()
                .expect("oneOf")
                .iter()
                .map(|a| a["properties"]["sort"]["const"].as_str().expect("name").to_string())
                .collect()
        };
        assert_eq!(sorts("Optimizer"), algorithm::OPTIMIZERS.iter().map(|a| a.name.to_string()).collect::<Vec<_>>());
        assert_eq!(sorts("Selector"), algorithm::SELECTORS.iter().map(|a| a.name.to_string()).collect::<Vec<_>>());
        let krum = &schema["$defs"]["Optimizer"]["oneOf"]
            .as_array()
            .expect("oneOf")
            .iter()
            .find(|a| a["properties"]["sort"]["const"] == "krum")
            .expect("krum")["properties"]["kwargs"]["properties"];
        assert_eq!((krum["f"]["type"].as_str(), krum["f"]["default"].as_f64()), (Some("integer"), Some(1.0)));
    }
}
