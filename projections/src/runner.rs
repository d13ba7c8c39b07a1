//! The projection runner: reads the global log after its checkpoint, folds
//! each job event into that job's view, and stores the changed views with the
//! new checkpoint in one transaction per batch. Killed at any moment, it
//! resumes from the last commit: no event is applied twice or skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flame_events::Envelope;
use flame_events::store::{Error, EventStore};

use crate::store::{ReadModels, Stored};
use crate::view::JobView;

/// Job views in memory and the position they are folded up to.
#[derive(Clone, Debug, Default)]
pub struct Projector {
    views: BTreeMap<String, JobView>,
    checkpoint: u64,
}

impl Projector {
    /// Views as stored, at their checkpoint.
    pub fn from_stored(checkpoint: u64, stored: &[Stored]) -> Result<Self, Error> {
        let mut views = BTreeMap::new();
        // Views stored without a checkpoint belong to an interrupted reset: start over.
        if checkpoint > 0 {
            for s in stored {
                views.insert(s.job_id.clone(), s.view()?);
            }
        }
        Ok(Self { views, checkpoint })
    }

    /// Folds one event of the global log; returns the job it changed, if any.
    pub fn apply(&mut self, e: &Envelope) -> Option<String> {
        self.checkpoint = e.position;
        let job = e.stream_id.strip_prefix("job-")?;
        self.views.entry(job.to_string()).or_default().apply(e);
        Some(job.to_string())
    }

    /// One job's view.
    pub fn view(&self, job_id: &str) -> Option<&JobView> {
        self.views.get(job_id)
    }

    /// Every view, by job id.
    pub fn views(&self) -> &BTreeMap<String, JobView> {
        &self.views
    }

    /// Global position of the last event folded in.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }
}

/// A view as it is stored: its JSON text.
pub fn to_stored(view: &JobView) -> Result<Stored, Error> {
    Ok(Stored { job_id: view.job_id.clone(), json: serde_json::to_string(view).map_err(|e| Error::Backend(e.to_string()))? })
}

/// What a catch-up did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Events folded.
    pub events: u64,
    /// Transactions committed.
    pub commits: u64,
    /// The checkpoint reached.
    pub checkpoint: u64,
}

/// Runs the job projection over an event store into read models.
pub struct Runner<'a> {
    events: &'a dyn EventStore,
    models: &'a dyn ReadModels,
    projector: Projector,
    batch: usize,
}

impl<'a> Runner<'a> {
    /// Loads the stored views and checkpoint. `batch`: events per transaction.
    pub async fn open(events: &'a dyn EventStore, models: &'a dyn ReadModels, batch: usize) -> Result<Self, Error> {
        let checkpoint = models.checkpoint().await?;
        let stored = if checkpoint > 0 { models.load_all().await? } else { Vec::new() };
        Ok(Self { events, models, projector: Projector::from_stored(checkpoint, &stored)?, batch: batch.max(1) })
    }

    /// Folds and commits one batch; returns how many events it folded (0 = caught up).
    pub async fn step(&mut self) -> Result<u64, Error> {
        let batch = self.events.read_all(self.projector.checkpoint() + 1, self.batch).await?;
        if batch.is_empty() {
            return Ok(0);
        }
        let mut changed = BTreeSet::new();
        for e in &batch {
            if let Some(job) = self.projector.apply(e) {
                changed.insert(job);
            }
        }
        let views = changed.iter().filter_map(|id| self.projector.view(id)).map(to_stored).collect::<Result<Vec<_>, _>>()?;
        self.models.commit(views, self.projector.checkpoint()).await?;
        Ok(batch.len() as u64)
    }

    /// Folds everything stored so far.
    pub async fn catch_up(&mut self) -> Result<Progress, Error> {
        let mut progress = Progress::default();
        loop {
            let n = self.step().await?;
            if n == 0 {
                progress.checkpoint = self.projector.checkpoint();
                return Ok(progress);
            }
            progress.events += n;
            progress.commits += 1;
        }
    }

    /// Keeps folding new events until `stop` resolves.
    pub async fn follow(&mut self, stop: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(stop);
        loop {
            self.catch_up().await?;
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = self.events.wait_for_append(Duration::from_millis(500)) => {}
            }
        }
    }

    /// The views in memory.
    pub fn projector(&self) -> &Projector {
        &self.projector
    }
}

/// Rebuilds the views from the first event: drops the stored ones, then catches up.
pub async fn rebuild(events: &dyn EventStore, models: &dyn ReadModels, batch: usize) -> Result<Progress, Error> {
    models.reset().await?;
    Runner::open(events, models, batch).await?.catch_up().await
}
