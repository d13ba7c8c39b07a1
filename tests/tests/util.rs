//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// A short unique suffix for names in shared servers.
pub fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_string()
}

/// Child processes that are killed when the test ends, however it ends.
#[derive(Default)]
pub struct Processes(pub Vec<Child>);

impl Processes {
    /// Starts a process and keeps it.
    pub fn spawn(&mut self, cmd: &mut Command) -> &mut Child {
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
