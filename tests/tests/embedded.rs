//! `flamectl run` in embedded mode, and its errors for bad job folders.

use std::process::Command;

use serde_json::Value;

use crate::util::{bin, root};

fn flamectl(args: &[&str]) -> std::process::Output {
    Command::new(bin("flamectl")).args(args).current_dir(root()).output().expect("run flamectl")
}

#[test]
fn digits_job_completes_and_its_events_are_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8");
    let out = flamectl(&["run", "examples/digits-two-tier", "-o", "json", "--data-dir", data]);
    assert!(out.status.success(), "flamectl run failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(summary["state"], "completed");
    assert_eq!(summary["rounds_completed"], 5);
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.85, "final accuracy {accuracy}");
    let store = summary["store"].as_str().expect("store");
    assert_eq!(store, format!("sqlite:{data}/events.db"));
    let job_id = summary["job_id"].as_str().expect("job id");

    let out = flamectl(&["events", job_id, "--store", store, "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(events.len() as u64, summary["events"].as_u64().expect("count"));
    let versions: Vec<u64> = events.iter().map(|e| e["version"].as_u64().expect("version")).collect();
    assert_eq!(versions, (1..=events.len() as u64).collect::<Vec<_>>());
    let types: Vec<&str> = events.iter().map(|e| e["event_type"].as_str().expect("type")).collect();
    assert_eq!(types.first(), Some(&"JobCreated"));
    assert_eq!(types.last(), Some(&"JobCompleted"));
    assert_eq!(types.iter().filter(|t| **t == "RoundAggregated").count(), 5);
    assert_eq!(types.iter().filter(|t| **t == "UpdateReported").count(), 15);
    let last = events.last().expect("last");
    assert_eq!(last["payload"]["final_model"], summary["final_model"]);
    // The final model blob is in the blob folder under its own digest.
    let digest = summary["final_model"].as_str().expect("digest");
    let bytes = std::fs::read(dir.path().join("blobs").join(digest)).expect("final blob");
    assert_eq!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)), digest);
}

/// The digits examples' final models with portable kernels: the same on every
/// x86-64 CPU (README, "Reproducibility"; `scripts/cpu-models.sh` runs the
/// examples under emulated CPU models). A change to training, data, seeding or
/// aggregation that changes results on purpose changes these: say so in the
/// commit, with the new digests.
const PORTABLE_DIGESTS: [(&str, &str); 2] = [
    ("examples/digits-two-tier", "24d8314b94e65173ac8f4356ad2a525cd7cfbfb53f54ec9f061680f9347e25e5"),
    ("examples/digits-cnn", "0de60b9b06397684e205abecacb7218461626169be897f5fdc211cdf3bb82a8a"),
];

#[test]
fn portable_kernels_end_at_the_pinned_models_and_native_runs_repeat() {
    let final_model = |job: &str, kernels: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = flamectl(&["run", job, "-o", "json", "--kernels", kernels, "--data-dir", dir.path().to_str().expect("utf8")]);
        assert!(out.status.success(), "flamectl run {job} --kernels {kernels}: {}", String::from_utf8_lossy(&out.stderr));
        let summary: Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
        assert_eq!(summary["kernels"], kernels, "{job}");
        summary["final_model"].as_str().expect("final model").to_string()
    };
    for (job, pinned) in PORTABLE_DIGESTS {
        assert_eq!(final_model(job, "portable"), pinned, "{job} with portable kernels");
    }
    // Native kernels: the fastest for this CPU, the same bits run after run here.
    let native = final_model("examples/digits-two-tier", "native");
    assert_eq!(final_model("examples/digits-two-tier", "native"), native);
}

