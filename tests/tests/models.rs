//! What only the log makes possible (issue 18): `flamectl verify --models`
//! derives every recorded model again from the logged updates, on every
//! example job; a swapped or missing update blob, or a log that names a model
//! its inputs do not make, fails it naming the round.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use flame_events::job::stream_id;

use crate::util::{bin, root};

fn flamectl(args: &[&str]) -> std::process::Output {
    Command::new(bin("flamectl")).args(args).current_dir(root()).output().expect("run flamectl")
}

fn said(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a job folder in embedded mode into `data`; its id.
fn run(folder: &Path, data: &Path) -> String {
    let out = flamectl(&["run", folder.to_str().expect("utf8"), "-o", "json", "--data-dir", data.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}: {}", folder.display(), said(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["state"], "completed", "{summary}");
    summary["job_id"].as_str().expect("job id").to_string()
}

fn verify(job: &str, data: &Path) -> std::process::Output {
    let store = format!("sqlite:{}/events.db", data.display());
    let blobs = data.join("blobs");
    flamectl(&["verify", job, "--models", "--store", &store, "--blobs", blobs.to_str().expect("utf8"), "-o", "json"])
}

fn lines(out: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// A copy of an example folder with `f` applied to its modelSpec.json.
fn variant(example: &str, into: &Path, f: impl FnOnce(&mut Value)) -> std::path::PathBuf {
    let from = root().join("examples").join(example);
    let to = into.join(example);
    std::fs::create_dir_all(&to).expect("mkdir");
    for entry in std::fs::read_dir(&from).expect("example") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
    let spec = to.join("modelSpec.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&spec).expect("modelSpec")).expect("json");
    f(&mut v);
    std::fs::write(&spec, v.to_string()).expect("write");
    to
}

#[test]
fn every_example_job_and_an_adaptive_one_re_derive_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut folders: Vec<std::path::PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples")
        .map(|e| e.expect("entry").path())
        // python-digits needs Python trainers beside it (its own test runs it).
        .filter(|p| p.is_dir() && !p.ends_with("python-digits"))
        .collect();
    folders.sort();
    assert!(folders.len() >= 11, "{folders:?}");
    // FedAdam: its moments are carried from round to round, and checked too.
    folders.push(variant("digits-two-tier", dir.path(), |spec| {
        spec["optimizer"] = serde_json::json!({"sort": "fedadam", "kwargs": {"eta": 0.05}});
    }));
    let mut checked = Vec::new();
    for (i, folder) in folders.iter().enumerate() {
        let data = dir.path().join(format!("run-{i}"));
        let job = run(folder, &data);
        let out = verify(&job, &data);
        let name = folder.file_name().expect("name").to_string_lossy().to_string();
        assert!(out.status.success(), "{name}: {}", said(&out));
        let rows = lines(&out);
        assert!(!rows.is_empty() && rows.iter().all(|r| r["ok"] == true && r["rederived"] == r["recorded"]), "{name}: {rows:?}");
        let groups = rows.iter().filter(|r| r["kind"] == "group").count();
        checked.push(format!("{name}: {} rounds, {groups} groups", rows.len() - groups));
        if name == "digits-two-tier" && folder.starts_with(dir.path()) {
            let stored = flamectl(&[
                "events",
                &job,
                "--store",
                &format!("sqlite:{}/events.db", data.display()),
                "--type",
                "RoundAggregated",
                "-o",
                "json",
            ]);
            let states: Vec<Value> = lines(&stored).iter().map(|e| e["payload"]["optimizer_state"].clone()).collect();
            assert!(states.iter().all(Value::is_string), "FedAdam records its state every round: {states:?}");
        }
        if ["hierarchical-digits", "fedbuff-hierarchical-digits", "coordinated-digits", "hybrid-digits"].contains(&name.as_str()) {
            assert!(groups > 0, "{name}: the middle aggregations are checked too");
        }
    }
    eprintln!("verified: {checked:?}");
}

#[test]
fn a_swapped_or_missing_update_or_a_forged_model_fails_naming_the_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("run");
    let job = run(&root().join("examples/digits-two-tier"), &data);
    assert!(verify(&job, &data).status.success());
    let store = format!("sqlite:{}/events.db", data.display());
    let updates: Vec<Value> = lines(&flamectl(&["events", &job, "--store", &store, "--type", "UpdateReported", "-o", "json"]))
        .into_iter()
        .map(|e| e["payload"].clone())
        .collect();
    let update = |round: u64, task: &str| -> String {
        updates
            .iter()
            .find(|u| u["round"] == round && u["task_id"] == task)
            .and_then(|u| u["digest"].as_str())
            .unwrap_or_else(|| panic!("no update of {task} in round {round}"))
            .to_string()
    };
    let blob = |d: &str| data.join("blobs").join(d);

    // Another valid update's bytes under round 3's update of trainer-1.
    let (victim, other) = (update(3, "trainer-1"), update(3, "trainer-0"));
    let kept = std::fs::read(blob(&victim)).expect("blob");
    std::fs::copy(blob(&other), blob(&victim)).expect("swap");
    let out = verify(&job, &data);
    assert_eq!(out.status.code(), Some(6), "{}", said(&out));
    let rows = lines(&out);
    let bad: Vec<u64> = rows.iter().filter(|r| r["ok"] == false).filter_map(|r| r["round"].as_u64()).collect();
    assert_eq!(bad, vec![3], "only round 3 fails: {rows:?}");
    let text = said(&out);
    assert!(text.contains("round 3's update of task 'trainer-1'") && text.contains("do not match the digest"), "{text}");
    std::fs::write(blob(&victim), &kept).expect("restore");

    // A missing update: reported, never guessed around.
    let gone = update(2, "trainer-0");
    let kept = std::fs::read(blob(&gone)).expect("blob");
    std::fs::remove_file(blob(&gone)).expect("remove");
    let out = verify(&job, &data);
    assert_eq!(out.status.code(), Some(6));
    let text = said(&out);
    assert!(text.contains("round 2's update of task 'trainer-0'") && text.contains("missing from the blob store"), "{text}");
    std::fs::write(blob(&gone), &kept).expect("restore");
    assert!(verify(&job, &data).status.success(), "restored");

    // A log that names, for round 4, a model its inputs do not make (a valid blob of the same shape).
    let forged = update(4, "trainer-2");
    {
        let conn = rusqlite::Connection::open(data.join("events.db")).expect("sqlite");
        let (position, payload): (i64, String) = conn
            .query_row(
                "SELECT position, payload FROM events WHERE stream_id = ?1 AND event_type = 'RoundAggregated' AND payload LIKE '%\"round\":4,%'",
                [stream_id(&job)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("round 4's aggregate");
        let mut p: Value = serde_json::from_str(&payload).expect("payload");
        p["digest"] = Value::String(forged.clone());
        conn.execute("UPDATE events SET payload = ?1 WHERE position = ?2", rusqlite::params![p.to_string(), position]).expect("forge");
    }
    let out = verify(&job, &data);
    assert_eq!(out.status.code(), Some(6));
    let rows = lines(&out);
    let round4 = rows.iter().find(|r| r["round"] == 4).expect("round 4");
    assert_eq!(round4["ok"], false);
    assert_eq!(round4["recorded"], forged.as_str());
    let problems = round4["problems"].to_string();
    assert!(problems.contains("first difference: parameter '"), "the first differing tensor is named: {problems}");
    let inputs: Vec<&str> = round4["input_blobs"].as_array().expect("inputs").iter().filter_map(|i| i["task"].as_str()).collect();
    assert_eq!(inputs, vec!["trainer-0", "trainer-1", "trainer-2"], "and so are its inputs");
    let text = said(&out);
    assert!(text.contains("the first is round 4"), "{text}");
}

/// digits-two-tier with trainer 3's data (site 3) replaced by its rows with
/// every label flipped (`9 - y`) and the features scaled up 30 times: a
/// deliberately bad trainer whose updates are large and wrong.
fn poisoned(into: &Path) -> std::path::PathBuf {
    let folder = variant("digits-two-tier", into, |spec| spec["hyperparameters"]["rounds"] = serde_json::json!(6));
    let data = flame_workers::data::load("builtin://digits?part=2&of=3").expect("digits");
    let train = &data.train;
    let mut csv = String::new();
    for (row, y) in train.x.chunks(train.features).zip(&train.y) {
        let features: Vec<String> = row.iter().map(|v| (v * 30.0).to_string()).collect();
        csv.push_str(&format!("{},{}\n", features.join(","), 9 - y));
    }
    std::fs::write(folder.join("flipped.csv"), csv).expect("csv");
    let ds = folder.join("dataset3.json");
    let mut d: Value = serde_json::from_slice(&std::fs::read(&ds).expect("dataset3")).expect("json");
    d["url"] = Value::String("flipped.csv".into());
    std::fs::write(&ds, d.to_string()).expect("write");
    folder
}

#[test]
fn whatif_reproduces_the_run_with_its_own_rule_and_shows_median_against_a_bad_trainer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = poisoned(dir.path());
    let data = dir.path().join("run");
    let job = run(&folder, &data);
    let store = format!("sqlite:{}/events.db", data.display());
    let blobs = data.join("blobs");
    let whatif = |extra: &[&str]| {
        let mut args = vec!["whatif", job.as_str(), "--store", &store, "--blobs", blobs.to_str().expect("utf8"), "--data-root"];
        args.push(folder.to_str().expect("utf8"));
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "json"]);
        let out = flamectl(&args);
        assert!(out.status.success(), "{extra:?}: {}", said(&out));
        lines(&out)
    };

    // The job's own rule, nothing left out: the real run's models, bit for bit, and its metrics.
    let own = whatif(&[]);
    assert_eq!(own.len(), 6);
    for r in &own {
        assert_eq!(r["same"], true, "{r}");
        assert_eq!(r["whatif_model"], r["real_model"]);
        assert_eq!(r["whatif"]["accuracy"], r["real"]["accuracy"], "the same model evaluates the same: {r}");
    }

    // The coordinate-wise median of three outvotes the flipped trainer; FedAvg let it in.
    let median = whatif(&["--optimizer", "median"]);
    assert!(median.iter().all(|r| r["same"] == false && r["updates"] == 3), "{median:?}");
    let mean = |rows: &[Value], which: &str| rows.iter().filter_map(|r| r[which]["accuracy"].as_f64()).sum::<f64>() / rows.len() as f64;
    let by_round = |rows: &[Value]| {
        rows.iter()
            .map(|r| format!("{:.3}/{:.3}", r["real"]["accuracy"].as_f64().unwrap_or(0.0), r["whatif"]["accuracy"].as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
    };
    eprintln!("accuracy by round with the bad trainer, FedAvg/median: {:?}", by_round(&median));
    // Round 1 is an exact counterfactual (every update trained from the same initial model);
    // later rounds apply honest changes that were trained from the real, poisoned models.
    let first = |which: &str| median[0][which]["accuracy"].as_f64().expect("accuracy");
    assert!(first("whatif") > first("real") + 0.1, "median resists the bad trainer in round 1: {:?}", by_round(&median));
    assert!(mean(&median, "whatif") > mean(&median, "real") + 0.1, "and over the job: {:?}", by_round(&median));

    // Leaving the bad trainer out, by its task or by its worker, is one and the same what-if.
    let without = whatif(&["--exclude", "trainer-2"]);
    assert!(without.iter().all(|r| r["updates"] == 2));
    assert!(mean(&without, "whatif") > mean(&without, "real") + 0.1, "{:?}", by_round(&without));
    let by_worker = whatif(&["--exclude", "local-trainer-2"]);
    let models = |rows: &[Value]| rows.iter().map(|r| r["whatif_model"].clone()).collect::<Vec<_>>();
    assert_eq!(models(&by_worker), models(&without));

    // Names that match nothing are refused.
    let out = flamectl(&["whatif", &job, "--store", &store, "--blobs", blobs.to_str().expect("utf8"), "--exclude", "nobody"]);
    assert!(!out.status.success() && said(&out).contains("--exclude nobody"), "{}", said(&out));
}

#[test]
fn a_trainer_with_shuffled_labels_contributes_least_and_the_values_add_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = variant("digits-two-tier", dir.path(), |_| {});
    let data = flame_workers::data::load("builtin://digits?part=2&of=3").expect("digits");
    let train = &data.train;
    let mut labels = train.y.clone();
    flame_events::rng::SplitMix::new(7).shuffle(&mut labels);
    let csv: String = train
        .x
        .chunks(train.features)
        .zip(&labels)
        .map(|(row, y)| format!("{},{y}\n", row.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")))
        .collect();
    std::fs::write(folder.join("shuffled.csv"), csv).expect("csv");
    let ds = folder.join("dataset3.json");
    let mut d: Value = serde_json::from_slice(&std::fs::read(&ds).expect("dataset3")).expect("json");
    d["url"] = Value::String("shuffled.csv".into());
    std::fs::write(&ds, d.to_string()).expect("write");

    let run_dir = dir.path().join("run");
    let job = run(&folder, &run_dir);
    let store = format!("sqlite:{}/events.db", run_dir.display());
    let blobs = run_dir.join("blobs");
    let plot = dir.path().join("contributions.png");
    let out = flamectl(&[
        "contributions",
        &job,
        "--store",
        &store,
        "--blobs",
        blobs.to_str().expect("utf8"),
        "--data-root",
        folder.to_str().expect("utf8"),
        "--plot",
        plot.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", said(&out));
    let rows = lines(&out);
    let jobs: Vec<&Value> = rows.iter().filter_map(|r| r.get("job")).collect();
    assert_eq!(jobs.len(), 3, "{rows:?}");
    let lowest =
        jobs.iter().min_by(|a, b| a["shapley"].as_f64().unwrap_or(0.0).total_cmp(&b["shapley"].as_f64().unwrap_or(0.0))).expect("some");
    eprintln!("contributions: {jobs:?}");
    assert_eq!(lowest["task"], "trainer-2", "the trainer with shuffled labels scores lowest: {jobs:?}");
    assert!(
        jobs.iter().filter(|j| j["task"] != "trainer-2").all(|j| j["leave_one_out"].as_f64() > lowest["leave_one_out"].as_f64()),
        "leave-one-out agrees: {jobs:?}"
    );
    // Efficiency: each round's values add up to its gain (exact values for three trainers).
    for g in rows.iter().filter_map(|r| r.get("round_gain")) {
        let round = &g["round"];
        let sum: f64 = rows.iter().filter(|r| r["round"] == *round && r.get("task").is_some()).filter_map(|r| r["shapley"].as_f64()).sum();
        let gain = g["gain"].as_f64().expect("gain");
        assert!((sum - gain).abs() < 1e-9, "round {round}: the values add up to {sum}, the gain is {gain}");
    }
    assert!(std::fs::metadata(&plot).is_ok_and(|m| m.len() > 1000), "the plot was written");
}

#[test]
fn a_fork_retraces_its_parent_and_unlearning_removes_a_worker_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("run");
    let parent = run(&root().join("examples/digits-two-tier"), &data);
    let store = format!("sqlite:{}/events.db", data.display());
    let data_dir = data.to_str().expect("utf8");
    let summary = |out: &std::process::Output| -> Value {
        assert!(out.status.success(), "{}", said(out));
        serde_json::from_slice(&out.stdout).expect("summary")
    };
    let from_one = summary(&flamectl(&["fork", &parent, "--from-round", "1", "--data-dir", data_dir, "-o", "json"]));
    let events = |job: &str, t: &str| lines(&flamectl(&["events", job, "--store", &store, "--type", t, "-o", "json"]));
    let final_of = |job: &str| events(job, "JobCompleted")[0]["payload"]["final_model"].clone();

    // From the initial model, or from round 4, with the same seeds: the parent's final model, bit for bit.
    assert_eq!(from_one["final_model"], final_of(&parent), "a fork from round 1 retraces the whole job");
    let late = summary(&flamectl(&["fork", &parent, "--from-round", "4", "--data-dir", data_dir, "-o", "json"]));
    assert_eq!(late["final_model"], final_of(&parent));
    let late_id = late["job_id"].as_str().expect("id");
    let started: Vec<u64> = events(late_id, "RoundStarted").iter().filter_map(|e| e["payload"]["round"].as_u64()).collect();
    assert_eq!(started, vec![4, 5], "it runs only the rounds after the fork");
    let forked = &events(late_id, "JobForked")[0]["payload"];
    assert_eq!((forked["parent_job"].as_str(), forked["from_round"].as_u64()), (Some(parent.as_str()), Some(4)));
    let round3 = events(&parent, "RoundAggregated").into_iter().find(|e| e["payload"]["round"] == 3).expect("round 3");
    assert_eq!(forked["model"], round3["payload"]["digest"], "it starts from the parent's model after round 3");

    // Unlearning a worker: forked before its first update (round 1), without it; nothing of it in the lineage.
    let out = flamectl(&["fork", &parent, "--unlearn", "local-trainer-2", "--data-dir", data_dir, "-o", "json"]);
    let unlearned = summary(&out);
    let id = unlearned["job_id"].as_str().expect("id");
    assert_eq!(unlearned["state"], "completed");
    assert_ne!(unlearned["final_model"], final_of(&parent));
    let origin = &events(id, "JobForked")[0]["payload"];
    assert_eq!((origin["from_round"].as_u64(), origin["excluded"].clone()), (Some(1), serde_json::json!(["trainer-2"])));
    let updates = events(id, "UpdateReported");
    assert_eq!(updates.len(), 10, "two trainers, five rounds");
    assert!(updates.iter().all(|u| u["payload"]["task_id"] != "trainer-2" && u["payload"]["worker_id"] != "local-trainer-2"));
    let view: Value = serde_json::from_slice(&flamectl(&["replay", id, "--store", &store, "-o", "json"]).stdout).expect("replay");
    let lineage = view["view"]["lineage"].as_array().expect("lineage");
    assert_eq!(lineage[0]["made_by"], format!("job:{parent}"), "the lineage starts at the parent's model");
    let inputs: Vec<&Value> = lineage.iter().flat_map(|m| m["inputs"].as_array().into_iter().flatten()).collect();
    assert!(!inputs.is_empty() && inputs.iter().all(|i| i["worker_id"] != "local-trainer-2"), "{inputs:?}");
    // The fork's log replays, verifies and re-derives like any job's; its trace names its parent.
    for job in [id, late_id] {
        let out = flamectl(&["replay", job, "--store", &store, "--verify"]);
        assert!(out.status.success(), "{}", said(&out));
        assert!(verify(job, &data).status.success());
    }
    let trace = flamectl(&["trace", id, "--store", &store]);
    assert!(String::from_utf8_lossy(&trace.stdout).contains(&format!("fork of job {parent} from round 1")), "{}", said(&trace));

    // What a fork cannot do is refused with the reason.
    let out = flamectl(&["fork", &parent, "--unlearn", "local-trainer-2", "--from-round", "3", "--data-dir", data_dir]);
    assert_eq!(out.status.code(), Some(2));
    assert!(said(&out).contains("after the first update to unlearn"), "{}", said(&out));
    let out = flamectl(&["fork", &parent, "--from-round", "2", "--set", "hidden=[8]", "--data-dir", data_dir]);
    assert!(!out.status.success() && said(&out).contains("may change only"), "{}", said(&out));
}
