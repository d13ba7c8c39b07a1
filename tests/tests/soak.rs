//! The chaos soak (issue 17, part 3). Small jobs of four kinds run on three
//! engine replicas and eight workers:
//!
//! - two-tier FedAvg;
//! - two-tier median;
//! - asynchronous FedBuff;
//! - hierarchical, with a middle aggregator per region.
//!
//! Meanwhile a seeded schedule SIGKILLs engines and workers, SIGKILLs and
//! restarts NATS (JetStream on disk), and restarts the MongoDB-wire server.
//! Everything runs on loopback, and every process is kept alive as a service
//! manager would: restarted when it exits, unless it is down on purpose.
//!
//! At the end, for every job:
//! - it ended, and a failure or termination says why;
//! - no round was aggregated twice, and no update was counted twice;
//! - stream versions are gap-free;
//! - every event was published on JetStream exactly once under its id;
//! - `flamectl replay --verify` passes;
//! - `flamectl verify --models` derives every recorded model again, bit for bit;
//! - every model blob its events name matches its digest.
//!
//! It prints the figures: jobs, kills and restarts, and the longest stall.
//!
//! The default is the short version that `scripts/test.sh` (and so CI) runs:
//! 6 jobs. `scripts/soak.sh` runs the long one (`FLAME_SOAK_JOBS=30`). The
//! knobs are `FLAME_SOAK_JOBS`, `FLAME_SOAK_ROUNDS` (per job, default 20),
//! `FLAME_SOAK_SEED` and `FLAME_SOAK_MINUTES` (a bound on the whole run).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde_json::{Value, json};
use sha2::Digest;

use flame_events::store::EventStore;
use flame_events::{Envelope, ExpectedVersion};
use flame_stores::mongo::MongoStore;
use flame_workers::blob::{BlobStore, NatsBlobs};

use crate::util::{bin, digits_workflow, examples, free_port, root, unique};

struct Settings {
    jobs: usize,
    /// Rounds of each job.
    rounds: u64,
    /// Jobs active at once.
    concurrent: usize,
    seed: u64,
    /// A fault every this many milliseconds (drawn from the range).
    fault_every: (u64, u64),
    limit: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Self {
            jobs: var("FLAME_SOAK_JOBS", 6) as usize,
            rounds: var("FLAME_SOAK_ROUNDS", 20),
            concurrent: 3,
            seed: var("FLAME_SOAK_SEED", 1),
            fault_every: (2000, 5000),
            limit: Duration::from_secs(60 * var("FLAME_SOAK_MINUTES", 10)),
        }
    }
}

/// A small deterministic generator for the schedule.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// A process kept running like a service: started again when it exits,
/// unless it was taken down on purpose until some time.
struct Kept {
    name: String,
    command: Box<dyn Fn() -> Command>,
    child: Option<Child>,
    down_until: Option<Instant>,
}

impl Kept {
    fn new(name: &str, command: impl Fn() -> Command + 'static) -> Self {
        Self { name: name.to_string(), command: Box::new(command), child: None, down_until: None }
    }

    fn start(&mut self) {
        let mut command = (self.command)();
        self.child = Some(command.spawn().unwrap_or_else(|e| panic!("start {}: {e}", self.name)));
        self.down_until = None;
    }

    /// Sends `signal` and waits for the exit, for 30 s at most: a process that
    /// does not stop on SIGTERM is then SIGKILLed (and said so), so that no
    /// stop can hold the soak up.
    fn signal(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
            if exited_within(&mut child, Duration::from_secs(30)).is_none() {
                write_stderr(&format!("soak: {} did not exit within 30 s of {signal}; SIGKILLing it", self.name));
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Down now (by `signal`), back after `for_`.
    fn down(&mut self, signal: &str, for_: Duration) {
        self.signal(signal);
        self.down_until = Some(Instant::now() + for_);
    }

    fn up(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again if it exited, or if its time down is over.
    fn keep(&mut self) {
        if let Some(child) = &mut self.child
            && child.try_wait().ok().flatten().is_some()
        {
            self.child = None;
        }
        if self.child.is_none() && self.down_until.is_none_or(|t| Instant::now() >= t) {
            self.start();
        }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.signal("-KILL");
    }
}

/// The child's exit status if it exits within `limit`.
fn exited_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => return None,
        }
    }
}

