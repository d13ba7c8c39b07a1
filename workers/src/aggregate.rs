//! The server-side combination step an aggregator runs, by optimizer name:
//! FedAvg, the adaptive optimizers (with state carried between rounds as
//! weights `m/<tensor>`, `v/<tensor>`), and the robust aggregators.

use flame_events::algorithm::ServerOptimizer;

use crate::optimizers::{self, Settings, State};
use crate::weights::{Blocks, Error, Weights};
use crate::{fedavg, robust};

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
/// returns the optimizer's new state when it keeps one. FedBuff, SCAFFOLD and
/// FedDyn need more than the updates: see [`fedbuff`] and [`with_client_states`].
pub fn combine(
    optimizer: &ServerOptimizer,
    global: &Weights,
    mut updates: Vec<(Weights, u64)>,
    state: Option<&Weights>,
) -> Result<(Weights, Option<Weights>), Error> {
    match *optimizer {
        ServerOptimizer::FedAvg | ServerOptimizer::FedProx { .. } | ServerOptimizer::FedAvgM { .. } | ServerOptimizer::Adaptive { .. } => {
            averaged(optimizer, global, fedavg::fedavg_into_first(&mut updates)?, state)
        }
        ServerOptimizer::Median | ServerOptimizer::TrimmedMean { .. } | ServerOptimizer::Krum { .. } => {
            Ok((robust(optimizer, &robust::InMemory::new(updates.iter().map(|(w, _)| w))?)?, None))
        }
        ServerOptimizer::FedBuff { .. } => Err(Error::Mismatch("fedbuff needs each update's base model; use aggregate::fedbuff".into())),
        ServerOptimizer::Scaffold { .. } | ServerOptimizer::FedDyn { .. } => {
            Err(Error::Mismatch(format!("{} needs the clients' states; use aggregate::with_client_states", optimizer.name())))
        }
    }
}

/// What a server optimizer needs of the round's updates, which says how an
/// aggregator holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Only their sample-weighted mean: each is folded in as it arrives
    /// ([`fedavg::Running`]), in memory for the mean alone.
    Mean,
    /// Every update at once, read a block of coordinates at a time
    /// ([`robust::Updates`]): they may wait on disk ([`crate::spill`]).
    Blocks,
    /// The mean, and a second sum over the updates and the trainers' states
    /// (SCAFFOLD's control variate, FedDyn's `h`), each folded in as it
    /// arrives ([`StateFold`]): memory for the two sums, not for every update.
    MeanAndStates,
    /// Each update's change from the model it trained from, folded into
    /// the step as it arrives ([`crate::fedbuff::Running`]), with each
    /// distinct base model held (a few: one per global model still trained from).
    Buffered,
}

/// What `optimizer` needs of the updates.
pub fn needs(optimizer: &ServerOptimizer) -> Needs {
    match optimizer {
        ServerOptimizer::FedAvg | ServerOptimizer::FedProx { .. } | ServerOptimizer::FedAvgM { .. } | ServerOptimizer::Adaptive { .. } => {
            Needs::Mean
        }
        ServerOptimizer::Median | ServerOptimizer::TrimmedMean { .. } | ServerOptimizer::Krum { .. } => Needs::Blocks,
        ServerOptimizer::Scaffold { .. } | ServerOptimizer::FedDyn { .. } => Needs::MeanAndStates,
        ServerOptimizer::FedBuff { .. } => Needs::Buffered,
    }
}

/// Whether the server's step reads each trainer's state with its update.
/// SCAFFOLD's sums every trainer's change of control variate. FedDyn's
/// trainers keep a state of their own between rounds, but its server step
/// reads only the updates: its aggregator fetches no trainer's state.
pub fn reads_client_states(optimizer: &ServerOptimizer) -> bool {
    matches!(optimizer, ServerOptimizer::Scaffold { .. })
}

