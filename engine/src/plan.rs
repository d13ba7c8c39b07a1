//! Round plans: the DAG of steps one round runs, derived from the expanded
//! tasks, the design's channels (their direction comes from funcTags), the
//! selector and the synchronous/asynchronous mode.
//!
//! Steps per task, for each channel it is on:
//! - below its peer (fetch/upload tags): `fetch` after the upper task's
//!   `distribute`; `upload` after its own `aggregate` (middle tiers), its ring
//!   step (only the ring's leader uploads), or its `train`;
//! - above its peer (distribute/aggregate tags): `distribute` after its own
//!   fetches, `aggregate` after the uploads of the lower tasks in its group;
//! - on a ring (a channel pairing a role with itself): `ring_allreduce` after
//!   every member of the ring group has trained;
//! - data consumers `train` after their fetches;
//! - a coordinator's `coordinate` step comes first and the pairing of trainers
//!   with aggregators below it is decided at run time (aggregates are marked
//!   `dynamic` and list every candidate input).

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use flame_events::algorithm::{Selection, over_commit};
use flame_events::job::TaskSpec;

use crate::definition::JobDefinition;
use crate::links::{Links, links};

/// What a step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Decide this round's pairing of trainers and aggregators.
    Coordinate,
    /// Send the current model down a channel.
    Distribute,
    /// Receive the model from above.
    Fetch,
    /// Train on local data.
    Train,
    /// Average with the other members of a ring.
    RingAllreduce,
    /// Send an update up a channel.
    Upload,
    /// Combine the updates from below.
    Aggregate,
}

impl StepKind {
    fn name(self) -> &'static str {
        match self {
            Self::Coordinate => "coordinate",
            Self::Distribute => "distribute",
            Self::Fetch => "fetch",
            Self::Train => "train",
            Self::RingAllreduce => "ring_allreduce",
            Self::Upload => "upload",
            Self::Aggregate => "aggregate",
        }
    }
}

/// One step of a round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    /// Unique in the plan: `kind:task[:channel]`.
    pub id: String,
    /// What it does.
    pub kind: StepKind,
    /// The task that runs it.
    pub task_id: String,
    /// The channel it uses, if any.
    pub channel: Option<String>,
    /// Steps that must finish first.
    pub after: Vec<String>,
    /// For aggregates: how many inputs close it (fewer than `after` when over-committed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum: Option<usize>,
    /// For aggregates whose inputs the coordinator picks at run time.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dynamic: bool,
}

/// Synchronous rounds, or FedBuff's rolling aggregation.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// A barrier per round: every aggregate waits for its inputs.
    Sync,
    /// No barrier: an aggregation fires every `agg_goal` updates while
    /// `concurrency` trainers are in flight; the steps are one trainer's cycle.
    Async {
        /// Updates per aggregation.
        agg_goal: u64,
        /// Trainers training at once.
        concurrency: u64,
    },
}

/// One round's plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// Round number, from 1.
    pub round: u32,
    /// Sync or async.
    #[serde(flatten)]
    pub mode: Mode,
    /// Trainers chosen by the selector for this round.
    pub selected: Vec<String>,
    /// Steps in a topological order.
    pub steps: Vec<Step>,
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// The steps depend on each other in a circle (the design's checks should prevent this).
    #[error("the round plan has a dependency cycle through step '{0}'")]
    Cycle(String),
}

/// The step graph under construction, with each step id's node.
struct Builder {
    graph: DiGraph<Step, ()>,
    index: BTreeMap<String, NodeIndex>,
}

impl Builder {
    fn add(&mut self, kind: StepKind, task: &str, channel: Option<&str>) -> String {
        let id = match channel {
            Some(c) => format!("{}:{task}:{c}", kind.name()),
            None => format!("{}:{task}", kind.name()),
        };
        if !self.index.contains_key(&id) {
            let step = Step {
                id: id.clone(),
                kind,
                task_id: task.to_string(),
                channel: channel.map(str::to_string),
                after: Vec::new(),
                quorum: None,
                dynamic: false,
            };
            let n = self.graph.add_node(step);
            self.index.insert(id.clone(), n);
        }
        id
    }

