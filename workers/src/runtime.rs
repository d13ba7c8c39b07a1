//! The worker runtime: register, heartbeat, take commands, run them, report.
//! The same runtime serves embedded mode (in-process transport) and
//! distributed mode (NATS).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;

use flame_events::algorithm::ServerOptimizer;
#[cfg(feature = "tch")]
use flame_events::algorithm::{ClientObjective, Privacy};
use flame_events::protocol::{self, Command, CommandBody, Excluded, Report, ReportBody, WorkerInfo};
use flame_transport::Transport;

use crate::aggregate::Needs;
use crate::blob::BlobStore;
#[cfg(feature = "tch")]
use crate::control;
use crate::model::ModelConfig;
#[cfg(feature = "tch")]
use crate::model::{Net, TrainSettings};
use crate::roots::DataRoots;
use crate::spill::Held;
use crate::weights::{self, State, Weights};
use crate::{aggregate, data};
use flame_events::model::Model;

/// How often a worker renews its registration.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How soon a renewal that failed is tried again. A registration lives a few
/// heartbeats (6 s by default): after a NATS server failed over, or a leaf
/// node's link came back, the worker must be listed again within that, not
/// a timeout and a whole heartbeat later.
pub const HEARTBEAT_RETRY: Duration = Duration::from_millis(500);
/// How many finished commands a worker remembers, to answer redeliveries without redoing them.
const REMEMBERED: usize = 4096;
/// How long a report that cannot be published is tried again (a NATS server
/// restarting, a leaf node's link cut): less than the report stream's
/// duplicate window (120 s), so a publish that was stored but whose
/// acknowledgement was lost is de-duplicated when it is tried again.
pub const REPORT_RETRY_FOR: Duration = Duration::from_secs(90);
/// Commands a worker runs at once unless told otherwise (`--concurrency`).
pub const DEFAULT_CONCURRENCY: usize = 4;

/// A worker: one identity, one command inbox.
#[derive(Clone)]
pub struct Worker {
    info: WorkerInfo,
    transport: Arc<dyn Transport>,
    blobs: Arc<dyn BlobStore>,
    done: Arc<Mutex<HashMap<String, Report>>>,
    concurrency: usize,
    /// TorchScript model files by sha256, fetched once.
    archives: Arc<Mutex<HashMap<String, Arc<flame_torchscript::Archive>>>>,
    /// Where it may read datasets.
    roots: DataRoots,
    /// Where the spans of the commands it runs go (OTLP), if anywhere.
    otlp: Option<flame_transport::otlp::Exporter>,
    /// The bound on commands at once this worker shares with the others of its process, if any.
    shared: Option<Arc<tokio::sync::Semaphore>>,
    /// The bytes of updates an aggregator holds in memory for a rule that needs
    /// them all at once, and the folder it writes them to above that.
    in_memory: (u64, std::path::PathBuf),
}

impl Worker {
    /// A worker with this identity, transport and blob store.
    pub fn new(info: WorkerInfo, transport: Arc<dyn Transport>, blobs: Arc<dyn BlobStore>) -> Self {
        Self {
            info,
            transport,
            blobs,
            done: Arc::default(),
            concurrency: DEFAULT_CONCURRENCY,
            archives: Arc::default(),
            roots: DataRoots::anywhere(),
            otlp: None,
            shared: None,
            in_memory: (crate::spill::DEFAULT_IN_MEMORY, std::env::temp_dir().join(crate::spill::FOLDER)),
        }
    }

    /// An aggregator whose rule needs every update at once (median, trimmed
    /// mean, Krum) holds them in memory up to `bytes` in all, and above that
    /// writes them to files in a new folder under `dir`, read back a block at
    /// a time (removed once the aggregate is made).
    pub fn with_updates_in_memory(mut self, bytes: u64, dir: std::path::PathBuf) -> Self {
        self.in_memory = (bytes, dir);
        self
    }

    /// Exports a span for each command it runs to this OTLP receiver, as a
    /// child of the engine's span the command's `traceparent` names.
    pub fn with_otlp(mut self, exporter: flame_transport::otlp::Exporter) -> Self {
        self.otlp = Some(exporter);
        self
    }

    /// Reads datasets only under these roots (the binaries always give some).
    pub fn with_data_roots(mut self, roots: DataRoots) -> Self {
        self.roots = roots;
        self
    }

    /// The URL to read for a job's dataset URL, inside this worker's data roots.
    fn dataset(&self, url: &str) -> anyhow::Result<String> {
        Ok(self.roots.resolve(url)?)
    }

