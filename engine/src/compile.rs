//! Compilation: a checked job definition becomes what the engine runs, once,
//! when the job is created. The design expands into tasks (TAG expansion),
//! the tasks form a tree of aggregations, and the model spec's `{sort,
//! kwargs}`, `baseModel` and hyperparameters become typed settings
//! ([`Model`], [`ServerOptimizer`], [`Selection`], [`Training`]). This and validation are
//! the only code that reads the job's raw strings; everything after matches
//! on types.

use serde_json::{Map, Value};

use flame_events::algorithm::{self, ParamError, Selection, ServerOptimizer, Training};
use flame_events::job::{RunSpec, TaskSpec};
use flame_events::model::Model;

use crate::definition::{JobDefinition, Problem, Problems, problem};

/// A job ready to run: its settings and its tasks (ring reducers included).
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    /// Run settings, recorded in `JobCreated`.
    pub spec: RunSpec,
    /// Every task.
    pub tasks: Vec<TaskSpec>,
}

/// The typed settings of a definition: its model and algorithms.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The model trainers train.
    pub model: Model,
    /// The top aggregator's optimizer.
    pub optimizer: ServerOptimizer,
    /// Which trainers take part in a round.
    pub selection: Selection,
    /// How trainers train.
    pub training: Training,
}

fn no_kwargs() -> &'static Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Map::new)
}

/// The model, optimizer, selection and training settings a definition names,
/// for a job of `trainers` trainers; every problem at once, with its JSON path.
pub fn settings(def: &JobDefinition, trainers: usize) -> Result<Settings, Vec<Problem>> {
    let file = &def.job.model_spec_path;
    let spec = &def.model_spec;
    let h = &spec.hyperparameters;
    let at = |section: &str, e: ParamError| {
        let path = match e.param.as_str() {
            "" => format!("{file}#/{section}/sort"),
            "aggGoal" | "concurrency" => format!("{file}#/hyperparameters/{}", e.param),
            p => format!("{file}#/{section}/kwargs/{p}"),
        };
        problem(path, e.message, e.hint)
    };
    let mut problems = Vec::new();
    let (opt_sort, opt_kwargs) = spec.optimizer.as_ref().map_or(("", no_kwargs()), |o| (o.sort.as_str(), &o.kwargs));
    let (sel_sort, sel_kwargs) = spec.selector.as_ref().map_or(("", no_kwargs()), |s| (s.sort.as_str(), &s.kwargs));
    // Every argument problem of both algorithms, not just the first.
    let mut arguments_ok = |list: &'static [algorithm::Algorithm], sort: &str, kwargs: &Map<String, Value>, section: &str| {
        let found = algorithm::find(list, if sort.is_empty() { list[0].name } else { sort });
        let bad = found.map(|a| a.problems(kwargs)).unwrap_or_default();
        let ok = bad.is_empty();
        problems.extend(bad.into_iter().map(|e| at(section, e)));
        ok
    };
    let optimizer_ok = arguments_ok(algorithm::OPTIMIZERS, opt_sort, opt_kwargs, "optimizer");
    let selector_ok = arguments_ok(algorithm::SELECTORS, sel_sort, sel_kwargs, "selector");
    let optimizer =
        if optimizer_ok { ServerOptimizer::parse(opt_sort, opt_kwargs).map_err(|e| problems.push(at("optimizer", e))).ok() } else { None };
    let optimizer = optimizer.map(|o| match o {
        // FedProx's `mu` may also come with the hyperparameters, where it takes precedence (as it always has).
        ServerOptimizer::FedProx { mu } => ServerOptimizer::FedProx { mu: h.get("mu").and_then(Value::as_f64).unwrap_or(mu) },
        o => o,
    });
    let selection = optimizer.as_ref().filter(|_| selector_ok).and_then(|o| {
        Selection::parse(sel_sort, sel_kwargs, h.get("aggGoal"), h.get("concurrency"), o, trainers)
            .map_err(|e| {
                let section = if e.message.contains("needs optimizer") { "optimizer" } else { "selector" };
                problems.push(at(section, e));
            })
            .ok()
    });
    if !selector_ok || optimizer.is_none() {
        // The selector's own name, when the arguments or the optimizer kept it from being parsed.
        if algorithm::find(algorithm::SELECTORS, if sel_sort.is_empty() { "default" } else { sel_sort }).is_none() {
            problems.push(at(
                "selector",
                ParamError {
                    param: String::new(),
                    message: format!("unknown selector '{sel_sort}'"),
                    hint: format!("use one of: {}", algorithm::names(algorithm::SELECTORS)),
                },
            ));
        }
    }
    let training = Training::from_hyperparameters(h)
        .map_err(|e| problems.push(problem(format!("{file}#/hyperparameters/{}", e.param), e.message, e.hint)))
        .ok();
    let name = spec.base_model.as_ref().and_then(|b| b.get("name")).and_then(Value::as_str).unwrap_or("");
    let model = if name.eq_ignore_ascii_case("torchscript") {
        torchscript(def).map_err(|p| problems.extend(p)).ok()
    } else if name.eq_ignore_ascii_case("external") {
        external(def).map_err(|p| problems.extend(p)).ok()
    } else {
        Model::parse(name, h)
            .map_err(|e| {
                let path =
                    if e.param.is_empty() { format!("{file}#/baseModel/name") } else { format!("{file}#/hyperparameters/{}", e.param) };
                problems.push(problem(path, e.message, e.hint));
            })
            .ok()
    };
    if let (Some(m), Some(t)) = (&model, &training)
        && m.file().is_none()
        && !t.loss.is_classification()
    {
        problems.push(problem(
            format!("{file}#/hyperparameters/loss"),
            format!("the built-in model '{}' is a classifier; the {} loss needs your own model", m.name(), t.loss.name()),
            "use baseModel {\"name\": \"torchscript\", \"file\": \"model.pt\"} for regression or multi-label outputs",
        ));
    }
    match (model, optimizer, selection, training) {
        (Some(model), Some(optimizer), Some(selection), Some(training)) if problems.is_empty() => {
            Ok(Settings { model, optimizer, selection, training })
        }
        _ => Err(problems),
    }
}