    fn edge(&mut self, from: &str, to: &str) {
        if let (Some(&a), Some(&b)) = (self.index.get(from), self.index.get(to))
            && !self.graph.contains_edge(a, b)
        {
            self.graph.add_edge(a, b, ());
        }
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut Step> {
        self.index.get(id).map(|&n| &mut self.graph[n])
    }
}

/// The plan of round `round` for a job's tasks (as expanded), whose trainers
/// are picked by `selection` with the job's `seed`.
pub fn build(def: &JobDefinition, tasks: &[TaskSpec], selection: Selection, seed: u64, round: u32) -> Result<Plan, Error> {
    let Links { coordinators, uppers, lowers, rings, task_ups, task_downs } = links(def, tasks);
    let by_id: BTreeMap<&str, &TaskSpec> = tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();

    // Selection: which data consumers take part this round, per aggregation group.
    let trainers: Vec<String> = tasks.iter().filter(|t| t.is_data_consumer).map(|t| t.task_id.clone()).collect();
    let mut selected: BTreeSet<String> = trainers.iter().cloned().collect();
    let mut quorum: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    if matches!(selection, Selection::Random { .. } | Selection::Oort { .. }) {
        selected.clear();
        for (key, members) in &lowers {
            let data: Vec<String> =
                members.iter().filter(|m| by_id.get(*m).is_some_and(|t| t.is_data_consumer)).map(|m| m.to_string()).collect();
            if data.is_empty() {
                continue;
            }
            let (take, need) = match selection {
                Selection::Random { k } => {
                    let k = (k as usize).min(data.len());
                    (k, k)
                }
                Selection::Oort { aggr_num } => {
                    // Oort over-commits by 30% and closes the round at aggr_num updates.
                    let need = (aggr_num as usize).clamp(1, data.len());
                    (over_commit(need).min(data.len()), need)
                }
                Selection::All | Selection::Buffered { .. } => (data.len(), data.len()),
            };
            selected.extend(flame_events::rng::choose(&data, take, seed, round, &format!("{}/{}", key.0, key.1)));
            quorum.insert(*key, need);
        }
        // Trainers that only sit on rings (no aggregator) are always in.
        for t in &trainers {
            if !task_ups.contains_key(t.as_str()) {
                selected.insert(t.clone());
            }
        }
    }
    let active = |t: &str| by_id.get(t).is_some_and(|s| !s.is_data_consumer) || selected.contains(t);

    let mut b = Builder { graph: DiGraph::new(), index: BTreeMap::new() };
    let coordinate: Vec<String> =
        tasks.iter().filter(|t| coordinators.contains(t.role.as_str())).map(|t| b.add(StepKind::Coordinate, &t.task_id, None)).collect();
    let dynamic = !coordinate.is_empty();

    // Ring leaders: the lowest task id of each ring group uploads for it.
    let mut ring_of: BTreeMap<&str, (&str, Vec<&str>)> = BTreeMap::new();
    for ((c, _), members) in &rings {
        let members: Vec<&str> = members.iter().copied().filter(|m| active(m)).collect();
        for m in &members {
            ring_of.insert(m, (c, members.clone()));
        }
    }
    let uploads_from = |t: &str| ring_of.get(t).is_none_or(|(_, members)| members.iter().min() == Some(&t));

    for t in tasks.iter().filter(|t| active(&t.task_id)) {
        let id = t.task_id.as_str();
        let ups = task_ups.get(id).cloned().unwrap_or_default();
        let downs = task_downs.get(id).cloned().unwrap_or_default();
        let mut fetched = Vec::new();
        for (c, g) in &ups {
            let f = b.add(StepKind::Fetch, id, Some(c));
            for u in uppers.get(&(*c, *g)).into_iter().flatten() {
                let d = b.add(StepKind::Distribute, u, Some(c));
                b.edge(&d, &f);
            }
            for k in &coordinate {
                b.edge(k, &f);
            }
            fetched.push(f);
        }
        for (c, _) in &downs {
            let d = b.add(StepKind::Distribute, id, Some(c));
            for f in &fetched {
                b.edge(f, &d);
            }
            for k in &coordinate {
                b.edge(k, &d);
            }
        }
        let mut done = Vec::new();
        if t.is_data_consumer {
            let tr = b.add(StepKind::Train, id, None);
            for f in &fetched {
                b.edge(f, &tr);
            }
            done.push(tr);
        }
        if let Some((c, members)) = ring_of.get(id) {
            let r = b.add(StepKind::RingAllreduce, id, Some(c));
            for m in members {
                let tr = b.add(StepKind::Train, m, None);
                b.edge(&tr, &r);
            }
            done = vec![r];
        }
        for (c, _) in &downs {
            done.push(b.add(StepKind::Aggregate, id, Some(c)));
        }
        if uploads_from(id) {
            for (c, _) in &ups {
                let u = b.add(StepKind::Upload, id, Some(c));
                for d in &done {
                    b.edge(d, &u);
                }
            }
        }
    }
    // Aggregates wait for the uploads of their group (every candidate when the coordinator pairs at run time).
    for ((c, g), ups) in &uppers {
        let candidates: Vec<&str> = if dynamic {
            lowers.iter().filter(|((lc, _), _)| lc == c).flat_map(|(_, m)| m.iter().copied()).collect()
        } else {
            lowers.get(&(*c, *g)).cloned().unwrap_or_default()
        };
        for u in ups {
            let a = format!("aggregate:{u}:{c}");
            if !b.index.contains_key(&a) {
                continue;
            }
            let mut inputs = 0;
            for l in candidates.iter().filter(|l| active(l) && uploads_from(l)) {
                let up = format!("upload:{l}:{c}");
                if b.index.contains_key(&up) {
                    b.edge(&up, &a);
                    inputs += 1;
                }
            }
            if let Some(step) = b.step_mut(&a) {
                step.dynamic = dynamic;
                step.quorum = quorum.get(&(*c, *g)).copied().filter(|q| *q < inputs);
            }
        }
    }

    let order = toposort(&b.graph, None).map_err(|cycle| Error::Cycle(b.graph[cycle.node_id()].id.clone()))?;
    let steps = order
        .into_iter()
        .map(|n| {
            let mut step = b.graph[n].clone();
            let mut after: Vec<String> =
                b.graph.neighbors_directed(n, petgraph::Direction::Incoming).map(|p| b.graph[p].id.clone()).collect();
            after.sort();
            step.after = after;
            step
        })
        .collect();
    let mode = match selection {
        Selection::Buffered { goal, concurrency } => {
            Mode::Async { agg_goal: u64::from(goal.max(1)), concurrency: concurrency.map_or(trainers.len() as u64, u64::from).max(1) }
        }
        _ => Mode::Sync,
    };
    Ok(Plan { round, mode, selected: selected.into_iter().collect(), steps })
}

impl Plan {
    /// Graphviz DOT of the steps and their dependencies.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph plan {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n");
        for s in &self.steps {
            out.push_str(&format!(
                "  \"{}\" [label=\"{}\\n{}{}\"];\n",
                s.id,
                s.kind.name(),
                s.task_id,
                s.channel.as_deref().map(|c| format!("\\n{c}")).unwrap_or_default()
            ));
        }
        for s in &self.steps {
            for a in &s.after {
                out.push_str(&format!("  \"{a}\" -> \"{}\";\n", s.id));
            }
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixture;

    fn ids(plan: &Plan, kind: StepKind) -> Vec<String> {
        plan.steps.iter().filter(|s| s.kind == kind).map(|s| s.id.clone()).collect()
    }

    fn after<'a>(plan: &'a Plan, id: &str) -> &'a [String] {
        &plan.steps.iter().find(|s| s.id == id).unwrap_or_else(|| panic!("no step {id} in {:#?}", plan.steps)).after
    }