    /// Runs at most `n` commands at once (at least 1). Each is acked only
    /// after its report is sent, so a crash redelivers every one in flight.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Registers, then runs commands until `shutdown` resolves or the inbox closes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let inbox = self.open().await?;
        let heartbeat = {
            let worker = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    // Its only registration: tried until it lands.
                    worker.heartbeat(Duration::MAX).await;
                }
            })
        };
        let result = self.serve(inbox, shutdown).await;
        heartbeat.abort();
        result
    }

    /// This worker's identity.
    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// Another identity with this worker's settings, transport and blob
    /// store, and a memory of finished commands of its own (a virtual worker).
    pub fn with_id(&self, id: String) -> Self {
        let mut w = self.clone();
        w.info.id = id;
        w.done = Arc::default();
        w
    }

    /// The same worker in `group` (registered so: the group reads its
    /// commands and publishes its reports), reporting through `transport`.
    pub fn in_group(mut self, group: String, transport: Arc<dyn Transport>) -> Self {
        self.info.group = Some(group);
        self.transport = transport;
        self
    }

    /// Shares a bound on the commands running at once with other workers of
    /// this process (virtual workers): a command waits for a permit before
    /// it runs, on top of this worker's own concurrency.
    pub fn with_shared_limit(mut self, limit: Arc<tokio::sync::Semaphore>) -> Self {
        self.shared = Some(limit);
        self
    }

    /// Registers and opens the command inbox: the worker is then listed and
    /// its commands wait for it, ready for [`Worker::serve`]. A caller that
    /// serves without [`Worker::run`] renews the registration with
    /// [`Worker::heartbeat`] every [`HEARTBEAT`].
    pub async fn open(&self) -> anyhow::Result<flame_transport::Inbox<Command>> {
        // Not while another live process is this worker: both would take its commands.
        self.transport.claim_ids(std::slice::from_ref(&self.info.id)).await.with_context(|| format!("starting worker {}", self.info.id))?;
        self.register().await?;
        self.transport.command_inbox(&self.info.id).await.with_context(|| format!("opening the command inbox of worker {}", self.info.id))
    }

    /// Registers this worker (listed as live until its registration expires).
    pub async fn register(&self) -> anyhow::Result<()> {
        flame_transport::check_id(&self.info.id)?;
        self.transport.register(&self.info).await.with_context(|| format!("registering worker {}", self.info.id))
    }

    /// The transport it takes commands and sends reports through.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Renews the registration: each try bounded by [`HEARTBEAT`], tried
    /// again every [`HEARTBEAT_RETRY`] until one lands or `within` has passed
    /// (the first failure is logged, and the renewal once it lands). Whether
    /// it landed.
    pub async fn heartbeat(&self, within: Duration) -> bool {
        let start = tokio::time::Instant::now();
        let mut failed = 0;
        loop {
            let e = match tokio::time::timeout(HEARTBEAT, self.register()).await {
                Ok(Ok(())) => {
                    if failed > 0 {
                        tracing::info!(worker = %self.info.id, "heartbeat renewed after {failed} failed tries");
                    }
                    return true;
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer in {} s", HEARTBEAT.as_secs()),
            };
            if failed == 0 {
                tracing::warn!(worker = %self.info.id, "heartbeat failed, trying again every {} ms: {e}", HEARTBEAT_RETRY.as_millis());
            } else {
                tracing::debug!(worker = %self.info.id, "heartbeat failed again: {e}");
            }
            failed += 1;
            if start.elapsed() + HEARTBEAT_RETRY >= within {
                return false;
            }
            tokio::time::sleep(HEARTBEAT_RETRY).await;
        }
    }

    /// Runs the commands of an opened inbox until `shutdown` resolves or the inbox closes.
    pub async fn serve(
        self,
        mut inbox: flame_transport::Inbox<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        if self.shared.is_none() {
            tracing::info!(worker = %self.info.id, roles = ?self.info.roles, kernels = crate::kernels::Kernels::current().name(), "worker ready");
        }
        tokio::pin!(shutdown);
        let mut running: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
        let finished = |done: Option<Result<anyhow::Result<()>, tokio::task::JoinError>>| match done {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow!(e).context("a command task panicked")),
        };
        let result = loop {
            // At the bound, the next command waits for one in flight to finish.
            if running.len() >= self.concurrency {
                match finished(running.join_next().await) {
                    Ok(()) => continue,
                    Err(e) => break Err(e),
                }
            }
            let next = tokio::select! {
                () = &mut shutdown => break Ok(()),
                done = running.join_next(), if !running.is_empty() => match finished(done) {
                    Ok(()) => continue,
                    Err(e) => break Err(e),
                },
                next = inbox.next() => next,
            };
            match next {
                None => break Ok(()),
                Some(Err(e @ flame_transport::Error::BadMessage { .. })) => {
                    tracing::warn!(worker = %self.info.id, "dropping a message that is not a command: {e}")
                }
                // The pull is renewed; a command not taken yet stays on the server.
                Some(Err(e)) => tracing::warn!(worker = %self.info.id, "reading commands: {e} (nothing is lost; reading on)"),
                Some(Ok(delivery)) => {
                    let worker = self.clone();
                    running.spawn(async move {
                        let sent = {
                            let done = async {
                                // Virtual workers share the process's bound; the permit is held until the report is out.
                                let _permit = match &worker.shared {
                                    Some(limit) => Some(limit.clone().acquire_owned().await?),
                                    None => None,
                                };
                                let report = worker.execute(&delivery.message).await;
                                worker.send_report(&report).await
                            };
                            tokio::pin!(done);
                            // While it runs, the server hears every few seconds that it is still running,
                            // so that only a worker that died gets its commands again.
                            let mut working = tokio::time::interval_at(
                                tokio::time::Instant::now() + flame_transport::COMMAND_PROGRESS,
                                flame_transport::COMMAND_PROGRESS,
                            );
                            let progress = delivery.progress_handle();
                            loop {
                                tokio::select! {
                                    sent = &mut done => break sent,
                                    _ = working.tick() => {
                                        if let Some(p) = &progress
                                        && let Err(e) = p().await
                                    {
                                            tracing::debug!(worker = %worker.info.id, "telling the server a command still runs: {e}");
                                        }
                                    }
                                }
                            }
                        };
                        // Not acked on failure: the command is redelivered and answered from memory.
                        sent?;
                        if let Err(e) = delivery.ack().await {
                            tracing::warn!(worker = %worker.info.id, "ack failed (the command may be redelivered): {e}");
                        }
                        Ok(())
                    });
                }
            }
        };
        // A graceful stop lets the commands in flight report; a failure abandons them (they are redelivered).
        if result.is_ok() {
            while let Some(done) = running.join_next().await {
                if let Err(e) = finished(Some(done)) {
                    tracing::warn!(worker = %self.info.id, "a command in flight failed at shutdown: {e:#}");
                }
            }
        }
        running.abort_all();
        result
    }

    /// Publishes a report, trying again with backoff for [`REPORT_RETRY_FOR`].
    async fn send_report(&self, report: &Report) -> anyhow::Result<()> {
        let what = format!("worker {}: report for {}", self.info.id, report.command_id);
        flame_transport::retrying(&what, REPORT_RETRY_FOR, |_| true, || self.transport.send_report(report))
            .await
            .map_err(|e| anyhow!(e).context("sending a report"))
    }

    /// Runs one command (once per command id) and returns the report.
    pub async fn execute(&self, command: &Command) -> Report {
        if let Some(report) = self.remembered(&command.id) {
            return report;
        }
        let started = std::time::Instant::now();
        let started_ns = flame_transport::otlp::now_ns();
        let body = match self.run_command(command).await {
            Ok(body) => body,
            Err(e) => ReportBody::Failed { error: format!("{e:#}") },
        };
        self.export_span(command, &body, started_ns);
        tracing::info!(worker = %self.info.id, command = %command.id, ms = started.elapsed().as_millis() as u64, failed = matches!(body, ReportBody::Failed { .. }), "command done");
        crate::metrics::get().ran(command.body.kind(), !matches!(body, ReportBody::Failed { .. }), started.elapsed());
        let report = Report::answering(command, &self.info.id, body);
        let mut done = self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if done.len() >= REMEMBERED {
            done.clear();
        }
        done.insert(command.id.clone(), report.clone());
        report
    }

    /// Sends the span of a command it ran, in the background (a receiver
    /// that is away costs the span, never the command).
    fn export_span(&self, command: &Command, body: &ReportBody, started_ns: u64) {
        use flame_transport::otlp::{Attr, Kind, SpanData, parse_traceparent, random_span_id};
        let (Some(exporter), Some((trace_id, parent))) = (&self.otlp, command.traceparent.as_deref().and_then(parse_traceparent)) else {
            return;
        };
        let mut attributes = vec![
            ("flame.worker".to_string(), Attr::Str(self.info.id.clone())),
            ("flame.job_id".to_string(), Attr::Str(command.job_id.clone())),
            ("flame.task_id".to_string(), Attr::Str(command.task_id.clone())),
            ("flame.round".to_string(), Attr::Int(i64::from(command.round))),
            ("flame.command_id".to_string(), Attr::Str(command.id.clone())),
        ];
        if let ReportBody::Trained { samples, .. } = body {
            attributes.push(("flame.samples".to_string(), Attr::Int(*samples as i64)));
        }
        let span = SpanData {
            trace_id,
            span_id: random_span_id(),
            parent: Some(parent),
            name: format!("{} {}", command.body.kind(), command.task_id),
            kind: Kind::Server,
            start_ns: started_ns,
            end_ns: flame_transport::otlp::now_ns(),
            attributes,
            error: match body {
                ReportBody::Failed { error } => Some(error.clone()),
                _ => None,
            },
        };
        let exporter = exporter.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = exporter.export(&[span]) {
                tracing::warn!("{e}");
            }
        });
    }

    fn remembered(&self, id: &str) -> Option<Report> {
        self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).cloned()
    }

    async fn fetch(&self, digest: &str) -> anyhow::Result<Weights> {
        let bytes = self.blobs.get(digest).await.with_context(|| format!("fetching model {digest}"))?;
        crate::metrics::get().read(bytes.len());
        weights::decode(&bytes).with_context(|| format!("reading model {digest}"))
    }

    async fn store(&self, w: &Weights) -> anyhow::Result<String> {
        let bytes = weights::encode(w)?;
        crate::metrics::get().wrote(bytes.len());
        Ok(self.blobs.put(bytes).await?)
    }

    /// A model's whole state (parameters, buffers, counters).
    async fn fetch_state(&self, digest: &str) -> anyhow::Result<State> {
        let bytes = self.blobs.get(digest).await.with_context(|| format!("fetching model {digest}"))?;
        crate::metrics::get().read(bytes.len());
        weights::decode_state(&bytes).with_context(|| format!("reading model {digest}"))
    }

    /// An update's parameters as `take` says (decoded, left in its bytes or
    /// left in a file, the last two for a fold that reads them once), and the
    /// rest of its state.
    async fn fetch_update(&self, digest: &str, take: Take) -> anyhow::Result<(Params, State)> {
        match take {
            Take::Decoded => {
                let mut state = self.fetch_state(digest).await?;
                Ok((Params::Decoded(std::mem::take(&mut state.params)), state))
            }
            Take::Packed => {
                let bytes = self.blobs.get(digest).await.with_context(|| format!("fetching model {digest}"))?;
                crate::metrics::get().read(bytes.len());
                let mut packed = weights::decode_packed(bytes).with_context(|| format!("reading model {digest}"))?;
                let rest = std::mem::take(&mut packed.rest);
                Ok((Params::Packed(packed), rest))
            }
            Take::File => {
                let file = self.blobs.get_file(digest, &self.in_memory.1).await.with_context(|| format!("fetching model {digest}"))?;
                crate::metrics::get().read(file.len() as usize);
                let (mut packed, file) = tokio::task::spawn_blocking(move || weights::PackedFile::open(file.path()).map(|p| (p, file)))
                    .await?
                    .with_context(|| format!("reading model {digest}"))?;
                let rest = std::mem::take(&mut packed.rest);
                Ok((Params::File { packed, file }, rest))
            }
        }
    }

    async fn store_state(&self, s: &State) -> anyhow::Result<String> {
        let bytes = weights::encode_state(s)?;
        crate::metrics::get().wrote(bytes.len());
        Ok(self.blobs.put(bytes).await?)
    }

    /// The user's TorchScript model file a model names, fetched once by its sha256.
    async fn archive(&self, model: &Model) -> anyhow::Result<Option<Arc<flame_torchscript::Archive>>> {
        let Model::TorchScript { file, sha256, .. } = model else { return Ok(None) };
        if let Some(a) = self.archives.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(sha256) {
            return Ok(Some(a.clone()));
        }
        let bytes = self.blobs.get(sha256).await.with_context(|| format!("fetching the model file {file} ({sha256})"))?;
        let archive = Arc::new(flame_torchscript::Archive::read(bytes).with_context(|| format!("the model file {file}"))?);
        self.archives.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(sha256.clone(), archive.clone());
        Ok(Some(archive))
    }

    async fn run_command(&self, command: &Command) -> anyhow::Result<ReportBody> {
        if command.v != protocol::VERSION {
            bail!("protocol version {} is not supported (this worker speaks {})", command.v, protocol::VERSION);
        }
        match &command.body {
            CommandBody::Deploy { role, dataset } => {
                if !protocol::offers(&self.info.roles, role, dataset.is_some()) {
                    bail!("this worker offers roles {:?}, not '{role}'", self.info.roles);
                }
                let mut samples = None;
                if let Some(url) = dataset.as_deref() {
                    let url = self.dataset(url)?;
                    let d = tokio::task::spawn_blocking(move || data::load(&url)).await?.with_context(|| format!("dataset {dataset:?}"))?;
                    if d.train.is_empty() {
                        bail!("dataset {dataset:?} has no training samples");
                    }
                    samples = Some(d.train.len() as u64);
                }
                Ok(ReportBody::Deployed { samples })
            }
            #[cfg_attr(not(feature = "tch"), allow(unused_variables))]
            CommandBody::InitModel { model, dataset, seed, loss } => {
                let cfg = ModelConfig::new(model)?;
                if let Model::External { file, sha256 } = model {
                    // The workers' own code defines it: the initial weights are the job's file, checked.
                    let bytes = self.blobs.get(sha256).await.with_context(|| format!("fetching the initial weights {file} ({sha256})"))?;
                    let state = weights::decode_state(&bytes).with_context(|| format!("the initial weights {file}"))?;
                    return Ok(ReportBody::Initialized { digest: self.store_state(&state).await? });
                }
                let url = self.dataset(dataset)?;
                let d = tokio::task::spawn_blocking(move || data::load(&url)).await??;
                if let Some(archive) = self.archive(model).await? {
                    // The user's module starts from the weights its file holds.
                    let state = crate::archive::state_of(&archive)?;
                    #[cfg(feature = "tch")]
                    {
                        let (state, model, loss) = (state.clone(), model.clone(), *loss);
                        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                            let mut net = crate::script::ScriptNet::new(archive, &state, model.input_shape(), loss)?;
                            net.check(&d.train).context("the model on this task's data")
                        })
                        .await??;
                    }
                    return Ok(ReportBody::Initialized { digest: self.store_state(&state).await? });
                }
                if cfg.is_cnn() {
                    cfg.image_side(d.train.features)?;
                }
                let digest = self.store(&cfg.init(d.train.features, d.classes, *seed)).await?;
                Ok(ReportBody::Initialized { digest })
            }
            #[cfg(not(feature = "tch"))]
            CommandBody::Train { .. } => {
                bail!("worker '{}' was built without the training backend (feature `tch`): it aggregates but cannot train", self.info.id)
            }
            #[cfg(feature = "tch")]
            CommandBody::Train { model, global_model, dataset, training, objective, seed, client_state, server_state } => {
                refuse_external(model, "train")?;
                let cfg = ModelConfig::new(model)?;
                let settings = TrainSettings::new(training, objective);
                let objective = *objective;
                let archive = self.archive(model).await?;
                let global_state = self.fetch_state(global_model).await?;
                let client = match client_state {
                    Some(d) => Some(self.fetch(d).await.context("this task's state from its last update")?),
                    None => None,
                };
                let server = match server_state {
                    Some(d) => Some(self.fetch(d).await.context("the server's state")?),
                    None => None,
                };
                let (url, seed) = (self.dataset(dataset)?, *seed);
                let model = model.clone();
                // The global model is held through training only where something after it needs
                // it (SCAFFOLD's and FedDyn's client steps, differential privacy): the worker
                // holds a large model about twice (the net's weights and their gradients).
                let keeps_global =
                    training.privacy.is_some() || !matches!(objective, ClientObjective::Plain | ClientObjective::Proximal { .. });
                let (trained, samples, metrics, state, global) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let d = data::load(&url)?;
                    let local_buffers = matches!(model, Model::TorchScript { local_buffers: true, .. });
                    let (mut net, global): (Box<dyn crate::model::Trainer>, _) = match archive {
                        Some(archive) => {
                            let global = keeps_global.then(|| global_state.params.clone());
                            let start = own_buffers(&model, global_state, client.as_ref())?;
                            (Box::new(crate::script::ScriptNet::new(archive, &start, model.input_shape(), settings.loss)?), global)
                        }
                        None => (crate::model::trainer(&cfg, &global_state.params)?, keeps_global.then_some(global_state.params)),
                    };
                    let (correction, before) = match (objective, &global) {
                        (ClientObjective::Scaffold, Some(global)) => {
                            let (c, ci) = (control::part(server.as_ref(), "c", global)?, control::part(client.as_ref(), "c", global)?);
                            (Some(control::combine(&[(1.0, &c), (-1.0, &ci)])?), Some((c, ci)))
                        }
                        (ClientObjective::FedDyn { .. }, Some(global)) => {
                            let g = control::part(client.as_ref(), "g", global)?;
                            (Some(control::combine(&[(-1.0, &g)])?), Some((g.clone(), g)))
                        }
                        _ => (None, None),
                    };
                    let started = std::time::Instant::now();
                    let mut metrics = net.train(&d.train, &settings, seed, correction.as_ref())?;
                    drop(correction);
                    // Oort weighs trainers by speed as well as usefulness.
                    metrics.insert("train_seconds".into(), started.elapsed().as_secs_f64());
                    if let Some(acc) = net.evaluate(&d.train).get("accuracy") {
                        metrics.insert("train_accuracy".into(), *acc);
                    }
                    let trained = net.state()?;
                    drop(net);
                    let mut parts: Vec<(&str, Weights)> = match (objective, before, &global) {
                        (ClientObjective::Scaffold, Some((c, ci)), Some(global)) => {
                            let steps = Net::steps(d.train.len(), &settings);
                            let (next, change) = control::scaffold_client(&ci, &c, global, &trained.params, steps, settings.learning_rate)?;
                            vec![("c", next), ("dc", change)]
                        }
                        (ClientObjective::FedDyn { alpha }, Some((g, _)), Some(global)) => {
                            vec![("g", control::feddyn_client(&g, global, &trained.params, alpha)?)]
                        }
                        _ => Vec::new(),
                    };
                    if local_buffers && !trained.buffers.is_empty() {
                        parts.push(("buffers", trained.buffers.clone()));
                    }
                    let state = (!parts.is_empty()).then(|| control::pack(&parts.iter().map(|(p, w)| (*p, w)).collect::<Vec<_>>()));
                    Ok((trained, d.train.len() as u64, metrics, state, global))
                })
                .await??;
                // Differential privacy clips and noises the parameters' update; buffers are statistics and travel as they are.
                let mut trained = trained;
                let metrics = match (training.privacy, global) {
                    (Some(privacy), Some(global)) => {
                        let (params, metrics) = privatize(privacy, &global, std::mem::take(&mut trained.params), metrics, seed)?;
                        trained.params = params;
                        metrics
                    }
                    _ => metrics,
                };
                let digest = self.store_state(&trained).await?;
                drop(trained);
                let state = match state {
                    Some(s) => Some(self.store(&s).await?),
                    None => None,
                };
                Ok(ReportBody::Trained { digest, samples, metrics, state })
            }
            CommandBody::Evaluate { model, global_model, dataset, loss, client_state } => {
                refuse_external(model, "evaluate")?;
                let cfg = ModelConfig::new(model)?;
                let archive = self.archive(model).await?;
                let own = match client_state {
                    Some(d) => Some(self.fetch(d).await.context("this task's state from its last update")?),
                    None => None,
                };
                // The trainer evaluates with its own buffers where it trains with them.
                let state = own_buffers(model, self.fetch_state(global_model).await?, own.as_ref())?;
                let (url, loss, model) = (self.dataset(dataset)?, *loss, model.clone());
                let metrics = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let test = data::load(&url)?.test;
                    if test.is_empty() {
                        bail!("dataset {url} holds no test rows to evaluate on");
                    }
                    match archive {
                        Some(archive) => evaluate_script(archive, &state, &model, loss, &test),
                        None => Ok(crate::model::evaluate(&cfg, &state.params, &test)?),
                    }
                })
                .await??;
                if metrics.is_empty() {
                    bail!("this worker cannot evaluate a TorchScript model (built without libtorch)");
                }
                Ok(ReportBody::Evaluated { metrics })
            }
            CommandBody::Unreadable { reason } => bail!("{reason}"),
            CommandBody::Coordinate { candidates, samples } => {
                Ok(ReportBody::Coordinated { pairing: crate::coordinate::pair(candidates, samples, command.round) })
            }
            CommandBody::Aggregate { model, optimizer, trainers, optimizer_state, global_model, updates, eval_dataset, loss } => {
                let cfg = ModelConfig::new(model)?;
                let archive = self.archive(model).await?;
                let mut global_state = self.fetch_state(global_model).await?;
                let model_bytes = weights::state_bytes(&global_state);
                // A rule that does not step from the global model reads only its layout: its values
                // are let go here, not held beside the aggregate being made.
                if !aggregate::steps_from_global(optimizer) {
                    global_state.params = layout_of(std::mem::take(&mut global_state.params));
                }
                // An unusable update (missing, bytes not matching the digest, not finite f32
                // safetensors, other tensors than the global model's) is left out and named.
                let mut excluded = Vec::new();
                // FedBuff: the model each update trained from, once per distinct digest.
                let mut base_models: BTreeMap<String, Weights> = BTreeMap::new();
                // SCAFFOLD / FedDyn: each trainer's state after its update, folded with it.
                // (FedDyn's trainers keep a state too, but its server step reads only the updates.)
                let stateful = aggregate::reads_client_states(optimizer);
                let buffered = optimizer.is_asynchronous();
                // Buffers and counters of the usable updates, with their samples.
                let mut buffers: Vec<(State, u64)> = Vec::new();
                // FedAvg and the optimizers that need only the mean fold each update in as it
                // arrives: memory for the mean, not for every update. An update left out changes
                // every weight, so the fold then starts over with the usable ones.
                let needs = aggregate::needs(optimizer);
                let fetch_state = || async {
                    match optimizer_state {
                        Some(d) => Ok::<_, anyhow::Error>(Some(self.fetch(d).await.context("optimizer state")?)),
                        None => Ok(None),
                    }
                };
                let mut state = fetch_state().await?;
                let folds_of = |us: &[&protocol::UpdateRef], state: Option<&Weights>| {
                    let weights: Vec<(u64, u32)> = us.iter().map(|u| (u.samples, u.staleness)).collect();
                    Folds::new(needs, optimizer, *trainers as usize, &global_state.params, state, &weights)
                };
                let mut folds = folds_of(&updates.iter().collect::<Vec<_>>(), state.as_ref())?;
                // SCAFFOLD's and FedDyn's state went into their fold's sum: it is let go (a model's
                // worth), and fetched again only for a round that must fold again.
                if needs == Needs::MeanAndStates {
                    state = None;
                }
                // The robust rules need every update at once, a block of each at a time: in
                // memory while they fit the worker's budget, on disk above it.
                let mut held = match needs {
                    Needs::Blocks => {
                        let (budget, dir) = &self.in_memory;
                        let held = Held::new(&global_state.params, model_bytes, updates.len(), *budget, dir)?;
                        if let Some(dir) = held.on_disk() {
                            tracing::info!(worker = %self.info.id, updates = updates.len(), folder = %dir.display(), "{} needs every update at once: they go to disk (over --updates-in-memory-mb)", optimizer.name());
                        }
                        Some(held)
                    }
                    _ => None,
                };
                let mut usable: Vec<&protocol::UpdateRef> = Vec::new();
                // Updates are read ahead, in order, as many at a time as fit in READ_AHEAD_BYTES:
                // a thousand small updates cost a thousand round trips to the store otherwise.
                let ahead = read_ahead(model_bytes);
                // (The reads are made before the stream: a closure over borrowed updates in a
                // stream is not `Send` for every lifetime, which the spawned command needs.)
                // A fold reads each update's parameters once: it takes them from the blob's bytes,
                // or, where the updates read ahead would be more than the worker holds in memory,
                // from the file the store writes as the blob arrives, a block at a time.
                let take = match needs {
                    // SCAFFOLD's trainers' states (two models' worth each) are read as their updates are.
                    Needs::Mean | Needs::MeanAndStates if (ahead * model_bytes) as u64 > self.in_memory.0 => Take::File,
                    Needs::Mean | Needs::MeanAndStates => Take::Packed,
                    // On disk, the robust rules read each update from the file the store writes.
                    Needs::Blocks if held.as_ref().is_some_and(|h| h.on_disk().is_some()) => Take::File,
                    _ => Take::Decoded,
                };
                if take == Take::File && needs != Needs::Blocks {
                    tracing::info!(worker = %self.info.id, updates = updates.len(), folder = %self.in_memory.1.display(), "each update is folded from a file (over --updates-in-memory-mb)");
                }
                let reads: Vec<_> = updates.iter().map(|u| async move { (u, self.fetch_update(&u.digest, take).await) }).collect();
                let mut fetched = futures::stream::iter(reads).buffered(ahead);
                while let Some((u, update)) = fetched.next().await {
                    let base = u.base_model.clone().unwrap_or_else(|| global_model.clone());
                    let checked = update.and_then(|(w, rest)| Ok(w.check_same_state(&global_state, &rest).map(|()| (w, rest))?));
                    let (checked, rest) = match checked {
                        Ok((w, rest)) => (Ok(w), Some(rest)),
                        Err(e) => (Err(e), None),
                    };
                    let checked = match checked {
                        Ok(w) if buffered && !base_models.contains_key(&base) => match self.fetch_state(&base).await {
                            Ok(b) => weights::check_same_layout(&global_state.params, &b.params)
                                .map(|()| (w, Some(b.params)))
                                .map_err(|e| anyhow!("its base model: {e}")),
                            Err(e) => Err(e.context("its base model")),
                        },
                        Ok(w) => Ok((w, None)),
                        Err(e) => Err(e),
                    };
                    let checked = match (checked, stateful.then_some(&u.client_state)) {
                        (Ok(ok), Some(Some(d))) => match self.fetch_update(d, take).await {
                            Ok((s, _)) => Ok((ok, Some(s))),
                            Err(e) => Err(e.context("its client state")),
                        },
                        (Ok(_), Some(None)) => {
                            Err(anyhow!("{} needs the trainer's state with its update, and it sent none", optimizer.name()))
                        }
                        (Ok(ok), None) => Ok((ok, None)),
                        (Err(e), _) => Err(e),
                    };
                    match checked {
                        Ok(((w, b), s)) => {
                            if let Some(b) = b {
                                base_models.insert(base.clone(), b);
                            }
                            buffers.extend(rest.map(|r| (r, u.samples)));
                            match held.take() {
                                // Writing to disk blocks: off the runtime's threads.
                                Some(mut h) => {
                                    held = Some(
                                        tokio::task::spawn_blocking(move || w.hold_in(&mut h).map(|()| h))
                                            .await?
                                            .with_context(|| format!("holding update {} of task {}", u.digest, u.task_id))?,
                                    );
                                }
                                // Once one was left out, the folds start over after the last update.
                                None if excluded.is_empty() => folds.add(&w, s.as_ref(), base_models.get(&base))?,
                                None => {}
                            }
                            usable.push(u);
                        }
                        Err(e) => {
                            tracing::warn!(worker = %self.info.id, task = %u.task_id, digest = %u.digest, "update left out: {e:#}");
                            excluded.push(Excluded { task_id: u.task_id.clone(), digest: u.digest.clone(), reason: format!("{e:#}") });
                        }
                    }
                }
                if usable.is_empty() {
                    bail!("no usable update among {}: {:?}", updates.len(), excluded.iter().map(|x| &x.reason).collect::<Vec<_>>());
                }
                if !excluded.is_empty() && folds.any() {
                    // Some were left out: fold the usable ones again, with their own weights.
                    // A state let go above is fetched again for this fold only.
                    let again = if state.is_none() { fetch_state().await? } else { None };
                    folds = folds_of(&usable, state.as_ref().or(again.as_ref()))?;
                    for u in &usable {
                        let (w, _) = self.fetch_update(&u.digest, take).await.with_context(|| format!("update {} again", u.digest))?;
                        let s = match (stateful, &u.client_state) {
                            (true, Some(d)) => {
                                Some(self.fetch_update(d, take).await.with_context(|| format!("the client state {d} again"))?.0)
                            }
                            _ => None,
                        };
                        folds.add(&w, s.as_ref(), base_models.get(u.base_model.as_ref().unwrap_or(global_model)))?;
                    }
                }
                let Folds { mean, states: state_fold, buffered: buffered_fold } = folds;
                let average = mean.map(crate::fedavg::Running::finish).transpose()?;
                // An evaluation set this worker may not read: no central evaluation (the trainers' federated one stands).
                let eval = eval_dataset.as_deref().and_then(|url| match self.dataset(url) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        tracing::warn!(worker = %self.info.id, "no central evaluation: {e:#}");
                        None
                    }
                });
                // The global model's parameters move into the step: no copy of them is kept.
                let global = std::mem::take(&mut global_state.params);
                let (optimizer, loss, model) = (*optimizer, *loss, model.clone());
                let weighted: Vec<(&State, u64)> = buffers.iter().map(|(s, n)| (s, *n)).collect();
                let (merged_buffers, merged_counters) = weights::merge_buffers(&weighted)?;
                let (new_global, new_state, metrics) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let (next, state) = match optimizer {
                        ServerOptimizer::Scaffold { .. } | ServerOptimizer::FedDyn { .. } => {
                            let (Some(fold), Some(average)) = (state_fold, average) else {
                                bail!("{} folds the updates with their trainers' states", optimizer.name())
                            };
                            let (next, state) = fold.finish(&global, &average)?;
                            (next, Some(state))
                        }
                        ServerOptimizer::FedBuff { .. } => {
                            let Some(fold) = buffered_fold else { bail!("FedBuff folds each update with its base model") };
                            (fold.finish()?, None)
                        }
                        _ => match (average, held) {
                            (Some(average), _) => aggregate::averaged(&optimizer, &global, average, state.as_ref())?,
                            (None, Some(held)) => (held.read(|u| aggregate::robust(&optimizer, u))?, None),
                            (None, None) => bail!("{} took none of the updates", optimizer.name()),
                        },
                    };
                    let next = State { params: next, buffers: merged_buffers, counters: merged_counters };
                    let metrics = match (eval, archive) {
                        // Only the trainers' code can run an external model: their federated evaluation reports instead.
                        (Some(_), None) if model.is_external() => Default::default(),
                        (Some(url), None) => crate::model::evaluate(&cfg, &next.params, &data::load(&url)?.test)?,
                        (Some(url), Some(archive)) => evaluate_script(archive, &next, &model, loss, &data::load(&url)?.test)?,
                        (None, _) => Default::default(),
                    };
                    Ok((next, state, metrics))
                })
                .await??;
                let digest = self.store_state(&new_global).await?;
                let optimizer_state = match new_state {
                    Some(s) => Some(self.store(&s).await?),
                    None => None,
                };
                Ok(ReportBody::Aggregated { digest, metrics, optimizer_state, excluded })
            }
        }
    }
}