/// Runs a job folder with `flamectl run -o json` (data under `data`), checks
/// that it completed, and returns its summary and its events.
fn run_completed(job: &str, data: &str) -> (Value, Vec<Value>) {
    let out = flamectl(&["run", job, "-o", "json", "--data-dir", data]);
    assert!(out.status.success(), "flamectl run {job} failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(summary["state"], "completed", "{job}");
    let out =
        flamectl(&["events", summary["job_id"].as_str().expect("id"), "--store", summary["store"].as_str().expect("store"), "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    (summary, events)
}

/// Runs an example whose trainers report through groups (middle aggregators
/// or rings) and checks every round: each group's model is the FedAvg of its
/// members' updates, the global model is the FedAvg of the groups by their
/// samples, and that equals flat FedAvg over all trainers (to f32 rounding).
fn check_grouped_example(example: &str, groups_per_round: usize, members: usize) -> Value {
    use flame_workers::{fedavg, weights};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8");
    let (summary, events) = run_completed(example, data);
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.85, "{example}: final accuracy {accuracy}");
    let of = |t: &'static str| events.iter().filter(move |e| e["event_type"] == t).map(|e| &e["payload"]);
    let created = of("JobCreated").next().expect("created");
    let uplinks = created["spec"]["uplinks"].as_object().expect("uplinks recorded");
    let blob = |d: &Value| {
        weights::decode(&std::fs::read(dir.path().join("blobs").join(d.as_str().expect("digest"))).expect("blob")).expect("safetensors")
    };
    let trainers = groups_per_round * members;

    for round in 1..=5u64 {
        let updates: Vec<&Value> = of("UpdateReported").filter(|u| u["round"] == round).collect();
        let groups: Vec<&Value> = of("GroupAggregated").filter(|g| g["round"] == round).collect();
        assert_eq!((updates.len(), groups.len()), (trainers, groups_per_round), "{example} round {round}");
        let mut flat = Vec::new();
        let mut by_group = Vec::new();
        for g in &groups {
            let mine: Vec<&&Value> = updates.iter().filter(|u| uplinks[u["task_id"].as_str().expect("task")] == g["task_id"]).collect();
            assert_eq!(mine.len(), members, "{example}: members of {}", g["task_id"]);
            let mut listed: Vec<&Value> = g["inputs"].as_array().expect("inputs").iter().collect();
            listed.sort_by_key(|d| d.as_str());
            let mut want: Vec<&Value> = mine.iter().map(|u| &u["digest"]).collect();
            want.sort_by_key(|d| d.as_str());
            assert_eq!(listed, want, "round {round}: {} holds its members' updates", g["task_id"]);
            let inputs: Vec<(weights::Weights, u64)> =
                mine.iter().map(|u| (blob(&u["digest"]), u["samples"].as_u64().expect("n"))).collect();
            let samples: u64 = inputs.iter().map(|(_, n)| n).sum();
            assert_eq!(g["samples"].as_u64(), Some(samples));
            assert_eq!(blob(&g["digest"]), fedavg::fedavg(&inputs).expect("fedavg"), "the group's model is its FedAvg");
            flat.extend(inputs);
            by_group.push((blob(&g["digest"]), samples));
        }
        let global = of("RoundAggregated").find(|r| r["round"] == round).expect("aggregated");
        assert_eq!(global["inputs"].as_array().map(Vec::len), Some(trainers), "the round lists the trainers' updates");
        let global = blob(&global["digest"]);
        assert_eq!(global, fedavg::fedavg(&by_group).expect("fedavg"), "the top averages the groups by samples");
        let flat = fedavg::fedavg(&flat).expect("flat");
        for (name, t) in &global {
            let worst = t.data.iter().zip(&flat[name].data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "round {round}, {name}: grouped and flat FedAvg differ by {worst}");
        }
    }
    summary
}

/// Hierarchical: each region's middle aggregator averages its two trainers,
/// the top aggregator the two regions.
#[test]
fn hierarchical_digits_aggregates_each_region_then_the_regions() {
    check_grouped_example("examples/hierarchical-digits", 2, 2);
}

/// Hybrid: each region's trainers reduce in a ring (on the ring leader's
/// worker), the ring's mean goes to the aggregator.
#[test]
fn hybrid_digits_reduces_each_ring_then_the_rings() {
    check_grouped_example("examples/hybrid-digits", 2, 2);
}

/// Ring all-reduce without an aggregator: the ring's reducer runs on its
/// leader's worker, its mean is the global model, and that is bit for bit the
/// two-tier example's (same data, seeds and FedAvg).
#[test]
fn ring_digits_equals_two_tier_fedavg() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (ring, events) = run_completed("examples/ring-digits", a.path().to_str().expect("utf8"));
    let (two_tier, _) = run_completed("examples/digits-two-tier", b.path().to_str().expect("utf8"));
    assert_eq!(ring["final_model"], two_tier["final_model"], "the ring's mean is FedAvg");
    let placed: std::collections::BTreeMap<&str, &str> = events
        .iter()
        .filter(|e| e["event_type"] == "TaskAssigned")
        .map(|e| (e["payload"]["task_id"].as_str().expect("task"), e["payload"]["worker_id"].as_str().expect("worker")))
        .collect();
    assert_eq!(placed.len(), 4, "three trainers and the ring's reducer: {placed:?}");
    assert_eq!(placed["ring-param-channel-default"], placed["trainer-0"], "the reducer runs on the leader's worker");
    let aggregated: Vec<&Value> = events.iter().filter(|e| e["event_type"] == "RoundAggregated").collect();
    assert_eq!(aggregated.len(), 5);
    assert!(aggregated.iter().all(|e| e["payload"]["inputs"].as_array().map(Vec::len) == Some(3)));
    assert!(aggregated.iter().all(|e| e["actor"] == format!("worker:{}", placed["trainer-0"])));
}

/// Runs an asynchronous example to completion (test accuracy at least 0.75);
/// its data folder, summary and events.
fn run_async(example: &str) -> (tempfile::TempDir, Value, Vec<Value>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, events) = run_completed(example, dir.path().to_str().expect("utf8"));
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.75, "{example}: final accuracy {accuracy}");
    (dir, summary, events)
}

