//! The one write path of the job aggregate. Every command, a user's, the
//! controller's or a batch of workers' reports, goes through [`Jobs::write`]:
//! the aggregate decides on the job's latest state, the events are appended
//! after that state's version with each event's own cause (who, and which
//! command or report), and a writer that appended first makes it decide again
//! on the new state. See docs/adr/0006-one-write-path.md for why this is not
//! cqrs-es's framework.
//!
//! Loading is incremental: the last state written or read through a `Jobs`
//! is cached, and a load reads only the events appended after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flame_events::job::{self, JobEvent};
use flame_events::protocol::Report;
use flame_events::store::{self, EventStore, ExpectedVersion};
use flame_events::{Actor, Cause};

use crate::job::{Job, JobCommand, Rejection};

/// Attempts a write makes when other writers keep appending first.
const ATTEMPTS: u32 = 10;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The aggregate refused the command; nothing was recorded.
    #[error("{0}")]
    Refused(Rejection),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Other writers appended first every time.
    #[error("other writers kept appending to the job's stream; gave up after {ATTEMPTS} attempts")]
    Contended,
    /// The writer's fence closed (its lease on the job is no longer valid); nothing was recorded.
    #[error("this engine's lease on the job is no longer valid; another replica drives it")]
    Fenced,
}

/// Until when a writer may append for a job: the validity of the lease it
/// drives the job under (engine replicas). Checked right before each append,
/// without a round trip, so a replica that was paused past its lease (and
/// whose job another replica has taken) records nothing when it wakes. The
/// default fence never closes (the only engine).
#[derive(Clone, Debug, Default)]
pub struct Fence(Option<Arc<Mutex<Instant>>>);

impl Fence {
    /// A fence open until `until`.
    pub fn until(until: Instant) -> Self {
        Self(Some(Arc::new(Mutex::new(until))))
    }

    /// Keeps the fence open until `until` (after a renewal).
    pub fn extend(&self, until: Instant) {
        if let Some(m) = &self.0 {
            *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = until;
        }
    }

