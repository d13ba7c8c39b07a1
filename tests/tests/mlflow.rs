//! The MLflow projection against a real MLflow tracking server (SQLite
//! backend, artifacts served by the server; `scripts/mlflow-venv.sh`
//! installs it and `scripts/test.sh` exports FLAME_MLFLOW_BIN). What the
//! tests assert is read back over MLflow's REST API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Served, bin, digits_workflow, free_port, root, unique, wait_for_events};

/// The `mlflow` command, or why the test is skipped.
fn mlflow_bin(check: &str) -> Option<PathBuf> {
    match std::env::var("FLAME_MLFLOW_BIN") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("skipped: {check}: FLAME_MLFLOW_BIN is unset (scripts/test.sh installs MLflow with scripts/mlflow-venv.sh)");
            None
        }
    }
}

/// An MLflow tracking server in its own process group (its workers die with it).
struct Mlflow {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Mlflow {
    fn start(bin: &Path, dir: &Path) -> Self {
        let mut m = Self { bin: bin.to_path_buf(), dir: dir.to_path_buf(), port: free_port(), child: None };
        m.restart();
        m
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port, database and artifact folder.
    fn restart(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(self.dir.join(format!("mlflow-{}.log", unique()))).expect("log file");
        let child = Command::new(&self.bin)
            .args(["server", "--host", "127.0.0.1", "--port", &self.port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", self.dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(self.dir.join("artifacts"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mlflow server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        let agent = agent();
        while agent.get(&format!("{}/health", self.url())).call().map(|r| r.status().as_u16()).ok() != Some(200) {
            assert!(Instant::now() < deadline, "MLflow did not come up at {} (log in {})", self.url(), self.dir.display());
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGKILLs the server and its workers.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", c.id())]).status();
            let _ = c.wait();
            let down = agent().get(&format!("{}/health", self.url())).call().is_err();
            assert!(down, "MLflow still answers at {} after SIGKILL of its process group", self.url());
        }
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let mut r = agent()
            .post(&format!("{}/api/2.0/mlflow/{path}", self.url()))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let text = r.body_mut().read_to_string().expect("body");
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("POST {path}: {text}"))
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut req = agent().get(&format!("{}/api/2.0/mlflow/{path}", self.url()));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let mut r = req.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let text = r.body_mut().read_to_string().expect("body");
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("GET {path}: {text}"))
    }

    /// Every run of the experiment `name` whose `flame.job_id` is `job`.
    fn runs(&self, name: &str, job: &str) -> Vec<Value> {
        let exp = self.get("experiments/get-by-name", &[("experiment_name", name)]);
        let Some(id) = exp["experiment"]["experiment_id"].as_str() else { return Vec::new() };
        let found = self.post("runs/search", json!({"experiment_ids": [id], "filter": format!("tags.`flame.job_id` = '{job}'")}));
        found["runs"].as_array().cloned().unwrap_or_default()
    }

    /// A metric's history: (step, value), in step order.
    fn history(&self, run_id: &str, key: &str) -> Vec<(u64, f64)> {
        let h = self.get("metrics/get-history", &[("run_id", run_id), ("metric_key", key), ("max_results", "10000")]);
        let mut points: Vec<(u64, f64)> = h["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| (m["step"].as_u64().expect("step"), m["value"].as_f64().expect("value")))
            .collect();
        points.sort_by_key(|p| p.0);
        points
    }

    fn versions(&self, run_id: &str) -> Vec<Value> {
        self.get("model-versions/search", &[("filter", &format!("run_id = '{run_id}'"))])["model_versions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn artifact(&self, artifact_uri: &str, path: &str) -> Vec<u8> {
        let root = artifact_uri.strip_prefix("mlflow-artifacts:").expect("a proxied artifact root").trim_start_matches('/');
        let url = format!("{}/api/2.0/mlflow-artifacts/artifacts/{root}/{path}", self.url());
        let mut r = agent().get(&url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(r.status().as_u16(), 200, "GET {url}");
        r.body_mut().with_config().limit(1 << 30).read_to_vec().expect("artifact bytes")
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build().into()
}

fn tag<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["tags"].as_array()?.iter().find(|t| t["key"] == key)?["value"].as_str()
}

fn param<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["params"].as_array()?.iter().find(|t| t["key"] == key)?["value"].as_str()
}

/// Each aggregated round's metric `key` in the job's log: (round, value).
fn logged(events: &[flame_events::Envelope], key: &str) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter(|e| e.event_type == "RoundAggregated")
        .filter_map(|e| Some((e.payload["round"].as_u64()?, e.payload["metrics"][key].as_f64()?)))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn a_finished_job_is_one_mlflow_run_with_every_round_and_a_registered_model_that_loads_in_pytorch() {
    let Some(mlflow_bin) = mlflow_bin("the MLflow projection of an embedded job") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mlflow = Mlflow::start(&mlflow_bin, dir.path());
    let data = dir.path().join("flame");
    let out = Command::new(bin("flamectl"))
        .args(["run", "examples/torchscript-digits", "-o", "json", "--mlflow", &mlflow.url()])
        .arg("--data-dir")
        .arg(&data)
        .current_dir(root())
        .output()
        .expect("flamectl run");
    assert!(out.status.success(), "flamectl run: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    let job = summary["job_id"].as_str().expect("job id").to_string();
    let store = format!("sqlite:{}", data.join("events.db").display());
    let events = tokio::runtime::Runtime::new().expect("runtime").block_on(async {
        let s = flame_stores::open_store(&store).await.expect("store");
        s.read_stream(&flame_events::job::stream_id(&job), 1).await.expect("events")
    });
    let rounds = summary["rounds_completed"].as_u64().expect("rounds");
    assert!(rounds >= 2);

    let check = |what: &str| {
        let runs = mlflow.runs("torchscript-digits", &job);
        assert_eq!(runs.len(), 1, "{what}: one run for the job: {runs:#?}");
        let run = &runs[0];
        let run_id = run["info"]["run_id"].as_str().expect("run id").to_string();
        assert_eq!(run["info"]["status"], "FINISHED", "{what}");
        assert_eq!(tag(run, "flame.state"), Some("completed"));
        assert_eq!(param(run, "optimizer"), Some("fedavg"));
        assert_eq!(param(run, "model"), Some("torchscript"));
        assert_eq!(param(run, "topology"), Some("aggregator:1 trainer:3"));
        assert_eq!(param(run, "hyperparameters.rounds"), Some(rounds.to_string().as_str()));
        assert!(param(run, "datasets").is_some_and(|d| d.contains("digits.npz?part=0&of=3")), "{:?}", param(run, "datasets"));
        // Every round once, with the values the log holds.
        for key in ["accuracy", "loss"] {
            let h = mlflow.history(&run_id, key);
            let want = logged(&events, key);
            assert_eq!(h.len() as u64, rounds, "{what}: {key}: one point per round: {h:?}");
            assert_eq!(h, want, "{what}: {key}");
        }
        for key in ["participants", "round_seconds", "federated_accuracy", "train_loss"] {
            let steps: Vec<u64> = mlflow.history(&run_id, key).iter().map(|p| p.0).collect();
            assert_eq!(steps, (1..=rounds).collect::<Vec<_>>(), "{what}: {key}");
        }
        assert!(mlflow.history(&run_id, "participants").iter().all(|p| p.1 == 3.0));
        let versions = mlflow.versions(&run_id);
        assert_eq!(versions.len(), 1, "{what}: one registered version: {versions:#?}");
        (run.clone(), versions[0].clone())
    };
    let (run, version) = check("after the job");
    let final_model = summary["final_model"].as_str().expect("final model").to_string();
    let vtag = |k: &str| version["tags"].as_array().and_then(|t| t.iter().find(|t| t["key"] == k)).and_then(|t| t["value"].as_str());
    assert_eq!(version["name"], "torchscript-digits");
    assert_eq!(vtag("flame.job_id"), Some(job.as_str()));
    assert_eq!(vtag("flame.round"), Some(rounds.to_string().as_str()));
    assert_eq!(vtag("flame.digest"), Some(final_model.as_str()));

    // The artifacts: the final weights bit for bit, and the TorchScript module with them in place.
    let uri = run["info"]["artifact_uri"].as_str().expect("artifact uri");
    let weights = mlflow.artifact(uri, "model/model.safetensors");
    assert_eq!(sha256_hex(&weights), final_model, "the artifact is the final model's blob");
    let card: Value = serde_json::from_slice(&mlflow.artifact(uri, "model/flame.json")).expect("flame.json");
    assert_eq!(card["digest"], final_model.as_str());
    let module = mlflow.artifact(uri, "model/model.pt");
    match std::env::var("FLAME_TORCH_PYTHON").ok().filter(|p| !p.is_empty()) {
        None => eprintln!("skipped: loading the registered model in PyTorch: FLAME_TORCH_PYTHON is unset"),
        Some(py) => {
            std::fs::write(dir.path().join("model.safetensors"), &weights).expect("write");
            std::fs::write(dir.path().join("model.pt"), &module).expect("write");
            let script = r#"
import sys, torch, numpy as np
from safetensors.torch import load_file
d = sys.argv[1]
state = load_file(d + "/model.safetensors")
m = torch.jit.load(d + "/model.pt")
own = m.state_dict()
assert set(own) == set(state), (sorted(own), sorted(state))
assert all(torch.equal(own[k], state[k]) for k in state), "the module carries the final weights"
m.load_state_dict(state)
npz = np.load(sys.argv[2])
x = torch.tensor(npz["x_test"], dtype=torch.float32)
y = torch.tensor(npz["y_test"])
with torch.no_grad():
    acc = (m(x).argmax(1) == y).float().mean().item()
print(acc)
"#;
            let out = Command::new(py)
                .args(["-c", script])
                .arg(dir.path())
                .arg(root().join("examples/torchscript-digits/digits.npz"))
                .output()
                .expect("python");
            assert!(out.status.success(), "PyTorch could not load the registered model: {}", String::from_utf8_lossy(&out.stderr));
            let acc: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("accuracy");
            let reported = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
            assert!((acc - reported).abs() < 0.01, "PyTorch's accuracy {acc} vs the job's {reported}");
        }
    }

    // A rebuild from the log's start brings every job again and duplicates nothing.
    let out = Command::new(bin("flamectl"))
        .args(["mlflow", "--rebuild", "--url", &mlflow.url(), "--store", &store])
        .arg("--blobs")
        .arg(data.join("blobs"))
        .output()
        .expect("flamectl mlflow");
    assert!(out.status.success(), "flamectl mlflow --rebuild: {}", String::from_utf8_lossy(&out.stderr));
    check("after a rebuild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlflow_server_killed_mid_job_and_restarted_ends_with_one_run_holding_every_round() {
    let Some(mlflow_bin) = mlflow_bin("the MLflow projection through an MLflow outage") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut mlflow = Mlflow::start(&mlflow_bin, dir.path());
    let served = Served::start(dir.path(), &["--mlflow", &mlflow.url()], &[]).await;
    let rounds = 10u64;
    let job = served.submit(&digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds)));
    let store = served.store().await;
    let aggregated = |events: &[flame_events::Envelope]| events.iter().filter(|e| e.event_type == "RoundAggregated").count() as u64;
    wait_for_events(&store, &job, "round 2", |ev| aggregated(ev) >= 2).await;
    mlflow.kill();
    let during = wait_for_events(&store, &job, "round 5", |ev| aggregated(ev) >= 5).await;
    let before_restart = aggregated(&during);
    mlflow.restart();
    let events = wait_for_events(&store, &job, "the end", |ev| ev.last().is_some_and(|e| e.event_type == "JobCompleted")).await;
    assert_eq!(aggregated(&events), rounds);

    // MLflow catches up (its retry pauses are at most 15 s).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (run, run_id) = loop {
        let runs = mlflow.runs("digits-two-tier", &job);
        if let Some(run) = runs.first().filter(|r| r["info"]["status"] == "FINISHED") {
            let id = run["info"]["run_id"].as_str().expect("run id").to_string();
            if !mlflow.versions(&id).is_empty() {
                break (run.clone(), id);
            }
        }
        assert!(Instant::now() < deadline, "MLflow did not catch up with the job: {runs:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(mlflow.runs("digits-two-tier", &job).len(), 1, "one run for the job");
    assert_eq!(tag(&run, "flame.rounds_completed"), Some(rounds.to_string().as_str()));
    let history = mlflow.history(&run_id, "accuracy");
    assert_eq!(history, logged(&events, "accuracy"), "every round once, as logged (MLflow was down from round 2 to {before_restart})");
    let steps: Vec<u64> = history.iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=rounds).collect::<Vec<_>>());
    let by_key: BTreeMap<u64, usize> = mlflow.history(&run_id, "participants").iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p.0).or_default() += 1;
        m
    });
    assert!(by_key.values().all(|n| *n == 1), "no round twice: {by_key:?}");
    assert_eq!(mlflow.versions(&run_id).len(), 1, "one registered version");
}