/// A model blob of a run, by its digest.
fn blob_in(data: &std::path::Path, digest: &Value) -> flame_workers::weights::Weights {
    let bytes = std::fs::read(data.join("blobs").join(digest.as_str().expect("digest"))).expect("blob");
    flame_workers::weights::decode(&bytes).expect("safetensors")
}

/// The global model round `round` started from.
fn round_start(events: &[Value], round: u64) -> Option<Value> {
    events
        .iter()
        .find(|e| e["event_type"] == "RoundStarted" && e["payload"]["round"] == round)
        .map(|e| e["payload"]["global_model"].clone())
}

/// The round that sent the training an `UpdateReported` answers: the command id it is caused by names it (`<job>/r<N>/train/...`).
fn sent_round(e: &Value) -> u64 {
    e["causation_id"]
        .as_str()
        .and_then(|c| c.split("/r").nth(1))
        .and_then(|r| r.split('/').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no round in the command id of {e}"))
}

/// The FedBuff example: no barrier. Each update records how stale it is
/// (rounds since the one that sent it), each round aggregates a full buffer,
/// and each new global model is FedBuff's step over that buffer, every
/// update's change taken from the model it trained from.
#[test]
fn fedbuff_digits_aggregates_buffers_of_stale_updates() {
    use flame_workers::fedbuff;
    let (dir, _summary, events) = run_async("examples/fedbuff-digits");
    let blob = |d: &Value| blob_in(dir.path(), d);
    let start_model = |round: u64| round_start(&events, round);

    let mut buffer: std::collections::BTreeMap<String, (Value, u64, u64, u32)> = Default::default();
    let mut rounds = 0;
    let mut stale = 0;
    for e in &events {
        let p = &e["payload"];
        match e["event_type"].as_str() {
            Some("RoundStarted") => {
                let dispatched = p["selected"].as_array().map_or(0, Vec::len);
                assert!(dispatched <= 4, "the fedbuff selector keeps at most c = 4 trainers busy: {p}");
            }
            Some("UpdateReported") => {
                let sent = sent_round(e);
                let round = p["round"].as_u64().expect("round");
                let staleness = p["staleness"].as_u64().unwrap_or(0);
                assert_eq!(staleness, round - sent, "{p}");
                stale += u64::from(staleness > 0);
                buffer.insert(
                    p["digest"].as_str().expect("digest").into(),
                    (p["digest"].clone(), p["samples"].as_u64().expect("n"), sent, staleness as u32),
                );
            }
            Some("RoundAggregated") => {
                let round = p["round"].as_u64().expect("round");
                let inputs: Vec<&str> = p["inputs"].as_array().expect("inputs").iter().filter_map(Value::as_str).collect();
                assert!(inputs.len() >= 2, "round {round} aggregated a full buffer (aggGoal 2): {inputs:?}");
                let global = blob(&start_model(round).expect("round start"));
                let taken: Vec<(flame_workers::weights::Weights, u64, flame_workers::weights::Weights, u32)> = inputs
                    .iter()
                    .map(|d| {
                        let (digest, samples, sent, staleness) = buffer.remove(*d).expect("an input was reported");
                        (blob(&digest), samples, blob(&start_model(sent).expect("sent")), staleness)
                    })
                    .collect();
                let step: Vec<fedbuff::Buffered> =
                    taken.iter().map(|(w, n, b, s)| fedbuff::Buffered { trained: w, base: b, samples: *n, staleness: *s }).collect();
                assert_eq!(blob(&p["digest"]), fedbuff::step(&global, &step, 1.0).expect("step"), "round {round} is FedBuff's step");
                rounds += 1;
            }
            _ => {}
        }
    }
    assert_eq!(rounds, 12);
    assert!(stale > 0, "some updates trained from an older model");
}

/// Asynchronous hierarchical FedBuff (Flame's asyncfl_hier_mnist): each
/// region's middle aggregator takes FedBuff's step over its own buffer of
/// `aggGoal` updates (each change from the model it trained from, discounted
/// by its staleness), and the top aggregator combines the regions' steps with
/// FedBuff; both are checked bit for bit against the recorded blobs, and
/// `replay --verify` passes.
#[test]
fn fedbuff_hierarchical_digits_buffers_at_each_region_and_combines_the_regions() {
    use flame_workers::{fedbuff, weights};
    let (dir, summary, events) = run_async("examples/fedbuff-hierarchical-digits");
    let blob = |d: &Value| blob_in(dir.path(), d);
    let start_model = |round: u64| round_start(&events, round).map(|d| blob(&d));
    // Every update: its samples, the model it trained from, its staleness.
    let mut updates: std::collections::BTreeMap<String, (u64, u64, u32)> = Default::default();
    let mut groups: Vec<(String, Value, u64)> = Vec::new();
    let (mut rounds, mut stale, mut by_group) = (0, 0, std::collections::BTreeMap::<String, usize>::new());
    for e in &events {
        let p = &e["payload"];
        match e["event_type"].as_str() {
            Some("UpdateReported") => {
                let sent = sent_round(e);
                let staleness = p["staleness"].as_u64().unwrap_or(0);
                assert_eq!(staleness, p["round"].as_u64().expect("round") - sent, "{p}");
                stale += u64::from(staleness > 0);
                updates.insert(p["digest"].as_str().expect("digest").into(), (p["samples"].as_u64().expect("n"), sent, staleness as u32));
            }
            Some("GroupAggregated") => {
                let round = p["round"].as_u64().expect("round");
                let global = start_model(round).expect("round started");
                let inputs: Vec<String> =
                    p["inputs"].as_array().expect("inputs").iter().map(|d| d.as_str().expect("digest").to_string()).collect();
                assert!(inputs.len() >= 2, "a full buffer of aggGoal 2: {p}");
                let held: Vec<(weights::Weights, u64, weights::Weights, u32)> = inputs
                    .iter()
                    .map(|d| {
                        let (n, sent, staleness) = updates[d];
                        (blob(&Value::from(d.as_str())), n, start_model(sent).expect("sent"), staleness)
                    })
                    .collect();
                let buffer: Vec<fedbuff::Buffered> = held
                    .iter()
                    .map(|(trained, samples, base, staleness)| fedbuff::Buffered {
                        trained,
                        base,
                        samples: *samples,
                        staleness: *staleness,
                    })
                    .collect();
                assert_eq!(blob(&p["digest"]), fedbuff::step(&global, &buffer, 1.0).expect("step"), "round {round}: the region's step");
                assert_eq!(p["samples"].as_u64(), Some(held.iter().map(|h| h.1).sum()));
                *by_group.entry(p["task_id"].as_str().expect("task").into()).or_default() += 1;
                groups.push((p["task_id"].as_str().expect("task").to_string(), p["digest"].clone(), p["samples"].as_u64().expect("n")));
            }
            Some("RoundAggregated") => {
                let round = p["round"].as_u64().expect("round");
                let global = start_model(round).expect("round started");
                assert_eq!(groups.len(), 2, "round {round} combines both regions");
                // In the order the top takes them (by region task id), not the order the regions
                // finished in: the sum's order decides the last bits.
                groups.sort_by(|a, b| a.0.cmp(&b.0));
                let models: Vec<(weights::Weights, u64)> = groups.drain(..).map(|(_, d, n)| (blob(&d), n)).collect();
                let buffer: Vec<fedbuff::Buffered> =
                    models.iter().map(|(m, n)| fedbuff::Buffered { trained: m, base: &global, samples: *n, staleness: 0 }).collect();
                assert_eq!(blob(&p["digest"]), fedbuff::step(&global, &buffer, 1.0).expect("step"), "round {round}: the top's step");
                rounds += 1;
            }
            _ => {}
        }
    }
    assert_eq!(rounds, 10);
    assert_eq!(by_group.values().copied().collect::<Vec<_>>(), [10, 10], "each region aggregates once a round");
    assert!(stale > 0, "trainers still training when their region's buffer filled joined the next one, stale");
    let job = summary["job_id"].as_str().expect("id");
    let out = flamectl(&["replay", job, "--store", summary["store"].as_str().expect("store"), "--verify"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// SCAFFOLD end to end: each trainer's control variate travels as a state
/// blob recorded with its update and handed back the next round; the server's
/// moves by the mean change over all trainers; with eta 1 the global model is
/// the FedAvg of the updates. Round 1 starts from zero variates, so each
/// trainer's first variate is (x - y) / (K lr).
#[test]
fn scaffold_digits_carries_control_variates_between_rounds() {
    use flame_workers::{control, fedavg, weights};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8");
    let (summary, events) = run_completed("examples/scaffold-digits", data);
    let blob = |d: &Value| {
        weights::decode(&std::fs::read(dir.path().join("blobs").join(d.as_str().expect("digest"))).expect("blob")).expect("safetensors")
    };
    let payloads = |t: &'static str| events.iter().filter(move |e| e["event_type"] == t).map(|e| &e["payload"]);
    let created = payloads("JobCreated").next().expect("created");
    assert_eq!(created["spec"]["optimizer"], serde_json::json!({"kind": "scaffold", "eta": 1.0}), "SCAFFOLD, typed");
    assert_eq!(created["spec"]["training"]["epochs"], created["spec"]["hyperparameters"]["epochs"]);
    let h = &created["spec"]["hyperparameters"];
    let (epochs, batch, lr) =
        (h["epochs"].as_u64().expect("epochs"), h["batchSize"].as_u64().expect("batch"), h["learningRate"].as_f64().expect("lr"));
    let near = |a: &weights::Weights, b: &weights::Weights, what: &str| {
        for (name, t) in a {
            let worst = t.data.iter().zip(&b[name].data).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{what}, {name}: off by {worst}");
        }
    };

    let mut global = blob(&payloads("ModelInitialized").next().expect("init")["digest"]);
    let mut server_c = control::zeros(&global);
    let mut client_c: std::collections::BTreeMap<String, weights::Weights> = Default::default();
    for round in 1..=8u64 {
        // In task order, as the aggregator sums them.
        let mut updates: Vec<&Value> = payloads("UpdateReported").filter(|u| u["round"] == round).collect();
        updates.sort_by_key(|u| u["task_id"].as_str().map(str::to_string));
        assert_eq!(updates.len(), 4);
        let mut changes = Vec::new();
        let mut models = Vec::new();
        for u in &updates {
            let task = u["task_id"].as_str().expect("task").to_string();
            let state = blob(&u["client_state"]);
            let (c_i, dc) =
                (control::part(Some(&state), "c", &global).expect("c"), control::part(Some(&state), "dc", &global).expect("dc"));
            let before = client_c.get(&task).cloned().unwrap_or_else(|| control::zeros(&global));
            near(
                &c_i,
                &control::combine(&[(1.0, &before), (1.0, &dc)]).expect("sum"),
                &format!("round {round}: {task}'s variate is its last plus its change"),
            );
            let model = blob(&u["digest"]);
            if round == 1 {
                let samples = u["samples"].as_u64().expect("samples");
                let k = (epochs * samples.div_ceil(batch)) as f64 * lr;
                let first = control::combine(&[(1.0 / k, &global), (-1.0 / k, &model)]).expect("first");
                near(&c_i, &first, &format!("{task}'s first variate is (x - y) / (K lr)"));
            }
            client_c.insert(task, c_i);
            changes.push(dc);
            models.push((model, u["samples"].as_u64().expect("samples")));
        }
        let aggregated = payloads("RoundAggregated").find(|r| r["round"] == round).expect("aggregated");
        let next = blob(&aggregated["digest"]);
        assert!(next == fedavg::fedavg(&models).expect("fedavg"), "round {round}: eta 1 takes the clients' mean");
        let mut terms = vec![(1.0, &server_c)];
        terms.extend(changes.iter().map(|d| (0.25, d)));
        let want = control::combine(&terms).expect("c");
        let got = control::part(Some(&blob(&aggregated["optimizer_state"])), "c", &global).expect("server c");
        near(&got, &want, &format!("round {round}: c += mean change over the 4 trainers"));
        server_c = got;
        global = next;
    }
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.85, "final accuracy {accuracy}");
}

/// Oort at run time on the ten FedProx devices: each round picks 30% more
/// trainers than `aggr_num` (by utility once they have reported, exploring the
/// untried), closes at `aggr_num` updates and drops the rest as stragglers;
/// the trainers report their training time, which Oort weighs.
#[test]
fn oort_closes_rounds_at_aggr_num_of_an_over_committed_selection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job");
    std::fs::create_dir(&job).expect("mkdir");
    for entry in std::fs::read_dir(root().join("examples/fedprox-synthetic")).expect("example") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), job.join(entry.file_name())).expect("copy");
    }
    let mut spec: Value = serde_json::from_str(&std::fs::read_to_string(job.join("modelSpec.json")).expect("read")).expect("json");
    spec["selector"] = serde_json::json!({"sort": "oort", "kwargs": {"aggr_num": 3}});
    spec["hyperparameters"]["rounds"] = serde_json::json!(6);
    std::fs::write(job.join("modelSpec.json"), spec.to_string()).expect("write");
    let data = dir.path().join("data");
    let (_, events) = run_completed(job.to_str().expect("utf8"), data.to_str().expect("utf8"));
    let mut tried = std::collections::BTreeSet::new();
    for round in 1..=6u64 {
        let of =
            |t: &'static str| events.iter().filter(move |e| e["event_type"] == t && e["payload"]["round"] == round).map(|e| &e["payload"]);
        let selected: Vec<&str> = of("RoundStarted").next().expect("started")["selected"]
            .as_array()
            .expect("selected")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(selected.len(), 4, "round {round}: ceil(1.3 * 3) trainers");
        let updates: Vec<&Value> = of("UpdateReported").collect();
        assert_eq!(updates.len(), 3, "round {round} closes at aggr_num");
        assert!(updates.iter().all(|u| u["metrics"]["train_seconds"].as_f64().is_some_and(|t| t > 0.0)), "trainers report their time");
        let dropped = of("TrainingClosed").next().expect("closed")["dropped"].as_array().expect("dropped").len();
        assert_eq!(dropped, 1, "round {round}: the fourth is a straggler");
        let aggregated = of("RoundAggregated").next().expect("aggregated");
        assert_eq!(aggregated["inputs"].as_array().map(Vec::len), Some(3));
        tried.extend(updates.iter().filter_map(|u| u["task_id"].as_str().map(str::to_string)));
    }
    assert!(tried.len() > 4, "exploration reaches beyond the first picks: {tried:?}");
}

