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
            optimizer: "fedavg".into(),
            model: serde_json::json!({"name": "mlp"}),
            hyperparameters: serde_json::json!({}),
            seed: 0,
        },
        tasks: vec![task("t0", true), task("t1", true), task("agg", false)],
    }
}

/// Builds a job history event by event, applying each (Temporal's TestHistoryBuilder habit).
#[derive(Default)]
pub struct History {
    /// The events so far.
    pub events: Vec<JobEvent>,
}

impl History {
    /// Starts a history with `JobCreated`.
    pub fn created(rounds: u32) -> Self {
        Self {
            events: vec![created(rounds)],
        }
    }

    /// Appends an event.
    pub fn then(mut self, e: JobEvent) -> Self {
        self.events.push(e);
        self
    }

    /// Tasks placed on workers `w-<task>` and the job started.
    pub fn started(mut self) -> Self {
        for t in ["t0", "t1", "agg"] {
            self.events.push(JobEvent::TaskAssigned {
                task_id: t.into(),
                worker_id: format!("w-{t}"),
            });
        }
        self.then(JobEvent::JobStarted {})
    }

    /// The initial model exists.
    pub fn initialized(self) -> Self {
        self.then(JobEvent::ModelInitialized {
            digest: "m0".into(),
            worker_id: "w-agg".into(),
        })
    }

    /// A whole round: started, both updates, aggregated.
    pub fn round(self, round: u32) -> Self {
        let global = if round == 1 {
            "m0".to_string()
        } else {
            format!("m{}", round - 1)
        };
        self.then(JobEvent::RoundStarted {
            round,
            global_model: global,
        })
        .then(update(round, "t0"))
        .then(update(round, "t1"))
        .then(JobEvent::RoundAggregated {
            round,
            digest: format!("m{round}"),
            inputs: vec![format!("u{round}t0"), format!("u{round}t1")],
            metrics: Metrics::new(),
        })
    }

    /// The job the history folds to.
    pub fn job(&self) -> Job {
        Job::from_events(&self.events)
    }
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
    })
}

/// A `Trained` report body.
pub fn trained(round: u32, task: &str) -> ReportBody {
    ReportBody::Trained {
        digest: format!("u{round}{task}"),
        samples: 10,
        metrics: Metrics::new(),
    }
}
