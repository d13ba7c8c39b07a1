//! Workers that speak only MQTT (a microcontroller, a phone): they connect
//! to the MQTT listener of the same NATS server and use plain topics; this
//! adapter, on the platform's side of that server, does for each of them
//! what a NATS worker does for itself: registers it in the worker bucket,
//! takes its commands from its durable consumer on `FLAME_CMDS` (so nothing
//! is lost while the device is offline), forwards them, serves and stores
//! its model blobs, and publishes its reports to JetStream, acknowledging a
//! command only once its report is stored. To the engine the device is a
//! worker like any other.
//!
//! Topics (NATS subjects with `/` for `.`; `<id>` is the device's worker id):
//!
//! | topic | from | QoS | payload |
//! | --- | --- | --- | --- |
//! | `flame/mqtt/hello/<id>` | device, every 2 s | 0 or 1 | its registration, `{"id", "roles", "realm", "device"}` |
//! | `flame/mqtt/cmd/<id>` | adapter | 0 (NATS publishes reach MQTT at QoS 0) | a command; sent again every 10 s until reported |
//! | `flame/mqtt/get/<id>` | device | 1 | a blob digest it needs (64 hex) |
//! | `flame/mqtt/blob/<id>/<digest>` | adapter | 0 | the blob's bytes (ask again on a timeout) |
//! | `flame/mqtt/missing/<id>/<digest>` | adapter | 0 | why the blob cannot be served |
//! | `flame/mqtt/put/<id>` | device | 1 | bytes to store (a model blob) |
//! | `flame/mqtt/stored/<id>` | adapter | 0 | the digest it was stored under |
//! | `flame/mqtt/report/<id>` | device | 1 | a report; its `worker_id` must be `<id>` |

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use flame_events::protocol::{Command, Report, WorkerInfo};

use crate::blob::BlobStore;
use crate::{Delivery, Nats, Transport, check_id};

/// The subject prefix of the MQTT topics (`flame/mqtt/...`).
pub const PREFIX: &str = "flame.mqtt";
/// How often a command not yet reported is sent to its device again.
pub const RESEND: Duration = Duration::from_secs(10);

type Pending = Arc<Mutex<HashMap<String, HashMap<String, (Command, Delivery<Command>)>>>>;

/// Serves MQTT-only workers through one NATS connection.
pub struct MqttAdapter {
    client: async_nats::Client,
    transport: Nats,
    blobs: Arc<dyn BlobStore>,
}

fn token(subject: &str, n: usize) -> Option<&str> {
    subject.split('.').nth(n)
}

impl MqttAdapter {
    /// An adapter on the transport's connection, with the blob store workers use.
    pub fn new(transport: Nats, blobs: Arc<dyn BlobStore>) -> Self {
        Self { client: transport.jetstream().client(), transport, blobs }
    }

