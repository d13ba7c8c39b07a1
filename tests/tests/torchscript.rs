//! The user's own PyTorch model: a TorchScript CNN with BatchNorm trained
//! end to end by `flamectl run`, its model out with `flamectl model get`, and
//! the platform's numbers checked in PyTorch itself (when scripts/test.sh
//! installed it: FLAME_TORCH_PYTHON).

use std::path::{Path, PathBuf};
use std::process::Command;

use flame_workers::weights::{self, State};
use serde_json::Value;

use crate::util::{bin, root};

const EXAMPLE: &str = "examples/torchscript-digits";

fn flamectl(args: &[&str]) -> std::process::Output {
    Command::new(bin("flamectl")).args(args).current_dir(root()).output().expect("run flamectl")
}

/// The python of a PyTorch install (scripts/torch-venv.sh), or a line saying the check was skipped.
fn torch_python(check: &str) -> Option<PathBuf> {
    match std::env::var("FLAME_TORCH_PYTHON") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: {check}: FLAME_TORCH_PYTHON is unset (scripts/test.sh installs PyTorch into .deps/torch unless FLAME_SKIP_TORCH=1)"
            );
            None
        }
    }
}

fn python(py: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(py).arg(root().join("tests/python").join(script)).args(args).output().expect("run python");
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

fn run(folder: &str, data: &Path) -> Value {
    // The tests keep datasets beside the job folder: the folder above it is shared too.
    let beside = Path::new(folder).parent().expect("parent").to_str().expect("utf8").to_string();
    let out = flamectl(&["run", folder, "-o", "json", "--data-dir", data.to_str().expect("utf8"), "--data-root", &beside]);
    assert!(out.status.success(), "flamectl run {folder}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("summary")
}

fn blob(data: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(data.join("blobs").join(digest)).expect("blob")
}

fn events(job: &str, data: &Path) -> Vec<Value> {
    let store = format!("sqlite:{}/events.db", data.display());
    let out = flamectl(&["events", job, "--store", &store, "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("line")).collect()
}

/// `flamectl model get` from an embedded run's folder.
fn model_get(job: &str, data: &Path, out: &Path, format: &str) {
    let store = format!("sqlite:{}/events.db", data.display());
    let blobs = data.join("blobs");
    let got = flamectl(&[
        "model",
        "get",
        job,
        "--store",
        &store,
        "--blobs",
        blobs.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
        "--format",
        format,
    ]);
    assert!(got.status.success(), "model get --format {format}: {}", String::from_utf8_lossy(&got.stderr));
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

#[test]
fn a_pytorch_cnn_with_batchnorm_trains_exports_and_pytorch_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = run(EXAMPLE, dir.path());
    assert_eq!(summary["state"], "completed");
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy > 0.9, "final accuracy {accuracy}");
    let job = summary["job_id"].as_str().expect("job");
    let events = events(job, dir.path());

    // The job's first event names the model file by its sha256.
    let file = std::fs::read(root().join(EXAMPLE).join("model.pt")).expect("model.pt");
    assert_eq!(events[0]["event_type"], "JobCreated");
    assert_eq!(events[0]["payload"]["spec"]["model"]["sha256"], sha256(&file));
    // The initial global model is the file's own weights, buffers and counters.
    let archive = flame_torchscript::Archive::read(file).expect("archive");
    let init = events.iter().find(|e| e["event_type"] == "ModelInitialized").expect("initialized");
    let initial = weights::decode_state(&blob(dir.path(), init["payload"]["digest"].as_str().expect("digest"))).expect("state");
    assert_eq!(initial, flame_workers::archive::state_of(&archive).expect("state of the file"));

    // The final model carries the BatchNorm statistics, averaged, and the counters, which moved.
    let digest = summary["final_model"].as_str().expect("final");
    let last = weights::decode_state(&blob(dir.path(), digest)).expect("final state");
    let names: Vec<&String> = last.buffers.keys().collect();
    assert_eq!(names, ["features.1.running_mean", "features.1.running_var", "features.5.running_mean", "features.5.running_var"]);
    assert_ne!(last.buffers, initial.buffers, "the running statistics were trained");
    for (name, c) in &last.counters {
        assert!(c.data[0] > initial.counters[name].data[0], "{name} counted batches: {:?}", c.data);
    }

    // Federated evaluation (evalEvery 1): every trainer evaluated every round's model on its own
    // held-out rows. The sites share one test split (digits.npz's), so their means are the aggregator's figures.
    let evaluated: Vec<&Value> = events.iter().filter(|e| e["event_type"] == "ModelEvaluated").collect();
    assert_eq!(evaluated.len(), 15, "3 trainers x 5 rounds");
    for round in summary["rounds"].as_array().expect("rounds") {
        let (central, federated) = (&round["metrics"], &round["federated"]);
        assert_eq!(round["evaluations"].as_object().expect("evaluations").len(), 3, "{round}");
        assert_eq!(federated["test_samples"], 3.0 * 359.0);
        for key in ["loss", "accuracy"] {
            let (a, b) = (central[key].as_f64().expect(key), federated[key].as_f64().expect(key));
            assert!((a - b).abs() < 1e-6, "round {}: {key} {a} central, {b} federated", round["round"]);
        }
    }
    let last_evaluation = events.iter().rposition(|e| e["event_type"] == "ModelEvaluated").expect("evaluated");
    assert_eq!(events[last_evaluation + 1]["event_type"], "JobCompleted", "the job completed once the last model was evaluated");

    // flamectl model get: the blob as it is, and the user's module with it in place.
    let safetensors = dir.path().join("final.safetensors");
    let scripted = dir.path().join("final.pt");
    let store = format!("sqlite:{}/events.db", dir.path().display());
    for (out, format) in [(&safetensors, "safetensors"), (&scripted, "torchscript")] {
        model_get(job, dir.path(), out, format);
    }
    assert_eq!(std::fs::read(&safetensors).expect("written"), blob(dir.path(), digest));
    let exported = flame_torchscript::Archive::read(std::fs::read(&scripted).expect("written")).expect("an archive");
    assert_eq!(flame_workers::archive::state_of(&exported).expect("state"), last, "the module holds the final weights");
    let replay = flamectl(&["replay", job, "--store", &store, "--verify"]);
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stdout));

    // PyTorch evaluates the exported model on the same held-out rows and gets the platform's numbers.
    let Some(py) = torch_python("PyTorch evaluates the exported TorchScript model as the platform did") else { return };
    let npz = root().join(EXAMPLE).join("digits.npz");
    let test = flame_workers::data::load(npz.to_str().expect("utf8")).expect("digits.npz").test;
    assert_eq!(test.shape, [1, 8, 8], "the images keep their shape");
    let data = dir.path().join("test.safetensors");
    std::fs::write(&data, flame_workers::data::encode(&test).expect("encode")).expect("write");
    let original = root().join(EXAMPLE).join("model.pt");
    for args in [
        vec![scripted.to_str().expect("utf8"), data.to_str().expect("utf8"), "--shape", "1,8,8"],
        vec![
            original.to_str().expect("utf8"),
            data.to_str().expect("utf8"),
            "--shape",
            "1,8,8",
            "--state",
            safetensors.to_str().expect("utf8"),
        ],
    ] {
        let torch: Value = serde_json::from_str(&python(&py, "evaluate.py", &args)).expect("json");
        for key in ["loss", "accuracy"] {
            let (ours, theirs) = (summary["metrics"][key].as_f64().expect(key), torch[key].as_f64().expect(key));
            assert!((ours - theirs).abs() < 1e-4, "{key}: the platform reported {ours}, PyTorch computes {theirs} ({args:?})");
        }
        assert_eq!(torch["samples"], 359);
    }
}

/// A job folder in `dir`: the example's design and model with one dataset and these hyperparameters.
fn one_client_job(dir: &Path, dataset_url: &str, hyperparameters: Value, base_model: Value) -> PathBuf {
    let folder = dir.join("job");
    std::fs::create_dir_all(&folder).expect("folder");
    for f in ["job.json", "schema.json", "model.pt"] {
        std::fs::copy(root().join(EXAMPLE).join(f), folder.join(f)).expect("copy");
    }
    let data_spec = serde_json::json!([{"role": "trainer", "datasetGroups": {"default": ["dataset1.json"]}}]);
    let dataset = serde_json::json!({"name": "one site", "url": dataset_url, "realm": "default/site1"});
    let model_spec = serde_json::json!({
        "baseModel": base_model,
        "optimizer": {"sort": "fedavg", "kwargs": {}},
        "hyperparameters": hyperparameters,
    });
    for (name, v) in [("dataSpec.json", data_spec), ("dataset1.json", dataset), ("modelSpec.json", model_spec)] {
        std::fs::write(folder.join(name), serde_json::to_vec_pretty(&v).expect("json")).expect("write");
    }
    folder
}

#[test]
fn one_client_fedavg_of_a_torchscript_module_is_centralized_pytorch_training() {
    let Some(py) = torch_python("one-client FedAvg of a TorchScript module equals central training in PyTorch") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = flame_workers::data::load("builtin://digits?part=0&of=4").expect("digits").train;
    let data = dir.path().join("site.safetensors");
    std::fs::write(&data, flame_workers::data::encode(&rows).expect("encode")).expect("write");
    let (steps, lr) = (4, 0.2);
    let hyperparameters = serde_json::json!({"rounds": steps, "epochs": 1, "batchSize": 100_000, "learningRate": lr, "seed": 3});
    let base = serde_json::json!({"name": "torchscript", "file": "model.pt", "inputShape": [1, 8, 8]});
    let folder = one_client_job(dir.path(), data.to_str().expect("utf8"), hyperparameters, base);
    let summary = run(folder.to_str().expect("utf8"), &dir.path().join("run"));
    assert_eq!(summary["state"], "completed");
    let ours = weights::decode_state(&blob(&dir.path().join("run"), summary["final_model"].as_str().expect("final"))).expect("state");

    let central = dir.path().join("central.safetensors");
    python(
        &py,
        "central.py",
        &[
            folder.join("model.pt").to_str().expect("utf8"),
            data.to_str().expect("utf8"),
            central.to_str().expect("utf8"),
            "--steps",
            &steps.to_string(),
            "--lr",
            &lr.to_string(),
            "--shape",
            "1,8,8",
        ],
    );
    let theirs: State = weights::decode_state(&std::fs::read(&central).expect("central")).expect("state");
    assert_eq!(ours.counters, theirs.counters, "as many batches counted");
    let start = flame_workers::archive::state_of(
        &flame_torchscript::Archive::read(std::fs::read(folder.join("model.pt")).expect("pt")).expect("archive"),
    )
    .expect("state");
    // PyTorch's state_dict has no buffer list; its float tensors are compared by name either way.
    let (mut moved, mut largest) = (0.0f32, 0.0f32);
    for (name, t) in ours.params.iter().chain(&ours.buffers) {
        let other = theirs.params.get(name).or_else(|| theirs.buffers.get(name)).unwrap_or_else(|| panic!("PyTorch has no '{name}'"));
        assert_eq!(t.shape, other.shape, "{name}");
        let worst = t.data.iter().zip(&other.data).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: one-client FedAvg and central PyTorch training differ by {worst}");
        largest = largest.max(worst);
        let before = start.params.get(name).or_else(|| start.buffers.get(name)).expect("start");
        moved = moved.max(t.data.iter().zip(&before.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
    }
    assert!(moved > 1e-3, "the weights moved ({moved}): the comparison is not of two untrained models");
    eprintln!("one-client FedAvg vs central PyTorch: largest relative difference {largest:e}, weights moved up to {moved}");
}

#[test]
fn bad_model_files_are_refused_with_the_file_and_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = serde_json::json!({"name": "torchscript", "file": "model.pt", "inputShape": [1, 8, 8]});
    let h = serde_json::json!({"rounds": 1});
    let folder = one_client_job(dir.path(), "builtin://digits?part=0&of=2", h.clone(), base.clone());
    let validate = |folder: &Path| {
        let out = flamectl(&["validate", folder.to_str().expect("utf8")]);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout))
    };
    assert_eq!(validate(&folder).0, Some(0), "{}", validate(&folder).1);

    // Missing.
    std::fs::remove_file(folder.join("model.pt")).expect("remove");
    let (code, text) = validate(&folder);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("modelSpec.json#/baseModel/file") && text.contains("model file not found"), "{text}");
    // Not TorchScript: torch.save's state_dict, and bytes that are not an archive.
    let fixtures = root().join("torchscript/fixtures");
    std::fs::copy(fixtures.join("state_dict.pt"), folder.join("model.pt")).expect("copy");
    let (code, text) = validate(&folder);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("model.pt") && text.contains("torch.save") && text.contains("torch.jit.script"), "{text}");
    std::fs::write(folder.join("model.pt"), b"not a model").expect("write");
    let (code, text) = validate(&folder);
    assert!(code == Some(2) && text.contains("not a TorchScript archive"), "{text}");

    // A module whose output does not fit the labels (3 outputs, 10 digit classes): the job fails at
    // initialisation, naming the task and both shapes; nothing is trained.
    std::fs::copy(fixtures.join("bn.pt"), folder.join("model.pt")).expect("copy");
    let out = flamectl(&["run", folder.to_str().expect("utf8"), "-o", "json", "--data-dir", dir.path().join("a").to_str().expect("utf8")]);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["state"], "failed", "{summary}");
    let failure = summary["failure"].to_string();
    assert!(failure.contains("aggregator") && failure.contains("[8, 3]") && failure.contains("labels go up to 9"), "{failure}");

    // Features of the wrong shape for the module: 64 features are not [1, 7, 7].
    let wrong = serde_json::json!({"name": "torchscript", "file": "model.pt", "inputShape": [1, 7, 7]});
    let folder = one_client_job(&dir.path().join("b"), "builtin://digits?part=0&of=2", h, wrong);
    let out = flamectl(&["run", folder.to_str().expect("utf8"), "-o", "json", "--data-dir", dir.path().join("c").to_str().expect("utf8")]);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["state"], "failed", "{summary}");
    assert!(summary["failure"].to_string().contains("[1, 7, 7] take 49 features; the data has 64"), "{summary}");
}

