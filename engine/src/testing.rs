//! Builders for tests: a small two-tier job and its histories, event by event.

use std::collections::BTreeMap;

use flame_events::job::{JobEvent, Metrics, RunSpec, TaskSpec};
use flame_events::protocol::{self, Report, ReportBody};

use crate::job::{Job, JobCommand};

/// The id of the test job.
pub const JOB: &str = "job-1";

/// A task of the test job.
pub fn task(id: &str, trainer: bool) -> TaskSpec {
    TaskSpec {
        task_id: id.into(),
        role: if trainer { "trainer" } else { "aggregator" }.into(),
        is_data_consumer: trainer,
        group_association: BTreeMap::from([("param-channel".into(), "default".into())]),
        channels: vec!["param-channel".into()],
        dataset: trainer.then(|| format!("builtin://digits?part={}&of=2", &id[id.len() - 1..])),
        realm: None,
        colocate: None,
    }
}

/// `JobCreated` for a two-round job with trainers `t0`, `t1` and aggregator `agg`.
pub fn created(rounds: u32) -> JobEvent {
    JobEvent::JobCreated {
        job_id: JOB.into(),
        name: "test".into(),
        source: "memory".into(),
        spec: RunSpec {
            rounds,
            model: flame_events::model::Model::default(),
            hyperparameters: serde_json::json!({}),
            seed: 0,
            ..RunSpec::default()
        },
        tasks: vec![task("t0", true), task("t1", true), task("agg", false)],
    }
}

/// `JobCreated` for a hierarchical job: trainers `t0`, `t1` under middle
/// aggregator `m-eu`, `t2`, `t3` under `m-na`, both under `top`.
pub fn created_hierarchical(rounds: u32) -> JobEvent {
    let mut e = created(rounds);
    if let JobEvent::JobCreated { spec, tasks, .. } = &mut e {
        let group = |t: &mut TaskSpec, g: &str| {
            t.group_association = BTreeMap::from([("param-channel".into(), g.into())]);
        };
        *tasks = ["t0", "t1", "t2", "t3"].iter().map(|id| task(id, true)).collect();
        for (i, t) in tasks.iter_mut().enumerate() {
            group(t, if i < 2 { "eu" } else { "na" });
        }
        for m in ["m-eu", "m-na"] {
            let mut t = task(m, false);
            t.role = "middle-aggregator".into();
            group(&mut t, &m[2..]);
            tasks.push(t);
        }
        let mut top = task("top", false);
        top.role = "top-aggregator".into();
        tasks.push(top);
        spec.uplinks = BTreeMap::from([
            ("t0".into(), "m-eu".into()),
            ("t1".into(), "m-eu".into()),
            ("t2".into(), "m-na".into()),
            ("t3".into(), "m-na".into()),
            ("m-eu".into(), "top".into()),
            ("m-na".into(), "top".into()),
        ]);
    }
    e
}

/// Builds a job history event by event, applying each (Temporal's TestHistoryBuilder habit).
#[derive(Clone, Default)]
pub struct History {
    /// The events so far.
    pub events: Vec<JobEvent>,
}

impl History {
    /// Starts a history with `JobCreated`.
    pub fn created(rounds: u32) -> Self {
        Self { events: vec![created(rounds)] }
    }

    /// Starts a history with `JobCreated` whose run settings `f` adjusts.
    pub fn created_with(rounds: u32, f: impl FnOnce(&mut RunSpec)) -> Self {
        let mut e = created(rounds);
        if let JobEvent::JobCreated { spec, .. } = &mut e {
            f(spec);
        }
        Self { events: vec![e] }
    }

    /// Appends an event.
    pub fn then(mut self, e: JobEvent) -> Self {
        self.events.push(e);
        self
    }

    /// Start asked for at time 0 (placement deadline at `DEFAULT_ROUND_TIMEOUT_S`).
    pub fn starting(self) -> Self {
        self.then(JobEvent::JobStarting {})
            .then(JobEvent::TimerSet { timer: crate::job::DEPLOY.into(), due_at_ms: crate::job::DEFAULT_ROUND_TIMEOUT_S * 1000 })
    }

