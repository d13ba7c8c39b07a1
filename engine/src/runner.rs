//! The thin effectful runner around the pure job aggregate and controller:
//! it records user commands, sends the controller's commands, arms timers,
//! reads the worker registry and feeds reports back. Everything it knows
//! comes from the job's events, so a restarted runner continues any job.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use serde_json::json;

use cqrs_es::{AggregateError, CqrsFramework};
use flame_events::job::{RunSpec, TaskSpec};
use flame_events::protocol::{Report, WorkerInfo};
use flame_events::store::EventStore;
use flame_events::transport::Transport;

use crate::controller::{Action, decide};
use crate::definition::{JobDefinition, Problems};
use crate::job::{Job, JobCommand, Rejection, Status};
use crate::persist::{self, Jobs};
use crate::planner;

/// Most reports taken into one append.
const MAX_REPORT_BATCH: usize = 1000;
/// Commands in flight at once when the runner sends a round's commands.
const SEND_CONCURRENCY: usize = 64;

/// Runner errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The definition is invalid.
    #[error("{0}")]
    Invalid(Problems),
    /// The definition is valid but this version cannot run it.
    #[error("job definition: {0}")]
    Definition(String),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] flame_events::store::Error),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] flame_events::transport::Error),
    /// The job refused the command (illegal in its state, or a bad report).
    #[error("job {job}: {rejection}")]
    Refused {
        /// Job id.
        job: String,
        /// Why.
        rejection: Rejection,
    },
    /// Committing through cqrs-es failed (the store, or writers racing too long).
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

/// How often the runner looks around.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often a job reads the worker registry while it runs (worker loss is noticed this fast, plus the heartbeat TTL).
    pub registry_poll: Duration,
    /// How often a starting job looks for workers to place its tasks on.
    pub placement_poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { registry_poll: Duration::from_secs(1), placement_poll: Duration::from_millis(100) }
    }
}

/// Drives jobs against an event store and a transport.
#[derive(Clone)]
pub struct Runner {
    store: Arc<dyn EventStore>,
    jobs: Jobs,
    cqrs: Arc<CqrsFramework<Job, Jobs>>,
    transport: Arc<dyn Transport>,
    options: Options,
    wake: Arc<tokio::sync::Notify>,
}

