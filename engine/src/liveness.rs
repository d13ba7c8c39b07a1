//! Which workers a running job counts as live, from its reads of the worker
//! registry. Pure: the runner feeds it each read's outcome and the time.
//!
//! A worker is live while its registration is, and its heartbeats renew it
//! before it expires. Two things make a missing registration a poor sign of
//! a lost worker, and both are allowed for here:
//!
//! - one late heartbeat under load: a worker counts as live if either of the
//!   last two reads listed it;
//! - an outage of the registry itself (a NATS server failing over): workers
//!   cannot renew what the engine cannot read, and a failover longer than
//!   the registrations live would expire all of them at once. After a read
//!   fails, or a read finds the transport connected again since the last
//!   one (a read made while it was down waits for the reconnect and then
//!   succeeds on an expired registry), the workers live before stay live
//!   until `grace` has passed since, time for them to register again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flame_events::protocol::WorkerInfo;

/// The live workers as the registry reads so far say.
#[derive(Debug)]
pub struct Liveness {
    grace: Duration,
    /// The last successful read.
    previous: Option<Vec<WorkerInfo>>,
    /// What the job decides on, sorted by id; `None` before the first read.
    live: Option<Vec<WorkerInfo>>,
    /// The workers live when the registry went out of reach, and until when they stay live.
    outage: Option<(Vec<WorkerInfo>, Instant)>,
    /// The transport's connection count at the last successful read.
    connects: Option<u64>,
}

impl Liveness {
    /// Nothing read yet; `grace` is how long after the last failed read the
    /// workers live before it are kept live.
    pub fn new(grace: Duration) -> Self {
        Self { grace, previous: None, live: None, outage: None, connects: None }
    }

    /// A read at `at` listed `now_live`, the transport having made
    /// `connects` connections by then. Whether it found the transport
    /// connected again since the last read (counted as an outage).
    pub fn read_connected(&mut self, now_live: Vec<WorkerInfo>, at: Instant, connects: u64) -> bool {
        let reconnected = self.connects.replace(connects).is_some_and(|before| before != connects) && self.failed(at);
        self.read(now_live, at);
        reconnected
    }

    /// A read at `at` listed `now_live`.
    pub fn read(&mut self, now_live: Vec<WorkerInfo>, at: Instant) {
        if self.outage.as_ref().is_some_and(|(_, until)| at >= *until) {
            self.outage = None;
        }
        let mut by_id: BTreeMap<String, WorkerInfo> = BTreeMap::new();
        let kept = self.previous.iter().flatten().chain(self.outage.iter().flat_map(|(before, _)| before));
        // A later read's entry wins: it has the worker's latest registration.
        for w in kept.chain(now_live.iter()) {
            by_id.insert(w.id.clone(), w.clone());
        }
        self.previous = Some(now_live);
        self.live = Some(by_id.into_values().collect());
    }

    /// A read at `at` failed (or took too long). Whether there is a list to
    /// go on deciding with (none before the first successful read).
    pub fn failed(&mut self, at: Instant) -> bool {
        let Some(live) = &self.live else { return false };
        let before = match self.outage.take() {
            Some((before, _)) => before,
            None => live.clone(),
        };
        self.outage = Some((before, at + self.grace));
        true
    }

    /// The workers to decide on, sorted by id; `None` before the first read.
    pub fn live(&self) -> Option<&[WorkerInfo]> {
        self.live.as_deref()
    }

    /// Whether workers missing from the registry are being kept live after an outage.
    pub fn in_grace(&self) -> bool {
        self.outage.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str) -> WorkerInfo {
        WorkerInfo { id: id.into(), roles: vec!["trainer".into()], realm: "default".into(), device: "cpu".into(), group: None }
    }