    /// Tasks placed on workers `w-<task>`.
    pub fn deploying(mut self) -> Self {
        self = self.starting();
        for t in ["t0", "t1", "agg"] {
            self.events.push(JobEvent::TaskAssigned { task_id: t.into(), worker_id: format!("w-{t}") });
        }
        self.then(JobEvent::JobDeploying {})
    }

    /// Tasks placed on workers `w-<task>`, deployed, and the job running.
    pub fn started(mut self) -> Self {
        self = self.deploying();
        for t in ["t0", "t1", "agg"] {
            self.events.push(JobEvent::TaskDeployed { task_id: t.into(), worker_id: format!("w-{t}"), samples: None });
        }
        self.then(JobEvent::JobStarted {})
    }

    /// Round `round` started at time 0 (deadline at `DEFAULT_ROUND_TIMEOUT_S`).
    pub fn round_started(self, round: u32) -> Self {
        let global = if round == 1 { "m0".to_string() } else { format!("m{}", round - 1) };
        self.then(JobEvent::RoundStarted { round, global_model: global, selected: vec![] })
            .then(JobEvent::TimerSet { timer: crate::job::round_timer(round), due_at_ms: crate::job::DEFAULT_ROUND_TIMEOUT_S * 1000 })
    }

    /// The initial model exists.
    pub fn initialized(self) -> Self {
        self.then(JobEvent::ModelInitialized { digest: "m0".into(), worker_id: "w-agg".into() })
    }

    /// A whole round: started, both updates, aggregated.
    pub fn round(self, round: u32) -> Self {
        self.round_started(round).then(update(round, "t0")).then(update(round, "t1")).then(JobEvent::RoundAggregated {
            round,
            digest: format!("m{round}"),
            inputs: vec![format!("u{round}t0"), format!("u{round}t1")],
            metrics: Metrics::new(),
            optimizer_state: None,
        })
    }

    /// The job the history folds to.
    pub fn job(&self) -> Job {
        Job::from_events(&self.events)
    }
}

/// The events as the store would return them for the test job's stream:
/// versions and positions from 1, one second apart.
pub fn envelopes(events: &[JobEvent]) -> Vec<flame_events::Envelope> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let n = e.to_new_event(JOB, "engine");
            flame_events::Envelope {
                event_id: n.event_id,
                stream_id: format!("job-{JOB}"),
                version: i as u64 + 1,
                position: i as u64 + 1,
                event_type: n.event_type,
                schema_version: n.schema_version,
                payload: n.payload,
                recorded_at: chrono::DateTime::from_timestamp(1_700_000_000 + i as i64, 0).expect("time"),
                causation_id: None,
                correlation_id: None,
                actor: n.actor,
            }
        })
        .collect()
}

/// `UpdateReported` for a trainer task.
pub fn update(round: u32, task: &str) -> JobEvent {
    JobEvent::UpdateReported {
        round,
        task_id: task.into(),
        worker_id: format!("w-{task}"),
        digest: format!("u{round}{task}"),
        samples: 10,
        metrics: Metrics::new(),
        staleness: 0,
        client_state: None,
    }
}

/// A report from the worker assigned to `task`.
pub fn report(task: &str, round: u32, body: ReportBody) -> JobCommand {
    JobCommand::Report(Report {
        v: protocol::VERSION,
        command_id: format!("c-{task}-{round}"),
        job_id: JOB.into(),
        task_id: task.into(),
        worker_id: format!("w-{task}"),
        round,
        body,
        via: None,
    })
}

/// A `Trained` report body.
pub fn trained(round: u32, task: &str) -> ReportBody {
    ReportBody::Trained { digest: format!("u{round}{task}"), samples: 10, metrics: Metrics::new(), state: None }
}

/// The repository's own topology fixtures (`engine/fixtures/<name>/`): a job
/// folder per topology with the tasks it must expand to (`expected-tasks.json`).
pub fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every topology the repository keeps a fixture for; a test checks that the
/// folder holds exactly these.
pub const TOPOLOGIES: &[&str] =
    &["two-tier", "two-tier-ten", "hierarchical", "parallel", "ring", "hybrid", "coordinated", "async-hierarchical"];

