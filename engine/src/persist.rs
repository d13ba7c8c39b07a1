//! The job aggregate's persistence through cqrs-es, on top of our own
//! `EventStore` (cqrs-es's snapshot and aggregate stores apply events twice
//! in 0.5.0, so they are not used; see docs/adr/0001).
//!
//! Loading is incremental: the last state committed through this repository
//! is cached, and a load reads only the events appended after it, so a job
//! with thousands of events does not re-fold its whole stream per command.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cqrs_es::{AggregateContext, AggregateError, EventEnvelope};

use flame_events::job::{self, JobEvent};
use flame_events::store::{self, EventStore, ExpectedVersion};

use crate::job::{Job, Rejection};

/// Metadata key naming who caused the events (`engine`, `worker:<id>`, `user:<name>`).
pub const ACTOR: &str = "actor";
/// Metadata key naming the command or report that caused the events.
pub const CAUSATION: &str = "causation_id";

/// A job as loaded: its state and its stream version.
pub struct Loaded {
    job_id: String,
    job: Job,
}

impl AggregateContext<Job> for Loaded {
    fn aggregate(&mut self) -> &mut Job {
        &mut self.job
    }
}

/// Jobs in an `EventStore`, as cqrs-es's event store.
#[derive(Clone)]
pub struct Jobs {
    store: Arc<dyn EventStore>,
    cache: Arc<Mutex<HashMap<String, Job>>>,
}

fn database(e: store::Error) -> AggregateError<Rejection> {
    match e {
        store::Error::Conflict { .. } => AggregateError::AggregateConflict,
        other => AggregateError::DatabaseConnectionError(Box::new(other)),
    }
}

impl Jobs {
    /// Jobs in this store.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store, cache: Arc::default() }
    }

    /// A job's current state (empty `Job` with version 0 if it has no events).
    pub async fn load(&self, job_id: &str) -> Result<Job, store::Error> {
        let mut job = self.cached(job_id).unwrap_or_default();
        let newer = self.store.read_stream(&job::stream_id(job_id), job.version + 1).await?;
        for e in &newer {
            job.apply(&JobEvent::from_envelope(e)?);
        }
        if !newer.is_empty() {
            self.remember(job_id, &job);
        }
        Ok(job)
    }

    /// Appends events decided outside cqrs-es (a batch of worker reports), each with its own
    /// actor and causation, in one atomic append after `job`'s version; returns the new state.
    /// Fails with a conflict if someone appended after `job` was loaded.
    pub async fn append_batch(&self, job: &Job, batch: Vec<(JobEvent, String, Option<String>)>) -> Result<Job, store::Error> {
        let mut next = job.clone();
        let mut new = Vec::with_capacity(batch.len());
        for (event, actor, cause) in &batch {
            next.apply(event);
            let e = event.to_new_event(&job.job_id, actor);
            new.push(match cause {
                Some(c) => e.caused_by(c.clone()),
                None => e,
            });
        }
        let expected = if job.version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(job.version) };
        if let Err(e) = self.store.append(&job::stream_id(&job.job_id), expected, new).await {
            self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&job.job_id);
            return Err(e);
        }
        self.remember(&job.job_id, &next);
        tracing::debug!(job = %job.job_id, events = batch.len(), version = next.version, "recorded a batch of reports");
        Ok(next)
    }

    /// The state last loaded or committed through this repository, without reading the store.
    pub fn last_known(&self, job_id: &str) -> Option<Job> {
        self.cached(job_id)
    }

    fn cached(&self, job_id: &str) -> Option<Job> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(job_id).cloned()
    }

    fn remember(&self, job_id: &str, job: &Job) {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(job_id.to_string(), job.clone());
    }
}

impl cqrs_es::EventStore<Job> for Jobs {
    type AC = Loaded;

    async fn load_events(&self, job_id: &str) -> Result<Vec<EventEnvelope<Job>>, AggregateError<Rejection>> {
        let stored = self.store.read_stream(&job::stream_id(job_id), 1).await.map_err(database)?;
        stored
            .iter()
            .map(|e| {
                let payload = JobEvent::from_envelope(e).map_err(database)?;
                let metadata = HashMap::from([
                    ("event_id".to_string(), e.event_id.to_string()),
                    ("position".to_string(), e.position.to_string()),
                    (ACTOR.to_string(), e.actor.clone()),
                ]);
                Ok(EventEnvelope { aggregate_id: job_id.to_string(), sequence: e.version as usize, payload, metadata })
            })
            .collect()
    }