/// The same tensors with their shapes and no values: what checks of a
/// layout read (for nothing else: every tensor is empty).
fn layout_of(mut model: Weights) -> Weights {
    for t in model.values_mut() {
        t.data = Vec::new();
    }
    model
}

/// An update's parameters as an aggregator holds them until they go into the aggregate.
enum Params {
    /// Decoded.
    Decoded(Weights),
    /// Left in the blob's bytes (checked), for a fold.
    Packed(weights::Packed),
    /// Left in a file the store wrote (checked), for a fold or a rule that reads it where it
    /// is; the file is removed with it.
    File { packed: weights::PackedFile, file: crate::blob::BlobFile },
}

impl Params {
    /// Checks that the update (these parameters and `rest`) has the tensors and shapes of `reference`.
    fn check_same_state(&self, reference: &State, rest: &State) -> Result<(), weights::Error> {
        match self {
            Self::Decoded(w) => weights::check_same_layout(&reference.params, w)?,
            Self::Packed(p) => p.check_same_layout(&reference.params)?,
            Self::File { packed, .. } => packed.check_same_layout(&reference.params)?,
        }
        weights::check_same_state(&reference.with_params(Weights::new()), rest)
    }

    /// The parameters, where they are decoded (a fold beside the mean reads them so).
    fn decoded(&self) -> Result<&Weights, weights::Error> {
        match self {
            Self::Decoded(w) => Ok(w),
            _ => Err(weights::Error::Mismatch("the update's parameters were not decoded".into())),
        }
    }

