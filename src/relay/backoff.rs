//! Exponential backoff with jitter.

use std::time::Duration;

/// Exponential backoff: `initial`, then multiplied by `factor` per failure up
/// to `max`, each delay randomized by ±`jitter` (a fraction) so that many
/// relays do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay. Default: 50 ms.
    pub initial: Duration,
    /// Largest delay. Default: 10 s.
    pub max: Duration,
    /// Growth per consecutive failure. Default: 2.
    pub factor: f64,
    /// Random spread, as a fraction of the delay. Default: 0.2.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(10),
            factor: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before retry number `failures` (1 for the first retry).
    pub fn delay(&self, failures: u32, random_unit: f64) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(failures.saturating_sub(1).min(64) as i32);
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        let spread = self.jitter.clamp(0.0, 1.0) * (2.0 * random_unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((capped * (1.0 + spread)).max(0.0))
    }
}

/// A small xorshift generator for jitter (no need for a crypto RNG here).
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new() -> Jitter {
        let mut seed = [0u8; 8];
        // Falls back to a fixed seed: jitter quality is not a correctness matter.
        let _ = getrandom::fill(&mut seed);
        Jitter(u64::from_le_bytes(seed) | 1)
    }

    pub(crate) fn next_unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(50));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay(60, 0.5), Duration::from_secs(10));
        assert!(b.delay(1, 0.0) < b.delay(1, 1.0));
        let mut j = Jitter::new();
        assert!(
            (0..1000)
                .map(|_| j.next_unit())
                .all(|u| (0.0..1.0).contains(&u))
        );
    }
}