/// A TorchScript model: the `baseModel` fields, and the file the folder
/// held, checked to be a TorchScript archive whose parameters are float32.
fn torchscript(def: &JobDefinition) -> Result<Model, Vec<Problem>> {
    let spec_file = &def.job.model_spec_path;
    let base = def.model_spec.base_model.as_ref().and_then(Value::as_object).cloned().unwrap_or_default();
    let at = |field: &str| format!("{spec_file}#/baseModel/{field}");
    let Some(name) = base.get("file").and_then(Value::as_str) else {
        return Err(vec![problem(
            at("file"),
            "a TorchScript model needs its file",
            "write \"baseModel\": {\"name\": \"torchscript\", \"file\": \"model.pt\"} and put model.pt in the job folder",
        )]);
    };
    let Some(model_file) = def.model_file.as_ref().filter(|f| f.name == name) else {
        return Err(vec![problem(
            at("file"),
            format!("the model file '{name}' was not read with the definition"),
            "run the job from its folder (flamectl run FOLDER); the single-file form cannot carry a model file",
        )]);
    };
    let archive = flame_torchscript::Archive::read(model_file.bytes.to_vec()).map_err(|e| {
        vec![problem(
            format!("{}", def.folder.join(name).display()),
            e.to_string(),
            "see examples/torchscript-digits/make_model.py for a module saved as TorchScript",
        )]
    })?;
    let parameters = archive.tensors().iter().filter(|t| t.role == flame_torchscript::Role::Parameter).count();
    if parameters == 0 {
        return Err(vec![problem(
            format!("{}", def.folder.join(name).display()),
            "the module has no parameters to train",
            "save a module with at least one nn.Parameter (a layer such as nn.Linear)",
        )]);
    }
    if let Some(t) =
        archive.tensors().iter().find(|t| t.role == flame_torchscript::Role::Parameter && t.dtype != flame_torchscript::Dtype::F32)
    {
        return Err(vec![problem(
            format!("{}", def.folder.join(name).display()),
            format!("parameter '{}' is {:?}; parameters must be float32", t.name, t.dtype),
            "call model.float() before scripting",
        )]);
    }
    Model::torchscript(&base, model_file.sha256.clone()).map_err(|e| vec![problem(at(&e.param), e.message, e.hint)])
}

