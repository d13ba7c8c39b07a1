//! Read models, renderings and the view writer on a recorded job: the
//! digits example (3 trainers, 1 aggregator, 5 rounds) as `flamectl run`
//! stored it, checked in as `fixtures/digits-two-tier.jsonl`.

use flame_events::Envelope;
use flame_events::store::{EventStore, ExpectedVersion};
use flame_projections::store::{ReadModels, SqliteViews};
use flame_projections::{render, trace, verify, view, writer};
use flame_stores::sqlite::SqliteStore;
use serde_json::Value;

fn fixture() -> Vec<Envelope> {
    include_str!("fixtures/digits-two-tier.jsonl").lines().map(|l| serde_json::from_str(l).expect("fixture line")).collect()
}

#[test]
fn the_recorded_job_folds_into_its_read_models() {
    let events = fixture();
    let v = view::fold(&events);
    assert_eq!((v.status.state.name(), v.status.rounds_completed, v.rounds.len()), ("completed", 5, 5));
    assert_eq!(v.lineage.len(), 6, "initial model plus one per round");
    for (r, m) in v.rounds.iter().zip(&v.lineage[1..]) {
        assert_eq!(r.participants.len(), 3);
        assert_eq!(m.parent.as_deref(), Some(r.start_model.as_str()), "round {} starts from its parent", r.round);
        assert!(m.inputs.iter().all(|i| i.samples > 0 && i.worker_id.starts_with("local-trainer-")), "{m:?}");
    }
    assert_eq!(v.status.global_model, v.lineage.last().map(|m| m.digest.clone()));
    assert_eq!(v.audit.len(), events.len());
}

#[test]
fn snapshot_events_table() {
    let events = fixture();
    let filter = render::EventFilter { round: Some(2), ..Default::default() };
    let mut out = format!("{}\n", render::EVENTS_HEADER);
    for e in events.iter().filter(|e| filter.matches(e)) {
        out.push_str(&render::event_line(e));
        out.push('\n');
    }
    insta::assert_snapshot!(out);
}

#[test]
fn event_filters_select_by_type_position_round_and_worker() {
    let events = fixture();
    let count = |f: render::EventFilter| events.iter().filter(|e| f.matches(e)).count();
    assert_eq!(count(render::EventFilter { types: vec!["updatereported".into()], ..Default::default() }), 15);
    assert_eq!(count(render::EventFilter { since: Some(40), ..Default::default() }), 7);
    assert_eq!(count(render::EventFilter { worker: Some("local-trainer-1".into()), ..Default::default() }), 8);
    let both = render::EventFilter {
        types: vec!["UpdateReported".into()],
        round: Some(3),
        worker: Some("local-trainer-0".into()),
        ..Default::default()
    };
    assert_eq!(count(both), 1);
}

#[test]
fn snapshot_trace_tree() {
    let job = trace::build(&fixture()).expect("a job");
    insta::assert_snapshot!(trace::render_tree(&job));
}

/// The trace's ids are OpenTelemetry's: the job's UUID is the trace id, every
/// span id is unique and is what the engine can compute from a step's path
/// when it sends the command (the worker's span's parent).
#[test]
fn trace_ids_are_the_jobs_uuid_and_each_spans_path() {
    let events = fixture();
    let job = trace::build(&events).expect("a job");
    let job_id = events[0].stream_id.strip_prefix("job-").expect("a job stream");
    assert_eq!(job.trace_id, job_id.replace('-', ""));
    fn walk<'a>(s: &'a trace::Span, out: &mut Vec<&'a trace::Span>) {
        out.push(s);
        for c in &s.children {
            walk(c, out);
        }
    }
    let mut all = Vec::new();
    walk(&job, &mut all);
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "span ids are unique");
    assert!(all.iter().all(|s| s.id.len() == 16 && s.trace_id == job.trace_id && s.id == trace::span_id(job_id, &s.path)));
    let round = job.children.iter().find(|s| s.name == "round 2").expect("round 2");
    let train = round.children.iter().find(|s| s.name == "train").expect("train");
    let task = &train.children[0];
    assert_eq!(task.path, trace::round_path(2, "train", Some(&task.name)));
    assert_eq!(train.path, trace::round_path(2, "train", None));
    assert_eq!(trace::traceparent(job_id, &task.path), format!("00-{}-{}-01", job.trace_id, task.id));
    // Another job's spans never share ids with this one's.
    assert_ne!(trace::span_id("another", &task.path), task.id);
}

#[test]
fn snapshot_audit() {
    let events = fixture();
    insta::assert_snapshot!(render::audit_table(&view::fold(&events), &events));
}

#[test]
fn snapshot_metrics() {
    insta::assert_snapshot!(render::metrics_table(&render::metrics(&view::fold(&fixture()))));
}

#[test]
fn snapshot_replay_summary() {
    insta::assert_snapshot!(render::summary(&view::fold(&fixture())));
}

