//! Old event logs always replay. `tests/fixtures/logs/` holds the events of
//! every example (and of the digits job with each kind of server optimizer and
//! selector) as `flamectl events -o json` printed them when they were
//! recorded (see the folder's README for the commit). Each log is imported
//! into a fresh store with its events' own schema versions, and then every
//! event must decode (through the upcasters where its schema is old), the
//! job must fold to the end the log recorded, and `flamectl replay --verify`
//! must pass: the read model rebuilt from the events agrees with the engine's
//! job aggregate after every event and with the stored views.

use std::path::PathBuf;
use std::process::Command;

use flame_engine::job::{Job, Status};
use flame_events::job::JobEvent;
use flame_events::store::{EventStore, ExpectedVersion};
use flame_events::{Envelope, NewEvent};

use crate::util::{bin, root};

fn logs() -> Vec<(String, Vec<Envelope>)> {
    let dir = root().join("tests/fixtures/logs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/logs")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().expect("name").to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).expect("log");
            let events = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}"))).collect();
            (name, events)
        })
        .collect()
}

/// What the log says the job ended as, from its last event's own payload.
fn recorded_end(events: &[Envelope]) -> (Status, Option<String>) {
    let last = events.last().expect("events");
    match last.event_type.as_str() {
        "JobCompleted" => (Status::Completed, last.payload["final_model"].as_str().map(str::to_string)),
        "JobFailed" => (Status::Failed, None),
        "JobTerminated" => (Status::Terminated, None),
        other => panic!("a recorded log ends with {other}"),
    }
}

#[test]
fn every_recorded_log_decodes_folds_to_its_end_and_verifies() {
    let logs = logs();
    let examples: Vec<String> = std::fs::read_dir(root().join("examples"))
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for ex in &examples {
        assert!(logs.iter().any(|(n, _)| n == ex), "no recorded log of examples/{ex} in tests/fixtures/logs");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (name, events) in &logs {
        let decoded: Vec<JobEvent> =
            events.iter().map(|e| JobEvent::from_envelope(e).unwrap_or_else(|err| panic!("{name}: event {}: {err}", e.version))).collect();
        let job = Job::from_events(&decoded);
        let (status, final_model) = recorded_end(events);
        assert_eq!(job.status, status, "{name}");
        if let Some(m) = final_model {
            assert_eq!(job.global_model.as_deref(), Some(m.as_str()), "{name}: the folded job ends at the recorded model");
        }
        assert_eq!(job.version, events.len() as u64, "{name}");

        // Into a store of its own, events as they were written, then flamectl replay --verify.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.db");
        let store = flame_stores::sqlite::SqliteStore::open(path.to_str().expect("utf8")).expect("store");
        let batch = events
            .iter()
            .map(|e| {
                let mut n = NewEvent::new(e.event_type.clone(), e.payload.clone(), e.actor.clone());
                n.event_id = e.event_id;
                n.schema_version = e.schema_version;
                n.causation_id = e.causation_id.clone();
                n.correlation_id = e.correlation_id.clone();
                n
            })
            .collect();
        rt.block_on(store.append(&events[0].stream_id, ExpectedVersion::NoStream, batch)).expect("import");
        let url = format!("sqlite:{}", path.display());
        let job_id = events[0].stream_id.strip_prefix("job-").expect("a job stream");
        let project = Command::new(bin("flamectl")).args(["project", "--store", &url]).output().expect("flamectl project");
        assert!(project.status.success(), "{name}: {}", String::from_utf8_lossy(&project.stderr));
        let verify = Command::new(bin("flamectl")).args(["replay", job_id, "--store", &url, "--verify"]).output().expect("flamectl replay");
        assert!(
            verify.status.success(),
            "{name}: replay --verify: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    assert!(logs.len() >= examples.len() + 7, "the examples plus the optimizer and selector variants");
}
