//! A worker that speaks only MQTT, with a real MQTT client library
//! (rumqttc), completes rounds of a real job: it connects to the MQTT
//! listener of the job's NATS server and nothing else, registers, takes
//! commands, fetches and stores model blobs and reports over MQTT topics;
//! `flamectl run --nats URL --mqtt-devices` serves it beside two NATS workers.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::oneshot;

use flame_events::protocol::{Command as WorkerCommand, WorkerInfo};
use flame_transport::blob::{self, BlobStore};
use flame_workers::Worker;

use crate::util::{self, Processes, bin, free_port, root};

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Result<Vec<u8>, String>>>>>;

/// Model blobs over MQTT: ask on `get`, wait for `blob`/`missing`; send on `put`, wait for `stored`.
struct MqttBlobs {
    client: AsyncClient,
    id: String,
    waiters: Waiters,
}

impl MqttBlobs {
    async fn ask(&self, key: String, topic: String, payload: Vec<u8>) -> Result<Vec<u8>, blob::Error> {
        for _ in 0..5 {
            let (tx, rx) = oneshot::channel();
            self.waiters.lock().expect("lock").insert(key.clone(), tx);
            self.client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .map_err(|e| blob::Error::Io(e.to_string()))?;
            match tokio::time::timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(Ok(bytes))) => return Ok(bytes),
                Ok(Ok(Err(why))) => return Err(blob::Error::Io(why)),
                _ => continue, // lost on the way (QoS 0 from NATS): ask again
            }
        }
        Err(blob::Error::Io(format!("no answer on {topic}")))
    }
}

#[async_trait]
impl BlobStore for MqttBlobs {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, blob::Error> {
        let digest = blob::digest(&bytes);
        self.ask(format!("stored:{digest}"), format!("flame/mqtt/put/{}", self.id), bytes).await?;
        Ok(digest)
    }

    async fn get(&self, digest: &str) -> Result<Vec<u8>, blob::Error> {
        let bytes = self.ask(format!("blob:{digest}"), format!("flame/mqtt/get/{}", self.id), digest.as_bytes().to_vec()).await?;
        if blob::digest(&bytes) != digest {
            return Err(blob::Error::Corrupt { expected: digest.into(), actual: blob::digest(&bytes) });
        }
        Ok(bytes)
    }
}

