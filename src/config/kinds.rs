//! Built-in restart policies per actor kind: the bottom layer of every policy.
//!
//! A kind is a string so that the kernel stays generic. `supervision.kinds.<kind>` accepts
//! only the kinds listed in [`KINDS`] (so a misspelt kind is an error): add a new kind there.
//! A kind without a row in [`builtin_policy`] gets [`Policy::default`].

use std::time::Duration;

use warden_actors::supervision::{Action, Backoff, Policy};

/// The kinds that have a built-in policy and may appear under `supervision.kinds`.
pub const KINDS: &[&str] = &[
    "matrix_account",
    "approval_handler",
    "gateway_listener",
    "node_connection",
    "admin",
    "start_slots",
];

/// The built-in policy of `kind`, before any configured layer.
///
/// | kind | backoff | budget | on_exhausted / on_fatal | other |
/// |---|---|---|---|---|
/// | `matrix_account` | 1 s → 60 s ×2, jitter 0.2, reset 60 s | unlimited | park / park | liveness 120 s |
/// | `approval_handler` | 1 s → 60 s | unlimited | park / park | warn after 5 |
/// | `gateway_listener` | 200 ms → 5 s | 5 in 60 s | exit / exit | |
/// | `node_connection` | 500 ms → 30 s, reset 30 s | unlimited | park / exit | |
/// | `admin` | 200 ms → 5 s | 5 in 60 s | exit / exit | |
/// | `start_slots`, anything else | [`Policy::default`]: 1 s → 60 s | unlimited | park / park | |
pub fn builtin_policy(kind: &str) -> Policy {
    let base = Policy::default();
    match kind {
        "matrix_account" => Policy {
            liveness_timeout: Some(Duration::from_secs(120)),
            ..base
        },
        "approval_handler" => Policy {
            warn_after: 5,
            ..base
        },
        "gateway_listener" | "admin" => Policy {
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(5),
                ..base.backoff
            },
            max_restarts: 5,
            window: Duration::from_secs(60),
            on_exhausted: Action::Exit,
            on_fatal: Action::Exit,
            ..base
        },
        "node_connection" => Policy {
            backoff: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
                reset_after: Duration::from_secs(30),
                ..base.backoff
            },
            max_restarts: 0,
            on_fatal: Action::Exit,
            ..base
        },
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use warden_actors::supervision::settings::validate_effective;

    use super::*;

    #[test]
    fn every_built_in_policy_is_valid() {
        for kind in KINDS.iter().chain(&["something_else"]) {
            assert_eq!(validate_effective(&builtin_policy(kind)), Ok(()), "{kind}");
        }
    }
}
