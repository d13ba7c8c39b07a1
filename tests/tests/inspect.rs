//! The window onto jobs: `flamectl events|replay|trace|audit|watch|metrics`
//! on a job run in embedded mode, `replay --verify` against a corrupted read
//! model, and the view writer killed mid catch-up.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use flame_events::store::{EventStore, ExpectedVersion};
use flame_events::{Envelope, NewEvent};
use flame_projections::store::{ReadModels, SqliteViews};

use crate::util::{Processes, bin, root};

fn flamectl(args: &[&str]) -> std::process::Output {
    Command::new(bin("flamectl")).args(args).current_dir(root()).output().expect("run flamectl")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    stdout(out).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn a_finished_job_can_be_replayed_traced_audited_plotted_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8");
    let out = flamectl(&["run", "examples/digits-two-tier", "-o", "json", "--data-dir", data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    let job = summary["job_id"].as_str().expect("job id").to_string();
    let store = format!("sqlite:{data}/events.db");
    let total = summary["events"].as_u64().expect("count") as usize;
    let run = |args: &[&str]| {
        let mut all = vec![args[0], job.as_str(), "--store", store.as_str()];
        all.extend_from_slice(&args[1..]);
        flamectl(&all)
    };

    // Filters, and a follow that ends with the job.
    let out = run(&["events", "--type", "UpdateReported", "--round", "4", "-o", "json"]);
    let events = json_lines(&out);
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e["event_type"] == "UpdateReported" && e["payload"]["round"] == 4));
    let out = run(&["events", "--worker", "local-aggregator-0", "--follow", "-o", "json"]);
    assert!(out.status.success());
    // TaskAssigned, TaskDeployed, ModelInitialized and 5 RoundAggregated.
    assert_eq!(json_lines(&out).len(), 8);

    // Time travel: the state at the end of round 2.
    let out = run(&["replay", "--round", "2", "-o", "json"]);
    let replayed: Value = serde_json::from_slice(&out.stdout).expect("replay json");
    assert_eq!(replayed["view"]["status"]["state"], "running");
    assert_eq!(replayed["view"]["status"]["rounds_completed"], 2);
    assert_eq!(replayed["engine"]["rounds_completed"], 2);
    assert_eq!(replayed["view"]["lineage"].as_array().map(Vec::len), Some(3));

    // The audit log has every event, with actors and causes.
    let audit = json_lines(&run(&["audit", "-o", "json"]));
    assert_eq!(audit.len(), total);
    assert!(
        audit
            .iter()
            .any(|a| a["actor"] == "worker:local-trainer-0"
                && a["causation_id"].as_str().is_some_and(|c| c.ends_with("/r3/train/trainer-0")))
    );

    // Trace: the tree and a Chrome trace file.
    let chrome = dir.path().join("trace.json");
    let out = run(&["trace", "--chrome", chrome.to_str().expect("utf8")]);
    let tree = stdout(&out);
    assert!(tree.contains("round 5 *") && tree.contains("aggregate @local-aggregator-0 *"), "{tree}");
    let trace: Value = serde_json::from_slice(&std::fs::read(&chrome).expect("trace file")).expect("trace JSON");
    assert!(trace["traceEvents"].as_array().is_some_and(|e| e.len() > 30));

    // Metrics and a PNG plot.
    let png = dir.path().join("metrics.png");
    let rows = json_lines(&run(&["metrics", "--plot", png.to_str().expect("utf8"), "-o", "json"]));
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[4]["metrics"]["accuracy"], summary["metrics"]["accuracy"]);
    let bytes = std::fs::read(&png).expect("png");
    assert!(bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} bytes", bytes.len());

    // Watch ends with the job's final figures.
    let out = run(&["watch"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("rounds completed: 5/5"), "{}", stdout(&out));

    // Verify: clean, then a corrupted stored view is caught and the event named.
    let out = run(&["replay", "--verify", "-o", "json"]);
    let verdict: Value = serde_json::from_slice(&out.stdout).expect("verdict");
    assert_eq!((out.status.code(), verdict["ok"].as_bool()), (Some(0), Some(true)), "{verdict}");
    let db = rusqlite::Connection::open(format!("{data}/events.db")).expect("sqlite");
    let changed = db
        .execute("UPDATE job_view_parts SET json = json_set(json, '$.participants[0].samples', 9999) WHERE job_id = ?1 AND part = 'round:000002'", [&job])
        .expect("corrupt");
    assert_eq!(changed, 1);
    let out = run(&["replay", "--verify", "-o", "json"]);
    assert_eq!(out.status.code(), Some(6), "{}", stdout(&out));
    let verdict: Value = serde_json::from_slice(&out.stdout).expect("verdict");
    let d = &verdict["problems"][0]["divergence"];
    let first_of_round_3 = json_lines(&run(&["events", "--type", "UpdateReported", "--round", "3", "-o", "json"]))[0].clone();
    assert_eq!(
        (d["version"].clone(), d["event_type"].clone()),
        (first_of_round_3["version"].clone(), Value::from("UpdateReported")),
        "{verdict}"
    );
    assert_eq!(d["path"], "/rounds/2/participants/0/samples");
    // A rebuild repairs it.
    assert!(flamectl(&["project", "--store", &store, "--rebuild"]).status.success());
    assert_eq!(run(&["replay", "--verify"]).status.code(), Some(0));

    // A job that is not there.
    assert_eq!(flamectl(&["audit", "no-such-job", "--store", &store]).status.code(), Some(3));
}

