//! Text renderings of events and read models for `flamectl`: pure functions
//! from data to the lines a person reads (programs take the JSON forms).

use std::fmt::Write;

use serde::Serialize;

use flame_events::Envelope;

use flame_events::job::JobEvent;

use crate::view::{AuditEntry, JobView};

/// Which of a job's events to show.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only these event types (any, when empty).
    pub types: Vec<String>,
    /// Only events at or after this global position.
    pub since: Option<u64>,
    /// Only events about this round.
    pub round: Option<u32>,
    /// Only events caused by or naming this worker.
    pub worker: Option<String>,
}

impl EventFilter {
    /// Whether the event passes.
    pub fn matches(&self, e: &Envelope) -> bool {
        if !self.types.is_empty() && !self.types.iter().any(|t| t.eq_ignore_ascii_case(&e.event_type)) {
            return false;
        }
        if self.since.is_some_and(|p| e.position < p) {
            return false;
        }
        if let Some(round) = self.round
            && e.payload.get("round").and_then(|r| r.as_u64()) != Some(u64::from(round))
        {
            return false;
        }
        if let Some(w) = &self.worker {
            let by = e.actor.strip_prefix("worker:") == Some(w.as_str());
            let names = e.payload.get("worker_id").and_then(|v| v.as_str()) == Some(w.as_str());
            if !by && !names {
                return false;
            }
        }
        true
    }
}

fn clip(mut s: String, max: usize) -> String {
    if s.chars().count() > max {
        let cut = s.char_indices().nth(max).map_or(s.len(), |(i, _)| i);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The header of the events table.
pub const EVENTS_HEADER: &str = " ver    pos  recorded at (UTC)  type              actor                      payload";

/// One line of the events table.
pub fn event_line(e: &Envelope) -> String {
    let mut payload = e.payload.clone();
    if let Some(map) = payload.as_object_mut() {
        map.remove("type");
    }
    format!(
        "{:>4} {:>6}  {}  {:<17} {:<26} {}",
        e.version,
        e.position,
        e.recorded_at.format("%H:%M:%S%.3f"),
        e.event_type,
        e.actor,
        clip(payload.to_string(), 90)
    )
}

/// One audit entry with a one-line description of its event, for people and programs.
#[derive(Clone, Debug, Serialize)]
pub struct AuditLine<'a> {
    /// The entry.
    #[serde(flatten)]
    pub entry: &'a AuditEntry,
    /// What the event says, briefly.
    pub detail: String,
}

/// The audit log with each entry described from its event (matched by position).
pub fn audit_lines<'a>(view: &'a JobView, events: &[Envelope]) -> Vec<AuditLine<'a>> {
    let by_position: std::collections::HashMap<u64, &Envelope> = events.iter().map(|e| (e.position, e)).collect();
    view.audit
        .iter()
        .map(|a| {
            let described = by_position.get(&a.position).and_then(|e| JobEvent::from_envelope(e).ok()).map(|ev| crate::view::detail(&ev));
            AuditLine { entry: a, detail: described.or_else(|| a.reason.clone()).unwrap_or_default() }
        })
        .collect()
}

/// The audit log as a table: who did what and when, refusals included.
pub fn audit_table(view: &JobView, events: &[Envelope]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>6}  {:<23}  {:<26} {:<17} {:<9} {:<34} detail", "pos", "at (UTC)", "actor", "action", "outcome", "command");
    let job = format!("{}/", view.job_id);
    for line in audit_lines(view, events) {
        let a = line.entry;
        // Command ids are `<job>/<command>`: the job is the same on every line.
        let cause =
            a.causation_id.as_deref().map(|c| clip(c.strip_prefix(&job).unwrap_or(c).to_string(), 34)).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:>6}  {:<23}  {:<26} {:<17} {:<9} {:<34} {}",
            a.position,
            a.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            a.actor,
            a.action,
            a.outcome.as_str(),
            cause,
            line.detail
        );
    }
    out
}

/// One round's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricsRow {
    /// Round.
    pub round: u32,
    /// Evaluation of the round's model (`accuracy`, `loss`, ...).
    pub metrics: flame_events::job::Metrics,
    /// Federated evaluation of the round's model: sample-weighted means over the trainers' own held-out data.
    #[serde(default, skip_serializing_if = "flame_events::job::Metrics::is_empty")]
    pub federated: flame_events::job::Metrics,
    /// Mean local training loss of the accepted updates, when they reported one.
    pub train_loss: Option<f64>,
    /// Updates that went into the aggregate.
    pub participants: usize,
    /// Updates that missed the deadline.
    pub stragglers: usize,
    /// Samples behind the accepted updates.
    pub samples: u64,
    /// Seconds from the round's start to its aggregate.
    pub seconds: Option<f64>,
}