    /// Properties every plan has: topological order, one train per selected
    /// data consumer, every aggregate after all its inputs' uploads.
    fn check_invariants(plan: &Plan, tasks: &[TaskSpec]) {
        let mut seen = BTreeSet::new();
        for s in &plan.steps {
            for a in &s.after {
                assert!(seen.contains(a), "{} comes before its dependency {a}", s.id);
            }
            assert!(seen.insert(s.id.clone()), "step {} twice", s.id);
        }
        for t in tasks.iter().filter(|t| t.is_data_consumer && plan.selected.contains(&t.task_id)) {
            assert_eq!(
                plan.steps.iter().filter(|s| s.kind == StepKind::Train && s.task_id == t.task_id).count(),
                1,
                "{} trains once",
                t.task_id
            );
        }
        for s in plan.steps.iter().filter(|s| s.kind == StepKind::Aggregate) {
            assert!(!s.after.is_empty() && s.after.iter().all(|a| a.starts_with("upload:")), "{} waits on uploads: {:?}", s.id, s.after);
        }
    }

    #[test]
    fn two_tier_with_a_random_selector_trains_k_trainers() {
        let (def, tasks) = fixture("two-tier");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        assert_eq!(p.mode, Mode::Sync);
        assert_eq!(p.selected.len(), 2, "k = 2 of 3 trainers: {:?}", p.selected);
        let mut uploads = vec![];
        for t in tasks.iter().filter(|t| t.is_data_consumer) {
            let id = &t.task_id;
            if p.selected.contains(id) {
                assert_eq!(after(&p, &format!("fetch:{id}:param-channel")), ["distribute:aggregator-0:param-channel"]);
                assert_eq!(after(&p, &format!("train:{id}")), [format!("fetch:{id}:param-channel")]);
                uploads.push(format!("upload:{id}:param-channel"));
            } else {
                assert!(p.steps.iter().all(|s| s.task_id != *id), "{id} is not selected and has no step");
            }
        }
        let mut inputs = after(&p, "aggregate:aggregator-0:param-channel").to_vec();
        inputs.sort();
        assert_eq!(inputs, uploads);
    }