/// A line on the real stderr, past the test harness's capture: it shows in CI even if the test never ends.
fn write_stderr(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Ends the whole test binary, saying where the soak was, if the soak has not
/// finished `limit` after it began: a soak that hangs must fail CI with a
/// reason, not run into CI's own time limit.
fn watchdog(limit: Duration, phase: Arc<std::sync::Mutex<String>>) -> Arc<std::sync::atomic::AtomicBool> {
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = finished.clone();
    std::thread::spawn(move || {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if done.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let at = phase.lock().map(|p| p.clone()).unwrap_or_default();
        write_stderr(&format!("soak: still running {limit:?} after it began, at: {at}; ending the test binary"));
        std::process::exit(101);
    });
    finished
}

/// Runs a program to its end, for `limit` at most (then kills it and says so).
fn output_within(mut command: Command, limit: Duration) -> Result<std::process::Output, String> {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    // Read the pipes on threads, so that a chatty program cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reading_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let reading_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let Some(status) = exited_within(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("did not end within {limit:?}"));
    };
    Ok(std::process::Output { status, stdout: reading_out.join().unwrap_or_default(), stderr: reading_err.join().unwrap_or_default() })
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).expect("log file"))
}

/// The hierarchical kind: the digits' three sites in two regions, a middle aggregator for each.
fn hierarchical(rounds: u64, seed: u64) -> Value {
    digits_workflow(|wf| {
        wf["job"]["designId"] = json!("digits-hierarchical");
        wf["design"] = json!({
            "name": "digits-hierarchical",
            "description": "Three sites in two regions, a middle aggregator per region, a top aggregator",
            "roles": [
                {"name": "trainer", "isDataConsumer": true, "groupAssociation": [{"param-channel": "eu"}, {"param-channel": "na"}]},
                {"name": "middle-aggregator", "replica": 1, "groupAssociation": [
                    {"param-channel": "eu", "global-channel": "default"}, {"param-channel": "na", "global-channel": "default"}]},
                {"name": "top-aggregator", "replica": 1, "groupAssociation": [{"global-channel": "default"}]}
            ],
            "channels": [
                {"name": "param-channel", "pair": ["trainer", "middle-aggregator"], "groupBy": {"type": "tag", "value": ["eu", "na"]},
                 "funcTags": {"trainer": ["fetch", "upload"], "middle-aggregator": ["distribute", "aggregate"]}},
                {"name": "global-channel", "pair": ["top-aggregator", "middle-aggregator"], "groupBy": {"type": "tag", "value": ["default"]},
                 "funcTags": {"top-aggregator": ["distribute", "aggregate"], "middle-aggregator": ["fetch", "upload"]}}
            ]
        });
        wf["dataSpec"] = json!([{"role": "trainer", "datasetGroups": {"eu": ["dataset1.json", "dataset2.json"], "na": ["dataset3.json"]}}]);
        wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds);
        wf["modelSpec"]["hyperparameters"]["seed"] = json!(seed);
    })
}