/// The `UpdateReported` payloads of a round.
fn round_updates(job: &str, data: &Path, round: u64) -> Vec<Value> {
    events(job, data)
        .into_iter()
        .filter(|e| e["event_type"] == "UpdateReported" && e["payload"]["round"] == round)
        .map(|e| e["payload"].clone())
        .collect()
}

/// The example's folder copied with other hyperparameters and server optimizer.
fn variant(dir: &Path, name: &str, optimizer: Value, hyperparameters: Value, base: Value) -> PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).expect("folder");
    for entry in std::fs::read_dir(root().join(EXAMPLE)).expect("example") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, folder.join(path.file_name().expect("name"))).expect("copy");
    }
    let mut spec: Value = serde_json::from_slice(&std::fs::read(folder.join("modelSpec.json")).expect("spec")).expect("json");
    spec["optimizer"] = optimizer;
    spec["baseModel"] = base;
    for (k, v) in hyperparameters.as_object().expect("object") {
        spec["hyperparameters"][k] = v.clone();
    }
    spec["hyperparameters"]["rounds"] = 2.into();
    std::fs::write(folder.join("modelSpec.json"), serde_json::to_vec_pretty(&spec).expect("json")).expect("write");
    folder
}

#[test]
fn every_server_optimizer_and_client_option_trains_a_torchscript_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = serde_json::json!({"name": "torchscript", "file": "model.pt"});
    let sort = |s: &str, kwargs: Value| serde_json::json!({"sort": s, "kwargs": kwargs});
    let none = serde_json::json!({});
    let cases = [
        ("fedprox", sort("fedprox", serde_json::json!({"mu": 0.1})), none.clone()),
        ("fedavgm", sort("fedavgm", serde_json::json!({"eta": 1.0, "momentum": 0.5})), none.clone()),
        ("fedadam", sort("fedadam", serde_json::json!({"eta": 0.03})), none.clone()),
        ("scaffold", sort("scaffold", none.clone()), none.clone()),
        ("feddyn", sort("feddyn", serde_json::json!({"alpha": 0.01})), none.clone()),
        ("median", sort("median", none.clone()), none.clone()),
        ("trimmed_mean", sort("trimmed_mean", serde_json::json!({"beta": 0.2})), none.clone()),
        ("dp", sort("fedavg", none.clone()), serde_json::json!({"clip_threshold": 5.0, "noise_factor": 0.001})),
        ("adam", sort("fedavg", none.clone()), serde_json::json!({"clientOptimizer": "adam", "learningRate": 0.003})),
    ];
    for (name, optimizer, h) in cases {
        let folder = variant(dir.path(), name, optimizer, h, base.clone());
        let summary = run(folder.to_str().expect("utf8"), &dir.path().join(format!("{name}-run")));
        assert_eq!(summary["state"], "completed", "{name}: {summary}");
        // Two short rounds: well above chance (0.1) is what "it trained" means here.
        let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
        assert!(accuracy > 0.3, "{name}: accuracy {accuracy} after 2 rounds");
        eprintln!("torchscript with {name}: accuracy {accuracy:.4} after 2 rounds");
        let last = weights::decode_state(&blob(&dir.path().join(format!("{name}-run")), summary["final_model"].as_str().expect("final")))
            .expect("state");
        assert_eq!(last.buffers.len(), 4, "{name}: the BatchNorm statistics travel with every model");
        let updates = round_updates(summary["job_id"].as_str().expect("job"), &dir.path().join(format!("{name}-run")), 2);
        assert_eq!(updates.len(), 3, "{name}");
        if name == "dp" {
            assert!(updates.iter().all(|u| u["metrics"]["dp_update_norm"].as_f64().is_some()), "{updates:?}");
        }
        if name == "scaffold" || name == "feddyn" {
            assert!(updates.iter().all(|u| u["client_state"].is_string()), "{name}: {updates:?}");
        }
    }
}

