//! The production shape of NATS on loopback: a cluster of three servers with
//! every Flame stream, bucket and object store at three replicas, and an edge
//! site's workers behind a leaf node. One cluster server is SIGKILLed
//! mid-round and the leaf node's link is cut for a few seconds; the job
//! completes once, every update counted once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flame_transport::blob::NatsBlobs;
use flame_transport::{Nats, NatsAuth, Transport};
use futures::StreamExt;
use serde_json::Value;

use crate::util::{self, Processes, Proxy, bin, free_port, root};

/// A nats-server started from a configuration file, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server(dir: &Path, name: &str, conf: &str) -> Server {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf).expect("conf");
    let bin = std::env::var("FLAME_TEST_NATS_BIN").expect("FLAME_TEST_NATS_BIN is unset: run the tests with scripts/test.sh");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    Server(Command::new(bin).arg("-c").arg(&path).stdout(Stdio::null()).stderr(log).spawn().expect("nats-server"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_losing_a_server_and_a_leaf_losing_its_link_finish_the_job_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (client, route, leaf): (Vec<u16>, Vec<u16>, Vec<u16>) =
        ((0..3).map(|_| free_port()).collect(), (0..3).map(|_| free_port()).collect(), (0..3).map(|_| free_port()).collect());
    let mut hub: Vec<Option<Server>> = (0..3)
        .map(|i| {
            let routes: Vec<String> = (0..3).filter(|j| *j != i).map(|j| format!("\"nats-route://127.0.0.1:{}\"", route[j])).collect();
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\", domain: hub }}\n\
                 cluster {{ name: flame, listen: 127.0.0.1:{}, routes: [{}] }}\nleafnodes {{ listen: 127.0.0.1:{}, no_advertise: true }}\n",
                client[i],
                d.join(format!("js{i}")).display(),
                route[i],
                routes.join(", "),
                leaf[i]
            );
            Some(server(d, &format!("n{i}"), &conf))
        })
        .collect();
    // The edge site: a leaf node (no JetStream of its own) whose link to the hub goes through a proxy.
    // The hub's servers do not advertise their leaf ports (`no_advertise`): otherwise the leaf learns
    // them, and once its link is cut it links again straight to another server, around the proxy.
    let proxy = Proxy::start(leaf[1]).await;
    let edge = free_port();
    let _leaf = server(
        d,
        "leaf",
        &format!(
            "server_name: edge\nlisten: 127.0.0.1:{edge}\nleafnodes {{ remotes: [ {{ urls: [\"nats-leaf://127.0.0.1:{}\"] }} ] }}\n",
            proxy.port
        ),
    );
    let urls: Vec<String> = client.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
    let edge_url = format!("nats://127.0.0.1:{edge}");

    // The engine's way in, at three replicas (retried while the cluster elects its leaders).
    let three = NatsAuth { replicas: Some(3), worker_ttl: Some(15), ..NatsAuth::default() };
    let mut engine = None;
    for _ in 0..150 {
        if let Ok(t) = Nats::connect_with(&urls.join(","), &three).await
            && NatsBlobs::with_replicas(t.jetstream(), 3).await.is_ok()
        {
            engine = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let engine = engine.expect("the cluster took the streams at three replicas");
    for name in [flame_transport::COMMAND_STREAM, flame_transport::REPORT_STREAM, "KV_flame-workers", "OBJ_flame-models"] {
        let mut stream = engine.jetstream().get_stream(name).await.expect("stream");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 3, "{name}");
        assert_eq!(info.cluster.as_ref().map(|c| c.replicas.len()), Some(2), "{name}: a leader and two replicas");
    }

    // Trainer 1 and the aggregator on the hub (on the servers that stay up), trainers 2 and 3 at the edge.
    let mut procs = Processes::default();
    util::worker(&mut procs, &urls[1], "hub-1", "trainer", "default/site1");
    for site in [2, 3] {
        // At the edge, JetStream is the hub's: its domain names it.
        procs.spawn(
            Command::new(bin("flame-worker"))
                .args(["--nats", &edge_url, "--nats-domain", "hub", "--id", &format!("edge-{site}"), "--roles", "trainer"])
                .args(["--realm", &format!("default/site{site}")])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        );
    }
    util::worker(&mut procs, &urls[2], "hub-agg", "aggregator", "default");
    // A Python worker at the edge too (in a realm no task of this job is in, so it only registers).
    let sdk = std::env::var("FLAME_SDK_BIN").expect("FLAME_SDK_BIN is unset: run the tests with scripts/test.sh");
    procs.spawn(
        Command::new(format!("{sdk}/flame-py-worker"))
            .args(["--nats", &edge_url, "--nats-domain", "hub", "--id", "edge-py", "--realm", "elsewhere"])
            .arg("--trainer")
            .arg(format!("{}:DigitsTrainer", root().join("examples/python-digits/trainer.py").display()))
            .env("FLAME_SDK_LOG", "ERROR")
            .stdout(Stdio::null()),
    );
    let mut registered = BTreeSet::new();
    // Longer than a worker's own wait for JetStream at start (60 s): behind a leaf, under load, the
    // Python worker's first registry write can take a while.
    for _ in 0..450 {
        registered = engine.workers().await.unwrap_or_default().into_iter().map(|w| w.id).collect();
        if registered.len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(registered.len(), 5, "every worker registered, the edge ones (Rust and Python) through the leaf: {registered:?}");

    // Updates as they are reported, seen from a server that stays up.
    let watcher = async_nats::connect(&urls[2]).await.expect("watcher");
    let mut reports = watcher.subscribe("flame.report.>").await.expect("subscribe");
    let trained = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = trained.clone();
    tokio::spawn(async move {
        while let Some(m) = reports.next().await {
            if serde_json::from_slice::<Value>(&m.payload).is_ok_and(|r| r["body"]["kind"] == "trained") {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    // Rounds take tens of milliseconds here; the cut comes in round 5 or 6, and holds the rounds up.
    let rounds = 20;
    let workflow = util::digits_workflow(|wf| wf["modelSpec"]["hyperparameters"]["rounds"] = rounds.into());
    let job_file = d.join("job.json");
    std::fs::write(&job_file, serde_json::to_vec(&workflow).expect("json")).expect("write");
    let data = d.join("data");
    // The engine knows one server; it learns the others from it.
    let mut run = Command::new(bin("flamectl"))
        .arg("run")
        .arg(&job_file)
        .args(["--local", "none", "-o", "json", "--nats-replicas", "3", "--worker-ttl", "15", "--nats", &urls[0], "--data-root"])
        .arg(util::examples())
        .arg("--data-dir")
        .arg(&data)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.join("run.log")).expect("log"))
        .spawn()
        .expect("flamectl");
    // Panics with what flamectl said if it ended.
    fn alive(run: &mut Child, log: &Path, when: &str) {
        if let Some(status) = run.try_wait().expect("wait") {
            let mut out = String::new();
            if let Some(mut stdout) = run.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
            }
            panic!("flamectl ended ({status}) {when}: {out} {}", std::fs::read_to_string(log).unwrap_or_default());
        }
    }
    // Waits until `n` updates were reported, the job still running.
    async fn until(n: usize, trained: &std::sync::atomic::AtomicUsize, run: &mut Child, log: &Path) {
        let start = Instant::now();
        while trained.load(Ordering::SeqCst) < n {
            alive(run, log, &format!("before {n} updates"));
            assert!(start.elapsed() < Duration::from_secs(120), "{n} updates were not reported");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let log = d.join("run.log");

    // Mid-round 3: the engine's own server dies.
    until(7, &trained, &mut run, &log).await;
    drop(hub[0].take());
    let killed = Instant::now();
    alive(&mut run, &log, "when its server died");
    // Later, mid-round: the edge loses the hub for three seconds.
    let after = trained.load(Ordering::SeqCst);
    until(after + 7, &trained, &mut run, &log).await;
    let recovered = killed.elapsed();
    let at_cut = trained.load(Ordering::SeqCst);
    proxy.cut(Duration::from_secs(3)).await;
    let relinked = Instant::now();
    alive(&mut run, &log, "before the leaf's link came back");
    let after = trained.load(Ordering::SeqCst);
    // The cut held the edge up: at most the round's hub trainer (and edge updates already on their
    // way) in three seconds, where rounds otherwise take tens of milliseconds.
    assert!(after - at_cut <= 3, "{} updates were reported while the edge was cut off", after - at_cut);
    until(after + 3, &trained, &mut run, &log).await;
    eprintln!(
        "cluster: 7 updates {:.1} s after the server died; the next round's 3 updates {:.1} s after the leaf's link came back",
        recovered.as_secs_f64(),
        relinked.elapsed().as_secs_f64()
    );

    let out = tokio::task::spawn_blocking(move || run.wait_with_output()).await.expect("join").expect("flamectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(d.join("run.log")).unwrap_or_default();
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("no summary ({e}): {stdout} {log}"));
    assert_eq!(summary["state"], "completed", "{summary} {log}");
    assert_eq!(summary["rounds_completed"], rounds);

    // Once: one aggregation per round, one update per trainer per round, the edge's among them.
    let job = summary["job_id"].as_str().expect("job id");
    let store = format!("sqlite:{}", data.join("events.db").display());
    let events = Command::new(bin("flamectl")).args(["events", job, "--store", &store, "-o", "json"]).output().expect("events");
    let events: Vec<Value> = String::from_utf8_lossy(&events.stdout).lines().map(|l| serde_json::from_str(l).expect("event")).collect();
    let aggregated: Vec<u64> =
        events.iter().filter(|e| e["event_type"] == "RoundAggregated").map(|e| e["payload"]["round"].as_u64().expect("round")).collect();
    assert_eq!(aggregated, (1..=rounds).collect::<Vec<u64>>(), "each round aggregated once, in order");
    let mut updates: BTreeMap<(u64, String), usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e["event_type"] == "UpdateReported") {
        let key = (e["payload"]["round"].as_u64().expect("round"), e["payload"]["worker_id"].as_str().expect("worker").to_string());
        *updates.entry(key).or_default() += 1;
    }
    assert_eq!(updates.len(), 3 * rounds as usize, "every trainer's update of every round");
    assert!(updates.values().all(|n| *n == 1), "an update counted twice: {updates:?}");
    let verify = Command::new(bin("flamectl")).args(["replay", job, "--verify", "--store", &store]).output().expect("replay");
    assert!(verify.status.success(), "replay --verify: {}", String::from_utf8_lossy(&verify.stdout));
}