    /// Held for a rule that needs every update at once: a file stays where it is.
    fn hold_in(self, held: &mut Held) -> Result<(), weights::Error> {
        match self {
            Self::File { packed, file } => held.push_file(packed, file),
            other => held.push(other.into_weights()?),
        }
    }

    /// The parameters as a fold reads them, a block at a time where they are held.
    fn blocks(&self) -> &dyn weights::Blocks {
        match self {
            Self::Decoded(w) => w,
            Self::Packed(p) => p,
            Self::File { packed, .. } => packed,
        }
    }

    fn into_weights(self) -> Result<Weights, weights::Error> {
        match self {
            Self::Decoded(w) => Ok(w),
            Self::Packed(p) => Ok(p.params()),
            Self::File { packed, .. } => packed.params(),
        }
    }
}

/// What an aggregator folds a round's updates into as they arrive: their
/// mean (FedAvg and the optimizers that step from it), SCAFFOLD's and
/// FedDyn's second sum, FedBuff's step. Each is made for a given list of
/// updates (their weights depend on all of them): a round that leaves one
/// out makes them again for the usable ones.
struct Folds {
    mean: Option<crate::fedavg::Running>,
    states: Option<aggregate::StateFold>,
    buffered: Option<crate::fedbuff::Running>,
}