/// A model the workers' own code defines: its initial weights, a safetensors
/// file in the folder with float32 tensors (all finite) and int64 counters.
fn external(def: &JobDefinition) -> Result<Model, Vec<Problem>> {
    let spec_file = &def.job.model_spec_path;
    let base = def.model_spec.base_model.as_ref().and_then(Value::as_object).cloned().unwrap_or_default();
    let hint = "save the initial weights with safetensors (safetensors.torch.save_file(model.state_dict(), \"initial.safetensors\")); see examples/python-digits";
    let Some(name) = base.get("file").and_then(Value::as_str) else {
        return Err(vec![problem(
            format!("{spec_file}#/baseModel/file"),
            "a model defined by the workers' code needs its initial weights",
            hint,
        )]);
    };
    let Some(model_file) = def.model_file.as_ref().filter(|f| f.name == name) else {
        return Err(vec![problem(
            format!("{spec_file}#/baseModel/file"),
            format!("the initial weights '{name}' were not read with the definition"),
            "run the job from its folder, or embed the file in the workflow (modelFile)",
        )]);
    };
    let at = format!("{}", def.folder.join(name).display());
    let tensors = safetensors::SafeTensors::deserialize(&model_file.bytes)
        .map_err(|e| vec![problem(at.clone(), format!("not a safetensors file: {e}"), hint)])?;
    let mut floats = 0;
    for (tensor, view) in tensors.tensors() {
        match view.dtype() {
            safetensors::Dtype::F32 => {
                floats += 1;
                let bad = view.data().chunks_exact(4).position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite());
                if let Some(i) = bad {
                    return Err(vec![problem(at, format!("tensor '{tensor}' holds a NaN or infinity at element {i}"), hint)]);
                }
            }
            safetensors::Dtype::I64 => {}
            other => {
                return Err(vec![problem(
                    at,
                    format!("tensor '{tensor}' is {other:?}; models travel as float32 (parameters, buffers) and int64 (counters)"),
                    "call model.float() before saving the state_dict",
                )]);
            }
        }
    }
    if floats == 0 {
        return Err(vec![problem(at, "the file holds no float32 tensor to train", hint)]);
    }
    Ok(Model::External { file: name.to_string(), sha256: model_file.sha256.clone() })
}

/// The seed a definition gives its initialisation, shuffling and selection (0 when none).
pub fn seed(def: &JobDefinition) -> u64 {
    def.model_spec.hyperparameters.get("seed").and_then(Value::as_u64).unwrap_or(0)
}

