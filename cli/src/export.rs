//! `flamectl model get`: a job's global model of a round, out of the blob
//! store, as safetensors with PyTorch's names or as the user's TorchScript
//! module with the trained weights in place.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use flame_events::job::JobEvent;
use flame_events::model::Model;
use flame_workers::blob::{BlobStore, LocalBlobs, NatsBlobs};

use crate::inspect::{Events, Source};

/// The file format `model get` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The model's tensors by their PyTorch names (`safetensors.torch.load_file`, then `load_state_dict`).
    Safetensors,
    /// The job's TorchScript module with the weights in place (`torch.jit.load`); TorchScript jobs only.
    Torchscript,
}

/// Where the model blobs are.
#[derive(clap::Args, Debug, Clone)]
pub struct Blobs {
    /// The embedded blob folder (what `flamectl run` wrote).
    #[arg(long, default_value = ".flame/blobs", conflicts_with = "nats")]
    pub blobs: PathBuf,
    /// Read the blobs from a NATS JetStream object store instead (distributed
    /// mode; credentials in the URL, `nats://user:password@host:4222`).
    #[arg(long)]
    pub nats: Option<String>,
}

impl Blobs {
    /// Opens the store these options name.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn BlobStore>> {
        Ok(match &self.nats {
            Some(url) => {
                let nats = flame_transport::Nats::connect_with(url, &flame_transport::NatsAuth::default()).await?;
                Arc::new(NatsBlobs::new(nats.jetstream()).await.context("opening the model blob store")?)
            }
            None => {
                if !self.blobs.is_dir() {
                    bail!(
                        "no blob folder {} (flamectl run writes one under --data-dir; --nats URL reads a distributed job's)",
                        self.blobs.display()
                    );
                }
                Arc::new(LocalBlobs::new(&self.blobs)?)
            }
        })
    }
}

/// Which global model a job's events name for a round (the last when `round`
/// is none; round 0 is the initial model), with the job's model.
pub fn pick(events: &[JobEvent], round: Option<u32>) -> Result<(u32, String, Option<Model>), String> {
    let mut model = None;
    let mut found: Vec<(u32, String)> = Vec::new();
    for e in events {
        match e {
            JobEvent::JobCreated { spec, .. } | JobEvent::JobUpdated { spec, .. } => model = Some(spec.model.clone()),
            JobEvent::ModelInitialized { digest, .. } => found.push((0, digest.clone())),
            JobEvent::RoundAggregated { round, digest, .. } => found.push((*round, digest.clone())),
            _ => {}
        }
    }
    let chosen = match round {
        None => found.last().cloned(),
        Some(r) => found.iter().rev().find(|(n, _)| *n == r).cloned(),
    };
    match chosen {
        Some((r, digest)) => Ok((r, digest, model)),
        None if found.is_empty() => Err("the job has no global model yet".into()),
        None => Err(format!(
            "no global model for round {}; the job has rounds {}",
            round.unwrap_or(0),
            found.iter().map(|(r, _)| r.to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Writes a job's global model of a round to `out`.
pub async fn get(job_id: &str, source: &Source, blobs: &Blobs, round: Option<u32>, out: &Path, format: Format) -> anyhow::Result<ExitCode> {
    let events: Vec<JobEvent> =
        Events::open(source).await?.read(job_id, 1).await?.iter().filter_map(|e| serde_json::from_value(e.payload.clone()).ok()).collect();
    if events.is_empty() {
        bail!("no job '{job_id}' in {}", source.api.clone().unwrap_or_else(|| source.store.clone()));
    }
    let (round, digest, model) = pick(&events, round).map_err(|e| anyhow::anyhow!("job '{job_id}': {e}"))?;
    let store = blobs.open().await?;
    let bytes = store.get(&digest).await.with_context(|| format!("the global model of round {round} ({digest})"))?;
    let written = match (format, &model) {
        (Format::Safetensors, _) => bytes,
        (Format::Torchscript, Some(Model::TorchScript { file, sha256, .. })) => {
            let archive = store.get(sha256).await.with_context(|| format!("the job's model file {file} ({sha256})"))?;
            let archive = flame_torchscript::Archive::read(archive).with_context(|| format!("the job's model file {file}"))?;
            let state = flame_workers::weights::decode_state(&bytes)?;
            flame_workers::archive::with_state(&archive, &state)?
        }
        (Format::Torchscript, other) => bail!(
            "job '{job_id}' trains the model '{}', which has no TorchScript module; use --format safetensors",
            other.as_ref().map_or("?", |m| m.name())
        ),
    };
    std::fs::write(out, &written).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({} bytes): the global model of round {round}, sha256:{digest}", out.display(), written.len());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_last_model_or_the_round_asked_for() {
        let events = vec![
            JobEvent::ModelInitialized { digest: "m0".into(), worker_id: "w".into() },
            JobEvent::RoundAggregated { round: 1, digest: "m1".into(), inputs: vec![], metrics: Default::default(), optimizer_state: None },
            JobEvent::RoundAggregated { round: 2, digest: "m2".into(), inputs: vec![], metrics: Default::default(), optimizer_state: None },
        ];
        assert_eq!(pick(&events, None).expect("last").1, "m2");
        assert_eq!(pick(&events, Some(1)).expect("round 1").1, "m1");
        assert_eq!(pick(&events, Some(0)).expect("initial").1, "m0");
        assert!(pick(&events, Some(7)).expect_err("no round 7").contains("0, 1, 2"));
        assert!(pick(&[], None).is_err());
    }
}