    fn ids(l: &Liveness) -> Vec<&str> {
        l.live().unwrap_or_default().iter().map(|w| w.id.as_str()).collect()
    }

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn a_worker_missing_from_one_read_is_live_and_from_two_is_not() {
        let t = Instant::now();
        let mut l = Liveness::new(GRACE);
        assert!(l.live().is_none(), "nothing read, nothing to decide on");
        l.read(vec![w("a"), w("b")], t);
        assert_eq!(ids(&l), ["a", "b"]);
        l.read(vec![w("b")], t + Duration::from_secs(1));
        assert_eq!(ids(&l), ["a", "b"], "one late heartbeat is not a loss");
        l.read(vec![w("b")], t + Duration::from_secs(2));
        assert_eq!(ids(&l), ["b"]);
        assert!(!l.in_grace());
    }

    #[test]
    fn after_the_registry_was_out_of_reach_its_workers_have_the_grace_to_register_again() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::new(GRACE);
        assert!(!l.failed(t), "a failed first read leaves nothing to decide on");
        l.read(vec![w("a"), w("b"), w("c")], t);
        // The registry fails over for 12 s, longer than registrations live: when it is back, only
        // the workers whose heartbeat landed since are listed.
        assert!(l.failed(t + s(1)));
        assert_eq!(ids(&l), ["a", "b", "c"], "a failed read loses no one");
        assert!(l.failed(t + s(12)));
        l.read(vec![w("a")], t + s(13));
        l.read(vec![w("a")], t + s(14));
        assert_eq!(ids(&l), ["a", "b", "c"], "not lost while they could not renew");
        assert!(l.in_grace());
        l.read(vec![w("a"), w("b")], t + s(20));
        // The grace runs from the last failed read: at 22 s, c has been missing for two reads past it.
        l.read(vec![w("a"), w("b")], t + s(22));
        l.read(vec![w("a"), w("b")], t + s(23));
        assert_eq!(ids(&l), ["a", "b"], "c did not come back in the grace: lost");
        assert!(!l.in_grace());
    }

    #[test]
    fn failures_in_a_row_keep_what_was_live_before_the_first() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::new(GRACE);
        l.read(vec![w("a"), w("b")], t);
        assert!(l.failed(t + s(1)));
        // Back briefly with b expired, then out again: b is still among those kept.
        l.read(vec![w("a")], t + s(2));
        l.read(vec![w("a")], t + s(3));
        assert!(l.failed(t + s(4)));
        l.read(vec![w("a")], t + s(13));
        assert_eq!(ids(&l), ["a", "b"], "the grace runs from the last failure, over the list before the first");
        l.read(vec![w("a")], t + s(14));
        assert_eq!(ids(&l), ["a"]);
    }

    #[test]
    fn a_read_after_a_reconnect_counts_as_after_an_outage() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::new(GRACE);
        assert!(!l.read_connected(vec![w("a"), w("b")], t, 1), "the first read: nothing to compare with");
        assert!(!l.read_connected(vec![w("a"), w("b")], t + s(1), 1));
        // NATS restarted; the read waited for the reconnect and found every registration expired.
        assert!(l.read_connected(vec![], t + s(10), 2), "connected again since the last read");
        assert!(!l.read_connected(vec![w("a")], t + s(11), 2));
        assert_eq!(ids(&l), ["a", "b"], "not lost while they could not renew");
        l.read_connected(vec![w("a")], t + s(20), 2);
        l.read_connected(vec![w("a")], t + s(21), 2);
        assert_eq!(ids(&l), ["a"], "b did not come back in the grace: lost");
    }

    #[test]
    fn a_later_registration_replaces_the_one_kept() {
        let t = Instant::now();
        let mut l = Liveness::new(GRACE);
        l.read(vec![w("a")], t);
        assert!(l.failed(t + Duration::from_secs(1)));
        let mut moved = w("a");
        moved.group = Some("g".into());
        l.read(vec![moved], t + Duration::from_secs(2));
        assert_eq!(l.live().expect("read")[0].group.as_deref(), Some("g"), "the latest registration says who speaks for it");
    }
}
