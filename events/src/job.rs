//! The events of a job's stream (`job-<id>`), version 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::upcast::Upcasters;
use crate::{Envelope, NewEvent, store};

/// Metrics by name (`accuracy`, `loss`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// One task of an expanded job: a role instance, with its dataset if it consumes data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Task id, unique in the job (e.g. `trainer-0`).
    pub task_id: String,
    /// The role from the design (`trainer`, `aggregator`, ...).
    pub role: String,
    /// Whether the role consumes data (trains).
    pub is_data_consumer: bool,
    /// Channel name -> group this task belongs to on that channel.
    pub group_association: BTreeMap<String, String>,
    /// Names of the channels the role takes part in.
    pub channels: Vec<String>,
    /// Dataset URL for data consumers.
    pub dataset: Option<String>,
    /// Realm of the dataset (where its data lives), used to place the task.
    pub realm: Option<String>,
    /// Runs on the same worker as this task (a ring's reduction runs on its leader's worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colocate: Option<String>,
}

/// What the engine needs to run a job's rounds, fixed at creation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Number of rounds.
    pub rounds: u32,
    /// Server-side optimizer (`fedavg`, ...).
    pub optimizer: String,
    /// The optimizer's arguments.
    #[serde(default)]
    pub optimizer_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Model description handed to workers (`baseModel` plus architecture settings).
    pub model: serde_json::Value,
    /// Hyperparameters handed to workers (`epochs`, `batchSize`, `learningRate`, ...).
    pub hyperparameters: serde_json::Value,
    /// Seed for model initialisation and training.
    pub seed: u64,
    /// Seconds the job may run from its start before it is terminated (Flame's `maxRunTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_run_time_s: Option<u64>,
    /// Seconds a round may wait for updates before it closes by quorum or fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_timeout_s: Option<u64>,
    /// Fewest updates a round may aggregate (`minClients`); all selected trainers when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// Trainers chosen at random per round (Flame's `random` selector, kwarg `k`); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<u32>,
    /// Task id -> the task it uploads to (its aggregator); the top aggregator has none.
    /// Empty in jobs recorded before hierarchies ran: every trainer reports to the one aggregator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub uplinks: BTreeMap<String, String>,
    /// Asynchronous (FedBuff) jobs: aggregate every `agg_goal` updates, with no barrier (Flame's `aggGoal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agg_goal: Option<u32>,
    /// Asynchronous jobs: trainers training at once (the fedbuff selector's `c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Oort's selector: rounds close at this many updates (`aggr_num`), from 30% more trainers picked by utility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oort: Option<u32>,
    /// Coordinated jobs: the coordinator's task id; it pairs trainers with aggregators each round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Coordinated jobs: task id -> the aggregators it may upload to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub candidates: BTreeMap<String, Vec<String>>,
}

