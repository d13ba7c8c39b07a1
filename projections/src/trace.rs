//! A job as a tree of timed spans, from its events alone: job -> setup and
//! rounds -> steps (placement, deploy, train, aggregate) -> tasks. Each
//! round's critical path (its slowest trainer, then the aggregation) is
//! marked. Renders as a text tree or as Chrome trace-event JSON (Perfetto).
//!
//! Ids are OpenTelemetry's: the trace id is the job id's 16 bytes (a hash of
//! it when it is no UUID), and a span's id is a hash of the job id and the
//! span's path (`round 3/train/trainer-1`). The engine knows a step's path
//! when it sends the command, so it can name the span as the parent of the
//! worker's own (the command's `traceparent`), and the spans it exports later
//! from the log carry the same ids.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use flame_events::Envelope;
use flame_events::job::JobEvent;

use crate::view::seconds_between;

/// One timed piece of a job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Span {
    /// What it is: `job`, `setup`, `placement`, `deploy`, `initial model`, `round 3`, `train`, `aggregate`, a task id.
    pub name: String,
    /// `job`, `phase`, `round`, `step` or `task`.
    pub kind: &'static str,
    /// The worker that did it (tasks and aggregation).
    pub worker: Option<String>,
    /// Start.
    pub start: DateTime<Utc>,
    /// End (the last event seen when it never ended).
    pub end: DateTime<Utc>,
    /// Whether it ended (false: still open, or cut off by a stop or failure).
    pub finished: bool,
    /// On its round's critical path.
    pub critical: bool,
    /// Where it sits: the names from the job down, `/`-separated (`""` for the job).
    pub path: String,
    /// Its OpenTelemetry span id (16 hex digits): [`span_id`] of the job and the path.
    pub id: String,
    /// The job's OpenTelemetry trace id (32 hex digits), the same in every span of the job.
    pub trace_id: String,
    /// Parts.
    pub children: Vec<Span>,
}