/// The small CNN end to end: trainers train it with libtorch, the aggregator
/// averages and evaluates it (in plain Rust), the final model holds its convolutions.
#[test]
fn digits_cnn_trains_a_small_convolutional_network() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, _) = run_completed("examples/digits-cnn", dir.path().to_str().expect("utf8"));
    let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.9, "final accuracy {accuracy}");
    let bytes = std::fs::read(dir.path().join("blobs").join(summary["final_model"].as_str().expect("digest"))).expect("blob");
    let model = flame_workers::weights::decode(&bytes).expect("safetensors");
    assert_eq!(model["conv1.weight"].shape, [8, 1, 3, 3]);
    assert_eq!(model["conv2.weight"].shape, [16, 8, 3, 3]);
}

/// Coordinated topology: each round the coordinator pairs the trainers with
/// the two middle aggregators before any of them aggregates; each middle
/// averages exactly the trainers paired with it; from round 2 on the pairing
/// balances the trainers' samples.
#[test]
fn coordinated_digits_pairs_trainers_with_middle_aggregators_each_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, events) = run_completed("examples/coordinated-digits", dir.path().to_str().expect("utf8"));
    assert!(summary["metrics"]["accuracy"].as_f64().expect("accuracy") >= 0.85);
    let mut pairings = Vec::new();
    for round in 1..=5u64 {
        let at = |t: &str| events.iter().position(|e| e["event_type"] == t && e["payload"]["round"] == round);
        let coordinated = at("RoundCoordinated").expect("coordinated");
        assert!(coordinated < at("GroupAggregated").expect("grouped"), "round {round}: pairing before aggregation");
        let pairing = events[coordinated]["payload"]["pairing"].as_object().expect("pairing").clone();
        assert_eq!(pairing.len(), 4, "round {round}: every trainer paired");
        let updates: Vec<&Value> = events
            .iter()
            .filter(|e| e["event_type"] == "UpdateReported" && e["payload"]["round"] == round)
            .map(|e| &e["payload"])
            .collect();
        let mut loads = Vec::new();
        for g in events.iter().filter(|e| e["event_type"] == "GroupAggregated" && e["payload"]["round"] == round).map(|e| &e["payload"]) {
            let mut want: Vec<&str> = updates
                .iter()
                .filter(|u| pairing[u["task_id"].as_str().expect("task")] == g["task_id"])
                .filter_map(|u| u["digest"].as_str())
                .collect();
            let mut got: Vec<&str> = g["inputs"].as_array().expect("inputs").iter().filter_map(Value::as_str).collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "round {round}: {} averages its paired trainers", g["task_id"]);
            loads.push(g["samples"].as_u64().expect("samples"));
        }
        assert_eq!(loads.len(), 2, "round {round}: both middles in use");
        if round > 1 {
            let biggest = updates.iter().filter_map(|u| u["samples"].as_u64()).max().expect("samples");
            assert!(loads[0].abs_diff(loads[1]) <= biggest, "round {round}: balanced by samples {loads:?}");
        }
        pairings.push(pairing);
    }
    assert!(pairings.windows(2).any(|w| w[0] != w[1]), "the pairing changes between rounds");
}

