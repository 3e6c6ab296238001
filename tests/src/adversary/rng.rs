//! A small seeded random number generator (SplitMix64), so that a seed alone decides the
//! adversary's plan, with no crate whose stream could change under us between versions.

/// SplitMix64: one u64 of state, every seed (0 included) a full-period stream.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one part of the plan (a client thread, the faults), independent of
    /// how many numbers the other parts drew.
    pub fn fork(&mut self, stream: u64) -> Self {
        Self::new(self.next_u64() ^ stream.wrapping_mul(0xA076_1D64_78BD_642F))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..high` (`low` when the range is empty).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low)
    }

    /// An index below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }

    /// One of `items`, each as likely.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        assert!(!items.is_empty(), "pick from an empty list");
        &items[self.below(items.len())]
    }

    /// One of `items`, each as likely as its weight says.
    pub fn weighted<'a, T>(&mut self, items: &'a [(u64, T)]) -> &'a T {
        let total: u64 = items.iter().map(|(w, _)| w).sum();
        assert!(total > 0, "weighted pick with no weight");
        let mut at = self.range(0, total);
        for (weight, item) in items {
            if at < *weight {
                return item;
            }
            at -= weight;
        }
        &items[items.len() - 1].1
    }
}

/// The seed a count of seeds starts from, so `ADVERSARY_SEEDS=3` names three seeds: mixed so
/// that consecutive indices give unrelated seeds (and never a small number, which would read as
/// a count).
pub fn nth_seed(base: u64, index: u64) -> u64 {
    let mut rng = Rng::new(base.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    rng.next_u64() | (1 << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_stream() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn ranges_stay_inside() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let n = rng.range(3, 9);
            assert!((3..9).contains(&n));
        }
        assert_eq!(rng.range(5, 5), 5);
    }
}
