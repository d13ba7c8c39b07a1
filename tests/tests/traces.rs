//! OpenTelemetry traces: a served engine and its workers export a job's
//! spans over OTLP/HTTP to a receiver in this test, which decodes them with
//! OpenTelemetry's own protobuf messages (`opentelemetry-proto`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::{Value, json};

use crate::util::{Served, bin, digits_workflow, wait_for_events};

/// A span as received: the service that sent it, its ids, name and attributes.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: BTreeMap<String, String>,
    error: bool,
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a free port.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else { return axum::http::StatusCode::BAD_REQUEST };
                let mut spans = Vec::new();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                        spans.push(Received {
                            service: service.clone(),
                            trace_id: hex::encode(&s.trace_id),
                            span_id: hex::encode(&s.span_id),
                            parent: hex::encode(&s.parent_span_id),
                            name: s.name,
                            attributes: s
                                .attributes
                                .iter()
                                .filter_map(|a| Some((a.key.clone(), text(a.value.as_ref()?.value.as_ref()?)?)))
                                .collect(),
                            error: s.status.is_some_and(|st| st.code == 2),
                        });
                    }
                }
                sink.lock().expect("lock").extend(spans);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn text(v: &any_value::Value) -> Option<String> {
    match v {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// The span ids of `flamectl trace -o json`'s tree, by path.
fn flamectl_ids(tree: &Value, out: &mut BTreeMap<String, String>) {
    out.insert(tree["path"].as_str().expect("path").to_string(), tree["id"].as_str().expect("id").to_string());
    for c in tree["children"].as_array().into_iter().flatten() {
        flamectl_ids(c, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_trace_reaches_an_otlp_receiver_with_a_span_per_round_and_step_and_the_workers_spans_joined() {
    let (url, got) = receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(dir.path(), &["--otlp", &url], &["--otlp", &url]).await;
    let rounds = 3u32;
    let job = served.submit(&digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds)));
    let store = served.store().await;
    let events = wait_for_events(&store, &job, "the end", |ev| ev.last().is_some_and(|e| e.event_type == "JobCompleted")).await;
    let updates = events.iter().filter(|e| e.event_type == "UpdateReported").count();

    // The engine sends the job's own span last, once the job is over.
    let trace_id = flame_projections::trace::trace_id(&job);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let spans = got.lock().expect("lock").clone();
        let root = spans.iter().any(|s| s.service == "flame-engine" && s.parent.is_empty());
        let workers = spans.iter().filter(|s| s.service == "flame-worker" && s.name.starts_with("train ")).count();
        if root && workers >= updates {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver did not get the whole trace: root {root}, {workers} of {updates} worker train spans"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = got.lock().expect("lock").clone();

    // One trace: every span, the engine's and the workers', has the job's trace id.
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces, BTreeSet::from([trace_id.as_str()]), "one trace per job, its id the job's");
    let engine: Vec<&Received> = spans.iter().filter(|s| s.service == "flame-engine").collect();
    let ids: BTreeSet<&str> = engine.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), engine.len(), "each engine span once");
    let by_path: BTreeMap<&str, &Received> = engine.iter().map(|s| (s.attributes["flame.path"].as_str(), *s)).collect();
    let root = by_path[""];
    assert!(root.parent.is_empty() && !root.error);
    for step in ["setup", "setup/placement", "setup/deploy", "setup/initial model"] {
        assert!(by_path.contains_key(step), "{step}: {:?}", by_path.keys());
    }
    // A span per round under the job, a train and an aggregate step per round, a task span per trainer.
    for r in 1..=rounds {
        let round = by_path[format!("round {r}").as_str()];
        assert_eq!(round.parent, root.span_id, "round {r} is the job's child");
        let train = by_path[format!("round {r}/train").as_str()];
        let aggregate = by_path[format!("round {r}/aggregate").as_str()];
        assert_eq!((train.parent.as_str(), aggregate.parent.as_str()), (round.span_id.as_str(), round.span_id.as_str()));
        assert_eq!(aggregate.attributes.get("flame.worker").map(String::as_str), Some("agg"));
        let tasks: Vec<&&Received> = engine.iter().filter(|s| s.parent == train.span_id).collect();
        assert_eq!(tasks.len(), 3, "round {r}: a span per trainer");
        // Each trainer's own span (its worker's) is a child of the engine's task span.
        for t in tasks {
            let own: Vec<&Received> = spans.iter().filter(|s| s.service == "flame-worker" && s.parent == t.span_id).collect();
            assert_eq!(own.len(), 1, "round {r}, {}: the worker's span joins the engine's", t.name);
            assert_eq!(own[0].name, format!("train {}", t.name));
            assert_eq!(own[0].attributes.get("flame.round").map(String::as_str), Some(r.to_string().as_str()));
            assert_eq!(own[0].attributes.get("flame.worker"), t.attributes.get("flame.worker"));
        }
        let agg: Vec<&Received> = spans.iter().filter(|s| s.service == "flame-worker" && s.parent == aggregate.span_id).collect();
        assert_eq!(agg.len(), 1, "round {r}: the aggregator's span joins the aggregate step");
    }
    assert_eq!(by_path.keys().filter(|p| p.starts_with("round ") && !p.contains('/')).count(), rounds as usize);

    // The ids are those flamectl trace shows.
    let out =
        Command::new(bin("flamectl")).args(["trace", &job, "-o", "json", "--store", &served.store_url()]).output().expect("flamectl trace");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(tree["trace_id"], trace_id.as_str());
    let mut shown = BTreeMap::new();
    flamectl_ids(&tree, &mut shown);
    let sent: BTreeMap<String, String> = by_path.iter().map(|(p, s)| (p.to_string(), s.span_id.clone())).collect();
    assert_eq!(shown, sent, "flamectl trace and the exported spans name the same spans with the same ids");
}
