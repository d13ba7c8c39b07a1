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

use crate::blob::BlobStore;
#[cfg(feature = "tch")]
use crate::control;
use crate::model::ModelConfig;
#[cfg(feature = "tch")]
use crate::model::{Net, TrainSettings};
use crate::weights::{self, Weights};
use crate::{aggregate, data};

/// How often a worker renews its registration.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How many finished commands a worker remembers, to answer redeliveries without redoing them.
const REMEMBERED: usize = 4096;
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
}

impl Worker {
    /// A worker with this identity, transport and blob store.
    pub fn new(info: WorkerInfo, transport: Arc<dyn Transport>, blobs: Arc<dyn BlobStore>) -> Self {
        Self { info, transport, blobs, done: Arc::default(), concurrency: DEFAULT_CONCURRENCY }
    }

    /// Runs at most `n` commands at once (at least 1). Each is acked only
    /// after its report is sent, so a crash redelivers every one in flight.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Registers, then runs commands until `shutdown` resolves or the inbox closes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        flame_transport::check_id(&self.info.id)?;
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
        tracing::info!(worker = %self.info.id, roles = ?self.info.roles, kernels = crate::kernels::Kernels::current().name(), "worker ready");
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
                Some(Err(e)) => tracing::warn!(worker = %self.info.id, "skipping a command: {e}"),
                Some(Ok(delivery)) => {
                    let worker = self.clone();
                    running.spawn(async move {
                        let report = worker.execute(&delivery.message).await;
                        // Not acked on failure: the command is redelivered and answered from memory.
                        worker.transport.send_report(&report).await.map_err(|e| anyhow!(e).context("sending a report"))?;
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
                let cfg = ModelConfig::new(model)?;
                let url = dataset.clone();
                let d = tokio::task::spawn_blocking(move || data::load(&url)).await??;
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
                let cfg = ModelConfig::new(model)?;
                let settings = TrainSettings::new(training, objective);
                let objective = *objective;
                let global = self.fetch(global_model).await?;
                let client = match client_state {
                    Some(d) => Some(self.fetch(d).await.context("this task's state from its last update")?),
                    None => None,
                };
                let server = match server_state {
                    Some(d) => Some(self.fetch(d).await.context("the server's state")?),
                    None => None,
                };
                let (url, seed) = (dataset.clone(), *seed);
                let global_for_dp = global.clone();
                let (trained, samples, metrics, state) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let d = data::load(&url)?;
                    let mut net = crate::model::trainer(&cfg, &global)?;
                    let (correction, before) = match objective {
                        ClientObjective::Scaffold => {
                            let (c, ci) = (control::part(server.as_ref(), "c", &global)?, control::part(client.as_ref(), "c", &global)?);
                            (Some(control::combine(&[(1.0, &c), (-1.0, &ci)])?), Some((c, ci)))
                        }
                        ClientObjective::FedDyn { .. } => {
                            let g = control::part(client.as_ref(), "g", &global)?;
                            (Some(control::combine(&[(-1.0, &g)])?), Some((g.clone(), g)))
                        }
                        ClientObjective::Plain | ClientObjective::Proximal { .. } => (None, None),
                    };
                    let started = std::time::Instant::now();
                    let mut metrics = net.train(&d.train, &settings, seed, correction.as_ref())?;
                    // Oort weighs trainers by speed as well as usefulness.
                    metrics.insert("train_seconds".into(), started.elapsed().as_secs_f64());
                    if let Some(acc) = net.evaluate(&d.train).get("accuracy") {
                        metrics.insert("train_accuracy".into(), *acc);
                    }
                    let trained = net.weights()?;
                    let state = match (objective, before) {
                        (ClientObjective::Scaffold, Some((c, ci))) => {
                            let steps = Net::steps(d.train.len(), &settings);
                            let (next, change) = control::scaffold_client(&ci, &c, &global, &trained, steps, settings.learning_rate)?;
                            Some(control::pack(&[("c", &next), ("dc", &change)]))
                        }
                        (ClientObjective::FedDyn { alpha }, Some((g, _))) => {
                            Some(control::pack(&[("g", &control::feddyn_client(&g, &global, &trained, alpha)?)]))
                        }
                        _ => None,
                    };
                    Ok((trained, d.train.len() as u64, metrics, state))
                })
                .await??;
                let (trained, metrics) = privatize(training.privacy, &global_for_dp, trained, metrics, seed)?;
                let digest = self.store(&trained).await?;
                let state = match state {
                    Some(s) => Some(self.store(&s).await?),
                    None => None,
                };
                Ok(ReportBody::Trained { digest, samples, metrics, state })
            }
            CommandBody::Coordinate { candidates, samples } => {
                Ok(ReportBody::Coordinated { pairing: crate::coordinate::pair(candidates, samples, command.round) })
            }
            CommandBody::Aggregate { model, optimizer, trainers, optimizer_state, global_model, updates, eval_dataset } => {
                let cfg = ModelConfig::new(model)?;
                let global = self.fetch(global_model).await?;
                // An unusable update (missing, bytes not matching the digest, not finite f32
                // safetensors, other tensors than the global model's) is left out and named.
                let mut inputs = Vec::with_capacity(updates.len());
                let mut excluded = Vec::new();
                // FedBuff: the model each update trained from, once per distinct digest.
                let mut bases: Vec<(String, u32)> = Vec::new();
                let mut base_models: BTreeMap<String, Weights> = BTreeMap::new();
                // SCAFFOLD / FedDyn: each trainer's state after its update.
                let stateful = optimizer.keeps_client_state();
                let buffered = optimizer.is_asynchronous();
                let mut client_states = Vec::new();
                for u in updates {
                    let base = u.base_model.clone().unwrap_or_else(|| global_model.clone());
                    let checked = match self.fetch(&u.digest).await {
                        Ok(w) => weights::check_same_layout(&global, &w).map(|()| w).map_err(anyhow::Error::from),
                        Err(e) => Err(e),
                    };
                    let checked = match checked {
                        Ok(w) if buffered && !base_models.contains_key(&base) => match self.fetch(&base).await {
                            Ok(b) => {
                                weights::check_same_layout(&global, &b).map(|()| (w, Some(b))).map_err(|e| anyhow!("its base model: {e}"))
                            }
                            Err(e) => Err(e.context("its base model")),
                        },
                        Ok(w) => Ok((w, None)),
                        Err(e) => Err(e),
                    };
                    let checked = match (checked, stateful.then_some(&u.client_state)) {
                        (Ok(ok), Some(Some(d))) => match self.fetch(d).await {
                            Ok(s) => Ok((ok, Some(s))),
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
                            client_states.extend(s);
                            bases.push((base, u.staleness));
                            inputs.push((w, u.samples));
                        }
                        Err(e) => {
                            tracing::warn!(worker = %self.info.id, task = %u.task_id, digest = %u.digest, "update left out: {e:#}");
                            excluded.push(Excluded { task_id: u.task_id.clone(), digest: u.digest.clone(), reason: format!("{e:#}") });
                        }
                    }
                }
                if inputs.is_empty() {
                    bail!("no usable update among {}: {:?}", updates.len(), excluded.iter().map(|x| &x.reason).collect::<Vec<_>>());
                }
                let state = match optimizer_state {
                    Some(d) => Some(self.fetch(d).await.context("optimizer state")?),
                    None => None,
                };
                let (eval, optimizer, trainers) = (eval_dataset.clone(), *optimizer, *trainers);
                let (new_global, new_state, metrics) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let (next, state) = match optimizer {
                        ServerOptimizer::Scaffold { .. } | ServerOptimizer::FedDyn { .. } => {
                            let trainers = if trainers == 0 { inputs.len() } else { trainers as usize };
                            let (next, state) =
                                aggregate::with_client_states(&optimizer, trainers, &global, &inputs, &client_states, state.as_ref())?;
                            (next, Some(state))
                        }
                        ServerOptimizer::FedBuff { eta } => {
                            let bases = bases
                                .iter()
                                .map(|(d, s)| base_models.get(d).map(|b| (b, *s)).ok_or_else(|| anyhow!("base model {d} was not fetched")))
                                .collect::<anyhow::Result<Vec<_>>>()?;
                            (aggregate::fedbuff(eta, &global, &inputs, &bases)?, None)
                        }
                        _ => aggregate::combine(&optimizer, &global, inputs, state.as_ref())?,
                    };
                    let metrics = match eval {
                        Some(url) => crate::model::evaluate(&cfg, &next, &data::load(&url)?.test)?,
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
                Ok(ReportBody::Aggregated { digest, metrics, optimizer_state, excluded })
            }
        }
    }
}

