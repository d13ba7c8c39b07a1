//! Who talks to whom in a job: from the tasks' group associations and the
//! channels' directions (their funcTags), the aggregation groups with the
//! tasks above and below them, the rings, and the coordinator roles. The
//! tree of aggregations ([`crate::tree`]) and the round plans
//! ([`crate::plan`]) are both read off these links.

use std::collections::{BTreeMap, BTreeSet};

use flame_events::job::TaskSpec;

use crate::definition::{Channel, JobDefinition};

/// An aggregation channel's group: (channel, group).
/// Function tags that put a role below its peer on a channel (it sends updates up).
pub const LOWER_TAGS: &[&str] = &["fetch", "upload"];
/// Function tags that put a role above its peer on a channel (it aggregates).
pub const UPPER_TAGS: &[&str] = &["distribute", "aggregate"];

pub(crate) type Group<'a> = (&'a str, &'a str);

/// Who talks to whom, from the tasks' group associations and the channels' directions.
pub(crate) struct Links<'a> {
    /// Roles that coordinate (their channels carry no models).
    pub(crate) coordinators: BTreeSet<&'a str>,
    /// Per aggregation group, the tasks above (distribute/aggregate).
    pub(crate) uppers: BTreeMap<Group<'a>, Vec<&'a str>>,
    /// Per aggregation group, the tasks below (fetch/upload).
    pub(crate) lowers: BTreeMap<Group<'a>, Vec<&'a str>>,
    /// Per ring group (a channel pairing a role with itself), its members.
    pub(crate) rings: BTreeMap<Group<'a>, Vec<&'a str>>,
    /// Per task, the groups it uploads to.
    pub(crate) task_ups: BTreeMap<&'a str, Vec<Group<'a>>>,
    /// Per task, the groups it aggregates.
    pub(crate) task_downs: BTreeMap<&'a str, Vec<Group<'a>>>,
}

pub(crate) fn links<'a>(def: &'a JobDefinition, tasks: &'a [TaskSpec]) -> Links<'a> {
    let coordinators: BTreeSet<&str> = def
        .design
        .roles
        .iter()
        .filter(|r| {
            r.name == "coordinator"
                || def.design.channels.iter().any(|c| c.func_tags.get(&r.name).is_some_and(|t| t.iter().any(|x| x == "coordinate")))
        })
        .map(|r| r.name.as_str())
        .collect();
    let channels: BTreeMap<&str, &Channel> = def.design.channels.iter().map(|c| (c.name.as_str(), c)).collect();

    let mut uppers: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    let mut lowers: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    let mut rings: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    let mut task_ups: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    let mut task_downs: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for t in tasks {
        for (c, g) in &t.group_association {
            let Some(ch) = channels.get(c.as_str()) else {
                continue;
            };
            if is_coordination(ch, &coordinators) {
                continue;
            }
            match direction(def, ch) {
                None if ch.pair.len() == 2 && ch.pair[0] == ch.pair[1] => rings.entry((c, g)).or_default().push(&t.task_id),
                None => {}
                Some((lower, _)) if lower == t.role => {
                    lowers.entry((c, g)).or_default().push(&t.task_id);
                    task_ups.entry(&t.task_id).or_default().push((c, g));
                }
                Some(_) => {
                    uppers.entry((c, g)).or_default().push(&t.task_id);
                    task_downs.entry(&t.task_id).or_default().push((c, g));
                }
            }
        }
    }

    Links { coordinators, uppers, lowers, rings, task_ups, task_downs }
}

pub(crate) fn is_coordination(c: &Channel, coordinators: &BTreeSet<&str>) -> bool {
    c.pair.iter().any(|r| coordinators.contains(r.as_str()))
}

/// The direction of aggregation on a channel: (lower role, upper role), from
/// function tags, else from which side consumes data. `None` for rings.
pub fn direction<'a>(def: &'a JobDefinition, c: &'a Channel) -> Option<(&'a str, &'a str)> {
    let [a, b] = c.pair.as_slice() else {
        return None;
    };
    if a == b {
        return None;
    }
    let tagged = |role: &str, tags: &[&str]| c.func_tags.get(role).is_some_and(|t| t.iter().any(|x| tags.contains(&x.as_str())));
    if tagged(a, LOWER_TAGS) || tagged(b, UPPER_TAGS) {
        return Some((a, b));
    }
    if tagged(b, LOWER_TAGS) || tagged(a, UPPER_TAGS) {
        return Some((b, a));
    }
    let consumes = |r: &str| def.design.roles.iter().any(|x| x.name == r && x.is_data_consumer);
    match (consumes(a), consumes(b)) {
        (true, false) => Some((a, b)),
        (false, true) => Some((b, a)),
        _ => None,
    }
}
