//! The config shape of restart policies and start-slot pools.
//!
//! Policies compose in layers: built-in kind defaults ← `supervision.defaults` ←
//! `supervision.kinds.<kind>` ← a per-child `supervision` table. Every field of
//! [`PolicySettings`] is optional so that each layer sets only what it changes;
//! [`PolicySettings::apply`] lays one layer over a [`Policy`].

use std::time::Duration;

use serde::Deserialize;

use super::backoff::Backoff;
use super::policy::{Action, Policy};
use super::slots::PoolSettings;

/// One layer of policy settings; unset fields keep the layer below.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Delays between restarts.
    #[serde(default)]
    pub backoff: BackoffSettings,
    /// Failures allowed within `window_ms`; 0 = unlimited.
    pub max_restarts: Option<u32>,
    /// The restart budget's sliding window, in ms.
    pub window_ms: Option<u64>,
    /// `park`, `escalate` or `exit` when the budget is spent.
    pub on_exhausted: Option<ActionSetting>,
    /// `park`, `escalate` or `exit` after a fatal failure.
    pub on_fatal: Option<ActionSetting>,
    /// Kill the child as hung without a heartbeat for this long, in ms; 0 = off.
    pub liveness_timeout_ms: Option<u64>,
    /// Graceful stop limit before a kill, in ms.
    pub shutdown_timeout_ms: Option<u64>,
    /// One named warning after this many failures in a row; 0 = never.
    pub warn_after: Option<u32>,
}

/// Backoff fields of one layer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffSettings {
    /// First delay, in ms.
    pub initial_ms: Option<u64>,
    /// Cap of every delay, in ms.
    pub max_ms: Option<u64>,
    /// Growth per failure in a row (≥ 1).
    pub multiplier: Option<f64>,
    /// Fraction of a delay taken off at random, 0 to 1.
    pub jitter: Option<f64>,
    /// A run this long without failing resets the sequence, in ms.
    pub reset_after_ms: Option<u64>,
}

/// `park`, `escalate` or `exit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionSetting {
    /// Stay down, siblings keep running.
    Park,
    /// Fail the parent supervisor.
    Escalate,
    /// Shut down and exit the process (75 or 78).
    Exit,
}

impl From<ActionSetting> for Action {
    fn from(a: ActionSetting) -> Self {
        match a {
            ActionSetting::Park => Action::Park,
            ActionSetting::Escalate => Action::Escalate,
            ActionSetting::Exit => Action::Exit,
        }
    }
}

/// A value that is out of range: (field name relative to the layer, what is wrong).
pub type Invalid = (&'static str, String);

/// Why an effective policy (every layer applied) cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyProblem {
    /// One value is out of range on its own; the layer that set it is to blame.
    Value(Invalid),
    /// `backoff.initial_ms` is above `backoff.max_ms`. Either may be to blame: each can come
    /// from a different layer.
    InitialAboveMax {
        /// The effective `backoff.initial_ms`.
        initial_ms: u64,
        /// The effective `backoff.max_ms`.
        max_ms: u64,
    },
}

/// The rules every policy value must meet on its own, shared by the per-layer check and
/// the check of the effective policy. Why each bound:
///
/// - `backoff.max_ms` and `backoff.initial_ms` above 0: `delay(n) = min(max, initial ×
///   multiplierⁿ)`, so a zero in either makes every delay 0 and a crash-looping child
///   restarts as fast as the CPU allows (60,941 times in 3 s with `max_ms = 0`).
/// - `backoff.multiplier` a finite number ≥ 1: below 1 the delays shrink towards 0.
/// - `backoff.jitter` a finite number in `[0, 1]`: it is the fraction taken off a delay.
/// - `window_ms` above 0: a zero window counts no failure, so the budget never runs out.
/// - `shutdown_timeout_ms` above 0: a zero limit kills every child without a graceful stop.
mod rule {
    use super::Invalid;

    pub(super) fn above_zero(field: &'static str, value: u64) -> Result<(), Invalid> {
        if value == 0 {
            Err((field, "must be above 0".to_string()))
        } else {
            Ok(())
        }
    }

    pub(super) fn multiplier(m: f64) -> Result<(), Invalid> {
        if m.is_finite() && m >= 1.0 {
            Ok(())
        } else {
            Err(("backoff.multiplier", format!("{m} must be a number ≥ 1")))
        }
    }

    pub(super) fn jitter(j: f64) -> Result<(), Invalid> {
        if (0.0..=1.0).contains(&j) {
            Ok(())
        } else {
            Err(("backoff.jitter", format!("{j} must be between 0 and 1")))
        }
    }
}

