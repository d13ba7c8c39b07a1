//! Checking a stored view against a rebuild from the events, and naming the
//! first event where they part.

use serde::Serialize;
use serde_json::Value;

use flame_events::Envelope;

use crate::view::JobView;

/// Where a stored view and the rebuild disagree.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Divergence {
    /// JSON pointer of the first differing value (in document order).
    pub path: String,
    /// What the stored view holds there (`null` when absent).
    pub stored: Value,
    /// What the rebuild holds there.
    pub rebuilt: Value,
    /// Every differing path.
    pub paths: Vec<String>,
    /// The event after which the stored view was never right again (when it
    /// never was, the event that last set the value). Stream version.
    pub version: u64,
    /// Its global position.
    pub position: u64,
    /// Its type.
    pub event_type: String,
}

/// Leaf paths where `a` and `b` differ.
pub fn diff_paths(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(a, b, String::new(), &mut out);
    out
}

fn walk(a: &Value, b: &Value, at: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                walk(x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), p, out);
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                walk(x.get(i).unwrap_or(&Value::Null), y.get(i).unwrap_or(&Value::Null), format!("{at}/{i}"), out);
            }
        }
        _ if a != b => out.push(at),
        _ => {}
    }
}

/// Compares a stored view (its JSON text) with the fold of `events` (the
/// job's events up to the stored view's position). `Ok(None)`: identical
/// byte for byte.
pub fn check(events: &[Envelope], stored_json: &str) -> Result<Option<Divergence>, serde_json::Error> {
    let mut views = Vec::with_capacity(events.len() + 1);
    let mut view = JobView::default();
    views.push(serde_json::to_value(&view)?);
    for e in events {
        view.apply(e);
        views.push(serde_json::to_value(&view)?);
    }
    if serde_json::to_string(&view)? == stored_json {
        return Ok(None);
    }
    let stored: Value = serde_json::from_str(stored_json)?;
    let rebuilt = views.last().cloned().unwrap_or(Value::Null);
    let paths = diff_paths(&stored, &rebuilt);
    let mut best: Option<(usize, String)> = None;
    for p in &paths {
        let want = stored.pointer(p);
        let value = |i: usize| views[i].pointer(p);
        let last_right = (0..views.len()).rev().find(|&i| value(i) == want);
        let event = match last_right {
            // The first event after the last agreement that changed the value.
            Some(a) => (a + 1..views.len()).find(|&j| value(j) != value(j - 1)),
            // Never right: the event that last set the value.
            None => (1..views.len()).rev().find(|&j| value(j) != value(j - 1)),
        };
        if let Some(j) = event
            && best.as_ref().is_none_or(|(b, _)| j < *b)
        {
            best = Some((j, p.clone()));
        }
    }
    // Fields equal as values but written differently (key order, number form) still fail.
    let (j, path) = best.unwrap_or((views.len() - 1, paths.first().cloned().unwrap_or_default()));
    let e = events.get(j.saturating_sub(1)).or(events.last());
    Ok(Some(Divergence {
        stored: stored.pointer(&path).cloned().unwrap_or(Value::Null),
        rebuilt: rebuilt.pointer(&path).cloned().unwrap_or(Value::Null),
        path,
        paths,
        version: e.map_or(0, |e| e.version),
        position: e.map_or(0, |e| e.position),
        event_type: e.map_or_else(|| "(no events)".into(), |e| e.event_type.clone()),
    }))
}