/// The device: an MQTT connection, a heartbeat, and the platform's worker
/// logic (`Worker::execute`) running each command with blobs over MQTT.
async fn device(mqtt_port: u16, id: &str, realm: &str, lose_first_train: bool, password: Option<&str>) -> tokio::task::JoinHandle<()> {
    let mut options = MqttOptions::new(id, "127.0.0.1", mqtt_port);
    if let Some(password) = password {
        options.set_credentials(id, password);
    }
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(16 << 20, 16 << 20);
    options.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(options, 64);
    let waiters: Waiters = Arc::default();
    let (commands, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let prefix = format!("flame/mqtt/{{}}/{id}");
    let topic = |what: &str| prefix.replace("{}", what);
    let (cmd_topic, blob_topic, missing_topic, stored_topic) = (topic("cmd"), topic("blob"), topic("missing"), topic("stored"));
    let subscriptions = [cmd_topic.clone(), format!("{blob_topic}/+"), format!("{missing_topic}/+"), stored_topic.clone()];
    let (sub_client, w) = (client.clone(), waiters.clone());
    let poll = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for s in &subscriptions {
                        let _ = sub_client.subscribe(s.clone(), QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let t = p.topic.as_str();
                    let reply = |key: String, value: Result<Vec<u8>, String>| {
                        if let Some(tx) = w.lock().expect("lock").remove(&key) {
                            let _ = tx.send(value);
                        }
                    };
                    if t == cmd_topic {
                        let _ = commands.send(p.payload.to_vec());
                    } else if let Some(d) = t.strip_prefix(&format!("{blob_topic}/")) {
                        reply(format!("blob:{d}"), Ok(p.payload.to_vec()));
                    } else if let Some(d) = t.strip_prefix(&format!("{missing_topic}/")) {
                        reply(format!("blob:{d}"), Err(String::from_utf8_lossy(&p.payload).into_owned()));
                    } else if t == stored_topic {
                        reply(format!("stored:{}", String::from_utf8_lossy(&p.payload)), Ok(Vec::new()));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let info = WorkerInfo { id: id.into(), roles: vec!["trainer".into()], realm: realm.into(), device: "mqtt".into(), group: None };
    let (hb_client, hello) = (client.clone(), serde_json::to_vec(&info).expect("json"));
    let hello_topic = topic("hello");
    let heartbeat = tokio::spawn(async move {
        loop {
            let _ = hb_client.publish(hello_topic.clone(), QoS::AtMostOnce, false, hello.clone()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let blobs = Arc::new(MqttBlobs { client: client.clone(), id: id.into(), waiters });
    let worker = Worker::new(info, Arc::new(flame_transport::InProcess::default()), blobs);
    let report_topic = topic("report");
    tokio::spawn(async move {
        // Aborting the device stops its connection and heartbeat too.
        let _parts = (AbortOnDrop(poll), AbortOnDrop(heartbeat));
        let mut lose = lose_first_train;
        while let Some(bytes) = incoming.recv().await {
            let Ok(command) = WorkerCommand::decode(&bytes) else { continue };
            if lose && matches!(command.body, flame_events::protocol::CommandBody::Train { .. }) {
                // As if the QoS 0 delivery were lost on the way: the adapter sends it again.
                lose = false;
                continue;
            }
            // The worker remembers what it ran: a command sent again is answered from memory.
            let report = worker.execute(&command).await;
            let _ = client.publish(report_topic.clone(), QoS::AtLeastOnce, false, serde_json::to_vec(&report).expect("json")).await;
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_speaks_only_mqtt_completes_rounds_of_a_real_job() {
    mqtt_job(false).await;
}

/// A command the device never got (MQTT delivers NATS publishes at QoS 0)
/// reaches it again: the round waits, then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_lost_on_the_way_to_an_mqtt_worker_is_sent_again() {
    let started = std::time::Instant::now();
    mqtt_job(true).await;
    assert!(started.elapsed() >= flame_transport::mqtt::RESEND, "the lost command came again after the resend interval");
}

async fn mqtt_job(lose_first_train: bool) {
    flame_workers::model::init_backend();
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, mqtt_port) = (free_port(), free_port());
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, format!("server_name: flame-mqtt-test\nmax_payload: 8MB\nmqtt {{ listen: \"127.0.0.1:{mqtt_port}\" }}\n"))
        .expect("conf");
    let nats = util::Nats::start_with(port, &dir.path().join("js"), &["-c", conf.to_str().expect("utf8")]);
    util::connect(&nats.url).await;
    let mut procs = Processes::default();
    util::worker(&mut procs, &nats.url, "nats-1", "trainer", "default/site1");
    util::worker(&mut procs, &nats.url, "nats-2", "trainer", "default/site2");
    let device_id = "mqtt-device-3";
    let device = device(mqtt_port, device_id, "default/site3", lose_first_train, None).await;

    let data = dir.path().join("data");
    let out = Command::new(bin("flamectl"))
        .args(["run", "examples/digits-two-tier", "--nats", &nats.url, "--mqtt-devices", "-o", "json", "--data-dir"])
        .arg(&data)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .expect("flamectl run");
    device.abort();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(summary["state"], "completed", "{summary}");
    assert_eq!(summary["rounds_completed"], 5);
    assert!(summary["metrics"]["accuracy"].as_f64().is_some_and(|a| a > 0.9), "{summary}");

    let store = format!("sqlite:{}", data.join("events.db").display());
    let job = summary["job_id"].as_str().expect("job id");
    let events = Command::new(bin("flamectl")).args(["events", job, "--store", &store, "-o", "json"]).output().expect("events");
    let events: Vec<Value> = String::from_utf8_lossy(&events.stdout).lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let actor = format!("worker:{device_id}");
    let by_device = |t: &str| events.iter().filter(|e| e["event_type"] == t && e["actor"] == actor.as_str()).count();
    assert_eq!(by_device("TaskDeployed"), 1, "the device deployed its task over MQTT");
    assert_eq!(by_device("UpdateReported"), 5, "and trained every round");
    let aggregated: Vec<&Value> = events.iter().filter(|e| e["event_type"] == "RoundAggregated").collect();
    assert!(aggregated.iter().all(|e| e["payload"]["inputs"].as_array().map(Vec::len) == Some(3)), "its updates are in every aggregate");
    let verify = Command::new(bin("flamectl")).args(["replay", job, "--verify", "--store", &store]).output().expect("verify");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

/// An MQTT device with its own identity (`flame-engine worker add --mqtt`):
/// a user name and password the server checks, allowed its own topics only.
/// It completes rounds of a real job beside two NATS workers with their own
/// NKeys and an engine with its own, with no permission violation in the
/// server's log. Another device cannot hear the first one's commands, nor
/// say hello or report in its name, and a wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_device_with_its_own_identity_uses_only_its_own_topics() {
    flame_workers::model::init_backend();
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth");
    let add = |id: &str, mqtt: bool| {
        let mut c = Command::new(bin("flame-engine"));
        c.args(["worker", "add", "--id", id]).arg("--auth-dir").arg(&auth);
        if mqtt {
            c.arg("--mqtt");
        }
        let out = c.output().expect("flame-engine");
        assert!(out.status.success(), "worker add: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    add("nats-1", false);
    add("nats-2", false);
    let said = add("mqtt-device-3", true);
    assert!(said.contains("password") && said.contains("reload"), "it says how to use the identity: {said}");
    add("mqtt-other", true);
    let password =
        |id: &str| std::fs::read_to_string(auth.join("workers").join(format!("{id}.password"))).expect("password").trim().to_string();
    let conf_text = std::fs::read_to_string(auth.join("auth.conf")).expect("auth.conf");
    assert!(!conf_text.contains(&password("mqtt-device-3")), "the server's configuration holds a hash, not the password");

    let (port, mqtt_port) = (free_port(), free_port());
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!("server_name: flame-mqtt-ids\nmax_payload: 8MB\nmqtt {{ listen: \"127.0.0.1:{mqtt_port}\" }}\ninclude ./auth/auth.conf\n"),
    )
    .expect("conf");
    let log = dir.path().join("nats.log");
    let nats =
        util::Nats::start_with(port, &dir.path().join("js"), &["-c", conf.to_str().expect("utf8"), "-l", log.to_str().expect("utf8")]);
    let seed = |who: &str| if who == "engine" { auth.join("engine.nk") } else { auth.join("workers").join(format!("{who}.nk")) };
    let violations = || -> Vec<String> {
        std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| l.contains("Violation")).map(str::to_string).collect()
    };
    let engine_seed = std::fs::read_to_string(seed("engine")).expect("seed").trim().to_string();
    let mut engine = None;
    for _ in 0..100 {
        if let Ok(c) = async_nats::ConnectOptions::with_nkey(engine_seed.clone()).connect(&nats.url).await {
            engine = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let engine = engine.expect("the server comes up and lets the engine's user in");
    // The engine first: it creates the streams, which a worker's identity may only bind to.
    let data = dir.path().join("data");
    let run = Command::new(bin("flamectl"))
        .args(["run", "examples/digits-two-tier", "--nats", &nats.url, "--mqtt-devices", "-o", "json", "--nats-nkey"])
        .arg(seed("engine"))
        .arg("--data-dir")
        .arg(&data)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("flamectl run");
    let js = async_nats::jetstream::new(engine.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while js.get_stream("FLAME_CMDS").await.is_err() || js.get_key_value("flame-workers").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the engine did not create its streams");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut procs = Processes::default();
    for (id, realm) in [("nats-1", "default/site1"), ("nats-2", "default/site2")] {
        procs.spawn(
            Command::new(bin("flame-worker"))
                .args(["--nats", &nats.url, "--id", id, "--roles", "trainer", "--realm", realm, "--nats-nkey"])
                .arg(seed(id))
                .arg("--data-root")
                .arg(util::examples())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null()),
        );
    }
    let device_id = "mqtt-device-3";
    let device = device(mqtt_port, device_id, "default/site3", false, Some(&password(device_id))).await;
    let out = tokio::task::spawn_blocking(move || run.wait_with_output()).await.expect("join").expect("flamectl run");
    device.abort();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(summary["state"], "completed", "{summary}");
    let store = format!("sqlite:{}", data.join("events.db").display());
    let job = summary["job_id"].as_str().expect("job id");
    let events = Command::new(bin("flamectl")).args(["events", job, "--store", &store, "-o", "json"]).output().expect("events");
    let updates = String::from_utf8_lossy(&events.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event_type"] == "UpdateReported" && e["actor"] == format!("worker:{device_id}").as_str())
        .count();
    assert_eq!(updates, 5, "the device trained every round under its own identity");
    assert_eq!(violations(), Vec::<String>::new(), "the server refused the device, the workers or the engine something they need");

    // Another device, as itself, tries the first one's topics; the engine's user watches them.
    let watcher = engine;
    let mut seen = watcher.subscribe("flame.mqtt.>").await.expect("watch");
    watcher.flush().await.expect("flush");
    let mut options = MqttOptions::new("mqtt-other", "127.0.0.1", mqtt_port);
    options.set_credentials("mqtt-other", password("mqtt-other"));
    let (other, mut events) = AsyncClient::new(options, 16);
    let mut suback = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut subscribed = false;
    while suback.is_none() {
        assert!(std::time::Instant::now() < deadline, "no SUBACK for the other device's subscription");
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) if !subscribed => {
                subscribed = true;
                other.subscribe(format!("flame/mqtt/cmd/{device_id}"), QoS::AtLeastOnce).await.expect("subscribe");
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => suback = Some(ack),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the other device could not connect with its own identity: {e}"),
            Err(_) => {}
        }
    }
    let ack = suback.expect("suback");
    assert!(
        ack.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)),
        "a subscription to another device's commands was granted: {ack:?}"
    );
    // In the other's name, then in its own: only its own arrives.
    let hello = serde_json::to_vec(&WorkerInfo {
        id: device_id.into(),
        roles: vec!["trainer".into()],
        realm: "default".into(),
        device: "mqtt".into(),
        group: None,
    })
    .expect("json");
    other.publish(format!("flame/mqtt/hello/{device_id}"), QoS::AtMostOnce, false, hello.clone()).await.expect("publish");
    other.publish(format!("flame/mqtt/report/{device_id}"), QoS::AtLeastOnce, false, b"{}".to_vec()).await.expect("publish");
    other.publish("flame/mqtt/hello/mqtt-other", QoS::AtMostOnce, false, b"{}".to_vec()).await.expect("publish");
    let drive = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let mut subjects = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, futures::StreamExt::next(&mut seen)).await {
        subjects.push(m.subject.to_string());
    }
    drive.abort();
    assert!(subjects.contains(&"flame.mqtt.hello.mqtt-other".to_string()), "its own hello arrives: {subjects:?}");
    assert!(!subjects.iter().any(|s| s.ends_with(device_id)), "something in the other device's name arrived: {subjects:?}");
    let said = violations().join("\n");
    assert!(said.contains("mqtt-other") && said.contains(&format!("flame.mqtt.cmd.{device_id}")), "the refusals are logged: {said}");

    // A wrong password is refused.
    let mut options = MqttOptions::new("mqtt-other", "127.0.0.1", mqtt_port);
    options.set_credentials("mqtt-other", "not-its-password");
    let (_client, mut events) = AsyncClient::new(options, 16);
    let refused = tokio::time::timeout(Duration::from_secs(10), events.poll()).await.expect("an answer");
    assert!(matches!(refused, Err(rumqttc::ConnectionError::ConnectionRefused(_)) | Err(rumqttc::ConnectionError::Io(_))), "{refused:?}");
}