/// Every event in a job stream.
// JobCreated is large and rare; boxing it would only complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum JobEvent {
    /// The job was submitted and expanded into tasks.
    JobCreated {
        /// Job id.
        job_id: String,
        /// Job name (the design's name or the folder's).
        name: String,
        /// Where the definition came from.
        source: String,
        /// Run settings.
        spec: RunSpec,
        /// The expanded tasks.
        tasks: Vec<TaskSpec>,
    },
    /// The job's definition was replaced while it was not running.
    JobUpdated {
        /// Job name.
        name: String,
        /// Where the definition came from.
        source: String,
        /// Run settings.
        spec: RunSpec,
        /// The expanded tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Someone asked the job to start; the engine now places its tasks.
    JobStarting {},
    /// A task was placed on a worker (again, after its worker was lost).
    TaskAssigned {
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
    },
    /// Every task is placed; the engine deploys them to their workers.
    JobDeploying {},
    /// A worker confirmed it can run its task (its dataset and model load).
    TaskDeployed {
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
    },
    /// Every task is deployed; rounds run.
    JobStarted {},
    /// A durable timer was armed: when `due_at_ms` passes the engine acts, even after a restart.
    TimerSet {
        /// Timer name (`max-run-time`, `round-3`).
        timer: String,
        /// Due time, milliseconds since the Unix epoch.
        due_at_ms: u64,
    },
    /// A timer came due and was acted on.
    TimerFired {
        /// Timer name.
        timer: String,
    },
    /// A worker running tasks of this job stopped heartbeating.
    WorkerLost {
        /// Worker id.
        worker_id: String,
        /// Its tasks that found no other worker (they sit out until one appears).
        orphaned: Vec<String>,
    },
    /// The initial global model exists.
    ModelInitialized {
        /// sha256 of the safetensors blob.
        digest: String,
        /// Worker that made it.
        worker_id: String,
    },
    /// A round began from a global model.
    RoundStarted {
        /// Round number, from 1.
        round: u32,
        /// Digest of the global model trainers start from.
        global_model: String,
        /// Trainer tasks chosen for this round by the selector; empty: every trainer with a worker.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        selected: Vec<String>,
    },
    /// A trainer's update for a round was accepted.
    UpdateReported {
        /// Round number.
        round: u32,
        /// Task id.
        task_id: String,
        /// Worker id.
        worker_id: String,
        /// Digest of the updated model.
        digest: String,
        /// Training samples behind the update (the FedAvg weight).
        samples: u64,
        /// Local training metrics.
        metrics: Metrics,
        /// Asynchronous (FedBuff) jobs: how many global models older than the
        /// one this round started from is the model it trained from (0 in synchronous rounds).
        #[serde(default, skip_serializing_if = "crate::is_zero")]
        staleness: u32,
        /// SCAFFOLD / FedDyn: digest of the task's state after this update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_state: Option<String>,
    },
    /// A middle aggregator combined the updates of its group; the result goes up to its own aggregator.
    GroupAggregated {
        /// Round number.
        round: u32,
        /// The middle aggregator's task id.
        task_id: String,
        /// Its worker.
        worker_id: String,
        /// Digest of the group's model.
        digest: String,
        /// Training samples behind it (the sum over its inputs): its weight one tier up.
        samples: u64,
        /// Digests of the trainers' updates it contains, in task order.
        inputs: Vec<String>,
        /// What its worker measured, if anything.
        metrics: Metrics,
    },
    /// The coordinator paired the round's trainers with aggregators.
    RoundCoordinated {
        /// Round number.
        round: u32,
        /// Trainer task id -> the aggregator task it uploads to this round.
        pairing: BTreeMap<String, String>,
    },
    /// A round's training closed at its deadline without every update; the rest are dropped.
    TrainingClosed {
        /// Round number.
        round: u32,
        /// Tasks whose updates did not arrive in time.
        dropped: Vec<String>,
    },
    /// An aggregator refused an accepted update's blob (audit); it did not enter the aggregate.
    UpdateExcluded {
        /// Round number.
        round: u32,
        /// Task that produced it.
        task_id: String,
        /// Its digest.
        digest: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A report was refused and not applied (audit).
    ReportRejected {
        /// The command the report answered.
        command_id: String,
        /// Task id it claimed.
        task_id: String,
        /// Worker id it claimed.
        worker_id: String,
        /// Round it claimed.
        round: u32,
        /// Why it was refused.
        reason: String,
    },
    /// The aggregator combined the round's updates into a new global model.
    RoundAggregated {
        /// Round number.
        round: u32,
        /// Digest of the new global model.
        digest: String,
        /// Digests of the updates that went in, in task order.
        inputs: Vec<String>,
        /// Evaluation of the new global model.
        metrics: Metrics,
        /// Digest of the server optimizer's state after the round (adaptive optimizers).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        optimizer_state: Option<String>,
    },
    /// All rounds are done.
    JobCompleted {
        /// Rounds completed.
        rounds_completed: u32,
        /// Digest of the final global model.
        final_model: String,
        /// Evaluation of the final model.
        metrics: Metrics,
    },
    /// The job cannot go on.
    JobFailed {
        /// Why.
        reason: String,
    },
    /// A stop was asked for (by a user, or by `maxRunTime`); work in flight is abandoned.
    JobStopping {
        /// Why.
        reason: String,
    },
    /// The job was stopped before it finished.
    JobTerminated {
        /// Why.
        reason: String,
    },
    /// The job was removed; its events stay for audit.
    JobDeleted {},
}

impl JobEvent {
    /// The event's type name, as stored.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::JobCreated { .. } => "JobCreated",
            Self::JobUpdated { .. } => "JobUpdated",
            Self::JobStarting {} => "JobStarting",
            Self::TaskAssigned { .. } => "TaskAssigned",
            Self::JobDeploying {} => "JobDeploying",
            Self::TaskDeployed { .. } => "TaskDeployed",
            Self::JobStarted {} => "JobStarted",
            Self::TimerSet { .. } => "TimerSet",
            Self::TimerFired { .. } => "TimerFired",
            Self::WorkerLost { .. } => "WorkerLost",
            Self::TrainingClosed { .. } => "TrainingClosed",
            Self::ReportRejected { .. } => "ReportRejected",
            Self::UpdateExcluded { .. } => "UpdateExcluded",
            Self::JobStopping { .. } => "JobStopping",
            Self::JobTerminated { .. } => "JobTerminated",
            Self::JobDeleted {} => "JobDeleted",
            Self::ModelInitialized { .. } => "ModelInitialized",
            Self::RoundStarted { .. } => "RoundStarted",
            Self::UpdateReported { .. } => "UpdateReported",
            Self::GroupAggregated { .. } => "GroupAggregated",
            Self::RoundCoordinated { .. } => "RoundCoordinated",
            Self::RoundAggregated { .. } => "RoundAggregated",
            Self::JobCompleted { .. } => "JobCompleted",
            Self::JobFailed { .. } => "JobFailed",
        }
    }

    /// Wraps the event for appending, correlated with its job.
    pub fn to_new_event(&self, job_id: &str, actor: &str) -> NewEvent {
        let payload = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        NewEvent::new(self.event_type(), payload, actor).correlated(job_id)
    }

    /// Decodes a stored event of a job stream, upcasting old schema versions.
    pub fn from_envelope(e: &Envelope) -> Result<Self, store::Error> {
        // The common case, without copying the payload: current schema, tagged with its type.
        if e.schema_version == SCHEMA_VERSION {
            // Most of a job's events are updates: read them field by field, which
            // is several times faster than serde's buffering of tagged enums.
            if e.event_type == "UpdateReported"
                && let Some(event) = decode_update(&e.payload)
            {
                return Ok(event);
            }
            if e.payload.get("type").and_then(serde_json::Value::as_str) == Some(e.event_type.as_str())
                && let Ok(event) = <Self as Deserialize>::deserialize(&e.payload)
            {
                return Ok(event);
            }
        }
        let e = upcasters().upcast(e.clone())?;
        if e.schema_version != SCHEMA_VERSION {
            return Err(store::Error::Decode {
                stream: e.stream_id.clone(),
                version: e.version,
                event_type: e.event_type.clone(),
                reason: format!("schema version {} is newer than this program knows ({SCHEMA_VERSION}); upgrade flame", e.schema_version),
            });
        }
        let mut payload = e.payload.clone();
        if let Some(map) = payload.as_object_mut() {
            map.insert("type".into(), serde_json::Value::String(e.event_type.clone()));
        }
        serde_json::from_value(payload).map_err(|err| store::Error::Decode {
            stream: e.stream_id.clone(),
            version: e.version,
            event_type: e.event_type.clone(),
            reason: err.to_string(),
        })
    }
}

