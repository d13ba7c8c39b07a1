//! Algorithms whose clients keep state between rounds, as pure functions
//! over plain weights:
//!
//! - SCAFFOLD (Karimireddy et al. 2020, option II): every gradient step is
//!   corrected by `c - c_i` (server and client control variates); afterwards
//!   `c_i+ = c_i - c + (x - y) / (K * lr)` for K local steps from the global
//!   model x to y. The server moves `x += eta * (mean(y) - x)` and
//!   `c += (1/N) * sum(c_i+ - c_i)` over the round's clients (N clients in all).
//! - FedDyn (Acar et al. 2021): client i minimises
//!   `L_i(w) - <g_i, w> + alpha/2 ||w - w_prev||^2`, then
//!   `g_i -= alpha (w_i - w_prev)`; the server keeps
//!   `h -= alpha/m * sum(w_i - w_prev)` (m clients in all) and sets
//!   `w = mean(w_i) - h / alpha`.
//!
//! States travel as weights under prefixed names (`c/fc1.weight`, ...), like
//! the adaptive optimizers' moments.

use crate::weights::{Blocks, Error, Tensor, Weights, check_same_layout};

/// Zeros shaped like `like`.
pub fn zeros(like: &Weights) -> Weights {
    like.iter().map(|(k, t)| (k.clone(), Tensor { shape: t.shape.clone(), data: vec![0.0; t.data.len()] })).collect()
}