    /// Whether the writer may still append.
    pub fn holds(&self) -> bool {
        self.0.as_ref().is_none_or(|m| Instant::now() < *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Jobs in an event store.
#[derive(Clone)]
pub struct Jobs {
    store: Arc<dyn EventStore>,
    /// The last state of each job written or read, shared: a load that finds
    /// nothing newer in the store costs no copy of the job (with thousands of
    /// tasks, a copy is most of what a batch of reports costs).
    cache: Arc<Mutex<HashMap<String, Arc<Job>>>>,
}

impl Jobs {
    /// Jobs in this store.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store, cache: Arc::default() }
    }

    /// A job's current state (empty `Job` with version 0 if it has no events).
    pub async fn load(&self, job_id: &str) -> Result<Job, store::Error> {
        Ok(Arc::unwrap_or_clone(self.load_shared(job_id).await?))
    }

    /// [`Jobs::load`], sharing the cached state rather than copying it.
    pub async fn load_shared(&self, job_id: &str) -> Result<Arc<Job>, store::Error> {
        let cached = self.cached(job_id).unwrap_or_default();
        let newer = self.store.read_stream(&job::stream_id(job_id), cached.version + 1).await?;
        if newer.is_empty() {
            return Ok(cached);
        }
        let mut job = Arc::unwrap_or_clone(cached);
        for e in &newer {
            job.apply(&JobEvent::from_envelope(e)?);
        }
        let job = Arc::new(job);
        self.remember(job_id, &job);
        Ok(job)
    }

    /// The state last loaded or written through this `Jobs`, without reading the store.
    pub fn last_known(&self, job_id: &str) -> Option<Job> {
        self.cached(job_id).map(Arc::unwrap_or_clone)
    }

    /// Decides and records: `decide` sees the job's latest state and returns
    /// the events with their causes, which are appended in one atomic append
    /// after that state's version. If another writer appended first, the job
    /// is reloaded and `decide` runs again on the new state. Returns the state
    /// after the events (unchanged when `decide` returned none).
    pub async fn write(&self, job_id: &str, decide: impl Fn(&Job) -> Result<Vec<(JobEvent, Cause)>, Rejection>) -> Result<Job, Error> {
        self.write_fenced(job_id, &Fence::default(), decide).await
    }

    /// [`Jobs::write`], appending only while `fence` holds.
    pub async fn write_fenced(
        &self,
        job_id: &str,
        fence: &Fence,
        decide: impl Fn(&Job) -> Result<Vec<(JobEvent, Cause)>, Rejection>,
    ) -> Result<Job, Error> {
        let applying = |job: &mut Job| {
            let decided = decide(job)?;
            for (event, _) in &decided {
                job.apply(event);
            }
            Ok(decided)
        };
        Ok(Arc::unwrap_or_clone(self.commit(job_id, fence, applying).await?))
    }

    /// The write path: `decide_and_apply` is given a copy of the job's
    /// latest state, returns the events it decides with their causes, and has
    /// applied each of them to that copy (so a batch is decided event by event
    /// on one copy). The events are appended after the state's version; if
    /// another writer appended first, the job is reloaded and it runs again.
    async fn commit(
        &self,
        job_id: &str,
        fence: &Fence,
        decide_and_apply: impl Fn(&mut Job) -> Result<Vec<(JobEvent, Cause)>, Rejection>,
    ) -> Result<Arc<Job>, Error> {
        for attempt in 1..=ATTEMPTS {
            let job = self.load_shared(job_id).await?;
            let mut next = Job::clone(&job);
            let decided = decide_and_apply(&mut next).map_err(Error::Refused)?;
            if decided.is_empty() {
                return Ok(job);
            }
            let mut new = Vec::with_capacity(decided.len());
            for (event, cause) in &decided {
                let e = event.to_new_event(job_id, &cause.actor.to_string());
                new.push(match &cause.causation {
                    Some(c) => e.caused_by(c.clone()),
                    None => e,
                });
            }
            let expected = if job.version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(job.version) };
            if !fence.holds() {
                return Err(Error::Fenced);
            }
            let appending = std::time::Instant::now();
            match self.store.append(&job::stream_id(job_id), expected, new).await {
                Ok(_) => {
                    let optimizer = next.spec.as_ref().map_or("", |s| s.optimizer.name());
                    crate::metrics::get().recorded(
                        job_id,
                        optimizer,
                        &decided.iter().map(|(e, _)| e).collect::<Vec<_>>(),
                        appending.elapsed(),
                    );
                    for (i, (e, cause)) in decided.iter().enumerate() {
                        tracing::debug!(job = job_id, event = e.event_type(), version = job.version + 1 + i as u64, actor = %cause.actor, "recorded");
                    }
                    let next = Arc::new(next);
                    self.remember(job_id, &next);
                    return Ok(next);
                }
                Err(store::Error::Conflict { .. }) => {
                    // What is cached is behind what someone else stored: read it again, decide again.
                    self.forget(job_id);
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                Err(e) => {
                    self.forget(job_id);
                    return Err(e.into());
                }
            }
        }
        Err(Error::Contended)
    }

    /// One command, all its events caused by `cause`; refused as a whole.
    pub async fn execute(&self, job_id: &str, command: JobCommand, cause: Cause) -> Result<Job, Error> {
        self.execute_fenced(job_id, &Fence::default(), command, cause).await.map(Arc::unwrap_or_clone)
    }

    /// [`Jobs::execute`], appending only while `fence` holds; the new state shared.
    pub async fn execute_fenced(&self, job_id: &str, fence: &Fence, command: JobCommand, cause: Cause) -> Result<Arc<Job>, Error> {
        let handle = |job: &mut Job| {
            let events = job.handle(command.clone())?;
            for e in &events {
                job.apply(e);
            }
            Ok(events.into_iter().map(|e| (e, cause.clone())).collect())
        };
        self.commit(job_id, fence, handle).await
    }

    /// A batch of workers' reports in one append: each accepted one's events,
    /// each refused one recorded as `ReportRejected`, caused by its worker and
    /// the command it answers. The new state shared.
    pub async fn take_reports(&self, job_id: &str, fence: &Fence, reports: &[Report]) -> Result<Arc<Job>, Error> {
        self.commit(job_id, fence, |job| Ok(apply_reports(job, reports))).await
    }

    fn cached(&self, job_id: &str) -> Option<Arc<Job>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(job_id).cloned()
    }

    fn remember(&self, job_id: &str, job: &Arc<Job>) {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(job_id.to_string(), job.clone());
    }

    fn forget(&self, job_id: &str) {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(job_id);
    }
}

/// The events a batch of reports makes, each decided on the state the ones
/// before it left (each event is applied to `job` as it is decided): an
/// accepted report's events, or the record of its refusal.
pub fn apply_reports(job: &mut Job, reports: &[Report]) -> Vec<(JobEvent, Cause)> {
    let mut out = Vec::new();
    for r in reports {
        let cause = Cause { actor: Actor::worker(&r.worker_id), causation: Some(r.command_id.clone()) };
        let events = match job.handle(JobCommand::Report(r.clone())) {
            Ok(events) => events,
            Err(rejection) => {
                tracing::warn!(job = %job.job_id, worker = %r.worker_id, "report rejected: {rejection}");
                let record = JobCommand::RecordRejection { report: Box::new(r.clone()), reason: rejection.to_string() };
                job.handle(record).unwrap_or_default()
            }
        };
        for e in events {
            job.apply(&e);
            out.push((e, cause.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use flame_stores::sqlite::SqliteStore;

    use super::*;
    use crate::job::Status;
    use crate::testing::{self, JOB, report, trained};

    fn create() -> JobCommand {
        let JobEvent::JobCreated { job_id, name, source, spec, tasks } = testing::created(1) else { unreachable!() };
        JobCommand::Create { job_id, name, source, spec, tasks, fork: None }
    }

    fn engine() -> Cause {
        Cause::by(Actor::Engine)
    }

    #[tokio::test]
    async fn commands_commit_through_the_event_store_once() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(":memory:").expect("store"));
        let jobs = Jobs::new(store.clone());
        jobs.execute(JOB, create(), Cause::by(Actor::user("ada"))).await.expect("create");
        jobs.execute(JOB, JobCommand::Start { now_ms: 0 }, engine()).await.expect("start");
        let assignments = ["t0", "t1", "agg"].iter().map(|t| (t.to_string(), format!("w-{t}"))).collect();
        jobs.execute(JOB, JobCommand::Assign(assignments), engine()).await.expect("assign");

        let stored = store.read_stream(&job::stream_id(JOB), 1).await.expect("read");
        assert_eq!(stored.len(), 7, "created, starting, deploy timer, three assignments, deploying: each once");
        assert_eq!(stored[0].actor, "user:ada");
        assert_eq!(stored[1].actor, "engine");
        let job = jobs.load(JOB).await.expect("load");
        assert_eq!((job.status, job.version), (Status::Deploying, 7));
        // A fresh repository over the same store folds the same state.
        assert_eq!(Jobs::new(store.clone()).load(JOB).await.expect("load"), job);

        // Rejections record nothing.
        let again = jobs.execute(JOB, create(), engine()).await;
        assert!(matches!(again, Err(Error::Refused(Rejection::IllegalInState { .. }))));
        assert_eq!(store.read_stream(&job::stream_id(JOB), 1).await.expect("read").len(), 7);
    }

    #[tokio::test]
    async fn reports_carry_their_own_worker_and_command_and_refusals_are_recorded() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(":memory:").expect("store"));
        let jobs = Jobs::new(store.clone());
        for e in testing::History::created(2).started().initialized().round_started(1).events {
            jobs.write(JOB, |_| Ok(vec![(e.clone(), engine())])).await.expect("history");
        }
        let JobCommand::Report(good) = report("t0", 1, trained(1, "t0")) else { unreachable!() };
        let JobCommand::Report(late) = report("t1", 7, trained(7, "t1")) else { unreachable!() };
        let before = jobs.load(JOB).await.expect("load").version;
        let job = jobs.take_reports(JOB, &Fence::default(), &[good, late]).await.expect("reports");
        assert_eq!(job.version, before + 2, "one update, one recorded refusal, in one append");
        let stored = store.read_stream(&job::stream_id(JOB), before + 1).await.expect("read");
        assert_eq!(
            stored.iter().map(|e| (e.event_type.as_str(), e.actor.as_str(), e.causation_id.as_deref())).collect::<Vec<_>>(),
            [("UpdateReported", "worker:w-t0", Some("c-t0-1")), ("ReportRejected", "worker:w-t1", Some("c-t1-7"))]
        );
    }

    /// A replica whose lease ran out (it was paused, say) records nothing when
    /// it goes on, while a fence that is extended in time lets it write.
    #[tokio::test]
    async fn a_closed_fence_records_nothing() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(":memory:").expect("store"));
        let jobs = Jobs::new(store.clone());
        jobs.execute(JOB, create(), Cause::by(Actor::user("ada"))).await.expect("create");
        let fence = Fence::until(Instant::now() + Duration::from_secs(60));
        jobs.execute_fenced(JOB, &fence, JobCommand::Start { now_ms: 0 }, engine()).await.expect("an open fence lets it write");
        let before = store.read_stream(&job::stream_id(JOB), 1).await.expect("read").len();
        fence.extend(Instant::now());
        let refused = jobs.execute_fenced(JOB, &fence, JobCommand::Stop { reason: "late".into() }, engine()).await;
        assert!(matches!(refused, Err(Error::Fenced)), "{refused:?}");
        assert_eq!(store.read_stream(&job::stream_id(JOB), 1).await.expect("read").len(), before, "nothing recorded past the fence");
        fence.extend(Instant::now() + Duration::from_secs(60));
        jobs.execute_fenced(JOB, &fence, JobCommand::Stop { reason: "renewed".into() }, engine()).await.expect("renewed: it writes again");
    }

    /// A store where another writer gets in first once: just before the first
    /// append through it, a user's stop lands in the job's stream.
    struct Racing {
        inner: Arc<SqliteStore>,
        raced: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl EventStore for Racing {
        async fn append(
            &self,
            stream: &str,
            expected: ExpectedVersion,
            events: Vec<flame_events::NewEvent>,
        ) -> Result<store::AppendResult, store::Error> {
            if !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let before = self.inner.read_stream(stream, 1).await?.len() as u64;
                let stop = JobEvent::JobStopping { reason: "stopped by user:bob".into() }.to_new_event(JOB, "user:bob");
                self.inner.append(stream, ExpectedVersion::Exact(before), vec![stop]).await?;
            }
            self.inner.append(stream, expected, events).await
        }
        async fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<flame_events::Envelope>, store::Error> {
            self.inner.read_stream(stream, from_version).await
        }
        async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<flame_events::Envelope>, store::Error> {
            self.inner.read_all(from_position, limit).await
        }
        async fn load_checkpoint(&self, name: &str) -> Result<u64, store::Error> {
            self.inner.load_checkpoint(name).await
        }
        async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), store::Error> {
            self.inner.save_checkpoint(name, position).await
        }
        fn location(&self) -> String {
            self.inner.location()
        }
    }

    #[tokio::test]
    async fn a_writer_behind_the_store_decides_again_on_the_new_state() {
        let inner = Arc::new(SqliteStore::open(":memory:").expect("store"));
        let setup = Jobs::new(inner.clone());
        for e in testing::History::created(2).started().initialized().events {
            setup.write(JOB, |_| Ok(vec![(e.clone(), engine())])).await.expect("history");
        }
        let racing: Arc<dyn EventStore> = Arc::new(Racing { inner: inner.clone(), raced: false.into() });
        let jobs = Jobs::new(racing);
        let seen = std::sync::Mutex::new(Vec::new());
        let result = jobs
            .write(JOB, |job| {
                seen.lock().expect("lock").push(job.status);
                job.handle(JobCommand::StartRound { now_ms: 0, spent: Default::default() })
                    .map(|events| events.into_iter().map(|e| (e, engine())).collect())
            })
            .await;
        // The first decision conflicted with the stop; decided again on the stopping job, the round is refused.
        assert_eq!(seen.into_inner().expect("lock"), [Status::Running, Status::Stopping]);
        assert!(matches!(result, Err(Error::Refused(Rejection::IllegalInState { command: "start round", .. }))), "{result:?}");
        let stored = inner.read_stream(&job::stream_id(JOB), 1).await.expect("read");
        assert_eq!(stored.last().map(|e| e.event_type.as_str()), Some("JobStopping"), "no round started after the stop");
    }
}
