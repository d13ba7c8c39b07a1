//! Schema evolution: stored events keep the schema version they were written
//! with; registered functions lift old payloads to the current version on read.

use std::collections::HashMap;

use serde_json::Value;

use crate::Envelope;
use crate::store::Error;

type Upcaster = Box<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// Functions that lift `(event type, schema version n)` payloads to version n + 1.
#[derive(Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), Upcaster>,
}

impl Upcasters {
    /// Registers the step from `from_version` to `from_version + 1` for an event type.
    pub fn register(
        &mut self,
        event_type: &str,
        from_version: u32,
        step: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.steps.insert((event_type.to_string(), from_version), Box::new(step));
        self
    }

    /// Lifts an event through every registered step; its `schema_version` says where it ended.
    pub fn upcast(&self, mut e: Envelope) -> Result<Envelope, Error> {
        while let Some(step) = self.steps.get(&(e.event_type.clone(), e.schema_version)) {
            e.payload = step(e.payload).map_err(|reason| Error::Decode {
                stream: e.stream_id.clone(),
                version: e.version,
                event_type: e.event_type.clone(),
                reason: format!("upcasting from schema version {}: {reason}", e.schema_version),
            })?;
            e.schema_version += 1;
        }
        Ok(e)
    }
}