/// Job number `n`: the kinds in turn.
fn workflow(n: usize, rounds: u64) -> (&'static str, Value) {
    let seed = n as u64 + 1;
    let two_tier = |optimizer: Value| {
        digits_workflow(|wf| {
            wf["modelSpec"]["optimizer"] = optimizer;
            wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds);
            wf["modelSpec"]["hyperparameters"]["seed"] = json!(seed);
            wf["modelSpec"]["hyperparameters"]["roundTimeout"] = json!(60);
        })
    };
    match n % 4 {
        0 => ("two-tier fedavg", two_tier(json!({"sort": "fedavg", "kwargs": {}}))),
        1 => ("two-tier median", two_tier(json!({"sort": "median", "kwargs": {}}))),
        2 => {
            let mut wf = two_tier(json!({"sort": "fedbuff", "kwargs": {"eta": 1.0}}));
            wf["modelSpec"]["selector"] = json!({"sort": "fedbuff", "kwargs": {"c": 2}});
            wf["modelSpec"]["hyperparameters"]["aggGoal"] = json!(2);
            ("fedbuff", wf)
        }
        _ => {
            let mut wf = hierarchical(rounds, seed);
            wf["modelSpec"]["hyperparameters"]["roundTimeout"] = json!(60);
            ("hierarchical", wf)
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(5))).build().into()
}