/// Whether the optimizer's step reads the global model's values (the others
/// make the next model from the updates alone, and need only its layout).
pub fn steps_from_global(optimizer: &ServerOptimizer) -> bool {
    match optimizer {
        ServerOptimizer::FedAvg
        | ServerOptimizer::FedProx { .. }
        | ServerOptimizer::Median
        | ServerOptimizer::TrimmedMean { .. }
        | ServerOptimizer::Krum { .. } => false,
        ServerOptimizer::FedAvgM { .. }
        | ServerOptimizer::Adaptive { .. }
        | ServerOptimizer::FedBuff { .. }
        | ServerOptimizer::Scaffold { .. }
        | ServerOptimizer::FedDyn { .. } => true,
    }
}

/// The next global model of a robust rule (the optimizers that need
/// [`Needs::Blocks`]), from the updates wherever they are held.
pub fn robust<U: robust::Updates + ?Sized>(optimizer: &ServerOptimizer, updates: &U) -> Result<Weights, Error> {
    match *optimizer {
        ServerOptimizer::Median => robust::median(updates),
        ServerOptimizer::TrimmedMean { beta } => robust::trimmed_mean(updates, beta),
        ServerOptimizer::Krum { f, m } => Ok(robust::multi_krum(updates, f as usize, m as usize)?.0),
        _ => Err(Error::Mismatch(format!("{} is not a rule that reads the updates in blocks", optimizer.name()))),
    }
}

/// The next global model (and optimizer state) from the updates' weighted
/// mean, for the optimizers that need nothing else ([`Needs::Mean`]).
pub fn averaged(
    optimizer: &ServerOptimizer,
    global: &Weights,
    average: Weights,
    state: Option<&Weights>,
) -> Result<(Weights, Option<Weights>), Error> {
    match *optimizer {
        // FedProx changes the trainers' objective (`mu`); the server averages as FedAvg does.
        ServerOptimizer::FedAvg | ServerOptimizer::FedProx { .. } => Ok((average, None)),
        ServerOptimizer::FedAvgM { eta, momentum } => {
            let mut velocity = state.map(|s| unpack(s).m).unwrap_or_default();
            let next = optimizers::momentum_step(eta, momentum, &mut velocity, global, &average)?;
            Ok((next, Some(pack(&State { m: velocity, v: Weights::new() }))))
        }
        ServerOptimizer::Adaptive { rule, eta, beta_1, beta_2, tau } => {
            let settings = Settings { beta_1, beta_2, eta, tau };
            let mut st = state.map(unpack).unwrap_or_default();
            let next = optimizers::step(rule, &settings, &mut st, global, &average)?;
            Ok((next, Some(pack(&st))))
        }
        _ => Err(Error::Mismatch(format!("{} needs more than the updates' mean", optimizer.name()))),
    }
}

/// SCAFFOLD and FedDyn: the round's updates (model, samples) with each
/// trainer's state after it (SCAFFOLD reads the change in its control
/// variate), the server state from the last round; `trainers` is every
/// trainer of the job (their server steps average over all of them).
pub fn with_client_states(
    optimizer: &ServerOptimizer,
    trainers: usize,
    global: &Weights,
    updates: &[(Weights, u64)],
    client_states: &[Weights],
    state: Option<&Weights>,
) -> Result<(Weights, Weights), Error> {
    use crate::control;
    let mean = fedavg::fedavg(updates)?;
    match *optimizer {
        ServerOptimizer::Scaffold { eta } => {
            let c = control::part(state, "c", global)?;
            let deltas = client_states.iter().map(|s| control::part(Some(s), "dc", global)).collect::<Result<Vec<_>, _>>()?;
            let (next, c) = control::scaffold_server(global, &mean, &c, &deltas.iter().collect::<Vec<_>>(), trainers, eta)?;
            Ok((next, control::pack(&[("c", &c)])))
        }
        ServerOptimizer::FedDyn { alpha } => {
            if alpha <= 0.0 {
                return Err(Error::Mismatch(format!("FedDyn's alpha must be > 0, not {alpha}")));
            }
            let h = control::part(state, "h", global)?;
            let models: Vec<&Weights> = updates.iter().map(|(w, _)| w).collect();
            let (next, h) = control::feddyn_server(global, &mean, &models, &h, trainers, alpha)?;
            Ok((next, control::pack(&[("h", &h)])))
        }
        _ => Err(Error::Mismatch(format!("optimizer '{}' keeps no client state", optimizer.name()))),
    }
}