#[test]
fn local_buffers_keep_each_trainers_batchnorm_statistics_fedbn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sort = serde_json::json!({"sort": "fedavg", "kwargs": {}});
    // Label-skewed sites, so that their BatchNorm statistics differ.
    let folder = variant(
        dir.path(),
        "fedbn",
        sort,
        serde_json::json!({}),
        serde_json::json!({"name": "torchscript", "file": "model.pt", "localBuffers": true}),
    );
    for i in 0..3 {
        let path = folder.join(format!("dataset{}.json", i + 1));
        let mut d: Value = serde_json::from_slice(&std::fs::read(&path).expect("dataset")).expect("json");
        d["url"] = format!("digits.npz?part={i}&of=3&split=shards&shards=2").into();
        std::fs::write(&path, serde_json::to_vec(&d).expect("json")).expect("write");
    }
    let data = dir.path().join("run");
    let summary = run(folder.to_str().expect("utf8"), &data);
    assert_eq!(summary["state"], "completed", "{summary}");
    let rounds = summary["rounds"].as_array().expect("rounds");
    // Every update carries the trainer's own buffers as its state, and round 2 starts from them.
    for p in round_updates(summary["job_id"].as_str().expect("job"), &data, 2) {
        let state = blob(&data, p["client_state"].as_str().expect("a client state"));
        let state = weights::decode(&state).expect("f32 state");
        assert_eq!(state.keys().filter(|k| k.starts_with("buffers/")).count(), 4, "{p}");
    }
    // Each trainer evaluates with its own statistics, the aggregator with the averaged ones: they differ.
    let last = &rounds[1];
    let (central, federated) = (last["metrics"]["loss"].as_f64().expect("loss"), last["federated"]["loss"].as_f64().expect("fed loss"));
    assert!((central - federated).abs() > 1e-6, "FedBN's local statistics change the evaluation: {central} vs {federated}");
}

