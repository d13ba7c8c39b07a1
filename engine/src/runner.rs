//! The thin effectful runner around the pure job aggregate and controller:
//! it appends events, sends the controller's commands, and feeds reports back.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use flame_events::job::{self, JobEvent, RunSpec};
use flame_events::protocol::WorkerInfo;
use flame_events::store::{EventStore, ExpectedVersion};
use flame_events::transport::Transport;

use crate::controller::{Action, decide};
use crate::definition::JobDefinition;
use crate::job::{Job, JobCommand, Rejection};
use crate::planner;

/// Runner errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The definition cannot run.
    #[error("job definition: {0}")]
    Definition(String),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] flame_events::store::Error),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] flame_events::transport::Error),
    /// The aggregate refused what the runner itself decided: a bug.
    #[error("job {job}: internal decision refused: {rejection}")]
    Refused {
        /// Job id.
        job: String,
        /// Why.
        rejection: Rejection,
    },
    /// No such job in the store.
    #[error("job '{0}' has no events in this store")]
    UnknownJob(String),
}

/// How long the runner waits.
#[derive(Clone, Debug)]
pub struct Options {
    /// For enough workers to place every task.
    pub worker_wait: Duration,
    /// For the next report before the job fails.
    pub report_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker_wait: Duration::from_secs(60),
            report_timeout: Duration::from_secs(600),
        }
    }
}

/// Drives jobs against an event store and a transport.
#[derive(Clone)]
pub struct Runner {
    store: Arc<dyn EventStore>,
    transport: Arc<dyn Transport>,
    options: Options,
}

/// Places each task on a distinct worker that offers the task's role, in id
/// order; `None` while there are not enough workers.
pub fn assign(
    tasks: &[flame_events::job::TaskSpec],
    workers: &[WorkerInfo],
) -> Option<BTreeMap<String, String>> {
    let role_of = |t: &flame_events::job::TaskSpec| {
        if t.is_data_consumer {
            "trainer"
        } else {
            "aggregator"
        }
    };
    let mut used = HashSet::new();
    let mut out = BTreeMap::new();
    // Aggregators first: they are fewer and workers may offer both roles.
    let mut ordered: Vec<_> = tasks.iter().collect();
    ordered.sort_by_key(|t| t.is_data_consumer);
    for t in ordered {
        let w = workers.iter().find(|w| {
            !used.contains(&w.id) && (w.roles.iter().any(|r| r == role_of(t) || r == &t.role))
        })?;
        used.insert(w.id.clone());
        out.insert(t.task_id.clone(), w.id.clone());
    }
    Some(out)
}

/// The run settings a definition implies.
pub fn run_spec(def: &JobDefinition) -> Result<RunSpec, Error> {
    let optimizer = def.optimizer();
    if optimizer != "fedavg" {
        return Err(Error::Definition(format!(
            "{}#/optimizer/sort: optimizer '{optimizer}' is not implemented yet; use fedavg",
            def.job.model_spec_path
        )));
    }
    let h = &def.model_spec.hyperparameters;
    let name = def
        .model_spec
        .base_model
        .as_ref()
        .and_then(|b| b.get("name"))
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("mlp");
    let mut model = json!({ "name": name });
    if let Some(hidden) = h.get("hidden") {
        model["hidden"] = hidden.clone();
    }
    Ok(RunSpec {
        rounds: def.hyper_u64("rounds").unwrap_or(1) as u32,
        optimizer,
        model,
        hyperparameters: serde_json::Value::Object(h.clone()),
        seed: def.hyper_u64("seed").unwrap_or(0),
    })
}

impl Runner {
    /// A runner over a store and a transport.
    pub fn new(
        store: Arc<dyn EventStore>,
        transport: Arc<dyn Transport>,
        options: Options,
    ) -> Self {
        Self {
            store,
            transport,
            options,
        }
    }

    /// Records a new job from a definition; returns its id.
    pub async fn submit(&self, def: &JobDefinition) -> Result<String, Error> {
        let tasks = planner::expand(def).map_err(|p| Error::Definition(p.to_string()))?;
        planner::two_tier(&tasks).map_err(Error::Definition)?;
        let spec = run_spec(def)?;
        let job_id = uuid::Uuid::now_v7().to_string();
        let command = JobCommand::Create {
            job_id: job_id.clone(),
            name: def.name(),
            source: def.folder.display().to_string(),
            spec,
            tasks,
        };
        let mut job = Job::default();
        self.execute(&mut job, &job_id, command, "engine", None)
            .await?;
        Ok(job_id)
    }

