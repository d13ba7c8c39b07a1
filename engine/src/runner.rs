//! The thin effectful runner around the pure job aggregate and controller:
//! it records user commands, sends the controller's commands, arms timers,
//! reads the worker registry and feeds reports back. Everything it knows
//! comes from the job's events, so a restarted runner continues any job.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

use flame_events::protocol::{Report, WorkerInfo};
use flame_events::store::EventStore;
use flame_transport::Transport;
use flame_transport::blob::BlobStore;

use crate::controller::{Action, Outgoing, decide_unsent, outgoing, vouch};
use crate::definition::{JobDefinition, Problems};
use crate::job::{Job, JobCommand, Rejection, Status};
use crate::persist::{self, Fence, Jobs};
use flame_events::{Actor, Cause};

/// Most reports taken into one append.
const MAX_REPORT_BATCH: usize = 1000;
/// Commands in flight at once when the runner sends a round's commands.
const SEND_CONCURRENCY: usize = 64;
/// The least time a read of the worker registry is given before it counts as
/// failed (more where the last read took long: a large registry on a busy machine).
const REGISTRY_READ_LIMIT: Duration = Duration::from_secs(10);
/// The longest a turn waits for more reports after its first (see `turn_cost` in [`Runner::run_fenced`]).
const MAX_BATCH_WAIT: Duration = Duration::from_millis(50);

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
    Transport(#[from] flame_transport::Error),
    /// The job refused the command (illegal in its state, or a bad report).
    #[error("job {job}: {rejection}")]
    Refused {
        /// Job id.
        job: String,
        /// Why.
        rejection: Rejection,
    },
    /// Other writers kept appending to the job's stream first.
    #[error("job {0}: other writers kept appending first; try again")]
    Contended(String),
    /// This engine's lease on the job is no longer valid: another replica drives it.
    #[error("job {0}: this engine's lease is no longer valid; another replica drives the job")]
    Fenced(String),
    /// No such job in the store.
    #[error("job '{0}' has no events in this store")]
    UnknownJob(String),
    /// A fork that cannot be made as asked.
    #[error("cannot fork job '{job}': {reason}")]
    Fork {
        /// The parent job.
        job: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    fn from_write(job: &str, e: persist::Error) -> Self {
        match e {
            persist::Error::Refused(rejection) => Self::Refused { job: job.to_string(), rejection },
            persist::Error::Store(e) => Self::Store(e),
            persist::Error::Contended => Self::Contended(job.to_string()),
            persist::Error::Fenced => Self::Fenced(job.to_string()),
        }
    }
}

/// How often the runner looks around.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often a job reads the worker registry while it runs (worker loss is noticed this fast, plus the heartbeat TTL).
    pub registry_poll: Duration,
    /// How often a starting job looks for workers to place its tasks on.
    pub placement_poll: Duration,
    /// After a failed read of the worker registry, how long the workers
    /// listed before it count as live though missing (time to register again
    /// once the registry is back; see [`crate::liveness`]).
    pub registry_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { registry_poll: Duration::from_secs(1), placement_poll: Duration::from_millis(100), registry_grace: Duration::from_secs(15) }
    }
}

/// The runner's settings a user may change (`flame-engine`, `flamectl run`).
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Seconds the workers live before the worker registry went out of reach
    /// (a NATS server failing over) stay live though missing from it, counted
    /// from the last failed read: their time to register again once it is
    /// back, before their tasks are given to others or the job fails short
    /// of its quorum.
    #[arg(long, env = "FLAME_REGISTRY_GRACE", value_name = "SECONDS", default_value_t = 15)]
    pub registry_grace: u64,
}

impl Settings {
    /// The runner's options with these settings.
    pub fn options(&self) -> Options {
        Options { registry_grace: Duration::from_secs(self.registry_grace), ..Options::default() }
    }
}