#[test]
fn a_regression_model_on_csv_and_parquet_tables_and_pytorch_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = "examples/torchscript-regression";
    let summary = run(example, dir.path());
    assert_eq!(summary["state"], "completed", "{summary}");
    let loss = summary["metrics"]["loss"].as_f64().expect("mse");
    assert!(summary["metrics"].get("accuracy").is_none(), "a regression has no accuracy: {summary}");
    let first = summary["rounds"][0]["metrics"]["loss"].as_f64().expect("round 1");
    assert!(loss < 0.1 && loss < first / 10.0, "the mean squared error fell from {first} to {loss}");
    let job = summary["job_id"].as_str().expect("job");
    let scripted = dir.path().join("regressor.pt");
    model_get(job, dir.path(), &scripted, "torchscript");
    let Some(py) = torch_python("PyTorch evaluates the exported regression model as the platform did") else { return };
    // The aggregator evaluated on the first site's dataset: the Parquet table's held-out rows.
    let url = format!("{}/{example}/table.parquet?label=price&part=0&of=3", root().display());
    let test = flame_workers::data::load(&url).expect("table").test;
    let data = dir.path().join("test.safetensors");
    std::fs::write(&data, flame_workers::data::encode(&test).expect("encode")).expect("write");
    let torch: Value = serde_json::from_str(&python(
        &py,
        "evaluate.py",
        &[scripted.to_str().expect("utf8"), data.to_str().expect("utf8"), "--loss", "mse"],
    ))
    .expect("json");
    let theirs = torch["loss"].as_f64().expect("loss");
    assert!((loss - theirs).abs() < 1e-4, "the platform reported MSE {loss}, PyTorch computes {theirs}");
    assert_eq!(torch["samples"], 300);
}