/// Checks the trace-event format: every event names itself, has a known phase,
/// integer pid/tid, and complete events have a non-negative start and
/// duration and nest properly on their thread (what Perfetto needs).
#[test]
fn the_chrome_trace_is_valid_trace_event_json() {
    let job = trace::build(&fixture()).expect("a job");
    let doc = trace::chrome(&job);
    let text = serde_json::to_string(&doc).expect("json");
    let doc: Value = serde_json::from_str(&text).expect("reparses");
    let events = doc["traceEvents"].as_array().expect("traceEvents array");
    let mut complete: std::collections::BTreeMap<u64, Vec<(i64, i64)>> = Default::default();
    let mut named_threads = std::collections::BTreeSet::new();
    for e in events {
        assert!(e["name"].is_string(), "{e}");
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{e}");
        match e["ph"].as_str() {
            Some("X") => {
                let (ts, dur) = (e["ts"].as_i64().expect("ts"), e["dur"].as_i64().expect("dur"));
                assert!(ts >= 0 && dur >= 0, "{e}");
                complete.entry(e["tid"].as_u64().unwrap_or(0)).or_default().push((ts, ts + dur));
            }
            Some("M") => {
                assert!(e["args"]["name"].is_string(), "{e}");
                if e["name"] == "thread_name" {
                    named_threads.insert(e["tid"].as_u64().unwrap_or(0));
                }
            }
            other => panic!("unexpected phase {other:?} in {e}"),
        }
    }
    for (tid, spans) in &complete {
        assert!(named_threads.contains(tid), "thread {tid} has no name");
        for a in spans {
            for b in spans {
                let nested = (a.0 <= b.0 && b.1 <= a.1) || (b.0 <= a.0 && a.1 <= b.1);
                let apart = a.1 <= b.0 || b.1 <= a.0;
                assert!(nested || apart, "spans {a:?} and {b:?} on thread {tid} overlap without nesting");
            }
        }
    }
    // One lane per task, one for the job: 4 tasks.
    assert_eq!(named_threads.len(), 5);
    // The critical path of each round: its slowest trainer.
    let critical_tasks = events.iter().filter(|e| e["cat"] == "task" && e["args"]["critical"] == true).count();
    assert_eq!(critical_tasks, 5, "one per round");
}

#[test]
fn verify_names_the_event_where_a_corrupted_view_parts_from_the_log() {
    let events = fixture();
    let good = serde_json::to_string(&view::fold(&events)).expect("json");
    assert_eq!(verify::check(&events, &good).expect("check"), None);

    // Round 3's second update claims other samples than its event says.
    let mut bad: Value = serde_json::from_str(&good).expect("json");
    bad["rounds"][2]["participants"][1]["samples"] = Value::from(9999);
    let d = verify::check(&events, &bad.to_string()).expect("check").expect("a divergence");
    let target = events.iter().filter(|e| e.event_type == "UpdateReported" && e.payload["round"] == 3).nth(1).expect("round 3 has updates");
    assert_eq!((d.version, d.event_type.as_str()), (target.version, "UpdateReported"), "{d:?}");
    assert_eq!(d.path, "/rounds/2/participants/1/samples");
    assert_eq!(d.stored, Value::from(9999));

    // A state that was once right: the view says running, but the job completed.
    let mut stale: Value = serde_json::from_str(&good).expect("json");
    stale["status"]["state"] = Value::from("running");
    let d = verify::check(&events, &stale.to_string()).expect("check").expect("a divergence");
    assert_eq!(d.event_type, "JobCompleted", "{d:?}");
}

#[tokio::test]
async fn the_runner_stores_views_equal_to_a_rebuild_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("events.db");
    let path = path.to_str().expect("utf-8 path");
    let store = SqliteStore::open(path).expect("store");
    let events = fixture();
    // Two copies of the job under different ids, interleaved with another stream.
    for (i, e) in events.iter().enumerate() {
        for job in ["a", "b"] {
            let mut n = flame_events::NewEvent::new(e.event_type.clone(), e.payload.clone(), e.actor.clone()).correlated(job);
            n.causation_id = e.causation_id.clone();
            store.append(&format!("job-{job}"), ExpectedVersion::Exact(i as u64), vec![n]).await.expect("append");
        }
        if i % 10 == 0 {
            let n = flame_events::NewEvent::new("ResourcePut", serde_json::json!({}), "user:x");
            store.append("design-d", ExpectedVersion::Any, vec![n]).await.expect("append");
        }
    }
    // A long job (the fixture seven times over, 322 events): its audit and
    // lineage lists cross the 256-entry chunks they are stored in.
    for (i, e) in events.iter().cycle().take(7 * events.len()).enumerate() {
        let n = flame_events::NewEvent::new(e.event_type.clone(), e.payload.clone(), e.actor.clone()).correlated("c");
        store.append("job-c", ExpectedVersion::Exact(i as u64), vec![n]).await.expect("append");
    }
    let models = SqliteViews::open(path).expect("views");
    // Small batches: many commits, views written partially folded and resumed.
    let progress = writer::ViewWriter::open(&store, &models, 7).await.expect("open").catch_up().await.expect("catch up");
    assert_eq!(progress.events, 9 * events.len() as u64 + 5);
    assert!(progress.commits > 10);
    let all = store.read_all(1, 10_000).await.expect("read");
    for job in ["a", "b", "c"] {
        let stream: Vec<Envelope> = all.iter().filter(|e| e.stream_id == format!("job-{job}")).cloned().collect();
        let stored = models.get(job).await.expect("get").expect("stored");
        assert_eq!(stored.json, serde_json::to_string(&view::fold(&stream)).expect("json"), "job {job}");
        assert_eq!(verify::check(&stream, &stored.json).expect("check"), None);
    }
    assert_eq!(models.checkpoint().await.expect("checkpoint"), all.last().map_or(0, |e| e.position));
    // Nothing new: a second catch-up folds nothing; a rebuild gives the same views.
    let again = writer::ViewWriter::open(&store, &models, 7).await.expect("open").catch_up().await.expect("catch up");
    assert_eq!(again.events, 0);
    let before = models.load_all().await.expect("load");
    writer::rebuild(&store, &models, 1000).await.expect("rebuild");
    assert_eq!(models.load_all().await.expect("load"), before);
}
