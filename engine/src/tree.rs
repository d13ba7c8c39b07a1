//! The tree of aggregations the engine runs: every task's parent, the
//! reducer tasks it adds for rings, and a coordinated design's candidates.

use std::collections::BTreeMap;

use flame_events::job::TaskSpec;

use crate::definition::JobDefinition;
use crate::links::links;

/// How the engine runs a job: every task's parent (the task it uploads its
/// update or partial aggregate to; the top aggregator has none) and the
/// reducer tasks it adds for rings.
#[derive(Clone, Debug, PartialEq)]
pub struct Tree {
    /// Task id -> parent task id.
    pub uplinks: BTreeMap<String, String>,
    /// One task per ring group (`ring-<channel>-<group>`, role `ring-reducer`),
    /// placed on the ring leader's worker: it averages the members' updates,
    /// and its result goes up the ring leader's channel (hybrid) or is the
    /// global model (ring all-reduce without an aggregator).
    pub reducers: Vec<TaskSpec>,
    /// Coordinated designs: the coordinator's task.
    pub coordinator: Option<String>,
    /// Coordinated designs: task -> the aggregators it may upload to (the coordinator picks one each round).
    pub candidates: BTreeMap<String, Vec<String>>,
}

/// The tree of aggregations the engine runs for a job: two-tier,
/// hierarchical (any depth), ring all-reduce, hybrid and coordinated designs
/// (where a trainer's aggregator, among several, is picked each round).
pub fn derive(def: &JobDefinition, tasks: &[TaskSpec]) -> Result<Tree, String> {
    let l = links(def, tasks);
    let coordinators: Vec<&TaskSpec> = tasks.iter().filter(|t| l.coordinators.contains(t.role.as_str())).collect();
    let coordinator = match coordinators.as_slice() {
        [] => None,
        [one] => Some(one.task_id.clone()),
        many => return Err(format!("{} coordinator tasks; the engine runs one", many.len())),
    };
    let mut candidates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut parent = BTreeMap::new();
    let mut reducers = Vec::new();
    // Ring groups: the members report to a reducer on their leader's (lowest task id's) worker.
    let mut ring_of: BTreeMap<&str, String> = BTreeMap::new();
    for ((c, g), members) in &l.rings {
        let Some(leader) = members.iter().min() else { continue };
        let id = format!("ring-{c}-{g}");
        for m in members {
            if ring_of.insert(m, id.clone()).is_some() {
                return Err(format!("task '{m}' is in more than one ring; the engine runs one ring per task"));
            }
            parent.insert(m.to_string(), id.clone());
        }
        reducers.push(TaskSpec {
            task_id: id,
            role: "ring-reducer".into(),
            is_data_consumer: false,
            group_association: BTreeMap::from([(c.to_string(), g.to_string())]),
            channels: vec![c.to_string()],
            dataset: None,
            realm: tasks.iter().find(|t| t.task_id == *leader).and_then(|t| t.realm.clone()),
            colocate: Some(leader.to_string()),
        });
    }
    for t in tasks {
        let ups = l.task_ups.get(t.task_id.as_str()).map_or(&[][..], Vec::as_slice);
        let up = match ups {
            [] => None,
            [(c, g)] => match l.uppers.get(&(*c, *g)).map_or(&[][..], Vec::as_slice) {
                [one] => Some(one.to_string()),
                // Several aggregators on the trainer's group: the coordinator picks one each round.
                many if coordinator.is_some() && many.len() > 1 => {
                    let mut options: Vec<String> = many.iter().map(|m| m.to_string()).collect();
                    options.sort();
                    let first = options[0].clone();
                    candidates.insert(t.task_id.clone(), options);
                    Some(first)
                }
                none_or_many => {
                    return Err(format!(
                        "task '{}' uploads on channel '{c}' group '{g}', where {} task(s) aggregate; the engine needs exactly one",
                        t.task_id,
                        none_or_many.len()
                    ));
                }
            },
            many => {
                return Err(format!(
                    "task '{}' uploads on {} channels ({many:?}); the engine needs one parent per task",
                    t.task_id,
                    many.len()
                ));
            }
        };
        match (up, ring_of.get(t.task_id.as_str())) {
            // A ring member: its ring's result goes up instead (only the leader uploads).
            (Some(p), Some(ring)) => {
                parent.insert(ring.clone(), p);
            }
            (Some(p), None) => {
                parent.insert(t.task_id.clone(), p);
            }
            (None, _) => {}
        }
    }
    let all: Vec<&TaskSpec> = tasks.iter().chain(&reducers).filter(|t| Some(&t.task_id) != coordinator.as_ref()).collect();
    let roots: Vec<&str> = all.iter().filter(|t| !parent.contains_key(&t.task_id)).map(|t| t.task_id.as_str()).collect();
    let root = match roots.as_slice() {
        [one] if all.iter().any(|t| t.task_id == *one && !t.is_data_consumer) => *one,
        _ => {
            return Err(format!(
                "the job needs one top aggregator that every other task reports to, directly or through middle aggregators or rings; these tasks report to no one: {roots:?}"
            ));
        }
    };
    for t in &all {
        let mut at = t.task_id.as_str();
        for _ in 0..=all.len() {
            match parent.get(at) {
                Some(p) => at = p,
                None => break,
            }
        }
        if at != root {
            return Err(format!("task '{}' does not reach the top aggregator '{root}' through its aggregators", t.task_id));
        }
        if t.is_data_consumer && parent.values().any(|p| p == &t.task_id) {
            return Err(format!("task '{}' trains and also aggregates other tasks; the engine runs trainers as leaves", t.task_id));
        }
    }
    Ok(Tree { uplinks: parent, reducers, coordinator, candidates })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::testing::fixture;

    #[test]
    fn trees_for_two_tier_and_hierarchical_jobs() {
        let (def, tasks) = fixture("two-tier");
        let up = derive(&def, &tasks).expect("two-tier").uplinks;
        assert_eq!(up.len(), 3, "every trainer has the aggregator as parent");
        assert!(up.values().all(|p| p == "aggregator-0"));

        let (def, tasks) = fixture("hierarchical");
        let up = derive(&def, &tasks).expect("hierarchical").uplinks;
        let role = |id: &str| tasks.iter().find(|t| t.task_id == id).map(|t| t.role.as_str()).expect("task");
        assert_eq!(up.len(), tasks.len() - 1, "everyone but the top aggregator has a parent");
        for (child, parent) in &up {
            let want = if role(child) == "trainer" { "middle-aggregator" } else { "top-aggregator" };
            assert_eq!(role(parent), want, "{child} -> {parent}");
        }
        // Trainers of a group report to that group's middle aggregator.
        for t in tasks.iter().filter(|t| t.is_data_consumer) {
            let m = &up[&t.task_id];
            let group = |id: &str| tasks.iter().find(|x| x.task_id == id).and_then(|x| x.group_association.get("param-channel").cloned());
            assert_eq!(group(&t.task_id), group(m), "{} and {m}", t.task_id);
        }
    }

    #[test]
    fn rings_reduce_on_their_leader_and_hybrid_rings_report_to_the_aggregator() {
        let (def, tasks) = fixture("ring");
        let t = derive(&def, &tasks).expect("ring");
        assert_eq!(t.reducers.len(), 1, "one ring");
        let ring = &t.reducers[0];
        assert_eq!(ring.colocate.as_deref(), tasks.iter().map(|t| t.task_id.as_str()).min(), "on the lowest member's worker");
        assert!(tasks.iter().all(|m| t.uplinks[&m.task_id] == ring.task_id));
        assert!(!t.uplinks.contains_key(&ring.task_id), "without an aggregator the ring's mean is the global model");

        let (def, tasks) = fixture("hybrid");
        let t = derive(&def, &tasks).expect("hybrid");
        assert_eq!(t.reducers.len(), 2, "a ring per group (north, south)");
        let aggregator = tasks.iter().find(|t| !t.is_data_consumer).expect("aggregator");
        let mut sizes = vec![];
        for r in &t.reducers {
            assert_eq!(t.uplinks[&r.task_id], aggregator.task_id, "{} reports to the aggregator", r.task_id);
            let members: Vec<&String> = t.uplinks.iter().filter(|(_, p)| **p == r.task_id).map(|(c, _)| c).collect();
            let groups: BTreeSet<&String> = members
                .iter()
                .map(|m| &tasks.iter().find(|t| &&t.task_id == m).expect("member").group_association["ring-channel"])
                .collect();
            assert_eq!(groups.len(), 1, "{}: one ring group: {members:?}", r.task_id);
            sizes.push(members.len());
            assert_eq!(r.colocate.as_ref(), members.into_iter().min());
        }
        sizes.sort();
        assert_eq!(sizes, [2, 3], "north has two members, south three");
    }
}
