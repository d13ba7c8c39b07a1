//! The trace projection: each job's trace (`flamectl trace`: job -> setup
//! and rounds -> steps -> tasks) exported over OTLP as its parts become
//! final. The spans come from the event log, not from live `tracing` spans:
//! a job outlives any engine process (restarts, replicas), and only the log
//! knows when each step began and ended. Their ids are those `flamectl
//! trace` shows and the commands' `traceparent` names, so the spans workers
//! export for the commands they ran join the same trace.
//!
//! A part (the setup, a round, the job's own span) is sent once it is final:
//! when it ended, or when the job did. The checkpoint (`otlp:<url>`) moves
//! once a batch's parts are sent; after a restart, the parts that were final
//! at the checkpoint count as sent. A receiver that stays away delays the
//! spans and loses none; a crash between a send and the checkpoint's save
//! may send that batch's parts twice (same ids).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use flame_events::Envelope;
use flame_events::store::EventStore;
use flame_projections::trace::{self, Span};
use flame_transport::otlp::{self, Attr, Kind, SpanData};

/// A job's trace parts that are final: (the part's path, its spans). The
/// job's own span is the part `""`, alone; the setup and each round come
/// with everything under them.
pub fn final_parts(job_id: &str, tree: &Span) -> Vec<(String, Vec<SpanData>)> {
    let mut out = Vec::new();
    for part in &tree.children {
        if part.finished || tree.finished {
            let mut spans = Vec::new();
            flatten(job_id, part, Some(&tree.id), &mut spans);
            out.push((part.path.clone(), spans));
        }
    }
    if tree.finished {
        out.push((String::new(), vec![span_data(job_id, tree, None)]));
    }
    out
}

fn flatten(job_id: &str, s: &Span, parent: Option<&str>, out: &mut Vec<SpanData>) {
    out.push(span_data(job_id, s, parent));
    for c in &s.children {
        flatten(job_id, c, Some(&s.id), out);
    }
}

fn span_data(job_id: &str, s: &Span, parent: Option<&str>) -> SpanData {
    let (trace_id, span_id) = otlp::ids(&s.trace_id, &s.id).unwrap_or(([1; 16], [1; 8]));
    let parent = parent.and_then(|p| otlp::ids(&s.trace_id, p)).map(|(_, p)| p);
    let ns = |t: chrono::DateTime<chrono::Utc>| t.timestamp_nanos_opt().unwrap_or(0).max(0) as u64;
    let mut attributes = vec![
        ("flame.job_id".to_string(), Attr::Str(job_id.to_string())),
        ("flame.kind".to_string(), Attr::Str(s.kind.to_string())),
        ("flame.path".to_string(), Attr::Str(s.path.clone())),
        ("flame.critical".to_string(), Attr::Bool(s.critical)),
    ];
    if let Some(w) = &s.worker {
        attributes.push(("flame.worker".to_string(), Attr::Str(w.clone())));
    }
    let error = (!s.finished).then(|| {
        if s.kind == "task" { "dropped: no report before the round closed" } else { "unfinished: the job ended first" }.to_string()
    });
    SpanData {
        trace_id,
        span_id,
        parent,
        name: s.name.clone(),
        kind: Kind::Internal,
        start_ns: ns(s.start),
        end_ns: ns(s.end),
        attributes,
        error,
    }
}

