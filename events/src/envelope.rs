//! The event envelope: what every stored event carries besides its payload.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An event as stored: payload plus identity, ordering and provenance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id (UUID v7); also the NATS `Nats-Msg-Id`, so re-publishing is idempotent.
    pub event_id: Uuid,
    /// The stream this event belongs to, e.g. `job-<id>`.
    pub stream_id: String,
    /// Position inside the stream: 1, 2, 3, ... with no gaps.
    pub version: u64,
    /// Position in the global log, a total order over all streams, assigned at commit.
    pub position: u64,
    /// The event's type name, e.g. `RoundAggregated`.
    pub event_type: String,
    /// Schema version of the payload for this event type.
    pub schema_version: u32,
    /// The event's data.
    pub payload: serde_json::Value,
    /// When the store committed the event.
    pub recorded_at: DateTime<Utc>,
    /// The event or command that caused this one.
    pub causation_id: Option<String>,
    /// The job (or other unit of work) this event is part of.
    pub correlation_id: Option<String>,
    /// Who caused it: `user:<name>`, `engine`, or `worker:<id>`.
    pub actor: String,
}

/// An event to append: everything but what the store assigns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Unique id; appending an id that is already stored is a no-op.
    pub event_id: Uuid,
    /// The event's type name.
    pub event_type: String,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// The event's data.
    pub payload: serde_json::Value,
    /// The event or command that caused this one.
    pub causation_id: Option<String>,
    /// The job this event is part of.
    pub correlation_id: Option<String>,
    /// Who caused it.
    pub actor: String,
}

impl NewEvent {
    /// A new event with a fresh UUID v7 and no causation.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value, actor: impl Into<String>) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            causation_id: None,
            correlation_id: None,
            actor: actor.into(),
        }
    }

    /// Sets the correlation id (the job).
    pub fn correlated(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets the causation id.
    pub fn caused_by(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = Some(causation_id.into());
        self
    }
}

/// Who caused an event, as envelopes record it (`user:<name>`, `engine`, `worker:<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Actor {
    /// A person, through flamectl or the management API.
    User(String),
    /// The engine's own decisions (placing tasks, starting rounds, deadlines).
    Engine,
    /// A worker, through its reports.
    Worker(String),
    /// The decisions of one named engine replica (`flame-engine serve --replica-id`).
    Replica(String),
}

impl Actor {
    /// A person by name.
    pub fn user(name: impl Into<String>) -> Self {
        Self::User(name.into())
    }

    /// A worker by id.
    pub fn worker(id: impl Into<String>) -> Self {
        Self::Worker(id.into())
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(name) => write!(f, "user:{name}"),
            Self::Engine => f.write_str("engine"),
            Self::Worker(id) => write!(f, "worker:{id}"),
            Self::Replica(id) => write!(f, "engine:{id}"),
        }
    }
}

/// Why events were recorded: who asked, and the command or report they answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// Who.
    pub actor: Actor,
    /// The command or report id (a worker's report: the command it answers).
    pub causation: Option<String>,
}

impl Cause {
    /// Caused by `actor`, answering nothing in particular.
    pub fn by(actor: Actor) -> Self {
        Self { actor, causation: None }
    }
}