    #[test]
    fn two_tier_with_ten_trainers_aggregates_all_of_them() {
        let (def, tasks) = fixture("two-tier-ten");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        assert_eq!(ids(&p, StepKind::Train).len(), 10);
        assert_eq!(after(&p, "aggregate:aggregator-0:param-channel").len(), 10);
    }

    #[test]
    fn hierarchical_rounds_go_through_the_middle_tier() {
        let (def, tasks) = fixture("hierarchical");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        for group in ["west", "east"] {
            let mid = tasks
                .iter()
                .find(|t| t.role == "middle-aggregator" && t.group_association["param-channel"] == group)
                .expect("middle aggregator")
                .task_id
                .clone();
            let trainers: Vec<String> = tasks
                .iter()
                .filter(|t| t.is_data_consumer && t.group_association["param-channel"] == group)
                .map(|t| format!("upload:{}:param-channel", t.task_id))
                .collect();
            assert_eq!(trainers.len(), if group == "west" { 2 } else { 3 });
            assert_eq!(after(&p, &format!("aggregate:{mid}:param-channel")), trainers.as_slice(), "{group}");
            assert_eq!(after(&p, &format!("upload:{mid}:global-channel")), [format!("aggregate:{mid}:param-channel")]);
            assert_eq!(after(&p, &format!("distribute:{mid}:param-channel")), [format!("fetch:{mid}:global-channel")]);
        }
        assert_eq!(after(&p, "aggregate:top-aggregator-0:global-channel").len(), 2);
        assert_eq!(p.steps.last().map(|s| s.id.as_str()), Some("aggregate:top-aggregator-0:global-channel"));
    }

