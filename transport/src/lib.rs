//! How commands reach workers and reports reach the engine: one trait, an
//! in-process implementation for embedded mode and a NATS JetStream one; and
//! the outbox relay that publishes committed events to JetStream
//! ([`relay`]). Workers link this and the event vocabulary, no database driver.

pub mod blob;
pub mod download;
pub mod group;
pub mod identity;
pub mod lease;
pub mod mqtt;
pub mod otlp;
pub mod relay;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, stream};
use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::blob::BlobStore;
use flame_events::protocol::{Command, CommandBody, Report, WorkerInfo};

/// JetStream stream holding commands, subjects `flame.cmd.<worker-id>`.
pub const COMMAND_STREAM: &str = "FLAME_CMDS";
/// JetStream stream holding reports, subjects `flame.report.<job-id>`.
pub const REPORT_STREAM: &str = "FLAME_REPORTS";
/// How long a command taken by a worker stays unacknowledged, without word
/// that it is still running, before it is delivered again.
pub const COMMAND_ACK_WAIT: Duration = Duration::from_secs(15);
/// How often a worker says that a command is still running.
pub const COMMAND_PROGRESS: Duration = Duration::from_secs(5);
/// How long a report taken by an engine stays unacknowledged before it is delivered again.
pub const REPORT_ACK_WAIT: Duration = Duration::from_secs(3);
/// Durable consumers a command or report stream may hold (workers, jobs).
pub const MAX_CONSUMERS: i32 = 100_000;
/// How long a worker waits for JetStream to answer at start.
const JETSTREAM_WAIT: Duration = Duration::from_secs(60);
/// How long one pull request of a command or report consumer waits.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server's idle heartbeat on a pull: two missed, and the pull is made again ([`renewed`]).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// KV bucket of live workers; entries expire without heartbeats.
pub const WORKER_BUCKET: &str = "flame-workers";
/// How long a worker stays listed after its last heartbeat (by default; `--worker-ttl`).
pub const WORKER_TTL: Duration = Duration::from_secs(6);
/// How long a worker starting under an id watches a registration another
/// process wrote for it: a live holder renews it within this (it heartbeats
/// every 2 s), a dead one does not.
pub const RENEWAL_WAIT: Duration = Duration::from_secs(3);

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS failed.
    #[error("NATS: {0}")]
    Nats(String),
    /// A message did not decode.
    #[error("bad message on '{subject}': {reason}")]
    BadMessage {
        /// Where it came from.
        subject: String,
        /// What was wrong.
        reason: String,
    },
    /// An id is not usable in a subject.
    #[error("'{0}' is not a valid id: use letters, digits, '-' and '_' only")]
    BadId(String),
    /// The other side is gone.
    #[error("the in-process channel for '{0}' is closed")]
    Closed(String),
    /// Another live process is registered under a worker id.
    #[error(
        "worker id '{id}' is in use by another live process (its registration was renewed while this one waited): two processes cannot be one worker; give this one an id of its own (--id), or stop the other first"
    )]
    Taken {
        /// The worker id.
        id: String,
    },
}

fn nats(e: impl std::fmt::Display) -> Error {
    Error::Nats(e.to_string())
}

/// A received message with the means to acknowledge it once handled.
pub struct Delivery<T> {
    /// The message.
    pub message: T,
    ack: Option<BoxFuture<'static, Result<(), Error>>>,
    progress: Option<Progress>,
}

/// Tells the server that a delivery is still being worked on.
pub type Progress = std::sync::Arc<dyn Fn() -> BoxFuture<'static, Result<(), Error>> + Send + Sync>;

impl<T> Delivery<T> {
    /// A delivery that needs no acknowledgement.
    pub fn unacked(message: T) -> Self {
        Self { message, ack: None, progress: None }
    }

    /// The means to tell the server that the message is still being worked
    /// on, so that it is not delivered again for another ack wait (`None`:
    /// nothing to tell). Workers use it every [`COMMAND_PROGRESS`] while a
    /// command runs.
    pub fn progress_handle(&self) -> Option<Progress> {
        self.progress.clone()
    }

    /// The same delivery (its acknowledgement and progress) of another message.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Delivery<U> {
        Delivery { message: f(self.message), ack: self.ack, progress: self.progress }
    }

    /// Acknowledges the message: it will not be delivered again.
    pub async fn ack(self) -> Result<(), Error> {
        match self.ack {
            Some(ack) => ack.await,
            None => Ok(()),
        }
    }
}

/// A stream of deliveries.
pub type Inbox<T> = BoxStream<'static, Result<Delivery<T>, Error>>;

/// A command too large for one NATS message is stored whole in the object
/// store, and the message carries its digest in this header.
pub const COMMAND_BLOB_HEADER: &str = "Flame-Command-Blob";

/// Room left in a message for its headers and framing: a command larger than
/// the server's `max_payload` less this goes through the object store.
const COMMAND_HEADROOM: usize = 16 * 1024;

/// How an inbox reads a message: its subject, payload and the digest of a stored command, if any.
type Decode<T> = fn(&str, &[u8], Option<&str>) -> Result<T, serde_json::Error>;

/// A command message as decoded, before a stored one is read.
enum Arrived {
    Inline(Command),
    /// The message's head (its body unreadable) and the stored command's digest.
    Stored {
        head: Command,
        digest: String,
    },
}

impl Arrived {
    fn decode(payload: &[u8], stored: Option<&str>) -> Result<Self, serde_json::Error> {
        let head = Command::decode(payload)?;
        Ok(match stored {
            Some(d) => Self::Stored { head, digest: d.to_string() },
            None => Self::Inline(head),
        })
    }
}

/// The subject of a group's batched commands. Worker ids hold no `.`, so it
/// is never a worker's own subject (`flame.cmd.<worker-id>`).
pub fn group_command_subject(group: &str) -> String {
    format!("flame.cmd.group.{group}")
}

