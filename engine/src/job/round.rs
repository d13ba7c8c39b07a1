//! The round: which trainers train, what came in (updates, middle
//! aggregators' results), whether training closed, whether the coordinator
//! paired it, and for asynchronous jobs the buffer that carries updates from
//! one round into the next. From these: when an aggregator is ready, the
//! quorum, and when training is done.

use std::collections::{BTreeMap, BTreeSet};

use flame_events::algorithm::{Selection, over_commit};
use flame_events::job::TaskSpec;
use flame_events::protocol::UpdateRef;

use super::Job;

/// The latest round started: open from `RoundStarted` until `RoundAggregated`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Round {
    /// Its number (0 = none started yet).
    pub number: u32,
    /// Trainer tasks the selector chose (empty: every trainer with a worker).
    pub selected: BTreeSet<String>,
    /// Updates accepted, by task id.
    pub updates: BTreeMap<String, UpdateRef>,
    /// Middle aggregators' results, by task id.
    pub partials: BTreeMap<String, Partial>,
    /// Trainers whose training failed this round (`TrainingFailed`): they sit it out.
    #[serde(default)]
    pub failed: BTreeSet<String>,
    /// Whether it stopped taking updates (its deadline by quorum, or Oort's `aggr_num`).
    pub training_closed: bool,
    /// Coordinated jobs: whether the coordinator's pairing is in.
    pub paired: bool,
    /// Asynchronous jobs: what is in flight and what waits for the next buffer.
    pub buffer: Buffer,
}

/// Asynchronous (FedBuff) jobs: training that outlives the round that asked for it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Buffer {
    /// Trainers training now, with the round (and model) they started from.
    pub in_flight: BTreeMap<String, Dispatch>,
    /// Updates that arrived while the open round's buffer was full; they open the next one.
    pub queued: BTreeMap<String, UpdateRef>,
}

/// A middle aggregator's result in the open round.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Partial {
    /// Its model as an input one tier up: its task, digest and the samples behind it.
    pub update: UpdateRef,
    /// Digests of the trainers' updates it contains.
    pub inputs: Vec<String>,
}

/// Asynchronous jobs: a trainer's training in flight.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dispatch {
    /// The round that sent it.
    pub round: u32,
    /// The global model it trains from.
    pub model: String,
}

/// One input of an aggregator: an update (or a partial aggregate) and the trainers' digests inside it.
pub(super) struct Input<'a> {
    pub(super) update: &'a UpdateRef,
    pub(super) trainers: Vec<&'a str>,
}

impl Job {
    /// Trainers of the open round: selected (when a selector chose) and with a worker.
    pub fn round_trainers(&self) -> impl Iterator<Item = &TaskSpec> {
        self.trainers().filter(|t| self.in_round(t))
    }

    /// Whether `t` trains in the open round (without scanning the tasks).
    pub(super) fn in_round(&self, t: &TaskSpec) -> bool {
        let selected = &self.round.selected;
        t.is_data_consumer
            && !self.orphaned.contains(&t.task_id)
            && !self.round.failed.contains(&t.task_id)
            && (selected.is_empty() || selected.contains(&t.task_id))
    }

    /// Coordinated jobs: whether the open round still waits for the coordinator's pairing.
    pub fn awaits_coordination(&self) -> bool {
        self.coordinator().is_some() && self.round_open() && !self.round.paired
    }

    /// Whether `t` may still bring an input to its aggregator in the open round:
    /// a round trainer that reported or may yet (training is open), or an
    /// aggregator that has its result or a child that still may.
    pub(super) fn expects(&self, t: &TaskSpec) -> bool {
        if t.is_data_consumer {
            self.round.updates.contains_key(&t.task_id) || (!self.round.training_closed && self.in_round(t))
        } else {
            self.round.partials.contains_key(&t.task_id) || self.children(&t.task_id).any(|c| self.expects(c))
        }
    }