/// Drives jobs against an event store and a transport.
#[derive(Clone)]
pub struct Runner {
    store: Arc<dyn EventStore>,
    jobs: Jobs,
    transport: Arc<dyn Transport>,
    options: Options,
    wake: Arc<tokio::sync::Notify>,
    /// Where the model files a definition brings (a TorchScript module) go for the workers.
    blobs: Option<Arc<dyn BlobStore>>,
    /// Who the engine's own decisions are recorded as.
    actor: Actor,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Runner {
    /// A runner over a store and a transport.
    pub fn new(store: Arc<dyn EventStore>, transport: Arc<dyn Transport>, options: Options) -> Self {
        let jobs = Jobs::new(store.clone());
        Self { store, jobs, transport, options, wake: Arc::default(), blobs: None, actor: Actor::Engine }
    }

    /// The same runner, storing the model files definitions bring (a
    /// TorchScript module) in `blobs`, where workers fetch them.
    pub fn with_blobs(mut self, blobs: Arc<dyn BlobStore>) -> Self {
        self.blobs = Some(blobs);
        self
    }

    /// The same runner, recording its decisions as `actor` (a named replica).
    pub fn with_actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    /// Puts a definition's model file where workers find it, before any event names it.
    async fn store_model_file(&self, def: &JobDefinition) -> Result<(), Error> {
        let Some(file) = &def.model_file else { return Ok(()) };
        let blobs = self.blobs.as_ref().ok_or_else(|| {
            Error::Definition(format!("the model file {} needs a blob store, and this engine was started without one", file.name))
        })?;
        let digest =
            blobs.put(file.bytes.to_vec()).await.map_err(|e| Error::Definition(format!("storing the model file {}: {e}", file.name)))?;
        if digest != file.sha256 {
            return Err(Error::Definition(format!(
                "the blob store gave the model file {} the digest {digest}, not {}",
                file.name, file.sha256
            )));
        }
        Ok(())
    }

    /// The worker registry, as the transport sees it.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        Ok(self.transport.workers().await?)
    }

    /// Records a new job from a definition; returns its id.
    pub async fn submit(&self, def: &JobDefinition, actor: &Actor) -> Result<String, Error> {
        let crate::compile::Compiled { spec, tasks } = crate::compile::compile(def).map_err(Error::Invalid)?;
        self.store_model_file(def).await?;
        let job_id = uuid::Uuid::now_v7().to_string();
        let command = JobCommand::Create {
            job_id: job_id.clone(),
            name: def.name(),
            source: def.folder.display().to_string(),
            spec,
            tasks,
            fork: None,
        };
        self.execute(&job_id, command, Cause::by(actor.clone())).await?;
        Ok(job_id)
    }

    /// Creates a fork of job `parent_id` (see [`crate::fork`]): a new job that
    /// starts from the parent's model after a round; its id.
    pub async fn fork(&self, parent_id: &str, request: &crate::fork::Request, actor: &Actor) -> Result<String, Error> {
        let envelopes = self.store.read_stream(&flame_events::job::stream_id(parent_id), 1).await?;
        if envelopes.is_empty() {
            return Err(Error::UnknownJob(parent_id.to_string()));
        }
        let events = envelopes.iter().map(flame_events::job::JobEvent::from_envelope).collect::<Result<Vec<_>, _>>()?;
        let p = crate::fork::plan(parent_id, &events, request).map_err(|reason| Error::Fork { job: parent_id.to_string(), reason })?;
        let job_id = uuid::Uuid::now_v7().to_string();
        let command = JobCommand::Create {
            job_id: job_id.clone(),
            name: p.name,
            source: p.source,
            spec: p.spec,
            tasks: p.tasks,
            fork: Some(Box::new(p.origin)),
        };
        self.execute(&job_id, command, Cause::by(actor.clone())).await?;
        Ok(job_id)
    }

    /// The differential privacy other jobs in the store spent on the
    /// datasets `job` has budgets for: dataset URL -> their runs (one per
    /// noised update, q = 1). Reads every job; a ledger projection would
    /// make it one read.
    pub async fn spent_elsewhere(&self, job: &Job) -> Result<std::collections::BTreeMap<String, Vec<crate::accountant::Runs>>, Error> {
        let budgets = job.spec.as_ref().map(|s| s.privacy_budgets.clone()).unwrap_or_default();
        let mut out: std::collections::BTreeMap<String, Vec<crate::accountant::Runs>> = Default::default();
        for id in self.job_ids().await? {
            if id == job.job_id {
                continue;
            }
            let other = self.jobs.load(&id).await?;
            for (dataset, runs) in crate::ledger::runs_of(&other) {
                if budgets.contains_key(&dataset) {
                    out.entry(dataset).or_default().push(runs);
                }
            }
        }
        Ok(out)
    }

    /// Replaces the definition of a job that is not running.
    pub async fn update(&self, job_id: &str, def: &JobDefinition, actor: &Actor) -> Result<Job, Error> {
        self.load(job_id).await?;
        let crate::compile::Compiled { spec, tasks } = crate::compile::compile(def).map_err(Error::Invalid)?;
        self.store_model_file(def).await?;
        self.user(job_id, JobCommand::Update { name: def.name(), source: def.folder.display().to_string(), spec, tasks }, actor).await
    }

