//! Privacy spent, by Rényi differential privacy (RDP) accounting of the
//! sampled Gaussian mechanism: noise multiplier `z` (noise standard deviation
//! over the L2 sensitivity), sampling rate `q`, and how many times it ran.
//!
//! The RDP of one run at order α is `ln(A_α) / (α - 1)` (Mironov, Talwar and
//! Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
//! 2019): for whole α, `A_α` is a binomial sum; for fractional α, the sum of
//! two convergent series with complementary error functions; for `q = 1` it is
//! the Gaussian mechanism's `α / (2 z²)`. RDP adds up over runs, and a total
//! converts to (ε, δ)-DP at the best order with the bound of Canonne, Kamath
//! and Steinke (2020): `ε = rdp + ln((α-1)/α) - (ln δ + ln α) / (α - 1)`.
//!
//! A trainer here clips its whole update and adds noise to it, so each round
//! it takes part in is one run with `q = 1` for its dataset (the engine
//! records who takes part: no amplification by sampling is claimed).

/// One kind of run of the mechanism, and how many times it ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Runs {
    /// Sampling rate, in (0, 1].
    pub q: f64,
    /// Noise multiplier (noise standard deviation / sensitivity), > 0.
    pub z: f64,
    /// Runs.
    pub steps: u64,
}

/// The orders the accountant tries: fractional ones near 1 (where small ε
/// are found) and whole ones up to 256.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..=64).map(f64::from));
    orders.extend([128.0, 256.0]);
    orders
}

/// ln(e^a + e^b).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY { hi } else { hi + (lo - hi).exp().ln_1p() }
}

/// ln(erfc(x)), accurate where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 20.0 {
        libm::erfc(x).ln()
    } else {
        // erfc(x) = e^{-x²} / (x √π) (1 - 1/(2x²) + 3/(4x⁴) - 15/(8x⁶) + ...)
        let r = 1.0 / (x * x);
        -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + (-0.5 * r + 0.75 * r * r - 1.875 * r * r * r).ln_1p()
    }
}

/// ln of the binomial coefficient C(α, k) for real α and whole k, with its sign.
fn log_binomial(alpha: f64, k: u64) -> (f64, f64) {
    let (mut log, mut sign) = (0.0, 1.0);
    for i in 0..k {
        let num = alpha - i as f64;
        if num == 0.0 {
            return (f64::NEG_INFINITY, 0.0);
        }
        if num < 0.0 {
            sign = -sign;
        }
        log += num.abs().ln() - ((i + 1) as f64).ln();
    }
    (log, sign)
}

/// ln A_α for whole α: Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k) / (2z²)).
fn log_a_whole(q: f64, z: f64, alpha: u64) -> f64 {
    let mut out = f64::NEG_INFINITY;
    for k in 0..=alpha {
        let (lc, _) = log_binomial(alpha as f64, k);
        let kf = k as f64;
        let term = lc + kf * q.ln() + (alpha - k) as f64 * (1.0 - q).ln() + (kf * kf - kf) / (2.0 * z * z);
        out = log_add(out, term);
    }
    out
}

/// ln A_α for fractional α: the two series of Mironov et al. (2019, §3.3),
/// split at z0 = z² ln(1/q - 1) + 1/2, summed until their terms vanish,
/// each term by its size (an upper bound: see below).
fn log_a_fractional(q: f64, z: f64, alpha: f64) -> f64 {
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let s2 = std::f64::consts::SQRT_2 * z;
    for i in 0u64..10_000 {
        let (lc, sign) = log_binomial(alpha, i);
        let (fi, fj) = (i as f64, alpha - i as f64);
        let t0 = lc + fi * q.ln() + fj * (1.0 - q).ln();
        let t1 = lc + fj * q.ln() + fi * (1.0 - q).ln();
        let e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let e1 = 0.5f64.ln() + log_erfc((z0 - fj) / s2);
        let s0 = t0 + (fi * fi - fi) / (2.0 * z * z) + e0;
        let s1 = t1 + (fj * fj - fj) / (2.0 * z * z) + e1;
        // Every term counts by its size, whatever the sign of C(α, i): an upper bound on A_α
        // that never claims less privacy loss than the exact series (dp-accounting sums it so too).
        if sign != 0.0 {
            a0 = log_add(a0, s0);
            a1 = log_add(a1, s1);
        }
        if s0.max(s1) < -30.0 {
            break;
        }
    }
    log_add(a0, a1)
}

/// The RDP of one run of the sampled Gaussian mechanism at order `alpha` (> 1).
pub fn rdp(q: f64, z: f64, alpha: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * z * z);
    }
    let log_a = if alpha.fract() == 0.0 { log_a_whole(q, z, alpha as u64) } else { log_a_fractional(q, z, alpha) };
    log_a / (alpha - 1.0)
}

/// The ε at `delta` of all `runs` together, and the order that gives it.
pub fn epsilon(runs: &[Runs], delta: f64, orders: &[f64]) -> (f64, f64) {
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for &alpha in orders {
        let total: f64 = runs.iter().filter(|r| r.steps > 0).map(|r| r.steps as f64 * rdp(r.q, r.z, alpha)).sum();
        let eps = total + ((alpha - 1.0) / alpha).ln() - (delta.ln() + alpha.ln()) / (alpha - 1.0);
        let eps = eps.max(0.0);
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    if runs.iter().all(|r| r.steps == 0) {
        return (0.0, best.1);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gaussian_mechanism_without_sampling_is_alpha_over_two_z_squared() {
        assert_eq!(rdp(1.0, 2.0, 3.0), 3.0 / 8.0);
        assert_eq!(rdp(0.0, 2.0, 3.0), 0.0);
        assert_eq!(rdp(0.5, 0.0, 3.0), f64::INFINITY, "no noise, no privacy");
    }

    #[test]
    fn sampling_amplifies_and_whole_and_fractional_orders_agree_nearby() {
        let (q, z) = (0.01, 1.1);
        let whole = rdp(q, z, 8.0);
        assert!(whole < rdp(1.0, z, 8.0) / 20.0, "a 1% sample spends far less: {whole}");
        // The fractional series, just off a whole order, is close to the binomial sum there.
        let near = rdp(q, z, 8.0 + 1e-6);
        assert!((near - whole).abs() / whole < 1e-3, "{near} against {whole}");
        // RDP grows with the order and the sampling rate, and falls with the noise.
        assert!(rdp(q, z, 4.0) < rdp(q, z, 16.0));
        assert!(rdp(0.01, z, 8.0) < rdp(0.02, z, 8.0));
        assert!(rdp(q, 2.0, 8.0) < rdp(q, 1.0, 8.0));
    }

    #[test]
    fn epsilon_grows_with_steps_and_shrinks_with_delta() {
        let orders = default_orders();
        let run = |steps| [Runs { q: 1.0, z: 2.0, steps }];
        let (e1, _) = epsilon(&run(1), 1e-5, &orders);
        let (e10, _) = epsilon(&run(10), 1e-5, &orders);
        assert!(e1 > 0.0 && e10 > e1);
        assert!(epsilon(&run(10), 1e-3, &orders).0 < e10);
        assert_eq!(epsilon(&run(0), 1e-5, &orders).0, 0.0);
        // Runs of two kinds add up: their sum spends more than either.
        let both = [Runs { q: 1.0, z: 2.0, steps: 10 }, Runs { q: 0.1, z: 1.0, steps: 100 }];
        assert!(epsilon(&both, 1e-5, &orders).0 > e10);
    }
}