/// One delivery of several messages as one delivery each: the server's
/// message is acknowledged once every part is (a part not acked leaves it
/// to be delivered again whole, and its parts already handled are answered
/// again from memory or refused as duplicates). Progress is told for the whole.
pub fn split_delivery<T>(d: Delivery<Vec<T>>) -> Vec<Delivery<T>> {
    let Delivery { message, ack, progress } = d;
    if message.is_empty() {
        // Nothing in it to handle: acknowledged at once, so that it does not come again.
        if let Some(ack) = ack {
            tokio::spawn(ack);
        }
        return Vec::new();
    }
    if message.len() == 1 {
        return message.into_iter().next().map(|m| Delivery { message: m, ack, progress }).into_iter().collect();
    }
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(message.len()));
    let ack = Arc::new(Mutex::new(ack));
    message
        .into_iter()
        .map(|m| {
            let (left, ack) = (left.clone(), ack.clone());
            let part = async move {
                if left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                    let whole = ack.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    if let Some(whole) = whole {
                        return whole.await;
                    }
                }
                Ok(())
            };
            Delivery { message: m, ack: Some(part.boxed()), progress: progress.clone() }
        })
        .collect()
}

/// The deliveries of one message as stream items, or its error as one.
fn one_each<T>(r: Result<Vec<Delivery<T>>, Error>) -> futures::stream::Iter<std::vec::IntoIter<Result<Delivery<T>, Error>>> {
    let items: Vec<_> = match r {
        Ok(ds) => ds.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e)],
    };
    futures::stream::iter(items)
}

/// Splits `items` (each already serialised) into runs whose bytes stay under `limit`, in order.
fn runs_under(items: Vec<Vec<u8>>, limit: usize) -> Vec<Vec<Vec<u8>>> {
    let mut runs: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        match runs.last_mut() {
            Some(run) if bytes + item.len() < limit => {
                bytes += item.len() + 1;
                run.push(item);
            }
            _ => {
                bytes = item.len() + 1;
                runs.push(vec![item]);
            }
        }
    }
    runs
}

/// A batch's bytes from its items' bytes: `{"v":V,"<field>":[item,item,...]}`.
fn batch_bytes(field: &str, items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("{{\"v\":{},\"{field}\":[", flame_events::protocol::VERSION).into_bytes();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.extend_from_slice(b"]}");
    out
}

/// A deduplication id for a batch: its group and a digest of what it holds.
fn batch_id(group: &str, keys: impl Iterator<Item = String>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update(b"\n");
    }
    let d = h.finalize();
    format!("{group}:batch:{}", d.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>())
}

/// What arrives on a group's command consumer: one worker's command, or a batch.
enum GroupArrived {
    One(String, Box<Arrived>),
    Batch(Vec<(String, Command)>),
}

/// A command batch as it travels; each command decoded on its own, so that
/// one unreadable command is answered `failed` and the others run.
#[derive(serde::Deserialize)]
struct WireBatch {
    commands: Vec<WireAddressed>,
}

#[derive(serde::Deserialize)]
struct WireReports {
    reports: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct WireAddressed {
    worker_id: String,
    command: serde_json::Value,
}

/// Moves commands, reports and worker registrations.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Registers a worker or renews its heartbeat.
    async fn register(&self, info: &WorkerInfo) -> Result<(), Error>;
    /// Before a process first registers these worker ids: refuses them if
    /// another live process holds one ([`Error::Taken`]). By default, none do.
    async fn claim_ids(&self, _ids: &[String]) -> Result<(), Error> {
        Ok(())
    }
    /// Lists live workers, sorted by id.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, Error>;
    /// How many times this transport's connection was made, the first
    /// included: a change between two reads of the registry says it was out
    /// of reach in between. Always 1 where there is no connection to lose.
    fn connects(&self) -> u64 {
        1
    }
    /// Seconds since each live worker's last heartbeat, by id (0 where the transport keeps no times).
    async fn heartbeat_ages(&self) -> Result<Vec<(String, f64)>, Error> {
        Ok(self.workers().await?.into_iter().map(|w| (w.id, 0.0)).collect())
    }
    /// Sends a command to one worker.
    async fn send_command(&self, worker_id: &str, command: &Command) -> Result<(), Error>;
    /// The commands addressed to one worker, durable across restarts where the transport is.
    async fn command_inbox(&self, worker_id: &str) -> Result<Inbox<Command>, Error>;
    /// The commands addressed to several workers of one process (virtual
    /// workers), each with the id it is addressed to. `group` names what the
    /// transport keeps for them (NATS: one durable consumer for the group,
    /// instead of one per worker). By default, each worker's own inbox.
    async fn group_inbox(&self, _group: &str, worker_ids: &[String]) -> Result<Inbox<(String, Command)>, Error> {
        let mut inboxes = Vec::with_capacity(worker_ids.len());
        for id in worker_ids {
            let id = id.clone();
            let inbox = self.command_inbox(&id).await?;
            inboxes.push(inbox.map(move |d| d.map(|d| d.map(|c| (id.clone(), c)))).boxed());
        }
        Ok(futures::stream::select_all(inboxes).boxed())
    }
    /// Sends commands to workers of one group (their registrations name
    /// `group`): NATS sends them in as few messages as fit, on the group's
    /// subject, where the group's inbox reads them. By default, one by one.
    async fn send_commands(&self, group: &str, commands: &[(String, Command)]) -> Result<(), Error> {
        let _ = group;
        for (worker_id, command) in commands {
            self.send_command(worker_id, command).await?;
        }
        Ok(())
    }
    /// Sends a report to the engine running its job.
    async fn send_report(&self, report: &Report) -> Result<(), Error>;
    /// Sends reports of workers of one group (their registrations name
    /// `group`): NATS publishes them in as few messages as fit, on the
    /// group's subject of each job. By default, one by one.
    async fn send_reports(&self, group: &str, reports: &[Report]) -> Result<(), Error> {
        let _ = group;
        for report in reports {
            self.send_report(report).await?;
        }
        Ok(())
    }
    /// The reports for one job.
    async fn report_inbox(&self, job_id: &str) -> Result<Inbox<Report>, Error>;
    /// Releases what the transport keeps for a job that has ended (its durable report consumer).
    async fn forget_job(&self, _job_id: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// Checks that an id can be used in a NATS subject and a consumer name.
pub fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok { Ok(()) } else { Err(Error::BadId(id.to_string())) }
}

type Channel<T> = (mpsc::UnboundedSender<T>, Option<mpsc::UnboundedReceiver<T>>);

/// The embedded-mode transport: channels inside one process.
#[derive(Default, Clone)]
pub struct InProcess {
    inner: Arc<Mutex<InProcessState>>,
}

#[derive(Default)]
struct InProcessState {
    workers: BTreeMap<String, WorkerInfo>,
    commands: HashMap<String, Channel<Command>>,
    reports: HashMap<String, Channel<Report>>,
}

fn channel<'a, T>(map: &'a mut HashMap<String, Channel<T>>, key: &str) -> &'a mut Channel<T> {
    map.entry(key.to_string()).or_insert_with(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Some(rx))
    })
}