/// Per-round figures of a job.
pub fn metrics(view: &JobView) -> Vec<MetricsRow> {
    view.rounds
        .iter()
        .map(|r| {
            let losses: Vec<f64> = r.participants.iter().filter_map(|p| p.metrics.get("loss").copied()).collect();
            MetricsRow {
                round: r.round,
                metrics: r.metrics.clone(),
                federated: r.federated.clone(),
                train_loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                participants: if r.model.is_some() { r.inputs.len() } else { r.participants.len() },
                stragglers: r.stragglers.len(),
                samples: r.samples(),
                seconds: r.seconds(),
            }
        })
        .collect()
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// The per-round figures as a table.
pub fn metrics_table(rows: &[MetricsRow]) -> String {
    let mut out = String::new();
    let federated = rows.iter().any(|r| !r.federated.is_empty());
    let head = if federated { format!("  {:>12}  {:>8}", "fed accuracy", "fed loss") } else { String::new() };
    let _ = writeln!(
        out,
        "{:>5}  {:>8}  {:>8}  {:>10}  {:>12}  {:>10}  {:>7}  {:>7}{head}",
        "round", "accuracy", "loss", "train loss", "participants", "stragglers", "samples", "seconds"
    );
    for r in rows {
        let tail = if federated {
            format!("  {:>12}  {:>8}", num(r.federated.get("accuracy").copied(), 4), num(r.federated.get("loss").copied(), 4))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>5}  {:>8}  {:>8}  {:>10}  {:>12}  {:>10}  {:>7}  {:>7}{tail}",
            r.round,
            num(r.metrics.get("accuracy").copied(), 4),
            num(r.metrics.get("loss").copied(), 4),
            num(r.train_loss, 4),
            r.participants,
            r.stragglers,
            r.samples,
            num(r.seconds, 3)
        );
    }
    out
}

/// A job's state at a glance, as `replay` prints it.
pub fn summary(view: &JobView) -> String {
    let s = &view.status;
    let mut out = String::new();
    let _ = writeln!(out, "job {} ({})", view.job_id, s.name);
    let _ = writeln!(out, "  state:            {}", s.state);
    let _ = writeln!(out, "  round:            {} started, {} of {} aggregated", s.round, s.rounds_completed, s.rounds_total);
    let _ = writeln!(out, "  optimizer:        {}", s.optimizer);
    let _ = writeln!(out, "  global model:     {}", s.global_model.as_deref().unwrap_or("-"));
    let metrics: Vec<String> = s.metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    let _ = writeln!(out, "  metrics:          {}", if metrics.is_empty() { "-".into() } else { metrics.join(" ") });
    if let Some(f) = &s.failure {
        let _ = writeln!(out, "  failure:          {f}");
    }
    let _ = writeln!(out, "  refused reports:  {}", s.rejected);
    let _ = writeln!(out, "  excluded updates: {}", s.excluded);
    let _ = writeln!(out, "  events:           {} (up to position {})", view.version, view.position);
    let _ = writeln!(out, "tasks:");
    for (id, t) in &view.tasks {
        let worker = t.placements.last().map_or("-", |p| p.worker_id.as_str());
        let orphaned = if t.orphaned { " (orphaned)" } else { "" };
        let _ = writeln!(
            out,
            "  {:<20} {:<12} on {:<22} {} update(s), missed {}, refused {}, excluded {}{orphaned}",
            id,
            t.role,
            worker,
            t.updates.len(),
            t.missed.len(),
            t.rejected,
            t.excluded
        );
    }
    let _ = writeln!(out, "lineage:");
    for m in &view.lineage {
        let parts: Vec<String> = m.inputs.iter().map(|i| format!("{}:{}", i.task_id, i.samples)).collect();
        let _ = writeln!(
            out,
            "  round {:>3}  {}  <- {}  [{}]",
            m.round,
            m.digest.get(..16).unwrap_or(&m.digest),
            m.parent.as_deref().and_then(|p| p.get(..16)).unwrap_or("-"),
            parts.join(" ")
        );
    }
    out
}