/// `UpdateReported` read directly from its payload (one pass over its fields,
/// no hashing); `None` sends it down the general path.
fn decode_update(p: &serde_json::Value) -> Option<JobEvent> {
    let (mut round, mut task_id, mut worker_id, mut digest, mut samples, mut metrics) = (None, None, None, None, None, None);
    let mut staleness = 0;
    let mut client_state = None;
    for (k, v) in p.as_object()? {
        match k.as_str() {
            "type" if v.as_str() != Some("UpdateReported") => return None,
            "round" => round = Some(u32::try_from(v.as_u64()?).ok()?),
            "task_id" => task_id = Some(v.as_str()?.to_string()),
            "worker_id" => worker_id = Some(v.as_str()?.to_string()),
            "digest" => digest = Some(v.as_str()?.to_string()),
            "samples" => samples = Some(v.as_u64()?),
            "staleness" => staleness = u32::try_from(v.as_u64()?).ok()?,
            "client_state" => client_state = Some(v.as_str()?.to_string()),
            "metrics" => {
                metrics = Some(v.as_object()?.iter().map(|(k, v)| v.as_f64().map(|v| (k.clone(), v))).collect::<Option<Metrics>>()?)
            }
            _ => {}
        }
    }
    Some(JobEvent::UpdateReported {
        round: round?,
        task_id: task_id?,
        worker_id: worker_id?,
        digest: digest?,
        samples: samples?,
        metrics: metrics?,
        staleness,
        client_state,
    })
}

