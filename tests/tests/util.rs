//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Child, Command};

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
