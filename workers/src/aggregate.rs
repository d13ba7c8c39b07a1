//! The server-side combination step an aggregator runs, by optimizer name:
//! FedAvg, the adaptive optimizers (with state carried between rounds as
//! weights `m/<tensor>`, `v/<tensor>`), and the robust aggregators.

use serde_json::{Map, Value};

use crate::optimizers::{self, Rule, Settings, State};
use crate::weights::{Error, Weights};
use crate::{fedavg, robust};

fn number(kwargs: &Map<String, Value>, key: &str, default: f64) -> Result<f64, Error> {
    match kwargs.get(key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| Error::Mismatch(format!("optimizer argument '{key}' must be a number, not {v}"))),
    }
}

/// Packs optimizer state into one weights map (`m/...`, `v/...`).
pub fn pack(state: &State) -> Weights {
    let mut out = Weights::new();
    for (k, t) in &state.m {
        out.insert(format!("m/{k}"), t.clone());
    }
    for (k, t) in &state.v {
        out.insert(format!("v/{k}"), t.clone());
    }
    out
}

/// Unpacks what `pack` made.
pub fn unpack(packed: &Weights) -> State {
    let mut state = State::default();
    for (k, t) in packed {
        if let Some(name) = k.strip_prefix("m/") {
            state.m.insert(name.to_string(), t.clone());
        } else if let Some(name) = k.strip_prefix("v/") {
            state.v.insert(name.to_string(), t.clone());
        }
    }
    state
}

/// Combines the round's updates (model, samples) into the next global model;
/// returns the optimizer's new state when it keeps one.
pub fn combine(
    optimizer: &str,
    kwargs: &Map<String, Value>,
    global: &Weights,
    mut updates: Vec<(Weights, u64)>,
    state: Option<&Weights>,
) -> Result<(Weights, Option<Weights>), Error> {
    let models = || updates.iter().map(|(w, _)| w.clone()).collect::<Vec<_>>();
    match optimizer {
        // FedProx changes the trainers' objective (`mu`); the server averages as FedAvg does.
        "fedavg" | "fedprox" => Ok((fedavg::fedavg_into_first(&mut updates)?, None)),
        "fedadam" | "fedyogi" | "fedadagrad" => {
            let rule = match optimizer {
                "fedadam" => Rule::Adam,
                "fedyogi" => Rule::Yogi,
                _ => Rule::AdaGrad,
            };
            let d = Settings::default();
            let settings = Settings {
                beta_1: number(kwargs, "beta_1", d.beta_1)?,
                beta_2: number(kwargs, "beta_2", d.beta_2)?,
                eta: number(kwargs, "eta", d.eta)?,
                tau: number(kwargs, "tau", d.tau)?,
            };
            let mut st = state.map(unpack).unwrap_or_default();
            let average = fedavg::fedavg_into_first(&mut updates)?;
            let next = optimizers::step(rule, &settings, &mut st, global, &average)?;
            Ok((next, Some(pack(&st))))
        }
        "median" => Ok((robust::median(&models())?, None)),
        "trimmed_mean" => Ok((robust::trimmed_mean(&models(), number(kwargs, "beta", 0.1)?)?, None)),
        "krum" => {
            let f = number(kwargs, "f", 1.0)? as usize;
            let m = number(kwargs, "m", 1.0)? as usize;
            Ok((robust::multi_krum(&models(), f, m)?.0, None))
        }
        "fedbuff" => Err(Error::Mismatch("fedbuff needs each update's base model; use aggregate::fedbuff".into())),
        "scaffold" | "feddyn" => Err(Error::Mismatch(format!("{optimizer} needs the clients' states; use aggregate::with_client_states"))),
        other => Err(Error::Mismatch(format!("optimizer '{other}' is not implemented by this worker"))),
    }
}

/// SCAFFOLD and FedDyn: the round's updates (model, samples) with each
/// trainer's state after it (SCAFFOLD reads the change in its control
/// variate), the server state from the last round. Kwargs: `clients` (all
/// trainers of the job, which the engine fills in), SCAFFOLD's `eta` (server
/// learning rate, default 1), FedDyn's `alpha` (default 0.01).
pub fn with_client_states(
    optimizer: &str,
    kwargs: &Map<String, Value>,
    global: &Weights,
    updates: &[(Weights, u64)],
    client_states: &[Weights],
    state: Option<&Weights>,
) -> Result<(Weights, Weights), Error> {
    use crate::control;
    let clients = number(kwargs, "clients", updates.len() as f64)? as usize;
    let mean = fedavg::fedavg(updates)?;
    match optimizer {
        "scaffold" => {
            let c = control::part(state, "c", global)?;
            let deltas = client_states.iter().map(|s| control::part(Some(s), "dc", global)).collect::<Result<Vec<_>, _>>()?;
            let (next, c) =
                control::scaffold_server(global, &mean, &c, &deltas.iter().collect::<Vec<_>>(), clients, number(kwargs, "eta", 1.0)?)?;
            Ok((next, control::pack(&[("c", &c)])))
        }
        "feddyn" => {
            let alpha = number(kwargs, "alpha", 0.01)?;
            if alpha <= 0.0 {
                return Err(Error::Mismatch(format!("FedDyn's alpha must be > 0, not {alpha}")));
            }
            let h = control::part(state, "h", global)?;
            let models: Vec<&Weights> = updates.iter().map(|(w, _)| w).collect();
            let (next, h) = control::feddyn_server(global, &mean, &models, &h, clients, alpha)?;
            Ok((next, control::pack(&[("h", &h)])))
        }
        other => Err(Error::Mismatch(format!("optimizer '{other}' keeps no client state"))),
    }
}

/// FedBuff: each update (model, samples) with the model it trained from and
/// its staleness; kwarg `eta` is the server learning rate (default 1).
pub fn fedbuff(
    kwargs: &Map<String, Value>,
    global: &Weights,
    updates: &[(Weights, u64)],
    bases: &[(&Weights, u32)],
) -> Result<Weights, Error> {
    let buffer: Vec<crate::fedbuff::Buffered> = updates
        .iter()
        .zip(bases)
        .map(|((trained, samples), (base, staleness))| crate::fedbuff::Buffered { trained, base, samples: *samples, staleness: *staleness })
        .collect();
    crate::fedbuff::step(global, &buffer, number(kwargs, "eta", 1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn w(v: f32) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![1], data: vec![v] })])
    }

    #[test]
    fn adaptive_state_round_trips_between_rounds() {
        let kwargs: Map<String, Value> = serde_json::from_value(serde_json::json!({"eta": 0.1})).expect("kwargs");
        let (a, s1) = combine("fedadam", &kwargs, &w(0.0), vec![(w(1.0), 1)], None).expect("round 1");
        let s1 = s1.expect("state");
        assert!(s1.contains_key("m/p") && s1.contains_key("v/p"));
        let (b, _) = combine("fedadam", &kwargs, &a, vec![(w(1.0), 1)], Some(&s1)).expect("round 2");
        let (b_fresh, _) = combine("fedadam", &kwargs, &a, vec![(w(1.0), 1)], None).expect("round 2 without state");
        assert_ne!(b, b_fresh, "the carried moments change the step");
        assert!(combine("fedmagic", &kwargs, &w(0.0), vec![(w(1.0), 1)], None).is_err());
        let bad: Map<String, Value> = serde_json::from_value(serde_json::json!({"eta": "fast"})).expect("kwargs");
        assert!(combine("fedadam", &bad, &w(0.0), vec![(w(1.0), 1)], None).is_err());
    }
}
