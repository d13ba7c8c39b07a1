//! The dashboard's pages as HTML, from read models (pure): the job list,
//! a job's page (progress, charts, the open round, lineage, trace, audit),
//! the login and upload forms. Charts are inline SVG drawn here, so the
//! pages need nothing from elsewhere.

use std::fmt::Write as _;

use flame_events::Envelope;
use flame_events::job::Status;
use flame_projections::render::{AuditLine, MetricsRow};
use flame_projections::trace::Span;
use flame_projections::view::JobView;

use crate::api::JobSummary;

/// Text made safe for HTML (element content and quoted attributes).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page around `body`; `user` is who is signed in, if anyone.
pub fn page(title: &str, user: Option<&str>, body: &str) -> String {
    let nav = match user {
        Some(u) => format!(
            r#"<nav><a href="/ui">Jobs</a> <a href="/ui/new">New job</a><span class="who">{}</span><form method="post" action="/ui/logout"><button id="logout">Sign out</button></form></nav>"#,
            esc(u)
        ),
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · Flame</title><link rel="stylesheet" href="/ui/assets/app.css"></head>
<body><header><a class="brand" href="/ui">Flame</a>{nav}</header><main>{body}</main>
<script src="/ui/assets/app.js"></script></body></html>"#,
        esc(title)
    )
}