/// Why an export step stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The receiver is away or refused.
    #[error(transparent)]
    Otlp(#[from] otlp::Error),
    /// The event store failed.
    #[error("event store: {0}")]
    Store(#[from] flame_events::store::Error),
}

/// The trace projection.
pub struct TraceExporter {
    store: Arc<dyn EventStore>,
    exporter: otlp::Exporter,
    checkpoint: String,
    /// Job streams read so far (jobs not yet at an end).
    streams: HashMap<String, Vec<Envelope>>,
    /// Parts sent, by job.
    sent: HashMap<String, BTreeSet<String>>,
}

impl TraceExporter {
    /// Exports to the OTLP/HTTP receiver at `endpoint` (`http://host:4318`).
    pub fn new(store: Arc<dyn EventStore>, endpoint: &str) -> Self {
        let exporter = otlp::Exporter::new(endpoint, "flame-engine");
        let checkpoint = format!("otlp:{}", exporter.url());
        Self { store, exporter, checkpoint, streams: HashMap::new(), sent: HashMap::new() }
    }

    /// Sends every part that became final since the checkpoint; returns how many events that covered.
    pub async fn catch_up(&mut self) -> Result<u64, Error> {
        crate::follow::catch_up(self).await
    }

    /// Follows the log until `stop` resolves; failures are retried with a growing pause.
    pub async fn follow(&mut self, stop: impl std::future::Future<Output = ()>) {
        crate::follow::follow(self, stop).await;
    }

    /// Sends job `job`'s parts that are final and not yet sent; `at` is the
    /// checkpoint before this batch (what was final by then was sent).
    async fn sync_job(&mut self, job: &str, at: u64) -> Result<(), Error> {
        let known = self.streams.entry(job.to_string()).or_default();
        let next = known.last().map_or(1, |e| e.version + 1);
        known.extend(self.store.read_stream(&format!("job-{job}"), next).await?);
        let Some(tree) = trace::build(known.iter()) else { return Ok(()) };
        if !self.sent.contains_key(job) {
            let before = trace::build(known.iter().filter(|e| e.position <= at));
            let done = before.map(|t| final_parts(job, &t).into_iter().map(|(p, _)| p).collect()).unwrap_or_default();
            self.sent.insert(job.to_string(), done);
        }
        let sent = self.sent.get(job).cloned().unwrap_or_default();
        let new: Vec<(String, Vec<SpanData>)> = final_parts(job, &tree).into_iter().filter(|(p, _)| !sent.contains(p)).collect();
        if !new.is_empty() {
            let spans: Vec<SpanData> = new.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
            let exporter = self.exporter.clone();
            tokio::task::spawn_blocking(move || exporter.export(&spans))
                .await
                .unwrap_or_else(|e| Err(otlp::Error { url: "-".into(), why: format!("the export panicked: {e}") }))?;
            self.sent.entry(job.to_string()).or_default().extend(new.into_iter().map(|(p, _)| p));
        }
        if tree.finished {
            // The whole trace is out; a job that starts again is read again.
            self.streams.remove(job);
            self.sent.remove(job);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::follow::JobProjection for TraceExporter {
    type Error = Error;
    const WHAT: &'static str = "trace export";

    fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    fn checkpoint(&self) -> &str {
        &self.checkpoint
    }

    async fn sync(&mut self, job: &str, at: u64) -> Result<(), Error> {
        self.sync_job(job, at).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{History, envelopes};
    use flame_events::job::{JobEvent, Metrics};

    fn paths(parts: &[(String, Vec<SpanData>)]) -> Vec<&str> {
        parts.iter().map(|(p, _)| p.as_str()).collect()
    }

    #[test]
    fn parts_become_final_as_they_end_and_the_job_last() {
        let h = History::created(2).started().initialized().round(1).round_started(2).then(crate::testing::update(2, "t0"));
        let tree = trace::build(&envelopes(&h.events)).expect("trace");
        let parts = final_parts(crate::testing::JOB, &tree);
        assert_eq!(paths(&parts), ["setup", "round 1"], "round 2 is open, the job too");
        // Round 1: the round, its train step with both tasks, the aggregate; all children of the job's span.
        let round1 = &parts[1].1;
        assert_eq!(round1.len(), 5);
        assert_eq!(round1[0].parent, otlp::ids(&tree.trace_id, &tree.id).map(|(_, s)| s));
        assert!(round1.iter().all(|s| s.error.is_none() && s.trace_id == round1[0].trace_id));

        let done = h.then(crate::testing::update(2, "t1")).then(JobEvent::JobFailed { reason: "stopped".into() });
        let tree = trace::build(&envelopes(&done.events)).expect("trace");
        let parts = final_parts(crate::testing::JOB, &tree);
        assert_eq!(paths(&parts), ["setup", "round 1", "round 2", ""], "the job's end makes everything final");
        let round2 = &parts[2].1;
        assert_eq!(round2[0].error.as_deref(), Some("unfinished: the job ended first"), "round 2 never aggregated");
        assert!(parts[3].1[0].parent.is_none(), "the job's span is the root");
    }

    #[test]
    fn a_dropped_trainer_is_an_error_span() {
        let h = History::created(2)
            .started()
            .initialized()
            .round_started(1)
            .then(crate::testing::update(1, "t0"))
            .then(JobEvent::TrainingClosed { round: 1, dropped: vec!["t1".into()] })
            .then(JobEvent::RoundAggregated {
                round: 1,
                digest: "m1".into(),
                inputs: vec!["u1t0".into()],
                metrics: Metrics::new(),
                optimizer_state: None,
            });
        let tree = trace::build(&envelopes(&h.events)).expect("trace");
        let parts = final_parts(crate::testing::JOB, &tree);
        let dropped = parts[1].1.iter().find(|s| s.name == "t1").expect("t1's span");
        assert!(dropped.error.as_deref().is_some_and(|e| e.starts_with("dropped")));
    }
}