#[test]
fn bad_job_folders_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job");
    std::fs::create_dir(&job).expect("mkdir");
    crate::util::copy_example(&job);
    let job_arg = job.to_str().expect("utf8");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf8");

    // A missing file is named.
    std::fs::remove_file(job.join("dataset2.json")).expect("rm");
    let out = flamectl(&["run", job_arg, "--data-dir", data_arg]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dataset2.json") && err.contains("file not found"), "{err}");
    crate::util::copy_example(&job);

    // Invalid JSON gets its line and column.
    std::fs::write(job.join("schema.json"), "{\n  \"name\": \"x\",\n  \"roles\": [,]\n}").expect("write");
    let out = flamectl(&["run", job_arg, "--data-dir", data_arg]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schema.json:3:13"), "{err}");
    crate::util::copy_example(&job);

    // An unknown optimizer is refused with the JSON path and the known names.
    let spec = std::fs::read_to_string(job.join("modelSpec.json")).expect("read");
    std::fs::write(job.join("modelSpec.json"), spec.replace("\"fedavg\"", "\"fedmagic\"")).expect("write");
    let out = flamectl(&["validate", job_arg, "-o", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["valid"], false);
    assert_eq!(report["errors"][0]["path"], "modelSpec.json#/optimizer/sort");
    assert!(report["errors"][0]["hint"].as_str().expect("hint").contains("fedavg"));

    // Nothing was stored for any of the refused runs.
    assert!(!data.join("events.db").exists());
}

#[test]
fn plan_shows_tasks_and_the_first_round() {
    let out = flamectl(&["plan", "examples/digits-two-tier", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let tasks = v["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 4);
    for t in tasks {
        assert!(t["role"].is_string() && t["groupAssociation"].is_object() && t["channels"].is_array(), "{t}");
        assert_eq!(t["dataset"].is_string(), t["role"] == "trainer");
    }
    let steps = v["plan"]["steps"].as_array().expect("steps");
    let train: Vec<&Value> = steps.iter().filter(|s| s["kind"] == "train").collect();
    assert_eq!(train.len(), 3);
    let agg = steps.iter().find(|s| s["kind"] == "aggregate").expect("aggregate");
    assert_eq!(agg["after"].as_array().expect("after").len(), 3);

    let out = flamectl(&["plan", "examples/digits-two-tier", "-o", "dot"]);
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph plan {") && dot.trim_end().ends_with('}'), "{dot}");
}

#[test]
fn adaptive_and_robust_server_optimizers_run_end_to_end() {
    for (optimizer, kwargs) in [
        ("fedadam", serde_json::json!({"eta": 0.05})),
        ("fedavgm", serde_json::json!({"eta": 1.0, "momentum": 0.5})),
        ("median", serde_json::json!({})),
        ("fedprox", serde_json::json!({"mu": 0.1})),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = dir.path().join("job");
        std::fs::create_dir(&job).expect("mkdir");
        crate::util::copy_example(&job);
        let mut spec: Value = serde_json::from_str(&std::fs::read_to_string(job.join("modelSpec.json")).expect("read")).expect("json");
        spec["optimizer"] = serde_json::json!({"sort": optimizer, "kwargs": kwargs});
        std::fs::write(job.join("modelSpec.json"), spec.to_string()).expect("write");
        let data = dir.path().join("data");
        let out = flamectl(&["run", job.to_str().expect("utf8"), "-o", "json", "--data-dir", data.to_str().expect("utf8")]);
        assert!(out.status.success(), "{optimizer}: {}", String::from_utf8_lossy(&out.stderr));
        let summary: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(summary["state"], "completed", "{optimizer}");
        let accuracy = summary["metrics"]["accuracy"].as_f64().expect("accuracy");
        assert!(accuracy > 0.8, "{optimizer}: accuracy {accuracy}");

        let out = flamectl(&[
            "events",
            summary["job_id"].as_str().expect("id"),
            "--store",
            summary["store"].as_str().expect("store"),
            "-o",
            "json",
        ]);
        let events: Vec<Value> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<Value>(l).expect("line")).collect();
        if optimizer == "fedprox" {
            // The proximal weight is part of the typed optimizer the trainers' objective comes from.
            let created = events.iter().find(|e| e["event_type"] == "JobCreated").expect("created");
            assert_eq!(created["payload"]["spec"]["optimizer"], serde_json::json!({"kind": "fedprox", "mu": 0.1}));
        }
        let states: Vec<Value> =
            events.iter().filter(|e| e["event_type"] == "RoundAggregated").map(|e| e["payload"]["optimizer_state"].clone()).collect();
        assert_eq!(states.len(), 5);
        if optimizer == "fedadam" || optimizer == "fedavgm" {
            // The server's moments (or velocity) are recorded every round and change as it learns.
            assert!(states.iter().all(Value::is_string), "{states:?}");
            let distinct: std::collections::BTreeSet<String> = states.iter().map(|s| s.to_string()).collect();
            assert_eq!(distinct.len(), 5);
        } else {
            assert!(states.iter().all(Value::is_null), "{states:?}");
        }
    }
}

/// Flame's random selector at run time: `k` of the trainers each round,
/// recorded in `RoundStarted`, only they train, and the aggregate has k inputs.
#[test]
fn a_random_selector_trains_k_trainers_a_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job");
    std::fs::create_dir(&job).expect("mkdir");
    crate::util::copy_example(&job);
    let mut spec: Value = serde_json::from_str(&std::fs::read_to_string(job.join("modelSpec.json")).expect("read")).expect("json");
    spec["selector"] = serde_json::json!({"sort": "random", "kwargs": {"k": 2}});
    std::fs::write(job.join("modelSpec.json"), spec.to_string()).expect("write");
    let data = dir.path().join("data");
    let out = flamectl(&["run", job.to_str().expect("utf8"), "-o", "json", "--data-dir", data.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(summary["state"], "completed");
    let out =
        flamectl(&["events", summary["job_id"].as_str().expect("id"), "--store", summary["store"].as_str().expect("store"), "-o", "json"]);
    let events: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str::<Value>(l).expect("line")).collect();
    let mut picked = std::collections::BTreeSet::new();
    for round in 1..=5u64 {
        let started = events.iter().find(|e| e["event_type"] == "RoundStarted" && e["payload"]["round"] == round).expect("round");
        let selected: Vec<String> =
            started["payload"]["selected"].as_array().expect("selected").iter().map(|t| t.as_str().expect("task").to_string()).collect();
        assert_eq!(selected.len(), 2, "round {round}");
        let trained: Vec<String> = events
            .iter()
            .filter(|e| e["event_type"] == "UpdateReported" && e["payload"]["round"] == round)
            .map(|e| e["payload"]["task_id"].as_str().expect("task").to_string())
            .collect();
        assert_eq!(
            trained.iter().collect::<std::collections::BTreeSet<_>>(),
            selected.iter().collect(),
            "round {round}: only the selected train"
        );
        let aggregated = events.iter().find(|e| e["event_type"] == "RoundAggregated" && e["payload"]["round"] == round).expect("aggregate");
        assert_eq!(aggregated["payload"]["inputs"].as_array().map(Vec::len), Some(2));
        picked.insert(selected);
    }
    assert!(picked.len() > 1, "the pick changes across rounds: {picked:?}");
    // `flamectl plan` shows the same pick for a round as the run made.
    let out = flamectl(&["plan", job.to_str().expect("utf8"), "-o", "json", "--round", "3"]);
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan json");
    let planned: std::collections::BTreeSet<String> =
        plan["plan"]["selected"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect()).unwrap_or_default();
    let started = events.iter().find(|e| e["event_type"] == "RoundStarted" && e["payload"]["round"] == 3).expect("round 3");
    let ran: std::collections::BTreeSet<String> =
        started["payload"]["selected"].as_array().expect("selected").iter().filter_map(|t| t.as_str().map(str::to_string)).collect();
    assert_eq!(planned, ran);
}

/// Every example folder is a valid job that expands and plans.
#[test]
fn every_example_validates_and_plans() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        if !path.is_dir() {
            continue;
        }
        let arg = path.to_str().expect("utf8");
        let out = flamectl(&["validate", arg, "-o", "json"]);
        assert!(out.status.success(), "{arg}: {}", String::from_utf8_lossy(&out.stdout));
        let out = flamectl(&["plan", arg, "-o", "json"]);
        assert!(out.status.success(), "{arg}: {}", String::from_utf8_lossy(&out.stderr));
        seen += 1;
    }
    assert!(seen >= 2, "examples found: {seen}");
}

/// A job cannot make a worker read what its owner did not share: a dataset
/// beside the job folder (`../private/secret.csv`, a numeric CSV that would
/// train) and a system file are refused by the workers, which read under the
/// job folder (and `--data-root`) only; the refusal does not echo the file.
/// With the folder given as a data root the same job trains.
#[test]
fn a_job_cannot_read_outside_the_workers_data_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (job, private) = (dir.path().join("job"), dir.path().join("private"));
    std::fs::create_dir_all(&job).expect("mkdir");
    std::fs::create_dir_all(&private).expect("mkdir");
    crate::util::copy_example(&job);
    let rows: String = (0..60).map(|i| format!("{},{},{},{}\n", i % 7, (i * 3) % 5, 424242, i % 2)).collect();
    std::fs::write(private.join("secret.csv"), &rows).expect("secret");
    for (n, url) in ["../private/secret.csv", "/etc/hostname"].iter().enumerate() {
        let mut ds: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(job.join("dataset1.json")).expect("read")).expect("json");
        ds["url"] = serde_json::json!(url);
        std::fs::write(job.join("dataset1.json"), ds.to_string()).expect("write");
        let data = dir.path().join(format!("data{n}"));
        let out = flamectl(&["run", job.to_str().expect("utf8"), "--data-dir", data.to_str().expect("utf8"), "-o", "json"]);
        assert_eq!(out.status.code(), Some(1), "{url}: {}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
        let failure = summary["failure"].to_string();
        assert!(failure.contains("not under this worker's data roots"), "{url}: {failure}");
        assert!(!failure.contains("424242"), "the refusal does not echo the file: {failure}");
    }
    // Shared on purpose: the owner names the folder.
    let mut ds: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(job.join("dataset1.json")).expect("read")).expect("json");
    ds["url"] = serde_json::json!("../private/secret.csv");
    std::fs::write(job.join("dataset1.json"), ds.to_string()).expect("write");
    let data = dir.path().join("data-shared");
    let out = flamectl(&[
        "run",
        job.to_str().expect("utf8"),
        "--data-dir",
        data.to_str().expect("utf8"),
        "--data-root",
        private.to_str().expect("utf8"),
        "-o",
        "json",
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
    let failure = summary["failure"].to_string();
    assert!(!failure.contains("data roots"), "with --data-root the file is read: {failure}");
}