impl Folds {
    /// The folds `needs` asks for, over updates of these (samples, staleness).
    fn new(
        needs: Needs,
        optimizer: &ServerOptimizer,
        trainers: usize,
        global: &Weights,
        state: Option<&Weights>,
        updates: &[(u64, u32)],
    ) -> Result<Self, weights::Error> {
        let samples: Vec<u64> = updates.iter().map(|(n, _)| *n).collect();
        let mean = matches!(needs, Needs::Mean | Needs::MeanAndStates).then(|| crate::fedavg::Running::new(&samples)).transpose()?;
        let states = (needs == Needs::MeanAndStates)
            .then(|| aggregate::StateFold::new(optimizer, trainers, global, state, updates.len()))
            .transpose()?;
        let buffered = match (needs, optimizer) {
            (Needs::Buffered, ServerOptimizer::FedBuff { eta }) => Some(crate::fedbuff::Running::new(global, updates, *eta)?),
            _ => None,
        };
        Ok(Self { mean, states, buffered })
    }

    fn any(&self) -> bool {
        self.mean.is_some() || self.states.is_some() || self.buffered.is_some()
    }

    /// Folds in the next update, with its trainer's state and the model it
    /// trained from where a fold reads them.
    fn add(&mut self, update: &Params, state: Option<&Params>, base: Option<&Weights>) -> Result<(), weights::Error> {
        if let Some(fold) = self.states.as_mut() {
            fold.add(update.blocks(), state.map(Params::blocks))?;
        }
        if let Some(fold) = self.buffered.as_mut() {
            fold.add(update.decoded()?, base.ok_or_else(|| weights::Error::Mismatch("the update's base model was not fetched".into()))?)?;
        }
        if let Some(mean) = self.mean.as_mut() {
            mean.add(update.blocks())?;
        }
        Ok(())
    }
}

/// How an aggregator takes an update's parameters ([`Params`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    Decoded,
    Packed,
    File,
}

/// How many bytes of updates an aggregator may hold read ahead of its fold.
const READ_AHEAD_BYTES: usize = 16 << 20;

/// How many updates of a model of `model_bytes` to read at once: 32 small
/// ones, one at a time (no read ahead) once a model is 16 MiB or more, so the
/// fold's memory stays about two models for large ones.
fn read_ahead(model_bytes: usize) -> usize {
    (READ_AHEAD_BYTES / model_bytes.max(1)).clamp(1, 32)
}

/// A model the workers' own code defines is trained and evaluated by that
/// code (the Python SDK), never by this runtime.
fn refuse_external(model: &Model, what: &str) -> anyhow::Result<()> {
    if model.is_external() {
        bail!(
            "this job's model is defined by its trainers' own code (baseModel 'external'): a Rust worker cannot {what} it; run the trainers with the Python SDK (flame-py-worker --trainer module:Class) and give this worker the aggregator role only"
        );
    }
    Ok(())
}

/// FedBN (`local_buffers`): the state with this trainer's own buffers from
/// its last update (`buffers/<tensor>` in its client state), once it has
/// them; otherwise the state as it is.
fn own_buffers(model: &Model, mut state: State, client: Option<&Weights>) -> anyhow::Result<State> {
    let local = matches!(model, Model::TorchScript { local_buffers: true, .. });
    if local && client.is_some_and(|c| c.keys().any(|k| k.starts_with("buffers/"))) {
        state.buffers = crate::control::part(client, "buffers", &state.buffers)?;
    }
    Ok(state)
}

/// The held-out loss (and accuracy) of a user's model with a new state: on
/// libtorch where this worker has it; without, no central evaluation (the
/// trainers' evaluation reports instead).
#[cfg_attr(not(feature = "tch"), allow(unused_variables))]
fn evaluate_script(
    archive: Arc<flame_torchscript::Archive>,
    state: &State,
    model: &Model,
    loss: flame_events::algorithm::Loss,
    test: &data::Split,
) -> anyhow::Result<flame_events::job::Metrics> {
    #[cfg(feature = "tch")]
    {
        let mut net = crate::script::ScriptNet::new(archive, state, model.input_shape(), loss)?;
        net.evaluate_checked(test).context("evaluating the new global model")
    }
    #[cfg(not(feature = "tch"))]
    Ok(Default::default())
}