/// SCAFFOLD's and FedDyn's server step folded as the updates arrive: beside
/// the mean ([`fedavg::Running`]), the second sum [`with_client_states`]
/// makes of them all at once (SCAFFOLD: `c` plus each trainer's change in
/// its control variate, FedDyn: `h` and the previous model less each
/// update), with the same terms in the same order, so the same bits. How
/// many updates go in is said first (their share depends on it); a round
/// that leaves one out folds again.
#[derive(Debug)]
pub struct StateFold {
    optimizer: ServerOptimizer,
    /// The weight of each update's term.
    share: f64,
    sums: crate::control::Terms,
    added: usize,
    count: usize,
}

impl StateFold {
    /// The fold of `count` updates into `global`'s next step, with the
    /// server's state from the last round; `trainers` is every trainer of
    /// the job (0: as many as the updates).
    pub fn new(
        optimizer: &ServerOptimizer,
        trainers: usize,
        global: &Weights,
        state: Option<&Weights>,
        count: usize,
    ) -> Result<Self, Error> {
        use crate::control;
        let clients = if trainers == 0 { count } else { trainers };
        let mut sums = control::Terms::new(global);
        let share = match *optimizer {
            ServerOptimizer::Scaffold { .. } => {
                sums.add(1.0, &control::part(state, "c", global)?)?;
                1.0 / clients.max(count).max(1) as f64
            }
            ServerOptimizer::FedDyn { alpha } => {
                if alpha <= 0.0 {
                    return Err(Error::Mismatch(format!("FedDyn's alpha must be > 0, not {alpha}")));
                }
                let share = alpha / clients.max(count).max(1) as f64;
                sums.add(1.0, &control::part(state, "h", global)?)?;
                sums.add(share * count as f64, global)?;
                share
            }
            _ => return Err(Error::Mismatch(format!("optimizer '{}' keeps no client state", optimizer.name()))),
        };
        Ok(Self { optimizer: *optimizer, share, sums, added: 0, count })
    }

    /// Folds in the next update's parameters (FedDyn) or its trainer's
    /// state (SCAFFOLD: the change of its control variate, `dc/`), each read
    /// a block at a time where it is held.
    pub fn add(&mut self, update: &dyn Blocks, client_state: Option<&dyn Blocks>) -> Result<(), Error> {
        if self.added == self.count {
            return Err(Error::Mismatch(format!("more updates than the {} announced", self.count)));
        }
        match self.optimizer {
            ServerOptimizer::Scaffold { .. } => {
                let Some(state) = client_state else {
                    return Err(Error::Mismatch(
                        "SCAFFOLD sums each trainer's change of control variate, and this update came with no trainer's state".into(),
                    ));
                };
                self.sums.add_part(self.share, state, "dc/")?;
            }
            _ => self.sums.add_part(-self.share, update, "")?,
        }
        self.added += 1;
        Ok(())
    }

    /// The next global model from the updates' mean, and the server state to keep.
    pub fn finish(self, global: &Weights, mean: &Weights) -> Result<(Weights, Weights), Error> {
        use crate::control;
        if self.added != self.count {
            return Err(Error::Mismatch(format!("{} of the {} announced updates went in", self.added, self.count)));
        }
        let sum = self.sums.finish();
        match self.optimizer {
            ServerOptimizer::Scaffold { eta } => {
                Ok((control::combine(&[(1.0 - eta, global), (eta, mean)])?, control::pack(&[("c", &sum)])))
            }
            ServerOptimizer::FedDyn { alpha } => {
                Ok((control::combine(&[(1.0, mean), (-1.0 / alpha, &sum)])?, control::pack(&[("h", &sum)])))
            }
            _ => Err(Error::Mismatch(format!("optimizer '{}' keeps no client state", self.optimizer.name()))),
        }
    }
}