/// `sum_j k_j * w_j`, element by element (f64 accumulation), over weights of one layout.
pub fn combine(terms: &[(f64, &Weights)]) -> Result<Weights, Error> {
    let Some((_, first)) = terms.first() else { return Err(Error::Mismatch("nothing to combine".into())) };
    for (_, w) in terms {
        check_same_layout(first, w)?;
    }
    let mut out = zeros(first);
    for (name, t) in out.iter_mut() {
        let mut acc = vec![0f64; t.data.len()];
        for (k, w) in terms {
            for (a, x) in acc.iter_mut().zip(&w[name].data) {
                *a += k * f64::from(*x);
            }
        }
        for (o, a) in t.data.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    Ok(out)
}

/// [`combine`] one term at a time: the same sums in the same order (so the
/// same bits), holding one f64 sum per value however many terms there are.
#[derive(Debug)]
pub struct Terms {
    like: Weights,
    sums: std::collections::BTreeMap<String, Vec<f64>>,
}

impl Terms {
    /// Sums of terms with the layout of `like` (its values are not read).
    pub fn new(like: &Weights) -> Self {
        let like: Weights = like.iter().map(|(k, t)| (k.clone(), Tensor { shape: t.shape.clone(), data: Vec::new() })).collect();
        let sums = like.iter().map(|(k, t)| (k.clone(), vec![0f64; t.shape.iter().product()])).collect();
        Self { like, sums }
    }

    /// Adds `k * w`; `w` must have the layout.
    pub fn add(&mut self, k: f64, w: &Weights) -> Result<(), Error> {
        self.add_part(k, w, "")
    }

    /// Adds `k` times the tensors stored under `prefix` in `from` (all of
    /// them for `""`), read a block at a time where they are held: a state
    /// blob's part is never decoded whole. No tensor under `prefix` is a part
    /// of zeros, as [`part`] takes it: nothing is added. Otherwise they must
    /// have the layout.
    pub fn add_part(&mut self, k: f64, from: &dyn Blocks, prefix: &str) -> Result<(), Error> {
        let shapes = from.shapes();
        let named: Vec<(String, &Vec<usize>)> =
            shapes.iter().filter_map(|(name, shape)| name.strip_prefix(prefix).map(|n| (n.to_string(), *shape))).collect();
        if named.is_empty() && !prefix.is_empty() {
            return Ok(());
        }
        crate::weights::check_shapes(self.like.iter().map(|(n, t)| (n, &t.shape)), named.iter().map(|(n, s)| (n, *s)))?;
        for (name, acc) in &mut self.sums {
            from.read_blocks(&format!("{prefix}{name}"), &mut |at, block| crate::fedavg::accumulate_block(acc, at, block, k))?;
        }
        Ok(())
    }

    /// The sums, as f32.
    pub fn finish(self) -> Weights {
        let mut out = self.like;
        for (name, acc) in self.sums {
            if let Some(t) = out.get_mut(&name) {
                t.data = crate::fedavg::narrow(acc);
            }
        }
        out
    }
}

/// The tensors stored under `prefix/` in a state blob (zeros shaped like `like` when absent).
pub fn part(state: Option<&Weights>, prefix: &str, like: &Weights) -> Result<Weights, Error> {
    let Some(state) = state else { return Ok(zeros(like)) };
    let p = format!("{prefix}/");
    let got: Weights = state.iter().filter_map(|(k, t)| k.strip_prefix(&p).map(|n| (n.to_string(), t.clone()))).collect();
    if got.is_empty() {
        return Ok(zeros(like));
    }
    check_same_layout(like, &got)?;
    Ok(got)
}

/// Packs named parts into one state blob.
pub fn pack(parts: &[(&str, &Weights)]) -> Weights {
    parts.iter().flat_map(|(p, w)| w.iter().map(move |(k, t)| (format!("{p}/{k}"), t.clone()))).collect()
}

/// SCAFFOLD, client side after training: the new control variate `c_i+` and its change.
pub fn scaffold_client(c_i: &Weights, c: &Weights, x: &Weights, y: &Weights, steps: usize, lr: f64) -> Result<(Weights, Weights), Error> {
    let k = 1.0 / (steps.max(1) as f64 * lr);
    let next = combine(&[(1.0, c_i), (-1.0, c), (k, x), (-k, y)])?;
    let delta = combine(&[(1.0, &next), (-1.0, c_i)])?;
    Ok((next, delta))
}

/// SCAFFOLD, server side: the new global model from the (sample-weighted)
/// mean of the clients' models, and the new server control variate.
pub fn scaffold_server(
    x: &Weights,
    mean: &Weights,
    c: &Weights,
    deltas: &[&Weights],
    clients: usize,
    eta: f64,
) -> Result<(Weights, Weights), Error> {
    let next = combine(&[(1.0 - eta, x), (eta, mean)])?;
    let mut terms = vec![(1.0, c)];
    let share = 1.0 / clients.max(deltas.len()).max(1) as f64;
    terms.extend(deltas.iter().map(|d| (share, *d)));
    Ok((next, combine(&terms)?))
}

/// FedDyn, client side after training: the new gradient state `g_i - alpha (w_i - w_prev)`.
pub fn feddyn_client(g_i: &Weights, prev: &Weights, trained: &Weights, alpha: f64) -> Result<Weights, Error> {
    combine(&[(1.0, g_i), (-alpha, trained), (alpha, prev)])
}

/// FedDyn, server side: from the previous model, the round's models (their
/// sample-weighted mean and the models themselves) and `h`, the new model and `h`.
pub fn feddyn_server(
    prev: &Weights,
    mean: &Weights,
    models: &[&Weights],
    h: &Weights,
    clients: usize,
    alpha: f64,
) -> Result<(Weights, Weights), Error> {
    let share = alpha / clients.max(models.len()).max(1) as f64;
    let mut terms = vec![(1.0, h), (share * models.len() as f64, prev)];
    terms.extend(models.iter().map(|m| (-share, *m)));
    let h_next = combine(&terms)?;
    let next = combine(&[(1.0, mean), (-1.0 / alpha, &h_next)])?;
    Ok((next, h_next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &[f32]) -> Weights {
        Weights::from([("p".to_string(), Tensor { shape: vec![v.len()], data: v.to_vec() })])
    }

    fn close(a: &Weights, want: &[f64]) {
        for (x, y) in a["p"].data.iter().zip(want) {
            assert!((f64::from(*x) - y).abs() < 1e-5, "{:?} vs {want:?}", a["p"].data);
        }
    }

    #[test]
    fn scaffold_steps_match_a_hand_computation() {
        // Client: c_i = 0.5, c = 0.1, from x = 1 to y = 0.6 in K = 4 steps of lr 0.1:
        // c_i+ = 0.5 - 0.1 + (1 - 0.6) / 0.4 = 1.4; its change 0.9.
        let (ci, delta) = scaffold_client(&w(&[0.5]), &w(&[0.1]), &w(&[1.0]), &w(&[0.6]), 4, 0.1).expect("client");
        close(&ci, &[1.4]);
        close(&delta, &[0.9]);
        // Server: x = 1, mean of the clients' models 0.7, eta 1 -> 0.7; with eta 0.5 -> 0.85.
        // c = 0.1 plus (0.9 + 0.3) / N with N = 4 clients in all -> 0.4.
        let (x, c) = scaffold_server(&w(&[1.0]), &w(&[0.7]), &w(&[0.1]), &[&w(&[0.9]), &w(&[0.3])], 4, 1.0).expect("server");
        close(&x, &[0.7]);
        close(&c, &[0.4]);
        let (x, _) = scaffold_server(&w(&[1.0]), &w(&[0.7]), &w(&[0.1]), &[&w(&[0.9])], 4, 0.5).expect("server");
        close(&x, &[0.85]);
    }

    #[test]
    fn feddyn_steps_match_a_hand_computation() {
        // Client: g_i = 0.2, w_prev = 1, trained 0.5, alpha 0.1: g_i+ = 0.2 - 0.1 * (0.5 - 1) = 0.25.
        close(&feddyn_client(&w(&[0.2]), &w(&[1.0]), &w(&[0.5]), 0.1).expect("client"), &[0.25]);
        // Server: prev 1, models 0.5 and 0.9 (mean 0.7), h = 0, m = 4, alpha 0.1:
        // h+ = 0 - 0.1/4 * ((0.5 - 1) + (0.9 - 1)) = 0.015; w = 0.7 - 0.015 / 0.1 = 0.55.
        let (next, h) = feddyn_server(&w(&[1.0]), &w(&[0.7]), &[&w(&[0.5]), &w(&[0.9])], &w(&[0.0]), 4, 0.1).expect("server");
        close(&h, &[0.015]);
        close(&next, &[0.55]);
    }

    #[test]
    fn states_pack_and_unpack_by_prefix() {
        let (a, b) = (w(&[1.0, 2.0]), w(&[3.0, 4.0]));
        let packed = pack(&[("c", &a), ("dc", &b)]);
        assert_eq!(packed.len(), 2);
        assert_eq!(part(Some(&packed), "c", &a).expect("c"), a);
        assert_eq!(part(Some(&packed), "dc", &a).expect("dc"), b);
        assert_eq!(part(None, "c", &a).expect("none"), zeros(&a), "no state yet: zeros");
        assert!(part(Some(&packed), "c", &w(&[0.0])).is_err(), "a state of another layout is refused");
    }
}
