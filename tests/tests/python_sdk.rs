//! Jobs with Python trainers: `flame-py-worker` processes (the SDK as `pip
//! install ./sdk/python` put it in a fresh venv) train, the Rust aggregator
//! inside `flamectl run --nats` aggregates, over a NATS server of the test's
//! own. Misbehaving Python trainers are contained as Rust ones are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::util::{self, Processes, bin, free_port, root};

fn sdk() -> String {
    std::env::var("FLAME_SDK_BIN").expect("FLAME_SDK_BIN is unset: run the tests with scripts/test.sh, which installs the Python SDK")
}

/// Starts `flame-py-worker` for site `n` (realm `default/site<n>`) with a trainer `module:Class`,
/// or a broken worker (tests/python/broken_worker.py) when `broken` names one.
fn python_trainer(procs: &mut Processes, nats: &str, id: &str, site: usize, trainer: &str, broken: Option<&str>) {
    let mut c = match broken {
        None => Command::new(format!("{}/flame-py-worker", sdk())),
        Some(how) => {
            let mut c = Command::new(format!("{}/python", sdk()));
            c.arg(root().join("tests/python/broken_worker.py")).arg(how);
            c
        }
    };
    c.args(["--nats", nats, "--id", id, "--realm", &format!("default/site{site}"), "--trainer", trainer])
        .arg("--data-root")
        .arg(util::examples())
        .env("FLAME_SDK_LOG", "ERROR")
        .stdout(Stdio::null());
    procs.spawn(&mut c);
}

fn example_trainer() -> String {
    format!("{}:DigitsTrainer", root().join("examples/python-digits/trainer.py").display())
}

fn misbehaving(class: &str) -> String {
    format!("{}:{class}", root().join("tests/python/misbehaving.py").display())
}

fn flamectl(args: &[&str]) -> std::process::Output {
    Command::new(bin("flamectl")).args(args).current_dir(root()).env("RUST_LOG", "warn").output().expect("flamectl")
}

