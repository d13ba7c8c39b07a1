//! Arbitrary bytes as what crosses the wire: a command as a worker decodes
//! it, a report as the engine decodes it and hands it to a running job (the
//! recorded digits job, open in round 1), and a model blob as a worker
//! decodes it. None of them may panic, whatever the input; a report that
//! decodes is applied or refused, never more.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use flame_engine::job::{Job, JobCommand};
use flame_events::Envelope;
use flame_events::job::JobEvent;
use flame_events::protocol::{Command, Report};

/// The recorded digits job up to its first update of round 1.
fn running() -> &'static Job {
    static JOB: OnceLock<Job> = OnceLock::new();
    JOB.get_or_init(|| {
        let log = include_str!("../../tests/fixtures/logs/digits-two-tier.jsonl");
        let events: Vec<JobEvent> = log
            .lines()
            .map(|l| serde_json::from_str::<Envelope>(l).expect("recorded envelope"))
            .take_while(|e| e.event_type != "UpdateReported")
            .map(|e| JobEvent::from_envelope(&e).expect("recorded event"))
            .collect();
        Job::from_events(&events)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Command::decode(data);
    if let Ok(report) = serde_json::from_slice::<Report>(data) {
        let _ = running().handle(JobCommand::Report(report));
    }
    let _ = flame_workers::weights::decode_state(data);
});