fn fixture() -> Vec<Envelope> {
    let text = std::fs::read_to_string(root().join("projections/tests/fixtures/digits-two-tier.jsonl")).expect("fixture");
    text.lines().map(|l| serde_json::from_str(l).expect("event")).collect()
}

/// 300 copies of the recorded job, folded 5 events per transaction by a
/// `flamectl project` that is SIGKILLed part way; a second run finishes. The
/// stored views equal a rebuild byte for byte: nothing applied twice or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_runner_killed_mid_catch_up_resumes_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.db");
    let path = path.to_str().expect("utf8").to_string();
    let store = flame_stores::sqlite::SqliteStore::open(&path).expect("store");
    let events = fixture();
    let jobs = 300;
    for j in 0..jobs {
        let batch = events
            .iter()
            .map(|e| {
                let mut n = NewEvent::new(e.event_type.clone(), e.payload.clone(), e.actor.clone()).correlated(format!("job{j}"));
                n.causation_id = e.causation_id.clone();
                n
            })
            .collect();
        store.append(&format!("job-job{j}"), ExpectedVersion::NoStream, batch).await.expect("append");
    }
    let last = (jobs * events.len()) as u64;
    let url = format!("sqlite:{path}");
    let models = SqliteViews::open(&path).expect("views");

    let mut procs = Processes::default();
    let child = procs.spawn(Command::new(bin("flamectl")).args(["project", "--store", &url, "--batch", "5"]).stderr(Stdio::null()));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) && models.checkpoint().await.expect("checkpoint") < last / 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("kill");
    let _ = child.wait();
    let after_kill = models.checkpoint().await.expect("checkpoint");
    assert!(
        after_kill > 0 && after_kill < last,
        "the runner must be killed mid catch-up (checkpoint {after_kill} of {last}); lower the batch"
    );

    let out = flamectl(&["project", "--store", &url, "--batch", "500"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(models.checkpoint().await.expect("checkpoint"), last);
    let stored = models.load_all().await.expect("views");
    assert_eq!(stored.len(), jobs);
    for s in &stored {
        let stream = store.read_stream(&format!("job-{}", s.job_id), 1).await.expect("read");
        let rebuilt = serde_json::to_string(&flame_projections::view::fold(&stream)).expect("json");
        assert!(s.json == rebuilt, "job {}: the stored view differs from a rebuild", s.job_id);
        let view = s.view().expect("decode");
        assert_eq!((view.audit.len(), view.rounds.iter().map(|r| r.participants.len()).sum::<usize>()), (events.len(), 15));
    }
}
