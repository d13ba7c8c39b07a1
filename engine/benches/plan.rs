//! Expansion and round planning of a hierarchical job with 10,000 trainers in
//! 100 groups (100 middle aggregators, one top aggregator). Prints medians.
//! Run: `cargo bench -p flame-engine --bench plan`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::json;

use flame_engine::definition::{DataSpecEntry, Dataset, Design, JobFile, ModelSpec};
use flame_engine::{JobDefinition, expand, plan};

const GROUPS: usize = 100;
const PER_GROUP: usize = 100;
const REPEATS: usize = 5;

fn definition() -> JobDefinition {
    let names: Vec<String> = (0..GROUPS).map(|g| format!("g{g}")).collect();
    let trainer_assoc: Vec<_> = names.iter().map(|g| json!({"param": g})).collect();
    let middle_assoc: Vec<_> = names.iter().map(|g| json!({"param": g, "global": "default"})).collect();
    let design = json!({
        "name": "bench",
        "roles": [
            {"name": "trainer", "isDataConsumer": true, "groupAssociation": trainer_assoc},
            {"name": "middle-aggregator", "replica": 1, "groupAssociation": middle_assoc},
            {"name": "top-aggregator", "replica": 1, "groupAssociation": [{"global": "default"}]}
        ],
        "channels": [
            {"name": "param", "pair": ["trainer", "middle-aggregator"], "groupBy": {"type": "tag", "value": names},
             "funcTags": {"trainer": ["fetch", "upload"], "middle-aggregator": ["distribute", "aggregate"]}},
            {"name": "global", "pair": ["top-aggregator", "middle-aggregator"], "groupBy": {"type": "tag", "value": ["default"]},
             "funcTags": {"top-aggregator": ["distribute", "aggregate"], "middle-aggregator": ["fetch", "upload"]}}
        ]
    });
    let mut datasets = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for g in &names {
        let refs: Vec<String> = (0..PER_GROUP).map(|i| format!("{g}-{i}.json")).collect();
        for r in &refs {
            datasets.insert(r.clone(), Dataset::new(r.clone(), format!("file:{r}.csv")));
        }
        groups.insert(g.clone(), refs);
    }
    JobDefinition {
        folder: "bench".into(),
        job: serde_json::from_value::<JobFile>(json!({"designId": "bench"})).expect("job"),
        design: serde_json::from_value::<Design>(design).expect("design"),
        data_spec: vec![DataSpecEntry { role: "trainer".into(), dataset_groups: groups, extra: Default::default() }],
        model_spec: serde_json::from_value::<ModelSpec>(json!({"hyperparameters": {"rounds": 10}})).expect("model"),
        datasets,
        model_file: None,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let def = definition();
    let (mut check, mut expand, mut planning, mut total) = (vec![], vec![], vec![], vec![]);
    let mut steps = 0;
    let mut tasks_n = 0;
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        assert!(def.check().is_empty());
        let t1 = Instant::now();
        let tasks = expand::tasks(&def).expect("expand");
        let t2 = Instant::now();
        let p = plan::build(&def, &tasks, flame_events::algorithm::Selection::All, 0, 1).expect("plan");
        let t3 = Instant::now();
        steps = p.steps.len();
        tasks_n = tasks.len();
        check.push((t1 - t0).as_secs_f64() * 1e3);
        expand.push((t2 - t1).as_secs_f64() * 1e3);
        planning.push((t3 - t2).as_secs_f64() * 1e3);
        total.push((t3 - t0).as_secs_f64() * 1e3);
    }
    println!("hierarchical job: {GROUPS} groups x {PER_GROUP} trainers = {tasks_n} tasks, {steps} steps in round 1 (median of {REPEATS})");
    println!("validate  {:>8.1} ms", median(check));
    println!("expand    {:>8.1} ms", median(expand));
    println!("plan      {:>8.1} ms", median(planning));
    println!("total     {:>8.1} ms", median(total));
}
