//! The meaning checks of a job definition. Every rule reports each violation
//! with a JSON path (`file#/pointer`), a message and a fix hint; nothing here
//! stops at the first problem or panics.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::is_cyclic_directed;
use petgraph::graph::DiGraph;
use serde_json::Value;

use crate::definition::{Channel, JobDefinition, Problem, problem};
use crate::links::direction;

impl JobDefinition {
    /// Checks the parsed definition's meaning; returns every problem.
    pub fn check(&self) -> Vec<Problem> {
        check(self)
    }
}

/// Every problem with a parsed definition.
pub fn check(def: &JobDefinition) -> Vec<Problem> {
    let mut out = Vec::new();
    model_spec(def, &mut out);
    job(def, &mut out);
    names(def, &mut out);
    channels(def, &mut out);
    associations(def, &mut out);
    data_spec(def, &mut out);
    budgets(def, &mut out);
    cycles(def, &mut out);
    out
}

fn model_spec(def: &JobDefinition, out: &mut Vec<Problem>) {
    let file = &def.job.model_spec_path;
    // The model, the optimizer, the selector and their arguments: the event
    // vocabulary decides what is valid, as it does for compilation.
    let trainers = def.data_spec.iter().flat_map(|e| e.dataset_groups.values()).map(Vec::len).sum();
    if let Err(problems) = crate::compile::settings(def, trainers) {
        // The training hyperparameters are checked below, one message each.
        const BELOW: [&str; 8] =
            ["rounds", "epochs", "batchSize", "aggGoal", "concurrency", "learningRate", "clip_threshold", "noise_factor"];
        out.extend(problems.into_iter().filter(|p| !BELOW.iter().any(|k| p.path.ends_with(&format!("#/hyperparameters/{k}")))));
    }
    let h = &def.model_spec.hyperparameters;
    for key in ["rounds", "epochs", "batchSize", "aggGoal", "concurrency"] {
        match h.get(key) {
            None => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= 1) => {}
            Some(v) => out.push(problem(
                format!("{file}#/hyperparameters/{key}"),
                format!("{key} must be a whole number of at least 1, not {v}"),
                format!("set hyperparameters.{key} to a positive whole number"),
            )),
        }
    }
    if let Some(v) = h.get("evalEvery")
        && v.as_u64().is_none_or(|n| n > u64::from(u32::MAX))
    {
        out.push(problem(
            format!("{file}#/hyperparameters/evalEvery"),
            format!("evalEvery must be a whole number (0: no federated evaluation), not {v}"),
            "set hyperparameters.evalEvery to 1 to have the trainers evaluate every round's model",
        ));
    }
    if let Some(v) = h.get("learningRate")
        && !v.as_f64().is_some_and(|x| x > 0.0)
    {
        out.push(problem(
            format!("{file}#/hyperparameters/learningRate"),
            format!("learningRate must be a positive number, not {v}"),
            "set hyperparameters.learningRate to e.g. 0.01",
        ));
    }
    // Differential privacy: the clipping bound and the noise it scales.
    for (key, positive) in [("clip_threshold", true), ("noise_factor", false)] {
        if let Some(v) = h.get(key)
            && !v.as_f64().is_some_and(|x| x.is_finite() && if positive { x > 0.0 } else { x >= 0.0 })
        {
            out.push(problem(
                format!("{file}#/hyperparameters/{key}"),
                format!("{key} must be a number {} 0, not {v}", if positive { "greater than" } else { "of at least" }),
                format!("set hyperparameters.{key} to e.g. {}", if positive { "1.0" } else { "0.5" }),
            ));
        }
    }
}