/// Differential privacy on a trainer's update when the job asks for it: the
/// update is clipped and noised before it leaves the worker, and what was
/// done is reported in the metrics (`dp_update_norm`, `dp_clip_scale`, `dp_noise_std`).
#[cfg(feature = "tch")]
fn privatize(
    privacy: Option<Privacy>,
    global: &Weights,
    trained: Weights,
    mut metrics: flame_events::job::Metrics,
    seed: u64,
) -> anyhow::Result<(Weights, flame_events::job::Metrics)> {
    let Some(Privacy { clip_threshold, noise_factor }) = privacy else {
        return Ok((trained, metrics));
    };
    // The noise seed differs from the shuffling seed but is as reproducible.
    let (private, applied) = crate::privacy::privatize(global, &trained, clip_threshold, noise_factor, seed ^ 0x5eed_d1ff_e4e7_1a11)?;
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

    fn norm_of_difference(a: &Weights, b: &Weights) -> f64 {
        a.iter().map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>()).sum::<f64>().sqrt()
    }

    #[tokio::test]
    async fn commands_run_concurrently_and_each_is_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Arc::new(LocalBlobs::new(dir.path()).expect("blobs"));
        let transport = Arc::new(InProcess::default());
        let info = WorkerInfo { id: "w".into(), roles: vec!["trainer".into()], realm: "default".into(), device: "cpu".into() };
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
                body: CommandBody::Deploy { role: "trainer".into(), dataset: Some(format!("builtin://digits?part={i}&of=8")) },
            };
            transport.send_command("w", &deploy).await.expect("send");
        }
        let mut ids = std::collections::BTreeSet::new();
        while ids.len() < 8 {
            let report = tokio::time::timeout(Duration::from_secs(30), reports.next()).await.expect("a report").expect("open").expect("ok");
            assert!(matches!(report.message.body, ReportBody::Deployed {}), "{:?}", report.message.body);
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
        let info = WorkerInfo { id: "w".into(), roles: vec!["trainer".into()], realm: "default".into(), device: "cpu".into() };
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
            body: CommandBody::Train {
                model: model.clone(),
                global_model: digest.clone(),
                dataset: "builtin://digits?part=0&of=3".into(),
                training: flame_events::algorithm::Training {
                    epochs: 1,
                    batch_size: 32,
                    learning_rate: 0.3,
                    privacy: privacy.map(|(clip_threshold, noise_factor)| Privacy { clip_threshold, noise_factor }),
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
        let aggregate = Command {
            v: protocol::VERSION,
            id: "agg".into(),
            job_id: "j".into(),
            task_id: "a".into(),
            round: 1,
            body: CommandBody::Aggregate {
                model: model.clone(),
                optimizer: ServerOptimizer::FedAvg,
                trainers: 4,
                optimizer_state: None,
                global_model: digest.clone(),
                updates,
                eval_dataset: None,
            },
        };
        let ReportBody::Aggregated { digest: averaged, excluded, .. } = worker.execute(&aggregate).await.body else { panic!("aggregated") };
        assert_eq!(averaged, good, "the average of the one usable update is that update");
        let reasons: Vec<(&str, &str)> = excluded.iter().map(|x| (x.task_id.as_str(), x.reason.as_str())).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].0 == "nan" && reasons[0].1.contains("NaN"), "{reasons:?}");
        assert!(reasons[1].0 == "narrow" && reasons[1].1.contains("fc2.bias"), "{reasons:?}");
        assert!(reasons[2].0 == "missing", "{reasons:?}");
    }
}