impl PolicySettings {
    /// Lays this layer over `base`.
    pub fn apply(&self, base: &Policy) -> Policy {
        let ms = Duration::from_millis;
        let b = &self.backoff;
        Policy {
            backoff: Backoff {
                initial: b.initial_ms.map_or(base.backoff.initial, ms),
                max: b.max_ms.map_or(base.backoff.max, ms),
                multiplier: b.multiplier.unwrap_or(base.backoff.multiplier),
                jitter: b.jitter.unwrap_or(base.backoff.jitter),
                reset_after: b.reset_after_ms.map_or(base.backoff.reset_after, ms),
            },
            max_restarts: self.max_restarts.unwrap_or(base.max_restarts),
            window: self.window_ms.map_or(base.window, ms),
            on_exhausted: self.on_exhausted.map_or(base.on_exhausted, Action::from),
            on_fatal: self.on_fatal.map_or(base.on_fatal, Action::from),
            liveness_timeout: match self.liveness_timeout_ms {
                Some(0) => None,
                Some(t) => Some(ms(t)),
                None => base.liveness_timeout,
            },
            shutdown_timeout: self.shutdown_timeout_ms.map_or(base.shutdown_timeout, ms),
            warn_after: self.warn_after.unwrap_or(base.warn_after),
        }
    }

    /// Checks the values this layer sets, naming the first bad field. A layer that sets
    /// both `initial_ms` and `max_ms` must keep them in order; across layers, see
    /// [`validate_effective`].
    pub fn validate(&self) -> Result<(), Invalid> {
        let b = &self.backoff;
        if let Some(v) = b.initial_ms {
            rule::above_zero("backoff.initial_ms", v)?;
        }
        if let Some(v) = b.max_ms {
            rule::above_zero("backoff.max_ms", v)?;
        }
        if let Some(m) = b.multiplier {
            rule::multiplier(m)?;
        }
        if let Some(j) = b.jitter {
            rule::jitter(j)?;
        }
        if let (Some(i), Some(m)) = (b.initial_ms, b.max_ms)
            && i > m
        {
            return Err((
                "backoff.initial_ms",
                format!("{i} is above backoff.max_ms {m}"),
            ));
        }
        if let Some(v) = self.window_ms {
            rule::above_zero("window_ms", v)?;
        }
        if let Some(v) = self.shutdown_timeout_ms {
            rule::above_zero("shutdown_timeout_ms", v)?;
        }
        Ok(())
    }

    /// Whether this layer sets `field`, named as in [`Invalid`] (`backoff.max_ms`,
    /// `window_ms` …): how a problem of the effective policy is traced to its layer.
    pub fn sets(&self, field: &str) -> bool {
        let b = &self.backoff;
        match field {
            "backoff.initial_ms" => b.initial_ms.is_some(),
            "backoff.max_ms" => b.max_ms.is_some(),
            "backoff.multiplier" => b.multiplier.is_some(),
            "backoff.jitter" => b.jitter.is_some(),
            "backoff.reset_after_ms" => b.reset_after_ms.is_some(),
            "max_restarts" => self.max_restarts.is_some(),
            "window_ms" => self.window_ms.is_some(),
            "on_exhausted" => self.on_exhausted.is_some(),
            "on_fatal" => self.on_fatal.is_some(),
            "liveness_timeout_ms" => self.liveness_timeout_ms.is_some(),
            "shutdown_timeout_ms" => self.shutdown_timeout_ms.is_some(),
            "warn_after" => self.warn_after.is_some(),
            _ => false,
        }
    }
}

/// Checks a policy with every layer applied: the same rules as
/// [`PolicySettings::validate`], on the values a child will actually run with. A value
/// that is fine in its own layer can still meet a bad partner from another one (an
/// `initial_ms` in `supervision.defaults` above a kind's built-in `max_ms`).
pub fn validate_effective(policy: &Policy) -> Result<(), PolicyProblem> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let b = &policy.backoff;
    let (initial_ms, max_ms) = (ms(b.initial), ms(b.max));
    let values = rule::above_zero("backoff.initial_ms", initial_ms)
        .and_then(|()| rule::above_zero("backoff.max_ms", max_ms))
        .and_then(|()| rule::multiplier(b.multiplier))
        .and_then(|()| rule::jitter(b.jitter));
    values.map_err(PolicyProblem::Value)?;
    if initial_ms > max_ms {
        return Err(PolicyProblem::InitialAboveMax { initial_ms, max_ms });
    }
    rule::above_zero("window_ms", ms(policy.window))
        .and_then(|()| rule::above_zero("shutdown_timeout_ms", ms(policy.shutdown_timeout)))
        .map_err(PolicyProblem::Value)
}

/// A start-slot pool as configured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// How many may hold a slot at once (≥ 1).
    pub max_concurrent: usize,
    /// First starts wait a random delay in `[0, jitter_ms)` before queueing.
    #[serde(default)]
    pub jitter_ms: u64,
    /// A slot held longer is force-released with a warning.
    #[serde(default = "default_hold_timeout_ms")]
    pub hold_timeout_ms: u64,
}