#[test]
fn a_torchscript_cnn_trains_on_an_image_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = variant(
        dir.path(),
        "images",
        serde_json::json!({"sort": "fedavg", "kwargs": {}}),
        serde_json::json!({"rounds": 3}),
        serde_json::json!({"name": "torchscript", "file": "model.pt"}),
    );
    // The digits as 8x8 grayscale PNGs in torchvision's layout: images/<class>/<n>.png.
    let digits = flame_workers::data::load("builtin://digits").expect("digits");
    let mut n = 0;
    for split in [&digits.train, &digits.test] {
        for (row, label) in split.x.chunks(64).zip(&split.y) {
            let pixels: Vec<u8> = row.iter().map(|v| (v * 255.0).round() as u8).collect();
            let path = folder.join(format!("images/{label}/{n:04}.png"));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("class folder");
            image::GrayImage::from_raw(8, 8, pixels).expect("8x8").save(&path).expect("png");
            n += 1;
        }
    }
    for i in 0..3 {
        let path = folder.join(format!("dataset{}.json", i + 1));
        let mut d: Value = serde_json::from_slice(&std::fs::read(&path).expect("dataset")).expect("json");
        d["url"] = format!("images?part={i}&of=3&size=8x8").into();
        std::fs::write(&path, serde_json::to_vec(&d).expect("json")).expect("write");
    }
    let summary = run(folder.to_str().expect("utf8"), &dir.path().join("run"));
    assert_eq!(summary["state"], "completed", "{summary}");
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy > 0.9, "accuracy {accuracy} on the held-out fifth of every class");
    let mut per_class = [0usize; 10];
    for y in digits.train.y.iter().chain(&digits.test.y) {
        per_class[*y as usize] += 1;
    }
    let held_out: usize = per_class.iter().map(|n| n / 5).sum();
    assert_eq!(summary["metrics"]["test_samples"], held_out as f64, "every fifth image of each class");

    // An image that does not decode fails the job at deployment, naming the task and the file.
    std::fs::write(folder.join("images/3/0003.png"), b"not a png").expect("write");
    let out =
        flamectl(&["run", folder.to_str().expect("utf8"), "-o", "json", "--data-dir", dir.path().join("bad").to_str().expect("utf8")]);
    let failed: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = failed["failure"].to_string();
    assert!(reason.contains("trainer") && reason.contains("0003.png") && reason.contains("cannot decode"), "{reason}");
}