    /// Serves devices until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), crate::Error> {
        let sub = |what: &str| {
            let client = self.client.clone();
            let subject = format!("{PREFIX}.{what}.*");
            async move { client.subscribe(subject).await.map_err(crate::nats) }
        };
        let (mut hello, mut get, mut put, mut report) = (sub("hello").await?, sub("get").await?, sub("put").await?, sub("report").await?);
        let pending: Pending = Arc::default();
        let served: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        let mut resend = tokio::time::interval(RESEND);
        resend.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(m) = hello.next() => {
                    let Some(id) = token(&m.subject, 3).map(str::to_string) else { continue };
                    let info = match serde_json::from_slice::<WorkerInfo>(&m.payload) {
                        Ok(info) if info.id == id && check_id(&id).is_ok() => info,
                        Ok(info) => { tracing::warn!(device = %id, claimed = %info.id, "an MQTT registration for another id is ignored"); continue }
                        Err(e) => { tracing::warn!(device = %id, "an MQTT registration that does not read: {e}"); continue }
                    };
                    if let Err(e) = self.transport.register(&info).await {
                        tracing::warn!(device = %id, "registering an MQTT worker failed: {e}");
                        continue;
                    }
                    if served.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.clone()) {
                        tasks.spawn(forward(self.client.clone(), self.transport.clone(), id, pending.clone()));
                    }
                }
                Some(m) = get.next() => {
                    let Some(id) = token(&m.subject, 3).map(str::to_string) else { continue };
                    let digest = String::from_utf8_lossy(&m.payload).trim().to_string();
                    let (client, blobs) = (self.client.clone(), self.blobs.clone());
                    tasks.spawn(async move {
                        let _ = match blobs.get(&digest).await {
                            Ok(bytes) => client.publish(format!("{PREFIX}.blob.{id}.{digest}"), bytes.into()).await,
                            Err(e) => client.publish(format!("{PREFIX}.missing.{id}.{digest}"), e.to_string().into()).await,
                        };
                    });
                }
                Some(m) = put.next() => {
                    let Some(id) = token(&m.subject, 3).map(str::to_string) else { continue };
                    let (client, blobs) = (self.client.clone(), self.blobs.clone());
                    tasks.spawn(async move {
                        match blobs.put(m.payload.to_vec()).await {
                            Ok(digest) => { let _ = client.publish(format!("{PREFIX}.stored.{id}"), digest.into()).await; }
                            Err(e) => tracing::warn!(device = %id, "storing an MQTT worker's blob failed: {e}"),
                        }
                    });
                }
                Some(m) = report.next() => {
                    let Some(id) = token(&m.subject, 3).map(str::to_string) else { continue };
                    let report = match serde_json::from_slice::<Report>(&m.payload) {
                        // A device speaks for itself only.
                        Ok(r) if r.worker_id == id => r,
                        Ok(r) => { tracing::warn!(device = %id, claimed = %r.worker_id, "an MQTT report in another worker's name is dropped"); continue }
                        Err(e) => { tracing::warn!(device = %id, "an MQTT report that does not read: {e}"); continue }
                    };
                    if let Err(e) = self.transport.send_report(&report).await {
                        // Not acked: the command goes to the device again, and its answer comes again.
                        tracing::warn!(device = %id, "publishing an MQTT worker's report failed: {e}");
                        continue;
                    }
                    let done = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(&id).and_then(|p| p.remove(&report.command_id));
                    if let Some((_, delivery)) = done {
                        let _ = delivery.ack().await;
                    }
                }
                _ = resend.tick() => {
                    // Still with the device: JetStream should not deliver them again meanwhile.
                    let working: Vec<_> = pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .values()
                        .flat_map(|p| p.values().map(|(_, d)| d.progress_handle()))
                        .collect();
                    for progress in working.into_iter().flatten() {
                        let _ = progress().await;
                    }
                    let again: Vec<(String, Vec<u8>)> = pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .flat_map(|(id, p)| p.values().filter_map(|(c, _)| serde_json::to_vec(c).ok().map(|b| (id.clone(), b))).collect::<Vec<_>>())
                        .collect();
                    for (id, bytes) in again {
                        let _ = self.client.publish(format!("{PREFIX}.cmd.{id}"), bytes.into()).await;
                    }
                }
            }
        }
        tasks.abort_all();
        Ok(())
    }
}

/// Takes a device's commands from its durable consumer and forwards each.
async fn forward(client: async_nats::Client, transport: Nats, id: String, pending: Pending) {
    let mut inbox = match transport.command_inbox(&id).await {
        Ok(i) => i,
        Err(e) => return tracing::warn!(device = %id, "opening an MQTT worker's commands failed: {e}"),
    };
    while let Some(next) = inbox.next().await {
        let Ok(delivery) = next else { continue };
        let command = delivery.message.clone();
        if let flame_events::protocol::CommandBody::Unreadable { reason } = &command.body {
            // Nothing a device could run: answered here, as a worker would.
            let report = Report::answering(&command, &id, flame_events::protocol::ReportBody::Failed { error: reason.clone() });
            if transport.send_report(&report).await.is_ok() {
                let _ = delivery.ack().await;
            }
            continue;
        }
        let Ok(bytes) = serde_json::to_vec(&command) else { continue };
        let _ = client.publish(format!("{PREFIX}.cmd.{id}"), bytes.into()).await;
        pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .insert(command.id.clone(), (command, delivery));
    }
}