    /// Asks a ready job to start; `run` then drives it.
    pub async fn start(&self, job_id: &str, actor: &Actor) -> Result<Job, Error> {
        self.user(job_id, JobCommand::Start { now_ms: now_ms() }, actor).await
    }

    /// Asks an active job to stop.
    pub async fn stop(&self, job_id: &str, reason: &str, actor: &Actor) -> Result<Job, Error> {
        self.user(job_id, JobCommand::Stop { reason: format!("stopped by {actor}: {reason}") }, actor).await
    }

    /// Removes a job that is not active (its events stay).
    pub async fn delete(&self, job_id: &str, actor: &Actor) -> Result<Job, Error> {
        self.user(job_id, JobCommand::Delete, actor).await
    }

    async fn user(&self, job_id: &str, command: JobCommand, actor: &Actor) -> Result<Job, Error> {
        self.load(job_id).await?;
        let job = self.execute(job_id, command, Cause::by(actor.clone())).await?;
        self.wake.notify_waiters();
        Ok(job)
    }

    /// Loads a job's state from its events.
    pub async fn load(&self, job_id: &str) -> Result<Job, Error> {
        self.load_shared(job_id).await.map(Arc::unwrap_or_clone)
    }

    /// [`Runner::load`], sharing the cached state rather than copying it.
    async fn load_shared(&self, job_id: &str) -> Result<Arc<Job>, Error> {
        let job = self.jobs.load_shared(job_id).await?;
        if job.version == 0 {
            return Err(Error::UnknownJob(job_id.to_string()));
        }
        Ok(job)
    }