/// `flamectl run FOLDER --nats URL -o json` with its store in `data`: the summary.
fn run(folder: &Path, nats: &str, data: &Path) -> Value {
    let out = flamectl(&["run", folder.to_str().expect("utf8"), "--nats", nats, "--data-dir", data.to_str().expect("utf8"), "-o", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("flamectl run printed no summary ({e}): {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

/// The job's events as `flamectl events -o json` prints them.
fn events(job: &str, data: &Path) -> Vec<Value> {
    let store = format!("sqlite:{}", data.join("events.db").display());
    let out = flamectl(&["events", job, "--store", &store, "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("event JSON")).collect()
}

/// The example as a folder of the test's own with changed hyperparameters
/// (dataset paths made absolute, so it runs from anywhere).
fn python_job(dir: &Path, hyperparameters: Value) -> PathBuf {
    let from = root().join("examples/python-digits");
    let to = dir.join("job");
    std::fs::create_dir_all(&to).expect("mkdir");
    let npz = root().join("examples/torchscript-digits/digits.npz");
    for entry in std::fs::read_dir(&from).expect("example") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        let mut bytes = std::fs::read(&path).expect("read");
        if name.starts_with("dataset") {
            let text = String::from_utf8(bytes).expect("utf8").replace("../torchscript-digits/digits.npz", npz.to_str().expect("utf8"));
            bytes = text.into_bytes();
        }
        if name == "modelSpec.json" {
            let mut spec: Value = serde_json::from_slice(&bytes).expect("spec");
            for (k, v) in hyperparameters.as_object().expect("object") {
                spec["hyperparameters"][k] = v.clone();
            }
            bytes = serde_json::to_vec_pretty(&spec).expect("json");
        }
        std::fs::write(to.join(name), bytes).expect("write");
    }
    to
}

fn type_counts(events: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in events {
        *counts.entry(e["event_type"].as_str().expect("type").to_string()).or_default() += 1;
    }
    counts
}

fn payload_keys(events: &[Value]) -> BTreeMap<String, BTreeSet<String>> {
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in events {
        let set = keys.entry(e["event_type"].as_str().expect("type").to_string()).or_default();
        set.extend(e["payload"].as_object().expect("payload").keys().cloned());
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_trainers_and_the_rust_aggregator_run_the_example() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = util::Nats::start(free_port(), &dir.path().join("js"));
    util::connect(&nats.url).await;
    let mut procs = Processes::default();
    for site in 1..=3 {
        python_trainer(&mut procs, &nats.url, &format!("py-{site}"), site, &example_trainer(), None);
    }
    let data = dir.path().join("data");
    let summary = run(&root().join("examples/python-digits"), &nats.url, &data);
    assert_eq!(summary["state"], "completed", "{summary}");
    assert_eq!(summary["rounds_completed"], 5);
    let rounds = summary["rounds"].as_array().expect("rounds");
    let last = &rounds[rounds.len() - 1];
    assert!(last["federated"]["accuracy"].as_f64().is_some_and(|a| a > 0.9), "the trainers' own evaluation of the last model: {last}");
    assert!(last["metrics"].as_object().is_some_and(|m| m.is_empty()), "no central evaluation of a model only the trainers run");
    let job = summary["job_id"].as_str().expect("job id");
    let store = format!("sqlite:{}", data.join("events.db").display());
    let verify = flamectl(&["replay", job, "--verify", "--store", &store]);
    assert!(verify.status.success(), "replay --verify: {}", String::from_utf8_lossy(&verify.stdout));

    // The same shape as an all-Rust job of the same design (the TorchScript digits example, run
    // here: three trainers, five rounds, federated evaluation every round): the same events, as
    // many, with the same fields.
    let ours = events(job, &data);
    let rust_data = dir.path().join("rust");
    let out = flamectl(&["run", "examples/torchscript-digits", "-o", "json", "--data-dir", rust_data.to_str().expect("utf8")]);
    let rust_summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(rust_summary["state"], "completed", "{rust_summary}");
    let rust = events(rust_summary["job_id"].as_str().expect("id"), &rust_data);
    assert_eq!(type_counts(&ours), type_counts(&rust));
    assert_eq!(payload_keys(&ours), payload_keys(&rust));
    let trainers: BTreeSet<&str> =
        ours.iter().filter(|e| e["event_type"] == "UpdateReported").map(|e| e["actor"].as_str().expect("actor")).collect();
    assert_eq!(trainers, BTreeSet::from(["worker:py-1", "worker:py-2", "worker:py-3"]), "the updates came from the Python workers");
}

/// One job per fault: two good trainers and one that misbehaves, minClients 2,
/// a short roundTimeout. The job completes on the two; the third's fault is on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_python_trainers_are_contained() {
    let cases: [(&str, &str, Option<&str>); 5] = [
        ("raises", "Raises", None),
        ("wrong-shape", "WrongShape", None),
        ("inflates", "Inflates", None),
        ("hangs", "Hangs", None),
        ("unchecked", "WrongShape", Some("unchecked")),
    ];
    for (case, class, broken) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = util::Nats::start(free_port(), &dir.path().join("js"));
        util::connect(&nats.url).await;
        let mut procs = Processes::default();
        python_trainer(&mut procs, &nats.url, "good-1", 1, &example_trainer(), None);
        python_trainer(&mut procs, &nats.url, "good-2", 2, &example_trainer(), None);
        python_trainer(&mut procs, &nats.url, "bad-3", 3, &misbehaving(class), broken);
        let folder = python_job(dir.path(), serde_json::json!({"rounds": 2, "minClients": 2, "roundTimeout": 4}));
        let data = dir.path().join("data");
        let summary = run(&folder, &nats.url, &data);
        assert_eq!(summary["state"], "completed", "{case}: {summary}");
        let job = summary["job_id"].as_str().expect("job id");
        let events = events(job, &data);
        let of = |t: &str| events.iter().filter(|e| e["event_type"] == t).map(|e| e["payload"].clone()).collect::<Vec<_>>();
        for round in of("RoundAggregated") {
            assert_eq!(round["inputs"].as_array().map(Vec::len), Some(2), "{case}: only the good trainers' updates: {round}");
        }
        match case {
            "raises" | "wrong-shape" | "inflates" => {
                let failed = of("TrainingFailed");
                assert_eq!(failed.len(), 2, "{case}: once a round: {failed:?}");
                let want = match case {
                    "raises" => "ValueError: a bad batch in round",
                    "wrong-shape" => "missing fc2.bias",
                    _ => "claims 100000 samples; the task's dataset holds 479 training rows",
                };
                for f in &failed {
                    assert_eq!(f["task_id"], "trainer-2", "{case}");
                    assert!(f["error"].as_str().is_some_and(|e| e.contains(want)), "{case}: {f}");
                }
                if case == "raises" {
                    assert!(failed[0]["error"].as_str().is_some_and(|e| e.contains("misbehaving.py")), "where the user's code raised");
                }
            }
            "hangs" => {
                let closed = of("TrainingClosed");
                assert_eq!(closed.len(), 2, "closed at the deadline each round: {closed:?}");
                assert!(closed.iter().all(|c| c["dropped"] == serde_json::json!(["trainer-2"])), "{closed:?}");
            }
            _ => {
                let excluded = of("UpdateExcluded");
                assert_eq!(excluded.len(), 2, "the aggregator left the bad update out each round: {excluded:?}");
                assert!(
                    excluded.iter().all(|x| x["task_id"] == "trainer-2" && x["reason"].as_str().is_some_and(|r| r.contains("fc2.bias")))
                );
            }
        }
        let store = format!("sqlite:{}", data.join("events.db").display());
        let verify = flamectl(&["replay", job, "--verify", "--store", &store]);
        assert!(verify.status.success(), "{case}: replay --verify: {}", String::from_utf8_lossy(&verify.stdout));
    }
}

/// Any framework behind the same trainer: two sites train the example's MLP
/// in PyTorch (`torch_trainer.py`, the SDK installed beside PyTorch in
/// `.deps/torch`), one in plain numpy, in one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytorch_and_numpy_trainers_share_a_job() {
    let torch_bin = match std::env::var("FLAME_TORCH_PYTHON") {
        Ok(p) if !p.is_empty() => PathBuf::from(p).parent().expect("bin").to_path_buf(),
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: Python SDK trainers in PyTorch: FLAME_TORCH_PYTHON is unset (scripts/test.sh installs PyTorch into .deps/torch unless FLAME_SKIP_TORCH=1)"
            );
            return;
        }
    };
    let flame_py_worker = torch_bin.join("flame-py-worker");
    assert!(flame_py_worker.exists(), "{} is missing: scripts/test.sh installs the SDK beside PyTorch", flame_py_worker.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = util::Nats::start(free_port(), &dir.path().join("js"));
    util::connect(&nats.url).await;
    let mut procs = Processes::default();
    let torch_trainer = format!("{}:TorchDigitsTrainer", root().join("examples/python-digits/torch_trainer.py").display());
    for site in [1, 2] {
        procs.spawn(
            Command::new(&flame_py_worker)
                .args(["--nats", &nats.url, "--id", &format!("torch-{site}"), "--realm", &format!("default/site{site}")])
                .args(["--trainer", &torch_trainer])
                .arg("--data-root")
                .arg(util::examples())
                .env("FLAME_SDK_LOG", "ERROR")
                .stdout(Stdio::null()),
        );
    }
    python_trainer(&mut procs, &nats.url, "numpy-3", 3, &example_trainer(), None);
    let data = dir.path().join("data");
    let summary = run(&root().join("examples/python-digits"), &nats.url, &data);
    assert_eq!(summary["state"], "completed", "{summary}");
    let rounds = summary["rounds"].as_array().expect("rounds");
    let last = &rounds[rounds.len() - 1];
    assert!(last["federated"]["accuracy"].as_f64().is_some_and(|a| a > 0.9), "{last}");
    let events = events(summary["job_id"].as_str().expect("id"), &data);
    let actors: BTreeSet<&str> =
        events.iter().filter(|e| e["event_type"] == "UpdateReported").map(|e| e["actor"].as_str().expect("actor")).collect();
    assert_eq!(actors, BTreeSet::from(["worker:numpy-3", "worker:torch-1", "worker:torch-2"]));
}

/// NATS credentials as the Rust worker takes them: with the right user and
/// password the Python worker registers; with a wrong one it exits at once
/// with the server's refusal, not a loop of retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_takes_nats_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = util::Nats::start_with(port, dir.path(), &["--user", "flame", "--pass", "s3cret"]);
    let auth = flame_transport::NatsAuth { user: Some("flame".into()), password: Some("s3cret".into()), ..Default::default() };
    let mut connected = None;
    for _ in 0..100 {
        if let Ok(t) = flame_transport::Nats::connect_with(&server.url, &auth).await {
            connected = Some(t);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let transport = connected.expect("NATS with a password");
    let worker = |password: &str| {
        let mut c = Command::new(format!("{}/flame-py-worker", sdk()));
        c.args(["--nats", &server.url, "--id", "py-auth", "--trainer", &example_trainer(), "--nats-user", "flame"])
            .env("FLAME_NATS_PASSWORD", password)
            .env("FLAME_SDK_LOG", "ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let started = std::time::Instant::now();
    let refused = worker("wrong").output().expect("run");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cannot connect to NATS") && stderr.contains("Authorization Violation"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "a refusal ends the process, not a retry loop");

    let mut procs = Processes::default();
    procs.spawn(&mut worker("s3cret"));
    let mut registered = false;
    for _ in 0..100 {
        if flame_transport::Transport::workers(&transport).await.expect("registry").iter().any(|w| w.id == "py-auth") {
            registered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(registered, "the worker registered with the password from FLAME_NATS_PASSWORD");
}

/// A command too large for a NATS message (an aggregate listing thousands of
/// updates; here the server allows 256 KiB) goes through the object store. A
/// Python aggregator reads it whole and aggregates every update, where a
/// worker that knew only the message would answer that it does not know the
/// kind `in_object_store`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_aggregator_reads_a_command_too_large_for_a_message() {
    use flame_events::protocol::{ReportBody, UpdateRef};
    use flame_transport::blob::{BlobStore, NatsBlobs};
    use flame_transport::{Nats, Transport};
    use flame_workers::weights::{Tensor, Weights, decode, encode};
    use futures::StreamExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 262144\n").expect("config");
    let nats = util::Nats::start_with(free_port(), &dir.path().join("js"), &["-c", conf.to_str().expect("utf8")]);
    let client = util::connect(&nats.url).await;
    let max_payload = client.server_info().max_payload;
    assert_eq!(max_payload, 262_144, "the server's limit");
    let engine = Nats::connect(&nats.url).await.expect("engine");
    let blobs = NatsBlobs::with_replicas(engine.jetstream(), 1).await.expect("object store");
    let model = |w: [f32; 2]| -> Weights { [("w".to_string(), Tensor { shape: vec![2], data: w.to_vec() })].into() };
    let global = blobs.put(encode(&model([0.0, 0.0])).expect("encode")).await.expect("global");
    let update = blobs.put(encode(&model([1.0, -2.0])).expect("encode")).await.expect("update");
    // About 110 bytes an update: enough of them to pass the server's limit.
    let n = max_payload / 100 + 100;
    let run = util::unique();
    let worker = format!("py-agg-{run}");
    let updates = (0..n).map(|i| UpdateRef::new(format!("trainer-{i}"), update.clone(), 10)).collect();
    let command = util::aggregate_command(&run, &worker, global, updates);
    assert!(serde_json::to_vec(&command).expect("json").len() > max_payload, "the command must not fit in one message");
    let mut procs = Processes::default();
    procs.spawn(
        Command::new(format!("{}/flame-py-worker", sdk()))
            .args(["--nats", &nats.url, "--id", &worker, "--roles", "aggregator"])
            .env("FLAME_SDK_LOG", "WARNING")
            .stdout(Stdio::null()),
    );
    let mut reports = engine.report_inbox(&command.job_id).await.expect("reports");
    engine.send_command(&worker, &command).await.expect("sent through the object store");
    let report = tokio::time::timeout(std::time::Duration::from_secs(180), reports.next())
        .await
        .expect("a report in time")
        .expect("open")
        .expect("decodes")
        .message;
    assert_eq!(report.command_id, command.id);
    let ReportBody::Aggregated { digest, excluded, .. } = &report.body else { panic!("not aggregated: {:?}", report.body) };
    assert!(excluded.is_empty(), "every update used: {excluded:?}");
    let result = decode(&blobs.get(digest).await.expect("the aggregate")).expect("weights");
    let w = &result["w"].data;
    assert!((w[0] - 1.0).abs() < 1e-4 && (w[1] + 2.0).abs() < 1e-4, "the mean of {n} equal updates is that update: {w:?}");
}

/// One worker id is one live process, whichever language it runs in: a
/// Python worker started with the id of a live Rust worker is refused before
/// it registers (both would take that worker's commands); once the Rust one
/// is killed, a Python worker takes the id over; and a Rust worker is refused
/// the id while the Python one lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_is_one_live_process_whichever_language_it_runs_in() {
    use crate::util::{aggregator_worker_in, exit_at_start, nats_url, unique, within_30s};

    let dir = tempfile::tempdir().expect("tempdir");
    let id = format!("py-twice-{}", unique());
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let rust = |name: &str| aggregator_worker_in(&id, dir.path(), name);
    let python = |name: &str| {
        let mut c = Command::new(format!("{}/flame-py-worker", sdk()));
        c.args(["--nats", &nats_url(), "--id", &id, "--roles", "aggregator"])
            .env("FLAME_SDK_LOG", "INFO")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log(name)).expect("log"));
        c
    };
    let said = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default();
    let refusal = format!("worker id '{id}' is in use by another live process");
    let mut procs = Processes::default();

    procs.spawn(&mut rust("rust-1"));
    within_30s("the Rust worker did not start", || said("rust-1").contains("worker ready")).await;
    let second = procs.spawn(&mut python("py-1"));
    let (status, out) = exit_at_start(second, &log("py-1"), "a Python worker started as a live Rust worker").await;
    assert!(!status.success(), "{out}");
    assert!(out.contains(&refusal) && out.contains("--id"), "{out}");
    assert!(!out.contains(&format!("worker {id} ready")), "{out}");

    procs.0[0].kill().expect("SIGKILL");
    procs.0[0].wait().expect("reaped");
    procs.spawn(&mut python("py-2"));
    within_30s("the Python worker did not take over the id of the killed Rust worker", || {
        assert!(procs.0[2].try_wait().expect("wait").is_none(), "the Python worker was refused: {}", said("py-2"));
        said("py-2").contains(&format!("worker {id} ready"))
    })
    .await;

    let fourth = procs.spawn(&mut rust("rust-2"));
    let (status, out) = exit_at_start(fourth, &log("rust-2"), "a Rust worker started as a live Python worker").await;
    assert!(!status.success(), "{out}");
    assert!(out.contains(&refusal), "{out}");
    assert!(!out.contains("worker ready"), "{out}");
}