fn sha256(parts: &[&str]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// A job's OpenTelemetry trace id (32 hex digits): its id's bytes when it is a UUID.
pub fn trace_id(job_id: &str) -> String {
    match uuid::Uuid::parse_str(job_id) {
        Ok(u) if !u.is_nil() => u.simple().to_string(),
        _ => hex::encode(&sha256(&["flame-trace", job_id])[..16]),
    }
}

/// The OpenTelemetry span id (16 hex digits) of the span at `path` in job `job_id`'s trace.
pub fn span_id(job_id: &str, path: &str) -> String {
    let h = sha256(&["flame-span", job_id, path]);
    // An all-zero id is invalid in OpenTelemetry.
    if h[..8].iter().all(|b| *b == 0) { "0000000000000001".into() } else { hex::encode(&h[..8]) }
}

/// The W3C `traceparent` naming the span at `path` of job `job_id` (sampled).
pub fn traceparent(job_id: &str, path: &str) -> String {
    format!("00-{}-{}-01", trace_id(job_id), span_id(job_id, path))
}

/// The path of a round's step (`round 3/train`), and of a task under it (`round 3/train/trainer-1`).
pub fn round_path(round: u32, step: &str, task: Option<&str>) -> String {
    match task {
        Some(t) => format!("round {round}/{step}/{t}"),
        None => format!("round {round}/{step}"),
    }
}

impl Span {
    fn new(name: impl Into<String>, kind: &'static str, start: DateTime<Utc>) -> Self {
        Self {
            name: name.into(),
            kind,
            worker: None,
            start,
            end: start,
            finished: false,
            critical: false,
            path: String::new(),
            id: String::new(),
            trace_id: String::new(),
            children: Vec::new(),
        }
    }

    fn close(&mut self, at: DateTime<Utc>) {
        self.end = at;
        self.finished = true;
    }

    /// Seconds it took.
    pub fn seconds(&self) -> f64 {
        seconds_between(self.start, self.end)
    }
}

#[derive(Default)]
struct Builder {
    job_id: String,
    job: Option<Span>,
    setup: Option<Span>,
    deploying: BTreeMap<String, Span>,
    rounds: Vec<Span>,
    /// When each update of the open rounds arrived, by digest (a group aggregate starts after its last input).
    arrivals: BTreeMap<String, DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    /// A fork: the job (and round) its first model comes from.
    forked: Option<(String, u32)>,
}

impl Builder {
    fn setup_step(&mut self, name: &str) -> Option<&mut Span> {
        self.setup.as_mut()?.children.iter_mut().find(|s| s.name == name)
    }

    fn open_round(&mut self, round: u32) -> Option<&mut Span> {
        let name = format!("round {round}");
        self.rounds.iter_mut().rev().find(|r| r.name == name)
    }

    fn apply(&mut self, e: &Envelope) {
        let at = e.recorded_at;
        self.last = Some(at);
        let Ok(event) = JobEvent::from_envelope(e) else { return };
        let actor = e.actor.strip_prefix("worker:").map(str::to_string);
        match event {
            JobEvent::JobCreated { job_id, name, .. } => {
                self.job_id = job_id;
                self.job = Some(Span::new(name, "job", at));
            }
            JobEvent::JobForked(o) => {
                if let Some(job) = self.job.as_mut() {
                    job.name = format!("{} (fork of job {} from round {})", job.name, o.parent_job, o.from_round);
                }
                self.forked = Some((o.parent_job, o.from_round));
            }
            JobEvent::JobStarting {} => {
                let mut setup = Span::new("setup", "phase", at);
                setup.children.push(Span::new("placement", "step", at));
                self.setup = Some(setup);
                self.deploying.clear();
            }
            JobEvent::TaskAssigned { task_id, worker_id } => {
                let mut t = Span::new(task_id.clone(), "task", at);
                t.worker = Some(worker_id);
                self.deploying.insert(task_id, t);
            }
            JobEvent::JobDeploying {} => {
                if let Some(p) = self.setup_step("placement") {
                    p.close(at);
                }
                if let Some(s) = self.setup.as_mut() {
                    s.children.push(Span::new("deploy", "step", at));
                }
            }
            JobEvent::TaskDeployed { task_id, .. } => {
                if let Some(mut t) = self.deploying.remove(&task_id) {
                    // A task's deployment runs from the deploy step's start.
                    t.start = self.setup_step("deploy").map_or(t.start, |d| d.start);
                    t.close(at);
                    if let Some(d) = self.setup_step("deploy") {
                        d.children.push(t);
                    }
                }
            }
            JobEvent::JobStarted {} => {
                if let Some(d) = self.setup_step("deploy") {
                    d.close(at);
                }
                match (self.forked.clone(), self.setup.as_mut()) {
                    // A fork's first model is the parent's: setup ends here.
                    (Some((parent, round)), Some(s)) => {
                        let mut m = Span::new(format!("model of job {parent} after round {}", round.saturating_sub(1)), "step", at);
                        m.close(at);
                        s.children.push(m);
                        s.close(at);
                    }
                    (None, Some(s)) => s.children.push(Span::new("initial model", "step", at)),
                    _ => {}
                }
            }
            JobEvent::ModelInitialized { worker_id, .. } => {
                if let Some(i) = self.setup_step("initial model") {
                    i.worker = Some(worker_id);
                    i.close(at);
                }
                if let Some(s) = self.setup.as_mut() {
                    s.close(at);
                }
            }
            JobEvent::RoundStarted { round, .. } => {
                let mut r = Span::new(format!("round {round}"), "round", at);
                r.children.push(Span::new("train", "step", at));
                self.rounds.push(r);
            }
            JobEvent::UpdateReported { round, task_id, worker_id, digest, .. } => {
                self.arrivals.insert(digest, at);
                if let Some(r) = self.open_round(round) {
                    let start = r.start;
                    if let Some(train) = r.children.first_mut() {
                        let mut t = Span::new(task_id, "task", start);
                        t.worker = Some(worker_id);
                        t.close(at);
                        train.close(at);
                        train.children.push(t);
                    }
                }
            }
            JobEvent::TrainingClosed { round, dropped } => {
                if let Some(r) = self.open_round(round) {
                    let start = r.start;
                    if let Some(train) = r.children.first_mut() {
                        train.close(at);
                        for task in dropped {
                            // A straggler: cut off at the deadline, never finished.
                            let mut t = Span::new(task, "task", start);
                            t.end = at;
                            train.children.push(t);
                        }
                    }
                }
            }
            JobEvent::GroupAggregated { round, task_id, worker_id, inputs, .. } => {
                let start = inputs.iter().filter_map(|d| self.arrivals.get(d)).max().copied();
                if let Some(r) = self.open_round(round) {
                    if r.children.len() < 2 {
                        r.children.push(Span::new("group aggregates", "step", start.unwrap_or(r.start)));
                    }
                    if let Some(groups) = r.children.get_mut(1) {
                        let mut t = Span::new(task_id, "task", start.unwrap_or(groups.start));
                        t.worker = Some(worker_id);
                        t.close(at);
                        groups.start = groups.start.min(t.start);
                        groups.close(at);
                        groups.children.push(t);
                    }
                }
            }
            JobEvent::RoundAggregated { round, .. } => {
                self.arrivals.clear();
                if let Some(r) = self.open_round(round) {
                    let train_end = r.children.iter().map(|t| t.end).max().unwrap_or(r.start);
                    let mut agg = Span::new("aggregate", "step", train_end);
                    agg.worker = actor;
                    agg.close(at);
                    r.children.push(agg);
                    r.close(at);
                    mark_critical(r);
                }
            }
            JobEvent::JobCompleted { .. } | JobEvent::JobFailed { .. } | JobEvent::JobTerminated { .. } => {
                if let Some(j) = self.job.as_mut() {
                    j.close(at);
                }
            }
            _ => {}
        }
    }

    fn finish(mut self) -> Option<Span> {
        let mut job = self.job.take()?;
        let last = self.last.unwrap_or(job.start);
        if !job.finished {
            job.end = last;
        }
        let stretch = |s: &mut Span| {
            if !s.finished {
                s.end = last;
            }
        };
        if let Some(mut setup) = self.setup.take() {
            for step in &mut setup.children {
                stretch(step);
            }
            stretch(&mut setup);
            job.children.push(setup);
        }
        for mut r in self.rounds {
            for step in &mut r.children {
                if !step.finished && step.children.is_empty() {
                    step.end = last;
                }
            }
            stretch(&mut r);
            job.children.push(r);
        }
        let mut seen = BTreeMap::new();
        name_spans(&mut job, None, &self.job_id, &mut seen);
        Some(job)
    }
}

/// Gives each span its path and id; a path seen before (a round run again)
/// gets `#2`, `#3`, ... so that ids stay unique.
fn name_spans(s: &mut Span, parent: Option<&str>, job_id: &str, seen: &mut BTreeMap<String, u32>) {
    let mut path = match parent {
        None => String::new(),
        Some("") => s.name.clone(),
        Some(p) => format!("{p}/{}", s.name),
    };
    let n = seen.entry(path.clone()).or_insert(0);
    *n += 1;
    if *n > 1 {
        path = format!("{path}#{n}");
    }
    s.id = span_id(job_id, &path);
    s.trace_id = trace_id(job_id);
    for c in &mut s.children {
        name_spans(c, Some(&path), job_id, seen);
    }
    s.path = path;
}

/// Marks the slowest finished trainer of the round and the steps around it.
fn mark_critical(round: &mut Span) {
    round.critical = true;
    for step in &mut round.children {
        step.critical = true;
        let slowest = step.children.iter_mut().filter(|t| t.finished).max_by(|a, b| a.end.cmp(&b.end).then_with(|| b.name.cmp(&a.name)));
        if let Some(t) = slowest {
            t.critical = true;
        }
    }
}

/// The job's span tree; `None` when the events hold no `JobCreated`.
pub fn build<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Option<Span> {
    let mut b = Builder::default();
    for e in events {
        b.apply(e);
    }
    b.finish()
}

/// The tree as text, times in seconds from the job's start; `*` marks the critical path.
pub fn render_tree(job: &Span) -> String {
    let mut out = String::new();
    out.push_str(&format!("trace {}\n", job.trace_id));
    out.push_str(&format!("{:<44} {:>9} {:>9} {:>9}  span id\n", "span", "start s", "end s", "took s"));
    line(&mut out, job, job.start, "", "", true);
    out
}

fn line(out: &mut String, s: &Span, origin: DateTime<Utc>, prefix: &str, branch: &str, root: bool) {
    let mut label = format!("{prefix}{branch}{}", s.name);
    if let Some(w) = &s.worker {
        label.push_str(&format!(" @{w}"));
    }
    if s.critical {
        label.push_str(" *");
    }
    if !s.finished {
        label.push_str(if s.kind == "task" { " (dropped)" } else { " (unfinished)" });
    }
    out.push_str(&format!(
        "{:<44} {:>9.3} {:>9.3} {:>9.3}  {}\n",
        label,
        seconds_between(origin, s.start),
        seconds_between(origin, s.end),
        s.seconds(),
        s.id
    ));
    let child_prefix = if root { String::new() } else { format!("{prefix}{}", if branch == "└─ " { "   " } else { "│  " }) };
    for (i, c) in s.children.iter().enumerate() {
        let last = i + 1 == s.children.len();
        line(out, c, origin, &child_prefix, if last { "└─ " } else { "├─ " }, false);
    }
}

/// Chrome trace-event JSON (the "JSON object format"): complete (`X`) events
/// in microseconds, one thread per lane (job, rounds, each task), with names.
pub fn chrome(job: &Span) -> Value {
    let origin = job.start;
    let mut lanes: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = Vec::new();
    collect(job, origin, "job", &mut lanes, &mut events);
    for (name, tid) in &lanes {
        events.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}));
    }
    events.push(json!({"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": format!("job {}", job.name)}}));
    json!({"traceEvents": events, "displayTimeUnit": "ms"})
}

fn collect(s: &Span, origin: DateTime<Utc>, lane: &str, lanes: &mut BTreeMap<String, u64>, out: &mut Vec<Value>) {
    let next = lanes.len() as u64;
    let tid = *lanes.entry(lane.to_string()).or_insert(next);
    let micros = |t: DateTime<Utc>| (t - origin).num_microseconds().unwrap_or(0);
    out.push(json!({
        "name": s.name,
        "cat": s.kind,
        "ph": "X",
        "ts": micros(s.start),
        "dur": micros(s.end) - micros(s.start),
        "pid": 1,
        "tid": tid,
        "args": {"worker": s.worker, "critical": s.critical, "finished": s.finished},
    }));
    for c in &s.children {
        // Tasks get a lane each so that concurrent tasks do not overlap on one thread.
        let child_lane = if c.kind == "task" { format!("task {}", c.name) } else { "job".to_string() };
        collect(c, origin, &child_lane, lanes, out);
    }
}
