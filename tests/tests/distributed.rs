//! Distributed mode with real processes: `flame-engine` against SecantusDB
//! (MongoDB wire protocol) and NATS, four `flame-worker` processes.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use serde_json::Value;

use flame_workers::blob::{BlobStore, NatsBlobs};

use crate::util::{Processes, bin, mongo_uri, nats_url, root, unique};

/// A stream's events as the MongoDB documents hold them (one commit document
/// per append, its events in order), each with its `_id` (the event id) and
/// `version`, read with the driver rather than the store.
async fn stored_events(mongo: &str, db: &str, stream: &str) -> Vec<Document> {
    let client = mongodb::Client::with_uri_str(mongo).await.expect("mongo");
    let commits: Vec<Document> = client
        .database(db)
        .collection::<Document>("commits")
        .find(doc! {"stream": stream})
        .sort(doc! {"first_version": 1})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("cursor");
    let mut events = Vec::new();
    for c in commits {
        let first = c.get_i64("first_version").expect("first_version");
        for (i, e) in c.get_array("events").expect("events").iter().enumerate() {
            let mut e = e.as_document().expect("an event document").clone();
            let id = e.remove("event_id").expect("event_id");
            e.insert("_id", id);
            e.insert("version", first + i as i64);
            events.push(e);
        }
    }
    events
}

/// A worker process of `program` reading datasets under the examples, logging warnings only.
fn worker(program: std::path::PathBuf, nats: &str, id: &str, roles: &str, realm: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["--nats", nats, "--id", id, "--roles", roles, "--realm", realm])
        .arg("--data-root")
        .arg(crate::util::examples())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    cmd
}

/// `flame-engine run` of one job folder against MongoDB database `db`, its summary on a pipe.
fn engine_run(mongo: &str, db: &str, nats: &str, job: &str) -> Command {
    let mut cmd = Command::new(bin("flame-engine"));
    cmd.args(["run", "--mongo", mongo, "--db", db, "--nats", nats, "--job", job])
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    cmd
}

/// Waits for `flame-engine run` (its stdout piped) to end, at most 240 s, and
/// returns the one JSON summary it prints, once it exited cleanly.
async fn summary(engine: &mut std::process::Child) -> Value {
    let mut stdout = engine.stdout.take().expect("engine stdout");
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let exit = loop {
        if let Some(status) = engine.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "flame-engine did not finish within 240 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).expect("read stdout");
    assert!(exit.success(), "flame-engine exited with {exit}: {out}");
    serde_json::from_str(out.trim()).expect("engine prints one JSON summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_and_four_workers_complete_the_digits_job() {
    let (nats, mongo) = (nats_url(), mongo_uri());
    let suffix = unique();
    let db = format!("flame_e2e_{suffix}");
    let mut procs = Processes::default();
    // The aggregator is the build without libtorch (scripts/test.sh makes it):
    // it has no rpath to libtorch, so it could not even start if it needed it.
    let aggregator_only = bin("flame-worker-aggregator");
    let ldd = Command::new("ldd").arg(&aggregator_only).output().expect("ldd");
    assert!(!String::from_utf8_lossy(&ldd.stdout).contains("libtorch"), "the aggregator-only worker links libtorch");
    let refused = Command::new(&aggregator_only).args(["--nats", &nats, "--id", "x", "--roles", "trainer"]).output().expect("run");
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("without the training backend"));
    for (id, roles, realm) in [
        ("agg", "aggregator", "default"),
        ("t0", "trainer", "default/site1"),
        ("t1", "trainer", "default/site2"),
        ("t2", "trainer", "default/site3"),
    ] {
        let program = if roles == "aggregator" { aggregator_only.clone() } else { bin("flame-worker") };
        procs.spawn(&mut worker(program, &nats, &format!("{id}-{suffix}"), roles, realm));
    }
    let engine = procs.spawn(&mut engine_run(&mongo, &db, &nats, "examples/digits-two-tier"));
    let summary = summary(engine).await;
    assert_eq!(summary["state"], "completed");
    assert_eq!(summary["rounds_completed"], 5);
    // Evaluated by the aggregator-only worker in plain Rust.
    assert!(summary["metrics"]["accuracy"].as_f64().is_some_and(|a| a > 0.9), "{summary}");
    let job_id = summary["job_id"].as_str().expect("job id").to_string();

    // The job's stream as MongoDB holds it: versions 1..N, no gap.
    let docs = stored_events(&mongo, &db, &format!("job-{job_id}")).await;
    let versions: Vec<i64> = docs.iter().map(|d| d.get_i64("version").expect("version")).collect();
    assert_eq!(versions, (1..=docs.len() as i64).collect::<Vec<_>>());
    assert_eq!(docs.first().and_then(|d| d.get_str("type").ok()), Some("JobCreated"));
    let completed = docs.last().expect("events");
    assert_eq!(completed.get_str("type").expect("type"), "JobCompleted");
    let final_model = completed.get_document("payload").expect("payload").get_str("final_model").expect("final_model").to_string();
    assert_eq!(summary["final_model"], final_model.as_str());
    let rounds = docs.iter().filter(|d| d.get_str("type") == Ok("RoundAggregated")).count();
    assert_eq!(rounds, 5);

    // The same events were published on JetStream, each once, under its event id.
    let stored_ids: BTreeSet<String> = docs.iter().map(|d| d.get_str("_id").expect("_id").to_string()).collect();
    let client = async_nats::connect(&nats).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("FLAME_EVENTS").await.expect("FLAME_EVENTS stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("flame.events.job.{job_id}"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut published = Vec::new();
    while published.len() < stored_ids.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.try_next())
            .await
            .expect("events arrive on JetStream")
            .expect("message")
            .expect("stream open");
        let id = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).expect("Nats-Msg-Id").to_string();
        let body: Value = serde_json::from_slice(&msg.payload).expect("event JSON");
        assert_eq!(body["event_id"], id.as_str());
        published.push(id);
    }
    let info = stream.get_info().await.expect("stream info");
    let published_set: BTreeSet<String> = published.iter().cloned().collect();
    assert_eq!(published.len(), published_set.len(), "an event was published twice");
    assert_eq!(published_set, stored_ids);
    assert!(info.state.messages >= stored_ids.len() as u64);

    // The final model blob in the object store hashes to the digest the completion event names.
    let blobs = NatsBlobs::new(&js).await.expect("object store");
    let bytes = blobs.get(&final_model).await.expect("final model blob");
    assert_eq!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)), final_model);
    let weights = flame_workers::weights::decode(&bytes).expect("safetensors");
    assert_eq!(weights["fc1.weight"].shape, vec![32, 64]);
}

