//! The engine's Prometheus metrics (`GET /metrics` on `flame-engine serve`):
//! what this process recorded and sent, counted as it happens, and the jobs
//! by state, read when scraped. One registry per process.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use flame_events::job::JobEvent;

/// The engine's metrics.
pub struct Metrics {
    registry: Registry,
    /// Events recorded by this process, by type.
    pub events: IntCounterVec,
    /// Rounds aggregated (global models made).
    pub rounds: IntCounterVec,
    /// Trainers' updates by outcome: accepted, refused (a report rejected), excluded (by an aggregator).
    pub updates: IntCounterVec,
    /// Seconds from a round's start to its aggregate, for rounds this process started.
    pub round_seconds: HistogramVec,
    /// Seconds from an aggregate command's sending to its result.
    pub aggregation_seconds: HistogramVec,
    /// Seconds an event-store append took.
    pub append_seconds: HistogramVec,
    /// Commands sent to workers, by kind.
    pub commands: IntCounterVec,
    /// Commands sent and not answered yet.
    pub in_flight: IntGauge,
    /// Jobs by state (set when scraped).
    pub jobs: IntGaugeVec,
    /// Seconds since each live worker's last heartbeat (set when scraped).
    pub heartbeat_age: prometheus::GaugeVec,
    /// Events committed to the store and not yet published on JetStream by the relay (set when scraped, at most 10,000).
    pub relay_lag: IntGauge,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// Round start by (job, round).
    rounds: HashMap<(String, u32), Instant>,
    /// Aggregate command id -> when it was first sent.
    aggregates: HashMap<String, Instant>,
    /// Commands sent and not answered yet.
    unanswered: HashSet<String>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry.register(Box::new(c.clone())).expect("registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("a valid metric");
    registry.register(Box::new(h.clone())).expect("registered once");
    h
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let r = Registry::new();
        let seconds = prometheus::exponential_buckets(0.005, 2.0, 14).expect("buckets");
        let in_flight = IntGauge::new("flame_commands_in_flight", "Commands sent to workers and not answered yet").expect("metric");
        r.register(Box::new(in_flight.clone())).expect("registered once");
        let heartbeat_age = prometheus::GaugeVec::new(
            Opts::new("flame_worker_heartbeat_age_seconds", "Seconds since each live worker's last heartbeat"),
            &["worker"],
        )
        .expect("metric");
        r.register(Box::new(heartbeat_age.clone())).expect("registered once");
        let relay_lag = IntGauge::new("flame_relay_lag_events", "Events committed and not yet published by the relay (10000: at least)")
            .expect("metric");
        r.register(Box::new(relay_lag.clone())).expect("registered once");
        let jobs = IntGaugeVec::new(Opts::new("flame_jobs", "Jobs in the store by state"), &["state"]).expect("metric");
        r.register(Box::new(jobs.clone())).expect("registered once");
        Metrics {
            events: counter(&r, "flame_events_recorded_total", "Events this engine recorded, by type", &["type"]),
            rounds: counter(&r, "flame_rounds_aggregated_total", "Global models made (rounds aggregated)", &["optimizer"]),
            updates: counter(&r, "flame_updates_total", "Trainers' updates by outcome (accepted, refused, excluded)", &["outcome"]),
            round_seconds: histogram(&r, "flame_round_duration_seconds", "From a round's start to its aggregate", &[], seconds.clone()),
            aggregation_seconds: histogram(
                &r,
                "flame_aggregation_duration_seconds",
                "From an aggregate command's sending to its result",
                &["tier"],
                seconds.clone(),
            ),
            append_seconds: histogram(
                &r,
                "flame_store_append_seconds",
                "Event-store append latency",
                &[],
                prometheus::exponential_buckets(0.0005, 2.0, 14).expect("buckets"),
            ),
            commands: counter(&r, "flame_commands_sent_total", "Commands sent to workers, by kind", &["kind"]),
            in_flight,
            jobs,
            heartbeat_age,
            relay_lag,
            pending: Mutex::default(),
            registry: r,
        }
    })
}

impl Metrics {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Events this process appended to job `job_id`'s stream, and how long the append took.
    pub fn recorded(&self, job_id: &str, optimizer: &str, events: &[&JobEvent], took: Duration) {
        self.append_seconds.with_label_values(&[] as &[&str]).observe(took.as_secs_f64());
        let now = Instant::now();
        for e in events {
            self.events.with_label_values(&[e.event_type()]).inc();
            match e {
                JobEvent::RoundStarted { round, .. } => {
                    self.pending().rounds.insert((job_id.to_string(), *round), now);
                }
                JobEvent::UpdateReported { .. } => self.updates.with_label_values(&["accepted"]).inc(),
                JobEvent::ReportRejected { .. } => self.updates.with_label_values(&["refused"]).inc(),
                JobEvent::UpdateExcluded { .. } => self.updates.with_label_values(&["excluded"]).inc(),
                JobEvent::RoundAggregated { round, .. } => {
                    self.rounds.with_label_values(&[optimizer]).inc();
                    let started = self.pending().rounds.remove(&(job_id.to_string(), *round));
                    if let Some(t) = started {
                        self.round_seconds.with_label_values(&[] as &[&str]).observe(now.duration_since(t).as_secs_f64());
                    }
                    self.aggregated(&format!("{job_id}/r{round}/aggregate"), "top", now);
                }
                JobEvent::GroupAggregated { round, task_id, .. } => {
                    self.aggregated(&format!("{job_id}/r{round}/aggregate/{task_id}"), "group", now);
                }
                JobEvent::JobCompleted { .. } | JobEvent::JobFailed { .. } | JobEvent::JobTerminated { .. } => self.ended(job_id),
                _ => {}
            }
        }
    }

    fn aggregated(&self, command_id: &str, tier: &str, now: Instant) {
        let sent = self.pending().aggregates.remove(command_id);
        if let Some(t) = sent {
            self.aggregation_seconds.with_label_values(&[tier]).observe(now.duration_since(t).as_secs_f64());
        }
    }

    /// A job ended: what it left unanswered is no longer in flight.
    fn ended(&self, job_id: &str) {
        let prefix = format!("{job_id}/");
        let mut p = self.pending();
        let before = p.unanswered.len();
        p.unanswered.retain(|id| !id.starts_with(&prefix));
        self.in_flight.sub((before - p.unanswered.len()) as i64);
        p.aggregates.retain(|id, _| !id.starts_with(&prefix));
        p.rounds.retain(|(job, _), _| job != job_id);
    }

    /// A command this process sent for the first time.
    pub fn sent(&self, command: &flame_events::protocol::Command) {
        let kind = command.body.kind();
        self.commands.with_label_values(&[kind]).inc();
        let mut p = self.pending();
        if p.unanswered.insert(command.id.clone()) {
            self.in_flight.inc();
        }
        if kind == "aggregate" {
            p.aggregates.entry(command.id.clone()).or_insert_with(Instant::now);
        }
    }

    /// Reports taken for these command ids: those commands are answered.
    pub fn answered<'a>(&self, command_ids: impl IntoIterator<Item = &'a str>) {
        let mut p = self.pending();
        for id in command_ids {
            if p.unanswered.remove(id) {
                self.in_flight.dec();
            }
        }
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
