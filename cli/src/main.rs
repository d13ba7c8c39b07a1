//! `flamectl`: run a Flame job on one machine and look at its events.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use flame_engine::job::Status;
use flame_engine::{JobDefinition, Runner, expand, plan, runner};
use flame_events::Envelope;
use flame_events::job;
use flame_events::protocol::WorkerInfo;
use flame_transport::{InProcess, Transport};
use flame_workers::blob::{BlobStore, LocalBlobs, NatsBlobs};
use flame_workers::kernels::Kernels;
use flame_workers::{Worker, model};

mod export;
mod inspect;
mod models;
mod plot;
mod remote;

#[derive(Parser, Debug)]
#[command(version, about = "Flame for Rust: run federated-learning jobs and inspect their events")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// For people.
    Table,
    /// For programs.
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum PlanOutput {
    /// For people.
    Table,
    /// For programs.
    Json,
    /// Graphviz.
    Dot,
}

/// What `flamectl model` does.
#[derive(Subcommand, Debug)]
enum ModelCmd {
    /// Write a job's global model (the last round's, or --round N's) to a file.
    Get {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
        #[command(flatten)]
        blobs: export::Blobs,
        /// The round whose global model to write (0: the initial model); the last by default.
        #[arg(long)]
        round: Option<u32>,
        /// Where to write it.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// safetensors (PyTorch's tensor names) or torchscript (the job's module with the weights in place).
        #[arg(long, value_enum, default_value = "safetensors")]
        format: export::Format,
    },
}

