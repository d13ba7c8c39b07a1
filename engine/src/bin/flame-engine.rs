//! `flame-engine`: the engine service. `serve` resumes every active job from
//! the event log and serves the management API; `run` runs one job folder to
//! its end; `token add` makes an API token; `worker add` issues a worker's
//! NATS identity.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use flame_engine::api::{Api, Tokens};
use flame_engine::mlflow::export::Exporter;
use flame_engine::otlp::TraceExporter;
use flame_engine::{JobDefinition, Runner, runner};
use flame_events::store::EventStore;
use flame_projections::store::MongoViews;
use flame_stores::mongo::{DEFAULT_DB, MongoStore};
use flame_transport::Nats;
use flame_transport::lease::Leases;
use flame_transport::relay::Relay;

/// The Flame engine: events in MongoDB, commands and reports over NATS.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct Connect {
    /// MongoDB URL (a replica set, for transactions).
    #[arg(long, env = "FLAME_MONGO")]
    mongo: String,
    /// MongoDB database name, when the URL names none.
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// NATS server URL.
    #[arg(long, env = "FLAME_NATS")]
    nats: String,
    #[command(flatten)]
    auth: flame_transport::NatsAuth,
    /// Serve workers that speak only MQTT, through the NATS server's MQTT
    /// listener (topics `flame/mqtt/...`, see docs/protocol.md).
    #[arg(long)]
    mqtt_devices: bool,
    /// This engine's name among replicas (engines sharing one MongoDB and
    /// one NATS). Each job is driven by the replica holding its lease; events
    /// the engine records name it as `engine:<id>`. Default: a name made of
    /// the host and process id, and events say just `engine`.
    #[arg(long, env = "FLAME_REPLICA_ID")]
    replica_id: Option<String>,
    /// Seconds a replica's leases outlive its last renewal: how soon
    /// another replica takes over the jobs of one that died.
    #[arg(long, default_value_t = 3)]
    lease_ttl: u64,
    #[command(flatten)]
    runner: runner::Settings,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Resume active jobs, keep the job views (read models) up to date and serve the management API until SIGTERM.
    Serve {
        #[command(flatten)]
        connect: Connect,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Tokens file (`flame-engine token add` writes it).
        #[arg(long, env = "FLAME_TOKENS")]
        tokens: PathBuf,
        /// Log every job to this MLflow tracking server (http://HOST:PORT):
        /// a run with its params and each round's metrics, and the final
        /// model as an artifact and a registered model version. One replica
        /// at a time follows the event log from its checkpoint, so an MLflow
        /// outage delays the runs and loses nothing.
        #[arg(long, env = "FLAME_MLFLOW")]
        mlflow: Option<String>,
        /// Export every job's trace (job -> setup and rounds -> steps ->
        /// tasks, the ids `flamectl trace` shows) to this OTLP/HTTP receiver
        /// (http://HOST:4318), each part once it is final. One replica at a
        /// time follows the event log from its checkpoint.
        #[arg(long, env = "FLAME_OTLP")]
        otlp: Option<String>,
    },
    /// Submit a job folder (or workflow file), start it and run it to its end.
    Run {
        #[command(flatten)]
        connect: Connect,
        /// Job folder in Flame's layout, or a single-file workflow.
        #[arg(long)]
        job: PathBuf,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Issue and withdraw workers' NATS identities (NKey users with
    /// per-worker permissions, rendered into a nats-server `auth.conf`).
    Worker {
        #[command(subcommand)]
        command: WorkerCommand,
    },
    /// Print the management API's OpenAPI document.
    Openapi,
}