/// Privacy budgets: ε > 0 and 0 < δ < 1; and a budget means the job must add noise.
fn budgets(def: &JobDefinition, out: &mut Vec<Problem>) {
    let noise = def.model_spec.hyperparameters.get("noise_factor").and_then(Value::as_f64).is_some_and(|z| z > 0.0);
    let clip = def.model_spec.hyperparameters.get("clip_threshold").is_some();
    if let Some((file, _)) = def.datasets.iter().find(|(_, d)| d.privacy_budget.is_some())
        && !(noise && clip)
    {
        out.push(problem(
            format!("{}#/hyperparameters/noise_factor", def.job.model_spec_path),
            format!("dataset {file} has a privacy budget, so the job must train it with differential privacy"),
            "set hyperparameters.clip_threshold and hyperparameters.noise_factor (> 0), or remove the dataset's privacyBudget",
        ));
    }
    for (file, d) in &def.datasets {
        let Some(b) = d.privacy_budget else { continue };
        if !(b.epsilon.is_finite() && b.epsilon > 0.0) {
            out.push(problem(
                format!("{file}#/privacyBudget/epsilon"),
                format!("epsilon must be a positive number, not {}", b.epsilon),
                "e.g. 8.0",
            ));
        }
        if !(b.delta > 0.0 && b.delta < 1.0) {
            out.push(problem(
                format!("{file}#/privacyBudget/delta"),
                format!("delta must be between 0 and 1, not {}", b.delta),
                "e.g. 1e-5, less than one over the dataset's rows",
            ));
        }
    }
}

fn job(def: &JobDefinition, out: &mut Vec<Problem>) {
    if let Some(t) = def.job.max_run_time
        && t <= 0.0
    {
        out.push(problem("job.json#/maxRunTime", format!("maxRunTime must be positive, not {t}"), "give the limit in seconds, e.g. 1800"));
    }
}