fn take_inbox<T: Send + 'static>(map: &mut HashMap<String, Channel<T>>, key: &str) -> Result<Inbox<T>, Error> {
    let rx = channel(map, key).1.take().ok_or_else(|| Error::Closed(format!("{key} (inbox already taken)")))?;
    Ok(tokio_stream_from(rx))
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::UnboundedReceiver<T>) -> Inbox<T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|m| Ok(Delivery::unacked(m))).boxed()
}

impl InProcess {
    fn state(&self) -> std::sync::MutexGuard<'_, InProcessState> {
        // A panic while holding this lock leaves plain maps behind; keep using them.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Transport for InProcess {
    async fn register(&self, info: &WorkerInfo) -> Result<(), Error> {
        self.state().workers.insert(info.id.clone(), info.clone());
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        Ok(self.state().workers.values().cloned().collect())
    }

    async fn send_command(&self, worker_id: &str, command: &Command) -> Result<(), Error> {
        let mut state = self.state();
        channel(&mut state.commands, worker_id).0.send(command.clone()).map_err(|_| Error::Closed(worker_id.to_string()))
    }

    async fn command_inbox(&self, worker_id: &str) -> Result<Inbox<Command>, Error> {
        take_inbox(&mut self.state().commands, worker_id)
    }

    async fn send_report(&self, report: &Report) -> Result<(), Error> {
        let mut state = self.state();
        channel(&mut state.reports, &report.job_id).0.send(report.clone()).map_err(|_| Error::Closed(report.job_id.clone()))
    }

    async fn report_inbox(&self, job_id: &str) -> Result<Inbox<Report>, Error> {
        take_inbox(&mut self.state().reports, job_id)
    }
}

/// How to authenticate to NATS (at most one way; none: the URL alone, which
/// may carry `user:password@`). The same flags for the engine and workers.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct NatsAuth {
    /// A NATS credentials file (JWT and NKey seed, as `nsc` writes it).
    #[arg(long = "nats-creds", env = "FLAME_NATS_CREDS", value_name = "FILE")]
    pub creds: Option<std::path::PathBuf>,
    /// A file holding an NKey seed (`SU...`).
    #[arg(long = "nats-nkey", env = "FLAME_NATS_NKEY", value_name = "FILE")]
    pub nkey: Option<std::path::PathBuf>,
    /// User name (with `--nats-password`).
    #[arg(long = "nats-user", env = "FLAME_NATS_USER", requires = "password")]
    pub user: Option<String>,
    /// Password (with `--nats-user`).
    #[arg(long = "nats-password", env = "FLAME_NATS_PASSWORD", requires = "user", hide_env_values = true)]
    pub password: Option<String>,
    /// Token.
    #[arg(long = "nats-token", env = "FLAME_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust for TLS; TLS is then required.
    #[arg(long = "nats-tls-ca", env = "FLAME_NATS_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Replicas of the streams, KV bucket and object store this process
    /// creates or updates (the engine): 3 on a NATS cluster of 3 or more
    /// servers, so that losing one loses nothing. Default 1.
    #[arg(long = "nats-replicas", env = "FLAME_NATS_REPLICAS", value_name = "N", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: Option<u8>,
    /// The JetStream domain of the hub, for a process connected to a leaf
    /// node that has no JetStream of its own (an edge site): its JetStream
    /// requests then travel to the hub as `$JS.<domain>.API`.
    #[arg(long = "nats-domain", env = "FLAME_NATS_DOMAIN", value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Seconds a worker stays listed after its last heartbeat, as the
    /// registry bucket this process creates or updates (the engine) keeps
    /// it. Default 6; on a NATS cluster 15, so that the registry outlives a
    /// stream leader election (up to about 9 s) and no worker is taken for
    /// lost while its server's successor is elected.
    #[arg(long = "worker-ttl", env = "FLAME_WORKER_TTL", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(3..=600))]
    pub worker_ttl: Option<u64>,
}

/// The servers of a URL list, `nats://a:4222,nats://b:4222` (a cluster's
/// members; the client also learns the others from the server it reaches).
fn servers(urls: &str) -> Result<Vec<async_nats::ServerAddr>, Error> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().map_err(|e| Error::Nats(format!("'{u}' is not a NATS server URL: {e}"))))
        .collect()
}

impl NatsAuth {
    /// The JetStream context of a client: the hub's domain when one is given.
    pub fn jetstream(&self, client: async_nats::Client) -> jetstream::Context {
        match &self.domain {
            Some(domain) => jetstream::with_domain(client, domain),
            None => jetstream::new(client),
        }
    }

    /// Replicas of what this process creates (1 unless `--nats-replicas`).
    pub fn replicas(&self) -> usize {
        usize::from(self.replicas.unwrap_or(1))
    }

