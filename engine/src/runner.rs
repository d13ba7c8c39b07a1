//! The thin effectful runner around the pure job aggregate and controller:
//! it appends events, sends the controller's commands, and feeds reports back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use cqrs_es::{AggregateError, CqrsFramework};
use flame_events::job::RunSpec;
use flame_events::protocol::WorkerInfo;
use flame_events::store::EventStore;
use flame_events::transport::Transport;

use crate::controller::{Action, decide};
use crate::definition::JobDefinition;
use crate::job::{Job, JobCommand, Rejection};
use crate::persist::{self, Jobs};
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
    /// Committing through cqrs-es failed (a concurrent writer, or the store).
    #[error("job {job}: cannot record events: {reason}")]
    Persist {
        /// Job id.
        job: String,
        /// Why.
        reason: String,
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
        Self { worker_wait: Duration::from_secs(60), report_timeout: Duration::from_secs(600) }
    }
}

/// Drives jobs against an event store and a transport.
#[derive(Clone)]
pub struct Runner {
    jobs: Jobs,
    cqrs: Arc<CqrsFramework<Job, Jobs>>,
    transport: Arc<dyn Transport>,
    options: Options,
}

/// Places each task on a distinct worker that offers the task's role, in id
/// order; `None` while there are not enough workers.
pub fn assign(tasks: &[flame_events::job::TaskSpec], workers: &[WorkerInfo]) -> Option<BTreeMap<String, String>> {
    let role_of = |t: &flame_events::job::TaskSpec| {
        if t.is_data_consumer { "trainer" } else { "aggregator" }
    };
    let mut used = HashSet::new();
    let mut out = BTreeMap::new();
    // Aggregators first: they are fewer and workers may offer both roles.
    let mut ordered: Vec<_> = tasks.iter().collect();
    ordered.sort_by_key(|t| t.is_data_consumer);
    for t in ordered {
        let w = workers.iter().find(|w| !used.contains(&w.id) && (w.roles.iter().any(|r| r == role_of(t) || r == &t.role)))?;
        used.insert(w.id.clone());
        out.insert(t.task_id.clone(), w.id.clone());
    }
    Some(out)
}

/// The run settings a definition implies.
pub fn run_spec(def: &JobDefinition) -> Result<RunSpec, Error> {
    let optimizer = def.optimizer();
    if !flame_events::protocol::AGGREGATORS.contains(&optimizer.as_str()) {
        return Err(Error::Definition(format!(
            "{}#/optimizer/sort: optimizer '{optimizer}' is not implemented yet; use one of: {}",
            def.job.model_spec_path,
            flame_events::protocol::AGGREGATORS.join(", ")
        )));
    }
    let h = &def.model_spec.hyperparameters;
    let name =
        def.model_spec.base_model.as_ref().and_then(|b| b.get("name")).and_then(|n| n.as_str()).filter(|n| !n.is_empty()).unwrap_or("mlp");
    let mut model = json!({ "name": name });
    if let Some(hidden) = h.get("hidden") {
        model["hidden"] = hidden.clone();
    }
    Ok(RunSpec {
        rounds: def.hyper_u64("rounds").unwrap_or(1) as u32,
        optimizer,
        optimizer_kwargs: def.model_spec.optimizer.as_ref().map(|o| o.kwargs.clone()).unwrap_or_default(),
        model,
        hyperparameters: serde_json::Value::Object(h.clone()),
        seed: def.hyper_u64("seed").unwrap_or(0),
    })
}

impl Runner {
    /// A runner over a store and a transport.
    pub fn new(store: Arc<dyn EventStore>, transport: Arc<dyn Transport>, options: Options) -> Self {
        let jobs = Jobs::new(store);
        let cqrs = Arc::new(CqrsFramework::new(jobs.clone(), vec![], ()));
        Self { jobs, cqrs, transport, options }
    }

    /// Records a new job from a definition; returns its id.
    pub async fn submit(&self, def: &JobDefinition) -> Result<String, Error> {
        let tasks = planner::expand(def).map_err(|p| Error::Definition(p.to_string()))?;
        planner::two_tier(&tasks).map_err(Error::Definition)?;
        let spec = run_spec(def)?;
        let job_id = uuid::Uuid::now_v7().to_string();
        let command =
            JobCommand::Create { job_id: job_id.clone(), name: def.name(), source: def.folder.display().to_string(), spec, tasks };
        self.execute(&job_id, command, "engine", None).await?;
        Ok(job_id)
    }

    /// Loads a job's state from its events.
    pub async fn load(&self, job_id: &str) -> Result<Job, Error> {
        let job = self.jobs.load(job_id).await?;
        if job.version == 0 {
            return Err(Error::UnknownJob(job_id.to_string()));
        }
        Ok(job)
    }

    /// Runs a job until it completes or fails; returns its final state.
    pub async fn run(&self, job_id: &str) -> Result<Job, Error> {
        let mut job = self.load(job_id).await?;
        let mut inbox = self.transport.report_inbox(job_id).await?;
        if job.status == crate::job::Status::Ready {
            let command = match self.place(&job).await? {
                Some(assignments) => JobCommand::Assign(assignments),
                None => {
                    JobCommand::Fail(format!("not enough workers to place {} tasks within {:?}", job.tasks.len(), self.options.worker_wait))
                }
            };
            job = self.execute(job_id, command, "engine", None).await?;
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
                        job = self.execute(job_id, command, "engine", None).await?;
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
                    let reason = format!("no worker report within {:?} in round {}", self.options.report_timeout, job.round);
                    job = self.execute(job_id, JobCommand::Fail(reason), "engine", None).await?;
                }
                Ok(None) => return Err(Error::Definition("the report inbox closed".into())),
                Ok(Some(Err(e))) => tracing::warn!(job = job_id, "unreadable report skipped: {e}"),
                Ok(Some(Ok(delivery))) => {
                    let report = delivery.message.clone();
                    let actor = format!("worker:{}", report.worker_id);
                    let cause = report.command_id.clone();
                    match self.execute(job_id, JobCommand::Report(report), &actor, Some(&cause)).await {
                        Ok(next) => job = next,
                        Err(Error::Refused { rejection, .. }) => {
                            tracing::warn!(job = job_id, "report rejected: {rejection}")
                        }
                        Err(e) => return Err(e),
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

    /// Runs a command through the aggregate (cqrs-es over our store) and returns the new state.
    async fn execute(&self, job_id: &str, command: JobCommand, actor: &str, cause: Option<&str>) -> Result<Job, Error> {
        let mut metadata = HashMap::from([(persist::ACTOR.to_string(), actor.to_string())]);
        if let Some(c) = cause {
            metadata.insert(persist::CAUSATION.to_string(), c.to_string());
        }
        self.cqrs.execute_with_metadata(job_id, command, metadata).await.map_err(|e| match e {
            AggregateError::UserError(rejection) => Error::Refused { job: job_id.to_string(), rejection },
            other => Error::Persist { job: job_id.to_string(), reason: other.to_string() },
        })?;
        match self.jobs.last_known(job_id) {
            Some(job) => Ok(job),
            None => Ok(self.jobs.load(job_id).await?),
        }
    }
}