/// Which tasks of `flamectl run` get an in-process worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Local {
    /// Every task.
    All,
    /// The tasks that do not consume data (aggregators, coordinators).
    Aggregators,
    /// None: every task waits for a worker from outside.
    None,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a job folder to the end on this machine (embedded store, in-process workers).
    Run {
        /// Job folder in Flame's layout (job.json, schema.json, dataSpec.json, modelSpec.json, dataset files).
        folder: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// Folder for the event store and model blobs.
        #[arg(long, default_value = ".flame")]
        data_dir: PathBuf,
        /// CPU kernels to train with: `native` (fastest; the last bits of the
        /// models differ between CPU models) or `portable` (the same bits on
        /// every x86-64 CPU, slower).
        #[arg(long, value_enum, env = "FLAME_KERNELS", default_value = "native")]
        kernels: Kernels,
        /// Send the job's commands over this NATS server (model blobs in its
        /// object store), so that workers in other processes can take its
        /// tasks: Python SDK trainers (`flame-py-worker`), `flame-worker`s.
        /// The event store stays in --data-dir.
        #[arg(long, env = "FLAME_NATS")]
        nats: Option<String>,
        #[command(flatten)]
        auth: flame_transport::NatsAuth,
        /// Which tasks get a worker inside this process: `all` (the default
        /// without --nats), `aggregators` (the default with --nats: the
        /// trainers come from outside) or `none`.
        #[arg(long, value_enum)]
        local: Option<Local>,
        /// Serve workers that speak only MQTT (through the NATS server's MQTT
        /// listener; topics `flame/mqtt/...`, see docs/protocol.md). Needs --nats.
        #[arg(long)]
        mqtt_devices: bool,
        /// More folders whose datasets the in-process workers may read
        /// (besides the job folder, which they always may).
        #[arg(long = "data-root", value_name = "DIR")]
        data_roots: Vec<PathBuf>,
        /// Log the job to this MLflow tracking server (http://HOST:PORT): a
        /// run with its params and each round's metrics, and the final model
        /// as an artifact and a registered model version. Followed from the
        /// event log: if MLflow is away, `flamectl mlflow` catches up later.
        #[arg(long, env = "FLAME_MLFLOW")]
        mlflow: Option<String>,
        /// Export the job's trace (the spans `flamectl trace` shows, with
        /// their ids) to this OTLP/HTTP receiver (http://HOST:4318) as its
        /// rounds end.
        #[arg(long, env = "FLAME_OTLP")]
        otlp: Option<String>,
        #[command(flatten)]
        runner: runner::Settings,
    },
    /// Bring an MLflow tracking server up to the event log: every job a run,
    /// with its params, each round's metrics and the final model (what
    /// `run --mlflow` and `flame-engine serve --mlflow` do as jobs go).
    Mlflow {
        /// The tracking server (http://HOST:PORT).
        #[arg(long, env = "FLAME_MLFLOW")]
        url: String,
        /// Start from the log's beginning: every job is brought again (runs,
        /// metric points and model versions already there are not repeated).
        #[arg(long)]
        rebuild: bool,
        /// The event log: sqlite:PATH or mongodb://HOST:PORT/DB.
        #[arg(long, env = "FLAME_STORE", default_value = "sqlite:.flame/events.db")]
        store: String,
        #[command(flatten)]
        blobs: export::Blobs,
    },
    /// Check a job folder and show the tasks it expands to.
    Validate {
        /// Job folder.
        folder: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show the tasks a job folder expands to and a round's plan.
    Plan {
        /// Job folder.
        folder: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: PlanOutput,
        /// Which round to plan (selectors choose per round).
        #[arg(long, default_value_t = 1)]
        round: u32,
    },
    /// Convert between a job folder and the single-file workflow form.
    Convert {
        /// A job folder or a workflow .json file.
        from: PathBuf,
        /// Where to write the other form (a .json file for a folder, a folder for a file).
        to: PathBuf,
    },
    /// Print the JSON Schema of the single-file workflow form.
    Schema,
    /// Create a design, schema, dataset or job on a running engine (--api).
    Create {
        #[command(subcommand)]
        what: remote::Create,
        #[command(flatten)]
        api: remote::Remote,
    },
    /// Show designs, schemas, datasets, jobs, tasks or computes of a running engine.
    Get {
        #[command(subcommand)]
        what: remote::Get,
        #[command(flatten)]
        api: remote::Remote,
    },
    /// Replace a job's definition while it is not running.
    Update {
        /// `job`.
        #[arg(value_parser = ["job"])]
        kind: String,
        /// Job id.
        id: String,
        /// Job folder or workflow file.
        path: PathBuf,
        #[command(flatten)]
        api: remote::Remote,
    },
    /// Remove a design, dataset or job.
    Remove {
        #[command(subcommand)]
        what: remote::Remove,
        #[command(flatten)]
        api: remote::Remote,
    },
    /// Start a job.
    Start {
        /// `job`.
        #[arg(value_parser = ["job"])]
        kind: String,
        /// Job id.
        id: String,
        #[command(flatten)]
        api: remote::Remote,
    },
    /// Stop a job.
    Stop {
        /// `job`.
        #[arg(value_parser = ["job"])]
        kind: String,
        /// Job id.
        id: String,
        /// Why.
        #[arg(long, default_value = "stopped from flamectl")]
        reason: String,
        #[command(flatten)]
        api: remote::Remote,
    },
    /// Print a job's events in order, filtered; --follow tails them until the job ends.
    Events {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
        /// Only these event types (repeat or comma-separate).
        #[arg(long = "type", value_delimiter = ',')]
        types: Vec<String>,
        /// Only events at or after this global position.
        #[arg(long)]
        since: Option<u64>,
        /// Only events about this round.
        #[arg(long)]
        round: Option<u32>,
        /// Only events caused by or naming this worker.
        #[arg(long)]
        worker: Option<String>,
        /// Keep printing new events until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Output format (json: one event per line).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Rebuild a job's state and read models from its events, up to a point; --verify checks them.
    Replay {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
        /// Stop at this global position.
        #[arg(long, conflicts_with = "round")]
        until: Option<u64>,
        /// Stop at the end of this round.
        #[arg(long)]
        round: Option<u32>,
        /// Rebuild from scratch and compare with the engine's aggregate and the stored read
        /// models; exit 6 naming the first divergent event on any difference.
        #[arg(long)]
        verify: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Check a job against its own log: --models derives every global model
    /// (and group model) again from the logged updates, optimizer settings and
    /// state, and compares them bit for bit; exit 6 naming the first that differs.
    Verify {
        /// Job id.
        job_id: String,
        /// Re-derive the models (the only check for now; required, so that other checks can be added).
        #[arg(long, required = true)]
        models: bool,
        #[command(flatten)]
        source: inspect::Source,
        #[command(flatten)]
        blobs: export::Blobs,
        /// Output format (json: one aggregation per line).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Aggregate a job's logged updates again with another server rule, or
    /// without some trainers, and evaluate each what-if global model beside
    /// the real one. Trainers are not re-run: the updates are the recorded ones.
    Whatif {
        /// Job id.
        job_id: String,
        /// The top aggregator's rule (fedavg, median, trimmedmean, krum, fedadam, ...; default: the job's).
        #[arg(long)]
        optimizer: Option<String>,
        /// The rule's arguments as JSON, e.g. '{"f": 1, "m": 1}'.
        #[arg(long, requires = "optimizer")]
        kwargs: Option<String>,
        /// Leave out the updates of this task or worker (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// A folder the held-out data may be read from (repeat; default: the current one).
        #[arg(long = "data-root")]
        data_roots: Vec<PathBuf>,
        /// Also draw accuracy and loss, real and what-if, into this .png or .svg file.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[command(flatten)]
        source: inspect::Source,
        #[command(flatten)]
        blobs: export::Blobs,
        /// Output format (json: one round per line).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Start a new job from another job's global model after a round and run
    /// it here (embedded, in the parent's --data-dir): without some trainers,
    /// with other hyperparameters, or --unlearn a worker (forked from the
    /// round before its first update, without it: retraining without it).
    Fork {
        /// The job to fork.
        job_id: String,
        /// The first round the fork runs (it starts from the model after the round before).
        #[arg(long)]
        from_round: Option<u32>,
        /// Leave out this trainer task or worker (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// Unlearn this trainer task or worker: fork from the round before its first update, without it.
        #[arg(long, value_delimiter = ',')]
        unlearn: Vec<String>,
        /// Change a hyperparameter: KEY=VALUE (rounds, learningRate, epochs, batchSize, minClients, roundTimeout, evalEvery).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Folder of the parent's event store and model blobs (what `flamectl run` wrote); the fork is recorded there.
        #[arg(long, default_value = ".flame")]
        data_dir: PathBuf,
        /// Also let the workers read datasets under this folder (repeat).
        #[arg(long = "data-root")]
        data_roots: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The differential privacy every job spent on a dataset (named by its URL), with its budget.
    Privacy {
        /// The dataset's URL, as the jobs' dataset files give it.
        dataset: String,
        /// Count at this delta (default: the dataset's budget's).
        #[arg(long)]
        delta: Option<f64>,
        #[command(flatten)]
        source: inspect::Source,
        /// Output format (json: one job per line, then the total).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Each trainer's share of a job's accuracy gain, per round and in all:
    /// leave-one-out and Shapley values, from the logged updates (trainers are not re-run).
    Contributions {
        /// Job id.
        job_id: String,
        /// A folder the held-out data may be read from (repeat; default: the current one).
        #[arg(long = "data-root")]
        data_roots: Vec<PathBuf>,
        /// Also draw each trainer's cumulative Shapley value by round into this .png or .svg file.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[command(flatten)]
        source: inspect::Source,
        #[command(flatten)]
        blobs: export::Blobs,
        /// Output format (json: one line per trainer and round, then one per trainer for the job).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show a job as a tree of timed spans (job, rounds, steps, tasks) with each round's critical path.
    Trace {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
        /// Also write Chrome trace-event JSON here (opens in Perfetto).
        #[arg(long)]
        chrome: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Who did what and when to a job, refused reports included.
    Audit {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
        /// Output format (json: one entry per line).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Follow a job live (rounds, updates of the current round, workers) until it ends.
    Watch {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
    },
    /// A job's trained model: `flamectl model get JOB -o model.safetensors`.
    Model {
        #[command(subcommand)]
        what: ModelCmd,
    },
    /// Per-round metrics of a job (loss, accuracy, participants, round time), optionally plotted.
    Metrics {
        /// Job id.
        job_id: String,
        #[command(flatten)]
        source: inspect::Source,
        /// Also draw them into this .png or .svg file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Output format (json: one round per line).
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Bring the stored read models up to date with the event log (or rebuild them).
    Project {
        /// Event store: sqlite:PATH or mongodb://HOST:PORT/DB.
        #[arg(long, env = "FLAME_STORE", default_value = "sqlite:.flame/events.db")]
        store: String,
        /// Drop the stored views and fold every event again.
        #[arg(long)]
        rebuild: bool,
        /// Keep folding new events until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Events per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
}

/// `println!` that returns the write error instead of panicking, so that a
/// closed pipe (`flamectl events ... | head`) ends the program quietly.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)
    };
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log written to a file reads (and greps) as plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Cmd::Run { kernels, .. } = &cli.command
        && let Err(e) = kernels.select()
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Run { folder, output, data_dir, kernels: _, nats, auth, local, mqtt_devices, data_roots, mlflow, otlp, runner } => {
            let remote = Remote {
                nats: nats.as_deref(),
                auth: &auth,
                local,
                mqtt_devices,
                mlflow: mlflow.as_deref(),
                otlp: otlp.as_deref(),
                options: runner.options(),
            };
            run(Submit::Folder(&folder), output, &data_dir, remote, &data_roots).await
        }
        Cmd::Mlflow { url, rebuild, store, blobs } => {
            let store = flame_stores::open_store(&store).await?;
            let mut exporter = flame_engine::mlflow::export::Exporter::new(store, blobs.open().await?, &url);
            if rebuild {
                exporter.rebuild().await?;
            }
            let covered = exporter.catch_up().await?;
            eprintln!("MLflow at {url} is up to the event log ({covered} new events)");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { folder, output } => validate(&folder, output),
        Cmd::Plan { folder, output, round } => show_plan(&folder, output, round),
        Cmd::Convert { from, to } => convert(&from, &to),
        Cmd::Schema => {
            outln!("{}", serde_json::to_string_pretty(&flame_engine::workflow::json_schema())?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Events { job_id, source, types, since, round, worker, follow, output } => {
            let filter = flame_projections::render::EventFilter { types, since, round, worker };
            inspect::events(&job_id, &source, &filter, follow, output).await
        }
        Cmd::Replay { job_id, source, until, round, verify, output } => {
            inspect::replay(&job_id, &source, until, round, verify, output).await
        }
        Cmd::Verify { job_id, models: _, source, blobs, output } => models::verify(&job_id, &source, &blobs, output).await,
        Cmd::Whatif { job_id, optimizer, kwargs, exclude, data_roots, plot, source, blobs, output } => {
            let optimizer = match optimizer {
                Some(name) => {
                    let kwargs: serde_json::Map<String, serde_json::Value> = match kwargs {
                        Some(k) => serde_json::from_str(&k).with_context(|| format!("--kwargs '{k}' is not a JSON object"))?,
                        None => Default::default(),
                    };
                    Some(
                        flame_events::algorithm::ServerOptimizer::parse(&name.to_ascii_lowercase(), &kwargs)
                            .map_err(|e| anyhow::anyhow!("--optimizer {name}: {e}"))?,
                    )
                }
                None => None,
            };
            let change = models::WhatIf { optimizer, exclude, roots: data_roots, plot };
            models::whatif(&job_id, &source, &blobs, &change, output).await
        }
        Cmd::Fork { job_id, from_round, exclude, unlearn, set, data_dir, data_roots, output } => {
            let mut settings = serde_json::Map::new();
            for kv in &set {
                let Some((k, v)) = kv.split_once('=') else { anyhow::bail!("--set {kv}: write KEY=VALUE, e.g. --set rounds=8") };
                // A number stays a number; anything else is a string (and refused by the checks if it must be a number).
                settings.insert(
                    k.trim().to_string(),
                    serde_json::from_str(v.trim()).unwrap_or_else(|_| serde_json::Value::String(v.trim().into())),
                );
            }
            let request = flame_engine::fork::Request { from_round, exclude, unlearn, set: settings };
            let auth = flame_transport::NatsAuth::default();
            let remote = Remote {
                nats: None,
                auth: &auth,
                local: None,
                mqtt_devices: false,
                mlflow: None,
                otlp: None,
                options: runner::Options::default(),
            };
            run(Submit::Fork { parent: &job_id, request }, output, &data_dir, remote, &data_roots).await
        }
        Cmd::Privacy { dataset, delta, source, output } => models::privacy(&dataset, &source, delta, output).await,
        Cmd::Contributions { job_id, data_roots, plot, source, blobs, output } => {
            models::contributions(&job_id, &source, &blobs, &data_roots, plot.as_deref(), output).await
        }
        Cmd::Trace { job_id, source, chrome, output } => inspect::trace(&job_id, &source, chrome.as_deref(), output).await,
        Cmd::Audit { job_id, source, output } => inspect::audit(&job_id, &source, output).await,
        Cmd::Watch { job_id, source } => inspect::watch(&job_id, &source).await,
        Cmd::Model { what: ModelCmd::Get { job_id, source, blobs, round, out, format } } => {
            export::get(&job_id, &source, &blobs, round, &out, format).await
        }
        Cmd::Metrics { job_id, source, plot, output } => inspect::metrics(&job_id, &source, plot.as_deref(), output).await,
        Cmd::Project { store, rebuild, follow, batch } => inspect::project(&store, rebuild, follow, batch).await,
        // The management verbs talk to a running engine (blocking HTTP; nothing else runs meanwhile).
        Cmd::Create { what, api } => Ok(remote::run(&api, remote::Request::Create(what))),
        Cmd::Get { what, api } => Ok(remote::run(&api, remote::Request::Get(what))),
        Cmd::Update { id, path, api, .. } => Ok(remote::run(&api, remote::Request::UpdateJob { id, path })),
        Cmd::Remove { what, api } => Ok(remote::run(&api, remote::Request::Remove(what))),
        Cmd::Start { id, api, .. } => Ok(remote::run(&api, remote::Request::Start(id))),
        Cmd::Stop { id, reason, api, .. } => Ok(remote::run(&api, remote::Request::Stop(id, reason))),
    }
}

fn validate(folder: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let result = JobDefinition::load(folder).and_then(|d| expand::tasks(&d));
    match (result, output) {
        (Ok(tasks), Output::Json) => outln!("{}", json!({"valid": true, "errors": [], "tasks": tasks}))?,
        (Ok(tasks), Output::Table) => {
            outln!("{} is valid: {} task(s)", folder.display(), tasks.len())?;
            for t in tasks {
                outln!("  {:<20} {:<18} {}", t.task_id, t.role, t.dataset.unwrap_or_default())?;
            }
        }
        (Err(p), Output::Json) => {
            outln!("{}", json!({"valid": false, "errors": p.0}))?;
            return Ok(ExitCode::from(2));
        }
        (Err(p), Output::Table) => {
            eprintln!("{p}");
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn convert(from: &Path, to: &Path) -> anyhow::Result<ExitCode> {
    let def = match JobDefinition::load(from) {
        Ok(d) => d,
        Err(p) => {
            eprintln!("error: {p}");
            return Ok(ExitCode::from(2));
        }
    };
    let workflow = flame_engine::workflow::Workflow::from_definition(&def);
    if from.is_dir() {
        std::fs::write(to, serde_json::to_string_pretty(&workflow)? + "\n").with_context(|| format!("writing {}", to.display()))?;
    } else if let Err(p) = workflow.write_folder(to) {
        eprintln!("error: {p}");
        return Ok(ExitCode::from(2));
    }
    eprintln!("wrote {}", to.display());
    Ok(ExitCode::SUCCESS)
}

fn task_json(t: &flame_events::job::TaskSpec) -> serde_json::Value {
    json!({
        "taskId": t.task_id,
        "role": t.role,
        "isDataConsumer": t.is_data_consumer,
        "groupAssociation": t.group_association,
        "channels": t.channels,
        "dataset": t.dataset,
        "realm": t.realm,
    })
}

fn show_plan(folder: &Path, output: PlanOutput, round: u32) -> anyhow::Result<ExitCode> {
    let loaded = JobDefinition::load(folder).and_then(|d| expand::tasks(&d).map(|t| (d, t)));
    let (def, tasks) = match loaded {
        Ok(x) => x,
        Err(p) => {
            eprintln!("error: {p}");
            return Ok(ExitCode::from(2));
        }
    };
    let trainers = tasks.iter().filter(|t| t.is_data_consumer).count();
    let selection = match flame_engine::compile::settings(&def, trainers) {
        Ok(a) => a.selection,
        Err(problems) => {
            eprintln!("error: {}", flame_engine::definition::Problems(problems));
            return Ok(ExitCode::from(2));
        }
    };
    let plan = plan::build(&def, &tasks, selection, flame_engine::compile::seed(&def), round.max(1))?;
    match output {
        PlanOutput::Json => outln!("{}", json!({"tasks": tasks.iter().map(task_json).collect::<Vec<_>>(), "plan": plan}))?,
        PlanOutput::Dot => write!(std::io::stdout().lock(), "{}", plan.to_dot())?,
        PlanOutput::Table => {
            outln!("{} task(s):", tasks.len())?;
            for t in &tasks {
                let groups: Vec<String> = t.group_association.iter().map(|(c, g)| format!("{c}={g}")).collect();
                outln!("  {:<22} {:<18} {:<40} {}", t.task_id, t.role, groups.join(","), t.dataset.clone().unwrap_or_default())?;
            }
            let mode = match plan.mode {
                plan::Mode::Sync => "synchronous".to_string(),
                plan::Mode::Async { agg_goal, concurrency } => {
                    format!("asynchronous (aggregate every {agg_goal} update(s), {concurrency} in flight)")
                }
            };
            outln!("round {} plan, {mode}, {} step(s):", plan.round, plan.steps.len())?;
            for s in &plan.steps {
                let quorum = s.quorum.map(|q| format!(" (closes at {q})")).unwrap_or_default();
                outln!("  {:<48} after {}{quorum}", s.id, if s.after.is_empty() { "-".to_string() } else { s.after.join(", ") })?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `flamectl run` reaches workers outside its process.
struct Remote<'a> {
    nats: Option<&'a str>,
    auth: &'a flame_transport::NatsAuth,
    local: Option<Local>,
    mqtt_devices: bool,
    /// The MLflow tracking server to log the job to.
    mlflow: Option<&'a str>,
    /// The OTLP receiver to export the job's trace to.
    otlp: Option<&'a str>,
    /// How the runner reads the worker registry.
    options: runner::Options,
}

/// What `run` runs: a job folder, or a fork of a job in the store.
enum Submit<'a> {
    /// A job definition's folder (or JSON file).
    Folder(&'a Path),
    /// A fork of the job of this id.
    Fork {
        /// The parent job.
        parent: &'a str,
        /// Where it starts and what it leaves out.
        request: flame_engine::fork::Request,
    },
}

async fn run(submit: Submit<'_>, output: Output, data_dir: &Path, remote: Remote<'_>, data_roots: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let Remote { nats, auth, local, mqtt_devices, mlflow, otlp, options } = remote;
    let def = match &submit {
        Submit::Folder(folder) => match JobDefinition::load(folder) {
            Ok(d) => Some(d),
            Err(p) => {
                eprintln!("error: {p}");
                return Ok(ExitCode::from(2));
            }
        },
        Submit::Fork { .. } => None,
    };
    model::init_backend();
    let started = Instant::now();
    let store_url = format!("sqlite:{}", data_dir.join("events.db").display());
    let store = flame_stores::open_store(&store_url).await?;
    if mqtt_devices && nats.is_none() {
        anyhow::bail!("--mqtt-devices needs --nats: MQTT workers connect to that server's MQTT listener");
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (transport, blobs): (Arc<dyn Transport>, Arc<dyn BlobStore>) = match nats {
        Some(url) => {
            let nats = flame_transport::Nats::connect_with(url, auth).await?;
            let blobs: Arc<dyn BlobStore> = Arc::new(
                NatsBlobs::with_replicas(nats.jetstream(), nats.replicas()).await.context("opening the model blob store on NATS")?,
            );
            if mqtt_devices {
                let adapter = flame_transport::mqtt::MqttAdapter::new(nats.clone(), blobs.clone());
                let mut stopped = stopped.clone();
                tokio::spawn(adapter.run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }));
            }
            (Arc::new(nats), blobs)
        }
        None => (Arc::new(InProcess::default()), Arc::new(LocalBlobs::new(data_dir.join("blobs"))?)),
    };
    let local = local.unwrap_or(if nats.is_some() { Local::Aggregators } else { Local::All });
    if nats.is_none() && local != Local::All {
        anyhow::bail!("--local {local:?} needs --nats: without it no worker from outside can reach the job");
    }
    if let (Submit::Folder(folder), Some(def)) = (&submit, &def)
        && nats.is_none()
        && flame_engine::compile::compile(def).is_ok_and(|c| c.spec.model.is_external())
    {
        eprintln!(
            "error: {}: the model is defined by the trainers' own code (baseModel 'external'); run its trainers with the Python SDK and give this command --nats URL (see examples/python-digits/run.sh)",
            folder.display()
        );
        return Ok(ExitCode::from(2));
    }
    // The user's model file is a blob like any model: workers fetch it by its sha256.
    let runner = Runner::new(store.clone(), transport.clone(), options).with_blobs(blobs.clone());
    let actor = local_user();
    let (job_id, folder) = match (&submit, &def) {
        (Submit::Folder(folder), Some(def)) => {
            let id = runner.submit(def, &actor).await?;
            eprintln!("job {id}: {} from {}", def.name(), folder.display());
            (id, folder.to_path_buf())
        }
        (Submit::Fork { parent, request }, _) => {
            let id = match runner.fork(parent, request, &actor).await {
                Ok(id) => id,
                Err(e @ (runner::Error::Fork { .. } | runner::Error::UnknownJob(_))) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            };
            let forked = runner.load(&id).await?;
            let origin = forked.forked_from.clone().unwrap_or_default();
            eprintln!(
                "job {id}: a fork of job {parent} from round {} (model {}){}",
                origin.from_round,
                &origin.model[..origin.model.len().min(12)],
                if origin.excluded.is_empty() { String::new() } else { format!(", without {}", origin.excluded.join(", ")) }
            );
            // The workers read the datasets where the first job's folder is.
            let mut root = runner.load(parent).await?;
            while let Some(o) = root.forked_from.clone() {
                match runner.load(&o.parent_job).await {
                    Ok(j) => root = j,
                    Err(_) => break,
                }
            }
            (id, PathBuf::from(root.source))
        }
        (Submit::Folder(_), None) => unreachable!("a folder's definition was loaded above"),
    };
    let folder = folder.as_path();
    // The MLflow projection follows the log while the job runs.
    let mlflow = mlflow.map(|url| {
        flame_engine::follow::spawn(flame_engine::mlflow::export::Exporter::new(store.clone(), blobs.clone(), url), stopped.clone())
    });
    let traces = otlp.map(|url| flame_engine::follow::spawn(flame_engine::otlp::TraceExporter::new(store.clone(), url), stopped.clone()));
    runner.start(&job_id, &actor).await?;

    // One in-process worker per task, offering that task's role.
    let job = runner.load(&job_id).await?;
    let mut workers = Vec::new();
    let here = |t: &&flame_events::job::TaskSpec| match local {
        Local::All => true,
        Local::Aggregators => !t.is_data_consumer,
        Local::None => false,
    };
    // The in-process workers read the job folder's datasets, and those under --data-root.
    let home = if folder.is_dir() {
        folder
    } else {
        folder.parent().filter(|p| !p.as_os_str().is_empty() && p.is_dir()).unwrap_or(Path::new("."))
    };
    let roots = flame_workers::roots::DataRoots::new(&[&[home.to_path_buf()], data_roots].concat()).map_err(anyhow::Error::msg)?;
    // Local worker ids are unique to this run: several runs may share one NATS server.
    let prefix = if nats.is_some() { format!("local-{}-", &job_id[..job_id.len().min(8)]) } else { "local-".to_string() };
    for t in job.tasks.iter().filter(|t| t.colocate.is_none()).filter(here) {
        let role = if t.is_data_consumer { "trainer" } else { "aggregator" };
        let info = WorkerInfo {
            id: format!("{prefix}{}", t.task_id),
            roles: vec![role.into()],
            realm: t.realm.clone().unwrap_or_else(|| "default".into()),
            device: "cpu".into(),
            group: None,
        };
        let mut stopped = stopped.clone();
        let mut worker = Worker::new(info, transport.clone(), blobs.clone()).with_data_roots(roots.clone());
        if let Some(url) = otlp {
            worker = worker.with_otlp(flame_transport::otlp::Exporter::new(url, "flame-worker"));
        }
        workers.push(tokio::spawn(worker.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
    }
    let job = runner.run_resuming(&job_id).await;
    let _ = stop.send(true);
    for w in workers {
        w.await.context("worker task")??;
    }
    let job = job?;
    let events = store.read_stream(&job::stream_id(&job_id), 1).await?;
    // The read models (`flamectl replay --verify` compares with them).
    let models = flame_projections::store::open(&store_url).await?;
    flame_projections::ViewWriter::open(store.as_ref(), models.as_ref(), 1000).await?.catch_up().await?;
    if let Some(task) = mlflow {
        finish_mlflow(task.await.context("MLflow projection task")?, store.location()).await;
    }
    if let Some(task) = traces {
        let mut exporter = task.await.context("trace export task")?;
        if let Err(e) = exporter.catch_up().await {
            eprintln!("warning: the job's trace was not all exported: {e}");
        }
    }
    print_summary(&job, &events, store.location(), started.elapsed(), output)?;
    Ok(if job.status == Status::Completed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Brings MLflow up to the end of the job, trying for up to a minute; if it
/// stays away, says how to catch up later (the events are safe).
async fn finish_mlflow(mut exporter: flame_engine::mlflow::export::Exporter, store: String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match exporter.catch_up().await {
            Ok(_) => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("warning: MLflow is behind the job: {e}; `flamectl mlflow --url URL --store {store}` brings it up later");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// The actor recorded for commands typed on this machine.
fn local_user() -> flame_events::Actor {
    flame_events::Actor::user(std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "local".into()))
}

fn print_summary(
    job: &flame_engine::job::Job,
    events: &[Envelope],
    store: String,
    elapsed: Duration,
    output: Output,
) -> std::io::Result<()> {
    let view = flame_projections::view::fold(events);
    let rounds = &view.rounds;
    match output {
        Output::Json => {
            outln!(
                "{}",
                json!({
                    "job_id": job.job_id,
                    "name": job.name,
                    "state": job.status,
                    "rounds_completed": job.rounds_completed,
                    "metrics": job.metrics,
                    "final_model": job.global_model,
                    "failure": job.failure,
                    "store": store,
                    "events": events.len(),
                    "rounds": rounds,
                    "elapsed_s": elapsed.as_secs_f64(),
                    "kernels": Kernels::current().name(),
                })
            )?;
        }
        Output::Table => {
            outln!("job {} ({}): {}", job.job_id, job.name, json!(job.status).as_str().unwrap_or("?"))?;
            // Federated evaluation (the trainers' own held-out data) beside the aggregator's, when the job asked for it.
            let federated = rounds.iter().any(|r| !r.federated.is_empty());
            let head = if federated { format!("  {:>12}  {:>8}", "fed accuracy", "fed loss") } else { String::new() };
            outln!("{:>5}  {:>8}  {:>8}  {:>7}  {:>7}{head}", "round", "accuracy", "loss", "updates", "seconds")?;
            for r in rounds {
                // A figure the round does not have (accuracy of a regression) shows as "-".
                let num = |v: Option<&f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
                let seconds = r.seconds().unwrap_or(f64::NAN);
                let tail = if federated {
                    format!("  {:>12}  {:>8}", num(r.federated.get("accuracy")), num(r.federated.get("loss")))
                } else {
                    String::new()
                };
                outln!(
                    "{:>5}  {:>8}  {:>8}  {:>7}  {:>7.2}{tail}",
                    r.round,
                    num(r.metrics.get("accuracy")),
                    num(r.metrics.get("loss")),
                    r.inputs.len(),
                    seconds
                )?;
            }
            if let Some(f) = &job.failure {
                outln!("failure: {f}")?;
            }
            outln!("rounds completed: {}/{}", job.rounds_completed, job.total_rounds())?;
            if let Some(acc) = job.metrics.get("accuracy") {
                outln!("final test accuracy: {acc:.4}")?;
            } else if let Some(loss) = job.metrics.get("loss") {
                outln!("final test loss: {loss:.4}")?;
            }
            outln!("final model: sha256:{} ({} kernels)", job.global_model.clone().unwrap_or_default(), Kernels::current().name())?;
            outln!("events: {} in {store} (flamectl events {} --store {store})", events.len(), job.job_id)?;
            outln!("time: {:.1} s", elapsed.as_secs_f64())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        // Clap checks argument names only when a command is parsed; this parses them all.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