    /// The connect options these settings give; a clear error for a missing
    /// or unreadable file, or for more than one way to authenticate.
    pub async fn options(&self) -> Result<async_nats::ConnectOptions, Error> {
        let ways = [self.creds.is_some(), self.nkey.is_some(), self.user.is_some(), self.token.is_some()];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(Error::Nats(
                "give one way to authenticate to NATS: --nats-creds, --nats-nkey, --nats-user/--nats-password or --nats-token".into(),
            ));
        }
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(path) = &self.creds {
            opts = async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| Error::Nats(format!("cannot read the NATS credentials file '{}': {e}", path.display())))?;
        }
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| Error::Nats(format!("cannot read the NKey seed file '{}': {e}", path.display())))?;
            let seed = seed
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("SU"))
                .ok_or_else(|| Error::Nats(format!("'{}' holds no user NKey seed (a line starting with SU)", path.display())))?;
            opts = opts.nkey(seed.to_string());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            if !ca.is_file() {
                return Err(Error::Nats(format!("the TLS CA file '{}' does not exist", ca.display())));
            }
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        // The server's complaints (a permission this identity lacks) in the log, where an operator looks.
        Ok(opts.event_callback(|event| async move {
            match event {
                async_nats::Event::ServerError(e) => tracing::warn!("NATS server: {e}"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::debug!("NATS: {other}"),
            }
        }))
    }
}

/// A client connected with `options` to the servers of `url`.
async fn client(url: &str, options: async_nats::ConnectOptions) -> Result<async_nats::Client, Error> {
    options.connect(servers(url)?).await.map_err(|e| Error::Nats(format!("cannot connect to NATS at '{url}': {e}")))
}

/// Runs `attempt` until it succeeds, fails for good (`transient` says no) or
/// `limit` has passed, backing off from 200 ms to 5 s: a NATS server
/// restarting, a leaf node's link cut, a stream electing its leader.
pub async fn retrying<T, E, F, Fut>(what: &str, limit: Duration, transient: impl Fn(&E) -> bool, attempt: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match attempt().await {
            Err(e) if transient(&e) && started.elapsed() + pause < limit => {
                tracing::warn!("{what}: {e}; trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            done => return done,
        }
    }
}

fn stream_config(name: &str, subject: &str) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        // One durable consumer per worker (commands) or per job (reports); NATS 2.15
        // otherwise caps a stream at 1,000 consumers.
        max_consumers: MAX_CONSUMERS,
        ..Default::default()
    }
}

fn bucket_config() -> kv::Config {
    kv::Config { bucket: WORKER_BUCKET.to_string(), history: 1, max_age: WORKER_TTL, ..Default::default() }
}

/// The distributed transport: JetStream streams for commands and reports, a KV
/// bucket with a TTL for worker liveness.
#[derive(Clone)]
pub struct Nats {
    js: jetstream::Context,
    workers: kv::Store,
    /// This process's mark in the registrations it writes (see [`Transport::claim_ids`]).
    instance: Arc<str>,
    replicas: usize,
    /// The object store, for commands too large for a message; opened on first use.
    blobs: Arc<tokio::sync::OnceCell<blob::NatsBlobs>>,
}

