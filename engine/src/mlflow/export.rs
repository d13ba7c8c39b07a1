//! Keeps an MLflow tracking server in step with the event log: follows the
//! global log from a checkpoint of its own (`mlflow:<url>`), and for each
//! job a batch touched, brings the job's run to its [`RunRecord`]. Every step
//! is idempotent (the run is found again by its tag, metric points are
//! stamped with their round's time, the model version by its run), and the
//! checkpoint moves only once MLflow took the whole batch: an MLflow outage
//! delays the runs and loses nothing, and starting over from position 0
//! duplicates nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flame_events::Envelope;
use flame_events::store::EventStore;
use flame_torchscript::{Archive, Dtype, Values};
use flame_transport::blob::BlobStore;

use super::client::{self, Client, Metric, Run};
use super::{JOB_TAG, RunRecord, RunStatus, record};

/// Why an export step stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MLflow is away or failing; the batch is tried again.
    #[error(transparent)]
    Mlflow(#[from] client::Error),
    /// The event store failed.
    #[error("event store: {0}")]
    Store(#[from] flame_events::store::Error),
    /// A model blob could not be read.
    #[error("job {job}: the final model {digest}: {why}")]
    Model {
        /// The job.
        job: String,
        /// The blob.
        digest: String,
        /// What went wrong.
        why: String,
    },
}

/// What this process already brought to MLflow for one job.
#[derive(Clone, Debug, Default)]
struct Synced {
    run: Option<Run>,
    params: bool,
    /// Metric points sent: (round, key). A round's federated evaluation
    /// arrives after its aggregate, so a round may gain keys.
    sent: std::collections::BTreeSet<(u32, String)>,
    tags: BTreeMap<String, String>,
    status: Option<RunStatus>,
    model: bool,
}

/// The MLflow projection.
pub struct Exporter {
    store: Arc<dyn EventStore>,
    blobs: Arc<dyn BlobStore>,
    client: Client,
    checkpoint: String,
    /// Job streams read so far (events of jobs not yet at an end).
    streams: HashMap<String, Vec<Envelope>>,
    synced: HashMap<String, Synced>,
    experiments: HashMap<String, String>,
}

/// Where the run's model goes among its artifacts.
pub const MODEL_DIR: &str = "model";

impl Exporter {
    /// An exporter to the tracking server at `url`.
    pub fn new(store: Arc<dyn EventStore>, blobs: Arc<dyn BlobStore>, url: &str) -> Self {
        let client = Client::new(url);
        let checkpoint = format!("mlflow:{}", client.url());
        Self { store, blobs, client, checkpoint, streams: HashMap::new(), synced: HashMap::new(), experiments: HashMap::new() }
    }

    /// The checkpoint's name in the event store.
    pub fn checkpoint_name(&self) -> &str {
        &self.checkpoint
    }

    /// Forgets the checkpoint: the next catch-up brings every job again (duplicating nothing).
    pub async fn rebuild(&mut self) -> Result<(), Error> {
        self.store.save_checkpoint(&self.checkpoint, 0).await?;
        self.synced.clear();
        self.streams.clear();
        Ok(())
    }

    /// Brings MLflow up to the log's head; returns how many events it covered.
    pub async fn catch_up(&mut self) -> Result<u64, Error> {
        crate::follow::catch_up(self).await
    }

    /// Follows the log until `stop` resolves, retrying after failures with a
    /// growing pause (MLflow away: nothing is lost, the runs just lag).
    pub async fn follow(&mut self, stop: impl std::future::Future<Output = ()>) {
        crate::follow::follow(self, stop).await;
    }

    /// Brings job `job`'s run to what its events say.
    async fn sync_job(&mut self, job: &str) -> Result<(), Error> {
        let stream = format!("job-{job}");
        let known = self.streams.entry(job.to_string()).or_default();
        let next = known.last().map_or(1, |e| e.version + 1);
        known.extend(self.store.read_stream(&stream, next).await?);
        let Some(rec) = record(known) else { return Ok(()) };
        if !rec.started() {
            return Ok(());
        }
        let mut synced = self.synced.remove(job).unwrap_or_default();
        let result = self.bring(&rec, &mut synced).await;
        let done = result.is_ok() && synced.status.is_some_and(RunStatus::is_end) && (synced.model || rec.model.is_none());
        if done {
            // An ended job is not needed again unless it starts over (then it is read and brought again, which repeats nothing).
            self.streams.remove(job);
        } else {
            self.synced.insert(job.to_string(), synced);
        }
        result
    }

    async fn bring(&mut self, rec: &RunRecord, synced: &mut Synced) -> Result<(), Error> {
        let run = match &synced.run {
            Some(r) => r.clone(),
            None => {
                let run = self.run_of(rec).await?;
                synced.run = Some(run.clone());
                run
            }
        };
        if !synced.params {
            let params: Vec<(String, String)> = rec.params.clone().into_iter().collect();
            let id = run.run_id.clone();
            match self.call(move |c| c.log_params(&id, &params)).await {
                Ok(()) => {}
                // A job whose settings changed after its run began (restarted with a new definition): MLflow keeps params for good.
                Err(client::Error::Refused { code, message, .. }) if code == "INVALID_PARAMETER_VALUE" => {
                    tracing::warn!("MLflow run of job {}: its params changed since first logged; kept the first ({message})", rec.job_id);
                }
                Err(e) => return Err(e.into()),
            }
            synced.params = true;
        }
        let metrics: Vec<Metric> = rec
            .rounds
            .iter()
            .flat_map(|r| r.values.iter().map(move |(k, v)| Metric { key: k.clone(), value: *v, timestamp: r.at_ms, step: r.round }))
            .filter(|m| !synced.sent.contains(&(m.step, m.key.clone())))
            .collect();
        if !metrics.is_empty() {
            let id = run.run_id.clone();
            let sent: Vec<(u32, String)> = metrics.iter().map(|m| (m.step, m.key.clone())).collect();
            self.call(move |c| c.log_metrics(&id, &metrics)).await?;
            synced.sent.extend(sent);
        }
        let changed: Vec<(String, String)> =
            rec.tags.iter().filter(|(k, v)| synced.tags.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
        if !changed.is_empty() {
            let id = run.run_id.clone();
            self.call(move |c| c.set_tags(&id, &changed)).await?;
            synced.tags = rec.tags.clone();
        }
        if let Some(model) = rec.model.as_ref().filter(|_| !synced.model) {
            self.register(rec, model, &run).await?;
            synced.model = true;
        }
        let status = rec.status();
        if synced.status != Some(status) {
            let id = run.run_id.clone();
            let end = rec.ended_ms.unwrap_or(0);
            self.call(move |c| c.end_run(&id, status.as_str(), end)).await?;
            synced.status = Some(status);
        }
        Ok(())
    }

    /// The job's run: the oldest tagged with its id, or a new one.
    async fn run_of(&mut self, rec: &RunRecord) -> Result<Run, Error> {
        let experiment = match self.experiments.get(&rec.name) {
            Some(id) => id.clone(),
            None => {
                let name = rec.name.clone();
                let id = self.call(move |c| c.experiment(&name)).await?;
                self.experiments.insert(rec.name.clone(), id.clone());
                id
            }
        };
        let (job, start) = (rec.job_id.clone(), rec.created_ms);
        self.call(move |c| {
            if let Some(run) = c.runs_tagged(&experiment, JOB_TAG, &job)?.into_iter().next() {
                return Ok(run);
            }
            c.create_run(&experiment, &job, start, &[(JOB_TAG.to_string(), job.clone())])
        })
        .await
        .map_err(Error::from)
    }

    /// Stores the final model among the run's artifacts and registers it, unless a version from this run exists.
    async fn register(&self, rec: &RunRecord, model: &super::FinalModel, run: &Run) -> Result<(), Error> {
        let id = run.run_id.clone();
        let versions = self.call(move |c| c.versions_of_run(&id)).await?;
        if versions.iter().any(|v| v.tags.iter().any(|(k, d)| k == "flame.digest" && *d == model.digest)) {
            return Ok(());
        }
        let blob = |digest: &str| {
            let (blobs, digest, job) = (self.blobs.clone(), digest.to_string(), rec.job_id.clone());
            async move { blobs.get(&digest).await.map_err(|e| Error::Model { job, digest, why: e.to_string() }) }
        };
        let weights = blob(&model.digest).await?;
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some((file, sha256)) = &model.torchscript {
            let module = blob(sha256).await?;
            let packed = torchscript_with(module, &weights).map_err(|why| Error::Model {
                job: rec.job_id.clone(),
                digest: model.digest.clone(),
                why,
            })?;
            let name = std::path::Path::new(file).file_name().map_or("model.pt".into(), |n| n.to_string_lossy().into_owned());
            files.push((name, packed));
        }
        let card = serde_json::json!({
            "job_id": rec.job_id,
            "round": model.round,
            "digest": model.digest,
            "weights": "model.safetensors",
            "torchscript": files.first().map(|(n, _)| n.clone()),
        });
        files.push(("model.safetensors".into(), weights));
        files.push(("flame.json".into(), serde_json::to_vec_pretty(&card).unwrap_or_default()));
        let tags = vec![
            ("flame.job_id".to_string(), rec.job_id.clone()),
            ("flame.round".to_string(), model.round.to_string()),
            ("flame.digest".to_string(), model.digest.clone()),
        ];
        let description = format!(
            "Global model of round {} of Flame job {} (sha256:{}); `flamectl trace {}` and `flamectl verify {} --models` explain it.",
            model.round, rec.job_id, model.digest, rec.job_id, rec.job_id
        );
        let (name, run) = (rec.name.clone(), run.clone());
        self.call(move |c| {
            for (file, bytes) in &files {
                c.put_artifact(&run, &format!("{MODEL_DIR}/{file}"), bytes)?;
            }
            c.registered_model(&name)?;
            c.create_version(&name, &run, MODEL_DIR, &tags, &description).map(|_| ())
        })
        .await
        .map_err(Error::from)
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, client::Error> + Send + 'static,
    ) -> Result<T, client::Error> {
        let c = self.client.clone();
        tokio::task::spawn_blocking(move || f(&c))
            .await
            .unwrap_or_else(|e| Err(client::Error::Unavailable { url: "-".into(), why: format!("the call panicked: {e}") }))
    }
}

#[async_trait::async_trait]
impl crate::follow::JobProjection for Exporter {
    type Error = Error;
    const WHAT: &'static str = "MLflow projection";

    fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    fn checkpoint(&self) -> &str {
        &self.checkpoint
    }

    async fn sync(&mut self, job: &str, _at: u64) -> Result<(), Error> {
        self.sync_job(job).await
    }
}

/// The user's TorchScript module with the trained weights (safetensors with
/// its tensors' names) in place of its own.
pub fn torchscript_with(module: Vec<u8>, weights: &[u8]) -> Result<Vec<u8>, String> {
    let archive = Archive::read(module).map_err(|e| format!("the job's model file: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(weights).map_err(|e| format!("the weights: {e}"))?;
    let mut values = BTreeMap::new();
    for t in archive.tensors() {
        let view = st.tensor(&t.name).map_err(|_| format!("the module's tensor '{}' is missing from the weights", t.name))?;
        let bytes = view.data();
        let v = match t.dtype {
            Dtype::F32 => Values::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::I64 => {
                Values::I64(bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
            }
        };
        values.insert(t.name.clone(), v);
    }
    archive.with_values(&values).map_err(|e| e.to_string())
}
