//! Designs and datasets registered through the management API: each is a
//! small stream of its own (`design-<id>`, `dataset-<id>`) whose latest
//! `ResourcePut` holds the whole document (Flame's JSON, unknown fields kept)
//! until a `ResourceRemoved`.

use serde_json::Value;

use crate::{Actor, Envelope, NewEvent};

/// What kind of resource a stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A design: Flame's topology and its schema.
    Design,
    /// A dataset: where data lives and in which realm.
    Dataset,
}

impl Kind {
    /// The name used in stream ids and messages (`design`, `dataset`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Design => "design",
            Self::Dataset => "dataset",
        }
    }

    /// The stream of the resource `id`.
    pub fn stream_id(self, id: &str) -> String {
        format!("{}-{id}", self.name())
    }

    /// The prefix of every stream of this kind.
    pub fn stream_prefix(self) -> String {
        format!("{}-", self.name())
    }
}

/// An event of a resource's stream.
#[derive(Clone, Debug, PartialEq)]
pub enum ResourceEvent {
    /// The whole resource, as it is from now on.
    Put(Value),
    /// The resource is gone (its events stay).
    Removed,
}

impl ResourceEvent {
    /// The event's type name, as stored.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Put(_) => "ResourcePut",
            Self::Removed => "ResourceRemoved",
        }
    }

    /// Wraps the event for appending to resource `id` of `kind`.
    pub fn to_new_event(&self, kind: Kind, id: &str, actor: &Actor) -> NewEvent {
        let payload = match self {
            Self::Put(body) => body.clone(),
            Self::Removed => Value::Object(Default::default()),
        };
        NewEvent::new(self.event_type(), payload, actor.to_string()).correlated(kind.stream_id(id))
    }

    /// Reads a stored event of a resource stream; `None` for a type this
    /// version does not know (it is skipped, not misread).
    pub fn from_envelope(e: &Envelope) -> Option<Self> {
        match e.event_type.as_str() {
            "ResourcePut" => Some(Self::Put(e.payload.clone())),
            "ResourceRemoved" => Some(Self::Removed),
            _ => None,
        }
    }
}

/// The resource a stream's events leave: its document and the stream version, or `None` when removed or never put.
pub fn current(events: &[Envelope]) -> Option<(u64, Value)> {
    let last = events.last()?;
    match ResourceEvent::from_envelope(last)? {
        ResourceEvent::Put(body) => Some((last.version, body)),
        ResourceEvent::Removed => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(e: &ResourceEvent, version: u64) -> Envelope {
        let n = e.to_new_event(Kind::Design, "mnist", &Actor::user("ada"));
        Envelope {
            event_id: n.event_id,
            stream_id: Kind::Design.stream_id("mnist"),
            version,
            position: version,
            event_type: n.event_type,
            schema_version: n.schema_version,
            payload: n.payload,
            recorded_at: chrono::Utc::now(),
            causation_id: None,
            correlation_id: n.correlation_id,
            actor: n.actor,
        }
    }

    #[test]
    fn the_latest_put_is_the_resource_until_it_is_removed() {
        let put = |name: &str| ResourceEvent::Put(serde_json::json!({"name": name}));
        let mut events = vec![stored(&put("a"), 1), stored(&put("b"), 2)];
        assert_eq!(current(&events), Some((2, serde_json::json!({"name": "b"}))));
        assert_eq!(events[0].actor, "user:ada");
        assert_eq!(events[0].correlation_id.as_deref(), Some("design-mnist"));
        events.push(stored(&ResourceEvent::Removed, 3));
        assert_eq!(current(&events), None);
        assert_eq!(current(&[]), None);
    }
}