/// The run settings and tasks a definition implies.
pub fn prepare(def: &JobDefinition) -> Result<(RunSpec, Vec<TaskSpec>), Error> {
    let tasks = planner::expand(def).map_err(Error::Invalid)?;
    let mut tasks = tasks;
    let tree = crate::plan::tree(def, &tasks).map_err(Error::Definition)?;
    tasks.extend(tree.reducers);
    let spec = run_spec(def)?;
    if spec.agg_goal.is_some() && tasks.iter().filter(|t| !t.is_data_consumer).count() > 1 {
        return Err(Error::Definition(
            "asynchronous (FedBuff) jobs run two-tier for now: one aggregator and its trainers; this design has middle aggregators or rings".into(),
        ));
    }
    let mut spec = RunSpec { uplinks: tree.uplinks, coordinator: tree.coordinator, candidates: tree.candidates, ..spec };
    if def.model_spec.selector.as_ref().is_some_and(|s| s.sort.eq_ignore_ascii_case("oort")) {
        let trainers = tasks.iter().filter(|t| t.is_data_consumer).count();
        let aggr_num = def.model_spec.selector.as_ref().and_then(|s| s.kwargs.get("aggr_num")).and_then(serde_json::Value::as_u64);
        spec.oort = Some(aggr_num.map_or(trainers, |n| n as usize).clamp(1, trainers.max(1)) as u32);
    }
    if matches!(spec.optimizer.as_str(), "scaffold" | "feddyn") {
        // Their server steps average over every trainer of the job, not just the round's.
        spec.optimizer_kwargs.insert("clients".into(), json!(tasks.iter().filter(|t| t.is_data_consumer).count()));
    }
    Ok((spec, tasks))
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
    // FedProx's `mu` is the trainers' business: it travels with the hyperparameters.
    let mut hyperparameters = h.clone();
    let optimizer_kwarg = |k: &str| def.model_spec.optimizer.as_ref().and_then(|o| o.kwargs.get(k)).cloned();
    if optimizer == "fedprox" {
        hyperparameters.entry("mu").or_insert(optimizer_kwarg("mu").unwrap_or(json!(0.01)));
    }
    // SCAFFOLD and FedDyn change the trainers' objective and keep a state per trainer.
    if optimizer == "scaffold" || optimizer == "feddyn" {
        hyperparameters.insert("client_optimizer".into(), json!(optimizer));
    }
    if optimizer == "feddyn" {
        let alpha = optimizer_kwarg("alpha").unwrap_or(json!(0.01));
        if alpha.as_f64().is_none_or(|a| a <= 0.0 || !a.is_finite()) {
            return Err(Error::Definition(format!(
                "{}#/optimizer/kwargs/alpha: FedDyn's alpha must be a number > 0, not {alpha}",
                def.job.model_spec_path
            )));
        }
        hyperparameters.insert("alpha".into(), alpha);
    }
    // Asynchronous aggregation (FedBuff): Flame's `aggGoal` and the fedbuff selector's `c`.
    let sort = def.model_spec.selector.as_ref().map(|s| s.sort.to_ascii_lowercase());
    let kwarg = |k: &str| def.model_spec.selector.as_ref().and_then(|s| s.kwargs.get(k)).and_then(serde_json::Value::as_u64);
    let asynchronous = optimizer == "fedbuff" || sort.as_deref() == Some("fedbuff") || h.contains_key("aggGoal");
    if asynchronous && optimizer != "fedbuff" {
        return Err(Error::Definition(format!(
            "{}#/optimizer/sort: an asynchronous job (fedbuff selector or aggGoal) needs optimizer 'fedbuff', not '{optimizer}'",
            def.job.model_spec_path
        )));
    }
    let (agg_goal, concurrency) = if asynchronous {
        let goal = def.hyper_u64("aggGoal").unwrap_or(1);
        if goal == 0 {
            return Err(Error::Definition(format!("{}#/hyperparameters/aggGoal: must be at least 1", def.job.model_spec_path)));
        }
        (Some(goal as u32), kwarg("c").or_else(|| def.hyper_u64("concurrency")).map(|c| c.max(1) as u32))
    } else {
        (None, None)
    };
    // Selection at run time: Flame's `random` selector (kwarg `k`); `default` takes every trainer.
    let select = match sort {
        None => None,
        Some(s) if s == "default" => None,
        Some(s) if s == "fedbuff" => None,
        // Oort: `oort` (aggr_num) is set below, once the trainers are known.
        Some(s) if s == "oort" && !asynchronous => None,
        Some(s) if s == "random" && !asynchronous => Some(kwarg("k").unwrap_or(1) as u32),
        Some(other) => {
            return Err(Error::Definition(format!(
                "{}#/selector/sort: selector '{other}' is not implemented at run time yet; use default, random or fedbuff (asynchronous jobs: default or fedbuff)",
                def.job.model_spec_path
            )));
        }
    };
    let mut model = json!({ "name": name });
    if let Some(channels) = h.get("channels") {
        model["channels"] = channels.clone();
    }
    if let Some(hidden) = h.get("hidden") {
        model["hidden"] = hidden.clone();
    }
    Ok(RunSpec {
        rounds: def.hyper_u64("rounds").unwrap_or(1) as u32,
        optimizer,
        optimizer_kwargs: def.model_spec.optimizer.as_ref().map(|o| o.kwargs.clone()).unwrap_or_default(),
        model,
        hyperparameters: serde_json::Value::Object(hyperparameters),
        seed: def.hyper_u64("seed").unwrap_or(0),
        max_run_time_s: def.job.max_run_time.filter(|s| *s > 0.0).map(|s| s.ceil() as u64),
        round_timeout_s: def.hyper_u64("roundTimeout"),
        quorum: def.hyper_u64("minClients").map(|q| q as u32),
        select,
        agg_goal,
        concurrency,
        // The tree, coordination and Oort need the tasks: `prepare` fills them in.
        ..RunSpec::default()
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Runner {
    /// A runner over a store and a transport.
    pub fn new(store: Arc<dyn EventStore>, transport: Arc<dyn Transport>, options: Options) -> Self {
        let jobs = Jobs::new(store.clone());
        let cqrs = Arc::new(CqrsFramework::new(jobs.clone(), vec![], ()));
        Self { store, jobs, cqrs, transport, options, wake: Arc::default() }
    }

    /// The worker registry, as the transport sees it.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        Ok(self.transport.workers().await?)
    }

    /// Records a new job from a definition; returns its id.
    pub async fn submit(&self, def: &JobDefinition, actor: &str) -> Result<String, Error> {
        let (spec, tasks) = prepare(def)?;
        let job_id = uuid::Uuid::now_v7().to_string();
        let command =
            JobCommand::Create { job_id: job_id.clone(), name: def.name(), source: def.folder.display().to_string(), spec, tasks };
        self.execute(&job_id, command, actor, None).await?;
        Ok(job_id)
    }

    /// Replaces the definition of a job that is not running.
    pub async fn update(&self, job_id: &str, def: &JobDefinition, actor: &str) -> Result<Job, Error> {
        self.load(job_id).await?;
        let (spec, tasks) = prepare(def)?;
        self.user(job_id, JobCommand::Update { name: def.name(), source: def.folder.display().to_string(), spec, tasks }, actor).await
    }

    /// Asks a ready job to start; `run` then drives it.
    pub async fn start(&self, job_id: &str, actor: &str) -> Result<Job, Error> {
        self.user(job_id, JobCommand::Start { now_ms: now_ms() }, actor).await
    }

    /// Asks an active job to stop.
    pub async fn stop(&self, job_id: &str, reason: &str, actor: &str) -> Result<Job, Error> {
        self.user(job_id, JobCommand::Stop { reason: format!("stopped by {actor}: {reason}") }, actor).await
    }

    /// Removes a job that is not active (its events stay).
    pub async fn delete(&self, job_id: &str, actor: &str) -> Result<Job, Error> {
        self.user(job_id, JobCommand::Delete, actor).await
    }

    async fn user(&self, job_id: &str, command: JobCommand, actor: &str) -> Result<Job, Error> {
        self.load(job_id).await?;
        let job = self.execute(job_id, command, actor, None).await?;
        self.wake.notify_waiters();
        Ok(job)
    }

    /// Loads a job's state from its events.
    pub async fn load(&self, job_id: &str) -> Result<Job, Error> {
        let job = self.jobs.load(job_id).await?;
        if job.version == 0 {
            return Err(Error::UnknownJob(job_id.to_string()));
        }
        Ok(job)
    }

    /// Every job id in the store, oldest first (a scan of the global log).
    pub async fn job_ids(&self) -> Result<Vec<String>, Error> {
        Ok(flame_events::store::stream_ids(self.store.as_ref(), "job-").await?)
    }

    /// Ids of the jobs the engine is working on (to resume after a restart).
    pub async fn active_jobs(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for id in self.job_ids().await? {
            if self.load(&id).await?.status.is_active() {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Drives an active job until it completes, fails or is terminated, and returns its final state.
    /// A job that is not active (ready, or ended) is returned as it is.
    pub async fn run(&self, job_id: &str) -> Result<Job, Error> {
        let mut job = self.load(job_id).await?;
        if !job.status.is_active() {
            return Ok(job);
        }
        let mut inbox = self.transport.report_inbox(job_id).await?;
        let mut sent = HashSet::new();
        // Reports dealt with by this run: a redelivery (its ack was late) is acked, not recorded again.
        let mut taken = HashSet::new();
        let mut live: Option<Vec<WorkerInfo>> = None;
        let mut previous: Option<Vec<WorkerInfo>> = None;
        let mut read_at: Option<Instant> = None;
        while job.status.is_active() {
            let poll = if job.status == Status::Starting { self.options.placement_poll } else { self.options.registry_poll };
            if job.status != Status::Stopping && read_at.is_none_or(|t| t.elapsed() >= poll) {
                // A worker counts as live if either of the last two reads listed it: one late
                // heartbeat under load is not a loss.
                let now_live = self.transport.workers().await?;
                let mut both = now_live.clone();
                both.extend(previous.into_iter().flatten().filter(|w: &WorkerInfo| !now_live.iter().any(|n| n.id == w.id)));
                both.sort_by(|a, b| a.id.cmp(&b.id));
                previous = Some(now_live);
                live = Some(both);
                read_at = Some(Instant::now());
            }
            let now = now_ms();
            let mut handled = false;
            let mut sends = Vec::new();
            for action in decide(&job, now, live.as_deref()) {
                match action {
                    Action::Send { worker_id, command } => {
                        if sent.insert((worker_id.clone(), command.id.clone())) {
                            sends.push((worker_id, command));
                        }
                    }
                    Action::Handle(command) => {
                        job = match self.execute(job_id, command, "engine", None).await {
                            Ok(job) => job,
                            // Someone else (a user, another step) moved the job first: decide again.
                            Err(Error::Refused { rejection, .. }) => {
                                tracing::debug!(job = job_id, "decision refused, reloading: {rejection}");
                                self.load(job_id).await?
                            }
                            Err(e) => return Err(e),
                        };
                        handled = true;
                        break;
                    }
                }
            }
            // Commands go out concurrently; each is idempotent, so one that fails is simply sent again later.
            let results: Vec<_> = futures::stream::iter(sends)
                .map(|(worker_id, command)| async move {
                    tracing::debug!(job = job_id, worker = %worker_id, command = %command.id, "send");
                    self.transport.send_command(&worker_id, &command).await.map_err(|e| (worker_id, command.id, e))
                })
                .buffer_unordered(SEND_CONCURRENCY)
                .collect()
                .await;
            for r in results {
                if let Err((worker_id, id, e)) = r {
                    sent.remove(&(worker_id, id));
                    return Err(e.into());
                }
            }
            if handled {
                continue;
            }
            let until_timer = job.next_timer().map_or(poll, |(_, due)| Duration::from_millis(due.saturating_sub(now)));
            let wait = until_timer.min(poll).max(Duration::from_millis(5));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                next = inbox.next() => match next {
                    None => return Err(Error::Definition("the report inbox closed".into())),
                    Some(Err(e)) => tracing::warn!(job = job_id, "unreadable report skipped: {e}"),
                    Some(Ok(delivery)) => {
                        // Take every report already waiting, in one append: with many workers,
                        // reports come in bursts, and both appending and deciding cost per call.
                        let mut deliveries = vec![delivery];
                        while deliveries.len() < MAX_REPORT_BATCH {
                            match inbox.next().now_or_never() {
                                Some(Some(Ok(d))) => deliveries.push(d),
                                Some(Some(Err(e))) => tracing::warn!(job = job_id, "unreadable report skipped: {e}"),
                                Some(None) | None => break,
                            }
                        }
                        let mut keys = HashSet::new();
                        let fresh: Vec<Report> = deliveries
                            .iter()
                            .map(|d| &d.message)
                            .filter(|r| {
                                let key = (r.worker_id.clone(), r.command_id.clone());
                                !taken.contains(&key) && keys.insert(key)
                            })
                            .cloned()
                            .collect();
                        self.take_reports(job_id, fresh).await?;
                        taken.extend(keys);
                        for d in deliveries {
                            d.ack().await?;
                        }
                    }
                },
            }
            job = self.load(job_id).await?;
        }
        drop(inbox);
        if let Err(e) = self.transport.forget_job(job_id).await {
            tracing::warn!(job = job_id, "cannot release the job's report consumer: {e}");
        }
        Ok(job)
    }

    /// Applies reports, and records why any was refused, in one append: each is dealt with once.
    async fn take_reports(&self, job_id: &str, reports: Vec<Report>) -> Result<(), Error> {
        if reports.is_empty() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let job = self.jobs.load(job_id).await?;
            let mut scratch = job.clone();
            let mut batch = Vec::new();
            for r in &reports {
                let (actor, cause) = (format!("worker:{}", r.worker_id), Some(r.command_id.clone()));
                let events = match scratch.handle(JobCommand::Report(r.clone())) {
                    Ok(events) => events,
                    Err(rejection) => {
                        tracing::warn!(job = job_id, worker = %r.worker_id, "report rejected: {rejection}");
                        let record = JobCommand::RecordRejection { report: Box::new(r.clone()), reason: rejection.to_string() };
                        scratch.handle(record).unwrap_or_default()
                    }
                };
                for e in events {
                    scratch.apply(&e);
                    batch.push((e, actor.clone(), cause.clone()));
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            match self.jobs.append_batch(&job, batch).await {
                Ok(_) => return Ok(()),
                // Someone else appended meanwhile (a user's stop): decide again on the new state.
                Err(flame_events::store::Error::Conflict { .. }) if attempt < 10 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs a command through the aggregate (cqrs-es over our store) and returns the new state.
    /// A conflict with another writer reloads and retries.
    async fn execute(&self, job_id: &str, command: JobCommand, actor: &str, cause: Option<&str>) -> Result<Job, Error> {
        let mut metadata = HashMap::from([(persist::ACTOR.to_string(), actor.to_string())]);
        if let Some(c) = cause {
            metadata.insert(persist::CAUSATION.to_string(), c.to_string());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.cqrs.execute_with_metadata(job_id, command.clone(), metadata.clone()).await {
                Ok(()) => break,
                Err(AggregateError::UserError(rejection)) => return Err(Error::Refused { job: job_id.to_string(), rejection }),
                Err(AggregateError::AggregateConflict) if attempt < 10 => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                }
                Err(other) => return Err(Error::Persist { job: job_id.to_string(), reason: other.to_string() }),
            }
        }
        match self.jobs.last_known(job_id) {
            Some(job) => Ok(job),
            None => Ok(self.jobs.load(job_id).await?),
        }
    }
}