/// Compiles a definition: tasks, the tree of aggregations, typed settings.
pub fn compile(def: &JobDefinition) -> Result<Compiled, Problems> {
    let mut tasks = crate::expand::tasks(def)?;
    let tree = crate::tree::derive(def, &tasks)
        .map_err(|e| Problems(vec![problem("schema.json", e, "check the channels' funcTags and the roles' groupAssociation")]))?;
    let rings = !tree.reducers.is_empty();
    tasks.extend(tree.reducers);
    let trainers = tasks.iter().filter(|t| t.is_data_consumer).count();
    let Settings { model, optimizer, selection, training } = settings(def, trainers).map_err(Problems)?;
    if selection.is_asynchronous() && (rings || tree.coordinator.is_some()) {
        return Err(Problems(vec![problem(
            format!("{}#/optimizer/sort", def.job.model_spec_path),
            "asynchronous (FedBuff) jobs run two-tier or hierarchical designs; this one has rings or a coordinator",
            "drop the ring or coordinator channels, or use a synchronous optimizer",
        )]));
    }
    let h = &def.model_spec.hyperparameters;
    let whole = |key: &str| h.get(key).and_then(Value::as_u64);
    let spec = RunSpec {
        rounds: whole("rounds").unwrap_or(1) as u32,
        optimizer,
        selection,
        training,
        model,
        hyperparameters: Value::Object(h.clone()),
        seed: seed(def),
        max_run_time_s: def.job.max_run_time.filter(|s| *s > 0.0).map(|s| s.ceil() as u64),
        round_timeout_s: whole("roundTimeout"),
        quorum: whole("minClients").map(|q| q as u32),
        uplinks: tree.uplinks,
        coordinator: tree.coordinator,
        candidates: tree.candidates,
        eval_every: whole("evalEvery").unwrap_or(0) as u32,
        // The budgets of the datasets this job trains on, by URL.
        privacy_budgets: def
            .datasets
            .values()
            .filter(|d| tasks.iter().any(|t| t.dataset.as_deref() == Some(d.url.as_str())))
            .filter_map(|d| {
                d.privacy_budget.map(|b| (d.url.clone(), flame_events::job::PrivacyBudget { epsilon: b.epsilon, delta: b.delta }))
            })
            .collect(),
    };
    Ok(Compiled { spec, tasks })
}

#[cfg(test)]
mod tests {
    use flame_events::algorithm::{AdaptiveRule, ClientObjective};
    use serde_json::json;

    use super::*;
    use crate::testing::fixture;

    fn with_model_spec(name: &str, f: impl FnOnce(&mut crate::definition::ModelSpec)) -> JobDefinition {
        let (mut def, _) = fixture(name);
        f(&mut def.model_spec);
        def
    }

    fn sort(s: &str, kwargs: Value) -> Option<crate::definition::Sort> {
        Some(crate::definition::Sort { sort: s.into(), kwargs: serde_json::from_value(kwargs).expect("kwargs") })
    }

    #[test]
    fn names_and_arguments_become_types() {
        let def = with_model_spec("two-tier-ten", |m| {
            m.optimizer = sort("FedAdam", json!({"eta": 0.05}));
            m.selector = sort("oort", json!({"aggr_num": 4}));
        });
        let c = compile(&def).expect("compiles");
        assert_eq!(
            c.spec.optimizer,
            ServerOptimizer::Adaptive { rule: AdaptiveRule::Adam, eta: 0.05, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 }
        );
        assert_eq!(c.spec.selection, Selection::Oort { aggr_num: 4 });
        assert_eq!(c.spec.training.learning_rate, 0.1);
        assert_eq!(c.tasks.len(), 11);

        let prox = compile(&with_model_spec("two-tier", |m| m.optimizer = sort("fedprox", json!({"mu": 0.5})))).expect("fedprox");
        assert_eq!(prox.spec.optimizer.objective(), ClientObjective::Proximal { mu: 0.5 });

        let hierarchical = compile(&fixture("async-hierarchical").0).expect("asynchronous hierarchical jobs compile");
        assert_eq!(hierarchical.spec.selection, Selection::Buffered { goal: 2, concurrency: Some(3) });
        let ring = with_model_spec("ring", |m| {
            m.optimizer = sort("fedbuff", json!({}));
        });
        assert!(compile(&ring).is_err(), "a ring does not run asynchronously");
        let two_tier_async = with_model_spec("two-tier-ten", |m| {
            m.optimizer = sort("fedbuff", json!({}));
            m.selector = sort("fedbuff", json!({"c": 3}));
            m.hyperparameters.insert("aggGoal".into(), json!(2));
        });
        assert_eq!(compile(&two_tier_async).expect("fedbuff").spec.selection, Selection::Buffered { goal: 2, concurrency: Some(3) });
    }

