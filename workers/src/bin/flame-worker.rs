//! `flame-worker`: one worker process on an edge node, connected to NATS.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use flame_events::protocol::WorkerInfo;
use flame_transport::Nats;
use flame_workers::blob::NatsBlobs;
use flame_workers::kernels::Kernels;
use flame_workers::roots::DataRoots;
use flame_workers::{Worker, model};

const DEFAULT_ROLES: &str = if model::CAN_TRAIN { "trainer,aggregator" } else { "aggregator" };

/// Runs FL tasks (training, aggregation) that the engine sends over NATS.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "FLAME_NATS")]
    nats: String,
    #[command(flatten)]
    auth: flame_transport::NatsAuth,
    /// This worker's id (letters, digits, '-', '_'), unique in the deployment.
    #[arg(long)]
    id: String,
    /// Roles this worker may take, comma-separated (a build without the
    /// training backend offers `aggregator` only).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_ROLES)]
    roles: Vec<String>,
    /// Where this worker runs, e.g. default/us/west.
    #[arg(long, default_value = "default")]
    realm: String,
    /// Compute device it trains on.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Commands run at once (each acked only after its report is sent).
    #[arg(long, default_value_t = flame_workers::runtime::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// CPU kernels to train with: `native` (fastest; the last bits of the
    /// models differ between CPU models) or `portable` (the same bits on
    /// every x86-64 CPU, slower).
    #[arg(long, value_enum, env = "FLAME_KERNELS", default_value = "native")]
    kernels: Kernels,
    /// A folder whose datasets this worker may read (several allowed; in
    /// FLAME_DATA_ROOTS separated by ':'). A job's dataset path resolves
    /// inside one of them or is refused: absolute paths elsewhere, '..' and
    /// symlinks out. Default: the folder the worker starts in.
    #[arg(long = "data-root", env = "FLAME_DATA_ROOTS", value_delimiter = ':', value_name = "DIR")]
    data_roots: Vec<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (commands by kind and outcome, their durations, blob bytes).
    #[arg(long, env = "FLAME_METRICS", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Export a span for each command this worker runs to this OTLP/HTTP
    /// receiver (http://HOST:4318), joined to the job's trace by the
    /// command's trace context.
    #[arg(long, env = "FLAME_OTLP", value_name = "URL")]
    otlp: Option<String>,
    /// Where models larger than 2 MiB are downloaded as they arrive: a
    /// download cut short (this worker killed, NATS away) goes on from its
    /// last MiB when the model is read again, by this process or the next
    /// one started with the same folder. Default: `flame-worker-<ID>` in the
    /// system's temporary folder. One process per folder: a worker started
    /// with a folder another one holds is refused.
    #[arg(long, env = "FLAME_DOWNLOAD_DIR", value_name = "DIR")]
    download_dir: Option<std::path::PathBuf>,
    /// Reads large models into memory only, keeping nothing on disk: faster
    /// where the network outruns the disk (about twice on one machine's
    /// loopback, docs/benchmarks.md), but a read cut short starts again from
    /// the model's first byte.
    #[arg(long, conflicts_with = "download_dir")]
    no_resume: bool,
    /// An aggregator whose rule needs every update at once (median, trimmed
    /// mean, Krum) holds a round's updates in memory up to this many MB in
    /// all; above that it writes them to `aggregator-updates` in the
    /// download folder (or in `flame-worker-<ID>` in the system's temporary
    /// folder) and reads them back a block at a time, removing them once the
    /// aggregate is made.
    /// FedAvg and the optimizers that need only the mean fold each update in
    /// as it arrives and never hold them all.
    #[arg(long, env = "FLAME_UPDATES_IN_MEMORY_MB", value_name = "MB", default_value_t = flame_workers::spill::DEFAULT_IN_MEMORY >> 20)]
    updates_in_memory_mb: u64,
    /// Megabytes of parsed dataset files (CSV, Parquet, NumPy, safetensors,
    /// image folders) this process keeps between commands, so that a file is
    /// parsed once, not for every command of every trainer: the virtual
    /// workers of a process share one copy and deal their parts from it. A
    /// file that changes is read again; 0 keeps none.
    #[arg(long, env = "FLAME_DATASETS_IN_MEMORY_MB", value_name = "MB", default_value_t = (flame_workers::sources::DEFAULT_BUDGET >> 20) as u64)]
    datasets_in_memory_mb: u64,
    /// Runs N virtual workers in this one process instead of one worker, for
    /// simulations at scale through the deployment's own path: ids
    /// `<ID>-0..<ID>-(N-1)` (zero-padded), each registered under its own id
    /// and sent its own commands, all sharing one NATS connection (one
    /// command consumer per 500 ids) and one libtorch, with at most
    /// `--concurrency` commands running at once in the whole process. Each takes the dataset its task is given, as a
    /// worker of its own would. Its NATS identity must be allowed to speak
    /// for all of them (not a per-worker identity).
    #[arg(long = "virtual", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    virtual_workers: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // First: portable kernels may start this program again with their settings.
    args.kernels.select()?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log written to a file reads (and greps) as plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Runtime::new().context("starting the async runtime")?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if !model::CAN_TRAIN && args.roles.iter().any(|r| r == "trainer") {
        anyhow::bail!(
            "this flame-worker was built without the training backend (cargo feature `tch`): it can only be an aggregator, not {:?}; use a full build to train",
            args.roles
        );
    }
    let dirs = if args.data_roots.is_empty() { vec![std::env::current_dir().context("the current folder")?] } else { args.data_roots };
    let roots = DataRoots::new(&dirs).map_err(|e| anyhow::anyhow!("{e} (--data-root)"))?;
    let own_folder = args.download_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("flame-worker-{}", args.id)));
    // This process's alone before anything in it is touched: another worker's parts and updates may be there.
    let claim = flame_workers::claim::claim(&own_folder)?;
    model::init_backend();
    flame_workers::sources::keep_in_memory(usize::try_from(args.datasets_in_memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX));
    if let Some(addr) = args.metrics {
        let bound = flame_workers::metrics::serve(addr).await?;
        tracing::info!("metrics at http://{bound}/metrics");
    }
    let transport = Nats::connect_worker(&args.nats, &args.auth, &args.id).await?;
    let blobs = NatsBlobs::new(transport.jetstream()).await.context("opening the model blob store")?;
    let downloads = (!args.no_resume).then(|| own_folder.clone());
    // Updates go to a folder of their own in it; what a killed aggregator left there is no use to the next.
    let updates_folder = own_folder.join(flame_workers::spill::FOLDER);
    flame_workers::spill::clear_stale(&updates_folder);
    let blobs = match &downloads {
        None => blobs,
        Some(dir) => blobs.resuming_in(dir, None).with_context(|| format!("the download folder {} (--download-dir)", dir.display()))?,
    };
    let info = WorkerInfo { id: args.id, roles: args.roles, realm: args.realm, device: args.device, group: None };
    tracing::info!(roots = ?roots.dirs().unwrap_or_default(), "datasets are read under these folders only");
    let blobs: Arc<dyn flame_workers::blob::BlobStore> = match args.virtual_workers {
        // Virtual workers read the same global model at once: one read for them all.
        Some(_) => Arc::new(flame_workers::blob::Cached::new(Arc::new(blobs), flame_workers::fleet::BLOB_CACHE)),
        None => Arc::new(blobs),
    };
    let mut worker = Worker::new(info, Arc::new(transport), blobs);
    if let Some(url) = &args.otlp {
        worker = worker.with_otlp(flame_transport::otlp::Exporter::new(url, "flame-worker"));
    }
    let worker = worker
        .with_concurrency(args.concurrency)
        .with_data_roots(roots)
        .with_updates_in_memory(args.updates_in_memory_mb.saturating_mul(1 << 20), updates_folder.clone());
    let served = match args.virtual_workers {
        None => worker.run(flame_transport::shutdown_signal()).await,
        Some(n) => flame_workers::fleet::run_virtual(&worker, n as usize, args.concurrency, flame_transport::shutdown_signal()).await,
    };
    // Stopped: the download folder goes if nothing is left in it (a part stays for the next start).
    let _ = std::fs::remove_dir(updates_folder);
    drop(claim);
    let _ = std::fs::remove_dir(own_folder);
    served
}
