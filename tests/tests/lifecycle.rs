//! The engine's lifecycle with real processes: SIGKILLed engines resume from
//! the log, lost workers are survived by quorum, maxRunTime terminates, and
//! the management API answers over HTTP. Each test runs its own NATS server
//! so that workers and the registry are not shared between tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{DIGITS_WORKERS, Nats, Processes, bin, connect, digits_workflow, free_port, mongo_uri, root, unique, worker};
use flame_events::Envelope;
use flame_events::store::EventStore;
use flame_projections::store::ReadModels;

/// A blocking HTTP client for the management API.
struct Http {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Http {
    fn new(port: u16, token: Option<&str>) -> Self {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build().into();
        Self { base: format!("http://127.0.0.1:{port}"), token: token.map(str::to_string), agent }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => self.with(self.agent.get(&url), &auth).call(),
            ("DELETE", _) => self.with(self.agent.delete(&url), &auth).call(),
            ("POST", b) => self.with(self.agent.post(&url), &auth).header("content-type", "application/json").send(b.unwrap_or("")),
            ("PUT", b) => self.with(self.agent.put(&url), &auth).header("content-type", "application/json").send(b.unwrap_or("")),
            _ => panic!("method {method}"),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn with<B>(&self, req: ureq::RequestBuilder<B>, auth: &Option<String>) -> ureq::RequestBuilder<B> {
        match auth {
            Some(a) => req.header("authorization", a),
            None => req,
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.agent.get(&format!("{}/healthz", self.base)).call().is_err() {
            assert!(Instant::now() < deadline, "the engine's API did not come up at {}", self.base);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn add_token(tokens: &Path, user: &str) -> String {
    add_scoped_token(tokens, user, "admin")
}

fn add_scoped_token(tokens: &Path, user: &str, scope: &str) -> String {
    let out = Command::new(bin("flame-engine"))
        .args(["token", "add", "--tokens", tokens.to_str().expect("utf8"), "--user", user, "--scope", scope])
        .output()
        .expect("flame-engine token add");
    assert!(out.status.success(), "token add: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

fn serve(procs: &mut Processes, nats: &str, db: &str, port: u16, tokens: &Path) -> usize {
    serve_as(procs, nats, db, port, tokens, &[])
}

fn serve_as(procs: &mut Processes, nats: &str, db: &str, port: u16, tokens: &Path, extra: &[&str]) -> usize {
    procs.spawn(
        Command::new(bin("flame-engine"))
            .args(["serve", "--mongo", &mongo_uri(), "--db", db, "--nats", nats])
            .args(extra)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--tokens", tokens.to_str().expect("utf8")])
            .current_dir(root())
            // Warnings and errors reach the test log, for when this fails on CI.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    procs.0.len() - 1
}

fn kill(procs: &mut Processes, i: usize) {
    procs.0[i].kill().expect("SIGKILL");
    procs.0[i].wait().expect("reap");
}

fn of_type<'a>(events: &'a [Envelope], t: &str) -> impl Iterator<Item = &'a Envelope> {
    let t = t.to_string();
    events.iter().filter(move |e| e.event_type == t)
}

fn round_of(e: &Envelope) -> u64 {
    e.payload["round"].as_u64().unwrap_or(0)
}

async fn wait_for(store: &dyn EventStore, job: &str, what: &str, secs: u64, pred: impl Fn(&[Envelope]) -> bool) -> Vec<Envelope> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let events = store.read_stream(&flame_events::job::stream_id(job), 1).await.expect("read");
        if pred(&events) {
            return events;
        }
        let ended = events.iter().any(|e| matches!(e.event_type.as_str(), "JobFailed" | "JobTerminated" | "JobCompleted"));
        assert!(!ended || what == "the end", "the job ended before {what}: {:?}", events.last().map(|e| &e.payload));
        assert!(
            Instant::now() < deadline,
            "no {what} within {secs} s; last events: {:?}",
            events.iter().rev().take(8).map(|e| (&e.event_type, &e.payload)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every round aggregated exactly once, every update counted once, versions gap-free;
/// returns the inputs of each round.
fn check_exactly_once(events: &[Envelope], rounds: u64) -> BTreeMap<u64, usize> {
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=events.len() as u64).collect::<Vec<_>>(), "the stream has gaps");
    let mut aggregated = BTreeMap::new();
    for e in of_type(events, "RoundAggregated") {
        assert!(
            aggregated.insert(round_of(e), e.payload["inputs"].as_array().map_or(0, Vec::len)).is_none(),
            "round {} aggregated twice",
            round_of(e)
        );
    }
    assert_eq!(aggregated.keys().copied().collect::<Vec<_>>(), (1..=rounds).collect::<Vec<_>>());
    let mut updates = BTreeSet::new();
    for e in of_type(events, "UpdateReported") {
        let key = (round_of(e), e.payload["task_id"].as_str().unwrap_or_default().to_string());
        assert!(updates.insert(key.clone()), "update {key:?} counted twice");
    }
    for (round, inputs) in &aggregated {
        let got = updates.iter().filter(|(r, _)| r == round).count();
        assert_eq!(got, *inputs, "round {round}: {got} updates recorded, {inputs} aggregated");
    }
    aggregated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_at_any_point_resumes_and_counts_every_update_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = Nats::start(free_port(), &dir.path().join("js"));
    connect(&nats.url).await;
    let db = format!("flame_crash_{}", unique());
    let tokens = dir.path().join("tokens");
    let token = add_token(&tokens, "ada");
    let mut procs = Processes::default();
    for (id, roles, realm) in DIGITS_WORKERS {
        worker(&mut procs, &nats.url, id, roles, realm);
    }
    let port = free_port();
    let mut engine = serve(&mut procs, &nats.url, &db, port, &tokens);
    let http = Http::new(port, Some(&token));
    http.wait_ready();
    let wf = digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(10));
    let (status, job) = http.call("POST", "/jobs", Some(&wf.to_string()));
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let (status, started) = http.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"start"}"#));
    assert_eq!(status, 200, "{started}");

    let store = flame_stores::mongo::MongoStore::connect(&mongo_uri(), &db).await.expect("mongo");
    let mut kills = Vec::new();
    let mut restarts = Vec::new();
    // 1. During placement and deployment: right after the start was recorded.
    kill(&mut procs, engine);
    kills.push(store.read_stream(&flame_events::job::stream_id(&id), 1).await.expect("read").last().expect("event").event_type.clone());
    restarts.push(chrono::Utc::now());
    engine = serve(&mut procs, &nats.url, &db, port, &tokens);
    // 2. Mid round: some updates of a round from 3 on are in, its aggregate is not.
    let events = wait_for(&store, &id, "a half-done round", 180, |ev| {
        of_type(ev, "UpdateReported").any(|u| round_of(u) >= 3 && !of_type(ev, "RoundAggregated").any(|a| round_of(a) == round_of(u)))
    })
    .await;
    kill(&mut procs, engine);
    kills.push(format!("{} (round {})", events.last().expect("e").event_type, of_type(&events, "RoundStarted").count()));
    restarts.push(chrono::Utc::now());
    engine = serve(&mut procs, &nats.url, &db, port, &tokens);
    // 3. During aggregation: a round from 6 on has all three updates and no aggregate yet.
    let events = wait_for(&store, &id, "an aggregation in flight", 180, |ev| {
        (6..=10).any(|r| {
            of_type(ev, "UpdateReported").filter(|u| round_of(u) == r).count() == 3
                && !of_type(ev, "RoundAggregated").any(|a| round_of(a) == r)
        })
    })
    .await;
    kill(&mut procs, engine);
    kills.push(format!("{} (round {})", events.last().expect("e").event_type, of_type(&events, "RoundStarted").count()));
    restarts.push(chrono::Utc::now());
    let _engine = serve(&mut procs, &nats.url, &db, port, &tokens);

    let events = wait_for(&store, &id, "the end", 240, |ev| ev.last().is_some_and(|e| e.event_type == "JobCompleted")).await;
    eprintln!("engine killed after: {kills:?}");
    // A figure, not an assertion: from each restart to the job's next recorded event
    // (the new engine's start-up included).
    let resumed: Vec<String> = restarts
        .iter()
        .map(|t| {
            events
                .iter()
                .find(|e| e.recorded_at >= *t)
                .map_or("never".into(), |e| format!("{:.2} s", (e.recorded_at - *t).as_seconds_f64()))
        })
        .collect();
    eprintln!("the job's next event after each restart: {resumed:?}");
    let inputs = check_exactly_once(&events, 10);
    assert!(inputs.values().all(|n| *n == 3), "every round used all three trainers: {inputs:?}");
    let final_metrics = &events.last().expect("end").payload["metrics"];
    assert!(final_metrics["accuracy"].as_f64().unwrap_or(0.0) > 0.9, "a resumed job still learns: {final_metrics}");
    // Reports that arrived twice (redelivered after a kill) were refused and recorded, never applied.
    for r in of_type(&events, "ReportRejected") {
        assert!(r.actor.starts_with("worker:"), "{r:?}");
    }
    // The job views the engine keeps in MongoDB survived the kills too: once
    // they reach the end, they equal a rebuild from the events.
    let views = flame_projections::store::MongoViews::connect(&mongo_uri(), &db).await.expect("views");
    let last = events.last().expect("end").position;
    let deadline = Instant::now() + Duration::from_secs(60);
    while views.checkpoint().await.expect("checkpoint") < last {
        assert!(Instant::now() < deadline, "the engine's job projection did not reach position {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = mongo_uri().replacen("/?", &format!("/{db}?"), 1);
    let out = Command::new(bin("flamectl")).args(["replay", &id, "--store", &url, "--verify"]).output().expect("flamectl");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("byte for byte"), "{said}{}", String::from_utf8_lossy(&out.stderr));
    // Every global model the killed engines recorded derives again, bit for bit, from the logged updates in NATS.
    let out =
        Command::new(bin("flamectl")).args(["verify", &id, "--models", "--store", &url, "--nats", &nats.url]).output().expect("flamectl");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("all 10 aggregation(s)"), "{}{said}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_trainer_is_survived_by_quorum_and_max_run_time_terminates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = Nats::start(free_port(), &dir.path().join("js"));
    connect(&nats.url).await;
    let db = format!("flame_loss_{}", unique());
    let mut procs = Processes::default();
    for (id, roles, realm) in &DIGITS_WORKERS[..3] {
        worker(&mut procs, &nats.url, id, roles, realm);
    }
    let doomed = worker(&mut procs, &nats.url, "t2", "trainer", "default/site3");
    let wf = digits_workflow(|wf| {
        let h = &mut wf["modelSpec"]["hyperparameters"];
        h["rounds"] = json!(6);
        h["minClients"] = json!(2);
        h["roundTimeout"] = json!(60);
    });
    let file = dir.path().join("job.json");
    std::fs::write(&file, wf.to_string()).expect("write job");
    let run = |procs: &mut Processes, file: &Path| {
        let child = procs.spawn(
            Command::new(bin("flame-engine"))
                .args(["run", "--mongo", &mongo_uri(), "--db", &db, "--nats", &nats.url, "--job", file.to_str().expect("utf8")])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped()),
        );
        child.stdout.take().expect("stdout")
    };
    let stdout = run(&mut procs, &file);
    let engine = procs.0.len() - 1;

    let store = flame_stores::mongo::MongoStore::connect(&mongo_uri(), &db).await.expect("mongo");
    let job_id = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let head = store.read_all(1, 1).await.expect("read");
            if let Some(e) = head.first() {
                break e.stream_id.trim_start_matches("job-").to_string();
            }
            assert!(Instant::now() < deadline, "no job was created");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for(&store, &job_id, "round 2", 120, |ev| of_type(ev, "RoundStarted").any(|e| round_of(e) == 2)).await;
    kill(&mut procs, doomed);
    let summary = finish(&mut procs, engine, stdout);
    assert_eq!(summary["state"], "completed", "{summary}");
    let events = store.read_stream(&flame_events::job::stream_id(&job_id), 1).await.expect("read");
    let lost: Vec<_> = of_type(&events, "WorkerLost").collect();
    assert_eq!(lost.len(), 1, "one worker lost");
    assert_eq!(lost[0].payload["worker_id"], "t2");
    assert_eq!(lost[0].payload["orphaned"], json!(["trainer-2"]), "no spare worker: its task sits out");
    let inputs = check_exactly_once(&events, 6);
    assert_eq!(inputs[&6], 2, "rounds after the loss aggregate the two trainers left: {inputs:?}");

    // maxRunTime: a job that would run for long is terminated, not left running.
    worker(&mut procs, &nats.url, "t3", "trainer", "default/site3");
    let wf = digits_workflow(|wf| {
        wf["job"]["maxRunTime"] = json!(3);
        wf["modelSpec"]["hyperparameters"]["rounds"] = json!(100_000);
    });
    std::fs::write(&file, wf.to_string()).expect("write job");
    let started = Instant::now();
    let stdout = run(&mut procs, &file);
    let engine = procs.0.len() - 1;
    let summary = finish(&mut procs, engine, stdout);
    assert_eq!(summary["state"], "terminated", "{summary}");
    assert!(summary["failure"].as_str().unwrap_or_default().contains("maxRunTime of 3 s"), "{summary}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// NATS SIGKILLed mid-job and started again on its store 8 s later, longer than a worker's
/// registration lives (6 s), and the workers' own link to it (a proxy) back 5.5 s after that:
/// the engine reads a registry in which every registration has expired for seconds, yet no
/// worker counts as lost, since none could renew while the registry was out of reach (the
/// engine keeps them live for `--registry-grace` after its last failed read). They register
/// again and the job finishes every round, once. With `--registry-grace 0` it fails: every
/// worker is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_registry_longer_than_registrations_live_loses_no_worker() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, js) = (free_port(), dir.path().join("js"));
    let nats = Nats::start(port, &js);
    let watcher = connect(&nats.url).await;
    // The workers reach NATS through a link that can be cut; the engine reaches it directly.
    let link = crate::util::Proxy::start(port).await;
    let through = format!("nats://127.0.0.1:{}", link.port);
    let mut procs = Processes::default();
    for (id, roles, realm) in &DIGITS_WORKERS {
        worker(&mut procs, &through, id, roles, realm);
    }
    let rounds = 20;
    let file = dir.path().join("job.json");
    std::fs::write(&file, digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds)).to_string()).expect("write");
    let data = dir.path().join("data");
    let mut reports = watcher.subscribe("flame.report.>").await.expect("subscribe");
    let log = dir.path().join("run.log");
    procs.spawn(
        Command::new(bin("flamectl"))
            .arg("run")
            .arg(&file)
            .args(["--local", "none", "-o", "json", "--nats", &nats.url, "--data-root"])
            .arg(crate::util::examples())
            .arg("--data-dir")
            .arg(&data)
            // Longer than the default (15 s): the workers are away 5.5 s longer than the registry.
            .args(["--registry-grace", "30"])
            .current_dir(root())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log")),
    );
    let run = procs.0.len() - 1;
    let stdout = procs.0[run].stdout.take().expect("stdout");
    // Mid-round 2 (round 1's three updates seen, and one more): down it goes.
    let mut trained = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while trained < 4 {
        let m = tokio::time::timeout_at(deadline.into(), reports.next()).await.expect("4 updates in 120 s").expect("subscription");
        trained += usize::from(serde_json::from_slice::<Value>(&m.payload).is_ok_and(|r| r["body"]["kind"] == "trained"));
    }
    drop(nats);
    let back = async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        Nats::start(port, &js)
    };
    let (_nats, ()) = tokio::join!(back, link.cut(Duration::from_millis(13_500)));
    let relinked = Instant::now();
    let summary = finish(&mut procs, run, stdout);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(summary["state"], "completed", "{summary} {said}");
    assert_eq!(summary["rounds_completed"], rounds);
    eprintln!("registry outage: the job finished {:.1} s after the workers' link came back", relinked.elapsed().as_secs_f64());

    let job = summary["job_id"].as_str().expect("job id");
    let store = format!("sqlite:{}", data.join("events.db").display());
    let out = Command::new(bin("flamectl")).args(["events", job, "--store", &store, "-o", "json"]).output().expect("events");
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("event")).collect();
    let lost: Vec<&Value> = events.iter().filter(|e| e["event_type"] == "WorkerLost").collect();
    assert!(lost.is_empty(), "a worker counted lost while the registry was out of reach: {lost:?}");
    let aggregated: Vec<u64> =
        events.iter().filter(|e| e["event_type"] == "RoundAggregated").map(|e| e["payload"]["round"].as_u64().expect("round")).collect();
    assert_eq!(aggregated, (1..=rounds).collect::<Vec<u64>>(), "each round aggregated once, in order");
    let updates: Vec<(u64, &str)> = events
        .iter()
        .filter(|e| e["event_type"] == "UpdateReported")
        .map(|e| (e["payload"]["round"].as_u64().expect("round"), e["payload"]["worker_id"].as_str().expect("worker")))
        .collect();
    let distinct: BTreeSet<&(u64, &str)> = updates.iter().collect();
    assert_eq!((updates.len(), distinct.len()), (3 * rounds as usize, 3 * rounds as usize), "every trainer's update of every round, once");
}

fn finish(procs: &mut Processes, engine: usize, mut stdout: std::process::ChildStdout) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = procs.0[engine].try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "flame-engine run did not finish in 180 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).expect("stdout");
    let _ = status;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("engine summary {out:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_serves_every_resource_with_auth_and_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = Nats::start(free_port(), &dir.path().join("js"));
    connect(&nats.url).await;
    let db = format!("flame_api_{}", unique());
    let tokens = dir.path().join("tokens");
    let token = add_token(&tokens, "grace");
    let reader = add_scoped_token(&tokens, "rita", "read");
    let operator = add_scoped_token(&tokens, "otto", "operator");
    // A token whose time is up, and one written before scopes existed (it keeps every right).
    let expired = "flm_expired-token";
    let legacy = "flm_legacy-token";
    let sha = |t: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(t.as_bytes()));
    let mut lines = std::fs::read_to_string(&tokens).expect("tokens");
    lines
        .push_str(&format!("{}\n", json!({"user": "eve", "sha256": sha(expired), "scope": "admin", "expires_at": "2026-01-01T00:00:00Z"})));
    lines.push_str(&format!("{}\n", json!({"user": "lee", "sha256": sha(legacy)})));
    std::fs::write(&tokens, lines).expect("write tokens");
    let mut procs = Processes::default();
    let port = free_port();
    serve(&mut procs, &nats.url, &db, port, &tokens);
    let api = Http::new(port, Some(&token));
    api.wait_ready();
    let anonymous = Http::new(port, None);
    let forged = Http::new(port, Some("flm_not-a-token"));