/// Where Flame's own example fixtures are, when they are there: the folder
/// named by `FLAME_EXAMPLES`, else `../shared/flame-examples` beside the
/// repository (as in CI). `FLAME_EXAMPLES=` (empty) runs the tests as a fresh
/// clone would, without them. `Err` says why the comparison with Flame cannot
/// run. Naming a folder that does not exist is an error, so that CI cannot
/// silently stop comparing.
pub fn flame_examples() -> Result<std::path::PathBuf, String> {
    match std::env::var_os("FLAME_EXAMPLES") {
        Some(dir) if dir.is_empty() => Err("FLAME_EXAMPLES is empty (the tests run as in a fresh clone)".into()),
        Some(dir) => {
            let dir = std::path::PathBuf::from(dir);
            assert!(dir.is_dir(), "FLAME_EXAMPLES={} is not a folder", dir.display());
            Ok(dir)
        }
        None => {
            let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the engine crate is in the repository");
            let beside = repository.parent().unwrap_or(repository).join("shared/flame-examples");
            if beside.is_dir() {
                Ok(beside)
            } else {
                Err(format!("{} is not there (it is beside the repository in CI, not in a clone)", beside.display()))
            }
        }
    }
}

/// Says, on the test run's own standard error (not captured by the test
/// harness), that a check was skipped and why.
pub fn skipped(check: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {check}: {why}");
}

/// Reads a JSON file, panicking with its path.
pub fn read(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("JSON")
}

/// A copy of the example in our folder form: the data spec names the
/// dataset files that groups.json assigns to each group. (Flame's own
/// hybrid/dataSpec.json is not valid JSON; its test builds the spec this way too.)
pub fn folder_form(dir: &std::path::Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(dir).expect("fixture") {
        let path = e.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let schema = read(&dir.join("schema.json"));
    let role =
        schema["roles"].as_array().expect("roles").iter().find(|r| r["isDataConsumer"] == true).expect("data consumer")["name"].clone();
    let job = read(&dir.join("job.json"));
    let spec_path = job["dataSpecPath"].as_str().unwrap_or("dataSpec.json");
    let spec = serde_json::json!([{ "role": role, "datasetGroups": read(&dir.join("groups.json")) }]);
    std::fs::write(tmp.path().join(spec_path), spec.to_string()).expect("write data spec");
    tmp
}

/// One of the repository's topology fixtures, loaded, with its tasks.
pub fn fixture(name: &str) -> (crate::JobDefinition, Vec<TaskSpec>) {
    let dir = fixtures().join(name);
    let def = crate::JobDefinition::load(&dir).unwrap_or_else(|p| panic!("{name}: {p}"));
    let tasks = crate::expand::tasks(&def).unwrap_or_else(|p| panic!("{name}: {p}"));
    (def, tasks)
}

/// Round `round`'s plan of a definition, with the selection it compiles to.
pub fn plan_round(def: &crate::JobDefinition, tasks: &[TaskSpec], round: u32) -> Result<crate::plan::Plan, crate::plan::Error> {
    let trainers = tasks.iter().filter(|t| t.is_data_consumer).count();
    let selection = crate::compile::settings(def, trainers).unwrap_or_else(|p| panic!("{p:?}")).selection;
    crate::plan::build(def, tasks, selection, crate::compile::seed(def), round)
}

/// A hierarchical job (see [`created_hierarchical`]) placed, deployed,
/// initialized, with round 1 started.
pub fn hierarchical_round() -> History {
    let mut h = History { events: vec![created_hierarchical(1)] }.then(JobEvent::JobStarting {});
    for t in ["t0", "t1", "t2", "t3", "m-eu", "m-na", "top"] {
        h = h.then(JobEvent::TaskAssigned { task_id: t.into(), worker_id: format!("w-{t}") });
    }
    h = h.then(JobEvent::JobDeploying {});
    for t in ["t0", "t1", "t2", "t3", "m-eu", "m-na", "top"] {
        h = h.then(JobEvent::TaskDeployed { task_id: t.into(), worker_id: format!("w-{t}"), samples: None });
    }
    h.then(JobEvent::JobStarted {}).then(JobEvent::ModelInitialized { digest: "m0".into(), worker_id: "w-top".into() }).round_started(1)
}

/// `h` with the events the job aggregate makes of `command`.
pub fn handle(h: History, command: JobCommand) -> History {
    let events = h.job().handle(command).expect("accepted");
    events.into_iter().fold(h, History::then)
}
