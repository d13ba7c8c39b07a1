//! `flame-engine`: runs a job against MongoDB and NATS, with workers on other
//! processes or machines, and relays its events to JetStream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use flame_engine::{JobDefinition, Runner, runner};
use flame_events::mongo::{DEFAULT_DB, MongoStore};
use flame_events::relay::Relay;
use flame_events::transport::Nats;

/// Runs a Flame job: events in MongoDB, commands and reports over NATS.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// MongoDB URL (a replica set, for transactions).
    #[arg(long, env = "FLAME_MONGO")]
    mongo: String,
    /// MongoDB database name, when the URL names none.
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// NATS server URL.
    #[arg(long, env = "FLAME_NATS")]
    nats: String,
    /// Job folder in Flame's layout.
    #[arg(long)]
    job: PathBuf,
    /// Seconds to wait for enough workers to register.
    #[arg(long, default_value_t = 60)]
    worker_wait: u64,
    /// Seconds to wait for any report before failing the job.
    #[arg(long, default_value_t = 600)]
    report_timeout: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let def = JobDefinition::load(&args.job)?;
    let store = Arc::new(MongoStore::connect(&args.mongo, &args.db).await?);
    let transport = Nats::connect(&args.nats).await?;
    let relay = Relay::new(store.clone(), transport.jetstream().clone(), "engine").await?;
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(Duration::from_millis(100), async move {
        let _ = relay_stopped.await;
    }));

    let options =
        runner::Options { worker_wait: Duration::from_secs(args.worker_wait), report_timeout: Duration::from_secs(args.report_timeout) };
    let runner = Runner::new(store.clone(), Arc::new(transport), options);
    let job_id = runner.submit(&def).await?;
    eprintln!("job {job_id} submitted from {}", args.job.display());
    let job = runner.run(&job_id).await;

    let _ = stop_relay.send(());
    relay.await.context("event relay task")?.context("event relay")?;
    let job = job?;
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