    // Scopes: read looks, operator also runs jobs, admin also removes; an expired token is refused.
    let (reading, writing, removing) = (Http::new(port, Some(&reader)), Http::new(port, Some(&operator)), Http::new(port, Some(legacy)));
    assert_eq!(reading.call("GET", "/jobs", None).0, 200);
    let (status, body) = reading.call("POST", "/designs", Some(r#"{"id":"scoped","name":"scoped"}"#));
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("operator scope") && d.contains("'rita' has read")), "{body}");
    assert_eq!(writing.call("POST", "/designs", Some(r#"{"id":"scoped","name":"scoped"}"#)).0, 201);
    let (status, body) = writing.call("DELETE", "/designs/scoped", None);
    assert_eq!(status, 403);
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("admin scope")), "{body}");
    assert_eq!(removing.call("DELETE", "/designs/scoped", None).0, 204, "a token line without a scope keeps every right");
    let (status, body) = Http::new(port, Some(expired)).call("GET", "/jobs", None);
    assert_eq!(status, 401);
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("expired at 2026-01-01T00:00:00Z")), "{body}");
    // flamectl says which scope a refused call needed, with exit code 5.
    let refused = Command::new(bin("flamectl"))
        .args(["start", "job", "nope", "--api", &format!("http://127.0.0.1:{port}"), "--token", &reader])
        .output()
        .expect("flamectl");
    assert_eq!(refused.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs a token with the operator scope"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The OpenAPI document is public and the checked-in copy is current.
    let (status, doc) = anonymous.call("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let checked_in: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("docs/openapi.json")).expect("docs/openapi.json")).expect("json");
    assert_eq!(doc, checked_in, "docs/openapi.json is stale: run `flame-engine openapi > docs/openapi.json`");
    for path in doc["paths"].as_object().expect("paths").keys() {
        let concrete = path.replace("{id}", "x").replace("{task}", "y");
        let (status, body) = anonymous.call("GET", &concrete, None);
        if status != 405 {
            assert_eq!(status, 401, "GET {path} without a token: {body}");
        }
    }
    assert_eq!(forged.call("GET", "/jobs", None).0, 401);

    // Designs and their schemas.
    let (status, _) = api.call("POST", "/designs", Some(r#"{"id":"digits","name":"digits","description":"two-tier"}"#));
    assert_eq!(status, 201);
    assert_eq!(api.call("POST", "/designs", Some(r#"{"id":"digits"}"#)).0, 409, "a design id is taken once");
    assert_eq!(api.call("GET", "/designs/digits/schema", None).0, 404, "no schema yet");
    let wf = digits_workflow(|_| {});
    let (status, body) = api.call("PUT", "/designs/digits/schema", Some("{\"roles\": 5}"));
    assert_eq!((status, body["errors"][0]["path"].as_str().map(|p| p.starts_with("request body:"))), (422, Some(true)), "{body}");
    assert_eq!(api.call("PUT", "/designs/digits/schema", Some(&wf["design"].to_string())).0, 200);
    assert_eq!(api.call("GET", "/designs/digits/schema", None).1["roles"].as_array().map(Vec::len), Some(2));
    assert_eq!(api.call("GET", "/designs", None).1.as_array().map(Vec::len), Some(1));
    assert_eq!(api.call("GET", "/designs/nope", None).0, 404);

    // Datasets.
    let (status, ds) = api.call("POST", "/datasets", Some(r#"{"name":"digits-0","url":"builtin://digits?part=0&of=3","realm":"default"}"#));
    assert_eq!(status, 201, "{ds}");
    let ds_id = ds["id"].as_str().expect("dataset id").to_string();
    assert_eq!(api.call("GET", &format!("/datasets/{ds_id}"), None).1["url"], "builtin://digits?part=0&of=3");
    assert_eq!(api.call("GET", "/datasets", None).1.as_array().map(Vec::len), Some(1));
    assert_eq!(api.call("POST", "/datasets", Some(r#"{"name":"x"}"#)).0, 422, "a dataset needs a url");

    // Jobs: invalid definitions get the whole validation list.
    let mut bad = wf.clone();
    bad["modelSpec"]["optimizer"]["sort"] = json!("fedmagic");
    bad["design"]["channels"][0]["pair"] = json!(["trainer", "nobody"]);
    let (status, body) = api.call("POST", "/jobs", Some(&bad.to_string()));
    assert_eq!(status, 422, "{body}");
    let paths: Vec<&str> = body["errors"].as_array().expect("errors").iter().filter_map(|e| e["path"].as_str()).collect();
    assert!(paths.iter().any(|p| p.contains("optimizer")) && paths.iter().any(|p| p.contains("channels")), "{paths:?}");
    assert_eq!(api.call("POST", "/jobs", Some("{not json")).0, 422);

    // A job by design id and a registered dataset.
    let mut by_ref = wf.clone();
    by_ref.as_object_mut().expect("object").remove("design");
    by_ref["job"]["designId"] = json!("digits");
    let group = by_ref["dataSpec"][0]["datasetGroups"].as_object().expect("groups").keys().next().expect("group").clone();
    let mut refs = by_ref["dataSpec"][0]["datasetGroups"][&group].as_array().expect("refs").clone();
    refs[0] = json!(ds_id);
    by_ref["dataSpec"][0]["datasetGroups"][&group] = json!(refs);
    let (status, job) = api.call("POST", "/jobs", Some(&by_ref.to_string()));
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(job["state"], "ready");
    let (status, tasks) = api.call("GET", &format!("/jobs/{id}/tasks"), None);
    assert_eq!((status, tasks.as_array().map(Vec::len)), (200, Some(4)));
    assert!(tasks.as_array().expect("tasks").iter().any(|t| t["dataset"] == "builtin://digits?part=0&of=3"));
    assert_eq!(api.call("GET", &format!("/jobs/{id}/tasks/aggregator-0"), None).1["role"], "aggregator");
    assert_eq!(api.call("GET", &format!("/jobs/{id}/tasks/nope"), None).0, 404);

    // Update while ready; then start (no workers here, so it waits in starting) and stop.
    let renamed = digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(2));
    let (status, updated) = api.call("PUT", &format!("/jobs/{id}"), Some(&renamed.to_string()));
    assert_eq!((status, updated["total_rounds"].as_u64()), (200, Some(2)), "{updated}");
    let (status, started) = api.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"start"}"#));
    assert_eq!((status, started["state"].as_str()), (200, Some("starting")), "{started}");
    assert_eq!(api.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"start"}"#)).0, 409, "start twice");
    assert_eq!(api.call("PUT", &format!("/jobs/{id}"), Some(&renamed.to_string())).0, 409, "no update while active");
    assert_eq!(api.call("DELETE", &format!("/jobs/{id}"), None).0, 409, "no delete while active");
    assert_eq!(api.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"pause"}"#)).0, 422);
    let (status, _) = api.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"stop","reason":"testing"}"#));
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopped = loop {
        let (_, j) = api.call("GET", &format!("/jobs/{id}"), None);
        if j["state"] == "terminated" {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not terminate: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(stopped["failure"].as_str().unwrap_or_default().contains("stopped by user:grace: testing"), "{stopped}");
    assert_eq!(api.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"stop"}"#)).0, 409, "an ended job cannot stop");

    // Events, paged, with the user as actor; and as server-sent events.
    let (status, page) = api.call("GET", &format!("/jobs/{id}/events?limit=2"), None);
    assert_eq!(status, 200);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["events"][0]["actor"], "user:grace");
    assert_eq!(page["next"], 3);
    let (_, rest) = api.call("GET", &format!("/jobs/{id}/events?from=3&limit=1000"), None);
    assert!(rest["events"].as_array().expect("events").iter().any(|e| e["event_type"] == "JobTerminated"));
    assert_eq!(rest["next"], Value::Null);
    let mut sse = ureq::get(&format!("http://127.0.0.1:{port}/jobs/{id}/events/stream"))
        .header("authorization", &format!("Bearer {token}"))
        .call()
        .expect("SSE");
    let mut reader = std::io::BufReader::new(sse.body_mut().as_reader());
    let mut names = Vec::new();
    while names.len() < 3 {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut reader, &mut line).expect("read") > 0, "the event stream ended");
        if let Some(name) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
            names.push(name.trim().to_string());
        }
    }
    assert_eq!(names, vec!["JobCreated", "JobUpdated", "JobStarting"]);

    // The inspection commands read the same events through the API.
    let inspect = |args: &[&str], token: &str| {
        Command::new(bin("flamectl"))
            .args(args)
            .args(["--api", &format!("http://127.0.0.1:{port}")])
            .env("FLAME_TOKEN", token)
            .output()
            .expect("flamectl")
    };
    let all = rest["events"].as_array().map_or(0, Vec::len) + 2;
    let out = inspect(&["events", &id, "-o", "json"], &token);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!((out.status.code(), lines.len()), (Some(0), all), "{}", String::from_utf8_lossy(&out.stderr));
    let out = inspect(&["audit", &id, "-o", "json"], &token);
    let audit = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(audit.lines().any(|l| l.contains("\"JobStopping\"") && l.contains("user:grace")), "{audit}");
    let out = inspect(&["replay", &id, "--verify"], &token);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = inspect(&["events", &id], "wrong");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));

    // Delete, then 404; computes and the rest of the resource verbs.
    assert_eq!(api.call("DELETE", &format!("/jobs/{id}"), None).0, 204);
    assert_eq!(api.call("GET", &format!("/jobs/{id}"), None).0, 404);
    assert_eq!(api.call("GET", "/jobs", None).1.as_array().map(Vec::len), Some(0));
    assert_eq!(api.call("GET", "/jobs/unknown-id", None).0, 404);
    assert_eq!(api.call("GET", "/computes", None), (200, json!([])));
    assert_eq!(api.call("DELETE", &format!("/datasets/{ds_id}"), None).0, 204);
    assert_eq!(api.call("GET", &format!("/datasets/{ds_id}"), None).0, 404);
    assert_eq!(api.call("DELETE", "/designs/digits", None).0, 204);
    assert_eq!(api.call("DELETE", "/designs/digits", None).0, 404);

    // flamectl's verbs over the same API.
    let flamectl = |args: &[&str]| {
        let out = Command::new(bin("flamectl"))
            .args(args)
            .args(["--api", &format!("http://127.0.0.1:{port}")])
            .env("FLAME_TOKEN", &token)
            .current_dir(root())
            .output()
            .expect("flamectl");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, out, err) = flamectl(&["create", "job", "examples/digits-two-tier"]);
    assert_eq!(code, Some(0), "{err}");
    let created: Value = serde_json::from_str(&out).expect("flamectl prints the job");
    let id = created["id"].as_str().expect("id");
    let (code, out, _) = flamectl(&["get", "job", id]);
    assert_eq!((code, serde_json::from_str::<Value>(&out).expect("json")["state"].clone()), (Some(0), json!("ready")));
    let (code, _, err) = flamectl(&["start", "job", "no-such-job"]);
    assert_eq!(code, Some(3), "404 exits 3: {err}");
    let (code, _, err) = flamectl(&["remove", "job", id]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = flamectl(&["get", "jobs", "--token", "wrong"]);
    assert_eq!(code, Some(5), "401 exits 5: {err}");
}

/// The engine replicas that recorded a job's engine decisions, in order, each
/// run of consecutive events by one replica once: `[r1, r3, r2]` means r1
/// drove the job, then r3, then r2.
fn drivers(events: &[Envelope]) -> Vec<String> {
    let mut runs: Vec<String> = Vec::new();
    for e in events {
        if let Some(replica) = e.actor.strip_prefix("engine:")
            && runs.last().is_none_or(|last| last != replica)
        {
            runs.push(replica.to_string());
        }
    }
    runs
}

/// Waits until the job's lease is held by someone other than `gone`; returns who and how long it took.
async fn new_holder(leases: &flame_transport::lease::Leases, job: &str, gone: &str, since: Instant) -> (String, Duration) {
    loop {
        if let Some(h) = leases.holder_of(&format!("job.{job}")).await.expect("lease")
            && h != gone
        {
            return (h, since.elapsed());
        }
        assert!(since.elapsed() < Duration::from_secs(60), "no replica took over job {job} from {gone} in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Engine replicas (issue 17, part 2). One replica starts two jobs and is
/// SIGKILLed; two replicas started at the same moment contend for its jobs,
/// and each job goes to exactly one of them. Then the holder of one job is
/// SIGKILLed mid-round and the last replica takes it over. Both jobs complete
/// with every round aggregated once and every update counted once, and the
/// event log shows one driver at a time: no replica records for a job again
/// once another has taken it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_replicas_drive_each_job_once_and_take_over_a_dead_ones_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = Nats::start(free_port(), &dir.path().join("js"));
    let client = connect(&nats.url).await;
    let db = format!("flame_replicas_{}", unique());
    let tokens = dir.path().join("tokens");
    let token = add_token(&tokens, "ada");
    let mut procs = Processes::default();
    for (id, roles, realm) in DIGITS_WORKERS {
        worker(&mut procs, &nats.url, id, roles, realm);
    }
    let ports = [free_port(), free_port(), free_port()];
    let mut replica: BTreeMap<String, (usize, u16)> = BTreeMap::new();
    let start = |procs: &mut Processes, replica: &mut BTreeMap<String, (usize, u16)>, name: &str, port: u16| {
        let i = serve_as(procs, &nats.url, &db, port, &tokens, &["--replica-id", name]);
        replica.insert(name.to_string(), (i, port));
    };
    start(&mut procs, &mut replica, "r1", ports[0]);
    let r1 = Http::new(ports[0], Some(&token));
    r1.wait_ready();
    let rounds = 16;
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let wf = digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds));
        let (status, job) = r1.call("POST", "/jobs", Some(&wf.to_string()));
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().expect("id").to_string();
        let (status, started) = r1.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"start"}"#));
        assert_eq!(status, 200, "{started}");
        jobs.push(id);
    }
    let (a, b) = (jobs[0].clone(), jobs[1].clone());
    let store = flame_stores::mongo::MongoStore::connect(&mongo_uri(), &db).await.expect("mongo");
    let leases = flame_transport::lease::Leases::open(&async_nats::jetstream::new(client), "test", flame_transport::lease::DEFAULT_TTL, 1)
        .await
        .expect("leases");

    // 1. r1 drives both; it dies in round 2 of job A, and r2 and r3 start at the same moment.
    wait_for(&store, &a, "round 2", 120, |ev| of_type(ev, "RoundStarted").count() >= 2).await;
    assert_eq!(leases.holder_of(&format!("job.{a}")).await.expect("lease").as_deref(), Some("r1"));
    kill(&mut procs, replica["r1"].0);
    let killed = Instant::now();
    start(&mut procs, &mut replica, "r2", ports[1]);
    start(&mut procs, &mut replica, "r3", ports[2]);
    let (holder_a, took_a) = new_holder(&leases, &a, "r1", killed).await;
    let (holder_b, took_b) = new_holder(&leases, &b, "r1", killed).await;
    eprintln!("r1 SIGKILLed; r2 and r3 started at once: job A to {holder_a} after {took_a:?}, job B to {holder_b} after {took_b:?}");
    for port in &ports[1..] {
        let http = Http::new(*port, Some(&token));
        http.wait_ready();
        for job in [&a, &b] {
            let (status, body) = http.call("GET", &format!("/jobs/{job}"), None);
            assert_eq!(status, 200, "replica on port {port}, job {job}: {body}");
        }
    }

    // 2. A's holder dies mid-round (some updates of a round from 5 on are in, its aggregate is not).
    wait_for(&store, &a, "a half-done round", 180, |ev| {
        of_type(ev, "UpdateReported").any(|u| {
            round_of(u) >= 5
                && !of_type(ev, "RoundAggregated").any(|g| round_of(g) == round_of(u))
                && ev.last().is_some_and(|l| l.actor == format!("engine:{holder_a}") || l.actor.starts_with("worker:"))
        })
    })
    .await;
    kill(&mut procs, replica[&holder_a].0);
    let killed = Instant::now();
    let (last_a, took) = new_holder(&leases, &a, &holder_a, killed).await;
    eprintln!("{holder_a} SIGKILLed mid-round: job A to {last_a} after {took:?}");

    // 3. A replica paused past its lease (SIGSTOP) loses its jobs to r4, and records nothing for
    //    them when it goes on (SIGCONT): its fence closed while it slept.
    start(&mut procs, &mut replica, "r4", free_port());
    Http::new(replica["r4"].1, Some(&token)).wait_ready();
    wait_for(&store, &a, "round 9", 180, |ev| of_type(ev, "RoundStarted").count() >= 9).await;
    let paused = procs.0[replica[&last_a].0].id().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &paused]).status().expect("kill").success(), "kill {sig}");
    signal("-STOP");
    let stopped = Instant::now();
    let (taker, took) = new_holder(&leases, &a, &last_a, stopped).await;
    assert_eq!(taker, "r4");
    eprintln!("{last_a} paused: job A to {taker} after {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal("-CONT");
    for job in [&a, &b] {
        let events = wait_for(&store, job, "the end", 240, |ev| ev.last().is_some_and(|e| e.event_type == "JobCompleted")).await;
        let inputs = check_exactly_once(&events, rounds);
        assert!(inputs.values().all(|n| *n == 3), "job {job}: every round used all three trainers: {inputs:?}");
        // One driver at a time: each replica's decisions form one run, and the runs follow the takeovers.
        let runs = drivers(&events);
        let distinct: BTreeSet<&String> = runs.iter().collect();
        assert_eq!(distinct.len(), runs.len(), "job {job}: a replica recorded again after another took over: {runs:?}");
        assert_eq!(runs.first().map(String::as_str), Some("r1"), "job {job}: {runs:?}");
        if *job == a {
            assert_eq!(runs, vec!["r1".to_string(), holder_a.clone(), last_a.clone(), "r4".to_string()], "job A's drivers");
        }
        let url = mongo_uri().replacen("/?", &format!("/{db}?"), 1);
        let out = Command::new(bin("flamectl")).args(["replay", job, "--store", &url, "--verify"]).output().expect("flamectl");
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    // The survivors answer for both jobs.
    let http = Http::new(replica["r4"].1, Some(&token));
    for job in [&a, &b] {
        let (status, body) = http.call("GET", &format!("/jobs/{job}"), None);
        assert_eq!(status, 200, "{body}");
    }

    // A fork through the API, from round 14 of job B with the same seeds, ends at B's final model.
    let (status, refused) = http.call("POST", &format!("/jobs/{b}/fork"), Some(r#"{"fromRound": 40}"#));
    assert_eq!(status, 422, "{refused}");
    assert!(refused["detail"].as_str().is_some_and(|d| d.contains("no global model after round 39")), "{refused}");
    assert_eq!(http.call("POST", &format!("/jobs/{b}/fork"), Some(r#"{"fromRond": 2}"#)).0, 422, "unknown fields are refused");
    let (status, fork) = http.call("POST", &format!("/jobs/{b}/fork"), Some(r#"{"fromRound": 14}"#));
    assert_eq!(status, 201, "{fork}");
    assert_eq!((fork["forked_from"]["parent_job"].as_str(), fork["forked_from"]["from_round"].as_u64()), (Some(b.as_str()), Some(14)));
    let f = fork["id"].as_str().expect("id").to_string();
    let (status, started) = http.call("PUT", &format!("/jobs/{f}/status"), Some(r#"{"state":"start"}"#));
    assert_eq!(status, 200, "{started}");
    let forked = wait_for(&store, &f, "the fork's end", 240, |ev| ev.last().is_some_and(|e| e.event_type == "JobCompleted")).await;
    let parent = store.read_stream(&flame_events::job::stream_id(&b), 1).await.expect("read");
    let end = |ev: &[flame_events::Envelope]| ev.last().map(|e| e.payload["final_model"].clone());
    assert_eq!(end(&forked), end(&parent), "the fork retraced rounds 14 to {rounds} bit for bit");
    let rounds_run: Vec<u64> = of_type(&forked, "RoundStarted").map(|e| e.payload["round"].as_u64().unwrap_or(0)).collect();
    assert_eq!(rounds_run, (14..=rounds).collect::<Vec<_>>());
}

/// Prometheus' text format, parsed by a real parser; each sample's (name, labels) -> value.
fn scrape(url: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let body = ureq::get(url).call().expect("scrape").body_mut().read_to_string().expect("body");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("the exposition parses");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            let labels: BTreeMap<String, String> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            (s.metric, labels, value)
        })
        .collect()
}

fn sample(samples: &[(String, BTreeMap<String, String>, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_engine_and_workers_agree_with_the_jobs_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = Nats::start(free_port(), &dir.path().join("js"));
    connect(&nats.url).await;
    let db = format!("flame_metrics_{}", unique());
    let tokens = dir.path().join("tokens");
    let token = add_token(&tokens, "ada");
    let mut procs = Processes::default();
    let mut worker_ports = BTreeMap::new();
    for (id, roles, realm) in DIGITS_WORKERS {
        let port = free_port();
        worker_ports.insert(id, port);
        procs.spawn(
            Command::new(bin("flame-worker"))
                .args(["--nats", &nats.url, "--id", id, "--roles", roles, "--realm", realm, "--metrics", &format!("127.0.0.1:{port}")])
                .arg("--data-root")
                .arg(crate::util::examples())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        );
    }
    let port = free_port();
    serve(&mut procs, &nats.url, &db, port, &tokens);
    let http = Http::new(port, Some(&token));
    http.wait_ready();
    let rounds = 4;
    let wf = digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds));
    let (status, job) = http.call("POST", "/jobs", Some(&wf.to_string()));
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(http.call("PUT", &format!("/jobs/{id}/status"), Some(r#"{"state":"start"}"#)).0, 200);
    let store = flame_stores::mongo::MongoStore::connect(&mongo_uri(), &db).await.expect("mongo");
    let events = wait_for(&store, &id, "the end", 180, |ev| ev.last().is_some_and(|e| e.event_type == "JobCompleted")).await;

    // The engine: its counters equal what the job's log holds; the job counts as completed.
    let engine = scrape(&format!("http://127.0.0.1:{port}/metrics"));
    let count = |t: &str| of_type(&events, t).count() as f64;
    assert_eq!(sample(&engine, "flame_rounds_aggregated_total", &[("optimizer", "fedavg")]), f64::from(rounds));
    assert_eq!(sample(&engine, "flame_updates_total", &[("outcome", "accepted")]), count("UpdateReported"));
    assert_eq!(sample(&engine, "flame_updates_total", &[("outcome", "refused")]), count("ReportRejected"));
    for t in ["JobCreated", "RoundStarted", "UpdateReported", "RoundAggregated", "JobCompleted"] {
        assert_eq!(sample(&engine, "flame_events_recorded_total", &[("type", t)]), count(t), "{t}");
    }
    assert_eq!(sample(&engine, "flame_events_recorded_total", &[]), events.len() as f64, "every event this engine recorded");
    assert_eq!(sample(&engine, "flame_jobs", &[("state", "completed")]), 1.0);
    // Histograms: a round's duration for every round, an aggregation's for every aggregate, an append for each write.
    assert_eq!(sample(&engine, "flame_round_duration_seconds_count", &[]), f64::from(rounds));
    assert_eq!(sample(&engine, "flame_aggregation_duration_seconds_count", &[("tier", "top")]), f64::from(rounds));
    assert!(sample(&engine, "flame_store_append_seconds_count", &[]) >= 1.0);
    let trains = sample(&engine, "flame_commands_sent_total", &[("kind", "train")]);
    assert!(trains >= count("UpdateReported"), "a train command for every update: {trains}");
    assert_eq!(sample(&engine, "flame_commands_in_flight", &[]), 0.0, "nothing in flight after the job");
    // The relay catches up with the log.
    assert!(engine.iter().any(|(n, _, _)| n == "flame_relay_lag_events"), "the relay's lag is exported");
    assert!(engine.iter().any(|(n, _, _)| n == "flame_jobs"), "jobs by state are exported");
    // Every worker heartbeats (every few seconds): each is listed, recently seen.
    for id in worker_ports.keys() {
        let age =
            engine.iter().find(|(n, l, _)| n == "flame_worker_heartbeat_age_seconds" && l.get("worker").map(String::as_str) == Some(*id));
        assert!(age.is_some_and(|(_, _, a)| *a > 0.0 && *a < 30.0), "worker {id}'s heartbeat age, from the registry's entry time: {age:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(&scrape(&format!("http://127.0.0.1:{port}/metrics")), "flame_relay_lag_events", &[]) > 0.0 {
        assert!(Instant::now() < deadline, "the relay did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Each worker: the commands it ran, by kind, agree with the log's events caused by them.
    let mut updates_by_worker: BTreeMap<String, f64> = BTreeMap::new();
    for e in of_type(&events, "UpdateReported") {
        *updates_by_worker.entry(e.payload["worker_id"].as_str().unwrap_or_default().to_string()).or_default() += 1.0;
    }
    for (id, port) in &worker_ports {
        let w = scrape(&format!("http://127.0.0.1:{port}/metrics"));
        let want_train = updates_by_worker.get(*id).copied().unwrap_or(0.0);
        assert_eq!(sample(&w, "flame_worker_commands_total", &[("kind", "train"), ("outcome", "ok")]), want_train, "worker {id}");
        assert_eq!(sample(&w, "flame_worker_commands_total", &[("outcome", "failed")]), 0.0, "worker {id}");
        if *id == "agg" {
            assert_eq!(sample(&w, "flame_worker_commands_total", &[("kind", "aggregate"), ("outcome", "ok")]), f64::from(rounds));
        }
        assert!(sample(&w, "flame_worker_blob_bytes_total", &[("direction", "in")]) > 0.0, "worker {id} read models");
        assert!(sample(&w, "flame_worker_command_duration_seconds_count", &[]) >= want_train);
    }
}