    /// The inputs `task` has for the open round, in task order.
    pub(super) fn inputs_of<'a>(&'a self, task: &str) -> Vec<Input<'a>> {
        self.children(task)
            .filter_map(|c| match self.round.updates.get(&c.task_id) {
                Some(u) => Some(Input { update: u, trainers: vec![u.digest.as_str()] }),
                None => self
                    .round
                    .partials
                    .get(&c.task_id)
                    .map(|p| Input { update: &p.update, trainers: p.inputs.iter().map(String::as_str).collect() }),
            })
            .collect()
    }

    /// Whether aggregator `task` has every input it will get this round (at
    /// least one) and has not aggregated yet: time to ask it.
    pub fn ready(&self, task: &str) -> bool {
        if !self.round_open() || self.round.partials.contains_key(task) || self.awaits_coordination() {
            return false;
        }
        if self.is_async() {
            return self.ready_async(task);
        }
        let mut any = false;
        for c in self.children(task) {
            let has = self.round.updates.contains_key(&c.task_id) || self.round.partials.contains_key(&c.task_id);
            if !has && self.expects(c) {
                return false;
            }
            any |= has;
        }
        any
    }

    /// Asynchronous jobs: an aggregator over trainers (the top one in a
    /// two-tier job, a middle one in a hierarchical job) is ready when its
    /// buffer is full; a top aggregator over middle aggregators when every
    /// group has its result (or, after the deadline, every group that had
    /// updates), at least one.
    fn ready_async(&self, task: &str) -> bool {
        let over_trainers = self.children(task).any(|c| c.is_data_consumer);
        if over_trainers {
            let held = self.buffered_for(task);
            return held > 0 && (self.round.training_closed || held >= self.agg_goal().unwrap_or(1));
        }
        let middles: Vec<&TaskSpec> = self.children(task).collect();
        let done = |m: &&TaskSpec| {
            self.round.partials.contains_key(&m.task_id) || (self.round.training_closed && self.buffered_for(&m.task_id) == 0)
        };
        middles.iter().any(|m| self.round.partials.contains_key(&m.task_id)) && middles.iter().all(done)
    }

    /// Asynchronous jobs: updates in aggregator `task`'s buffer this round.
    pub(super) fn buffered_for(&self, task: &str) -> usize {
        self.round.updates.keys().filter(|t| self.parents.get(*t).is_some_and(|p| p == task)).count()
    }

    /// Asynchronous jobs: whether an update for aggregator `task` now joins
    /// the next round's buffer (this one is full, aggregated, or closed).
    pub(super) fn buffer_full(&self, task: &str) -> bool {
        !self.round_open()
            || self.round.training_closed
            || self.round.partials.contains_key(task)
            || self.buffered_for(task) >= self.agg_goal().unwrap_or(1)
    }

    /// The updates aggregator `task` combines this round.
    pub fn updates_for(&self, task: &str) -> Vec<UpdateRef> {
        self.inputs_of(task).into_iter().map(|i| i.update.clone()).collect()
    }

    /// Asynchronous jobs: updates per buffer.
    pub(super) fn agg_goal(&self) -> Option<usize> {
        match self.selection() {
            Selection::Buffered { goal, .. } => Some((goal as usize).max(1)),
            _ => None,
        }
    }

    /// Oort: updates that close a round.
    pub(super) fn oort_closes_at(&self) -> Option<usize> {
        match self.selection() {
            Selection::Oort { aggr_num } => Some(aggr_num as usize),
            _ => None,
        }
    }

    /// The trainers a round starting now takes: `k` per aggregation group for
    /// a random selector (seeded by the job's seed and the round, the same
    /// pick `flamectl plan` shows), Oort's utility-based pick, FedBuff's idle
    /// trainers up to its concurrency; none (meaning all) otherwise.
    pub fn select(&self, round: u32) -> Vec<String> {
        let seed = self.spec.as_ref().map_or(0, |s| s.seed);
        match self.selection() {
            Selection::All => Vec::new(),
            Selection::Buffered { concurrency, .. } => {
                // FedBuff: keep `concurrency` trainers busy under each aggregator
                // that buffers (the top one, or each middle one); idle ones are picked at random.
                let c = concurrency.map_or(usize::MAX, |c| c as usize);
                let in_flight = &self.round.buffer.in_flight;
                let top = self.aggregator().map(|a| a.task_id.clone());
                let mut groups: BTreeMap<&str, (Vec<String>, usize)> = BTreeMap::new();
                for t in self.active_trainers() {
                    let parent = self.parents.get(&t.task_id).map_or("", String::as_str);
                    let (idle, busy) = groups.entry(parent).or_default();
                    if in_flight.contains_key(&t.task_id) {
                        *busy += 1;
                    } else {
                        idle.push(t.task_id.clone());
                    }
                }
                let mut out: Vec<String> = groups
                    .into_iter()
                    .flat_map(|(parent, (idle, busy))| {
                        // The top aggregator's own trainers keep the two-tier pick.
                        let salt = if top.as_deref() == Some(parent) { self.selection().name() } else { parent };
                        flame_events::rng::choose(&idle, c.saturating_sub(busy).min(idle.len()), seed, round, salt)
                    })
                    .collect();
                out.sort();
                out
            }
            Selection::Oort { aggr_num } => {
                let candidates: Vec<String> = self.active_trainers().map(|t| t.task_id.clone()).collect();
                crate::oort::select(&candidates, &self.records.oort, over_commit(aggr_num as usize), seed, round)
            }
            Selection::Random { k } => {
                let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for t in self.active_trainers() {
                    let key = t.group_association.iter().map(|(c, g)| format!("{c}/{g}")).collect::<Vec<_>>().join(",");
                    groups.entry(key).or_default().push(t.task_id.clone());
                }
                let mut out: Vec<String> = groups
                    .iter()
                    .flat_map(|(key, members)| flame_events::rng::choose(members, (k as usize).min(members.len()), seed, round, key))
                    .collect();
                out.sort();
                out
            }
        }
    }

    /// Fewest updates a round may aggregate.
    pub fn quorum(&self) -> usize {
        let min_clients = self.spec.as_ref().and_then(|s| s.quorum).map(|q| q as usize);
        if let Some(goal) = self.agg_goal() {
            return min_clients.map_or(goal, |q| q.clamp(1, goal));
        }
        let all = if self.round.selected.is_empty() { self.trainers().count() } else { self.round.selected.len() };
        // Oort closes a round at aggr_num updates of the over-committed selection.
        let all = self.oort_closes_at().map_or(all, |n| n.min(all));
        min_clients.map_or(all, |q| q.clamp(1, all.max(1)))
    }

    /// Whether the open round has every update it will get (asynchronous
    /// jobs: every buffer is full).
    pub fn training_done(&self) -> bool {
        if self.is_async() {
            return self.round.training_closed
                || self
                    .aggregators()
                    .filter(|a| self.children(&a.task_id).any(|c| c.is_data_consumer))
                    .all(|a| self.buffer_full(&a.task_id));
        }
        self.round.training_closed || self.round_trainers().all(|t| self.round.updates.contains_key(&t.task_id))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use flame_events::algorithm::Selection;
    use flame_events::job::JobEvent;

    use crate::job::transitions::tests::aggregated;
    use crate::job::{JobCommand, Rejection};
    use crate::testing::{History, report, trained};

    #[test]
    fn a_random_selector_picks_k_trainers_per_round_and_only_they_report() {
        let base = History::created_with(6, |s| s.selection = Selection::Random { k: 1 }).started().initialized();
        let mut picks = BTreeSet::new();
        for round in 1..=6 {
            let mut job = base.job();
            (job.round.number, job.rounds_completed) = (round - 1, round - 1);
            let events = job.handle(JobCommand::StartRound { now_ms: 0, spent: Default::default() }).expect("round");
            let JobEvent::RoundStarted { selected, .. } = &events[0] else { panic!("{events:?}") };
            assert_eq!(selected.len(), 1, "k = 1 of 2 trainers");
            picks.insert(selected[0].clone());
            // The same round picks the same trainer again (seeded, recorded).
            assert_eq!(job.select(round), *selected);
        }
        assert_eq!(picks.len(), 2, "both trainers are picked over six rounds");

        let started = base.job().handle(JobCommand::StartRound { now_ms: 0, spent: Default::default() }).expect("round");
        let JobEvent::RoundStarted { selected, .. } = &started[0] else { panic!() };
        let (chosen, other) = (selected[0].clone(), if selected[0] == "t0" { "t1" } else { "t0" });
        let history = History { events: base.events.clone() }.then(started[0].clone());
        let job = history.job();
        assert_eq!(job.quorum(), 1);
        assert!(matches!(job.handle(report(other, 1, trained(1, other))), Err(Rejection::Unexpected(m)) if m.contains("not selected")));
        let accepted = job.handle(report(&chosen, 1, trained(1, &chosen))).expect("the chosen trainer reports");
        let mut job = job;
        for e in &accepted {
            job.apply(e);
        }
        assert!(job.training_done(), "one update of one selected trainer completes the round");
        let events = job.handle(report("agg", 1, aggregated(1))).expect("aggregate");
        assert!(matches!(&events[0], JobEvent::RoundAggregated { inputs, .. } if inputs.len() == 1));
    }
}