impl Nats {
    /// Connects and creates the streams and bucket it needs (idempotent).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, &NatsAuth::default()).await
    }

    /// Connects with credentials.
    pub async fn connect_with(url: &str, auth: &NatsAuth) -> Result<Self, Error> {
        let client = client(url, auth.options().await?).await?;
        let ttl = auth.worker_ttl.map_or(WORKER_TTL, Duration::from_secs);
        Self::create_in(auth.jetstream(client), auth.replicas(), ttl).await
    }

    /// Connects as worker `worker_id`: replies arrive under its own inbox
    /// prefix (the only subjects a per-worker identity may subscribe to, see
    /// [`identity`]), and it binds to the streams and bucket the engine made,
    /// creating them only when they are missing (a server without
    /// per-worker permissions, the worker started first).
    pub async fn connect_worker(url: &str, auth: &NatsAuth, worker_id: &str) -> Result<Self, Error> {
        check_id(worker_id)?;
        let client = client(url, auth.options().await?.custom_inbox_prefix(identity::inbox_prefix(worker_id))).await?;
        Self::bind_in(auth.jetstream(client)).await
    }

    /// Binds to the streams and bucket where they exist, creating only those that do not.
    async fn bind_in(js: jetstream::Context) -> Result<Self, Error> {
        let denied = |what: &str, e: &dyn std::fmt::Display| {
            Error::Nats(format!(
                "cannot open {what}: {e} (with per-worker NATS identities, check that this worker's id and key are in the server's auth.conf, `flame-engine worker add`, and that the server was reloaded)"
            ))
        };
        for (name, subject) in [(COMMAND_STREAM, "flame.cmd.>"), (REPORT_STREAM, "flame.report.>")] {
            // JetStream out of reach (a leaf node whose link to the hub is not up yet, a
            // cluster electing its leaders): waited for a while rather than given up on.
            let found = retrying(
                &format!("opening stream {name}"),
                JETSTREAM_WAIT,
                |e: &jetstream::context::GetStreamError| matches!(e.kind(), jetstream::context::GetStreamErrorKind::Request),
                || js.get_stream(name),
            )
            .await;
            match found {
                Ok(_) => {}
                Err(e)
                    if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    js.create_stream(stream_config(name, subject)).await.map_err(|e| denied(&format!("stream {name}"), &e))?;
                }
                Err(e) => return Err(denied(&format!("stream {name}"), &e)),
            }
        }
        let workers = match js.get_key_value(WORKER_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js.create_key_value(bucket_config()).await.map_err(|e| denied(&format!("KV bucket {WORKER_BUCKET}"), &e))?,
        };
        Ok(Self { js, workers, instance: new_instance(), replicas: 1, blobs: Arc::default() })
    }

    /// Uses an existing client; creates the streams and bucket, or updates
    /// them to this version's settings (the engine's way in).
    pub async fn new(client: async_nats::Client) -> Result<Self, Error> {
        Self::create_in(jetstream::new(client), 1, WORKER_TTL).await
    }

    async fn create_in(js: jetstream::Context, replicas: usize, worker_ttl: Duration) -> Result<Self, Error> {
        for (name, subject) in [(COMMAND_STREAM, "flame.cmd.>"), (REPORT_STREAM, "flame.report.>")] {
            js.create_or_update_stream(stream::Config { num_replicas: replicas, ..stream_config(name, subject) })
                .await
                .map_err(|e| Error::Nats(format!("cannot create stream {name} ({replicas} replica(s)): {e}")))?;
        }
        let workers = js
            .create_or_update_key_value(kv::Config { num_replicas: replicas, max_age: worker_ttl, ..bucket_config() })
            .await
            .map_err(|e| Error::Nats(format!("cannot create KV bucket {WORKER_BUCKET}: {e}")))?;
        Ok(Self { js, workers, instance: new_instance(), replicas, blobs: Arc::default() })
    }

    /// Replicas of what this connection created.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The JetStream context, for other users of the same connection.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    async fn publish<T: Serialize>(&self, subject: String, msg_id: &str, body: &T) -> Result<(), Error> {
        self.publish_bytes(subject, msg_id, None, serde_json::to_vec(body).map_err(nats)?).await
    }

    /// Publishes with its deduplication id and, for a command stored whole in the object store, its digest.
    async fn publish_bytes(&self, subject: String, msg_id: &str, blob: Option<&str>, payload: Vec<u8>) -> Result<(), Error> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        if let Some(d) = blob {
            headers.insert(COMMAND_BLOB_HEADER, d);
        }
        self.js.publish_with_headers(subject, headers, payload.into()).await.map_err(nats)?.await.map_err(nats)?;
        Ok(())
    }

    /// Publishes `items` (each its deduplication key and bytes) in order, in as few
    /// batches `{"v", "<field>": [...]}` on `subject` as stay under `limit` bytes.
    async fn publish_batches(
        &self,
        subject: String,
        group: &str,
        field: &str,
        items: Vec<(String, Vec<u8>)>,
        limit: usize,
    ) -> Result<(), Error> {
        let (keys, bytes): (Vec<String>, Vec<Vec<u8>>) = items.into_iter().unzip();
        let mut keys = keys.into_iter();
        for run in runs_under(bytes, limit) {
            let id = batch_id(group, keys.by_ref().take(run.len()));
            self.publish_bytes(subject.clone(), &id, None, batch_bytes(field, &run)).await?;
        }
        Ok(())
    }

    /// The object store, opened on first use (commands too large for a message).
    async fn blobs(&self) -> Result<&blob::NatsBlobs, Error> {
        self.blobs
            .get_or_try_init(|| blob::NatsBlobs::new(&self.js))
            .await
            .map_err(|e| Error::Nats(format!("opening the object store: {e}")))
    }

    /// A command as the worker runs it: as it arrived, or read whole from
    /// the object store. A stored command that cannot be read stays
    /// unacknowledged (it comes again); one that does not hash to its digest
    /// or does not decode is answered `failed` like any unreadable command.
    async fn resolve<U>(self, d: Result<Delivery<Arrived>, Error>, wrap: impl FnOnce(Command) -> U) -> Result<Delivery<U>, Error> {
        let Delivery { message, ack, progress } = d?;
        let (mut head, digest) = match message {
            Arrived::Inline(c) => return Ok(Delivery { message: wrap(c), ack, progress }),
            Arrived::Stored { head, digest } => (head, digest),
        };
        let bytes = self
            .blobs()
            .await?
            .get(&digest)
            .await
            .map_err(|e| Error::Nats(format!("reading command {} from the object store: {e}", head.id)))?;
        let command = if blob::digest(&bytes) != digest {
            head.body = CommandBody::Unreadable { reason: format!("the stored command does not hash to its digest {digest}") };
            head
        } else {
            match Command::decode(&bytes) {
                Ok(c) if c.id == head.id => c,
                Ok(c) => {
                    head.body = CommandBody::Unreadable { reason: format!("the stored command is '{}', not '{}'", c.id, head.id) };
                    head
                }
                Err(e) => {
                    head.body = CommandBody::Unreadable { reason: format!("the stored command does not decode: {e}") };
                    head
                }
            }
        };
        Ok(Delivery { message: wrap(command), ack, progress })
    }

    async fn inbox<T: Send + 'static>(
        &self,
        stream_name: &str,
        durable: String,
        subjects: Vec<String>,
        ack_wait: Duration,
        decode: Decode<T>,
    ) -> Result<Inbox<T>, Error> {
        let stream = self.js.get_stream(stream_name).await.map_err(nats)?;
        let consumer = stream
            // Created, or updated to this config (a consumer made by an older version had other filters).
            .create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                // One filter goes in the API subject, where per-worker permissions check it.
                filter_subject: if subjects.len() == 1 { subjects[0].clone() } else { String::new() },
                filter_subjects: if subjects.len() == 1 { Vec::new() } else { subjects },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let first = pulls(&consumer).await?;
        let consumer = renewed(
            move || {
                let consumer = consumer.clone();
                async move { pulls(&consumer).await }
            },
            first,
        );
        Ok(consumer
            .map(move |m| {
                let m = m?;
                let subject = m.subject.to_string();
                let stored = m.headers.as_ref().and_then(|h| h.get(COMMAND_BLOB_HEADER)).map(|v| v.as_str().to_string());
                match decode(&subject, &m.payload, stored.as_deref()) {
                    Ok(message) => {
                        let working = m.clone();
                        let progress: Progress = std::sync::Arc::new(move || {
                            let m = working.clone();
                            async move { m.ack_with(jetstream::AckKind::Progress).await.map_err(nats) }.boxed()
                        });
                        Ok(Delivery { message, ack: Some(async move { m.ack().await.map_err(nats) }.boxed()), progress: Some(progress) })
                    }
                    Err(e) => {
                        // Never redeliver what can never decode.
                        let reason = e.to_string();
                        tokio::spawn(async move {
                            let _ = m.ack_with(jetstream::AckKind::Term).await;
                        });
                        Err(Error::BadMessage { subject, reason })
                    }
                }
            })
            .boxed())
    }
}

/// A consumer's messages, pulled in short requests with frequent idle
/// heartbeats.
async fn pulls(consumer: &jetstream::consumer::PullConsumer) -> Result<pull::Stream, Error> {
    consumer.stream().expires(PULL_EXPIRES).heartbeat(PULL_HEARTBEAT).messages().await.map_err(nats)
}

