//! Worker identities that cannot be forged, checked against a real
//! nats-server configured with the `auth.conf` that `flame-engine worker add`
//! renders: each worker its own NKey user whose permissions reach only its own
//! commands, report subject and registry entry.

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use flame_events::protocol::{Command, CommandBody, Report, ReportBody, VERSION, WorkerInfo};
use flame_transport::blob::{BlobStore, NatsBlobs, digest};
use flame_transport::identity::{Identities, inbox_prefix};
use flame_transport::{Nats, NatsAuth, Transport};
use futures::StreamExt;
use serde_json::Value;

use crate::util::{self, Processes, bin, free_port, root};

/// A nats-server whose users are the identities in `dir/auth`, its log in `dir/nats.log`.
struct Server {
    child: std::process::Child,
    url: String,
    ids: Identities,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Issues `workers` identities with the `flame-engine worker add` command, then starts the server.
    fn start(dir: &Path, workers: &[&str]) -> Self {
        let auth = dir.join("auth");
        for id in workers {
            let out = Process::new(bin("flame-engine"))
                .args(["worker", "add", "--id", id])
                .arg("--auth-dir")
                .arg(&auth)
                .output()
                .expect("flame-engine");
            assert!(out.status.success(), "worker add: {}", String::from_utf8_lossy(&out.stderr));
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains("--nats-nkey") && said.contains("reload"), "it says how to use the identity: {said}");
        }
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, "include ./auth/auth.conf\n").expect("conf");
        let port = free_port();
        let log = dir.join("nats.log");
        let bin = std::env::var("FLAME_TEST_NATS_BIN").expect("FLAME_TEST_NATS_BIN is unset: run the tests with scripts/test.sh");
        let child = Process::new(bin)
            .args(["-c", conf.to_str().expect("utf8"), "-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("js"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start nats-server");
        Self { child, url: format!("nats://127.0.0.1:{port}"), ids: Identities::new(auth), log }
    }

    fn auth(&self, worker: Option<&str>) -> NatsAuth {
        let seed = match worker {
            Some(id) => self.ids.engine_seed().with_file_name("workers").join(format!("{id}.nk")),
            None => self.ids.engine_seed(),
        };
        NatsAuth { nkey: Some(seed), ..NatsAuth::default() }
    }

    /// The engine's transport (it creates the streams, bucket and blob store), once the server is up.
    async fn engine(&self) -> Nats {
        for _ in 0..100 {
            if let Ok(t) = Nats::connect_with(&self.url, &self.auth(None)).await {
                NatsBlobs::new(t.jetstream()).await.expect("the engine creates the blob store");
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nats-server at {} did not come up", self.url);
    }

    /// What the server logged as permission violations.
    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains("Violation")).map(str::to_string).collect()
    }
}

fn info(id: &str, realm: &str) -> WorkerInfo {
    WorkerInfo { id: id.into(), roles: vec!["trainer".into()], realm: realm.into(), device: "cpu".into(), group: None }
}

fn command(worker: &str) -> Command {
    Command {
        v: VERSION,
        id: format!("j1/deploy/trainer-0/{worker}"),
        job_id: "j1".into(),
        task_id: "trainer-0".into(),
        round: 0,
        traceparent: None,
        body: CommandBody::Deploy { role: "trainer".into(), dataset: None },
    }
}

/// Receives nothing on `sub` for a while.
async fn silent(sub: &mut async_nats::Subscriber, what: &str) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(700), sub.next()).await {
        panic!("{what}: received a message on {}", m.subject);
    }
}

