//! Looking at jobs from their events: `events`, `replay`, `trace`, `audit`,
//! `watch`, `metrics` and `project`. Every command reads either the event
//! log itself (`--store`, as an auditor would) or a running engine's API
//! (`--api`). Data goes to stdout, diagnostics to stderr.
//!
//! Exit codes: 0 done; 1 the store, the engine or the network failed;
//! 2 bad arguments; 3 the job has no events; 6 `replay --verify` found a
//! difference.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use flame_engine::job::Job;
use flame_events::job::{self, JobEvent};
use flame_events::{Envelope, EventStore};
use flame_projections::render::{self, EventFilter};
use flame_projections::{JobView, store as views, trace, verify, view};

use crate::Output;

/// Where the events come from.
#[derive(clap::Args, Debug, Clone)]
pub struct Source {
    /// Read the event log directly: sqlite:PATH or mongodb://HOST:PORT/DB.
    #[arg(long, env = "FLAME_STORE", default_value = "sqlite:.flame/events.db")]
    pub store: String,
    /// Read through a running engine's API instead (http://HOST:PORT).
    #[arg(long, conflicts_with = "store")]
    pub api: Option<String>,
    /// Bearer token for --api.
    #[arg(long, env = "FLAME_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// An opened source.
pub enum Events {
    /// The store.
    Store(Arc<dyn EventStore>, String),
    /// The API.
    Api {
        /// Base URL.
        base: String,
        /// Authorization header value.
        auth: String,
    },
}

impl Events {
    /// Opens the source.
    pub async fn open(source: &Source) -> anyhow::Result<Self> {
        Ok(match &source.api {
            Some(api) => Events::Api {
                base: api.trim_end_matches('/').to_string(),
                auth: source.token.as_ref().map(|t| format!("Bearer {t}")).unwrap_or_default(),
            },
            None => Events::Store(flame_stores::open_store(&source.store).await?, source.store.clone()),
        })
    }

    /// Every job's id, oldest first.
    pub async fn job_ids(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Events::Store(store, _) => Ok(flame_events::store::stream_ids(store.as_ref(), "job-").await?),
            Events::Api { base, auth } => {
                let (base, auth) = (base.clone(), auth.clone());
                tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
                    let url = format!("{base}/jobs");
                    let mut resp = ureq::get(&url).header("authorization", &auth).call().with_context(|| format!("GET {url}"))?;
                    let jobs: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
                    Ok(jobs.as_array().into_iter().flatten().filter_map(|j| j["id"].as_str().map(str::to_string)).collect())
                })
                .await?
            }
        }
    }

    /// The job's events from stream version `from` on.
    pub async fn read(&self, job_id: &str, from: u64) -> anyhow::Result<Vec<Envelope>> {
        match self {
            Events::Store(store, _) => Ok(store.read_stream(&job::stream_id(job_id), from).await?),
            Events::Api { base, auth } => {
                let (base, auth, id) = (base.clone(), auth.clone(), job_id.to_string());
                tokio::task::spawn_blocking(move || api_events(&base, &auth, &id, from)).await?
            }
        }
    }

    /// Waits a little for more events.
    pub async fn wait(&self) {
        match self {
            Events::Store(store, _) => store.wait_for_append(Duration::from_millis(500)).await,
            Events::Api { .. } => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }

    fn location(&self) -> String {
        match self {
            Events::Store(s, _) => s.location(),
            Events::Api { base, .. } => base.clone(),
        }
    }
}

fn api_events(base: &str, auth: &str, job_id: &str, mut from: u64) -> anyhow::Result<Vec<Envelope>> {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let mut out = Vec::new();
    loop {
        let url = format!("{base}/jobs/{job_id}/events?from={from}&limit=1000");
        let mut resp = agent
            .get(&url)
            .header("authorization", auth)
            .call()
            .with_context(|| format!("GET {url} (is flame-engine serve running there?)"))?;
        let status = resp.status().as_u16();
        let body: Value = serde_json::from_str(&resp.body_mut().read_to_string()?).unwrap_or(Value::Null);
        match status {
            200 => {}
            404 => return Ok(out),
            401 => bail!("the engine refused the token (401): give --token or FLAME_TOKEN"),
            _ => bail!("GET {url}: {status} {}", body["detail"].as_str().unwrap_or("")),
        }
        let page: Vec<Envelope> =
            serde_json::from_value(body["events"].clone()).context("the engine sent events this flamectl cannot read")?;
        out.extend(page);
        match body["next"].as_u64() {
            Some(next) => from = next,
            None => return Ok(out),
        }
    }
}

async fn all_events(source: &Events, job_id: &str) -> anyhow::Result<Option<Vec<Envelope>>> {
    let events = source.read(job_id, 1).await?;
    if events.is_empty() {
        eprintln!("error: job '{job_id}' has no events in {}", source.location());
        return Ok(None);
    }
    Ok(Some(events))
}

macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout().lock(), $($arg)*)
    };
}

macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

fn ended(e: &Envelope) -> bool {
    matches!(e.event_type.as_str(), "JobCompleted" | "JobFailed" | "JobTerminated" | "JobDeleted")
}

/// `flamectl events`.
pub async fn events(job_id: &str, source: &Source, filter: &EventFilter, follow: bool, output: Output) -> anyhow::Result<ExitCode> {
    let source = Events::open(source).await?;
    let mut next = 1;
    let mut header = output == Output::Table;
    loop {
        let batch = source.read(job_id, next).await?;
        if next == 1 && batch.is_empty() && !follow {
            eprintln!("error: job '{job_id}' has no events in {}", source.location());
            return Ok(ExitCode::from(3));
        }
        for e in &batch {
            next = e.version + 1;
            if !filter.matches(e) {
                continue;
            }
            if std::mem::take(&mut header) {
                outln!("{}", render::EVENTS_HEADER)?;
            }
            match output {
                Output::Json => outln!("{}", serde_json::to_string(e)?)?,
                Output::Table => outln!("{}", render::event_line(e))?,
            }
        }
        // Following ends with the job.
        if !follow || batch.iter().any(ended) {
            return Ok(ExitCode::SUCCESS);
        }
        if batch.is_empty() {
            source.wait().await;
        }
    }
}

/// The events up to a point: a global position, or the end of a round.
fn cut(events: Vec<Envelope>, until: Option<u64>, round: Option<u32>) -> Vec<Envelope> {
    events
        .into_iter()
        .take_while(|e| until.is_none_or(|p| e.position <= p))
        .take_while(|e| {
            round.is_none_or(|n| !(e.event_type == "RoundStarted" && e.payload["round"].as_u64().is_some_and(|r| r > u64::from(n))))
        })
        .collect()
}

/// What the engine's aggregate and the projection say about the same job;
/// the first event after which they disagree, if any.
fn engine_disagreement(events: &[Envelope]) -> anyhow::Result<Option<String>> {
    let mut engine = Job::default();
    let mut projection = JobView::default();
    for e in events {
        let event = JobEvent::from_envelope(e)?;
        engine.apply(&event);
        projection.apply(e);
        let s = &projection.status;
        let pairs: [(&str, Value, Value); 7] = [
            ("state", json!(engine.status), json!(s.state)),
            ("round", json!(engine.round.number), json!(s.round)),
            ("rounds completed", json!(engine.rounds_completed), json!(s.rounds_completed)),
            ("global model", json!(engine.global_model), json!(s.global_model)),
            ("metrics", json!(engine.metrics), json!(s.metrics)),
            ("failure", json!(engine.failure), json!(s.failure)),
            ("refused reports", json!(engine.rejected), json!(s.rejected)),
        ];
        for (what, a, b) in pairs {
            if a != b {
                return Ok(Some(format!(
                    "after event v{} (position {}, {}), the engine's aggregate says {what} = {a} but the projection says {b}",
                    e.version, e.position, e.event_type
                )));
            }
        }
    }
    Ok(None)
}

