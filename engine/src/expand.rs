//! TAG expansion: a job definition becomes tasks, Flame's way. Data-consumer
//! roles get one task per dataset (grouped by the dataset's group); other
//! roles get `replica` tasks per group association.

use std::collections::BTreeMap;

use flame_events::job::TaskSpec;

use crate::definition::{JobDefinition, Problem, Problems};

/// Expands a definition into its tasks, in a stable order: roles as the design
/// lists them, then group associations, datasets and replicas.
pub fn tasks(def: &JobDefinition) -> Result<Vec<TaskSpec>, Problems> {
    let mut tasks = Vec::new();
    let mut problems = Vec::new();
    for role in &def.design.roles {
        let channels: Vec<String> =
            def.design.channels.iter().filter(|c| c.pair.iter().any(|p| p == &role.name)).map(|c| c.name.clone()).collect();
        let mut index = 0;
        let mut push = |association: BTreeMap<String, String>, dataset: Option<(String, Option<String>)>| {
            let (dataset, realm) = dataset.map_or((None, None), |(u, r)| (Some(u), r));
            tasks.push(TaskSpec {
                task_id: format!("{}-{index}", role.name),
                role: role.name.clone(),
                is_data_consumer: role.is_data_consumer,
                group_association: association,
                channels: channels.clone(),
                dataset,
                realm,
                colocate: None,
            });
            index += 1;
        };
        if role.is_data_consumer {
            for (i, entry) in def.data_spec.iter().enumerate().filter(|(_, e)| e.role == role.name) {
                for (group, refs) in &entry.dataset_groups {
                    let Some(association) = role.group_association.iter().find(|a| a.values().any(|g| g == group)) else {
                        problems.push(Problem {
                            path: format!("{}#/{i}/datasetGroups/{group}", def.job.data_spec_path),
                            message: format!("group '{group}' is not in any groupAssociation of role '{}'", role.name),
                            hint: format!(
                                "add {{\"<channel>\": \"{group}\"}} to the role's groupAssociation in schema.json, or rename the group"
                            ),
                        });
                        continue;
                    };
                    for reference in refs {
                        if let Some(d) = def.datasets.get(reference) {
                            push(association.clone(), Some((d.url.clone(), d.realm.clone())));
                        }
                    }
                }
            }
        } else {
            let associations = if role.group_association.is_empty() { vec![BTreeMap::new()] } else { role.group_association.clone() };
            for association in associations {
                for _ in 0..role.replica.unwrap_or(1).max(1) {
                    push(association.clone(), None);
                }
            }
        }
    }
    if problems.is_empty() { Ok(tasks) } else { Err(Problems(problems)) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use serde_json::Value;

    use super::*;
    use crate::definition::{DataSpecEntry, Dataset};
    use crate::testing::{TOPOLOGIES, fixtures, flame_examples, folder_form, read, skipped};

    /// What a task is, without its id: role, groups, channels (sorted), dataset URL.
    type Shape = (String, BTreeMap<String, String>, Vec<String>, Option<String>);

    fn shape(t: TaskSpec) -> Shape {
        let mut channels = t.channels;
        channels.sort();
        (t.role, t.group_association, channels, t.dataset)
    }

    /// The tasks a fixture must expand to, as written by hand in its
    /// `expected-tasks.json` (not by this expansion).
    fn expected_tasks(dir: &Path) -> Vec<TaskSpec> {
        let file = dir.join("expected-tasks.json");
        read(&file)
            .as_array()
            .unwrap_or_else(|| panic!("{}: a list of tasks", file.display()))
            .iter()
            .map(|t| {
                let text = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_string);
                let mut channels: Vec<String> =
                    t["channels"].as_array().expect("channels").iter().map(|c| c.as_str().expect("channel").to_string()).collect();
                channels.sort();
                let role = text("role").expect("role");
                TaskSpec {
                    task_id: text("taskId").expect("taskId"),
                    is_data_consumer: text("dataset").is_some(),
                    role,
                    group_association: serde_json::from_value(t["groupAssociation"].clone()).expect("groupAssociation"),
                    channels,
                    dataset: text("dataset"),
                    realm: text("realm"),
                    colocate: None,
                }
            })
            .collect()
    }

    #[test]
    fn every_topology_has_a_fixture_and_nothing_else_is_there() {
        let mut found: Vec<String> = std::fs::read_dir(fixtures())
            .expect("engine/fixtures")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| fixtures().join(n).is_dir())
            .collect();
        found.sort();
        let mut want: Vec<String> = TOPOLOGIES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(found, want, "engine/fixtures and testing::TOPOLOGIES list the same topologies");
    }

    #[test]
    fn every_fixture_expands_to_its_expected_tasks() {
        for name in TOPOLOGIES {
            let dir = fixtures().join(name);
            let def = JobDefinition::load(&dir).unwrap_or_else(|p| panic!("{name}: {p}"));
            let mut got = tasks(&def).unwrap_or_else(|p| panic!("{name}: {p}"));
            for t in &mut got {
                t.channels.sort();
            }
            assert_eq!(got, expected_tasks(&dir), "tasks of engine/fixtures/{name}");
        }
    }

    /// Our fixtures' datasets registered under ids, as the management API
    /// registers dataset files: the data spec then names ids, not files.
    fn registered(dir: &Path) -> (tempfile::TempDir, BTreeMap<String, Dataset>) {
        let spec: Vec<DataSpecEntry> = serde_json::from_value(read(&dir.join("dataSpec.json"))).expect("data spec");
        let mut registry = BTreeMap::new();
        let mut by_id = spec.clone();
        for entry in &mut by_id {
            for refs in entry.dataset_groups.values_mut() {
                for r in refs.iter_mut() {
                    let id = format!("{:024x}", registry.len() + 1);
                    let d: Dataset = serde_json::from_value(read(&dir.join(&*r))).expect("dataset");
                    registry.insert(id.clone(), d);
                    *r = id;
                }
            }
        }
        let copy = tempfile::tempdir().expect("tempdir");
        for f in ["job.json", "schema.json", "modelSpec.json"] {
            std::fs::copy(dir.join(f), copy.path().join(f)).expect("copy");
        }
        std::fs::write(copy.path().join("dataSpec.json"), serde_json::to_string(&by_id).expect("json")).expect("write");
        (copy, registry)
    }

    #[test]
    fn registered_dataset_ids_resolve_like_files() {
        let dir = fixtures().join("hierarchical");
        let (copy, registry) = registered(&dir);
        let by_id = JobDefinition::load_with(copy.path(), &registry).expect("ids");
        let by_file = JobDefinition::load(&dir).expect("files");
        let urls = |d: &JobDefinition| tasks(d).expect("expand").into_iter().map(|t| (t.dataset, t.realm)).collect::<Vec<_>>();
        assert_eq!(urls(&by_id), urls(&by_file));
        // Without the registry, an id is reported with its place in the data spec.
        let err = JobDefinition::load(copy.path()).expect_err("ids need a registry");
        assert!(err.0.iter().any(|p| p.path == "dataSpec.json#/0/datasetGroups/east/0"), "{err}");
    }

    /// Registers a Flame example's dataset files as Flame's test does: the ids
    /// in dataSpec.json map, by position in each group, to the files in groups.json.
    fn flame_registry(dir: &Path) -> BTreeMap<String, Dataset> {
        let groups = read(&dir.join("groups.json"));
        let spec: Vec<DataSpecEntry> = serde_json::from_value(read(&dir.join("dataSpec.json"))).expect("data spec");
        let mut out = BTreeMap::new();
        for entry in spec {
            for (group, ids) in entry.dataset_groups {
                let files = groups[&group].as_array().expect("group files");
                for (id, file) in ids.iter().zip(files) {
                    let d: Dataset = serde_json::from_value(read(&dir.join(file.as_str().expect("file")))).expect("dataset");
                    out.insert(id.clone(), d);
                }
            }
        }
        out
    }

    /// The task shapes Flame's controller produced for an example.
    fn flame_expected(dir: &Path) -> Vec<Shape> {
        let mut out: Vec<Shape> = std::fs::read_dir(dir.join("expected_tasks"))
            .expect("expected_tasks")
            .map(|e| {
                let t = read(&e.expect("entry").path());
                let mut channels: Vec<String> =
                    t["channels"].as_array().expect("channels").iter().map(|c| c["name"].as_str().expect("name").to_string()).collect();
                channels.sort();
                let dataset = t.get("dataset").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
                (
                    t["role"].as_str().expect("role").to_string(),
                    serde_json::from_value(t["groupAssociation"].clone()).expect("association"),
                    channels,
                    dataset,
                )
            })
            .collect();
        out.sort();
        out
    }

    /// An extra check where Flame's own fixtures are at hand (CI): every one
    /// of them expands to the tasks Flame's controller made, and its dataset
    /// ids resolve like its files.
    #[test]
    fn expansion_matches_flame_where_its_fixtures_are_present() {
        let root = match flame_examples() {
            Ok(root) => root,
            Err(why) => {
                return skipped(
                    "the comparison with Flame's fixtures",
                    &format!("{why}; the repository's own fixtures in engine/fixtures cover every topology"),
                );
            }
        };
        let (mut checked, mut with_ids) = (0, 0);
        for entry in std::fs::read_dir(&root).expect("flame-examples") {
            let dir = entry.expect("entry").path();
            if !dir.join("expected_tasks").is_dir() {
                continue;
            }
            let copy = folder_form(&dir);
            let def = JobDefinition::load(copy.path()).unwrap_or_else(|p| panic!("{}: {p}", dir.display()));
            let mut got: Vec<Shape> = tasks(&def).unwrap_or_else(|p| panic!("{}: {p}", dir.display())).into_iter().map(shape).collect();
            got.sort();
            assert_eq!(got, flame_expected(&dir), "tasks of {}", dir.display());
            // Flame's hybrid/dataSpec.json is not valid JSON; the others name registered ids.
            let spec = std::fs::read_to_string(dir.join("dataSpec.json")).unwrap_or_default();
            if serde_json::from_str::<Value>(&spec).is_ok() {
                let by_id = JobDefinition::load_with(&dir, &flame_registry(&dir)).unwrap_or_else(|p| panic!("{}: {p}", dir.display()));
                let mut got: Vec<Shape> = tasks(&by_id).expect("expand").into_iter().map(shape).collect();
                got.sort();
                assert_eq!(got, flame_expected(&dir), "tasks of {} with registered dataset ids", dir.display());
                with_ids += 1;
            }
            checked += 1;
        }
        assert_eq!((checked, with_ids), (6, 5), "all six Flame fixtures in {}, five with dataset ids", root.display());
    }
}
