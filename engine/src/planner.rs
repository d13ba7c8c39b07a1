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
        let channels: Vec<String> = def
            .design
            .channels
            .iter()
            .filter(|c| c.pair.iter().any(|p| p == &role.name))
            .map(|c| c.name.clone())
            .collect();
        let mut index = 0;
        let mut push = |association: BTreeMap<String, String>,
                        dataset: Option<(String, Option<String>)>| {
            let (dataset, realm) = dataset.map_or((None, None), |(u, r)| (Some(u), r));
            tasks.push(TaskSpec {
                task_id: format!("{}-{index}", role.name),
                role: role.name.clone(),
                is_data_consumer: role.is_data_consumer,
                group_association: association,
                channels: channels.clone(),
                dataset,
                realm,
            });
            index += 1;
        };
        if role.is_data_consumer {
            for (i, entry) in def
                .data_spec
                .iter()
                .enumerate()
                .filter(|(_, e)| e.role == role.name)
            {
                for (group, refs) in &entry.dataset_groups {
                    let Some(association) = role
                        .group_association
                        .iter()
                        .find(|a| a.values().any(|g| g == group))
                    else {
                        problems.push(Problem {
                            path: format!("{}#/{i}/datasetGroups/{group}", def.job.data_spec_path),
                            message: format!("group '{group}' is not in any groupAssociation of role '{}'", role.name),
                            hint: format!("add {{\"<channel>\": \"{group}\"}} to the role's groupAssociation in schema.json, or rename the group"),
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
            let associations = if role.group_association.is_empty() {
                vec![BTreeMap::new()]
            } else {
                role.group_association.clone()
            };
            for association in associations {
                for _ in 0..role.replica.unwrap_or(1).max(1) {
                    push(association.clone(), None);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(tasks)
    } else {
        Err(Problems(problems))
    }
}

/// The shape the runner drives today: one aggregator task and its trainers.
#[derive(Clone, Debug, PartialEq)]
pub struct TwoTier {
    /// The aggregator's task id.
    pub aggregator: String,
    /// The trainers' task ids.
    pub trainers: Vec<String>,
}

/// Recognises a two-tier job (one non-data role with one task, data consumers
/// beside it); other topologies are refused with a clear message.
pub fn two_tier(tasks: &[TaskSpec]) -> Result<TwoTier, String> {
    let aggregators: Vec<&TaskSpec> = tasks.iter().filter(|t| !t.is_data_consumer).collect();
    let trainers: Vec<String> = tasks
        .iter()
        .filter(|t| t.is_data_consumer)
        .map(|t| t.task_id.clone())
        .collect();
    match aggregators.as_slice() {
        [one] if !trainers.is_empty() => Ok(TwoTier {
            aggregator: one.task_id.clone(),
            trainers,
        }),
        _ => Err(format!(
            "this version runs two-tier jobs only (one aggregator task and at least one trainer); this job expands to {} aggregator task(s) and {} trainer task(s)",
            aggregators.len(),
            trainers.len()
        )),
    }
}
