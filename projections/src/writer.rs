//! The view writer: reads the global log after its checkpoint, folds
//! each job event into that job's view, and stores the changed views with the
//! new checkpoint in one transaction per batch. Killed at any moment, it
//! resumes from the last commit: no event is applied twice or skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flame_events::Envelope;
use flame_events::store::{Error, EventStore};

use crate::store::{Mark, ReadModels, Stored, changed_parts};
use crate::view::JobView;

/// A job, its view and its events of a batch: one unit of parallel folding.
type Work<'e> = (String, JobView, Vec<&'e Envelope>);

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
    pub fn apply<'e>(&mut self, e: &'e Envelope) -> Option<&'e str> {
        self.checkpoint = e.position;
        let job = e.stream_id.strip_prefix("job-")?;
        match self.views.get_mut(job) {
            Some(view) => view.apply(e),
            None => self.views.entry(job.to_string()).or_default().apply(e),
        }
        Some(job)
    }

    /// Folds a batch of the global log, jobs in parallel on up to `threads`
    /// threads (each job's events stay in order; jobs are independent).
    /// Returns the jobs it changed.
    pub fn apply_batch<'e>(&mut self, events: &'e [Envelope], threads: usize) -> BTreeSet<&'e str> {
        let Some(last) = events.last() else { return BTreeSet::new() };
        let mut by_job: BTreeMap<&'e str, Vec<&'e Envelope>> = BTreeMap::new();
        for e in events {
            if let Some(job) = e.stream_id.strip_prefix("job-") {
                by_job.entry(job).or_default().push(e);
            }
        }
        let changed: BTreeSet<&'e str> = by_job.keys().copied().collect();
        if threads <= 1 || by_job.len() < 2 || events.len() < 1000 {
            for e in events {
                self.apply(e);
            }
            return changed;
        }
        // Take the views out, deal the jobs to shards by event count, fold, put them back.
        let mut work: Vec<Work<'e>> =
            by_job.into_iter().map(|(job, evs)| (job.to_string(), self.views.remove(job).unwrap_or_default(), evs)).collect();
        work.sort_by_key(|w| std::cmp::Reverse(w.2.len()));
        // (events dealt, jobs) per thread.
        let mut shards: Vec<(usize, Vec<Work<'e>>)> = (0..threads).map(|_| (0, Vec::new())).collect();
        for w in work {
            if let Some(lightest) = shards.iter_mut().min_by_key(|s| s.0) {
                lightest.0 += w.2.len();
                lightest.1.push(w);
            }
        }
        std::thread::scope(|scope| {
            for (_, shard) in &mut shards {
                scope.spawn(move || {
                    for (_, view, evs) in shard.iter_mut() {
                        for e in evs.iter() {
                            view.apply(e);
                        }
                    }
                });
            }
        });
        for (_, shard) in shards {
            for (job, view, _) in shard {
                self.views.insert(job, view);
            }
        }
        self.checkpoint = last.position;
        changed
    }

    /// One job's view.
    pub fn view(&self, job_id: &str) -> Option<&JobView> {
        self.views.get(job_id)
    }

    /// One job's view, to take its changed parts.
    pub fn view_mut(&mut self, job_id: &str) -> Option<&mut JobView> {
        self.views.get_mut(job_id)
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

/// Folds an event store's job events into stored read models, batch by batch.
pub struct ViewWriter<'a> {
    events: &'a dyn EventStore,
    models: &'a dyn ReadModels,
    projector: Projector,
    marks: HashMap<String, Mark>,
    batch: usize,
    threads: usize,
}

impl<'a> ViewWriter<'a> {
    /// Loads the stored views and checkpoint. `batch`: events per transaction.
    pub async fn open(events: &'a dyn EventStore, models: &'a dyn ReadModels, batch: usize) -> Result<Self, Error> {
        let checkpoint = models.checkpoint().await?;
        let stored = if checkpoint > 0 { models.load_all().await? } else { Vec::new() };
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let projector = Projector::from_stored(checkpoint, &stored)?;
        let marks = projector.views.iter().map(|(id, v)| (id.clone(), Mark::of(v))).collect();
        Ok(Self { events, models, projector, marks, batch: batch.max(1), threads })
    }

    /// Folds and commits one batch; returns how many events it folded (0 = caught up).
    /// After an error the runner's memory is ahead of the store: drop it and open a new one.
    pub async fn step(&mut self) -> Result<u64, Error> {
        let batch = self.events.read_all(self.projector.checkpoint() + 1, self.batch).await?;
        if batch.is_empty() {
            return Ok(0);
        }
        let changed = self.projector.apply_batch(&batch, self.threads);
        let mut parts = Vec::new();
        let mut marks = Vec::new();
        for id in changed {
            if let Some(view) = self.projector.view_mut(id) {
                let (p, mark) = changed_parts(view, self.marks.get(id).copied().unwrap_or_default())?;
                parts.extend(p);
                marks.push((id.to_string(), mark));
            }
        }
        self.models.commit(parts, self.projector.checkpoint()).await?;
        // Only once committed do the marks move on (a failed commit is retried from a reload).
        self.marks.extend(marks);
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
    ViewWriter::open(events, models, batch).await?.catch_up().await
}
