//! A worker's Prometheus metrics (`flame-worker --metrics ADDR` serves them
//! at `/metrics`): commands run by kind and outcome, how long they took, and
//! the bytes of model blobs read and written. One registry per process.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    /// Commands run, by kind and outcome (`ok`, `failed`).
    pub commands: IntCounterVec,
    /// Seconds a command took, by kind.
    pub command_seconds: HistogramVec,
    /// Bytes of model blobs read (`in`) and written (`out`).
    pub blob_bytes: IntCounterVec,
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let registry = Registry::new();
        let commands = IntCounterVec::new(
            Opts::new("flame_worker_commands_total", "Commands this worker ran, by kind and outcome"),
            &["kind", "outcome"],
        )
        .expect("a valid metric");
        let command_seconds = HistogramVec::new(
            HistogramOpts::new("flame_worker_command_duration_seconds", "Seconds a command took, by kind")
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).expect("buckets")),
            &["kind"],
        )
        .expect("a valid metric");
        let blob_bytes = IntCounterVec::new(
            Opts::new("flame_worker_blob_bytes_total", "Bytes of model blobs read (in) and written (out)"),
            &["direction"],
        )
        .expect("a valid metric");
        for m in [
            Box::new(commands.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(command_seconds.clone()),
            Box::new(blob_bytes.clone()),
        ] {
            registry.register(m).expect("registered once");
        }
        Metrics { registry, commands, command_seconds, blob_bytes }
    })
}

impl Metrics {
    /// A command of `kind` ran for `took`.
    pub fn ran(&self, kind: &str, ok: bool, took: Duration) {
        self.commands.with_label_values(&[kind, if ok { "ok" } else { "failed" }]).inc();
        self.command_seconds.with_label_values(&[kind]).observe(took.as_secs_f64());
    }

    /// `n` bytes of blobs read.
    pub fn read(&self, n: usize) {
        self.blob_bytes.with_label_values(&["in"]).inc_by(n as u64);
    }

    /// `n` bytes of blobs written.
    pub fn wrote(&self, n: usize) {
        self.blob_bytes.with_label_values(&["out"]).inc_by(n as u64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if TextEncoder::new().encode(&self.registry.gather(), &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for /metrics: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], get().render()) }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the /metrics listener stopped: {e}");
        }
    });
    Ok(bound)
}
