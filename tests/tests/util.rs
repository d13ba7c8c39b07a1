//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The URL of the NATS server that scripts/test.sh started.
pub fn nats_url() -> String {
    std::env::var("FLAME_TEST_NATS_URL")
        .expect("FLAME_TEST_NATS_URL is unset: run the tests with scripts/test.sh, which starts NATS and SecantusDB")
}

/// The URL of the MongoDB-wire server that scripts/test.sh started.
pub fn mongo_uri() -> String {
    std::env::var("FLAME_TEST_MONGO_URI")
        .expect("FLAME_TEST_MONGO_URI is unset: run the tests with scripts/test.sh, which starts NATS and SecantusDB")
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A binary of the workspace, built beside this test binary (`cargo build` first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` before the tests", path.display());
    path
}

/// The repository's examples: the data root of the workers the tests start.
pub fn examples() -> PathBuf {
    root().join("examples")
}

/// Copies the files of `examples/digits-two-tier` into the folder `to`.
pub fn copy_example(to: &std::path::Path) {
    for entry in std::fs::read_dir(root().join("examples/digits-two-tier")).expect("example") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A short unique suffix for names in shared servers.
pub fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_string()
}

/// Child processes that are killed when the test ends, however it ends.
/// Their temporary folder (`TMPDIR`, unless the test sets one) is one of
/// the test's own, removed after them: a killed worker cannot remove its
/// default download folder, and those piled up in the system's.
#[derive(Default)]
pub struct Processes(pub Vec<Child>, Option<tempfile::TempDir>);

impl Processes {
    /// Starts a process and keeps it.
    pub fn spawn(&mut self, cmd: &mut Command) -> &mut Child {
        if !cmd.get_envs().any(|(k, _)| k == "TMPDIR") {
            let tmp = self.1.get_or_insert_with(|| tempfile::tempdir().expect("a temporary folder for the processes"));
            cmd.env("TMPDIR", tmp.path());
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        self.0.push(child);
        self.0.last_mut().expect("just pushed")
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A NATS server of the test's own (JetStream on), so that its workers and
/// registry are not shared with other tests.
pub struct Nats {
    child: Child,
    /// Its URL.
    pub url: String,
}

impl Nats {
    /// Starts a server on `port` with JetStream data under `dir`.
    pub fn start(port: u16, dir: &std::path::Path) -> Self {
        Self::start_with(port, dir, &[])
    }

    /// Starts a server with extra command-line options (e.g. `--user`, `--auth`).
    pub fn start_with(port: u16, dir: &std::path::Path, extra: &[&str]) -> Self {
        let bin = std::env::var("FLAME_TEST_NATS_BIN").expect("FLAME_TEST_NATS_BIN is unset: run the tests with scripts/test.sh");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", dir.to_str().expect("utf8")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        Self { child, url: format!("nats://127.0.0.1:{port}") }
    }

    /// Stops the server gracefully.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to NATS, waiting for it to come up.
pub async fn connect(url: &str) -> async_nats::Client {
    for _ in 0..100 {
        if let Ok(c) = async_nats::connect(url).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("NATS at {url} did not come up");
}

/// Starts a `flame-worker` process.
pub fn worker(procs: &mut Processes, nats: &str, id: &str, roles: &str, realm: &str) -> usize {
    procs.spawn(
        Command::new(bin("flame-worker"))
            .args(["--nats", nats, "--id", id, "--roles", roles, "--realm", realm])
            .arg("--data-root")
            .arg(examples())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    procs.0.len() - 1
}

/// The digits example as a workflow document, with hyperparameters changed by `f`.
pub fn digits_workflow(f: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("examples/digits-two-tier.json")).expect("example");
    let mut wf: serde_json::Value = serde_json::from_str(&text).expect("workflow JSON");
    f(&mut wf);
    wf
}

/// The digits example's workers: its datasets live in realms default/site1..3.
pub const DIGITS_WORKERS: [(&str, &str, &str); 4] = [
    ("agg", "aggregator", "default"),
    ("t0", "trainer", "default/site1"),
    ("t1", "trainer", "default/site2"),
    ("t2", "trainer", "default/site3"),
];

/// A served deployment of the test's own: NATS, the digits example's four
/// workers and `flame-engine serve` on a fresh database, with an admin token.
pub struct Served {
    /// The processes (workers, then the engine), killed when this is dropped.
    _procs: Processes,
    /// NATS, stopped last.
    _nats: Nats,
    /// The engine's API (`http://127.0.0.1:PORT`).
    pub api: String,
    /// An admin token.
    pub token: String,
    /// The database the engine keeps its events in.
    pub db: String,
}

impl Served {
    /// Starts everything; `engine` and `workers` are extra options for the engine and each worker.
    pub async fn start(dir: &std::path::Path, engine: &[&str], workers: &[&str]) -> Self {
        let workers: Vec<Vec<String>> = DIGITS_WORKERS
            .iter()
            .map(|(id, roles, realm)| {
                let mut args: Vec<String> = ["--id", id, "--roles", roles, "--realm", realm].map(String::from).to_vec();
                args.extend(workers.iter().map(|a| a.to_string()));
                args
            })
            .collect();
        Self::start_with(dir, engine, &workers).await
    }

    /// Starts NATS, one `flame-worker` process per entry of `workers` (its
    /// options besides `--nats` and `--data-root`) and the engine.
    pub async fn start_with(dir: &std::path::Path, engine: &[&str], workers: &[Vec<String>]) -> Self {
        let nats = Nats::start(free_port(), &dir.join("js"));
        connect(&nats.url).await;
        let db = format!("flame_{}", unique());
        let mut procs = Processes::default();
        for args in workers {
            procs.spawn(
                Command::new(bin("flame-worker"))
                    .args(["--nats", &nats.url])
                    .args(args)
                    .arg("--data-root")
                    .arg(examples())
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null()),
            );
        }
        let tokens = dir.join("tokens");
        let out = Command::new(bin("flame-engine"))
            .args(["token", "add", "--tokens", tokens.to_str().expect("utf8"), "--user", "ada", "--scope", "admin"])
            .output()
            .expect("flame-engine token add");
        assert!(out.status.success(), "token add: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).expect("utf8").trim().to_string();
        let port = free_port();
        procs.spawn(
            Command::new(bin("flame-engine"))
                .args(["serve", "--mongo", &mongo_uri(), "--db", &db, "--nats", &nats.url])
                .args(engine)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--tokens", tokens.to_str().expect("utf8")])
                .current_dir(root())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        );
        let api = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while ureq::get(&format!("{api}/healthz")).call().is_err() {
            assert!(std::time::Instant::now() < deadline, "the engine's API did not come up at {api}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { _procs: procs, _nats: nats, api, token, db }
    }

    /// Submits a workflow document and starts the job; returns its id.
    pub fn submit(&self, workflow: &serde_json::Value) -> String {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let auth = format!("Bearer {}", self.token);
        let mut r = agent
            .post(&format!("{}/jobs", self.api))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(workflow.to_string())
            .expect("POST /jobs");
        let created: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("JSON");
        let id = created["id"].as_str().unwrap_or_else(|| panic!("POST /jobs: {created}")).to_string();
        let r = agent
            .put(&format!("{}/jobs/{id}/status", self.api))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(r#"{"state":"start"}"#)
            .expect("PUT status");
        assert_eq!(r.status().as_u16(), 200, "starting job {id}");
        id
    }

    /// The engine's event store.
    pub async fn store(&self) -> flame_stores::mongo::MongoStore {
        flame_stores::mongo::MongoStore::connect(&mongo_uri(), &self.db).await.expect("mongo")
    }

    /// The store's URL for flamectl (`mongodb://HOST:PORT/DB?...`).
    pub fn store_url(&self) -> String {
        let mongo = mongo_uri();
        if mongo.contains("/?") {
            mongo.replacen("/?", &format!("/{}?", self.db), 1)
        } else {
            format!("{}/{}", mongo.trim_end_matches('/'), self.db)
        }
    }
}

/// Job `job`'s events once `pred` holds of them (at most 180 s).
pub async fn wait_for_events(
    store: &dyn flame_events::store::EventStore,
    job: &str,
    what: &str,
    pred: impl Fn(&[flame_events::Envelope]) -> bool,
) -> Vec<flame_events::Envelope> {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let events = store.read_stream(&flame_events::job::stream_id(job), 1).await.expect("read");
        if pred(&events) {
            return events;
        }
        assert!(std::time::Instant::now() < deadline, "job {job}: waited 180 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A FedAvg aggregate command of round 1 of job `j-<run>` to `worker`, over
/// `updates` of the global model `global` (a logistic regression).
pub fn aggregate_command(
    run: &str,
    worker: &str,
    global: String,
    updates: Vec<flame_events::protocol::UpdateRef>,
) -> flame_events::protocol::Command {
    use flame_events::protocol::{Command, CommandBody, VERSION};
    Command {
        v: VERSION,
        id: format!("j-{run}/r1/aggregate/{worker}"),
        job_id: format!("j-{run}"),
        task_id: "aggregator-0".into(),
        round: 1,
        traceparent: None,
        body: CommandBody::Aggregate {
            model: flame_events::model::Model::Logreg,
            optimizer: flame_events::algorithm::ServerOptimizer::FedAvg,
            trainers: updates.len() as u32,
            optimizer_state: None,
            global_model: global,
            updates,
            eval_dataset: None,
            loss: Default::default(),
        },
    }
}

/// Polls `done` until it holds, for 30 s at most (then fails, saying `what`).
pub async fn within_30s(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How a worker process that should stop at its start ended, and what it
/// logged; one still running after 30 s is killed and the test fails, saying `what`.
pub async fn exit_at_start(child: &mut std::process::Child, log: &std::path::Path, what: &str) -> (std::process::ExitStatus, String) {
    let mut status = None;
    let started = std::time::Instant::now();
    while status.is_none() {
        status = child.try_wait().expect("wait");
        if status.is_none() && started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("{what}: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (status.expect("exited"), std::fs::read_to_string(log).expect("its log"))
}

/// `flame-worker-aggregator --nats <the tests' NATS> --id <id> --roles
/// aggregator`, logging at info to the file `log` (for tests that read what
/// a worker said at its start).
pub fn aggregator_worker(id: &str, log: &Path) -> Command {
    let mut c = Command::new(bin("flame-worker-aggregator"));
    c.args(["--nats", &nats_url(), "--id", id, "--roles", "aggregator"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    c
}

/// [`aggregator_worker`] named `name` in `dir`: it logs to `<name>.log` there
/// and keeps its downloads in the folder `<name>` (one per process, as on
/// two machines).
pub fn aggregator_worker_in(id: &str, dir: &Path, name: &str) -> Command {
    let mut c = aggregator_worker(id, &dir.join(format!("{name}.log")));
    c.arg("--download-dir").arg(dir.join(name));
    c
}

/// A TCP forwarder whose link can be cut: while cut, its connections are
/// dropped and new ones refused.
pub struct Proxy {
    /// Where to connect to reach the target through it.
    pub port: u16,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    /// Forwards a new local port to `target`.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (open, links) = (Arc::new(AtomicBool::new(true)), Arc::new(Mutex::new(Vec::new())));
        let (o, l) = (open.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().expect("lock").push(link);
            }
        });
        Self { port, open, links }
    }

    /// Cuts every link for `pause`, then lets new ones through.
    pub async fn cut(&self, pause: Duration) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().expect("lock").drain(..) {
            link.abort();
        }
        tokio::time::sleep(pause).await;
        self.open.store(true, Ordering::SeqCst);
    }
}