    /// Loads a job's state from its events.
    pub async fn load(&self, job_id: &str) -> Result<Job, Error> {
        let events = self.store.read_stream(&job::stream_id(job_id), 1).await?;
        if events.is_empty() {
            return Err(Error::UnknownJob(job_id.to_string()));
        }
        let decoded = events
            .iter()
            .map(JobEvent::from_envelope)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Job::from_events(&decoded))
    }

    /// Runs a job until it completes or fails; returns its final state.
    pub async fn run(&self, job_id: &str) -> Result<Job, Error> {
        let mut job = self.load(job_id).await?;
        let mut inbox = self.transport.report_inbox(job_id).await?;
        if job.status == crate::job::Status::Ready {
            match self.place(&job).await? {
                Some(assignments) => {
                    self.execute(
                        &mut job,
                        job_id,
                        JobCommand::Assign(assignments),
                        "engine",
                        None,
                    )
                    .await?
                }
                None => {
                    let reason = format!(
                        "not enough workers to place {} tasks within {:?}",
                        job.tasks.len(),
                        self.options.worker_wait
                    );
                    self.execute(&mut job, job_id, JobCommand::Fail(reason), "engine", None)
                        .await?;
                }
            }
        }
        let mut sent = HashSet::new();
        while !job.status.is_terminal() {
            let mut progressed = false;
            for action in decide(&job) {
                match action {
                    Action::Send { worker_id, command } => {
                        if sent.insert(command.id.clone()) {
                            tracing::debug!(job = job_id, worker = %worker_id, command = %command.id, "send");
                            self.transport.send_command(&worker_id, &command).await?;
                        }
                    }
                    Action::Handle(command) => {
                        self.execute(&mut job, job_id, command, "engine", None)
                            .await?;
                        progressed = true;
                    }
                }
            }
            if progressed {
                continue;
            }
            let next = tokio::time::timeout(self.options.report_timeout, inbox.next()).await;
            match next {
                Err(_) => {
                    let reason = format!(
                        "no worker report within {:?} in round {}",
                        self.options.report_timeout, job.round
                    );
                    self.execute(&mut job, job_id, JobCommand::Fail(reason), "engine", None)
                        .await?;
                }
                Ok(None) => return Err(Error::Definition("the report inbox closed".into())),
                Ok(Some(Err(e))) => tracing::warn!(job = job_id, "unreadable report skipped: {e}"),
                Ok(Some(Ok(delivery))) => {
                    let report = delivery.message.clone();
                    let actor = format!("worker:{}", report.worker_id);
                    let cause = report.command_id.clone();
                    match job.handle(JobCommand::Report(report)) {
                        Ok(events) => {
                            self.commit(&mut job, job_id, events, &actor, Some(&cause))
                                .await?
                        }
                        Err(rejection) => {
                            tracing::warn!(job = job_id, "report rejected: {rejection}")
                        }
                    }
                    delivery.ack().await?;
                }
            }
        }
        Ok(job)
    }

    async fn place(&self, job: &Job) -> Result<Option<BTreeMap<String, String>>, Error> {
        let deadline = tokio::time::Instant::now() + self.options.worker_wait;
        loop {
            let workers = self.transport.workers().await?;
            if let Some(a) = assign(&job.tasks, &workers) {
                return Ok(Some(a));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn execute(
        &self,
        job: &mut Job,
        job_id: &str,
        command: JobCommand,
        actor: &str,
        cause: Option<&str>,
    ) -> Result<(), Error> {
        let events = job.handle(command).map_err(|rejection| Error::Refused {
            job: job_id.to_string(),
            rejection,
        })?;
        self.commit(job, job_id, events, actor, cause).await
    }

    async fn commit(
        &self,
        job: &mut Job,
        job_id: &str,
        events: Vec<JobEvent>,
        actor: &str,
        cause: Option<&str>,
    ) -> Result<(), Error> {
        let expected = if job.version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(job.version)
        };
        let new = events
            .iter()
            .map(|e| {
                let n = e.to_new_event(job_id, actor);
                match cause {
                    Some(c) => n.caused_by(c),
                    None => n,
                }
            })
            .collect();
        self.store
            .append(&job::stream_id(job_id), expected, new)
            .await?;
        for e in &events {
            tracing::info!(job = job_id, event = e.event_type(), "recorded");
            job.apply(e);
        }
        Ok(())
    }
}
