//! Keeps every active job driven while the engine service runs: one runner
//! task per job, resumed from the log at start, restarted with back-off when
//! the store or NATS fails, and never two for the same job in one process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::runner::{self, Runner};

/// The jobs this process drives.
#[derive(Clone)]
pub struct Supervisor {
    runner: Runner,
    running: Arc<Mutex<HashSet<String>>>,
}

impl Supervisor {
    /// Supervises jobs run by `runner`.
    pub fn new(runner: Runner) -> Self {
        Self { runner, running: Arc::default() }
    }

    /// Drives a job in the background unless this process already does.
    pub fn drive(&self, job_id: &str) {
        let fresh = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(job_id.to_string());
        if !fresh {
            return;
        }
        let (this, id) = (self.clone(), job_id.to_string());
        tokio::spawn(async move {
            match this.runner.run_resuming(&id).await {
                Ok(job) => tracing::info!(job = %id, state = ?job.status, "job ended"),
                Err(e) => tracing::error!(job = %id, "job runner stopped: {e}"),
            }
            this.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
        });
    }

    /// Resumes every job the log says is active; returns their ids.
    pub async fn resume(&self) -> Result<Vec<String>, runner::Error> {
        let ids = self.runner.active_jobs().await?;
        for id in &ids {
            tracing::info!(job = %id, "resuming");
            self.drive(id);
        }
        Ok(ids)
    }
}