fn default_hold_timeout_ms() -> u64 {
    30_000
}

impl PoolConfig {
    /// The runtime settings.
    pub fn settings(&self) -> PoolSettings {
        PoolSettings {
            max_concurrent: self.max_concurrent,
            jitter: Duration::from_millis(self.jitter_ms),
            hold_timeout: Duration::from_millis(self.hold_timeout_ms),
        }
    }

    /// Checks the values, naming the first bad field.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_concurrent == 0 {
            return Err(("max_concurrent", "must be at least 1".to_string()));
        }
        if self.hold_timeout_ms == 0 {
            return Err(("hold_timeout_ms", "must be above 0".to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_only_what_they_set() {
        let base = Policy::default();
        let layer = PolicySettings {
            backoff: BackoffSettings {
                max_ms: Some(5000),
                ..Default::default()
            },
            max_restarts: Some(5),
            on_exhausted: Some(ActionSetting::Exit),
            liveness_timeout_ms: Some(120_000),
            ..Default::default()
        };
        let p = layer.apply(&base);
        assert_eq!(p.backoff.max, Duration::from_secs(5));
        assert_eq!(p.backoff.initial, base.backoff.initial);
        assert_eq!(p.max_restarts, 5);
        assert_eq!(p.on_exhausted, Action::Exit);
        assert_eq!(p.on_fatal, base.on_fatal);
        assert_eq!(p.liveness_timeout, Some(Duration::from_secs(120)));
        let off = PolicySettings {
            liveness_timeout_ms: Some(0),
            ..Default::default()
        }
        .apply(&p);
        assert_eq!(off.liveness_timeout, None);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = PolicySettings {
            backoff: BackoffSettings {
                jitter: Some(1.5),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("backoff.jitter"));
        let bad = PolicySettings {
            backoff: BackoffSettings {
                initial_ms: Some(10),
                max_ms: Some(5),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("backoff.initial_ms"));
        let zero = PolicySettings {
            backoff: BackoffSettings {
                max_ms: Some(0),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(zero.validate().map_err(|e| e.0), Err("backoff.max_ms"));
        let pool = PoolConfig {
            max_concurrent: 0,
            jitter_ms: 0,
            hold_timeout_ms: 1,
        };
        assert_eq!(pool.validate().map_err(|e| e.0), Err("max_concurrent"));
    }

    #[test]
    fn effective_policy_is_checked_as_a_whole() {
        let base = Policy::default();
        assert_eq!(validate_effective(&base), Ok(()));
        let spin = Policy {
            backoff: Backoff {
                max: Duration::ZERO,
                ..base.backoff
            },
            ..base
        };
        assert_eq!(
            validate_effective(&spin),
            Err(PolicyProblem::Value((
                "backoff.max_ms",
                "must be above 0".to_string()
            )))
        );
        let inverted = Policy {
            backoff: Backoff {
                initial: Duration::from_secs(90),
                ..base.backoff
            },
            ..base
        };
        assert_eq!(
            validate_effective(&inverted),
            Err(PolicyProblem::InitialAboveMax {
                initial_ms: 90_000,
                max_ms: 60_000
            })
        );
        let nan = Policy {
            backoff: Backoff {
                multiplier: f64::NAN,
                ..base.backoff
            },
            ..base
        };
        assert!(matches!(
            validate_effective(&nan),
            Err(PolicyProblem::Value(("backoff.multiplier", _)))
        ));
        let no_window = Policy {
            window: Duration::ZERO,
            ..base
        };
        assert!(matches!(
            validate_effective(&no_window),
            Err(PolicyProblem::Value(("window_ms", _)))
        ));
    }

    #[test]
    fn every_field_a_check_can_name_is_traceable_to_its_layer() {
        let all = PolicySettings {
            backoff: BackoffSettings {
                initial_ms: Some(1),
                max_ms: Some(1),
                multiplier: Some(1.0),
                jitter: Some(0.0),
                reset_after_ms: Some(1),
            },
            max_restarts: Some(1),
            window_ms: Some(1),
            on_exhausted: Some(ActionSetting::Park),
            on_fatal: Some(ActionSetting::Park),
            liveness_timeout_ms: Some(1),
            shutdown_timeout_ms: Some(1),
            warn_after: Some(1),
        };
        for field in [
            "backoff.initial_ms",
            "backoff.max_ms",
            "backoff.multiplier",
            "backoff.jitter",
            "window_ms",
            "shutdown_timeout_ms",
        ] {
            assert!(all.sets(field), "{field}");
            assert!(!PolicySettings::default().sets(field), "{field}");
        }
        assert!(!all.sets("backoff.nonsense"));
    }
}