/// FedBuff: each update (model, samples) with the model it trained from and
/// its staleness; `eta` is the server learning rate.
pub fn fedbuff(eta: f64, global: &Weights, updates: &[(Weights, u64)], bases: &[(&Weights, u32)]) -> Result<Weights, Error> {
    let buffer: Vec<crate::fedbuff::Buffered> = updates
        .iter()
        .zip(bases)
        .map(|((trained, samples), (base, staleness))| crate::fedbuff::Buffered { trained, base, samples: *samples, staleness: *staleness })
        .collect();
    crate::fedbuff::step(global, &buffer, eta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimizers::Rule;
    use crate::weights::Tensor;

    fn w(v: f32) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![1], data: vec![v] })])
    }

    #[test]
    fn adaptive_state_round_trips_between_rounds() {
        let adam = ServerOptimizer::Adaptive { rule: Rule::Adam, eta: 0.1, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 };
        let (a, s1) = combine(&adam, &w(0.0), vec![(w(1.0), 1)], None).expect("round 1");
        let s1 = s1.expect("state");
        assert!(s1.contains_key("m/p") && s1.contains_key("v/p"));
        let (b, _) = combine(&adam, &a, vec![(w(1.0), 1)], Some(&s1)).expect("round 2");
        let (b_fresh, _) = combine(&adam, &a, vec![(w(1.0), 1)], None).expect("round 2 without state");
        assert_ne!(b, b_fresh, "the carried moments change the step");
        assert!(combine(&ServerOptimizer::FedBuff { eta: 1.0 }, &w(0.0), vec![(w(1.0), 1)], None).is_err(), "FedBuff needs base models");
    }

    #[test]
    fn server_momentum_carries_its_velocity_between_rounds() {
        let m = ServerOptimizer::FedAvgM { eta: 0.5, momentum: 0.9 };
        let (a, s1) = combine(&m, &w(1.0), vec![(w(3.0), 1)], None).expect("round 1");
        let s1 = s1.expect("velocity");
        assert_eq!((a["p"].data[0], s1["m/p"].data[0]), (2.0, 2.0));
        let (b, _) = combine(&m, &a, vec![(w(3.0), 1)], Some(&s1)).expect("round 2");
        assert!((b["p"].data[0] - 3.4).abs() < 1e-6, "the carried velocity adds 0.9 x 2: {}", b["p"].data[0]);
        // eta 1 and momentum 0 is FedAvg, bit for bit.
        let ups = vec![(w(1.0), 3), (w(4.0), 1)];
        let plain = combine(&ServerOptimizer::FedAvgM { eta: 1.0, momentum: 0.0 }, &w(0.0), ups.clone(), None).expect("fedavgm").0;
        assert_eq!(plain, combine(&ServerOptimizer::FedAvg, &w(0.0), ups, None).expect("fedavg").0);
    }

    /// Weights of two tensors with values from a seed.
    fn noisy(seed: u64) -> Weights {
        let mut rng = flame_events::rng::SplitMix::new(seed);
        let mut values = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        Weights::from([
            ("a".to_string(), Tensor { shape: vec![3, 4], data: values(12) }),
            ("b".to_string(), Tensor { shape: vec![5], data: values(5) }),
        ])
    }

    /// SCAFFOLD's and FedDyn's server steps folded one update at a time give
    /// what the steps over every update at once give, bit for bit: with and
    /// without a server state, with as many trainers as updates and with
    /// more; and the fold refuses a wrong count or layout.
    #[test]
    fn the_state_folds_equal_the_server_steps_over_every_update_bit_for_bit() {
        let global = noisy(1);
        let updates: Vec<(Weights, u64)> = (0..5).map(|k| (noisy(10 + k), 3 + 7 * k)).collect();
        let states: Vec<Weights> = (0..5).map(|k| crate::control::pack(&[("c", &noisy(20 + k)), ("dc", &noisy(30 + k))])).collect();
        let bits = |w: &Weights| w.values().flat_map(|t| t.data.iter().map(|v| v.to_bits())).collect::<Vec<_>>();
        for optimizer in [ServerOptimizer::Scaffold { eta: 0.7 }, ServerOptimizer::FedDyn { alpha: 0.05 }] {
            let prefix = if matches!(optimizer, ServerOptimizer::Scaffold { .. }) { "c" } else { "h" };
            for server in [None, Some(crate::control::pack(&[(prefix, &noisy(40))]))] {
                for trainers in [0, 5, 12] {
                    let clients = if trainers == 0 { updates.len() } else { trainers };
                    let (next, state) =
                        with_client_states(&optimizer, clients, &global, &updates, &states, server.as_ref()).expect("at once");
                    let mut fold = StateFold::new(&optimizer, trainers, &global, server.as_ref(), updates.len()).expect("fold");
                    let mut mean = fedavg::Running::new(&updates.iter().map(|(_, n)| *n).collect::<Vec<_>>()).expect("mean");
                    for ((u, _), s) in updates.iter().zip(&states) {
                        fold.add(u, Some(s)).expect("same layout");
                        mean.add(u).expect("same layout");
                    }
                    let (folded, folded_state) = fold.finish(&global, &mean.finish().expect("mean")).expect("finish");
                    let case = format!("{} with {server:?}, {trainers} trainers", optimizer.name());
                    assert_eq!(bits(&folded), bits(&next), "{case}: the next model");
                    assert_eq!(folded_state, state, "{case}: the server state");
                }
            }
            let mut short = StateFold::new(&optimizer, 0, &global, None, 2).expect("fold");
            short.add(&updates[0].0, Some(&states[0])).expect("first");
            let other: Weights = noisy(3).into_iter().take(1).collect();
            let other_state = crate::control::pack(&[("c", &other), ("dc", &other)]);
            assert!(short.add(&other, Some(&other_state)).is_err(), "another layout");
            // The updates and states left in their blobs' bytes fold to the same bits as decoded.
            let packed = |w: &Weights| crate::weights::decode_packed(crate::weights::encode(w).expect("encode")).expect("packed");
            let mut decoded = StateFold::new(&optimizer, 0, &global, None, updates.len()).expect("fold");
            let mut from_bytes = StateFold::new(&optimizer, 0, &global, None, updates.len()).expect("fold");
            for ((u, _), s) in updates.iter().zip(&states) {
                decoded.add(u, Some(s)).expect("decoded");
                from_bytes.add(&packed(u), Some(&packed(s))).expect("from bytes");
            }
            let (a, b) = (decoded.finish(&global, &global).expect("finish"), from_bytes.finish(&global, &global).expect("finish"));
            assert_eq!((bits(&a.0), bits(&a.1)), (bits(&b.0), bits(&b.1)), "{}: from the bytes", optimizer.name());
            // SCAFFOLD cannot do without the trainer's state; FedDyn never reads it.
            let mut no_state = StateFold::new(&optimizer, 0, &global, None, 1).expect("fold");
            assert_eq!(no_state.add(&updates[0].0, None).is_ok(), matches!(optimizer, ServerOptimizer::FedDyn { .. }));
            let one = StateFold::new(&optimizer, 0, &global, None, 2).expect("fold");
            assert!(one.finish(&global, &global).is_err(), "fewer updates than announced");
        }
        assert!(StateFold::new(&ServerOptimizer::FedAvg, 0, &global, None, 1).is_err());
        assert!(StateFold::new(&ServerOptimizer::FedDyn { alpha: 0.0 }, 0, &global, None, 1).is_err());
    }
}