/// A user's PyTorch model in distributed mode: the engine puts the model file
/// into the JetStream object store, trainers fetch it from there, the
/// aggregator is the build without libtorch (it averages the TorchScript
/// model's tensors but cannot run it), so the figures come from the trainers'
/// federated evaluation; `flamectl model get` reads the model back through
/// NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torchscript_job_runs_distributed_with_an_aggregator_without_libtorch() {
    // The CNN's accuracy; the regression's mean squared error.
    torchscript_distributed("examples/torchscript-digits", 5, |m| m.get_f64("accuracy").expect("accuracy") > 0.9).await;
    torchscript_distributed("examples/torchscript-regression", 10, |m| m.get_f64("loss").expect("mse") < 0.1).await;
}

async fn torchscript_distributed(example: &str, rounds: i64, good: impl Fn(&Document) -> bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    // A NATS server of its own: no other test's workers can take these tasks.
    let server = crate::util::Nats::start(crate::util::free_port(), &dir.path().join("js"));
    let (nats, mongo) = (server.url.clone(), mongo_uri());
    // Workers and the engine exit if NATS is not up yet: wait for it.
    drop(crate::util::connect(&nats).await);
    let suffix = unique();
    let db = format!("flame_ts_{suffix}");
    let mut procs = Processes::default();
    for (id, roles, realm) in [
        ("agg", "aggregator", "default"),
        ("t0", "trainer", "default/site1"),
        ("t1", "trainer", "default/site2"),
        ("t2", "trainer", "default/site3"),
    ] {
        let program = if roles == "aggregator" { bin("flame-worker-aggregator") } else { bin("flame-worker") };
        procs.spawn(
            Command::new(program)
                .args(["--nats", &nats, "--id", &format!("{id}-{suffix}"), "--roles", roles, "--realm", realm])
                .arg("--data-root")
                .arg(crate::util::examples())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        );
    }
    let out = Command::new(bin("flame-engine"))
        .args(["run", "--mongo", &mongo, "--db", &db, "--nats", &nats, "--job", example])
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("flame-engine");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "flame-engine: {text} {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(text.trim()).expect("one JSON summary");
    assert_eq!(summary["state"], "completed", "{summary}");
    assert!(summary["metrics"].as_object().is_none_or(|m| m.is_empty()), "the aggregator cannot evaluate a TorchScript model: {summary}");
    let job = summary["job_id"].as_str().expect("job");

    // The trainers evaluated every round's model; the last round's mean is the job's figure.
    let docs: Vec<Document> =
        stored_events(&mongo, &db, &format!("job-{job}")).await.into_iter().filter(|d| d.get_str("type") == Ok("ModelEvaluated")).collect();
    assert_eq!(docs.len() as i64, 3 * rounds, "{example}: 3 trainers, every round");
    let last: Vec<&Document> = docs
        .iter()
        .map(|d| d.get_document("payload").expect("payload"))
        .filter(|p| p.get_i64("round").map(|r| r == rounds).unwrap_or_else(|_| p.get_i32("round") == Ok(rounds as i32)))
        .map(|p| p.get_document("metrics").expect("metrics"))
        .collect();
    assert_eq!(last.len(), 3);
    assert!(last.iter().all(|m| good(m)), "{example}: the trainers' evaluations of the last model: {last:?}");

    // The model file and the trained model are in the object store; flamectl gets the module back through NATS.
    let file = std::fs::read(root().join(example).join("model.pt")).expect("model.pt");
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.expect("nats"));
    let blobs = NatsBlobs::new(&js).await.expect("object store");
    assert_eq!(blobs.get(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&file))).await.expect("the model file"), file);
    let exported = dir.path().join("trained.pt");
    // The job's database named in the store URL's path (mongodb://HOST:PORT/DB?...).
    let store = mongo.replacen("/?", &format!("/{db}?"), 1);
    let got = Command::new(bin("flamectl"))
        .args(["model", "get", job, "--store", &store, "--nats", &nats, "--format", "torchscript", "-o"])
        .arg(&exported)
        .output()
        .expect("flamectl");
    assert!(got.status.success(), "flamectl model get: {}", String::from_utf8_lossy(&got.stderr));
    let final_model = summary["final_model"].as_str().expect("final");
    let trained = flame_workers::weights::decode_state(&blobs.get(final_model).await.expect("final model")).expect("state");
    let module = flame_torchscript::Archive::read(std::fs::read(&exported).expect("exported")).expect("a TorchScript archive");
    assert_eq!(flame_workers::archive::state_of(&module).expect("state"), trained, "the module holds the trained weights");
}