/// Differential privacy on a trainer's update when the job asks for it: the
/// update is clipped and noised before it leaves the worker, and what was
/// done is reported in the metrics (`dp_update_norm`, `dp_clip_scale`, `dp_noise_std`).
#[cfg(feature = "tch")]
fn privatize(
    Privacy { clip_threshold, noise_factor }: Privacy,
    global: &Weights,
    trained: Weights,
    mut metrics: flame_events::job::Metrics,
    seed: u64,
) -> anyhow::Result<(Weights, flame_events::job::Metrics)> {
    // The noise seed differs from the shuffling seed but is as reproducible.
    let (private, applied) = crate::privacy::privatize(global, trained, clip_threshold, noise_factor, seed ^ 0x5eed_d1ff_e4e7_1a11)?;
    metrics.insert("dp_update_norm".into(), applied.norm_before);
    metrics.insert("dp_clip_scale".into(), applied.scale);
    metrics.insert("dp_noise_std".into(), applied.sigma);
    Ok((private, metrics))
}

#[cfg(all(test, feature = "tch"))]
mod tests {
    use flame_transport::InProcess;

    use super::*;
    use crate::blob::LocalBlobs;

    /// An aggregator over a blob folder holding a 64-16-10 MLP's global model.
    struct Aggregator {
        _dir: tempfile::TempDir,
        blobs: Arc<LocalBlobs>,
        worker: Worker,
        model: Model,
        cfg: ModelConfig,
        global: Weights,
        global_digest: String,
    }

    async fn aggregator() -> Aggregator {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
        let info =
            WorkerInfo { id: "agg".into(), roles: vec!["aggregator".into()], realm: "default".into(), device: "cpu".into(), group: None };
        let worker = Worker::new(info, Arc::new(InProcess::default()), blobs.clone());
        let model = flame_events::model::Model::Mlp { hidden: vec![16] };
        let cfg = ModelConfig::new(&model).expect("cfg");
        let global = cfg.init(64, 10, 1);
        let global_digest = blobs.put(weights::encode(&global).expect("encode")).await.expect("put");
        Aggregator { _dir: dir, blobs, worker, model, cfg, global, global_digest }
    }

    /// An `aggregate` command of job `j` for round 1 (4 trainers, no central evaluation).
    fn aggregate_command(id: &str, model: &Model, optimizer: ServerOptimizer, global: &str, updates: Vec<protocol::UpdateRef>) -> Command {
        Command {
            v: protocol::VERSION,
            id: id.into(),
            job_id: "j".into(),
            task_id: "a".into(),
            round: 1,
            traceparent: None,
            body: CommandBody::Aggregate {
                model: model.clone(),
                optimizer,
                trainers: 4,
                optimizer_state: None,
                global_model: global.into(),
                updates,
                eval_dataset: None,
                loss: Default::default(),
            },
        }
    }