/// `flamectl replay`.
pub async fn replay(
    job_id: &str,
    source: &Source,
    until: Option<u64>,
    round: Option<u32>,
    check: bool,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let events_source = Events::open(source).await?;
    let Some(events) = all_events(&events_source, job_id).await? else { return Ok(ExitCode::from(3)) };
    let total = events.len();
    let events = cut(events, until, round);
    let rebuilt = view::fold(&events);
    let engine = Job::from_events(&events.iter().map(JobEvent::from_envelope).collect::<Result<Vec<_>, _>>()?);
    if !check {
        match output {
            Output::Json => outln!("{}", json!({"view": rebuilt, "engine": engine, "events": events.len(), "of": total}))?,
            Output::Table => {
                out!("{}", render::summary(&rebuilt))?;
                if events.len() < total {
                    outln!("(replayed {} of {total} events)", events.len())?;
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    // --verify: every check, then one verdict.
    let mut problems = Vec::new();
    let mut checks = Vec::new();
    if let Some(d) = engine_disagreement(&events)? {
        problems.push(json!({"check": "engine", "problem": d}));
    } else {
        checks.push(format!("the projection agrees with the engine's aggregate after each of {} events", events.len()));
    }
    // Determinism: folding half, storing, loading and folding the rest gives the same view.
    let half = events.len() / 2;
    let mut resumed: JobView = serde_json::from_str(&serde_json::to_string(&view::fold(&events[..half]))?)?;
    for e in &events[half..] {
        resumed.apply(e);
    }
    if serde_json::to_string(&resumed)? != serde_json::to_string(&rebuilt)? {
        problems.push(json!({"check": "resume", "problem": format!("folding {half} events, storing the view and folding the rest differs from one fold")}));
    } else {
        checks.push("a view stored halfway and resumed equals one fold".into());
    }
    match (&events_source, until.is_some() || round.is_some()) {
        (Events::Store(_, url), false) => {
            let models = views::open(url).await?;
            match models.get(job_id).await? {
                None => eprintln!("note: no stored view of job '{job_id}' in {}: run `flamectl project --store {url}`", models.location()),
                Some(stored) => {
                    let at: u64 = serde_json::from_str::<Value>(&stored.json).ok().and_then(|v| v["position"].as_u64()).unwrap_or(u64::MAX);
                    let upto: Vec<Envelope> = events.iter().filter(|e| e.position <= at).cloned().collect();
                    match verify::check(&upto, &stored.json)? {
                        None => checks.push(format!("the stored view (up to position {at}) equals a rebuild byte for byte")),
                        Some(d) => problems.push(json!({
                            "check": "stored view",
                            "problem": format!(
                                "the stored view differs from a rebuild at {} (stored {}, rebuilt {}); first divergent event: v{} (position {}, {}); {} path(s) differ",
                                d.path, d.stored, d.rebuilt, d.version, d.position, d.event_type, d.paths.len()
                            ),
                            "divergence": d,
                        })),
                    }
                }
            }
        }
        (Events::Store(..), true) => eprintln!("note: --until/--round given: the stored view is not compared"),
        (Events::Api { .. }, _) => {
            eprintln!("note: through --api only the engine's aggregate is compared; give --store to check stored views")
        }
    }
    match output {
        Output::Json => outln!("{}", json!({"job_id": job_id, "ok": problems.is_empty(), "checks": checks, "problems": problems}))?,
        Output::Table => {
            for c in &checks {
                outln!("ok: {c}")?;
            }
            for p in &problems {
                outln!("DIFFERENCE ({}): {}", p["check"].as_str().unwrap_or(""), p["problem"].as_str().unwrap_or(""))?;
            }
        }
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: job '{job_id}': {} check(s) failed; rebuild the views with `flamectl project --rebuild` once the cause is known",
            problems.len()
        );
        Ok(ExitCode::from(6))
    }
}

/// `flamectl trace`.
pub async fn trace(job_id: &str, source: &Source, chrome: Option<&Path>, output: Output) -> anyhow::Result<ExitCode> {
    let source = Events::open(source).await?;
    let Some(events) = all_events(&source, job_id).await? else { return Ok(ExitCode::from(3)) };
    let Some(root) = trace::build(&events) else {
        eprintln!("error: job '{job_id}' has no JobCreated event");
        return Ok(ExitCode::from(3));
    };
    emit_spans(&root, None);
    if let Some(path) = chrome {
        std::fs::write(path, serde_json::to_string(&trace::chrome(&root))?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} (open it in https://ui.perfetto.dev or chrome://tracing)", path.display());
    }
    match output {
        Output::Json => outln!("{}", serde_json::to_string(&root)?)?,
        Output::Table => out!("{}", trace::render_tree(&root))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Emits the spans as `tracing` events (target `flame::trace`), so that a
/// subscriber or an OpenTelemetry layer can pick them up with their times.
fn emit_spans(s: &trace::Span, parent: Option<&str>) {
    tracing::info!(
        target: "flame::trace",
        name = %s.name,
        kind = s.kind,
        parent = parent.unwrap_or(""),
        worker = s.worker.as_deref().unwrap_or(""),
        start = %s.start.to_rfc3339(),
        end = %s.end.to_rfc3339(),
        seconds = s.seconds(),
        critical = s.critical,
        finished = s.finished,
    );
    for c in &s.children {
        emit_spans(c, Some(&s.name));
    }
}

/// `flamectl audit`.
pub async fn audit(job_id: &str, source: &Source, output: Output) -> anyhow::Result<ExitCode> {
    let source = Events::open(source).await?;
    let Some(events) = all_events(&source, job_id).await? else { return Ok(ExitCode::from(3)) };
    let v = view::fold(&events);
    match output {
        Output::Json => {
            for line in render::audit_lines(&v, &events) {
                outln!("{}", serde_json::to_string(&line)?)?;
            }
        }
        Output::Table => out!("{}", render::audit_table(&v, &events))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `flamectl metrics`.
pub async fn metrics(job_id: &str, source: &Source, plot: Option<&Path>, output: Output) -> anyhow::Result<ExitCode> {
    let source = Events::open(source).await?;
    let Some(events) = all_events(&source, job_id).await? else { return Ok(ExitCode::from(3)) };
    let v = view::fold(&events);
    let rows = render::metrics(&v);
    if let Some(path) = plot {
        crate::plot::draw(path, &format!("{} ({})", v.status.name, v.job_id), &rows)?;
        eprintln!("wrote {}", path.display());
    }
    match output {
        Output::Json => {
            for r in &rows {
                outln!("{}", serde_json::to_string(r)?)?;
            }
        }
        Output::Table => out!("{}", render::metrics_table(&rows))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `flamectl watch`: live bars until the job ends, then its final figures.
pub async fn watch(job_id: &str, source: &Source) -> anyhow::Result<ExitCode> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let source = Events::open(source).await?;
    let bars = MultiProgress::new();
    let style = |t: &str| ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar());
    let rounds = bars.add(ProgressBar::new(0).with_style(style("rounds  [{bar:30}] {pos}/{len} {msg}")));
    let updates = bars.add(ProgressBar::new(0).with_style(style("updates [{bar:30}] {pos}/{len} {msg}")));
    let mut worker_lines: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let mut v = JobView::default();
    let mut next = 1;
    let started = Instant::now();
    loop {
        let batch = source.read(job_id, next).await?;
        if v.version == 0 && batch.is_empty() && started.elapsed() > Duration::from_secs(10) {
            bars.clear()?;
            eprintln!("error: job '{job_id}' has no events in {} (waited 10 s)", source.location());
            return Ok(ExitCode::from(3));
        }
        for e in &batch {
            next = e.version + 1;
            v.apply(e);
        }
        let s = &v.status;
        rounds.set_length(u64::from(s.rounds_total));
        rounds.set_position(u64::from(s.rounds_completed));
        let mut metrics: Vec<String> = s.metrics.iter().filter(|(k, _)| *k != "test_samples").map(|(k, x)| format!("{k} {x:.4}")).collect();
        // Federated evaluation: the latest round the trainers evaluated.
        if let Some(r) = v.rounds.iter().rev().find(|r| !r.federated.is_empty()) {
            metrics.extend(
                r.federated.iter().filter(|(k, _)| *k != "test_samples").map(|(k, x)| format!("fed {k} {x:.4} (round {})", r.round)),
            );
        }
        rounds.set_message(format!("{} {}", s.state, metrics.join(" ")));
        let trainers = v.tasks.values().filter(|t| t.dataset.is_some() || t.role == "trainer").count() as u64;
        updates.set_length(trainers);
        if let Some(r) = v.rounds.last() {
            updates.set_position(r.participants.len() as u64);
            updates.set_message(format!("round {}{}", r.round, if r.model.is_some() { " aggregated" } else { "" }));
        }
        for (id, w) in &v.workers {
            let line =
                worker_lines.entry(id.clone()).or_insert_with(|| bars.add(ProgressBar::new_spinner().with_style(style("{spinner} {msg}"))));
            let state = if w.lost_at.is_some() { "lost" } else { "up" };
            let tasks: Vec<&str> = w.tasks.iter().map(String::as_str).collect();
            line.set_message(format!("{id:<24} {state:<4} tasks [{}]  updates {}  refused {}", tasks.join(","), w.updates, w.rejected));
            line.tick();
        }
        if batch.iter().any(ended) {
            break;
        }
        if batch.is_empty() {
            source.wait().await;
        }
    }
    for b in worker_lines.values().chain([&updates, &rounds]) {
        b.finish();
    }
    let s = &v.status;
    outln!("job {} ({}): {}", v.job_id, s.name, s.state)?;
    outln!("rounds completed: {}/{}", s.rounds_completed, s.rounds_total)?;
    for (k, x) in &s.metrics {
        outln!("{k}: {x:.4}")?;
    }
    if let Some(r) = v.rounds.iter().rev().find(|r| !r.federated.is_empty()) {
        for (k, x) in &r.federated {
            outln!("federated {k} (round {}): {x:.4}", r.round)?;
        }
    }
    if let Some(f) = &s.failure {
        outln!("failure: {f}")?;
    }
    Ok(if s.state == flame_events::job::Status::Completed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `flamectl project`: brings the stored read models up to date (or rebuilds them).
pub async fn project(store_url: &str, rebuild: bool, follow: bool, batch: usize) -> anyhow::Result<ExitCode> {
    let store = flame_stores::open_store(store_url).await?;
    let models = views::open(store_url).await?;
    let started = Instant::now();
    if rebuild {
        models.reset().await?;
    }
    let mut runner = flame_projections::ViewWriter::open(store.as_ref(), models.as_ref(), batch).await?;
    let p = runner.catch_up().await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "folded {} event(s) in {} commit(s) up to position {} in {secs:.2} s ({:.0} events/s); {} job view(s) in {}",
        p.events,
        p.commits,
        p.checkpoint,
        p.events as f64 / secs.max(1e-9),
        runner.projector().views().len(),
        models.location()
    );
    if follow {
        runner.follow(flame_transport::shutdown_signal()).await?;
    }
    Ok(ExitCode::SUCCESS)
}
