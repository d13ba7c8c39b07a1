//! What the projections to outside systems (MLflow runs, OTLP traces)
//! share: they follow the global log from a checkpoint of their own, bring
//! each job a batch touched up to date, and move the checkpoint only once
//! the whole batch went through, so an outage of the system delays it and
//! loses nothing.

use std::sync::Arc;
use std::time::Duration;

use flame_events::store::EventStore;

/// A projection of jobs into a system outside the log.
#[async_trait::async_trait]
pub trait JobProjection: Send {
    /// Why a step failed (the step is tried again).
    type Error: std::fmt::Display + From<flame_events::store::Error> + Send;

    /// What it is, for log lines (`MLflow projection`).
    const WHAT: &'static str;

    /// The event log it follows.
    fn store(&self) -> &Arc<dyn EventStore>;

    /// Its checkpoint's name in the store.
    fn checkpoint(&self) -> &str;

    /// Brings job `job` up to its events; `at` is the checkpoint before this
    /// batch (what the job's events up to it said went through before).
    async fn sync(&mut self, job: &str, at: u64) -> Result<(), Self::Error>;
}

/// Brings `p` up to the log's head, a batch of up to 1000 events at a time; returns how many events it covered.
pub async fn catch_up<P: JobProjection>(p: &mut P) -> Result<u64, P::Error> {
    let mut covered = 0;
    loop {
        let at = p.store().load_checkpoint(p.checkpoint()).await?;
        let events = p.store().read_all(at + 1, 1000).await?;
        let Some(last) = events.last().map(|e| e.position) else { return Ok(covered) };
        let mut jobs: Vec<&str> = events.iter().filter_map(|e| e.stream_id.strip_prefix("job-")).collect();
        jobs.sort_unstable();
        jobs.dedup();
        for job in jobs {
            p.sync(job, at).await?;
        }
        let checkpoint = p.checkpoint().to_string();
        p.store().save_checkpoint(&checkpoint, last).await?;
        covered += events.len() as u64;
    }
}

/// Keeps `p` up to the log until `stop` resolves; a failure is logged and
/// tried again after a pause that doubles up to 15 s.
pub async fn follow<P: JobProjection>(p: &mut P, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let idle = Duration::from_millis(500);
    let mut pause = idle;
    loop {
        let wait = match catch_up(p).await {
            Ok(_) => {
                pause = idle;
                idle
            }
            Err(e) => {
                tracing::warn!("{}: {e}; trying again in {pause:?}", P::WHAT);
                let p = pause;
                pause = (pause * 2).min(Duration::from_secs(15));
                p
            }
        };
        let store = p.store().clone();
        tokio::select! {
            _ = &mut stop => return,
            _ = store.wait_for_append(wait) => {}
        }
    }
}

/// Follows in a task of its own until `stopped` turns true; the task gives the projection back.
pub fn spawn<P: JobProjection + 'static>(mut p: P, mut stopped: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<P> {
    tokio::spawn(async move {
        follow(&mut p, async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await;
        p
    })
}
