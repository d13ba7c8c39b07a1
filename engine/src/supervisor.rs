//! Keeps every active job driven while the engine service runs: one runner
//! task per job, resumed from the log at start, restarted with back-off when
//! the store or NATS fails, and never two for the same job in one process.
//!
//! With leases (engine replicas, `flame-engine serve --replica-id`), a job is
//! driven only by the replica that holds its lease `job.<id>`. A replica
//! renews the leases of the jobs it drives and stops driving a job the moment
//! its lease is no longer valid. Every replica keeps looking for active jobs
//! whose lease is free (their driver died, or ended them) and takes them over.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flame_transport::lease::Leases;

use crate::persist::Fence;
use crate::runner::{self, Runner};

/// How often a replica scans the event log for active jobs it has not heard
/// of through their leases (a job whose driver died before anyone saw it).
const SCAN_EVERY: Duration = Duration::from_secs(30);

/// The jobs this process drives.
#[derive(Clone)]
pub struct Supervisor {
    runner: Runner,
    /// Jobs with a runner task in this process (driving, or trying to take the lease).
    running: Arc<Mutex<HashSet<String>>>,
    /// Active jobs this process knows of, driven here or elsewhere.
    known: Arc<Mutex<HashSet<String>>>,
    leases: Option<Leases>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The lease of a job.
pub fn job_lease(job_id: &str) -> String {
    format!("job.{job_id}")
}

impl Supervisor {
    /// Supervises jobs run by `runner`, as the only engine.
    pub fn new(runner: Runner) -> Self {
        Self { runner, running: Arc::default(), known: Arc::default(), leases: None }
    }

    /// The same supervisor as one of several replicas, driving only the jobs whose lease it holds.
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Drives a job in the background unless this process already does (or, with leases, another replica does).
    pub fn drive(&self, job_id: &str) {
        locked(&self.known).insert(job_id.to_string());
        if !locked(&self.running).insert(job_id.to_string()) {
            return;
        }
        let (this, id) = (self.clone(), job_id.to_string());
        tokio::spawn(async move {
            match &this.leases {
                None => match this.runner.run_resuming(&id).await {
                    Ok(job) => {
                        tracing::info!(job = %id, state = ?job.status, "job ended");
                        locked(&this.known).remove(&id);
                    }
                    Err(e) => tracing::error!(job = %id, "job runner stopped: {e}"),
                },
                Some(leases) => this.drive_leased(leases, &id).await,
            }
            locked(&this.running).remove(&id);
        });
    }

    /// Drives the job while this replica holds its lease.
    async fn drive_leased(&self, leases: &Leases, id: &str) {
        let mut lease = match leases.acquire(&job_lease(id)).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return, // another replica drives it
            Err(e) => {
                tracing::warn!(job = %id, "cannot take the job's lease: {e}");
                return;
            }
        };
        tracing::info!(job = %id, replica = leases.holder(), "took the job's lease; driving it");
        let fence = Fence::until(leases.valid_until(&lease));
        let run = self.runner.run_resuming_fenced(id, &fence);
        tokio::pin!(run);
        let mut renew = tokio::time::interval(leases.renew_every());
        let ended = loop {
            tokio::select! {
                ended = &mut run => break Some(ended),
                _ = renew.tick() => {
                    if !leases.keep(&mut lease).await {
                        break None;
                    }
                    fence.extend(leases.valid_until(&lease));
                }
            }
        };
        match ended {
            Some(Ok(job)) => {
                tracing::info!(job = %id, state = ?job.status, "job ended");
                locked(&self.known).remove(id);
                leases.release(lease).await;
            }
            Some(Err(runner::Error::Fenced(_))) => {
                tracing::warn!(job = %id, replica = leases.holder(), "the job's lease ran out before it was renewed; stopped driving it");
            }
            Some(Err(e)) => {
                tracing::error!(job = %id, "job runner stopped: {e}");
                locked(&self.known).remove(id);
                leases.release(lease).await;
            }
            // Dropping the run stops it at its next step; a write already on its way is
            // fenced by the stream's expected version.
            None => tracing::warn!(job = %id, replica = leases.holder(), "lost the job's lease; stopped driving it"),
        }
    }

    /// Resumes every active job the log names; returns their ids. With
    /// leases, also keeps taking over the jobs whose driver is gone.
    pub async fn resume(&self) -> Result<Vec<String>, runner::Error> {
        let ids = self.runner.active_jobs().await?;
        for id in &ids {
            tracing::info!(job = %id, "resuming");
            self.drive(id);
        }
        if let Some(leases) = &self.leases {
            tokio::spawn(self.clone().take_over(leases.clone()));
        }
        Ok(ids)
    }

    /// Tries, every renewal period, the leases of the active jobs this
    /// replica knows of and does not drive: those held elsewhere stay
    /// untouched; a free one (its holder died) is taken and the job resumed.
    async fn take_over(self, leases: Leases) {
        let (mut scanned, mut listed) = (Instant::now(), Instant::now());
        loop {
            tokio::time::sleep(leases.renew_every()).await;
            // Jobs driven anywhere show as held leases, listed well within a lease's lifetime so that a
            // job is known before its driver's lease can run out; jobs nobody holds come from a log
            // scan now and then.
            if listed.elapsed() >= leases.ttl() / 2 {
                listed = Instant::now();
                match leases.held("job.").await {
                    Ok(held) => locked(&self.known).extend(held),
                    Err(e) => tracing::debug!("cannot list the held leases: {e}"),
                }
            }
            if scanned.elapsed() >= SCAN_EVERY {
                scanned = Instant::now();
                match self.runner.active_jobs().await {
                    Ok(ids) => locked(&self.known).extend(ids),
                    Err(e) => tracing::warn!("cannot scan the log for active jobs: {e}"),
                }
            }
            let idle: Vec<String> = {
                let running = locked(&self.running);
                locked(&self.known).iter().filter(|id| !running.contains(*id)).cloned().collect()
            };
            for id in idle {
                self.drive(&id);
            }
        }
    }
}