/// The schema version job events are written with.
pub const SCHEMA_VERSION: u32 = 1;

/// The upcasters for job events (none yet: every job event is at version 1).
pub fn upcasters() -> &'static Upcasters {
    static UPCASTERS: std::sync::OnceLock<Upcasters> = std::sync::OnceLock::new();
    UPCASTERS.get_or_init(Upcasters::default)
}

/// The stream id of a job.
pub fn stream_id(job_id: &str) -> String {
    format!("job-{job_id}")
}

impl cqrs_es::DomainEvent for JobEvent {
    fn event_type(&self) -> String {
        JobEvent::event_type(self).to_string()
    }

    fn event_version(&self) -> String {
        SCHEMA_VERSION.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(payload: serde_json::Value) -> Envelope {
        Envelope {
            event_id: uuid::Uuid::now_v7(),
            stream_id: "job-j".into(),
            version: 1,
            position: 1,
            event_type: "UpdateReported".into(),
            schema_version: SCHEMA_VERSION,
            payload,
            recorded_at: chrono::Utc::now(),
            causation_id: None,
            correlation_id: None,
            actor: "worker:w".into(),
        }
    }

    #[test]
    fn the_fast_update_decoder_agrees_with_serde_and_defers_to_it_on_anything_odd() {
        let event = JobEvent::UpdateReported {
            round: 3,
            task_id: "trainer-1".into(),
            worker_id: "w1".into(),
            digest: "ab".into(),
            samples: 480,
            metrics: Metrics::from([("loss".into(), 0.25), ("n".into(), 7.0)]),
            staleness: 0,
            client_state: None,
        };
        let payload = event.to_new_event("j", "worker:w1").payload;
        assert_eq!(decode_update(&payload), Some(event.clone()));
        assert!(payload.get("staleness").is_none(), "synchronous updates are written as before");
        let stale = JobEvent::UpdateReported {
            round: 3,
            task_id: "trainer-1".into(),
            worker_id: "w1".into(),
            digest: "ab".into(),
            samples: 480,
            metrics: Metrics::new(),
            staleness: 2,
            client_state: None,
        };
        let stale_payload = stale.to_new_event("j", "worker:w1").payload;
        assert_eq!(stale_payload["staleness"], 2);
        assert_eq!(decode_update(&stale_payload), Some(stale.clone()));
        assert_eq!(JobEvent::from_envelope(&envelope(stale_payload)).expect("decodes"), stale);
        assert_eq!(JobEvent::from_envelope(&envelope(payload.clone())).expect("decodes"), event);
        // Integer metrics read as numbers; an unknown extra field is ignored, as serde does.
        let mut extra = payload.clone();
        extra["metrics"]["n"] = serde_json::json!(7);
        extra["note"] = serde_json::json!("x");
        assert_eq!(JobEvent::from_envelope(&envelope(extra)).expect("decodes"), event);
        // Broken payloads fail with serde's error, naming the field.
        for (field, bad) in [("round", serde_json::json!(-1)), ("samples", serde_json::json!("many")), ("task_id", serde_json::Value::Null)]
        {
            let mut p = payload.clone();
            p[field] = bad;
            assert_eq!(decode_update(&p), None, "{field}");
            let err = JobEvent::from_envelope(&envelope(p)).expect_err("refused").to_string();
            assert!(err.contains("UpdateReported"), "{err}");
        }
        let mut nan = payload;
        nan["metrics"]["loss"] = serde_json::Value::Null;
        assert!(JobEvent::from_envelope(&envelope(nan)).is_err());
    }
}