    fn norm_of_difference(a: &Weights, b: &Weights) -> f64 {
        a.iter().map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>()).sum::<f64>().sqrt()
    }

    /// The aggregator folds FedAvg's updates in one by one (constant memory)
    /// and gets what averaging them all in memory gets, bit for bit: with
    /// every update usable, and when one is left out mid-way and the fold
    /// starts over; and the momentum optimizers step from the same mean.
    #[tokio::test]
    async fn a_streamed_aggregation_equals_the_in_memory_one_bit_for_bit() {
        let Aggregator { _dir, blobs, worker, model, cfg, global, global_digest } = aggregator().await;
        let trained: Vec<(Weights, u64)> = (0..4u64).map(|k| (cfg.init(64, 10, 100 + k), 7 + 13 * k)).collect();
        let mut refs = Vec::new();
        for (k, (w, n)) in trained.iter().enumerate() {
            let d = blobs.put(weights::encode(w).expect("encode")).await.expect("put");
            refs.push(protocol::UpdateRef::new(format!("t{k}"), &d, *n));
        }
        let mut nan = trained[0].0.clone();
        nan.get_mut("fc1.bias").expect("bias").data[0] = f32::NAN;
        let nan = blobs.put(weights::encode(&nan).expect("encode")).await.expect("put");
        let aggregate = |id: &str, optimizer: ServerOptimizer, updates: Vec<protocol::UpdateRef>| {
            aggregate_command(id, &model, optimizer, &global_digest, updates)
        };
        // Over a budget of no memory, the aggregator folds each update from its file a block at a time.
        let spill = tempfile::tempdir().expect("tempdir");
        let from_files = worker.clone().with_updates_in_memory(0, spill.path().join("updates"));
        let run = |c: Command| {
            let (workers, blobs) = ([worker.clone(), from_files.clone()], blobs.clone());
            async move {
                let mut out = Vec::new();
                for (w, c) in workers.iter().zip([c.clone(), Command { id: format!("{}-from-files", c.id), ..c }]) {
                    let ReportBody::Aggregated { digest, excluded, .. } = w.execute(&c).await.body else { panic!("aggregated") };
                    out.push((weights::decode(&blobs.get(&digest).await.expect("get")).expect("decode"), excluded.len()));
                }
                assert_eq!(out[0], out[1], "folded from the bytes and from files");
                out.swap_remove(0)
            }
        };
        let same = |a: &Weights, b: &Weights| {
            a.len() == b.len() && a.iter().all(|(k, t)| t.data.iter().zip(&b[k].data).all(|(x, y)| x.to_bits() == y.to_bits()))
        };

        let (streamed, left_out) = run(aggregate("all", ServerOptimizer::FedAvg, refs.clone())).await;
        assert_eq!(left_out, 0);
        assert!(same(&streamed, &crate::fedavg::fedavg(&trained).expect("fedavg")), "every update usable");

        // A bad update after the first was folded in: the fold starts over with the usable three.
        let mut with_bad = refs.clone();
        with_bad.insert(2, protocol::UpdateRef::new("bad", &nan, 1000));
        let (streamed, left_out) = run(aggregate("one-bad", ServerOptimizer::FedAvg, with_bad)).await;
        assert_eq!(left_out, 1);
        assert!(same(&streamed, &crate::fedavg::fedavg(&trained).expect("fedavg")), "the bad update's samples weigh nothing");

        // And last, after every usable one went in.
        let mut bad_last = refs.clone();
        bad_last.push(protocol::UpdateRef::new("bad", &nan, 1000));
        let (streamed, left_out) = run(aggregate("bad-last", ServerOptimizer::FedAvg, bad_last)).await;
        assert_eq!(left_out, 1);
        assert!(same(&streamed, &crate::fedavg::fedavg(&trained).expect("fedavg")), "the last update left out");

        let momentum = ServerOptimizer::FedAvgM { eta: 1.0, momentum: 0.9 };
        let (streamed, _) = run(aggregate("momentum", momentum, refs.clone())).await;
        let (in_memory, _) = aggregate::combine(&momentum, &global, trained.clone(), None).expect("combine");
        assert!(same(&streamed, &in_memory), "FedAvgM steps from the same mean");
        let left: Vec<_> = std::fs::read_dir(spill.path()).into_iter().flatten().collect();
        assert!(left.is_empty(), "nothing stays on disk: {left:?}");
    }

    /// SCAFFOLD and FedDyn through the aggregator fold each update (and
    /// SCAFFOLD its trainer's state) as it arrives, and get what the server
    /// steps over every update at once get, bit for bit: from the blobs' bytes
    /// and from files a block at a time alike, with every update usable, and
    /// with an update whose trainer's state is not in the store. SCAFFOLD
    /// leaves that one out mid-way and folds again over the usable ones;
    /// FedDyn's step never reads a trainer's state, so the update counts.
    #[tokio::test]
    async fn scaffold_and_feddyn_fold_each_update_with_its_trainers_state_bit_for_bit() {
        let Aggregator { _dir, blobs, worker, model, cfg, global, global_digest } = aggregator().await;
        let trained: Vec<(Weights, u64)> = (0..3u64).map(|k| (cfg.init(64, 10, 300 + k), 4 + 9 * k)).collect();
        let states: Vec<Weights> =
            (0..3u64).map(|k| crate::control::pack(&[("c", &cfg.init(64, 10, 400 + k)), ("dc", &cfg.init(64, 10, 500 + k))])).collect();
        let mut refs = Vec::new();
        for (k, ((w, n), st)) in trained.iter().zip(&states).enumerate() {
            let d = blobs.put(weights::encode(w).expect("encode")).await.expect("put");
            let mut u = protocol::UpdateRef::new(format!("t{k}"), &d, *n);
            u.client_state = Some(blobs.put(weights::encode(st).expect("encode")).await.expect("put"));
            refs.push(u);
        }
        // Its state is not in the store, after the first update went into the folds.
        let mut stateless = refs[0].clone();
        stateless.task_id = "lost".into();
        stateless.client_state = Some("0".repeat(64));
        let mut with_lost = refs.clone();
        with_lost.insert(1, stateless);
        let (mut counted, mut counted_states) = (trained.clone(), states.clone());
        counted.insert(1, trained[0].clone());
        counted_states.insert(1, states[0].clone());
        // Over a budget of no memory, updates and states are read from files a block at a time.
        let spill = tempfile::tempdir().expect("tempdir");
        let from_files = worker.clone().with_updates_in_memory(0, spill.path().join("updates"));
        let bits = |w: &Weights| w.values().flat_map(|t| t.data.iter().map(|v| v.to_bits())).collect::<Vec<_>>();
        let servers = [("c", cfg.init(64, 10, 600)), ("h", cfg.init(64, 10, 601))];
        for optimizer in [ServerOptimizer::Scaffold { eta: 0.5 }, ServerOptimizer::FedDyn { alpha: 0.1 }] {
            let feddyn = matches!(optimizer, ServerOptimizer::FedDyn { .. });
            let lost = if feddyn { (with_lost.clone(), 0, &counted, &counted_states) } else { (with_lost.clone(), 1, &trained, &states) };
            // The first round (no server state yet) and a later one, whose state a round that folds again reads again.
            let (prefix, values) = &servers[usize::from(feddyn)];
            let server = crate::control::pack(&[(prefix, values)]);
            let server_digest = blobs.put(weights::encode(&server).expect("encode")).await.expect("put");
            for (case, (updates, left, used, used_states), kept_state) in [
                ("all", (refs.clone(), 0, &trained, &states), None),
                ("one lost", lost.clone(), None),
                ("all, a server state", (refs.clone(), 0, &trained, &states), Some(&server)),
                ("one lost, a server state", lost, Some(&server)),
            ] {
                let (next, state) = aggregate::with_client_states(&optimizer, 4, &global, used, used_states, kept_state).expect("at once");
                for (how, w) in [("from bytes", &worker), ("from files", &from_files)] {
                    let id = format!("{}-{case}-{how}", optimizer.name());
                    let mut command = aggregate_command(&id, &model, optimizer, &global_digest, updates.clone());
                    if let CommandBody::Aggregate { optimizer_state, .. } = &mut command.body {
                        *optimizer_state = kept_state.map(|_| server_digest.clone());
                    }
                    let ReportBody::Aggregated { digest, excluded, optimizer_state, .. } = w.execute(&command).await.body else {
                        panic!("{id}: aggregated")
                    };
                    assert_eq!(excluded.len(), left, "{id}: {excluded:?}");
                    let folded = weights::decode(&blobs.get(&digest).await.expect("get")).expect("decode");
                    assert_eq!(bits(&folded), bits(&next), "{id}: the next model");
                    let kept = weights::decode(&blobs.get(&optimizer_state.expect("a state")).await.expect("get")).expect("decode");
                    assert_eq!(bits(&kept), bits(&state), "{id}: the server state");
                }
            }
        }
        let left: Vec<_> = std::fs::read_dir(spill.path()).into_iter().flatten().collect();
        assert!(left.is_empty(), "nothing stays on disk: {left:?}");
    }

    /// FedBuff through the aggregator folds each update's change from the
    /// model it trained from as it arrives, and gets the step over the whole
    /// buffer, bit for bit: fresh and stale updates from two bases, with
    /// every update usable and with one left out mid-way (its base missing).
    #[tokio::test]
    async fn fedbuff_folds_each_update_with_its_base_model_bit_for_bit() {
        let Aggregator { _dir, blobs, worker, model, cfg, global, global_digest } = aggregator().await;
        let older = cfg.init(64, 10, 2);
        let older_digest = blobs.put(weights::encode(&older).expect("encode")).await.expect("put");
        let trained: Vec<(Weights, u64)> = (0..4u64).map(|k| (cfg.init(64, 10, 600 + k), 5 + 3 * k)).collect();
        let mut refs = Vec::new();
        for (k, (w, n)) in trained.iter().enumerate() {
            let mut u = protocol::UpdateRef::new(format!("t{k}"), blobs.put(weights::encode(w).expect("encode")).await.expect("put"), *n);
            if k % 2 == 1 {
                (u.base_model, u.staleness) = (Some(older_digest.clone()), 2);
            }
            refs.push(u);
        }
        let bases: Vec<(&Weights, u32)> = refs.iter().map(|u| if u.staleness > 0 { (&older, 2) } else { (&global, 0) }).collect();
        let want = aggregate::fedbuff(0.9, &global, &trained, &bases).expect("the whole buffer");
        let mut lost = refs[0].clone();
        (lost.task_id, lost.base_model, lost.staleness) = ("lost".into(), Some("0".repeat(64)), 1);
        let mut with_lost = refs.clone();
        with_lost.insert(1, lost);
        let bits = |w: &Weights| w.values().flat_map(|t| t.data.iter().map(|v| v.to_bits())).collect::<Vec<_>>();
        for (case, updates, left) in [("all", refs, 0), ("one lost", with_lost, 1)] {
            let command =
                aggregate_command(&format!("fedbuff-{case}"), &model, ServerOptimizer::FedBuff { eta: 0.9 }, &global_digest, updates);
            let ReportBody::Aggregated { digest, excluded, .. } = worker.execute(&command).await.body else { panic!("{case}: aggregated") };
            assert_eq!(excluded.len(), left, "{case}");
            let folded = weights::decode(&blobs.get(&digest).await.expect("get")).expect("decode");
            assert_eq!(bits(&folded), bits(&want), "{case}");
        }
    }

    /// The robust rules (median, trimmed mean, Krum) through the aggregator:
    /// with the updates over its memory budget they go to disk and are read
    /// back a block at a time, and the aggregate is the in-memory one bit for
    /// bit, with a bad update left out too; nothing stays on disk after.
    #[tokio::test]
    async fn robust_rules_over_updates_on_disk_equal_the_in_memory_ones_bit_for_bit() {
        let Aggregator { _dir, blobs, worker: in_memory, model, cfg, global, global_digest } = aggregator().await;
        let spill = tempfile::tempdir().expect("tempdir");
        let on_disk = in_memory.clone().with_updates_in_memory(0, spill.path().join("updates"));
        let trained: Vec<(Weights, u64)> = (0..7u64).map(|k| (cfg.init(64, 10, 200 + k), 5 + k)).collect();
        let mut refs = Vec::new();
        for (k, (w, n)) in trained.iter().enumerate() {
            let d = blobs.put(weights::encode(w).expect("encode")).await.expect("put");
            refs.push(protocol::UpdateRef::new(format!("t{k}"), &d, *n));
        }
        let mut nan = trained[0].0.clone();
        nan.get_mut("fc1.weight").expect("weight").data[3] = f32::NAN;
        let nan = blobs.put(weights::encode(&nan).expect("encode")).await.expect("put");
        let mut with_bad = refs.clone();
        with_bad.insert(3, protocol::UpdateRef::new("bad", &nan, 9));
        for optimizer in [ServerOptimizer::Median, ServerOptimizer::TrimmedMean { beta: 0.15 }, ServerOptimizer::Krum { f: 1, m: 2 }] {
            let expected = aggregate::combine(&optimizer, &global, trained.clone(), None).expect("combine").0;
            for (name, updates) in [("all", refs.clone()), ("one bad", with_bad.clone())] {
                for (held, worker) in [("memory", &in_memory), ("disk", &on_disk)] {
                    // Ids of their own: a worker answers an id it ran before from its memory.
                    let id = format!("{}-{name}-{held}", optimizer.name());
                    let command = aggregate_command(&id, &model, optimizer, &global_digest, updates.clone());
                    let ReportBody::Aggregated { digest, excluded, .. } = worker.execute(&command).await.body else {
                        panic!("{} of {name}, {held}: not aggregated", optimizer.name())
                    };
                    assert_eq!(excluded.len(), usize::from(name == "one bad"));
                    let got = weights::decode(&blobs.get(&digest).await.expect("get")).expect("decode");
                    assert!(
                        got.iter().all(|(k, t)| t.data.iter().zip(&expected[k].data).all(|(x, y)| x.to_bits() == y.to_bits())),
                        "{} of {name}, held in {held}",
                        optimizer.name()
                    );
                }
            }
        }
        let left = std::fs::read_dir(spill.path().join("updates")).expect("the folder was made").count();
        assert_eq!(left, 0, "the updates on disk go once the aggregate is made");
    }

    #[tokio::test]
    async fn commands_run_concurrently_and_each_is_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
        let transport = Arc::new(InProcess::default());
        let info = WorkerInfo { id: "w".into(), roles: vec!["trainer".into()], realm: "default".into(), device: "cpu".into(), group: None };
        let worker = Worker::new(info, transport.clone(), blobs).with_concurrency(3);
        let mut reports = transport.report_inbox("j").await.expect("reports");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        for i in 0..8 {
            let deploy = Command {
                v: protocol::VERSION,
                id: format!("deploy-{i}"),
                job_id: "j".into(),
                task_id: format!("t{i}"),
                round: 0,
                traceparent: None,
                body: CommandBody::Deploy { role: "trainer".into(), dataset: Some(format!("builtin://digits?part={i}&of=8")) },
            };
            transport.send_command("w", &deploy).await.expect("send");
        }
        let mut ids = std::collections::BTreeSet::new();
        while ids.len() < 8 {
            let report = tokio::time::timeout(Duration::from_secs(30), reports.next()).await.expect("a report").expect("open").expect("ok");
            assert!(matches!(report.message.body, ReportBody::Deployed { samples: Some(n) } if n > 0), "{:?}", report.message.body);
            assert!(ids.insert(report.message.command_id.clone()), "reported twice: {}", report.message.command_id);
        }
        let _ = stop.send(());
        running.await.expect("join").expect("a clean stop");
    }

    #[tokio::test]
    async fn a_trainer_clips_and_noises_its_update_when_the_job_asks_for_privacy() {
        crate::model::init_backend();
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
        let info = WorkerInfo { id: "w".into(), roles: vec!["trainer".into()], realm: "default".into(), device: "cpu".into(), group: None };
        let worker = Worker::new(info, Arc::new(InProcess::default()), blobs.clone());
        let model = flame_events::model::Model::Mlp { hidden: vec![16] };
        let global = ModelConfig::new(&model).expect("cfg").init(64, 10, 1);
        let digest = blobs.put(weights::encode(&global).expect("encode")).await.expect("put");
        let train = |id: &str, privacy: Option<(f64, f64)>| Command {
            v: protocol::VERSION,
            id: id.into(),
            job_id: "j".into(),
            task_id: "t".into(),
            round: 1,
            traceparent: None,
            body: CommandBody::Train {
                model: model.clone(),
                global_model: digest.clone(),
                dataset: "builtin://digits?part=0&of=3".into(),
                training: flame_events::algorithm::Training {
                    epochs: 1,
                    batch_size: 32,
                    learning_rate: 0.3,
                    privacy: privacy.map(|(clip_threshold, noise_factor)| Privacy { clip_threshold, noise_factor }),
                    ..Default::default()
                },
                objective: ClientObjective::Plain,
                seed: 9,
                client_state: None,
                server_state: None,
            },
        };
        let run = |c: Command| {
            let worker = worker.clone();
            async move {
                match worker.execute(&c).await.body {
                    ReportBody::Trained { digest, metrics, .. } => (digest, metrics),
                    other => panic!("{other:?}"),
                }
            }
        };
        let (plain, plain_metrics) = run(train("plain", None)).await;
        assert!(!plain_metrics.contains_key("dp_update_norm"), "no privacy unless asked");
        let plain = weights::decode(&blobs.get(&plain).await.expect("get")).expect("decode");
        let unclipped = norm_of_difference(&plain, &global);

        let (clipped, m) = run(train("clipped", Some((0.5, 0.0)))).await;
        let clipped = weights::decode(&blobs.get(&clipped).await.expect("get")).expect("decode");
        assert!(unclipped > 0.5, "the test needs an update larger than the bound: {unclipped}");
        assert!((norm_of_difference(&clipped, &global) - 0.5).abs() < 1e-3, "the update is clipped to the bound");
        assert!((m["dp_update_norm"] - unclipped).abs() < 1e-3 && m["dp_clip_scale"] < 1.0 && m["dp_noise_std"] == 0.0, "{m:?}");

        let (noisy, m) = run(train("noisy", Some((0.5, 1.0)))).await;
        let noisy = weights::decode(&blobs.get(&noisy).await.expect("get")).expect("decode");
        assert_eq!(m["dp_noise_std"], 0.5);
        assert!(norm_of_difference(&noisy, &clipped) > 1.0, "noise of std 0.5 per coordinate moves the model");

        let bad = worker.execute(&train("bad", Some((-1.0, 0.0)))).await;
        assert!(matches!(bad.body, ReportBody::Failed { ref error } if error.contains("clip_threshold")), "{bad:?}");

        // An aggregator leaves out unusable updates and names them.
        let mut nan = plain.clone();
        nan.get_mut("fc1.bias").expect("bias").data[0] = f32::NAN;
        let nan = blobs.put(weights::encode(&nan).expect("encode")).await.expect("put");
        let mut narrow = plain.clone();
        narrow.remove("fc2.bias");
        let narrow = blobs.put(weights::encode(&narrow).expect("encode")).await.expect("put");
        let good = blobs.put(weights::encode(&plain).expect("encode")).await.expect("put");
        let missing = "0".repeat(64);
        let updates: Vec<protocol::UpdateRef> = [("good", &good), ("nan", &nan), ("narrow", &narrow), ("missing", &missing)]
            .iter()
            .map(|(t, d)| protocol::UpdateRef::new(*t, *d, 10))
            .collect();
        let aggregate = aggregate_command("agg", &model, ServerOptimizer::FedAvg, &digest, updates);
        let ReportBody::Aggregated { digest: averaged, excluded, .. } = worker.execute(&aggregate).await.body else { panic!("aggregated") };
        assert_eq!(averaged, good, "the average of the one usable update is that update");
        let reasons: Vec<(&str, &str)> = excluded.iter().map(|x| (x.task_id.as_str(), x.reason.as_str())).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].0 == "nan" && reasons[0].1.contains("NaN"), "{reasons:?}");
        assert!(reasons[1].0 == "narrow" && reasons[1].1.contains("fc2.bias"), "{reasons:?}");
        assert!(reasons[2].0 == "missing", "{reasons:?}");
    }

    /// The in-process transport, with registrations that fail or hang for their first tries.
    #[derive(Default)]
    struct Flaky {
        inner: InProcess,
        failing: std::sync::atomic::AtomicU32,
        hanging: std::sync::atomic::AtomicU32,
        tries: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl Transport for Flaky {
        async fn register(&self, info: &WorkerInfo) -> Result<(), flame_transport::Error> {
            use std::sync::atomic::Ordering::SeqCst;
            self.tries.fetch_add(1, SeqCst);
            if self.hanging.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                std::future::pending::<()>().await;
            }
            if self.failing.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(flame_transport::Error::Nats("no responders".into()));
            }
            self.inner.register(info).await
        }
        async fn workers(&self) -> Result<Vec<WorkerInfo>, flame_transport::Error> {
            self.inner.workers().await
        }
        async fn send_command(&self, worker_id: &str, command: &Command) -> Result<(), flame_transport::Error> {
            self.inner.send_command(worker_id, command).await
        }
        async fn command_inbox(&self, worker_id: &str) -> Result<flame_transport::Inbox<Command>, flame_transport::Error> {
            self.inner.command_inbox(worker_id).await
        }
        async fn send_report(&self, report: &Report) -> Result<(), flame_transport::Error> {
            self.inner.send_report(report).await
        }
        async fn report_inbox(&self, job_id: &str) -> Result<flame_transport::Inbox<Report>, flame_transport::Error> {
            self.inner.report_inbox(job_id).await
        }
    }

    fn flaky_worker(failing: u32, hanging: u32) -> (Worker, Arc<Flaky>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
        let transport = Arc::new(Flaky { failing: failing.into(), hanging: hanging.into(), ..Flaky::default() });
        let info = WorkerInfo { id: "w".into(), roles: vec!["trainer".into()], realm: "default".into(), device: "cpu".into(), group: None };
        (Worker::new(info, transport.clone(), blobs), transport, dir)
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_that_fails_is_tried_again_soon_until_it_lands() {
        use std::sync::atomic::Ordering::SeqCst;
        // Refused three times (a server failing over answers "no responders"), then taken.
        let (worker, transport, _dir) = flaky_worker(3, 0);
        let start = tokio::time::Instant::now();
        assert!(worker.heartbeat(Duration::MAX).await, "it lands");
        assert_eq!(transport.tries.load(SeqCst), 4);
        assert_eq!(start.elapsed(), 3 * HEARTBEAT_RETRY, "tried again after {HEARTBEAT_RETRY:?}, not a heartbeat later");
        assert_eq!(transport.workers().await.expect("workers").len(), 1, "registered");

        // Unanswered twice (a request lost in a failover): each try gives up after a heartbeat's time.
        let (worker, transport, _dir) = flaky_worker(0, 2);
        let start = tokio::time::Instant::now();
        assert!(worker.heartbeat(Duration::MAX).await);
        assert_eq!(transport.tries.load(SeqCst), 3);
        assert_eq!(start.elapsed(), 2 * (HEARTBEAT + HEARTBEAT_RETRY));
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_gives_up_when_its_time_is_up() {
        use std::sync::atomic::Ordering::SeqCst;
        // A fleet's pass over its workers tries each for one beat, so one that cannot land holds up no other's next beat.
        let (worker, transport, _dir) = flaky_worker(u32::MAX, 0);
        let start = tokio::time::Instant::now();
        assert!(!worker.heartbeat(HEARTBEAT).await, "it did not land");
        assert_eq!(transport.tries.load(SeqCst), 4, "every {HEARTBEAT_RETRY:?} within {HEARTBEAT:?}");
        assert!(start.elapsed() < HEARTBEAT);
        assert!(transport.workers().await.expect("workers").is_empty());
    }
}
