//! The worker protocol's conformance suite (docs/protocol.md is its spec):
//! one harness drives any worker program through the protocol over a real
//! NATS server of its own, acting as the engine (commands on `FLAME_CMDS`,
//! reports read from `flame.report.<job>`, blobs in the object store), and
//! checks every answer. It runs against the Rust `flame-worker` and the Python
//! SDK's `flame-py-worker`, and against deliberately broken workers, which
//! must fail it with a message that says what they did wrong.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use flame_transport::blob::{BlobStore, NatsBlobs};
use flame_workers::weights::{self, Weights};

use crate::util::{self, Processes, bin, free_port, root};

/// The program under test, as a command line for a worker id on a NATS URL;
/// it must offer the `trainer` role only, in realm `default/site1`, and train
/// the MLP layout (`fc1` 32x64, `fc2` 10x32) on `digits.npz`.
type Launch = Box<dyn Fn(&str, &str) -> Command>;

/// The Rust worker.
fn rust_worker() -> Launch {
    Box::new(|nats, id| {
        let mut c = Command::new(bin("flame-worker"));
        c.args(["--nats", nats, "--id", id, "--roles", "trainer", "--realm", "default/site1"])
            .arg("--data-root")
            .arg(crate::util::examples());
        c.env("RUST_LOG", "error");
        c
    })
}

/// The Python SDK as `pip install ./sdk/python` put it in `.deps/sdk`, with
/// the numpy trainer of `examples/python-digits`.
pub fn python_worker() -> Launch {
    python(None)
}

fn python(broken: Option<&'static str>) -> Launch {
    let sdk =
        std::env::var("FLAME_SDK_BIN").expect("FLAME_SDK_BIN is unset: run the tests with scripts/test.sh, which installs the Python SDK");
    Box::new(move |nats, id| {
        let trainer = format!("{}:DigitsTrainer", root().join("examples/python-digits/trainer.py").display());
        let mut c = match broken {
            None => Command::new(format!("{sdk}/flame-py-worker")),
            Some(how) => {
                let mut c = Command::new(format!("{sdk}/python"));
                c.arg(root().join("tests/python/broken_worker.py")).arg(how);
                c
            }
        };
        c.args(["--nats", nats, "--id", id, "--roles", "trainer", "--realm", "default/site1", "--trainer", &trainer])
            .arg("--data-root")
            .arg(crate::util::examples())
            .env("FLAME_SDK_LOG", "ERROR");
        c
    })
}