    #[test]
    fn ring_all_reduce_has_no_aggregator() {
        let (def, tasks) = fixture("ring");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        assert!(ids(&p, StepKind::Aggregate).is_empty() && ids(&p, StepKind::Upload).is_empty());
        let rings = ids(&p, StepKind::RingAllreduce);
        assert_eq!(rings.len(), 3);
        for r in &rings {
            assert_eq!(after(&p, r), ["train:trainer-0", "train:trainer-1", "train:trainer-2"]);
        }
    }

    #[test]
    fn hybrid_rings_then_one_member_per_group_uploads() {
        let (def, tasks) = fixture("hybrid");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        assert_eq!(ids(&p, StepKind::RingAllreduce).len(), 5);
        let mut uploads = ids(&p, StepKind::Upload);
        uploads.sort();
        assert_eq!(uploads.len(), 2, "one upload per ring group: {uploads:?}");
        for u in &uploads {
            let task = u.split(':').nth(1).expect("task");
            assert_eq!(after(&p, u), [format!("ring_allreduce:{task}:ring-channel")]);
        }
        let mut inputs = after(&p, "aggregate:aggregator-0:global-channel").to_vec();
        inputs.sort();
        assert_eq!(inputs, uploads);
    }

    #[test]
    fn fedbuff_is_a_rolling_plan() {
        let (def, tasks) = fixture("async-hierarchical");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        assert_eq!(p.mode, Mode::Async { agg_goal: 2, concurrency: 3 });
    }

    #[test]
    fn parallel_experiments_stay_separate() {
        // Two groups on one channel, an aggregator for each: two independent models.
        let (def, tasks) = fixture("parallel");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        check_invariants(&p, &tasks);
        let aggs = ids(&p, StepKind::Aggregate);
        assert_eq!(aggs.len(), 2);
        for a in &aggs {
            let agg = tasks.iter().find(|t| a == &format!("aggregate:{}:param-channel", t.task_id)).expect("aggregator");
            let lab = &agg.group_association["param-channel"];
            let mut want: Vec<String> = tasks
                .iter()
                .filter(|t| t.is_data_consumer && &t.group_association["param-channel"] == lab)
                .map(|t| format!("upload:{}:param-channel", t.task_id))
                .collect();
            want.sort();
            let mut got = after(&p, a).to_vec();
            got.sort();
            assert_eq!(got, want, "{a} aggregates {lab}'s trainers only");
        }
        assert_eq!(after(&p, &aggs[0]).len() + after(&p, &aggs[1]).len(), 5);
    }

    #[test]
    fn oort_over_commits_and_closes_at_its_quorum() {
        let (mut def, tasks) = fixture("two-tier-ten");
        def.model_spec.selector = Some(crate::definition::Sort {
            sort: "oort".into(),
            kwargs: [("aggr_num".to_string(), serde_json::json!(4))].into_iter().collect(),
        });
        let p = crate::testing::plan_round(&def, &tasks, 3).expect("plan");
        check_invariants(&p, &tasks);
        assert_eq!(p.selected.len(), 6, "4 plus 30% over-commit, rounded up");
        let agg = p.steps.iter().find(|s| s.kind == StepKind::Aggregate).expect("aggregate");
        assert_eq!((agg.after.len(), agg.quorum), (6, Some(4)));
    }

    #[test]
    fn plans_are_deterministic_and_selection_varies_by_round() {
        let (mut def, tasks) = fixture("two-tier-ten");
        def.model_spec.selector = Some(crate::definition::Sort {
            sort: "random".into(),
            kwargs: [("k".to_string(), serde_json::json!(3))].into_iter().collect(),
        });
        assert_eq!(crate::testing::plan_round(&def, &tasks, 1), crate::testing::plan_round(&def, &tasks, 1));
        let picks: BTreeSet<Vec<String>> = (1..=8).map(|r| crate::testing::plan_round(&def, &tasks, r).expect("plan").selected).collect();
        assert!(picks.len() > 1, "the random selector picks differently across rounds");
        assert!(picks.iter().all(|s| s.len() == 3));
    }