/// Two processes with one worker identity (a key copied to a second
/// machine): while the first heartbeats, the second may not start as that
/// worker (both would take its commands); once the first has stopped
/// renewing its registration, the second takes the id over. Checked with
/// per-worker permissions, which let a worker read back its own
/// registration only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_that_a_live_process_holds_is_refused_to_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["site-a"]);
    let _engine = server.engine().await;
    let first = Nats::connect_worker(&server.url, &server.auth(Some("site-a")), "site-a").await.expect("the first process");
    let second = Nats::connect_worker(&server.url, &server.auth(Some("site-a")), "site-a").await.expect("the second process");
    let ids = ["site-a".to_string()];
    first.claim_ids(&ids).await.expect("a free id");
    first.register(&info("site-a", "default/a")).await.expect("registers");
    first.claim_ids(&ids).await.expect("its own registration is no obstacle");
    let beating = {
        let first = first.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                first.register(&info("site-a", "default/a")).await.expect("heartbeat");
            }
        })
    };
    let refused = second.claim_ids(&ids).await.expect_err("a second process took a live worker's id");
    assert!(matches!(&refused, flame_transport::Error::Taken { id } if id == "site-a"), "{refused}");
    assert!(refused.to_string().contains("--id"), "says what to do: {refused}");

    beating.abort();
    // The first is gone (killed): its registration is still listed, but no longer renewed.
    let started = std::time::Instant::now();
    second.claim_ids(&ids).await.expect("the id of a process that stopped renewing it is taken over");
    assert!(started.elapsed() >= flame_transport::RENEWAL_WAIT, "it watched the registration before taking it over");
    second.register(&info("site-a", "default/a")).await.expect("registers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_can_speak_for_read_for_or_overwrite_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["site-a", "site-b"]);
    let engine = server.engine().await;
    let a = Nats::connect_worker(&server.url, &server.auth(Some("site-a")), "site-a").await.expect("A connects as itself");
    let b = Nats::connect_worker(&server.url, &server.auth(Some("site-b")), "site-b").await.expect("B connects as itself");
    // A's key is no key for B's account of itself, nor a worker key for the engine's streams.
    // Every value B's registry entry takes from now on.
    let kv = engine.jetstream().get_key_value(flame_transport::WORKER_BUCKET).await.expect("bucket");
    let mut b_entry = kv.watch("site-b").await.expect("watch");
    b.register(&info("site-b", "default/b")).await.expect("B registers");
    a.register(&info("site-a", "default/a")).await.expect("A registers");

    // A raw connection with A's identity, recording what the server refuses it.
    let refusals = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = refusals.clone();
    let raw = server
        .auth(Some("site-a"))
        .options()
        .await
        .expect("options")
        .custom_inbox_prefix(inbox_prefix("site-a"))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().expect("lock").push(e.to_string());
                }
            }
        })
        .connect(&server.url)
        .await
        .expect("raw A");
    let mut raw_js = jetstream::new(raw.clone());
    raw_js.set_timeout(Duration::from_secs(2));

    // B's command waits in the stream.
    engine.send_command("site-b", &command("site-b")).await.expect("the engine sends B a command");
    // A listens where B's commands, replies and fetches go.
    let mut on_cmd = raw.subscribe("flame.cmd.site-b").await.expect("subscribe");
    let mut on_b_inbox = raw.subscribe(format!("{}.>", inbox_prefix("site-b"))).await.expect("subscribe");
    let mut on_inbox = raw.subscribe("_INBOX.>").await.expect("subscribe");
    raw.flush().await.expect("flush");

    let mine = Report::answering(&command("site-a"), "site-a", ReportBody::Deployed { samples: None });
    let as_b = Report::answering(&command("site-b"), "site-b", ReportBody::Deployed { samples: None });
    let forged_entry = info("site-b", "forged");
    let cmds = raw_js.get_stream(flame_transport::COMMAND_STREAM);
    let (own_report, forged_report, forged_entry, b_inbox, cmd_consumer, cmd_get, fake_cmd) = tokio::join!(
        a.send_report(&mine),
        // A report in B's name: on B's subject, which A may not publish to.
        a.send_report(&as_b),
        // B's registry entry, overwritten.
        a.register(&forged_entry),
        // B's durable command consumer.
        a.command_inbox("site-b"),
        // An ephemeral consumer of its own on B's commands.
        async {
            let stream = jetstream::new(raw.clone()).get_stream(flame_transport::COMMAND_STREAM).await;
            match stream {
                Ok(s) => s
                    .create_consumer(jetstream::consumer::pull::Config { filter_subject: "flame.cmd.site-b".into(), ..Default::default() })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
        // The command stream's messages, by sequence.
        async {
            match cmds.await {
                Ok(s) => s.get_raw_message(1).await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
        // A command to B, sent by A.
        raw_js.publish("flame.cmd.site-b", serde_json::to_vec(&command("site-b")).expect("json").into()),
    );
    own_report.expect("A reports on its own subject");
    assert!(forged_report.is_err(), "A published a report as B");
    assert!(forged_entry.is_err(), "A overwrote B's registry entry");
    assert!(b_inbox.is_err(), "A opened B's command consumer");
    assert!(cmd_consumer.is_err(), "A made a consumer of B's commands");
    assert!(cmd_get.is_err(), "A read the command stream by sequence");
    if let Ok(ack) = fake_cmd {
        assert!(ack.await.is_err(), "A's command to B was stored");
    }
    silent(&mut on_cmd, "A subscribed to B's command subject").await;
    silent(&mut on_b_inbox, "A subscribed to B's inbox").await;
    silent(&mut on_inbox, "A subscribed to every inbox").await;

    // What the server said to A.
    let said = refusals.lock().expect("lock").join("\n").to_lowercase();
    for subject in ["flame.cmd.site-b", "_inbox_site-b.>", "_inbox.>"] {
        assert!(said.contains(&format!("permissions violation for subscription to \"{subject}\"")), "{subject}: {said}");
    }
    assert!(said.contains("permissions violation for publish to \"flame.cmd.site-b\""), "{said}");

    // B's entry is B's own; the engine got A's report only; B finds its command, and only the engine's.
    let first = tokio::time::timeout(Duration::from_secs(2), b_entry.next()).await.expect("B's entry").expect("open").expect("entry");
    assert_eq!(serde_json::from_slice::<WorkerInfo>(&first.value).expect("info").realm, "default/b");
    if let Ok(Some(Ok(next))) = tokio::time::timeout(Duration::from_millis(500), b_entry.next()).await {
        panic!("B's entry changed after B wrote it: {:?} {}", next.operation, String::from_utf8_lossy(&next.value));
    }
    let mut reports = engine.report_inbox("j1").await.expect("reports");
    let first = tokio::time::timeout(Duration::from_secs(5), reports.next()).await.expect("a report").expect("open").expect("decodes");
    assert_eq!((first.message.worker_id.as_str(), first.message.via.as_deref()), ("site-a", Some("site-a")));
    assert!(tokio::time::timeout(Duration::from_millis(700), reports.next()).await.is_err(), "only A's own report arrived");
    let mut inbox = b.command_inbox("site-b").await.expect("B's own commands");
    let got = tokio::time::timeout(Duration::from_secs(5), inbox.next()).await.expect("B's command").expect("open").expect("decodes");
    assert_eq!(got.message.id, command("site-b").id);
    assert!(tokio::time::timeout(Duration::from_millis(700), inbox.next()).await.is_err(), "no command from A reached B");

    // Blobs are shared: A may write one under another's name, but every reader checks the
    // bytes against the name and refuses the swap.
    let engine_blobs = NatsBlobs::new(engine.jetstream()).await.expect("blobs");
    let a_blobs = NatsBlobs::new(a.jetstream()).await.expect("A's blobs");
    let real = b"B's update".to_vec();
    let name = digest(&real);
    let store = a.jetstream().get_object_store(flame_transport::blob::BUCKET).await.expect("object store");
    store.put(name.as_str(), &mut &b"A's poison"[..]).await.expect("A writes under B's blob's name");
    let refused = engine_blobs.get(&name).await.expect_err("the engine read a swapped blob");
    assert!(refused.to_string().contains("is corrupt"), "{refused}");
    // Putting the real bytes again puts them right (a put does not trust a name it finds).
    assert_eq!(a_blobs.put(real.clone()).await.expect("put"), name);
    assert_eq!(engine_blobs.get(&name).await.expect("the real bytes again"), real);

    // A large blob (more chunks than are read one by one) is downloaded into a
    // folder, resumably, under A's own identity: its permissions allow the read.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    assert!(big.len() > flame_transport::blob::DIRECT_CHUNKS * (128 << 10));
    let big_name = engine_blobs.put(big.clone()).await.expect("the engine stores a large blob");
    let folder = tempfile::tempdir().expect("tempdir");
    let a_downloads = NatsBlobs::new(a.jetstream()).await.expect("A's blobs").resuming_in(folder.path(), None).expect("folder");
    let got = tokio::time::timeout(Duration::from_secs(30), a_downloads.get(&big_name)).await.expect("in time");
    assert!(got.expect("A downloads a large blob") == big, "the large blob's bytes");
}

/// A whole job with per-worker identities: three Python trainers and the Rust
/// aggregator, each with its own NKey, `flamectl run --nats` with the
/// engine's. It completes, and the server refused nothing: the permissions
/// are all that both runtimes need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_with_per_worker_identities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workers = ["py-1", "py-2", "py-3", "agg"];
    let server = Server::start(dir.path(), &workers);
    let _engine = server.engine().await;
    let sdk = std::env::var("FLAME_SDK_BIN").expect("FLAME_SDK_BIN is unset: run the tests with scripts/test.sh");
    let mut procs = Processes::default();
    let seed = |id: &str| server.auth(Some(id)).nkey.expect("seed");
    for site in 1..=3 {
        let id = format!("py-{site}");
        procs.spawn(
            Process::new(format!("{sdk}/flame-py-worker"))
                .args(["--nats", &server.url, "--id", &id, "--realm", &format!("default/site{site}")])
                .arg("--nats-nkey")
                .arg(seed(&id))
                .arg("--trainer")
                .arg(format!("{}:DigitsTrainer", root().join("examples/python-digits/trainer.py").display()))
                .arg("--data-root")
                .arg(util::examples())
                .env("FLAME_SDK_LOG", "ERROR")
                .stdout(Stdio::null()),
        );
    }
    procs.spawn(
        Process::new(bin("flame-worker"))
            .args(["--nats", &server.url, "--id", "agg", "--roles", "aggregator"])
            .arg("--nats-nkey")
            .arg(seed("agg"))
            .arg("--data-root")
            .arg(util::examples())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
    );
    let data = dir.path().join("data");
    let out = Process::new(bin("flamectl"))
        .args(["run", "examples/python-digits", "--local", "none", "-o", "json", "--nats", &server.url])
        .arg("--nats-nkey")
        .arg(server.ids.engine_seed())
        .arg("--data-dir")
        .arg(&data)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("flamectl");
    let summary: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no summary ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(summary["state"], "completed", "{summary}");
    assert_eq!(summary["rounds_completed"], 5);
    assert_eq!(server.violations(), Vec::<String>::new(), "the server refused the workers something they need");

    // Without its identity in auth.conf a worker is not let in.
    let stranger = Process::new(bin("flame-worker"))
        .args(["--nats", &server.url, "--id", "stranger", "--roles", "aggregator"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("flame-worker");
    assert!(!stranger.status.success());
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert!(said.to_lowercase().contains("authorization"), "{said}");
}