    async fn load_aggregate(&self, job_id: &str) -> Result<Loaded, AggregateError<Rejection>> {
        let job = self.load(job_id).await.map_err(database)?;
        Ok(Loaded { job_id: job_id.to_string(), job })
    }

    async fn commit(
        &self,
        events: Vec<JobEvent>,
        loaded: Loaded,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<Job>>, AggregateError<Rejection>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // The sink already applied `events` to `loaded.job`; its version before them is:
        let before = loaded.job.version - events.len() as u64;
        let expected = if before == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(before) };
        let actor = metadata.get(ACTOR).map_or("engine", String::as_str);
        let new = events
            .iter()
            .map(|e| {
                let n = e.to_new_event(&loaded.job_id, actor);
                match metadata.get(CAUSATION) {
                    Some(c) => n.caused_by(c.clone()),
                    None => n,
                }
            })
            .collect();
        let result = self.store.append(&job::stream_id(&loaded.job_id), expected, new).await;
        if let Err(e) = result {
            // What is cached may be behind what was stored by someone else: drop it.
            self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&loaded.job_id);
            return Err(database(e));
        }
        self.remember(&loaded.job_id, &loaded.job);
        for (i, e) in events.iter().enumerate() {
            tracing::info!(job = %loaded.job_id, event = e.event_type(), version = before + 1 + i as u64, actor, "recorded");
        }
        Ok(events
            .into_iter()
            .enumerate()
            .map(|(i, payload)| EventEnvelope {
                aggregate_id: loaded.job_id.clone(),
                sequence: (before + 1) as usize + i,
                payload,
                metadata: metadata.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::{CqrsFramework, EventStore as _};
    use flame_events::sqlite::SqliteStore;

    use super::*;
    use crate::job::{JobCommand, Status};
    use crate::testing::{self, JOB};

    fn create() -> JobCommand {
        let JobEvent::JobCreated { job_id, name, source, spec, tasks } = testing::created(1) else { unreachable!() };
        JobCommand::Create { job_id, name, source, spec, tasks }
    }

    #[tokio::test]
    async fn commands_commit_through_the_event_store_once() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(":memory:").expect("store"));
        let jobs = Jobs::new(store.clone());
        let cqrs = CqrsFramework::new(jobs.clone(), vec![], ());
        cqrs.execute_with_metadata(JOB, create(), HashMap::from([(ACTOR.to_string(), "user:ada".to_string())])).await.expect("create");
        cqrs.execute(JOB, JobCommand::Start { now_ms: 0 }).await.expect("start");
        let assignments = ["t0", "t1", "agg"].iter().map(|t| (t.to_string(), format!("w-{t}"))).collect();
        cqrs.execute(JOB, JobCommand::Assign(assignments)).await.expect("assign");

        let stored = store.read_stream(&job::stream_id(JOB), 1).await.expect("read");
        assert_eq!(stored.len(), 7, "created, starting, deploy timer, three assignments, deploying: each once");
        assert_eq!(stored[0].actor, "user:ada");
        let job = jobs.load(JOB).await.expect("load");
        assert_eq!((job.status, job.version), (Status::Deploying, 7));
        // A fresh repository over the same store folds the same state.
        assert_eq!(Jobs::new(store.clone()).load(JOB).await.expect("load"), job);
        assert_eq!(jobs.load_events(JOB).await.expect("events").len(), 7);

        // Rejections record nothing.
        let again = cqrs.execute(JOB, create()).await;
        assert!(matches!(again, Err(AggregateError::UserError(Rejection::IllegalInState { .. }))));
        assert_eq!(store.read_stream(&job::stream_id(JOB), 1).await.expect("read").len(), 7);
    }

    #[tokio::test]
    async fn a_writer_behind_the_store_gets_a_conflict_and_then_catches_up() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(":memory:").expect("store"));
        let (a, b) = (Jobs::new(store.clone()), Jobs::new(store.clone()));
        CqrsFramework::new(a.clone(), vec![], ()).execute(JOB, create()).await.expect("create");
        let stale = b.load_aggregate(JOB).await.expect("load");
        CqrsFramework::new(a.clone(), vec![], ()).execute(JOB, JobCommand::Start { now_ms: 0 }).await.expect("start");
        let mut stale = stale;
        let events = Job::handle(stale.aggregate(), JobCommand::Start { now_ms: 1 }).expect("decide");
        for e in &events {
            stale.aggregate().apply(e);
        }
        let err = b.commit(events, stale, HashMap::new()).await.expect_err("stale");
        assert!(matches!(err, AggregateError::AggregateConflict));
        assert_eq!(b.load(JOB).await.expect("reload").status, Status::Starting);
    }
}