/// A consumer's messages, the pull renewed when its heartbeats stop: a pull
/// lost with its server (a cluster member dying, a leaf node's link cut) is
/// noticed after two missed heartbeats and made again (`pull`), instead of
/// waiting for it to expire. The missed heartbeat is still told (as an error)
/// to the reader. A message the lost pull had taken stays unacknowledged on
/// the server and is delivered again after its ack wait: nothing is lost.
fn renewed<T, S, F, Fut>(pull: F, first: S) -> BoxStream<'static, Result<T, Error>>
where
    T: Send + 'static,
    S: futures::Stream<Item = Result<T, pull::MessagesError>> + Unpin + Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<S, Error>> + Send,
{
    futures::stream::unfold((pull, Some(first)), |(pull, current)| async move {
        let mut current = match current {
            Some(current) => current,
            None => match pull().await {
                Ok(current) => current,
                Err(e) => {
                    // Not reachable now: told, then tried again a heartbeat later.
                    tokio::time::sleep(PULL_HEARTBEAT).await;
                    return Some((Err(e), (pull, None)));
                }
            },
        };
        match current.next().await {
            None => None,
            Some(Err(e)) if e.kind() == pull::MessagesErrorKind::MissingHeartbeat => Some((Err(nats(e)), (pull, None))),
            Some(item) => Some((item.map_err(nats), (pull, Some(current)))),
        }
    })
    .boxed()
}

/// A process's mark in its registrations: random, new at each start.
fn new_instance() -> Arc<str> {
    let mut bytes = [0u8; 8];
    // Without the system's randomness, the time and pid tell processes apart well enough.
    if getrandom::fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        bytes = (now ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    hex::encode(bytes).into()
}

/// A worker's registration as written to the bucket: its info and the
/// process that wrote it (readers that know only [`WorkerInfo`] skip it).
#[derive(serde::Serialize)]
struct Registration<'a> {
    #[serde(flatten)]
    info: &'a WorkerInfo,
    instance: &'a str,
}

/// Which process wrote a registration (none: one that does not say, e.g. the Python SDK's).
#[derive(serde::Deserialize)]
struct Writer {
    #[serde(default)]
    instance: Option<String>,
}

impl Nats {
    /// The registration of `id` as it stands, if another process wrote it:
    /// its revision and that process's mark.
    async fn written_by_another(&self, id: &str) -> Option<(u64, Option<String>)> {
        // Bounded: a read refused by an older auth.conf goes unanswered until the request's timeout.
        let Ok(read) = tokio::time::timeout(Duration::from_secs(2), self.workers.entry(id)).await else {
            tracing::debug!(worker = id, "no answer reading its registration to check it is free");
            return None;
        };
        match read {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                let writer = serde_json::from_slice::<Writer>(&e.value).ok()?.instance;
                (writer.as_deref() != Some(&*self.instance)).then_some((e.revision, writer))
            }
            Ok(_) => None,
            // Not readable (a per-worker identity from before this check): the check is skipped.
            Err(e) => {
                tracing::debug!(worker = id, "cannot read its registration to check it is free: {e}");
                None
            }
        }
    }
}

#[async_trait]
impl Transport for Nats {
    async fn register(&self, info: &WorkerInfo) -> Result<(), Error> {
        check_id(&info.id)?;
        let value = serde_json::to_vec(&Registration { info, instance: &self.instance }).map_err(nats)?;
        self.workers.put(&info.id, value.into()).await.map_err(nats)?;
        Ok(())
    }