/// The sign-in form, with why the last attempt failed.
pub fn login(error: Option<&str>) -> String {
    let error = error.map(|e| format!(r#"<p class="error" id="login-error">{}</p>"#, esc(e))).unwrap_or_default();
    page(
        "Sign in",
        None,
        &format!(
            r#"<section class="login"><h1>Sign in</h1>{error}
<form method="post" action="/ui/login"><label>API token <input type="password" name="token" id="token" autocomplete="off" required></label>
<button type="submit" id="sign-in">Sign in</button></form>
<p class="hint">A token from <code>flame-engine token add --user NAME</code>: the same the API takes as <code>Authorization: Bearer</code>.</p></section>"#
        ),
    )
}

fn state_badge(state: Status) -> String {
    format!(r#"<span class="state state-{0}">{0}</span>"#, state.name())
}

fn progress(done: u32, total: u32) -> String {
    let pct = if total == 0 { 0.0 } else { f64::from(done.min(total)) * 100.0 / f64::from(total) };
    format!(r#"<span class="progress" title="{done} of {total} rounds"><span style="width:{pct:.1}%"></span></span> {done}/{total}"#)
}

fn metric(m: &flame_events::job::Metrics, key: &str) -> String {
    m.get(key).map_or_else(|| "–".into(), |v| format!("{v:.4}"))
}

/// The job list.
pub fn job_list(jobs: &[JobSummary]) -> String {
    let mut rows = String::new();
    for j in jobs.iter().rev() {
        let _ = write!(
            rows,
            r#"<tr data-job="{id}"><td><a href="/ui/jobs/{id}">{name}</a><div class="id">{id}</div></td><td>{state}</td><td>{progress}</td><td class="num">{acc}</td><td class="num">{loss}</td></tr>"#,
            id = esc(&j.id),
            name = esc(&j.name),
            state = state_badge(j.state),
            progress = progress(j.rounds_completed, j.total_rounds),
            acc = metric(&j.metrics, "accuracy"),
            loss = metric(&j.metrics, "loss"),
        );
    }
    if jobs.is_empty() {
        rows.push_str(r#"<tr><td colspan="5" class="empty">No jobs yet: <a href="/ui/new">create one from a job folder</a>.</td></tr>"#);
    }
    format!(
        r#"<h1>Jobs</h1><div id="jobs" data-refresh="/ui"><table class="jobs"><thead><tr><th>Job</th><th>State</th><th>Rounds</th><th>Accuracy</th><th>Loss</th></tr></thead><tbody>{rows}</tbody></table></div>"#
    )
}

/// Everything a job's page shows, as inputs.
pub struct JobPage<'a> {
    /// The job's read model.
    pub view: &'a JobView,
    /// Per-round figures.
    pub rows: &'a [MetricsRow],
    /// The trace.
    pub trace: Option<&'a Span>,
    /// The audit log with details.
    pub audit: &'a [AuditLine<'a>],
    /// Its events (for the count).
    pub events: &'a [Envelope],
}

/// The part of a job's page that live updates replace.
pub fn job_body(p: &JobPage<'_>) -> String {
    let v = p.view;
    let s = &v.status;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<div id="job" data-job="{id}" data-version="{version}" data-state="{state}"><h1>{name} {badge}</h1><div class="id">job {id} · {events} events</div>
<div class="summary"><div>Rounds {progress}</div><div>Accuracy <b id="accuracy">{acc}</b></div><div>Loss <b>{loss}</b></div><div>Optimizer <b>{opt}</b></div></div>"#,
        id = esc(&v.job_id),
        version = v.version,
        state = s.state.name(),
        name = esc(&s.name),
        badge = state_badge(s.state),
        events = p.events.len(),
        progress = progress(s.rounds_completed, s.rounds_total),
        acc = metric(&s.metrics, "accuracy"),
        loss = metric(&s.metrics, "loss"),
        opt = esc(&s.optimizer),
    );
    if let Some(f) = &s.failure {
        let _ = write!(out, r#"<p class="error">{}</p>"#, esc(f));
    }
    out.push_str(&open_round(v));
    out.push_str(r#"<section class="charts"><h2>Per round</h2><div class="grid">"#);
    // Aggregated rounds only: the open one has its own section above.
    let closed: Vec<&MetricsRow> = p.rows.iter().filter(|r| r.seconds.is_some()).collect();
    let rounds: Vec<f64> = closed.iter().map(|r| f64::from(r.round)).collect();
    let series = |f: &dyn Fn(&MetricsRow) -> Option<f64>| -> Vec<(f64, f64)> {
        closed.iter().filter_map(|r| Some((f64::from(r.round), f(r)?))).collect()
    };
    let accuracy = series(&|r| r.metrics.get("accuracy").copied());
    let fed_accuracy = series(&|r| r.federated.get("accuracy").copied());
    let loss = series(&|r| r.metrics.get("loss").copied());
    let train_loss = series(&|r| r.train_loss);
    let mut acc_lines = vec![("accuracy", accuracy)];
    if !fed_accuracy.is_empty() {
        acc_lines.push(("federated accuracy", fed_accuracy));
    }
    out.push_str(&line_chart("chart-accuracy", "Accuracy", &acc_lines));
    out.push_str(&line_chart("chart-loss", "Loss", &[("loss", loss), ("train loss", train_loss)]));
    let participants: Vec<f64> = closed.iter().map(|r| r.participants as f64).collect();
    let stragglers: Vec<f64> = closed.iter().map(|r| r.stragglers as f64).collect();
    out.push_str(&bar_chart(
        "chart-participants",
        "Participants and stragglers",
        &rounds,
        &[("participants", &participants), ("stragglers", &stragglers)],
    ));
    out.push_str("</div></section>");
    out.push_str(&lineage(v));
    if let Some(t) = p.trace {
        out.push_str(&timeline(t));
    }
    out.push_str(&audit(v, p.audit));
    out.push_str("</div>");
    out
}

/// The round in progress: who was asked, who reported.
fn open_round(v: &JobView) -> String {
    let Some(r) = v.rounds.last().filter(|r| r.model.is_none() && v.status.state.is_active()) else { return String::new() };
    let reported: std::collections::BTreeSet<&str> = r.participants.iter().map(|p| p.task_id.as_str()).collect();
    let mut asked: Vec<&str> = if r.selected.is_empty() {
        v.tasks.iter().filter(|(_, t)| t.role == "trainer" || t.dataset.is_some()).map(|(id, _)| id.as_str()).collect()
    } else {
        r.selected.iter().map(String::as_str).collect()
    };
    asked.sort_unstable();
    let mut items = String::new();
    for t in &asked {
        let (class, what) = if reported.contains(t) {
            ("done", "reported")
        } else if r.stragglers.iter().any(|s| s == t) {
            ("late", "missed the deadline")
        } else {
            ("wait", "training")
        };
        let _ = write!(items, r#"<li class="{class}">{} <span>{what}</span></li>"#, esc(t));
    }
    format!(
        r#"<section class="open-round" id="open-round"><h2>Round {} in progress: <span id="reported">{}</span> of {} updates</h2><ul>{items}</ul></section>"#,
        r.round,
        reported.len(),
        asked.len().max(reported.len())
    )
}

const W: f64 = 420.0;
const H: f64 = 220.0;
const PAD: (f64, f64, f64, f64) = (44.0, 12.0, 16.0, 30.0); // left, right, top, bottom
const COLORS: [&str; 4] = ["#2563eb", "#f97316", "#16a34a", "#9333ea"];

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let margin = (hi - lo) * 0.05;
    (lo - margin, hi + margin)
}

fn axes(out: &mut String, (x0, x1): (f64, f64), (y0, y1): (f64, f64), integer_x: bool) {
    let (l, r, t, b) = PAD;
    let _ = write!(out, r##"<line x1="{l}" y1="{}" x2="{}" y2="{}" class="axis"/>"##, H - b, W - r, H - b);
    let _ = write!(out, r##"<line x1="{l}" y1="{t}" x2="{l}" y2="{}" class="axis"/>"##, H - b);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let py = H - b - (H - t - b) * f64::from(i) / 4.0;
        let _ = write!(out, r##"<text x="{}" y="{}" class="tick" text-anchor="end">{}</text>"##, l - 4.0, py + 3.0, short(y));
    }
    let steps = if integer_x { ((x1 - x0).round() as i64).clamp(1, 6) } else { 4 };
    for i in 0..=steps {
        let x = x0 + (x1 - x0) * i as f64 / steps as f64;
        let px = l + (W - l - r) * i as f64 / steps as f64;
        let label = if integer_x { format!("{}", x.round()) } else { short(x) };
        let _ = write!(out, r##"<text x="{px}" y="{}" class="tick" text-anchor="middle">{label}</text>"##, H - b + 14.0);
    }
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn legend(names: &[&str]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| format!(r#"<span class="key"><i style="background:{}"></i>{}</span>"#, COLORS[i % COLORS.len()], esc(n)))
        .collect()
}

/// A line chart of series of (round, value), as SVG with a legend.
pub fn line_chart(id: &str, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let points = || series.iter().flat_map(|(_, s)| s.iter());
    let shown: Vec<&(&str, Vec<(f64, f64)>)> = series.iter().filter(|(_, s)| !s.is_empty()).collect();
    let mut svg = String::new();
    if shown.is_empty() {
        return format!(
            r#"<figure class="chart" id="{id}"><figcaption>{}</figcaption><p class="empty">No rounds yet.</p></figure>"#,
            esc(title)
        );
    }
    let x0 = points().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x1 = points().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (y0, y1) = bounds(points().map(|p| p.1));
    axes(&mut svg, (x0, x1), (y0, y1), true);
    let (l, r, t, b) = PAD;
    let px = |x: f64| if (x1 - x0).abs() < 1e-12 { l + (W - l - r) / 2.0 } else { l + (W - l - r) * (x - x0) / (x1 - x0) };
    let py = |y: f64| H - b - (H - t - b) * (y - y0) / (y1 - y0);
    for (i, (name, s)) in series.iter().enumerate() {
        if s.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        let _ = write!(
            svg,
            r#"<polyline class="series" data-series="{}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            esc(name),
            pts.join(" ")
        );
        for (x, y) in s {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"><title>{} round {x}: {y:.4}</title></circle>"#,
                px(*x),
                py(*y),
                esc(name)
            );
        }
    }
    let names: Vec<&str> = series.iter().filter(|(_, s)| !s.is_empty()).map(|(n, _)| *n).collect();
    format!(
        r#"<figure class="chart" id="{id}"><figcaption>{}</figcaption><svg viewBox="0 0 {W} {H}" role="img" aria-label="{}">{svg}</svg><div class="legend">{}</div></figure>"#,
        esc(title),
        esc(title),
        legend(&names)
    )
}

/// Grouped bars per round.
pub fn bar_chart(id: &str, title: &str, rounds: &[f64], series: &[(&str, &[f64])]) -> String {
    if rounds.is_empty() {
        return format!(
            r#"<figure class="chart" id="{id}"><figcaption>{}</figcaption><p class="empty">No rounds yet.</p></figure>"#,
            esc(title)
        );
    }
    let max = series.iter().flat_map(|(_, v)| v.iter().copied()).fold(1.0, f64::max);
    let mut svg = String::new();
    let x0 = rounds.first().copied().unwrap_or(1.0);
    let x1 = rounds.last().copied().unwrap_or(1.0);
    axes(&mut svg, (x0, x1), (0.0, max), true);
    let (l, r, t, b) = PAD;
    let slot = (W - l - r) / rounds.len() as f64;
    let bar = (slot * 0.8 / series.len().max(1) as f64).max(1.0);
    for (i, round) in rounds.iter().enumerate() {
        for (k, (name, values)) in series.iter().enumerate() {
            let v = values.get(i).copied().unwrap_or(0.0);
            let h = (H - t - b) * v / max;
            let x = l + slot * i as f64 + slot * 0.1 + bar * k as f64;
            let _ = write!(
                svg,
                r#"<rect class="bar" data-series="{}" x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{}"><title>{} round {round}: {v}</title></rect>"#,
                esc(name),
                H - b - h,
                COLORS[k % COLORS.len()],
                esc(name)
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    format!(
        r#"<figure class="chart" id="{id}"><figcaption>{}</figcaption><svg viewBox="0 0 {W} {H}" role="img" aria-label="{}">{svg}</svg><div class="legend">{}</div></figure>"#,
        esc(title),
        esc(title),
        legend(&names)
    )
}

/// The global models as a chain, each fed by the updates averaged into it.
fn lineage(v: &JobView) -> String {
    if v.lineage.is_empty() {
        return String::new();
    }
    let nodes = &v.lineage;
    let step = 110.0;
    let width = 40.0 + step * nodes.len() as f64;
    let inputs_max = nodes.iter().map(|n| n.inputs.len()).max().unwrap_or(0).min(8);
    let height = 70.0 + 18.0 * inputs_max as f64;
    let mut svg = String::new();
    for (i, n) in nodes.iter().enumerate() {
        let x = 40.0 + step * i as f64;
        if i > 0 {
            let _ = write!(
                svg,
                r##"<line x1="{}" y1="30" x2="{}" y2="30" class="edge" marker-end="url(#arrow)"/>"##,
                x - step + 14.0,
                x - 16.0
            );
        }
        let acc = n.metrics.get("accuracy").map(|a| format!(" acc {a:.3}")).unwrap_or_default();
        let _ = write!(
            svg,
            r#"<g class="model" data-round="{}"><circle cx="{x}" cy="30" r="13"/><text x="{x}" y="34" text-anchor="middle">{}</text><text x="{x}" y="56" class="digest" text-anchor="middle">{}</text><title>round {}: sha256:{}{acc} by {}</title></g>"#,
            n.round,
            n.round,
            esc(&n.digest[..n.digest.len().min(8)]),
            n.round,
            esc(&n.digest),
            esc(&n.made_by)
        );
        for (k, input) in n.inputs.iter().take(8).enumerate() {
            let y = 74.0 + 18.0 * k as f64;
            let _ = write!(
                svg,
                r#"<g class="input"><line x1="{}" y1="{}" x2="{x}" y2="43" class="feed"/><text x="{}" y="{}" class="task">{}</text><title>{} on {}: {} samples</title></g>"#,
                x - 40.0,
                y - 4.0,
                x - 52.0,
                y,
                esc(&input.task_id),
                esc(&input.task_id),
                esc(&input.worker_id),
                input.samples
            );
        }
        if n.inputs.len() > 8 {
            let _ = write!(svg, r#"<text x="{}" y="{}" class="task">+{} more</text>"#, x - 52.0, 74.0 + 18.0 * 8.0, n.inputs.len() - 8);
        }
    }
    format!(
        r##"<section class="lineage" id="lineage"><h2>Model lineage</h2><div class="scroll"><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>{svg}</svg></div></section>"##
    )
}

/// The trace as a timeline: a row per span, bars on the job's clock.
fn timeline(job: &Span) -> String {
    let mut rows: Vec<(usize, &Span)> = Vec::new();
    fn walk<'a>(s: &'a Span, depth: usize, rows: &mut Vec<(usize, &'a Span)>) {
        rows.push((depth, s));
        for c in &s.children {
            walk(c, depth + 1, rows);
        }
    }
    walk(job, 0, &mut rows);
    const MAX_ROWS: usize = 400;
    let cut = rows.len().saturating_sub(MAX_ROWS);
    let total = job.seconds().max(1e-6);
    let (label_w, bar_w, row_h) = (230.0, 600.0, 16.0);
    let shown = rows.len().min(MAX_ROWS);
    let height = row_h * shown as f64 + 8.0;
    let mut svg = String::new();
    for (i, (depth, s)) in rows.iter().take(MAX_ROWS).enumerate() {
        let y = 4.0 + row_h * i as f64;
        let x = label_w + bar_w * (offset(job, s) / total);
        let w = (bar_w * s.seconds() / total).max(1.0);
        let class = format!("span {}{}{}", s.kind, if s.critical { " critical" } else { "" }, if s.finished { "" } else { " open" });
        let label = match &s.worker {
            Some(wk) => format!("{} @{}", s.name, wk),
            None => s.name.clone(),
        };
        let _ = write!(
            svg,
            r#"<g class="{class}" data-span="{}"><text x="{}" y="{}">{}</text><rect x="{x:.1}" y="{y}" width="{w:.1}" height="{}" rx="2"/><title>{}: {:.3} s (span {})</title></g>"#,
            esc(&s.id),
            6.0 + 12.0 * *depth as f64,
            y + 11.0,
            esc(&label),
            row_h - 4.0,
            esc(&s.path),
            s.seconds(),
            esc(&s.id)
        );
    }
    let more =
        if cut > 0 { format!(r#"<p class="hint">{cut} more spans: <code>flamectl trace</code> shows all.</p>"#) } else { String::new() };
    format!(
        r#"<section class="trace" id="trace"><h2>Trace <span class="id">{}</span></h2><div class="scroll"><svg width="{}" height="{height}">{svg}</svg></div>{more}</section>"#,
        esc(&job.trace_id),
        label_w + bar_w + 10.0
    )
}

/// Seconds from the job's start to a span's.
pub fn offset(job: &Span, s: &Span) -> f64 {
    flame_projections::view::seconds_between(job.start, s.start).max(0.0)
}

/// The audit log, newest first (the last 200 entries).
fn audit(v: &JobView, lines: &[AuditLine<'_>]) -> String {
    let mut rows = String::new();
    let job = format!("{}/", v.job_id);
    for line in lines.iter().rev().take(200) {
        let a = line.entry;
        let cause = a.causation_id.as_deref().map(|c| c.strip_prefix(&job).unwrap_or(c)).unwrap_or("–");
        let _ = write!(
            rows,
            r#"<tr class="{}"><td class="num">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            a.outcome.as_str(),
            a.position,
            a.at.format("%H:%M:%S%.3f"),
            esc(&a.actor),
            esc(&a.action),
            a.outcome.as_str(),
            esc(cause),
            esc(&line.detail)
        );
    }
    format!(
        r#"<section class="audit" id="audit"><h2>Audit log</h2><p class="hint">Newest first; every event at <a href="/jobs/{0}/events">/jobs/{0}/events</a>.</p><div class="scroll"><table><thead><tr><th>pos</th><th>at (UTC)</th><th>actor</th><th>action</th><th>outcome</th><th>command</th><th>detail</th></tr></thead><tbody>{rows}</tbody></table></div></section>"#,
        esc(&v.job_id)
    )
}

/// The page for a new job from a job folder.
pub fn upload() -> String {
    r#"<h1>New job</h1><section class="upload"><p>Choose a job folder in Flame's layout (<code>job.json</code>, <code>schema.json</code>, <code>dataSpec.json</code>, <code>modelSpec.json</code>, the dataset files, and the model file of a TorchScript job). Its design and datasets are registered and the job is created; the workers read the data where their <code>--data-root</code> says.</p>
<form id="upload"><label>Job folder <input type="file" id="folder" webkitdirectory directory multiple required></label>
<label><input type="checkbox" id="start" checked> start it</label><button type="submit" id="create">Create</button></form>
<div id="upload-result"></div></section>"#
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(esc(r#"<script>"a" & 'b'</script>"#), "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;");
    }

    #[test]
    fn a_line_chart_draws_each_series_through_its_points() {
        let svg = line_chart("c", "Accuracy", &[("accuracy", vec![(1.0, 0.5), (2.0, 0.75), (3.0, 0.9)]), ("empty", vec![])]);
        assert_eq!(svg.matches("<polyline").count(), 1, "an empty series draws nothing");
        assert_eq!(svg.matches("<circle").count(), 3);
        // The first point sits at the left edge, the last at the right; higher values higher up.
        let pts: Vec<(f64, f64)> = svg
            .split("points=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(|s| {
                s.split(' ')
                    .map(|p| {
                        let (x, y) = p.split_once(',').expect("x,y");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect()
            })
            .expect("points");
        assert_eq!(pts.len(), 3);
        assert!((pts[0].0 - PAD.0).abs() < 0.1 && (pts[2].0 - (W - PAD.1)).abs() < 0.1);
        assert!(pts[0].1 > pts[1].1 && pts[1].1 > pts[2].1);
        assert!(line_chart("c", "t", &[("a", vec![])]).contains("No rounds yet"));
    }

    #[test]
    fn bars_are_as_tall_as_their_share_of_the_largest() {
        let svg = bar_chart("b", "P", &[1.0, 2.0], &[("participants", &[4.0, 2.0]), ("stragglers", &[0.0, 2.0])]);
        let heights: Vec<f64> =
            svg.split("height=\"").skip(1).filter_map(|s| s.split('"').next()?.parse().ok()).filter(|h: &f64| *h < H).collect();
        let full = H - PAD.2 - PAD.3;
        assert_eq!(heights.len(), 4);
        assert!((heights[0] - full).abs() < 0.1 && (heights[1]).abs() < 0.1 && (heights[2] - full / 2.0).abs() < 0.1);
    }

    #[test]
    fn the_job_list_links_each_job_and_shows_its_progress() {
        let job = JobSummary {
            id: "j<1>".into(),
            name: "digits".into(),
            state: Status::Running,
            round: 2,
            rounds_completed: 1,
            total_rounds: 4,
            metrics: [("accuracy".to_string(), 0.5)].into_iter().collect(),
            global_model: None,
            failure: None,
            rejected_reports: 0,
            version: 9,
            forked_from: None,
        };
        let html = job_list(&[job]);
        assert!(html.contains(r#"href="/ui/jobs/j&lt;1&gt;""#), "ids are escaped");
        assert!(html.contains("state-running") && html.contains("1/4") && html.contains("width:25.0%") && html.contains("0.5000"));
        assert!(job_list(&[]).contains("No jobs yet"));
    }
}