    #[test]
    fn the_model_is_typed_and_an_unknown_one_named() {
        let cnn = with_model_spec("two-tier", |m| {
            m.base_model = Some(json!({"name": "cnn", "version": 1}));
            m.hyperparameters.insert("channels".into(), json!([4]));
        });
        assert_eq!(compile(&cnn).expect("cnn").spec.model, Model::Cnn { channels: vec![4], hidden: vec![32] });
        let unknown = with_model_spec("two-tier", |m| m.base_model = Some(json!({"name": "resnet"})));
        let problems = settings(&unknown, 3).expect_err("unknown model");
        assert_eq!(problems[0].path, "modelSpec.json#/baseModel/name");
        assert!(problems[0].hint.contains("mlp, logreg, cnn"), "{problems:?}");
        let regression = with_model_spec("two-tier", |m| {
            m.hyperparameters.insert("loss".into(), json!("mse"));
        });
        assert_eq!(settings(&regression, 3).expect_err("mse on a classifier")[0].path, "modelSpec.json#/hyperparameters/loss");
        let bad = with_model_spec("two-tier", |m| {
            m.hyperparameters.insert("hidden".into(), json!("wide"));
        });
        assert_eq!(settings(&bad, 3).expect_err("bad widths")[0].path, "modelSpec.json#/hyperparameters/hidden");
        assert!(unknown.check().iter().any(|p| p.path == "modelSpec.json#/baseModel/name"), "validation reports it too");
    }

    #[test]
    fn every_problem_names_its_place() {
        let def = with_model_spec("two-tier", |m| {
            m.optimizer = sort("krum", json!({"f": 0, "m": "two"}));
            m.selector = sort("random", json!({"k": -1}));
        });
        let paths: Vec<String> = settings(&def, 3).expect_err("invalid").into_iter().map(|p| p.path).collect();
        for want in ["optimizer/kwargs/f", "optimizer/kwargs/m", "selector/kwargs/k"] {
            assert!(paths.iter().any(|p| p == &format!("modelSpec.json#/{want}")), "{want}: {paths:?}");
        }
        let def = with_model_spec("two-tier", |m| {
            m.hyperparameters.insert("aggGoal".into(), json!(2));
        });
        let paths: Vec<String> = settings(&def, 3).expect_err("aggGoal needs fedbuff").into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["modelSpec.json#/optimizer/sort"]);
    }

    #[test]
    fn an_external_model_brings_checked_initial_weights() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-digits");
        let def = JobDefinition::load(&folder).expect("the example loads");
        let file = def.model_file.clone().expect("initial.safetensors is read with the folder");
        match settings(&def, 3).expect("it compiles").model {
            Model::External { file: name, sha256 } => assert_eq!((name.as_str(), &sha256), ("initial.safetensors", &file.sha256)),
            other => panic!("{other:?}"),
        }
        let with_bytes = |bytes: Vec<u8>| {
            let mut d = def.clone();
            d.model_file = Some(crate::definition::ModelFile::new("initial.safetensors", bytes));
            settings(&d, 3).expect_err("refused")
        };
        let not_safetensors = with_bytes(b"not a model".to_vec());
        assert!(not_safetensors[0].path.ends_with("initial.safetensors") && not_safetensors[0].message.contains("safetensors"));
        // A NaN in the initial weights is named with its tensor.
        let mut bytes = file.bytes.to_vec();
        let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let last = bytes.len() - 4;
        assert!(last >= 8 + header);
        bytes[last..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(with_bytes(bytes)[0].message.contains("NaN"));
        let no_file = with_model_spec("two-tier", |m| m.base_model = Some(json!({"name": "external"})));
        assert_eq!(settings(&no_file, 3).expect_err("no file")[0].path, "modelSpec.json#/baseModel/file");
    }
}