    /// A registration of one of `ids` by another process that is still
    /// listed may be a live process's or a dead one's (a worker killed and
    /// started again). A live one renews it within [`RENEWAL_WAIT`]: the ids
    /// are then refused. A dead one does not, and its ids are taken over.
    async fn claim_ids(&self, ids: &[String]) -> Result<(), Error> {
        let written = |ids: Vec<String>| async move {
            futures::stream::iter(ids)
                .map(|id| async move { self.written_by_another(&id).await.map(|w| (id, w)) })
                .buffer_unordered(64)
                .filter_map(std::future::ready)
                .collect::<HashMap<String, (u64, Option<String>)>>()
                .await
        };
        let before = written(ids.to_vec()).await;
        if before.is_empty() {
            return Ok(());
        }
        tracing::info!(
            ids = before.len(),
            "another process registered some of these worker ids lately; waiting {} s to see whether it is alive",
            RENEWAL_WAIT.as_secs()
        );
        tokio::time::sleep(RENEWAL_WAIT).await;
        let after = written(before.keys().cloned().collect()).await;
        // Renewed by the same process since the first read: it is alive.
        let renewed =
            after.iter().filter(|(id, (rev, writer))| before.get(*id).is_some_and(|(r, w)| rev > r && w == writer)).map(|(id, _)| id).min();
        match renewed {
            Some(id) => Err(Error::Taken { id: id.clone() }),
            None => Ok(()),
        }
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, Error> {
        let keys: Vec<String> = self.workers.keys().await.map_err(nats)?.try_collect().await.map_err(nats)?;
        // Fetched concurrently: a registry of a thousand workers is read in a few round trips' time.
        let values: Vec<_> =
            futures::stream::iter(keys).map(|k| async move { self.workers.get(&k).await }).buffer_unordered(64).collect().await;
        let mut out = Vec::new();
        for value in values {
            if let Some(value) = value.map_err(nats)?
                && let Ok(info) = serde_json::from_slice::<WorkerInfo>(&value)
            {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn connects(&self) -> u64 {
        self.js.client().statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn heartbeat_ages(&self) -> Result<Vec<(String, f64)>, Error> {
        let keys: Vec<String> = self.workers.keys().await.map_err(nats)?.try_collect().await.map_err(nats)?;
        let entries: Vec<_> =
            futures::stream::iter(keys).map(|k| async move { self.workers.entry(&k).await }).buffer_unordered(64).collect().await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        let mut out = Vec::new();
        for entry in entries {
            // The entry's time is its last write: the worker's last heartbeat.
            if let Some(e) = entry.map_err(nats)?.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put) {
                out.push((e.key.clone(), (now - e.created.unix_timestamp_nanos()).max(0) as f64 / 1e9));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn send_command(&self, worker_id: &str, command: &Command) -> Result<(), Error> {
        check_id(worker_id)?;
        let subject = format!("flame.cmd.{worker_id}");
        let msg_id = format!("{worker_id}:{}", command.id);
        let payload = serde_json::to_vec(command).map_err(nats)?;
        let limit = self.js.client().server_info().max_payload.saturating_sub(COMMAND_HEADROOM);
        if payload.len() <= limit {
            return self.publish_bytes(subject, &msg_id, None, payload).await;
        }
        // Too large for one message (an aggregate of thousands of updates lists each): the
        // command goes into the object store, and the message carries its digest in a header,
        // with the command's head and a body no worker runs (a worker that predates this
        // answers `failed`, saying the kind is unknown, rather than waiting).
        let digest = self.blobs().await?.put(payload).await.map_err(|e| Error::Nats(format!("storing a large command: {e}")))?;
        let head = serde_json::json!({
            "v": command.v,
            "id": command.id,
            "job_id": command.job_id,
            "task_id": command.task_id,
            "round": command.round,
            "body": {"kind": "in_object_store", "digest": digest},
        });
        self.publish_bytes(subject, &msg_id, Some(&digest), serde_json::to_vec(&head).map_err(nats)?).await
    }

    async fn command_inbox(&self, worker_id: &str) -> Result<Inbox<Command>, Error> {
        check_id(worker_id)?;
        // A command is acked after it ran and its report was sent; while it runs, the worker says so
        // every COMMAND_PROGRESS. A worker that dies with commands in flight gets them again (restarted
        // under the same id) within COMMAND_ACK_WAIT; a redelivery meanwhile is answered from its memory.
        let inbox = self
            .inbox(
                COMMAND_STREAM,
                format!("worker-{worker_id}"),
                vec![format!("flame.cmd.{worker_id}")],
                COMMAND_ACK_WAIT,
                |_, b, stored| Arrived::decode(b, stored),
            )
            .await?;
        let this = self.clone();
        Ok(inbox.then(move |d| this.clone().resolve(d, |c| c)).boxed())
    }

    async fn send_commands(&self, group: &str, commands: &[(String, Command)]) -> Result<(), Error> {
        check_id(group)?;
        let limit = self.js.client().server_info().max_payload.saturating_sub(COMMAND_HEADROOM);
        let mut items = Vec::with_capacity(commands.len());
        for (worker_id, command) in commands {
            check_id(worker_id)?;
            let item = serde_json::to_vec(&serde_json::json!({"worker_id": worker_id, "command": command})).map_err(nats)?;
            if item.len() > limit {
                // Too large for any message: on its own, through the object store.
                self.send_command(worker_id, command).await?;
            } else {
                items.push((format!("{worker_id}:{}", command.id), item));
            }
        }
        self.publish_batches(group_command_subject(group), group, "commands", items, limit).await
    }

    async fn group_inbox(&self, group: &str, worker_ids: &[String]) -> Result<Inbox<(String, Command)>, Error> {
        check_id(group)?;
        for id in worker_ids {
            check_id(id)?;
        }
        // One durable consumer filtered on every member's subject and the group's own: the server
        // keeps one consumer (pulls, heartbeats, pending acks) for the group, not one per worker.
        let mut subjects: Vec<String> = worker_ids.iter().map(|id| format!("flame.cmd.{id}")).collect();
        subjects.push(group_command_subject(group));
        let inbox = self
            .inbox(COMMAND_STREAM, format!("group-{group}"), subjects, COMMAND_ACK_WAIT, |subject, b, stored| {
                if subject.starts_with("flame.cmd.group.") {
                    let batch: WireBatch = serde_json::from_slice(b)?;
                    let mut out = Vec::with_capacity(batch.commands.len());
                    for a in batch.commands {
                        // One command whose head does not read is dropped, not the batch (nothing to answer).
                        match serde_json::to_vec(&a.command).and_then(|bytes| Command::decode(&bytes)) {
                            Ok(c) => out.push((a.worker_id, c)),
                            Err(e) => {
                                tracing::warn!(subject, worker = %a.worker_id, "dropping a command of a batch that does not read: {e}")
                            }
                        }
                    }
                    return Ok(GroupArrived::Batch(out));
                }
                let id = subject.strip_prefix("flame.cmd.").unwrap_or(subject).to_string();
                Ok(GroupArrived::One(id, Box::new(Arrived::decode(b, stored)?)))
            })
            .await?;
        let this = self.clone();
        Ok(inbox
            .then(move |d| {
                let this = this.clone();
                async move {
                    let Delivery { message, ack, progress } = d?;
                    match message {
                        GroupArrived::Batch(commands) => Ok(split_delivery(Delivery { message: commands, ack, progress })),
                        GroupArrived::One(id, arrived) => {
                            Ok(vec![this.resolve(Ok(Delivery { message: *arrived, ack, progress }), |c| (id, c)).await?])
                        }
                    }
                }
            })
            .flat_map(one_each)
            .boxed())
    }

    async fn send_report(&self, report: &Report) -> Result<(), Error> {
        check_id(&report.job_id)?;
        check_id(&report.worker_id)?;
        let msg_id = format!("{}:{}", report.worker_id, report.command_id);
        // On the worker's own subject: with per-worker permissions, the subject says who published it.
        self.publish(format!("flame.report.{}.{}", report.job_id, report.worker_id), &msg_id, report).await
    }

    async fn send_reports(&self, group: &str, reports: &[Report]) -> Result<(), Error> {
        check_id(group)?;
        let limit = self.js.client().server_info().max_payload.saturating_sub(COMMAND_HEADROOM);
        // One subject per job: the engine of each job reads its own.
        let mut by_job: BTreeMap<&str, Vec<&Report>> = BTreeMap::new();
        for r in reports {
            check_id(&r.job_id)?;
            check_id(&r.worker_id)?;
            by_job.entry(r.job_id.as_str()).or_default().push(r);
        }
        for (job_id, reports) in by_job {
            let items = reports
                .iter()
                .map(|r| Ok((format!("{}:{}", r.worker_id, r.command_id), serde_json::to_vec(r).map_err(nats)?)))
                .collect::<Result<Vec<_>, Error>>()?;
            self.publish_batches(format!("flame.report.{job_id}.{group}"), group, "reports", items, limit).await?;
        }
        Ok(())
    }

    async fn report_inbox(&self, job_id: &str) -> Result<Inbox<Report>, Error> {
        check_id(job_id)?;
        // Short: reports an engine took but did not ack before it died reach its successor quickly;
        // a report applied twice is refused by the job (and recorded), never counted twice.
        // The job's reports on their workers' subjects, and on the bare job subject of older workers.
        let subjects = vec![format!("flame.report.{job_id}"), format!("flame.report.{job_id}.*")];
        let inbox = self
            .inbox(REPORT_STREAM, format!("engine-{job_id}"), subjects, REPORT_ACK_WAIT, |subject, b, _| {
                // The subject names who published it: the worker, or the group that speaks for it.
                let via = subject.split('.').nth(3).map(str::to_string);
                let mut reports = match serde_json::from_slice::<WireReports>(b) {
                    // Each report on its own: one that does not read is dropped, not the batch.
                    Ok(batch) => batch
                        .reports
                        .into_iter()
                        .filter_map(|r| {
                            serde_json::from_value::<Report>(r)
                                .inspect_err(|e| tracing::warn!(subject, "dropping a report of a batch that does not read: {e}"))
                                .ok()
                        })
                        .collect(),
                    Err(_) => vec![serde_json::from_slice::<Report>(b)?],
                };
                for r in &mut reports {
                    r.via.clone_from(&via);
                }
                Ok(reports)
            })
            .await?;
        Ok(inbox.flat_map(|r| one_each(r.map(split_delivery))).boxed())
    }

    async fn forget_job(&self, job_id: &str) -> Result<(), Error> {
        check_id(job_id)?;
        let stream = self.js.get_stream(REPORT_STREAM).await.map_err(nats)?;
        match stream.delete_consumer(&format!("engine-{job_id}")).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(nats(e)),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM: the graceful-shutdown trigger of every binary.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A pull whose heartbeats stopped is dropped and made again: what the
    /// dropped pull would still give is not read, the new pull's messages
    /// are; other errors pass through on the same pull; a pull that cannot
    /// be made is told and tried again.
    #[tokio::test(start_paused = true)]
    async fn a_pull_whose_heartbeats_stopped_is_made_again() {
        use pull::{MessagesError, MessagesErrorKind};
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let pull = move || {
            let n = m.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err(Error::Nats("no responders".into())),
                    _ => Ok(futures::stream::iter(vec![Ok(10u32), Err(MessagesError::new(MessagesErrorKind::Pull)), Ok(11)])),
                }
            }
        };
        let first = futures::stream::iter(vec![Ok(1u32), Err(MessagesError::new(MessagesErrorKind::MissingHeartbeat)), Ok(2)]);
        let got: Vec<String> = renewed(pull, first).map(|r| r.map_or_else(|e| format!("error: {e}"), |v| v.to_string())).collect().await;
        assert_eq!(got.len(), 6, "{got:?}");
        assert_eq!((got[0].as_str(), got[3].as_str(), got[5].as_str()), ("1", "10", "11"), "{got:?}");
        assert!(got[1].contains("missed idle heartbeat") && got[2].contains("no responders") && got[4].starts_with("error"), "{got:?}");
        assert_eq!(made.load(Ordering::SeqCst), 2, "made again after the missed heartbeats, and again after it could not be");
    }

    fn counted(parts: Vec<u32>, acks: &Arc<AtomicUsize>) -> Delivery<Vec<u32>> {
        let acks = acks.clone();
        Delivery {
            message: parts,
            ack: Some(
                async move {
                    acks.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
                .boxed(),
            ),
            progress: None,
        }
    }

    #[tokio::test]
    async fn a_batch_is_acknowledged_once_when_its_last_part_is() {
        let acks = Arc::new(AtomicUsize::new(0));
        let mut parts = split_delivery(counted(vec![1, 2, 3], &acks));
        assert_eq!(parts.iter().map(|d| d.message).collect::<Vec<_>>(), vec![1, 2, 3]);
        let last = parts.pop().expect("three parts");
        for d in parts {
            d.ack().await.expect("ack");
        }
        assert_eq!(acks.load(Ordering::SeqCst), 0, "two of three parts handled: the batch stays unacknowledged");
        last.ack().await.expect("ack");
        assert_eq!(acks.load(Ordering::SeqCst), 1);
        // A part left unacknowledged (its worker failed) leaves the batch to come again.
        let acks = Arc::new(AtomicUsize::new(0));
        let mut parts = split_delivery(counted(vec![1, 2], &acks));
        parts.pop();
        for d in parts {
            d.ack().await.expect("ack");
        }
        assert_eq!(acks.load(Ordering::SeqCst), 0);
        // One part: its own ack; none: acknowledged at once.
        let acks = Arc::new(AtomicUsize::new(0));
        split_delivery(counted(vec![7], &acks)).pop().expect("one").ack().await.expect("ack");
        assert_eq!(acks.load(Ordering::SeqCst), 1);
        assert!(split_delivery(counted(vec![], &acks)).is_empty());
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(acks.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn batches_keep_their_order_and_stay_under_the_limit() {
        let items: Vec<Vec<u8>> = (0..10u8).map(|i| vec![b'0' + i; 1 + i as usize]).collect();
        let runs = runs_under(items.clone(), 12);
        assert!(runs.iter().all(|r| batch_bytes("x", r).len() - batch_bytes("x", &[]).len() <= 12 || r.len() == 1));
        assert_eq!(runs.concat(), items);
        let whole = batch_bytes("reports", &[b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        let v: serde_json::Value = serde_json::from_slice(&whole).expect("json");
        assert_eq!(v["reports"][1]["b"], 2);
        assert_eq!(v["v"], flame_events::protocol::VERSION);
        // Different contents, different deduplication ids; the same, the same.
        let id = |ks: &[&str]| batch_id("g", ks.iter().map(|k| k.to_string()));
        assert_eq!(id(&["w1:c1", "w2:c1"]), id(&["w1:c1", "w2:c1"]));
        assert_ne!(id(&["w1:c1", "w2:c1"]), id(&["w1:c1", "w2:c2"]));
    }
}