/// One check's outcome: its name and, when it failed, why.
type Outcome = (&'static str, Result<(), String>);

/// The harness: a private NATS server, the worker under test, and the engine's side of the protocol.
struct Harness {
    _nats: util::Nats,
    _dir: tempfile::TempDir,
    procs: Processes,
    js: async_nats::jetstream::Context,
    kv: async_nats::jetstream::kv::Store,
    blobs: NatsBlobs,
    worker: String,
    job: String,
    reports: futures::stream::BoxStream<'static, async_nats::Message>,
    /// Commands the worker acknowledged, with the report stream's last sequence then.
    acks: Acks,
    dataset: String,
}

impl Harness {
    async fn start(launch: &Launch) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = util::Nats::start(free_port(), dir.path());
        let client = util::connect(&nats.url).await;
        // The streams, bucket and object store, as an engine makes them.
        let transport = flame_transport::Nats::new(client.clone()).await.expect("streams");
        let js = transport.jetstream().clone();
        let blobs = NatsBlobs::new(&js).await.expect("object store");
        let kv = js.get_key_value(flame_transport::WORKER_BUCKET).await.expect("bucket");
        let worker = format!("w{}", util::unique());
        let job = format!("conformance{}", util::unique());
        // Reports on the job's bare subject too, so that a worker that publishes there is told so.
        let reports = futures::stream::select(
            client.subscribe(format!("flame.report.{job}")).await.expect("subscribe"),
            client.subscribe(format!("flame.report.{job}.>")).await.expect("subscribe"),
        )
        .boxed();
        let acks = Acks::default();
        watch_acks(client.clone(), js.clone(), worker.clone(), acks.clone()).await;
        let mut procs = Processes::default();
        procs.spawn(launch(&nats.url, &worker).stdout(Stdio::null()));
        let dataset = format!("{}?part=0&of=3", root().join("examples/torchscript-digits/digits.npz").display());
        Self { _nats: nats, _dir: dir, procs, js, kv, blobs, worker, job, reports, acks, dataset }
    }

    fn command(&self, id: &str, round: u32, body: Value) -> Value {
        json!({"v": 2, "id": format!("{}/{id}", self.job), "job_id": self.job, "task_id": "trainer-0", "round": round, "body": body})
    }

    /// Publishes a command as the engine does (`Nats-Msg-Id` = worker:command), or with another message id.
    async fn send(&self, command: &Value, msg_id: Option<&str>) {
        self.send_bytes(
            serde_json::to_vec(command).expect("json"),
            msg_id.map(str::to_string).unwrap_or_else(|| format!("{}:{}", self.worker, command["id"].as_str().unwrap_or_default())),
        )
        .await;
    }

    async fn send_bytes(&self, bytes: Vec<u8>, msg_id: String) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        self.js
            .publish_with_headers(format!("flame.cmd.{}", self.worker), headers, bytes.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// The next report, or why none came.
    async fn report(&mut self, within: Duration) -> Result<Value, String> {
        match tokio::time::timeout(within, self.reports.next()).await {
            Ok(Some(m)) => {
                let want = format!("flame.report.{}.{}", self.job, self.worker);
                if m.subject.as_str() != want {
                    return Err(format!("a report on '{}': a worker reports on its own subject, '{want}'", m.subject));
                }
                serde_json::from_slice(&m.payload).map_err(|e| format!("a report that is not JSON: {e}"))
            }
            Ok(None) => Err("the report subscription closed".into()),
            Err(_) => Err(format!("no report within {} s", within.as_secs())),
        }
    }

    /// Sends a command and checks the head of its report; returns its body.
    async fn ask(&mut self, command: &Value) -> Result<Value, String> {
        self.send(command, None).await;
        let r = self.report(Duration::from_secs(60)).await?;
        for (field, want) in [
            ("command_id", command["id"].clone()),
            ("job_id", command["job_id"].clone()),
            ("task_id", command["task_id"].clone()),
            ("round", command["round"].clone()),
            ("worker_id", json!(self.worker)),
            ("v", json!(2)),
        ] {
            if r[field] != want {
                return Err(format!("the report's {field} is {}, not {want} (report: {r})", r[field]));
            }
        }
        Ok(r["body"].clone())
    }

    async fn put(&self, w: &Weights) -> String {
        self.blobs.put(weights::encode(w).expect("encode")).await.expect("put")
    }

    async fn get(&self, digest: &str) -> Result<Weights, String> {
        let bytes = self.blobs.get(digest).await.map_err(|e| format!("the reported blob: {e}"))?;
        weights::decode(&bytes).map_err(|e| format!("the reported blob {digest} is not a model: {e}"))
    }
}

/// Watches the worker's acknowledgements (`$JS.ACK.FLAME_CMDS.worker-<id>...`):
/// for each, the command's id and the report stream's last sequence once the
/// ack arrived. A report stored before its ack has a sequence at most that.
async fn watch_acks(client: async_nats::Client, js: async_nats::jetstream::Context, worker: String, acks_seen: Acks) {
    let mut acks = client.subscribe(format!("$JS.ACK.{}.worker-{worker}.>", flame_transport::COMMAND_STREAM)).await.expect("subscribe");
    tokio::spawn(async move {
        let commands = js.get_stream(flame_transport::COMMAND_STREAM).await.expect("stream");
        let mut reports = js.get_stream(flame_transport::REPORT_STREAM).await.expect("stream");
        while let Some(ack) = acks.next().await {
            if !ack.payload.is_empty() && &ack.payload[..] != b"+ACK" {
                continue; // +NAK, +WPI, +TERM: not an acknowledgement of a report
            }
            let Ok(info) = reports.info().await else { continue };
            let stored = info.state.last_sequence;
            // $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
            let Some(seq) = ack.subject.split('.').nth(5).and_then(|s| s.parse::<u64>().ok()) else { continue };
            let Ok(command) = commands.get_raw_message(seq).await else { continue };
            if let Some(id) = serde_json::from_slice::<Value>(&command.payload).ok().and_then(|c| c["id"].as_str().map(str::to_string)) {
                acks_seen.lock().expect("lock").push((id, stored));
            }
        }
    });
}

/// Commands acknowledged, each with the report stream's last sequence at that moment.
type Acks = Arc<Mutex<Vec<(String, u64)>>>;

/// The commands acknowledged before their report was stored.
async fn early_acks(h: &Harness) -> Vec<String> {
    let stream = h.js.get_stream(flame_transport::REPORT_STREAM).await.expect("stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let mut stored: BTreeMap<String, u64> = BTreeMap::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await
            && let Some(id) = m.headers.get("Nats-Msg-Id")
        {
            stored.entry(id.to_string()).or_insert(seq);
        }
    }
    let acks = h.acks.lock().expect("lock").clone();
    acks.into_iter().filter(|(id, at)| stored.get(&format!("{}:{id}", h.worker)).is_none_or(|seq| seq > at)).map(|(id, _)| id).collect()
}

fn failed_with(body: &Value, needle: &str) -> Result<(), String> {
    match (body["kind"].as_str(), body["error"].as_str()) {
        (Some("failed"), Some(e)) if e.to_lowercase().contains(&needle.to_lowercase()) => Ok(()),
        (Some("failed"), Some(e)) => Err(format!("failed, but the error does not mention '{needle}': {e}")),
        _ => Err(format!("expected a failed report mentioning '{needle}', got {body}")),
    }
}

fn kind(body: &Value, want: &str) -> Result<(), String> {
    if body["kind"] == want { Ok(()) } else { Err(format!("expected '{want}', got {body}")) }
}

fn initial() -> Weights {
    let bytes = std::fs::read(root().join("examples/python-digits/initial.safetensors")).expect("initial weights");
    weights::decode(&bytes).expect("initial weights decode")
}

fn scaled(w: &Weights, by: f32, plus: f32) -> Weights {
    let mut out = w.clone();
    for t in out.values_mut() {
        for v in &mut t.data {
            *v = *v * by + plus;
        }
    }
    out
}

/// Runs every check against the worker `launch` starts; each outcome in order.
async fn suite(launch: &Launch) -> Vec<Outcome> {
    let mut h = Harness::start(launch).await;
    let mut out: Vec<Outcome> = Vec::new();

    // Registration: the entry, then a heartbeat (a new revision) within the TTL.
    let registered = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let first = loop {
            if let Ok(Some(e)) = h.kv.entry(&h.worker).await {
                break e;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("no entry '{}' in {} within 30 s", h.worker, flame_transport::WORKER_BUCKET));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let info: Value = serde_json::from_slice(&first.value).map_err(|e| format!("the registry entry is not JSON: {e}"))?;
        if info["id"] != h.worker.as_str() || info["roles"] != json!(["trainer"]) || info["realm"] != "default/site1" {
            return Err(format!("the registry entry says {info}; expected id {}, roles [trainer], realm default/site1", h.worker));
        }
        tokio::time::sleep(flame_transport::WORKER_TTL).await;
        match h.kv.entry(&h.worker).await {
            Ok(Some(e)) if e.revision > first.revision => Ok(()),
            _ => Err(format!("no heartbeat renewed the entry within {} s", flame_transport::WORKER_TTL.as_secs())),
        }
    }
    .await;
    out.push(("registers and heartbeats", registered));

    let deploy = h.command("deploy/trainer-0", 0, json!({"kind": "deploy", "role": "trainer", "dataset": h.dataset}));
    out.push(("deploy: a role it offers", h.ask(&deploy).await.and_then(|b| kind(&b, "deployed"))));

    let other_role = h.command("deploy/aggregator-0", 0, json!({"kind": "deploy", "role": "aggregator", "dataset": null}));
    out.push(("deploy: a role it does not offer is refused", h.ask(&other_role).await.and_then(|b| failed_with(&b, "aggregator"))));

    // A job cannot make the worker read what its owner did not share: a path outside its data roots, one that climbs.
    let outside = async {
        for (n, path) in ["/etc/hostname", "../../etc/hostname"].iter().enumerate() {
            let probe = h.command(&format!("deploy/outside-{n}"), 0, json!({"kind": "deploy", "role": "trainer", "dataset": path}));
            let body = h.ask(&probe).await?;
            failed_with(&body, if path.contains("..") { "'..'" } else { "data roots" })?;
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            if !host.trim().is_empty() && body["error"].as_str().is_some_and(|e| e.contains(host.trim())) {
                return Err(format!("the refusal echoes the file's contents: {body}"));
            }
        }
        Ok(())
    }
    .await;
    out.push(("a dataset outside the worker's data roots is refused", outside));

    // The initial model from the job's file, named by its sha256.
    let start = initial();
    let file_bytes = std::fs::read(root().join("examples/python-digits/initial.safetensors")).expect("file");
    let file = h.blobs.put(file_bytes).await.expect("put file");
    let init = h.command(
        "init",
        0,
        json!({"kind": "init_model", "model": {"name": "external", "file": "initial.safetensors", "sha256": file}, "dataset": h.dataset, "seed": 1}),
    );
    let init_result = async {
        let body = h.ask(&init).await?;
        kind(&body, "initialized")?;
        let model = h.get(body["digest"].as_str().unwrap_or_default()).await?;
        if model != start { Err("the initial model differs from the job's file".to_string()) } else { Ok(()) }
    }
    .await;
    out.push(("init_model: the job's initial weights", init_result));

    let global = h.put(&start).await;
    let train = h.command(
        "r1/train/trainer-0",
        1,
        json!({"kind": "train", "model": {"name": "mlp", "hidden": [32]}, "global_model": global, "dataset": h.dataset,
               "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1}, "objective": {"kind": "plain"}, "seed": 3}),
    );
    let mut trained_body = Value::Null;
    let trained = async {
        let body = h.ask(&train).await?;
        kind(&body, "trained")?;
        trained_body = body.clone();
        let model = h.get(body["digest"].as_str().unwrap_or_default()).await?;
        weights::check_same_layout(&start, &model).map_err(|e| format!("the update does not fit the global model: {e}"))?;
        if model == start {
            return Err("the update equals the global model: nothing trained".into());
        }
        if body["samples"].as_u64().is_none_or(|n| n == 0) {
            return Err(format!("samples must be a whole number above 0: {}", body["samples"]));
        }
        match body["metrics"].as_object() {
            Some(m) if m.values().all(|v| v.as_f64().is_some_and(f64::is_finite)) => Ok(()),
            _ => Err(format!("metrics must be an object of finite numbers: {}", body["metrics"])),
        }
    }
    .await;
    out.push(("train: an update of the global model's layout", trained));

    // The same command again, past JetStream's de-duplication (another message id): the same answer.
    h.send(&train, Some(&format!("{}:again", h.worker))).await;
    let repeat = match h.report(Duration::from_secs(60)).await {
        Ok(r) if r["body"] == trained_body => Ok(()),
        Ok(r) => Err(format!("a repeated command id was answered with another report: {} (first: {trained_body})", r["body"])),
        Err(e) => Err(format!("a repeated command id got no answer: {e}")),
    };
    out.push(("a repeated command id gets the same report", repeat));

    let evaluate = h.command(
        "r1/evaluate/trainer-0",
        1,
        json!({"kind": "evaluate", "model": {"name": "mlp", "hidden": [32]}, "global_model": global, "dataset": h.dataset}),
    );
    let evaluated = async {
        let body = h.ask(&evaluate).await?;
        kind(&body, "evaluated")?;
        match body["metrics"]["loss"].as_f64() {
            Some(l) if l.is_finite() => Ok(()),
            _ => Err(format!("evaluated metrics need a finite 'loss': {}", body["metrics"])),
        }
    }
    .await;
    out.push(("evaluate: the global model on held-out data", evaluated));

    // FedAvg of two updates with 1 and 3 samples; a third whose bytes do not match its name.
    let (a, b) = (scaled(&start, 1.0, 1.0), scaled(&start, 2.0, 0.0));
    let (da, db) = (h.put(&a).await, h.put(&b).await);
    let impostor = weights::encode(&scaled(&start, 0.0, 5.0)).expect("encode");
    let misnamed = flame_transport::blob::digest(b"other bytes");
    let store = h.js.get_object_store(flame_transport::blob::BUCKET).await.expect("bucket");
    store.put(misnamed.as_str(), &mut impostor.as_slice()).await.expect("put");
    let aggregate = h.command(
        "r1/aggregate/aggregator-0",
        1,
        json!({"kind": "aggregate", "model": {"name": "mlp", "hidden": [32]}, "optimizer": {"kind": "fedavg"}, "trainers": 3,
               "global_model": global, "eval_dataset": null,
               "updates": [{"task_id": "t-a", "digest": da, "samples": 1}, {"task_id": "t-b", "digest": db, "samples": 3},
                           {"task_id": "t-bad", "digest": misnamed, "samples": 5}]}),
    );
    let aggregated = async {
        let body = h.ask(&aggregate).await?;
        kind(&body, "aggregated")?;
        let model = h.get(body["digest"].as_str().unwrap_or_default()).await?;
        let want = flame_workers::fedavg::fedavg(&[(a.clone(), 1), (b.clone(), 3)]).map_err(|e| e.to_string())?;
        for (name, t) in &want {
            let got = model.get(name).ok_or_else(|| format!("the aggregate lacks '{name}'"))?;
            if let Some((i, (x, y))) = t.data.iter().zip(&got.data).enumerate().find(|(_, (x, y))| (*x - *y).abs() > 1e-5) {
                return Err(format!("'{name}'[{i}] is {y}; the sample-weighted mean is {x}"));
            }
        }
        let excluded = body["excluded"].as_array().cloned().unwrap_or_default();
        match excluded.as_slice() {
            [x] if x["task_id"] == "t-bad" && x["digest"] == misnamed.as_str() && x["reason"].as_str().is_some() => Ok(()),
            _ => Err(format!("the update whose bytes do not match its digest must be excluded (and only it): {}", body["excluded"])),
        }
    }
    .await;
    out.push(("aggregate: FedAvg, a blob with the wrong digest excluded", aggregated));

    let missing = h.command(
        "r2/train/trainer-0",
        2,
        json!({"kind": "train", "model": {"name": "mlp", "hidden": [32]}, "global_model": "0".repeat(64), "dataset": h.dataset,
               "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1}, "objective": {"kind": "plain"}, "seed": 3}),
    );
    out.push((
        "train: a global model that is not in the store fails, naming it",
        h.ask(&missing).await.and_then(|b| failed_with(&b, &"0".repeat(64))),
    ));

    let unknown = h.command("r2/frobnicate", 2, json!({"kind": "frobnicate", "level": 11}));
    out.push(("an unknown body.kind is answered failed", h.ask(&unknown).await.and_then(|b| failed_with(&b, "frobnicate"))));

    let mut newer = h.command("deploy/v3", 0, json!({"kind": "deploy", "role": "trainer", "dataset": h.dataset}));
    newer["v"] = json!(3);
    out.push(("a newer protocol version is answered failed", h.ask(&newer).await.and_then(|b| failed_with(&b, "version 3"))));

    // What is not even a command gets no answer, and is not delivered again.
    h.send_bytes(b"not json".to_vec(), format!("{}:garbage", h.worker)).await;
    let after = h.command("deploy/after-garbage", 0, json!({"kind": "deploy", "role": "trainer", "dataset": h.dataset}));
    let garbage = async {
        let body = h.ask(&after).await.map_err(|e| format!("after a message that is not a command: {e}"))?;
        kind(&body, "deployed")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            h.js.get_stream(flame_transport::COMMAND_STREAM)
                .await
                .map_err(|e| e.to_string())?
                .get_consumer(&format!("worker-{}", h.worker))
                .await
                .map_err(|e| format!("no durable consumer worker-{}: {e}", h.worker))?;
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        if info.num_ack_pending > 0 {
            return Err(format!(
                "{} message(s) left unacknowledged (a message that is not a command must be terminated)",
                info.num_ack_pending
            ));
        }
        if info.config.ack_policy != async_nats::jetstream::consumer::AckPolicy::Explicit {
            return Err(format!("the consumer's ack policy is {:?}, not explicit", info.config.ack_policy));
        }
        Ok(())
    }
    .await;
    out.push(("a durable consumer; what is not a command is dropped", garbage));

    tokio::time::sleep(Duration::from_millis(300)).await; // the last acks reach the watcher
    let early = early_acks(&h).await;
    out.push((
        "acknowledges a command only after its report is stored",
        if early.is_empty() { Ok(()) } else { Err(format!("acknowledged before its report was stored: {early:?}")) },
    ));

    // A graceful stop: SIGTERM while a command runs; it reports, then exits.
    let slow = h.command(
        "r3/train/trainer-0",
        3,
        json!({"kind": "train", "model": {"name": "mlp", "hidden": [32]}, "global_model": global, "dataset": h.dataset,
               "training": {"epochs": 5, "batch_size": 8, "learning_rate": 0.05}, "objective": {"kind": "plain"}, "seed": 4}),
    );
    h.send(&slow, None).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid = h.procs.0[0].id();
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let stopped = async {
        let r = h.report(Duration::from_secs(60)).await.map_err(|e| format!("the command in flight at SIGTERM: {e}"))?;
        kind(&r["body"], "trained")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = h.procs.0[0].try_wait().map_err(|e| e.to_string())? {
                return if status.success() { Ok(()) } else { Err(format!("exited with {status} after SIGTERM")) };
            }
            if std::time::Instant::now() > deadline {
                return Err("still running 20 s after SIGTERM".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    out.push(("SIGTERM: the command in flight reports, then a clean exit", stopped));
    out
}

/// The failures of a suite run, one line each.
fn failures(outcomes: &[Outcome]) -> BTreeMap<&'static str, String> {
    outcomes.iter().filter_map(|(name, r)| r.as_ref().err().map(|e| (*name, e.clone()))).collect()
}

fn print(who: &str, outcomes: &[Outcome]) {
    for (name, r) in outcomes {
        match r {
            Ok(()) => eprintln!("conformance [{who}] ok: {name}"),
            Err(e) => eprintln!("conformance [{who}] FAILED: {name}: {e}"),
        }
    }
}

/// Runs the suite on a worker that must pass every check.
async fn conforms(who: &str, launch: &Launch) {
    let outcomes = suite(launch).await;
    print(who, &outcomes);
    assert!(outcomes.len() >= 15, "every check ran");
    assert!(failures(&outcomes).is_empty(), "{:#?}", failures(&outcomes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_worker_conforms() {
    conforms("flame-worker", &rust_worker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_conforms() {
    conforms("flame-py-worker", &python_worker()).await;
}

/// The suite can fail: a worker that acks on receipt, and one that forgets
/// the commands it ran (and trains differently each time), each fail the
/// check for what they do, with a message that says so, and pass the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_workers_fail_the_suite_with_a_clear_message() {
    let outcomes = suite(&python(Some("ack-first"))).await;
    print("ack-first", &outcomes);
    let f = failures(&outcomes);
    assert_eq!(f.keys().copied().collect::<Vec<_>>(), ["acknowledges a command only after its report is stored"], "{f:#?}");
    assert!(f.values().all(|e| e.contains("acknowledged before its report was stored")), "{f:#?}");

    let outcomes = suite(&python(Some("forgetful"))).await;
    print("forgetful", &outcomes);
    let f = failures(&outcomes);
    assert_eq!(f.keys().copied().collect::<Vec<_>>(), ["a repeated command id gets the same report"], "{f:#?}");
    assert!(f.values().all(|e| e.contains("answered with another report")), "{f:#?}");
}

/// A worker of your own: `FLAME_CONFORMANCE_WORKER` is its command line with
/// `{nats}` and `{id}` in it (split on spaces). Without it this says it was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn your_worker_conforms() {
    let Some(line) = std::env::var("FLAME_CONFORMANCE_WORKER").ok().filter(|l| !l.trim().is_empty()) else {
        eprintln!("skipped: the conformance suite for a worker of your own: FLAME_CONFORMANCE_WORKER is unset");
        return;
    };
    let launch: Launch = Box::new(move |nats, id| {
        let words: Vec<String> = line.split_whitespace().map(|w| w.replace("{nats}", nats).replace("{id}", id)).collect();
        let mut c = Command::new(&words[0]);
        c.args(&words[1..]);
        c
    });
    conforms("FLAME_CONFORMANCE_WORKER", &launch).await;
}

/// A NATS server that dies and comes back (JetStream on disk): the Python
/// worker reconnects on its own, registers again and answers the next command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_survives_a_nats_restart() {
    let mut h = Harness::start(&python_worker()).await;
    let deploy = |h: &Harness, n: u32| {
        h.command(&format!("deploy/restart-{n}"), 0, json!({"kind": "deploy", "role": "trainer", "dataset": h.dataset}))
    };
    let first = deploy(&h, 1);
    kind(&h.ask(&first).await.expect("before the restart"), "deployed").expect("deployed");
    let before = h.kv.entry(&h.worker).await.expect("entry").expect("registered").revision;
    // SIGKILL the server, start it again on the same port and store.
    let (port, dir) = (h._nats.url.rsplit(':').next().expect("port").parse::<u16>().expect("port"), h._dir.path().to_path_buf());
    drop(std::mem::replace(&mut h._nats, util::Nats::start(free_port(), &dir.join("elsewhere"))));
    h._nats = util::Nats::start(port, &dir);
    let client = util::connect(&h._nats.url).await;
    let js = async_nats::jetstream::new(client.clone());
    h.js = js.clone();
    h.reports = client.subscribe(format!("flame.report.{}.>", h.job)).await.expect("subscribe").boxed();
    let kv = js.get_key_value(flame_transport::WORKER_BUCKET).await.expect("bucket");
    let mut back = false;
    for _ in 0..200 {
        if let Ok(Some(e)) = kv.entry(&h.worker).await
            && e.revision > before
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the worker registered again after the restart");
    let second = deploy(&h, 2);
    let body = h.ask(&second).await.expect("after the restart");
    kind(&body, "deployed").expect("deployed");
}