/// Creates and starts a job through one engine's API; the job id, or why not.
fn submit(port: u16, token: &str, wf: &Value) -> Result<String, String> {
    let agent = agent();
    let auth = format!("Bearer {token}");
    let mut created = agent
        .post(&format!("http://127.0.0.1:{port}/jobs"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .send(wf.to_string())
        .map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_str(&created.body_mut().read_to_string().unwrap_or_default()).unwrap_or_default();
    if created.status().as_u16() != 201 {
        return Err(format!("POST /jobs: {} {body}", created.status()));
    }
    let id = body["id"].as_str().ok_or("no id")?.to_string();
    // Started by this engine, or by another if this one just died: retried until it takes (for a while).
    for attempt in 0..100 {
        let started = agent
            .put(&format!("http://127.0.0.1:{port}/jobs/{id}/status"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(r#"{"state":"start"}"#);
        match started {
            Ok(r) if r.status().as_u16() == 200 => return Ok(id),
            // Already started (a retry whose first try went through).
            Ok(r) if r.status().as_u16() == 409 => return Ok(id),
            _ if attempt < 99 => std::thread::sleep(Duration::from_millis(500)),
            other => return Err(format!("starting job {id}: {other:?}")),
        }
    }
    unreachable!()
}

fn ended(events: &[Envelope]) -> bool {
    events.last().is_some_and(|e| matches!(e.event_type.as_str(), "JobCompleted" | "JobFailed" | "JobTerminated"))
}

/// Every blob digest a job's events name.
fn digests(events: &[Envelope]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in events {
        let key = match e.event_type.as_str() {
            "ModelInitialized" | "UpdateReported" | "GroupAggregated" | "RoundAggregated" => "digest",
            "JobCompleted" => "final_model",
            _ => continue,
        };
        if let Some(d) = e.payload[key].as_str() {
            out.insert(d.to_string());
        }
    }
    out
}

/// The invariants of one job; each problem found, in words.
fn check_job(kind: &str, events: &[Envelope]) -> Vec<String> {
    let mut problems = Vec::new();
    let last = events.last().map(|e| (e.event_type.clone(), e.payload.clone()));
    match &last {
        Some((t, _)) if t == "JobCompleted" => {}
        Some((t, p)) if (t == "JobFailed" || t == "JobTerminated") && !p["reason"].as_str().unwrap_or_default().trim().is_empty() => {}
        other => problems.push(format!("{kind}: did not end, or ended without a reason: {other:?}")),
    }
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    if versions != (1..=events.len() as u64).collect::<Vec<_>>() {
        problems.push(format!("{kind}: stream versions have gaps"));
    }
    let mut rounds = BTreeSet::new();
    for e in events.iter().filter(|e| e.event_type == "RoundAggregated") {
        if !rounds.insert(e.payload["round"].as_u64()) {
            problems.push(format!("{kind}: round {} aggregated twice", e.payload["round"]));
        }
    }
    // An update is a worker's answer to one command: counted once per command.
    let mut answered = BTreeSet::new();
    for e in events.iter().filter(|e| e.event_type == "UpdateReported") {
        if !answered.insert(e.causation_id.clone()) {
            problems.push(format!("{kind}: the update answering {:?} was counted twice", e.causation_id));
        }
    }
    problems
}

/// The longest time a job spent between two of its events, and between which.
fn longest_stall(events: &[Envelope]) -> (Duration, String) {
    events
        .windows(2)
        .map(|w| {
            let gap = (w[1].recorded_at - w[0].recorded_at).to_std().unwrap_or_default();
            (gap, format!("after v{} {} {}, before {} {}", w[0].version, w[0].event_type, w[0].payload, w[1].event_type, w[1].payload))
        })
        .max_by_key(|(gap, _)| *gap)
        .unwrap_or_default()
}

async fn published_ids(js: &async_nats::jetstream::Context, job: &str) -> Vec<String> {
    let stream = js.get_stream("FLAME_EVENTS").await.expect("FLAME_EVENTS");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("flame.events.job.{job}"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut ids = Vec::new();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(2), messages.try_next()).await {
        ids.push(msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()).unwrap_or_default());
    }
    ids
}

/// The MongoDB-wire server's program (scripts/services.sh names it).
fn secantus() -> PathBuf {
    std::env::var_os("FLAME_TEST_SECANTUS_BIN").map_or_else(|| root().join(".deps/venv/bin/secantusd-py"), PathBuf::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_soak_loses_and_doubles_nothing() {
    let settings = Settings::from_env();
    let phase = Arc::new(std::sync::Mutex::new("starting".to_string()));
    let now_at = |what: String| *phase.lock().expect("phase") = what;
    // The checks after the schedule are bounded too (about a minute and a half a job at most).
    let finished = watchdog(settings.limit + Duration::from_secs(600), phase.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    let (mongo_port, nats_port) = (free_port(), free_port());
    let mongo_url = format!("mongodb://127.0.0.1:{mongo_port}/?directConnection=true&retryWrites=false");
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let db = format!("flame_soak_{}", unique());
    let tokens = dir.path().join("tokens");
    let out = Command::new(bin("flame-engine"))
        .args(["token", "add", "--tokens", tokens.to_str().expect("utf8"), "--user", "soak", "--scope", "admin"])
        .output()
        .expect("token add");
    let token = String::from_utf8(out.stdout).expect("utf8").trim().to_string();

    let mut mongo = {
        let (data, logs) = (dir.path().join("mongo"), logs.clone());
        std::fs::create_dir_all(&data).expect("mongo dir");
        Kept::new("mongo", move || {
            let mut c = Command::new(secantus());
            c.args(["--host", "127.0.0.1", "--port", &mongo_port.to_string(), "--storage-path", data.to_str().expect("utf8")]);
            c.stdout(log_file(&logs, "mongo")).stderr(log_file(&logs, "mongo"));
            c
        })
    };
    let mut nats = {
        let (data, logs) = (dir.path().join("js"), logs.clone());
        Kept::new("nats", move || {
            let bin = std::env::var("FLAME_TEST_NATS_BIN").expect("FLAME_TEST_NATS_BIN is unset: run with scripts/test.sh");
            let mut c = Command::new(bin);
            c.args(["-a", "127.0.0.1", "-p", &nats_port.to_string(), "-js", "-sd", data.to_str().expect("utf8")]);
            c.stdout(log_file(&logs, "nats")).stderr(log_file(&logs, "nats"));
            c
        })
    };
    mongo.start();
    nats.start();
    let engine_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut engines: Vec<Kept> = engine_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let name = format!("e{}", i + 1);
            let (mongo_url, nats_url, db, tokens, logs, port) =
                (mongo_url.clone(), nats_url.clone(), db.clone(), tokens.clone(), logs.clone(), *port);
            Kept::new(&name.clone(), move || {
                let mut c = Command::new(bin("flame-engine"));
                c.args(["serve", "--mongo", &mongo_url, "--db", &db, "--nats", &nats_url, "--replica-id", &name]);
                c.args(["--listen", &format!("127.0.0.1:{port}"), "--tokens", tokens.to_str().expect("utf8")]);
                c.current_dir(root()).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(log_file(&logs, &name));
                c
            })
        })
        .collect();
    let worker_specs = [
        ("agg-0", "aggregator", "default"),
        ("agg-1", "aggregator", "default"),
        ("s1-a", "trainer,aggregator", "default/site1"),
        ("s1-b", "trainer,aggregator", "default/site1"),
        ("s2-a", "trainer,aggregator", "default/site2"),
        ("s2-b", "trainer,aggregator", "default/site2"),
        ("s3-a", "trainer,aggregator", "default/site3"),
        ("s3-b", "trainer,aggregator", "default/site3"),
    ];
    // The workers' own folders (`flame-worker-<id>` in the temporary folder) are the soak's: the
    // same across a worker's restarts, so that a cut download goes on, and gone with the soak.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).expect("the workers' temporary folder");
    let mut workers: Vec<Kept> = worker_specs
        .iter()
        .map(|(id, roles, realm)| {
            let (nats_url, logs, id, roles, realm) = (nats_url.clone(), logs.clone(), id.to_string(), roles.to_string(), realm.to_string());
            let tmp = tmp.clone();
            Kept::new(&id.clone(), move || {
                let mut c = Command::new(bin("flame-worker"));
                c.args(["--nats", &nats_url, "--id", &id, "--roles", &roles, "--realm", &realm]).arg("--data-root").arg(examples());
                c.env("RUST_LOG", "warn").env("TMPDIR", &tmp).stdout(Stdio::null()).stderr(log_file(&logs, &id));
                c
            })
        })
        .collect();
    for p in engines.iter_mut().chain(workers.iter_mut()) {
        p.start();
    }

    let store = Arc::new(MongoStore::connect(&mongo_url, &db).await.expect("mongo"));
    let started = Instant::now();
    let mut rng = Lcg(settings.seed);
    let mut next_fault = Instant::now() + Duration::from_millis(settings.fault_every.0);
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let mut jobs: Vec<(String, &str)> = Vec::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut refused: Vec<String> = Vec::new();
    let mut submitting: Option<(&str, tokio::task::JoinHandle<Result<String, String>>)> = None;
    while done.len() < settings.jobs {
        if started.elapsed() >= settings.limit {
            let kept = dir.keep();
            panic!(
                "the soak ran past {:?}: {} of {} jobs ended; faults {faults:?}; logs in {}",
                settings.limit,
                done.len(),
                settings.jobs,
                kept.join("logs").display()
            );
        }
        now_at(format!("the schedule: {} of {} jobs ended, faults {faults:?}", done.len(), settings.jobs));
        for p in std::iter::once(&mut mongo).chain(std::iter::once(&mut nats)).chain(engines.iter_mut()).chain(workers.iter_mut()) {
            p.keep();
        }
        // Keep `concurrent` jobs going, submitted through any engine that answers, in the
        // background: an engine that hangs (its database away) must not hold up the schedule.
        if let Some((kind, handle)) = submitting.take_if(|(_, h)| h.is_finished()) {
            match handle.await.expect("submit") {
                Ok(id) => jobs.push((id, kind)),
                Err(e) => {
                    eprintln!("soak {:>6.1} s: a submission was refused, to be tried again: {e}", started.elapsed().as_secs_f64());
                    refused.push(e);
                }
            }
        }
        let active = jobs.len() - done.len();
        if submitting.is_none() && jobs.len() < settings.jobs && active < settings.concurrent {
            let (kind, wf) = workflow(jobs.len(), settings.rounds);
            let port = engine_ports[rng.below(engine_ports.len() as u64) as usize];
            let token = token.clone();
            submitting = Some((kind, tokio::task::spawn_blocking(move || submit(port, &token, &wf))));
        }
        // Which jobs ended (when the database answers; while it does not, the schedule goes on).
        let open: Vec<String> = jobs.iter().map(|(id, _)| id).filter(|id| !done.contains(*id)).cloned().collect();
        for id in open {
            match tokio::time::timeout(Duration::from_millis(500), store.read_stream(&flame_events::job::stream_id(&id), 1)).await {
                Ok(Ok(events)) if ended(&events) => {
                    done.insert(id);
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        if Instant::now() >= next_fault && done.len() < settings.jobs {
            // The first four faults are one of each kind, so that even a short soak has them all.
            let fault = match faults.values().sum::<usize>() {
                0 => 0,
                1 => 8,
                2 => 14,
                3 => 17,
                _ => rng.below(20),
            };
            let (kind, down) = match fault {
                0..=7 => {
                    let i = rng.below(engines.len() as u64) as usize;
                    engines[i].down("-KILL", Duration::from_millis(500 + rng.below(2500)));
                    ("engine SIGKILLed", i)
                }
                8..=13 => {
                    let i = rng.below(workers.len() as u64) as usize;
                    workers[i].down("-KILL", Duration::from_millis(500 + rng.below(2500)));
                    ("worker SIGKILLed", i)
                }
                14..=16 => {
                    nats.down("-KILL", Duration::from_millis(200 + rng.below(1500)));
                    ("NATS SIGKILLed and restarted", 0)
                }
                _ => {
                    // A clean stop: this server checkpoints for a few seconds on SIGTERM.
                    mongo.down("-TERM", Duration::from_millis(200 + rng.below(1500)));
                    ("MongoDB-wire server restarted", 0)
                }
            };
            eprintln!("soak {:>6.1} s: {kind} ({down})", started.elapsed().as_secs_f64());
            *faults.entry(kind).or_default() += 1;
            next_fault =
                Instant::now() + Duration::from_millis(settings.fault_every.0 + rng.below(settings.fault_every.1 - settings.fault_every.0));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let soaked = started.elapsed();

    // Everything up again, then the checks.
    for p in std::iter::once(&mut mongo).chain(std::iter::once(&mut nats)).chain(engines.iter_mut()).chain(workers.iter_mut()) {
        p.down_until = None;
        p.keep();
    }
    assert!(engines.iter().all(Kept::up));
    let client = crate::util::connect(&nats_url).await;
    let js = async_nats::jetstream::new(client);
    let blobs = NatsBlobs::new(&js).await.expect("blob store");
    let url = mongo_url.replacen("/?", &format!("/{db}?"), 1);
    let mut problems = Vec::new();
    let mut by_end: BTreeMap<String, usize> = BTreeMap::new();
    let (mut stall, mut stalled_job) = (Duration::ZERO, String::new());
    let mut events_total = 0;
    for (id, kind) in &jobs {
        now_at(format!("checking job {id} ({kind}): its events"));
        let events = tokio::time::timeout(Duration::from_secs(60), store.read_stream(&flame_events::job::stream_id(id), 1))
            .await
            .unwrap_or_else(|_| panic!("reading job {id}'s events took over a minute"))
            .expect("read");
        events_total += events.len();
        *by_end.entry(format!("{kind}: {}", events.last().map_or("nothing", |e| e.event_type.as_str()))).or_default() += 1;
        problems.extend(check_job(&format!("job {id} ({kind})"), &events).into_iter());
        let (s, at) = longest_stall(&events);
        if s > stall {
            (stall, stalled_job) = (s, format!("{id} ({kind}), {at}"));
        }
        if let Some(e) = events.last().filter(|e| e.event_type != "JobCompleted") {
            eprintln!("soak: job {id} ({kind}) ended with {}: {}", e.event_type, e.payload["reason"]);
        }
        // Published once each: wait for the relay to catch up (a replica holds its lease again).
        now_at(format!("checking job {id} ({kind}): published on JetStream"));
        let stored: BTreeSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let published = loop {
            let ids = published_ids(&js, id).await;
            if ids.len() >= stored.len() || Instant::now() >= deadline {
                break ids;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let unique_ids: BTreeSet<String> = published.iter().cloned().collect();
        if unique_ids.len() != published.len() {
            problems.push(format!("job {id} ({kind}): {} event(s) published twice", published.len() - unique_ids.len()));
        }
        if unique_ids != stored {
            problems.push(format!(
                "job {id} ({kind}): published {} event ids, stored {}; {} stored but not published",
                unique_ids.len(),
                stored.len(),
                stored.difference(&unique_ids).count()
            ));
        }
        now_at(format!("checking job {id} ({kind}): replay --verify"));
        let mut replay = Command::new(bin("flamectl"));
        replay.args(["replay", id, "--store", &url, "--verify"]);
        let out = match output_within(replay, Duration::from_secs(120)) {
            Ok(out) => out,
            Err(e) => {
                problems.push(format!("job {id} ({kind}): replay --verify {e}"));
                continue;
            }
        };
        if !out.status.success() {
            problems.push(format!(
                "job {id} ({kind}): replay --verify: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Every recorded model derives again from the logged updates, bit for bit (jobs that ended with a model).
        if events.iter().any(|e| e.event_type == "RoundAggregated") {
            now_at(format!("checking job {id} ({kind}): verify --models"));
            let mut verify = Command::new(bin("flamectl"));
            verify.args(["verify", id, "--models", "--store", &url, "--nats", &nats_url]);
            match output_within(verify, Duration::from_secs(120)) {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "job {id} ({kind}): verify --models: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )),
                Err(e) => problems.push(format!("job {id} ({kind}): verify --models {e}")),
            }
        }
        now_at(format!("checking job {id} ({kind}): its blobs"));
        for d in digests(&events) {
            let Ok(got) = tokio::time::timeout(Duration::from_secs(90), blobs.get(&d)).await else {
                problems.push(format!("job {id} ({kind}): blob {d}: no answer within 90 s"));
                continue;
            };
            match got {
                Ok(bytes) if hex::encode(sha2::Sha256::digest(&bytes)) == d => {}
                Ok(_) => problems.push(format!("job {id} ({kind}): blob {d} does not match its digest")),
                Err(e) => problems.push(format!("job {id} ({kind}): blob {d}: {e}")),
            }
        }
    }
    // The stores agree with each other: nothing the log holds was lost by the restarts.
    now_at("checking the global log".into());
    let all = tokio::time::timeout(Duration::from_secs(120), store.read_all(1, usize::MAX >> 1))
        .await
        .expect("reading the global log took over two minutes")
        .expect("global log");
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    if !positions.windows(2).all(|w| w[0] < w[1]) {
        problems.push("global positions do not strictly increase".into());
    }
    // A stream append still works after all of it.
    now_at("a last append".into());
    store
        .append(&format!("soak-{}", unique()), ExpectedVersion::NoStream, vec![flame_events::NewEvent::new("Probe", json!({}), "test")])
        .await
        .expect("append");

    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills: usize = faults.values().sum();
    eprintln!(
        "soak: {} jobs ({by_end:?}) with {events_total} events in {:.0} s; {kills} faults survived: {faults:?}; \
         longest stall {:.1} s (job {stalled_job}); {} submission(s) refused and retried",
        jobs.len(),
        soaked.as_secs_f64(),
        stall.as_secs_f64(),
        refused.len()
    );
    if !problems.is_empty() {
        // Keep the processes' logs of a failed run.
        let kept = dir.keep();
        panic!("{} problem(s):\n{}\nlogs in {}", problems.len(), problems.join("\n"), kept.join("logs").display());
    }
}
