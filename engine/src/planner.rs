//! TAG expansion: a job definition becomes tasks, Flame's way. Data-consumer
//! roles get one task per dataset (grouped by the dataset's group); other
//! roles get `replica` tasks per group association.

use std::collections::BTreeMap;

use flame_events::job::TaskSpec;

use crate::definition::{JobDefinition, Problem, Problems};

/// Expands a definition into its tasks, in a stable order: roles as the design
/// lists them, then group associations, datasets and replicas.
pub fn expand(def: &JobDefinition) -> Result<Vec<TaskSpec>, Problems> {
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

    use crate::testing::{fixtures, folder_form, read};

    /// Registers the example's dataset files as Flame's test does: the ids in
    /// dataSpec.json map, by position in each group, to the files in groups.json.
    fn registry(dir: &Path) -> BTreeMap<String, Dataset> {
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

    type Shape = (String, BTreeMap<String, String>, Vec<String>, Option<String>);

    fn expected(dir: &Path) -> Vec<Shape> {
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

    #[test]
    fn expansion_matches_flame_for_every_fixture() {
        let mut checked = 0;
        for entry in std::fs::read_dir(fixtures()).expect("shared/flame-examples beside the repository") {
            let dir = entry.expect("entry").path();
            if !dir.join("expected_tasks").is_dir() {
                continue;
            }
            let copy = folder_form(&dir);
            let def = JobDefinition::load(copy.path()).unwrap_or_else(|p| panic!("{}: {p}", dir.display()));
            let mut got: Vec<Shape> = expand(&def)
                .unwrap_or_else(|p| panic!("{}: {p}", dir.display()))
                .into_iter()
                .map(|t| {
                    let mut channels = t.channels;
                    channels.sort();
                    (t.role, t.group_association, channels, t.dataset)
                })
                .collect();
            got.sort();
            assert_eq!(got, expected(&dir), "tasks of {}", dir.display());
            checked += 1;
        }
        assert_eq!(checked, 6, "all six Flame fixtures");
    }

    #[test]
    fn registered_dataset_ids_resolve_like_files() {
        let dir = fixtures().join("hier_mnist");
        let by_id = JobDefinition::load_with(&dir, &registry(&dir)).expect("ids");
        let copy = folder_form(&dir);
        let by_file = JobDefinition::load(copy.path()).expect("files");
        let urls = |d: &JobDefinition| expand(d).expect("expand").into_iter().map(|t| t.dataset).collect::<Vec<_>>();
        assert_eq!(urls(&by_id), urls(&by_file));
        // Without the registry, an id is reported with its place in the data spec.
        let err = JobDefinition::load(&dir).expect_err("ids need a registry");
        assert!(err.0.iter().any(|p| p.path == "dataSpec.json#/0/datasetGroups/eu/0"), "{err}");
    }
}