    #[test]
    fn dot_output_names_every_step_and_edge() {
        let (def, tasks) = fixture("two-tier");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        let dot = p.to_dot();
        assert!(dot.starts_with("digraph plan {"));
        assert_eq!(dot.matches(" -> ").count(), p.steps.iter().map(|s| s.after.len()).sum::<usize>());
        assert!(dot.contains(&format!("\"train:{}\"", p.selected[0])));
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::definition::{DataSpecEntry, Dataset, Design, JobFile, ModelSpec};

    /// A random valid design: `groups` groups of trainers (each with its own
    /// datasets), optionally a middle tier per group under one top aggregator,
    /// optionally a ring inside each group, and a selector.
    fn design(groups: &[usize], middle: bool, ring: bool, k: Option<u64>) -> JobDefinition {
        let names: Vec<String> = (0..groups.len()).map(|g| format!("g{g}")).collect();
        let mut roles = vec![];
        let mut channels = vec![];
        let trainer_assoc: Vec<_> = names
            .iter()
            .map(|g| {
                let mut a = json!({"param": g});
                if ring {
                    a["ring"] = json!(g);
                }
                a
            })
            .collect();
        roles.push(json!({"name": "trainer", "isDataConsumer": true, "groupAssociation": trainer_assoc}));
        channels.push(json!({"name": "param", "pair": ["trainer", "agg"], "groupBy": {"type": "tag", "value": names},
            "funcTags": {"trainer": ["fetch", "upload"], "agg": ["distribute", "aggregate"]}}));
        if ring {
            channels.push(json!({"name": "ring", "pair": ["trainer", "trainer"], "groupBy": {"type": "tag", "value": names}, "funcTags": {"trainer": ["ring_allreduce"]}}));
        }
        if middle {
            let assoc: Vec<_> = names.iter().map(|g| json!({"param": g, "global": "default"})).collect();
            roles.push(json!({"name": "agg", "replica": 1, "groupAssociation": assoc}));
            roles.push(json!({"name": "top", "replica": 1, "groupAssociation": [{"global": "default"}]}));
            channels.push(json!({"name": "global", "pair": ["top", "agg"], "groupBy": {"type": "tag", "value": ["default"]},
                "funcTags": {"top": ["distribute", "aggregate"], "agg": ["fetch", "upload"]}}));
        } else {
            let assoc: Vec<_> = names.iter().map(|g| json!({"param": g})).collect();
            roles.push(json!({"name": "agg", "replica": 1, "groupAssociation": assoc}));
        }
        let mut datasets = BTreeMap::new();
        let mut dataset_groups = BTreeMap::new();
        for (g, n) in names.iter().zip(groups) {
            let refs: Vec<String> = (0..*n).map(|i| format!("{g}-{i}.json")).collect();
            for r in &refs {
                datasets.insert(r.clone(), Dataset::new(r.clone(), format!("file:{r}.csv")));
            }
            dataset_groups.insert(g.clone(), refs);
        }
        let selector = match k {
            Some(k) => json!({"sort": "random", "kwargs": {"k": k}}),
            None => json!({"sort": "default", "kwargs": {}}),
        };
        JobDefinition {
            folder: "mem".into(),
            job: serde_json::from_value::<JobFile>(json!({"designId": "p"})).expect("job"),
            design: serde_json::from_value::<Design>(json!({"name": "p", "roles": roles, "channels": channels})).expect("design"),
            data_spec: vec![DataSpecEntry { role: "trainer".into(), dataset_groups, extra: Default::default() }],
            model_spec: serde_json::from_value::<ModelSpec>(json!({"selector": selector, "hyperparameters": {"rounds": 3, "seed": 5}}))
                .expect("model"),
            datasets,
            model_file: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn plans_of_random_designs_are_sound(
            groups in proptest::collection::vec(1usize..6, 1..5),
            middle in any::<bool>(),
            ring in any::<bool>(),
            k in proptest::option::of(1u64..4),
            round in 1u32..20,
        ) {
            let def = design(&groups, middle, ring, k);
            prop_assert_eq!(def.check(), vec![]);
            let tasks = crate::expand::tasks(&def).expect("expand");
            prop_assert_eq!(tasks.iter().filter(|t| t.is_data_consumer).count(), groups.iter().sum::<usize>());
            let p = crate::testing::plan_round(&def, &tasks, round).expect("acyclic");
            prop_assert_eq!(&p, &crate::testing::plan_round(&def, &tasks, round).expect("again"));

            let mut seen = BTreeSet::new();
            for s in &p.steps {
                for a in &s.after {
                    prop_assert!(seen.contains(a), "{} before {}", s.id, a);
                }
                seen.insert(s.id.clone());
            }
            for t in tasks.iter().filter(|t| t.is_data_consumer) {
                let trains = p.steps.iter().filter(|s| s.kind == StepKind::Train && s.task_id == t.task_id).count();
                prop_assert_eq!(trains, usize::from(p.selected.contains(&t.task_id)));
            }
            // Each group's aggregate waits for every upload of that group (one per ring when rings exist).
            for (gi, n) in groups.iter().enumerate() {
                let g = format!("g{gi}");
                let agg = tasks.iter().find(|t| t.role == "agg" && t.group_association["param"] == g).expect("agg");
                let step = p.steps.iter().find(|s| s.id == format!("aggregate:{}:param", agg.task_id));
                let members: Vec<&TaskSpec> = tasks.iter().filter(|t| t.is_data_consumer && t.group_association["param"] == g && p.selected.contains(&t.task_id)).collect();
                let expected = if members.is_empty() { 0 } else if ring { 1 } else { members.len() };
                prop_assert!(members.len() <= *n);
                match step {
                    Some(s) => {
                        prop_assert_eq!(s.after.len(), expected);
                        for u in &s.after {
                            let task = u.split(':').nth(1).expect("task");
                            prop_assert!(members.iter().any(|m| m.task_id == task), "{} feeds {} from outside its group", u, s.id);
                        }
                    }
                    None => prop_assert!(!middle || expected == 0),
                }
            }
        }
    }
}

#[cfg(test)]
mod coordinated {
    use super::*;
    use crate::testing::fixture;

    #[test]
    fn the_coordinator_decides_first_and_aggregates_are_dynamic() {
        // Flame's coordinated hierarchical layout: a coordinator talks to every
        // tier and decides each round which middle aggregator serves which trainers.
        let (def, tasks) = fixture("coordinated");
        assert_eq!(tasks.iter().filter(|t| t.role == "middle-aggregator").count(), 2);
        let t = crate::tree::derive(&def, &tasks).expect("coordinated");
        assert_eq!(t.coordinator.as_deref(), Some("coordinator-0"));
        let trainers: Vec<&TaskSpec> = tasks.iter().filter(|t| t.is_data_consumer).collect();
        assert_eq!(t.candidates.len(), trainers.len(), "every trainer may go to either middle aggregator");
        assert!(t.candidates.values().all(|c| c == &["middle-aggregator-0", "middle-aggregator-1"]));
        assert_eq!(t.uplinks["middle-aggregator-0"], "top-aggregator-0");
        let p = crate::testing::plan_round(&def, &tasks, 1).expect("plan");
        assert_eq!(p.steps[0].id, "coordinate:coordinator-0");
        for s in p.steps.iter().filter(|s| s.kind == StepKind::Fetch) {
            assert!(s.after.contains(&"coordinate:coordinator-0".to_string()), "{} waits for the coordinator", s.id);
        }
        let middles: Vec<&Step> =
            p.steps.iter().filter(|s| s.kind == StepKind::Aggregate && s.channel.as_deref() == Some("param-channel")).collect();
        assert_eq!(middles.len(), 2);
        for m in middles {
            assert!(m.dynamic, "{} is paired at run time", m.id);
            assert_eq!(m.after.len(), 4, "every trainer is a candidate input of {}", m.id);
        }
        // No step uses a coordination channel as if it carried model updates.
        assert!(p.steps.iter().all(|s| s.channel.as_deref().is_none_or(|c| !c.ends_with("coord-channel"))));
    }
}