fn names(def: &JobDefinition, out: &mut Vec<Problem>) {
    let mut seen = BTreeSet::new();
    for (i, r) in def.design.roles.iter().enumerate() {
        if r.name.trim().is_empty() {
            out.push(problem(format!("schema.json#/roles/{i}/name"), "a role has no name", "give every role a unique name"));
        } else if !seen.insert(&r.name) {
            out.push(problem(
                format!("schema.json#/roles/{i}/name"),
                format!("role name '{}' is used twice", r.name),
                "give every role a unique name",
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, c) in def.design.channels.iter().enumerate() {
        if !seen.insert(&c.name) {
            out.push(problem(
                format!("schema.json#/channels/{i}/name"),
                format!("channel name '{}' is used twice", c.name),
                "give every channel a unique name",
            ));
        }
    }
}

fn channels(def: &JobDefinition, out: &mut Vec<Problem>) {
    let roles: Vec<&str> = def.design.roles.iter().map(|r| r.name.as_str()).collect();
    for (i, c) in def.design.channels.iter().enumerate() {
        if c.pair.len() != 2 {
            out.push(problem(
                format!("schema.json#/channels/{i}/pair"),
                format!("channel '{}' must pair exactly two roles, it names {}", c.name, c.pair.len()),
                "write \"pair\": [\"trainer\", \"aggregator\"] (the same role twice for a ring)",
            ));
        }
        for (j, r) in c.pair.iter().enumerate() {
            if !roles.contains(&r.as_str()) {
                out.push(problem(
                    format!("schema.json#/channels/{i}/pair/{j}"),
                    format!("channel '{}' names role '{r}', which the design does not define", c.name),
                    format!("use one of the roles: {}", roles.join(", ")),
                ));
            }
        }
    }
    if !def.design.roles.iter().any(|r| r.is_data_consumer) {
        out.push(problem("schema.json#/roles", "no role consumes data", "mark the trainer role with \"isDataConsumer\": true"));
    }
    for (i, r) in def.design.roles.iter().enumerate() {
        if !def.design.channels.iter().any(|c| c.pair.contains(&r.name)) {
            out.push(problem(
                format!("schema.json#/roles/{i}"),
                format!("no channel connects role '{}'", r.name),
                format!("add a channel whose pair names '{}', or remove the role", r.name),
            ));
        }
    }
}

fn channel<'a>(def: &'a JobDefinition, name: &str) -> Option<&'a Channel> {
    def.design.channels.iter().find(|c| c.name == name)
}

fn associations(def: &JobDefinition, out: &mut Vec<Problem>) {
    for (i, r) in def.design.roles.iter().enumerate() {
        for (j, assoc) in r.group_association.iter().enumerate() {
            for (c, g) in assoc {
                let here = format!("schema.json#/roles/{i}/groupAssociation/{j}/{c}");
                match channel(def, c) {
                    None => out.push(problem(
                        here,
                        format!("role '{}' is associated with channel '{c}', which the design does not define", r.name),
                        "name a channel from the design's channels",
                    )),
                    Some(ch) if !ch.pair.contains(&r.name) => {
                        out.push(problem(
                            here,
                            format!("channel '{c}' does not connect role '{}'", r.name),
                            format!("add '{}' to the channel's pair or drop this association", r.name),
                        ));
                    }
                    Some(ch) => {
                        if let Some(gb) = &ch.group_by
                            && !gb.value.is_empty()
                            && !gb.value.contains(g)
                        {
                            out.push(problem(
                                here,
                                format!("group '{g}' is not in channel '{c}''s groupBy values ({})", gb.value.join(", ")),
                                format!("add \"{g}\" to the groupBy value of channel '{c}', or use one of its groups"),
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The peer of `role` on a channel (itself on a ring).
fn peer<'a>(c: &'a Channel, role: &str) -> Option<&'a str> {
    match c.pair.as_slice() {
        [a, b] if a == role => Some(b.as_str()),
        [a, b] if b == role => Some(a.as_str()),
        _ => None,
    }
}

fn data_spec(def: &JobDefinition, out: &mut Vec<Problem>) {
    let file = &def.job.data_spec_path;
    let roles: Vec<&str> = def.design.roles.iter().map(|r| r.name.as_str()).collect();
    for (i, entry) in def.data_spec.iter().enumerate() {
        let Some(role) = def.design.roles.iter().find(|r| r.name == entry.role) else {
            out.push(problem(
                format!("{file}#/{i}/role"),
                format!("role '{}' is not in the design", entry.role),
                format!("use one of the roles: {}", roles.join(", ")),
            ));
            continue;
        };
        if !role.is_data_consumer {
            out.push(problem(
                format!("{file}#/{i}/role"),
                format!("role '{}' does not consume data", entry.role),
                "give datasets to a role with \"isDataConsumer\": true",
            ));
            continue;
        }
        for (group, refs) in &entry.dataset_groups {
            let here = format!("{file}#/{i}/datasetGroups/{group}");
            if refs.is_empty() {
                out.push(problem(
                    here.clone(),
                    format!("group '{group}' lists no datasets"),
                    "list at least one dataset file, or remove the group",
                ));
            }
            let Some(assoc) = role.group_association.iter().find(|a| a.values().any(|g| g == group)) else {
                out.push(problem(
                    here,
                    format!("group '{group}' is not in any groupAssociation of role '{}'", role.name),
                    format!("add {{\"<channel>\": \"{group}\"}} to the role's groupAssociation in schema.json"),
                ));
                continue;
            };
            // Some channel of this association must lead to a peer that serves the group (or be a ring).
            let reachable = assoc.iter().any(|(c, g)| {
                let Some(ch) = channel(def, c) else {
                    return false;
                };
                match peer(ch, &role.name) {
                    Some(p) if p == role.name => true,
                    Some(p) => def.design.roles.iter().any(|r| r.name == p && r.group_association.iter().any(|a| a.get(c) == Some(g))),
                    None => false,
                }
            });
            if !reachable {
                out.push(problem(
                    here,
                    format!("no aggregator serves group '{group}': no role on the other side of its channels has that group in its groupAssociation"),
                    format!("add {{\"<channel>\": \"{group}\"}} to the aggregator role's groupAssociation"),
                ));
            }
        }
    }
}

fn cycles(def: &JobDefinition, out: &mut Vec<Problem>) {
    let mut graph = DiGraph::<&str, &str>::new();
    let mut nodes = BTreeMap::new();
    for r in &def.design.roles {
        nodes.insert(r.name.as_str(), graph.add_node(r.name.as_str()));
    }
    for c in &def.design.channels {
        if let Some((lower, upper)) = direction(def, c)
            && let (Some(&l), Some(&u)) = (nodes.get(lower), nodes.get(upper))
        {
            graph.add_edge(l, u, c.name.as_str());
        }
    }
    if is_cyclic_directed(&graph) {
        let cycle = petgraph::algo::kosaraju_scc(&graph)
            .into_iter()
            .find(|scc| scc.len() > 1)
            .map(|scc| scc.iter().map(|n| graph[*n]).collect::<Vec<_>>().join(" -> "))
            .unwrap_or_default();
        out.push(problem(
            "schema.json#/channels",
            format!("the aggregation graph has a cycle ({cycle}): updates would flow up forever"),
            "make each channel's funcTags point one way: the lower role fetch/upload, the upper role distribute/aggregate",
        ));
    }
}

#[cfg(test)]
mod tests {
    //! One test per rule, each checking the JSON path of the problem it reports.

    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::definition::{DataSpecEntry, Dataset, Design, JobFile, ModelSpec};

    fn design() -> Value {
        json!({
            "name": "t",
            "roles": [
                {"name": "trainer", "isDataConsumer": true, "groupAssociation": [{"param-channel": "us"}]},
                {"name": "aggregator", "replica": 1, "groupAssociation": [{"param-channel": "us"}]}
            ],
            "channels": [{
                "name": "param-channel", "pair": ["trainer", "aggregator"],
                "groupBy": {"type": "tag", "value": ["us"]},
                "funcTags": {"trainer": ["fetch", "upload"], "aggregator": ["distribute", "aggregate"]}
            }]
        })
    }

    fn model() -> Value {
        json!({"optimizer": {"sort": "fedavg", "kwargs": {}}, "selector": {"sort": "default", "kwargs": {}}, "hyperparameters": {"rounds": 3}})
    }

    fn def(design: Value, model: Value, data: Value) -> JobDefinition {
        let datasets = BTreeMap::from([("d1.json".to_string(), Dataset::new("d", "builtin://digits"))]);
        JobDefinition {
            folder: "mem".into(),
            job: serde_json::from_value::<JobFile>(json!({"designId": "t", "maxRunTime": 60})).expect("job"),
            design: serde_json::from_value::<Design>(design).expect("design"),
            data_spec: serde_json::from_value::<Vec<DataSpecEntry>>(data).expect("data spec"),
            model_spec: serde_json::from_value::<ModelSpec>(model).expect("model"),
            datasets,
            model_file: None,
        }
    }

    fn data() -> Value {
        json!([{"role": "trainer", "datasetGroups": {"us": ["d1.json"]}}])
    }

    fn paths(d: &JobDefinition) -> Vec<String> {
        check(d).into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn the_base_definition_is_valid() {
        assert_eq!(check(&def(design(), model(), data())), vec![]);
    }

    #[test]
    fn unknown_role_in_a_channel_pair() {
        let mut d = design();
        d["channels"][0]["pair"][1] = json!("aggregatr");
        let p = paths(&def(d, model(), data()));
        assert!(p.contains(&"schema.json#/channels/0/pair/1".to_string()), "{p:?}");
    }

    #[test]
    fn group_missing_from_the_channel_group_by() {
        let mut d = design();
        d["roles"][1]["groupAssociation"][0]["param-channel"] = json!("eu");
        let problems = check(&def(d, model(), data()));
        let p = problems.iter().find(|p| p.path == "schema.json#/roles/1/groupAssociation/0/param-channel").expect("reported");
        assert!(p.message.contains("'eu'") && p.hint.contains("groupBy"), "{p:?}");
    }

    #[test]
    fn no_data_consumer_role() {
        let mut d = design();
        d["roles"][0]["isDataConsumer"] = json!(false);
        assert!(paths(&def(d, model(), json!([]))).contains(&"schema.json#/roles".to_string()));
    }

    #[test]
    fn a_dataset_group_no_aggregator_serves() {
        let mut d = design();
        d["channels"][0]["groupBy"]["value"] = json!(["us", "eu"]);
        d["roles"][0]["groupAssociation"] = json!([{"param-channel": "us"}, {"param-channel": "eu"}]);
        let data = json!([{"role": "trainer", "datasetGroups": {"us": ["d1.json"], "eu": ["d1.json"]}}]);
        let problems = check(&def(d, model(), data));
        let p = problems.iter().find(|p| p.path == "dataSpec.json#/0/datasetGroups/eu").expect("reported");
        assert!(p.message.contains("no aggregator serves group 'eu'"), "{p:?}");
        assert!(!problems.iter().any(|p| p.path.ends_with("datasetGroups/us")));
    }

    #[test]
    fn a_role_no_channel_connects() {
        let mut d = design();
        d["roles"].as_array_mut().expect("roles").push(json!({"name": "observer", "groupAssociation": []}));
        assert!(paths(&def(d, model(), data())).contains(&"schema.json#/roles/2".to_string()));
    }

    #[test]
    fn a_cycle_in_the_aggregation_graph() {
        let mut d = design();
        d["roles"].as_array_mut().expect("roles").push(json!({"name": "top", "groupAssociation": [{"up": "g", "down": "g"}]}));
        d["roles"][1]["groupAssociation"] = json!([{"param-channel": "us", "up": "g", "down": "g"}]);
        let chans = d["channels"].as_array_mut().expect("channels");
        chans.push(json!({"name": "up", "pair": ["aggregator", "top"], "groupBy": {"value": ["g"]}, "funcTags": {"aggregator": ["upload"], "top": ["aggregate"]}}));
        chans.push(json!({"name": "down", "pair": ["top", "aggregator"], "groupBy": {"value": ["g"]}, "funcTags": {"top": ["upload"], "aggregator": ["aggregate"]}}));
        let problems = check(&def(d, model(), data()));
        let p = problems.iter().find(|p| p.path == "schema.json#/channels").expect("cycle reported");
        assert!(p.message.contains("cycle") && p.message.contains("aggregator") && p.message.contains("top"), "{p:?}");
    }

    #[test]
    fn a_ring_is_not_a_cycle() {
        let d = json!({
            "roles": [{"name": "trainer", "isDataConsumer": true, "groupAssociation": [{"ring": "us"}]}],
            "channels": [{"name": "ring", "pair": ["trainer", "trainer"], "groupBy": {"value": ["us"]}, "funcTags": {"trainer": ["ring_allreduce"]}}]
        });
        assert_eq!(check(&def(d, model(), data())), vec![]);
    }

    #[test]
    fn unknown_optimizer_and_selector_and_wrong_kwarg_types() {
        let m = json!({"optimizer": {"sort": "fedmagic"}, "selector": {"sort": "luck"}, "hyperparameters": {"rounds": 1}});
        let p = paths(&def(design(), m, data()));
        assert!(
            p.contains(&"modelSpec.json#/optimizer/sort".to_string()) && p.contains(&"modelSpec.json#/selector/sort".to_string()),
            "{p:?}"
        );
        let m = json!({"optimizer": {"sort": "fedprox", "kwargs": {"mu": "0.1"}}, "selector": {"sort": "random", "kwargs": {"k": 0}}, "hyperparameters": {"rounds": 1}});
        let p = paths(&def(design(), m, data()));
        assert_eq!(p, vec!["modelSpec.json#/optimizer/kwargs/mu".to_string(), "modelSpec.json#/selector/kwargs/k".to_string()]);
    }

    #[test]
    fn rounds_zero_and_bad_hyperparameters() {
        let m = json!({"hyperparameters": {"rounds": 0, "learningRate": -1, "batchSize": "32"}});
        let p = paths(&def(design(), m, data()));
        for want in ["rounds", "learningRate", "batchSize"] {
            assert!(p.contains(&format!("modelSpec.json#/hyperparameters/{want}")), "{want}: {p:?}");
        }
    }

    #[test]
    fn max_run_time_must_be_positive() {
        let mut d = def(design(), model(), data());
        d.job.max_run_time = Some(0.0);
        assert_eq!(paths(&d), vec!["job.json#/maxRunTime".to_string()]);
    }

    #[test]
    fn duplicate_names() {
        let mut d = design();
        let extra = d["channels"][0].clone();
        d["channels"].as_array_mut().expect("channels").push(extra);
        let role = d["roles"][1].clone();
        d["roles"].as_array_mut().expect("roles").push(role);
        let p = paths(&def(d, model(), data()));
        assert!(p.contains(&"schema.json#/channels/1/name".to_string()) && p.contains(&"schema.json#/roles/2/name".to_string()), "{p:?}");
    }

    #[test]
    fn data_spec_roles_must_exist_and_consume_data() {
        let p =
            paths(&def(design(), model(), json!([{"role": "aggregator", "datasetGroups": {}}, {"role": "ghost", "datasetGroups": {}}])));
        assert!(p.contains(&"dataSpec.json#/0/role".to_string()) && p.contains(&"dataSpec.json#/1/role".to_string()), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut d = design();
        d["channels"][0]["pair"][1] = json!("nobody");
        let m = json!({"optimizer": {"sort": "fedmagic"}, "hyperparameters": {"rounds": 0}});
        let mut definition = def(d, m, data());
        definition.job.max_run_time = Some(-5.0);
        assert!(check(&definition).len() >= 4);
    }
}
