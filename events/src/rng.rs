//! The one seeded generator every part of the platform draws from
//! (SplitMix64): a worker's initial weights, batch order, data deals and
//! privacy noise, and the engine's and `flamectl plan`'s pick of trainers.
//! Determinism is a promise (ADR 3): the same seed gives the same numbers on
//! every machine, so it is written once, here, in plain integer arithmetic.

/// SplitMix64: a 64-bit state advanced by a constant and mixed.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

/// One SplitMix64 step from `z`: a well-mixed 64-bit value (also a hash step).
pub fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A string's bytes folded through [`mix`].
pub fn hash(s: &str) -> u64 {
    s.bytes().fold(0u64, |h, b| mix(h ^ u64::from(b)))
}

impl SplitMix {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let z = mix(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z
    }

    /// A uniform draw in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform draw in (0, 1): never 0 (for logarithms).
    pub fn unit_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / ((1u64 << 53) as f64 + 1.0)
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit_open();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Shuffles in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Picks `k` of `items`, the same for the same seed, round and salt (a
/// group's name), in sorted order: the random selector's pick, which the
/// engine records and `flamectl plan` shows.
pub fn choose(items: &[String], k: usize, seed: u64, round: u32, salt: &str) -> Vec<String> {
    let salt = hash(salt);
    let mut keyed: Vec<(u64, &String)> = items.iter().map(|t| (mix(seed ^ mix(u64::from(round) ^ salt) ^ hash(t)), t)).collect();
    keyed.sort();
    let mut out: Vec<String> = keyed.into_iter().take(k).map(|(_, t)| t.clone()).collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_gives_its_published_sequence() {
        // The reference SplitMix64 from seed 0 (Steele, Lea and Flood 2014; Vigna's splitmix64.c).
        let mut r = SplitMix::new(0);
        assert_eq!([r.next_u64(), r.next_u64(), r.next_u64()], [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
        let mut u = SplitMix::new(7);
        assert!((0..1000).map(|_| u.unit()).all(|x| (0.0..1.0).contains(&x)));
        assert!((0..1000).map(|_| u.unit_open()).all(|x| x > 0.0 && x < 1.0));
    }

    #[test]
    fn choose_is_a_seeded_subset_in_order() {
        let items: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let a = choose(&items, 3, 5, 1, "g");
        assert_eq!(a, choose(&items, 3, 5, 1, "g"));
        assert_eq!(a.len(), 3);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!((1..=20).map(|r| choose(&items, 3, 5, r, "g")).any(|b| b != a), "rounds pick differently");
        assert_eq!(choose(&items, 20, 5, 1, "g").len(), 10);
    }
}
