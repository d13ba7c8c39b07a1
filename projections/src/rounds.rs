//! The rounds of a job: when each started and closed, how many updates went
//! into it, and how its global model scored.

use chrono::{DateTime, Utc};
use serde::Serialize;

use flame_events::Envelope;
use flame_events::job::{JobEvent, Metrics};

/// One round of a job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Round {
    /// Round number, from 1.
    pub round: u32,
    /// Digest of the model the round started from.
    pub start_model: String,
    /// Digest of the model it produced, once aggregated.
    pub model: Option<String>,
    /// Updates accepted.
    pub updates: usize,
    /// Training samples behind those updates.
    pub samples: u64,
    /// Evaluation of the produced model.
    pub metrics: Metrics,
    /// When the round started.
    pub started_at: DateTime<Utc>,
    /// When it was aggregated.
    pub closed_at: Option<DateTime<Utc>>,
}

impl Round {
    /// Seconds from start to aggregate, once closed.
    pub fn seconds(&self) -> Option<f64> {
        self.closed_at.map(|c| (c - self.started_at).num_microseconds().unwrap_or(0) as f64 / 1e6)
    }
}

/// Folds one event into the rounds read model. Events of other types and
/// undecodable ones are skipped: this view never blocks on a bad event.
pub fn apply(rounds: &mut Vec<Round>, e: &Envelope) {
    let Ok(event) = JobEvent::from_envelope(e) else {
        return;
    };
    match event {
        JobEvent::RoundStarted { round, global_model } => rounds.push(Round {
            round,
            start_model: global_model,
            model: None,
            updates: 0,
            samples: 0,
            metrics: Metrics::new(),
            started_at: e.recorded_at,
            closed_at: None,
        }),
        JobEvent::UpdateReported { round, samples, .. } => {
            if let Some(r) = rounds.iter_mut().rev().find(|r| r.round == round) {
                r.updates += 1;
                r.samples += samples;
            }
        }
        JobEvent::RoundAggregated { round, digest, metrics, .. } => {
            if let Some(r) = rounds.iter_mut().rev().find(|r| r.round == round) {
                r.model = Some(digest);
                r.metrics = metrics;
                r.closed_at = Some(e.recorded_at);
            }
        }
        _ => {}
    }
}

/// The rounds of a job's events, in order.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Vec<Round> {
    let mut rounds = Vec::new();
    for e in events {
        apply(&mut rounds, e);
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(version: u64, e: &JobEvent) -> Envelope {
        let n = e.to_new_event("j", "engine");
        Envelope {
            event_id: n.event_id,
            stream_id: "job-j".into(),
            version,
            position: version,
            event_type: n.event_type,
            schema_version: 1,
            payload: n.payload,
            recorded_at: DateTime::from_timestamp(1_000 + version as i64, 0).expect("time"),
            causation_id: None,
            correlation_id: Some("j".into()),
            actor: n.actor,
        }
    }

    fn update(round: u32, samples: u64) -> JobEvent {
        JobEvent::UpdateReported { round, task_id: "t".into(), worker_id: "w".into(), digest: "u".into(), samples, metrics: Metrics::new() }
    }

    #[test]
    fn rounds_count_updates_and_take_the_aggregate() {
        let events: Vec<Envelope> = [
            JobEvent::JobStarted {},
            JobEvent::RoundStarted { round: 1, global_model: "m0".into() },
            update(1, 10),
            update(1, 30),
            JobEvent::RoundAggregated {
                round: 1,
                digest: "m1".into(),
                inputs: vec![],
                metrics: Metrics::from([("accuracy".into(), 0.5)]),
                optimizer_state: None,
            },
            JobEvent::RoundStarted { round: 2, global_model: "m1".into() },
            update(2, 5),
        ]
        .iter()
        .enumerate()
        .map(|(i, e)| envelope(i as u64 + 1, e))
        .collect();
        let rounds = fold(&events);
        assert_eq!(rounds.len(), 2);
        assert_eq!((rounds[0].updates, rounds[0].samples, rounds[0].model.as_deref()), (2, 40, Some("m1")));
        assert_eq!(rounds[0].metrics["accuracy"], 0.5);
        assert_eq!(rounds[0].seconds(), Some(3.0));
        assert_eq!((rounds[1].updates, rounds[1].model.as_deref(), rounds[1].seconds()), (1, None, None));
        // Folding a prefix and then the rest equals folding everything.
        let mut partial = fold(&events[..4]);
        for e in &events[4..] {
            apply(&mut partial, e);
        }
        assert_eq!(partial, rounds);
    }
}