#[derive(Subcommand, Debug)]
enum WorkerCommand {
    /// Issue worker ID an identity: a new NKey (its seed written for the
    /// site) or the public key the site made; `auth.conf` is rendered again.
    Add {
        /// The identities folder (keys and the rendered `auth.conf`).
        #[arg(long, env = "FLAME_NATS_AUTH_DIR")]
        auth_dir: PathBuf,
        /// The worker's id, as its `flame-worker --id` says.
        #[arg(long)]
        id: String,
        /// The site's own user public key (`U...`, e.g. from `nk -gen user
        /// -pubout`): its seed then never leaves the site.
        #[arg(long, conflicts_with = "mqtt")]
        public_key: Option<String>,
        /// A device that speaks only MQTT: a user name (its id) and a new
        /// password, allowed its own `flame/mqtt/.../<id>` topics only.
        #[arg(long)]
        mqtt: bool,
    },
    /// Withdraw worker ID's identity; `auth.conf` is rendered again.
    Remove {
        /// The identities folder.
        #[arg(long, env = "FLAME_NATS_AUTH_DIR")]
        auth_dir: PathBuf,
        /// The worker's id.
        #[arg(long)]
        id: String,
    },
    /// List the workers that have identities.
    List {
        /// The identities folder.
        #[arg(long, env = "FLAME_NATS_AUTH_DIR")]
        auth_dir: PathBuf,
    },
}

