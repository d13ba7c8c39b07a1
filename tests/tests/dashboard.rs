//! The web dashboard in a real headless Chromium, driven over W3C WebDriver
//! (chromedriver; `scripts/test.sh` installs Debian's `chromium` and
//! `chromium-driver` and exports FLAME_CHROMEDRIVER). Screenshots of each
//! page are kept under target/ui-screenshots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::util::{Served, digits_workflow, free_port, root};

/// The key W3C WebDriver names elements by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver and one session of headless Chromium.
struct Browser {
    driver: Child,
    base: String,
    agent: ureq::Agent,
}

impl Browser {
    fn start(chromedriver: &Path, profile: &Path) -> Self {
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.get(&format!("{url}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut b = Self { driver, base: url, agent };
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,2000",
                     format!("--user-data-dir={}", profile.display())],
        });
        if let Ok(chromium) = std::env::var("FLAME_CHROMIUM") {
            options["binary"] = json!(chromium);
        }
        let session = b.call("POST", "/session", json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}));
        let id = session["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {session}")).to_string();
        b.base = format!("{}/session/{id}", b.base);
        b
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let result = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.post(&url).header("content-type", "application/json").send(body.to_string()),
        };
        let mut resp = result.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v: Value = serde_json::from_str(&resp.body_mut().with_config().limit(64 << 20).read_to_string().expect("body")).expect("JSON");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    fn url(&self) -> String {
        self.call("GET", "/url", Value::Null).as_str().unwrap_or_default().to_string()
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self.call("POST", "/element", json!({"using": "css selector", "value": css}));
        v[ELEMENT].as_str().map(str::to_string)
    }

    /// The element once it is there (at most `secs`).
    fn wait_for(&self, css: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            assert!(Instant::now() < deadline, "no '{css}' on {} after {secs} s", self.url());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), Value::Null).as_str().unwrap_or_default().to_string()
    }

    fn click(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/click"), json!({}));
    }

    fn type_in(&self, element: &str, text: &str) {
        self.call("POST", &format!("/element/{element}/value"), json!({ "text": text }));
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn js(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({ "script": script, "args": [] }))
    }

    /// Waits until `script` returns true.
    fn until(&self, what: &str, script: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.js(script) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "waited {secs} s for {what} on {}", self.url());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.call("GET", "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("base64 PNG")).expect("PNG");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
        let dir = root().join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.agent.delete(&self.base).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn chromedriver() -> Option<PathBuf> {
    match std::env::var("FLAME_CHROMEDRIVER") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!(
                "skipped: the dashboard in headless Chromium: FLAME_CHROMEDRIVER is unset (scripts/test.sh installs chromium and chromium-driver)"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_with_a_token_follows_a_running_job_live_and_shows_a_finished_jobs_charts() {
    let Some(driver) = chromedriver() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(dir.path(), &[], &[]).await;
    let b = Browser::start(&driver, &dir.path().join("profile"));
    let api = served.api.clone();

    // Signed out, every page sends you to sign in; a wrong token is refused there.
    b.goto(&format!("{api}/ui"));
    assert!(b.url().ends_with("/ui/login"), "{}", b.url());
    b.screenshot("login.png");
    let token = b.wait_for("#token", 10);
    b.type_in(&token, "flm_not_a_token");
    b.click(&b.wait_for("#sign-in", 5));
    let error = b.wait_for("#login-error", 10);
    assert!(b.text(&error).contains("unknown bearer token"), "{}", b.text(&error));
    let token = b.wait_for("#token", 10);
    b.type_in(&token, &served.token);
    b.click(&b.wait_for("#sign-in", 5));
    b.wait_for("#jobs", 10);
    assert!(b.url().ends_with("/ui"));

    // A job started meanwhile appears in the list without a reload.
    b.js("window.__kept = 'list'; return true;");
    let rounds = 25u32;
    let job = served.submit(&digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = json!(rounds)));
    b.until("the new job in the list", &format!("return !!document.querySelector('tr[data-job=\"{job}\"]');"), 20);
    assert_eq!(b.js("return window.__kept;"), json!("list"), "the list updated in place");
    b.screenshot("jobs.png");

    // Its page follows it live: the round count grows while the page stays loaded.
    b.goto(&format!("{api}/ui/jobs/{job}"));
    b.wait_for("#job", 10);
    b.js("window.__kept = 'job'; return true;");
    let version = |b: &Browser| b.js("return Number(document.getElementById('job').dataset.version);").as_u64().unwrap_or(0);
    let first = version(&b);
    let rounds_done = |b: &Browser| {
        b.js("const m = document.querySelector('#job .summary .progress').title.match(/^(\\d+)/); return m ? Number(m[1]) : 0;")
            .as_u64()
            .unwrap_or(0)
    };
    let done_first = rounds_done(&b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rounds_done(&b) <= done_first {
        assert!(Instant::now() < deadline, "the page did not show a new round in 60 s (at {done_first})");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(version(&b) > first, "the page shows newer events");
    assert_eq!(b.js("return window.__kept;"), json!("job"), "updated in place, not reloaded");
    b.until(
        "the round in progress",
        "return !!document.getElementById('open-round') || document.getElementById('job').dataset.state === 'completed';",
        30,
    );
    b.screenshot("job-running.png");

    // To the end, still live; then the charts hold every round.
    b.until("the job to complete on the page", "return document.getElementById('job').dataset.state === 'completed';", 120);
    assert_eq!(b.js("return window.__kept;"), json!("job"));
    let points = b.js("return document.querySelector('#chart-accuracy polyline[data-series=\"accuracy\"]').getAttribute('points').trim().split(' ').length;");
    assert_eq!(points, json!(rounds), "an accuracy point per round");
    assert_eq!(b.js("return document.querySelectorAll('#chart-loss polyline').length;"), json!(2), "loss and train loss");
    assert_eq!(b.js("return document.querySelectorAll('#chart-participants rect[data-series=\"participants\"]').length;"), json!(rounds));
    assert_eq!(
        b.js("return document.querySelectorAll('#lineage g.model').length;"),
        json!(rounds + 1),
        "the initial model and one per round"
    );
    let spans = b.js("return document.querySelectorAll('#trace g.span.round').length;");
    assert_eq!(spans, json!(rounds), "a timeline row per round");
    let audit = b.js("return document.querySelectorAll('#audit tbody tr').length;").as_u64().unwrap_or(0);
    assert!(audit >= 100, "the audit log's newest entries: {audit}");
    // A live update may be replacing the summary as it is read: wait until it shows a number.
    b.until("the final accuracy", "const a = document.getElementById('accuracy'); return !!a && a.textContent.trim() !== '';", 10);
    let accuracy: f64 = b.text(&b.wait_for("#accuracy", 5)).parse().expect("accuracy on the page");
    assert!(accuracy > 0.8, "{accuracy}");
    b.js("window.scrollTo(0, 0); return true;");
    b.screenshot("job.png");

    // The audit log links to the API's events: the cookie signs the API in as the token would.
    b.goto(&format!("{api}/jobs/{job}/events"));
    let body = b.text(&b.wait_for("body", 10));
    assert!(body.contains("JobCreated") && body.contains("RoundAggregated"), "{}", &body[..body.len().min(300)]);

    // A new job from a job folder: its design and datasets registered, the job created, started and finished.
    b.goto(&format!("{api}/ui/new"));
    let folder = b.wait_for("#folder", 10);
    b.type_in(&folder, root().join("examples/digits-two-tier").to_str().expect("utf8"));
    b.screenshot("new.png");
    b.click(&b.wait_for("#create", 5));
    b.until("the uploaded job's page", "return location.pathname.startsWith('/ui/jobs/');", 30);
    b.wait_for("#job", 10);
    b.until("the uploaded job to complete", "return document.getElementById('job').dataset.state === 'completed';", 120);
    b.screenshot("uploaded-job.png");
    let designs: Value = {
        let mut r =
            ureq::get(&format!("{api}/designs")).header("authorization", &format!("Bearer {}", served.token)).call().expect("designs");
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("JSON")
    };
    assert!(
        designs.as_array().is_some_and(|d| d.iter().any(|d| d["id"] == "digits-two-tier")),
        "the folder's design is registered: {designs}"
    );

    // Signing out ends the session: the list sends you to sign in again.
    b.goto(&format!("{api}/ui"));
    b.click(&b.wait_for("#logout", 10));
    b.wait_for("#token", 10);
    b.goto(&format!("{api}/ui"));
    assert!(b.url().ends_with("/ui/login"));
}