    /// Seconds since each live worker's last heartbeat.
    pub async fn heartbeat_ages(&self) -> Result<Vec<(String, f64)>, Error> {
        Ok(self.transport.heartbeat_ages().await?)
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
    pub async fn run_resuming(&self, job_id: &str) -> Result<Job, Error> {
        self.run_resuming_fenced(job_id, &Fence::default()).await
    }

    /// [`Runner::run_resuming`] while `fence` holds (an engine replica's lease on the job).
    pub async fn run_resuming_fenced(&self, job_id: &str, fence: &Fence) -> Result<Job, Error> {
        // A run that fails (the store or NATS away for a while) starts again from the log,
        // backing off; a job that is unknown or refuses the engine ends it, and so does a closed fence.
        let mut pause = Duration::from_secs(1);
        loop {
            match self.run_fenced(job_id, fence).await {
                Err(e @ (Error::UnknownJob(_) | Error::Refused { .. } | Error::Fenced(_))) => return Err(e),
                Err(e) => {
                    tracing::error!(job = %job_id, "job runner failed, resuming in {pause:?}: {e}");
                    tokio::time::sleep(pause).await;
                    // At most a few seconds: the store or NATS coming back should not wait long to be noticed.
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                done => return done,
            }
        }
    }

    /// Drives a job once until it ends or something fails; the job's state
    /// is in its log either way, so a failed run may simply be run again.
    pub async fn run(&self, job_id: &str) -> Result<Job, Error> {
        self.run_fenced(job_id, &Fence::default()).await
    }

    /// [`Runner::run`], recording and sending only while `fence` holds.
    pub async fn run_fenced(&self, job_id: &str, fence: &Fence) -> Result<Job, Error> {
        // The job's state as the store's cache shares it: with thousands of tasks, copying it
        // on every turn would cost more than the turn's decisions.
        let mut job = self.load_shared(job_id).await?;
        if !job.status.is_active() {
            return Ok(Arc::unwrap_or_clone(job));
        }
        let mut inbox = self.transport.report_inbox(job_id).await?;
        // Command id -> the workers it went to (a task's command goes to a new worker after a loss).
        let mut sent: HashMap<String, Vec<String>> = HashMap::new();
        // Reports dealt with by this run: a redelivery (its ack was late) is acked, not recorded again.
        let mut taken = HashSet::new();
        let mut live = crate::liveness::Liveness::new(self.options.registry_grace);
        let mut read_at: Option<Instant> = None;
        // How long the last successful read of the registry took.
        let mut read_took = Duration::ZERO;
        // Worker id -> the group that speaks for it, as the registry last said.
        let mut groups: HashMap<String, String> = HashMap::new();
        let transport = &self.transport;
        let send = |out: Outgoing| async move {
            let result = match &out {
                Outgoing::One(worker_id, command) => {
                    tracing::debug!(job = job_id, worker = %worker_id, command = %command.id, "send");
                    transport.send_command(worker_id, command).await
                }
                Outgoing::Group(group, commands) => {
                    tracing::debug!(job = job_id, group = %group, commands = commands.len(), "send to a group");
                    transport.send_commands(group, commands).await
                }
            };
            result.map_err(|e| (out.addressed(), e))
        };
        let mut outbox: VecDeque<Outgoing> = VecDeque::new();
        let mut in_flight = FuturesUnordered::new();
        let fill = |outbox: &mut VecDeque<Outgoing>, in_flight: &mut FuturesUnordered<_>| {
            while in_flight.len() < SEND_CONCURRENCY
                && let Some(out) = outbox.pop_front()
            {
                in_flight.push(send(out));
            }
        };
        // What the last turn cost (taking its reports, deciding): how long the next waits for more.
        let mut turn_cost = Duration::ZERO;
        while job.status.is_active() {
            if !fence.holds() {
                return Err(Error::Fenced(job_id.to_string()));
            }
            let poll = if job.status == Status::Starting { self.options.placement_poll } else { self.options.registry_poll };
            if job.status != Status::Stopping && read_at.is_none_or(|t| t.elapsed() >= poll) {
                // Bounded once there is a list to go on with: a read that hangs while a server
                // fails over holds up every report and timer.
                let limit = if live.live().is_some() { REGISTRY_READ_LIMIT.max(read_took * 3) } else { Duration::MAX };
                let reading = Instant::now();
                match tokio::time::timeout(limit, self.transport.workers()).await {
                    Ok(Ok(now_live)) => {
                        read_took = reading.elapsed();
                        if live.read_connected(now_live, Instant::now(), self.transport.connects()) {
                            tracing::warn!(
                                job = job_id,
                                "reconnected to NATS: no worker the registry listed before counts as lost for {} s",
                                self.options.registry_grace.as_secs()
                            );
                        }
                        groups = live.live().unwrap_or_default().iter().filter_map(|w| Some((w.id.clone(), w.group.clone()?))).collect();
                    }
                    // The registry out of reach (a NATS server failing over): decide on the last
                    // list read rather than stop; no worker is counted lost on a failed read, nor
                    // for a grace after it (see crate::liveness).
                    failed => {
                        let e = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer in {:.1} s", limit.as_secs_f64()),
                        };
                        if !live.failed(Instant::now()) {
                            return Err(Error::Transport(flame_transport::Error::Nats(format!("reading the worker registry: {e}"))));
                        }
                        tracing::warn!(
                            job = job_id,
                            "cannot read the worker registry, using the last list (no worker counts as lost for {} s): {e}",
                            self.options.registry_grace.as_secs()
                        );
                    }
                }
                read_at = Some(Instant::now());
            }
            let now = now_ms();
            let deciding = Instant::now();
            let mut handled = false;
            let mut sends = Vec::new();
            let already = |worker: &str, id: &str| sent.get(id).is_some_and(|ws| ws.iter().any(|w| w == worker));
            let actions = decide_unsent(&job, now, live.live(), &already);
            for action in actions {
                match action {
                    Action::Send { worker_id, command } => {
                        let to = sent.entry(command.id.clone()).or_default();
                        if !to.contains(&worker_id) {
                            to.push(worker_id.clone());
                            crate::metrics::get().sent(&command);
                            sends.push((worker_id, command));
                        }
                    }
                    Action::Handle(mut command) => {
                        // A round of a job with privacy budgets: what other jobs spent on its datasets.
                        if let JobCommand::StartRound { spent, .. } = &mut command
                            && job.spec.as_ref().is_some_and(|s| !s.privacy_budgets.is_empty())
                        {
                            *spent = self.spent_elsewhere(&job).await?;
                        }
                        let done = self.jobs.execute_fenced(job_id, fence, command, Cause::by(self.actor.clone())).await;
                        job = match done.map_err(|e| Error::from_write(job_id, e)) {
                            Ok(job) => job,
                            // Someone else (a user, another step) moved the job first: decide again.
                            Err(Error::Refused { rejection, .. }) => {
                                tracing::debug!(job = job_id, "decision refused, reloading: {rejection}");
                                self.load_shared(job_id).await?
                            }
                            Err(e) => return Err(e),
                        };
                        handled = true;
                        break;
                    }
                }
            }
            // Commands go out concurrently, SEND_CONCURRENCY at a time, while the reports of those
            // already out are taken: the first trainers' updates need not wait for the last command.
            outbox.extend(outgoing(sends, &groups));
            fill(&mut outbox, &mut in_flight);
            let decided_in = deciding.elapsed();
            if handled {
                continue;
            }
            let until_timer = job.next_timer().map_or(poll, |(_, due)| Duration::from_millis(due.saturating_sub(now)));
            let wait = until_timer.min(poll).max(Duration::from_millis(5));
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            // Reports taken in this turn. Each turn (an append, then deciding) costs about the same
            // whether it takes one report or hundreds, and with thousands of workers it costs
            // milliseconds: after the first report, the turn waits as long as the last one cost
            // for more to arrive, so that deciding takes at most about half the engine's time.
            let mut deliveries = Vec::new();
            let batch_until = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(batch_until);
            loop {
                tokio::select! {
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => {
                        fill(&mut outbox, &mut in_flight);
                        // Sent: nothing to decide. Not sent: forgotten as sent, to go out again on the next turn.
                        let Err((unsent, e)) = r else { continue };
                        tracing::warn!(job = job_id, commands = unsent.len(), first = ?unsent.first(), "commands not sent, sending them again: {e}");
                        for (worker_id, id) in unsent {
                            if let Some(ws) = sent.get_mut(&id) {
                                ws.retain(|w| *w != worker_id);
                            }
                        }
                        break;
                    }
                    () = &mut batch_until, if !deliveries.is_empty() => break,
                    () = &mut sleep => break,
                    () = self.wake.notified() => break,
                    next = inbox.next() => match next {
                        None => return Err(Error::Definition("the report inbox closed".into())),
                        Some(Err(e)) => tracing::warn!(job = job_id, "reading the report inbox: {e}"),
                        Some(Ok(delivery)) => {
                            if deliveries.is_empty() {
                                batch_until.as_mut().reset(tokio::time::Instant::now() + turn_cost.min(MAX_BATCH_WAIT));
                            }
                            deliveries.push(delivery);
                            // Every report already waiting.
                            while deliveries.len() < MAX_REPORT_BATCH {
                                match inbox.next().now_or_never() {
                                    Some(Some(Ok(d))) => deliveries.push(d),
                                    Some(Some(Err(e))) => tracing::warn!(job = job_id, "reading the report inbox: {e}"),
                                    Some(None) | None => break,
                                }
                            }
                            if deliveries.len() >= MAX_REPORT_BATCH {
                                break;
                            }
                        }
                    },
                }
            }
            let turn = Instant::now();
            if !deliveries.is_empty() {
                // Every report of the turn in one append.
                let mut keys = HashSet::new();
                let mut fresh: Vec<Report> = deliveries
                    .iter()
                    .map(|d| &d.message)
                    .filter(|r| {
                        let key = (r.worker_id.clone(), r.command_id.clone());
                        !taken.contains(&key) && keys.insert(key)
                    })
                    .cloned()
                    .collect();
                vouch(&mut fresh, &groups);
                self.take_reports(job_id, fence, fresh).await?;
                taken.extend(keys);
                for d in deliveries {
                    d.ack().await?;
                }
            }
            job = self.load_shared(job_id).await?;
            turn_cost = decided_in + turn.elapsed();
        }
        drop(inbox);
        if let Err(e) = self.transport.forget_job(job_id).await {
            tracing::warn!(job = job_id, "cannot release the job's report consumer: {e}");
        }
        Ok(Arc::unwrap_or_clone(job))
    }

    /// Applies reports, and records why any was refused, in one append: each is dealt with once.
    async fn take_reports(&self, job_id: &str, fence: &Fence, reports: Vec<Report>) -> Result<(), Error> {
        if !reports.is_empty() {
            self.jobs.take_reports(job_id, fence, &reports).await.map_err(|e| Error::from_write(job_id, e))?;
            crate::metrics::get().answered(reports.iter().map(|r| r.command_id.as_str()));
        }
        Ok(())
    }

    /// Runs a command through the aggregate's one write path and returns the new state.
    async fn execute(&self, job_id: &str, command: JobCommand, cause: Cause) -> Result<Job, Error> {
        self.jobs.execute(job_id, command, cause).await.map_err(|e| Error::from_write(job_id, e))
    }
}