/// An aggregator told to hold no updates in memory
/// (`--updates-in-memory-mb 0`) takes them from disk: for the median, it
/// writes each round's updates to its download folder and reads them back a
/// block at a time; for FedAvg, it folds each update from the file the
/// object store writes as it arrives. Either job ends at the model that the
/// same job reaches with every update in memory (`flamectl run`, in-process
/// workers), and the folder holds no updates after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_aggregators_updates_on_disk_the_median_and_fedavg_end_where_they_do_in_memory() {
    let suffix = unique();
    let dir = tempfile::tempdir().expect("tempdir");
    // A NATS server of its own: the shared one's aggregators (other tests') could take this job's aggregation.
    let own = crate::util::Nats::start(crate::util::free_port(), &dir.path().join("js"));
    crate::util::connect(&own.url).await;
    let (nats, mongo) = (own.url.clone(), mongo_uri());
    let mut procs = Processes::default();
    let downloads = dir.path().join("downloads");
    let log = dir.path().join("aggregator.log");
    procs.spawn(
        Command::new(bin("flame-worker-aggregator"))
            .args(["--nats", &nats, "--id", &format!("agg-{suffix}"), "--roles", "aggregator", "--updates-in-memory-mb", "0"])
            .arg("--download-dir")
            .arg(&downloads)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log")),
    );
    for (i, realm) in ["default/site1", "default/site2", "default/site3"].iter().enumerate() {
        procs.spawn(&mut worker(bin("flame-worker"), &nats, &format!("t{i}-{suffix}"), "trainer", realm));
    }
    for (optimizer, on_disk) in [("median", "they go to disk"), ("fedavg", "each update is folded from a file")] {
        let job = dir.path().join(optimizer);
        std::fs::create_dir(&job).expect("mkdir");
        crate::util::copy_example(&job);
        let spec_path = job.join("modelSpec.json");
        let mut spec: Value = serde_json::from_str(&std::fs::read_to_string(&spec_path).expect("read")).expect("json");
        spec["optimizer"] = serde_json::json!({"sort": optimizer, "kwargs": {}});
        spec["hyperparameters"]["rounds"] = serde_json::json!(3);
        std::fs::write(&spec_path, spec.to_string()).expect("write");
        let job_arg = job.to_str().expect("utf8").to_string();

        let embedded = Command::new(bin("flamectl"))
            .args(["run", &job_arg, "-o", "json", "--data-dir"])
            .arg(dir.path().join(format!("data-{optimizer}")))
            .current_dir(root())
            .output()
            .expect("flamectl run");
        assert!(embedded.status.success(), "{}", String::from_utf8_lossy(&embedded.stderr));
        let embedded: Value = serde_json::from_slice(&embedded.stdout).expect("json");
        assert_eq!(embedded["state"], "completed");

        let engine = procs.spawn(&mut engine_run(&mongo, &format!("flame_e2e_{optimizer}_{suffix}"), &nats, &job_arg));
        let distributed = summary(engine).await;
        assert_eq!(distributed["state"], "completed", "{optimizer}");
        assert_eq!(distributed["rounds_completed"], 3, "{optimizer}");

        let log = std::fs::read_to_string(&log).expect("aggregator log");
        assert_eq!(log.matches(on_disk).count(), 3, "{optimizer}: every round's updates were taken from disk: {log}");
        let left: Vec<_> = std::fs::read_dir(downloads.join("aggregator-updates"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{optimizer}: updates left on disk: {left:?}");
        assert_eq!(distributed["final_model"], embedded["final_model"], "{optimizer}: the same model as with every update in memory");
    }
}
