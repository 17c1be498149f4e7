//! Bounded, jittered exponential backoff and the injectable randomness behind it.
//!
//! `delay(n) = min(max, initial × multiplierⁿ) × (1 − jitter × u)` with `u` uniform in
//! `[0, 1)`. Jitter only ever *shortens* the capped delay, so no delay is ever above `max`
//! (a jitter applied after the cap would let restarts of many children drift past it, and
//! one applied before it would make every long delay collapse onto exactly `max`).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long to wait before the n-th consecutive restart of a child.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first restart after a healthy run.
    pub initial: Duration,
    /// Upper bound of every delay, jitter included.
    pub max: Duration,
    /// Growth factor per consecutive failure (≥ 1).
    pub multiplier: f64,
    /// Fraction of the delay that may be taken off at random, in `[0, 1]`.
    pub jitter: f64,
    /// A child that ran this long without failing starts again from `initial`.
    pub reset_after: Duration,
}

impl Backoff {
    /// A backoff that restarts immediately, for tests and benchmarks.
    pub const ZERO: Backoff = Backoff {
        initial: Duration::ZERO,
        max: Duration::ZERO,
        multiplier: 1.0,
        jitter: 0.0,
        reset_after: Duration::ZERO,
    };

    /// The delay before restart number `attempt` (0-based) with the random draw `unit`
    /// in `[0, 1)`. Never above `max`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = i32::try_from(attempt).unwrap_or(i32::MAX);
        let uncapped = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = uncapped.min(self.max.as_secs_f64());
        let cut = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        let secs = capped * (1.0 - cut);
        // `from_secs_f64` panics on NaN or overflow; the cap keeps us finite.
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// A source of uniform draws in `[0, 1)`: the only randomness in the kernel.
///
/// Production uses [`Jitter::random`]; tests inject [`Jitter::fixed`] or
/// [`Jitter::seeded`] so every delay is known in advance.
#[derive(Clone)]
pub struct Jitter(Arc<Mutex<dyn JitterSource>>);

/// Something that produces uniform draws in `[0, 1)`.
pub trait JitterSource: Send + 'static {
    /// The next draw, in `[0, 1)`.
    fn unit(&mut self) -> f64;
}

struct Fixed(f64);

impl JitterSource for Fixed {
    fn unit(&mut self) -> f64 {
        self.0
    }
}

impl JitterSource for StdRng {
    fn unit(&mut self) -> f64 {
        self.random::<f64>()
    }
}

impl Jitter {
    /// Draws from an OS-seeded generator.
    pub fn random() -> Self {
        Self::from_source(StdRng::from_os_rng())
    }

    /// Draws from a generator with a fixed seed: reproducible sequences in tests.
    pub fn seeded(seed: u64) -> Self {
        Self::from_source(StdRng::seed_from_u64(seed))
    }

    /// Always draws `unit` (clamped into `[0, 1)`): exact delays in tests.
    pub fn fixed(unit: f64) -> Self {
        Self::from_source(Fixed(unit.clamp(0.0, 1.0 - f64::EPSILON)))
    }

    /// Wraps any source.
    pub fn from_source(source: impl JitterSource) -> Self {
        Self(Arc::new(Mutex::new(source)))
    }

    /// The next draw in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        // A poisoned lock only means another holder panicked mid-draw; the generator
        // state is still a valid generator.
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.unit()
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Jitter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
            reset_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn grows_exponentially_without_jitter_and_caps_at_max() {
        let b = policy();
        let secs: Vec<u64> = (0..9).map(|n| b.delay(n, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_only_shortens_and_never_exceeds_max() {
        let b = policy();
        let jitter = Jitter::seeded(7);
        for attempt in 0..40 {
            let base = b.delay(attempt, 0.0);
            for _ in 0..200 {
                let d = b.delay(attempt, jitter.unit());
                assert!(d <= base, "attempt {attempt}: {d:?} above {base:?}");
                assert!(d <= b.max);
                assert!(
                    d >= base.mul_f64(0.8),
                    "attempt {attempt}: {d:?} cut more than 20%"
                );
            }
        }
    }

    #[test]
    fn fixed_draw_gives_exact_delay() {
        let b = policy();
        assert_eq!(b.delay(2, 0.5), Duration::from_millis(3600));
        assert_eq!(b.delay(10, 0.5), Duration::from_secs(54));
    }

    #[test]
    fn absurd_settings_stay_finite() {
        let b = Backoff {
            initial: Duration::from_secs(u64::MAX / 4),
            max: Duration::from_secs(5),
            multiplier: f64::MAX,
            jitter: 3.0,
            reset_after: Duration::ZERO,
        };
        assert_eq!(b.delay(1000, 0.0), Duration::from_secs(5));
        assert!(b.delay(1000, 0.999) < Duration::from_millis(6));
    }
}