fn worker_identities(command: WorkerCommand) -> anyhow::Result<()> {
    use flame_transport::identity::Identities;
    let reload = "reload the NATS server to apply it: nats-server --signal reload (or SIGHUP)";
    match command {
        WorkerCommand::Add { auth_dir, id, mqtt: true, .. } => {
            let added = Identities::new(&auth_dir).add_device(&id)?;
            println!("MQTT device {id}: user {id}");
            println!(
                "  its password: {} (give it to the site, secretly; the device connects to the MQTT listener with client id, user name {id} and that password)",
                added.password_file.display()
            );
            println!("  the engine's seed: {} (flame-engine --mqtt-devices: --nats-nkey)", added.engine_seed.display());
            println!("  server permissions: {} (include it in nats-server.conf)", added.config.display());
            println!("  {reload}");
        }
        WorkerCommand::Add { auth_dir, id, public_key, .. } => {
            let added = Identities::new(&auth_dir).add(&id, public_key.as_deref())?;
            println!("worker {id}: NATS user {}", added.public_key);
            match &added.seed_file {
                Some(seed) => println!(
                    "  its seed: {} (give it to the site, secretly; start the worker with --id {id} --nats-nkey <that file>)",
                    seed.display()
                ),
                None => println!("  the site keeps its seed; start the worker with --id {id} --nats-nkey <its seed file>"),
            }
            println!("  the engine's seed: {} (flame-engine and flamectl run --nats: --nats-nkey)", added.engine_seed.display());
            println!("  server permissions: {} (include it in nats-server.conf)", added.config.display());
            println!("  {reload}");
        }
        WorkerCommand::Remove { auth_dir, id } => {
            let config = Identities::new(&auth_dir).remove(&id)?;
            println!("worker {id}: identity withdrawn from {}; {reload}", config.display());
        }
        WorkerCommand::List { auth_dir } => {
            let ids = Identities::new(&auth_dir);
            for (id, key) in ids.workers()? {
                println!("{id}\t{key}");
            }
            for (id, _) in ids.devices()? {
                println!("{id}\tMQTT user {id}");
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Add a token for a user to the tokens file and print it (it is stored hashed and shown only now).
    Add {
        /// Tokens file.
        #[arg(long, env = "FLAME_TOKENS")]
        tokens: PathBuf,
        /// User name, recorded as the actor of what the token does.
        #[arg(long)]
        user: String,
        /// What it may do: `read` (look), `operator` (also create, update,
        /// start and stop), `admin` (also remove).
        #[arg(long, value_enum, default_value = "operator")]
        scope: flame_engine::api::Scope,
        /// How long it is valid, e.g. `90d`, `12h`, `30m` (default: until
        /// its line is removed from the tokens file).
        #[arg(long, value_parser = lifetime)]
        expires_in: Option<Duration>,
    },
}

/// A lifetime such as `90d`, `12h`, `30m` or `45s`.
fn lifetime(text: &str) -> Result<Duration, String> {
    let (n, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = n.parse().map_err(|_| format!("'{text}' is not a lifetime: a number and a unit, e.g. 90d, 12h, 30m"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{text}': the unit is s, m, h or d (90d, 12h, 30m)")),
    };
    if n == 0 {
        return Err("a token that expires at once is no token".into());
    }
    Ok(Duration::from_secs(n * seconds))
}

struct Engine {
    store: Arc<MongoStore>,
    runner: Runner,
    leases: Leases,
    /// Ends the work done under leases (the relay, the views).
    stop: tokio::sync::watch::Sender<bool>,
    relay: tokio::task::JoinHandle<()>,
    /// The model blobs (NATS object store).
    blobs: Arc<dyn flame_transport::blob::BlobStore>,
}

/// Keeps the job views in the database up to date until `stop` turns true; a
/// failure (the database away) is logged and retried from the last commit.
async fn project(store: Arc<MongoStore>, views: Arc<MongoViews>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(500);
    while !*stop.borrow() {
        let stopped = {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        };
        let result = match flame_projections::ViewWriter::open(store.as_ref(), views.as_ref(), 1000).await {
            Ok(mut runner) => runner.follow(stopped).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("job projection: {e}; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Follows the log with a projection made by `make` while this replica holds
/// the lease `name`, until the engine stops.
fn under_lease<P, F>(engine: &Engine, name: &'static str, make: F) -> tokio::task::JoinHandle<()>
where
    P: flame_engine::follow::JobProjection + 'static,
    F: Fn() -> P + Send + Sync + 'static,
{
    let (leases, stopped) = (engine.leases.clone(), engine.stop.subscribe());
    tokio::spawn(async move {
        leases
            .serve(name, stopped, |mut end| {
                let mut projection = make();
                async move {
                    flame_engine::follow::follow(&mut projection, async move {
                        let _ = end.wait_for(|e| *e).await;
                    })
                    .await;
                }
            })
            .await;
    })
}

/// The name this process holds leases under.
fn replica_name(c: &Connect) -> String {
    c.replica_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("engine-{}-{}", if host.is_empty() { "host" } else { &host }, std::process::id())
    })
}

async fn connect(c: &Connect) -> anyhow::Result<Engine> {
    let store = Arc::new(MongoStore::connect(&c.mongo, &c.db).await?);
    let transport = Nats::connect_with(&c.nats, &c.auth).await?;
    let leases =
        Leases::open(transport.jetstream(), &replica_name(c), Duration::from_secs(c.lease_ttl.max(1)), transport.replicas()).await?;
    // One replica at a time relays the log to JetStream (a second would only publish duplicates, which JetStream drops).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let relay = {
        let (leases, store, js, replicas) = (leases.clone(), store.clone(), transport.jetstream().clone(), transport.replicas());
        tokio::spawn(async move {
            leases
                .serve("relay", stopped, |mut end| {
                    let (store, js) = (store.clone() as Arc<dyn EventStore>, js.clone());
                    async move {
                        let ended = async move {
                            let _ = end.wait_for(|e| *e).await;
                        };
                        let result = match Relay::with_replicas(store, js, flame_engine::api::RELAY, replicas).await {
                            Ok(relay) => relay.run(Duration::from_millis(100), ended).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = result {
                            tracing::error!("event relay: {e}");
                        }
                    }
                })
                .await;
        })
    };
    // Model files that definitions bring (TorchScript modules) go to the object store the workers read.
    let blobs: Arc<dyn flame_transport::blob::BlobStore> = Arc::new(
        flame_transport::blob::NatsBlobs::with_replicas(transport.jetstream(), transport.replicas())
            .await
            .context("opening the model blob store")?,
    );
    if c.mqtt_devices {
        // Until the process ends: MQTT workers are served as long as the engine runs.
        tokio::spawn(flame_transport::mqtt::MqttAdapter::new(transport.clone(), blobs.clone()).run(std::future::pending()));
    }
    let mut runner = Runner::new(store.clone(), Arc::new(transport), c.runner.options()).with_blobs(blobs.clone());
    if let Some(id) = &c.replica_id {
        runner = runner.with_actor(flame_events::Actor::Replica(id.clone()));
    }
    Ok(Engine { store, runner, leases, stop, relay, blobs })
}

impl Engine {
    async fn close(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.relay.await.context("event relay task")?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log written to a file reads (and greps) as plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Args::parse().command {
        Command::Token { command: TokenCommand::Add { tokens, user, scope, expires_in } } => {
            println!("{}", Tokens::add(&tokens, &user, scope, expires_in)?);
            Ok(())
        }
        Command::Worker { command } => worker_identities(command),
        Command::Openapi => {
            println!("{}", flame_engine::api::openapi_json());
            Ok(())
        }
        Command::Serve { connect: c, listen, tokens, mlflow, otlp } => {
            let tokens = Tokens::load(&tokens)?;
            let engine = connect(&c).await?;
            let api =
                Api::new(engine.runner.clone(), engine.store.clone() as Arc<dyn EventStore>, tokens).with_leases(engine.leases.clone());
            let resumed = api.resume().await?;
            // One replica at a time writes the job views; every replica reads them.
            let views = Arc::new(MongoViews::connect(&c.mongo, &c.db).await?);
            let projection = {
                let (leases, store, stopped) = (engine.leases.clone(), engine.store.clone(), engine.stop.subscribe());
                tokio::spawn(async move { leases.serve("views", stopped, |end| project(store.clone(), views.clone(), end)).await })
            };
            // One replica at a time keeps MLflow, and the trace receiver, in step with the log.
            let mlflow = mlflow.map(|url| {
                let (store, blobs) = (engine.store.clone() as Arc<dyn EventStore>, engine.blobs.clone());
                under_lease(&engine, "mlflow", move || Exporter::new(store.clone(), blobs.clone(), &url))
            });
            let traces = otlp.map(|url| {
                let store = engine.store.clone() as Arc<dyn EventStore>;
                under_lease(&engine, "otlp", move || TraceExporter::new(store.clone(), &url))
            });
            let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!(
                "flame-engine: API on http://{}, {} job(s) resumed, events in {}",
                listener.local_addr()?,
                resumed.len(),
                engine.store.location()
            );
            axum::serve(listener, api.router_with(flame_engine::ui::routes()))
                .with_graceful_shutdown(flame_transport::shutdown_signal())
                .await?;
            let _ = engine.stop.send(true);
            projection.await.context("job projection task")?;
            if let Some(task) = mlflow {
                task.await.context("MLflow projection task")?;
            }
            if let Some(task) = traces {
                task.await.context("trace export task")?;
            }
            engine.close().await
        }
        Command::Run { connect: c, job } => {
            let def = JobDefinition::load(&job)?;
            let engine = connect(&c).await?;
            let cli = flame_events::Actor::user("cli");
            let job_id = engine.runner.submit(&def, &cli).await?;
            engine.runner.start(&job_id, &cli).await?;
            eprintln!("job {job_id} submitted from {}", job.display());
            let result = engine.runner.run_resuming(&job_id).await;
            engine.close().await?;
            let job = result?;
            let summary = serde_json::json!({
                "job_id": job_id,
                "state": job.status,
                "rounds_completed": job.rounds_completed,
                "metrics": job.metrics,
                "final_model": job.global_model,
                "failure": job.failure,
            });
            println!("{summary}");
            if job.status == flame_engine::job::Status::Completed { Ok(()) } else { std::process::exit(1) }
        }
    }
}
