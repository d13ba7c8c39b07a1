//! The worker runtime: register, heartbeat, take commands, run them, report.
//! The same runtime serves embedded mode (in-process transport) and
//! distributed mode (NATS).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;

use flame_events::protocol::{self, Command, CommandBody, Report, ReportBody, WorkerInfo};
use flame_events::transport::Transport;

use crate::blob::BlobStore;
use crate::model::{ModelConfig, Net, TrainSettings};
use crate::weights::{self, Weights};
use crate::{aggregate, data};

/// How often a worker renews its registration.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How many finished commands a worker remembers, to answer redeliveries without redoing them.
const REMEMBERED: usize = 4096;

/// A worker: one identity, one command inbox.
#[derive(Clone)]
pub struct Worker {
    info: WorkerInfo,
    transport: Arc<dyn Transport>,
    blobs: Arc<dyn BlobStore>,
    done: Arc<Mutex<HashMap<String, Report>>>,
}

impl Worker {
    /// A worker with this identity, transport and blob store.
    pub fn new(info: WorkerInfo, transport: Arc<dyn Transport>, blobs: Arc<dyn BlobStore>) -> Self {
        Self { info, transport, blobs, done: Arc::default() }
    }

    /// Registers, then runs commands until `shutdown` resolves or the inbox closes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        flame_events::transport::check_id(&self.info.id)?;
        self.transport.register(&self.info).await.context("registering the worker")?;
        let mut inbox = self.transport.command_inbox(&self.info.id).await.context("opening the command inbox")?;
        let heartbeat = {
            let (transport, info) = (self.transport.clone(), self.info.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    if let Err(e) = transport.register(&info).await {
                        tracing::warn!(worker = %info.id, "heartbeat failed: {e}");
                    }
                }
            })
        };
        tracing::info!(worker = %self.info.id, roles = ?self.info.roles, "worker ready");
        tokio::pin!(shutdown);
        let result = loop {
            let next = tokio::select! {
                () = &mut shutdown => break Ok(()),
                next = inbox.next() => next,
            };
            match next {
                None => break Ok(()),
                Some(Err(e)) => tracing::warn!(worker = %self.info.id, "skipping a command: {e}"),
                Some(Ok(delivery)) => {
                    let report = self.execute(&delivery.message).await;
                    if let Err(e) = self.transport.send_report(&report).await {
                        // Not acked: the command is redelivered and answered from memory.
                        break Err(anyhow!(e).context("sending a report"));
                    }
                    if let Err(e) = delivery.ack().await {
                        tracing::warn!(worker = %self.info.id, "ack failed (the command may be redelivered): {e}");
                    }
                }
            }
        };
        heartbeat.abort();
        result
    }

    /// Runs one command (once per command id) and returns the report.
    pub async fn execute(&self, command: &Command) -> Report {
        if let Some(report) = self.remembered(&command.id) {
            return report;
        }
        let started = std::time::Instant::now();
        let body = match self.run_command(command).await {
            Ok(body) => body,
            Err(e) => ReportBody::Failed { error: format!("{e:#}") },
        };
        tracing::info!(worker = %self.info.id, command = %command.id, ms = started.elapsed().as_millis() as u64, failed = matches!(body, ReportBody::Failed { .. }), "command done");
        let report = Report {
            v: protocol::VERSION,
            command_id: command.id.clone(),
            job_id: command.job_id.clone(),
            task_id: command.task_id.clone(),
            worker_id: self.info.id.clone(),
            round: command.round,
            body,
        };
        let mut done = self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if done.len() >= REMEMBERED {
            done.clear();
        }
        done.insert(command.id.clone(), report.clone());
        report
    }

    fn remembered(&self, id: &str) -> Option<Report> {
        self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).cloned()
    }

    async fn fetch(&self, digest: &str) -> anyhow::Result<Weights> {
        let bytes = self.blobs.get(digest).await.with_context(|| format!("fetching model {digest}"))?;
        weights::decode(&bytes).with_context(|| format!("reading model {digest}"))
    }

    async fn store(&self, w: &Weights) -> anyhow::Result<String> {
        Ok(self.blobs.put(weights::encode(w)?).await?)
    }

    async fn run_command(&self, command: &Command) -> anyhow::Result<ReportBody> {
        if command.v != protocol::VERSION {
            bail!("protocol version {} is not supported (this worker speaks {})", command.v, protocol::VERSION);
        }
        match &command.body {
            CommandBody::Deploy { role, dataset } => {
                if !self.info.roles.iter().any(|r| r == role || r == "trainer" || r == "aggregator") {
                    bail!("this worker offers roles {:?}, not '{role}'", self.info.roles);
                }
                if let Some(url) = dataset.clone() {
                    let d = tokio::task::spawn_blocking(move || data::load(&url)).await?.with_context(|| format!("dataset {dataset:?}"))?;
                    if d.train.is_empty() {
                        bail!("dataset {dataset:?} has no training samples");
                    }
                }
                Ok(ReportBody::Deployed {})
            }
            CommandBody::InitModel { model, dataset, seed } => {
                let cfg = ModelConfig::from_json(model)?;
                let url = dataset.clone();
                let d = tokio::task::spawn_blocking(move || data::load(&url)).await??;
                let digest = self.store(&cfg.init(d.train.features, d.classes, *seed)).await?;
                Ok(ReportBody::Initialized { digest })
            }
            CommandBody::Train { model, global_model, dataset, hyperparameters, seed } => {
                let cfg = ModelConfig::from_json(model)?;
                let settings = TrainSettings::from_hyperparameters(hyperparameters)?;
                let global = self.fetch(global_model).await?;
                let (url, seed) = (dataset.clone(), *seed);
                let (trained, samples, metrics) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let d = data::load(&url)?;
                    let mut net = Net::new(&cfg, &global)?;
                    let mut metrics = net.train(&d.train, &settings, seed)?;
                    if let Some(acc) = net.evaluate(&d.train).get("accuracy") {
                        metrics.insert("train_accuracy".into(), *acc);
                    }
                    Ok((net.weights()?, d.train.len() as u64, metrics))
                })
                .await??;
                let digest = self.store(&trained).await?;
                Ok(ReportBody::Trained { digest, samples, metrics })
            }
            CommandBody::Aggregate { model, optimizer, optimizer_kwargs, optimizer_state, global_model, updates, eval_dataset } => {
                let cfg = ModelConfig::from_json(model)?;
                let global = self.fetch(global_model).await?;
                let mut inputs = Vec::with_capacity(updates.len());
                for u in updates {
                    let w = self.fetch(&u.digest).await.with_context(|| format!("update from task '{}'", u.task_id))?;
                    weights::check_same_layout(&global, &w).with_context(|| format!("update {} from task '{}'", u.digest, u.task_id))?;
                    inputs.push((w, u.samples));
                }
                let state = match optimizer_state {
                    Some(d) => Some(self.fetch(d).await.context("optimizer state")?),
                    None => None,
                };
                let (eval, optimizer, kwargs) = (eval_dataset.clone(), optimizer.clone(), optimizer_kwargs.clone());
                let (new_global, new_state, metrics) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let (next, state) = aggregate::combine(&optimizer, &kwargs, &global, &inputs, state.as_ref())?;
                    let metrics = match eval {
                        Some(url) => Net::new(&cfg, &next)?.evaluate(&data::load(&url)?.test),
                        None => Default::default(),
                    };
                    Ok((next, state, metrics))
                })
                .await??;
                let digest = self.store(&new_global).await?;
                let optimizer_state = match new_state {
                    Some(s) => Some(self.store(&s).await?),
                    None => None,
                };
                Ok(ReportBody::Aggregated { digest, metrics, optimizer_state })
            }
        }
    }
}
