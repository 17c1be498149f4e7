//! Every kind of child and its built-in restart policy: the bottom layer of every policy.
//!
//! A kind is a string so that the kernel stays generic; each actor module declares its own
//! `KIND` and `DEFAULT_POLICY`, and [`TABLE`] lists them all. `supervision.kinds.<kind>`
//! accepts only these kinds (so a misspelt kind is an error), and `warden config check`
//! validates the effective policy of each. `config/warden.toml` shows every row (a test
//! keeps it equal to the table). A kind without a row gets [`Policy::DEFAULT`].
//!
//! The actors of some kinds report no heartbeat (they have nothing to make progress on
//! while idle): a liveness timeout would only ever kill them as hung, so theirs is always
//! off, whatever a layer says ([`reports_heartbeat`]).

use warden_actors::gateway::{approvals as broker, listener, session};
use warden_actors::matrix::{self, approvals as handler};
use warden_actors::node::connection;
use warden_actors::supervision::{Policy, slots, supervisor};

use crate::admin;

/// One kind of child.
struct Kind {
    /// Its name: the actor module's `KIND`.
    name: &'static str,
    /// Its built-in policy: the actor module's `DEFAULT_POLICY`.
    policy: Policy,
    /// Whether its actor reports heartbeats (`Probe::beat`).
    heartbeat: bool,
}

/// Every kind of child, in the order `warden config check` validates them.
const TABLE: &[Kind] = &[
    kind(matrix::KIND, matrix::DEFAULT_POLICY, true),
    kind(handler::KIND, handler::DEFAULT_POLICY, true),
    kind(listener::KIND, listener::DEFAULT_POLICY, true),
    kind(connection::KIND, connection::DEFAULT_POLICY, true),
    kind(admin::KIND, admin::DEFAULT_POLICY, true),
    kind(slots::KIND, slots::DEFAULT_POLICY, false),
    kind(supervisor::KIND, supervisor::DEFAULT_POLICY, false),
    kind(broker::KIND, broker::DEFAULT_POLICY, false),
    kind(session::KIND, session::DEFAULT_POLICY, true),
];

const fn kind(name: &'static str, policy: Policy, heartbeat: bool) -> Kind {
    Kind {
        name,
        policy,
        heartbeat,
    }
}

/// The kinds that may appear under `supervision.kinds`: every kind in [`TABLE`].
pub const KINDS: [&str; TABLE.len()] = {
    let mut kinds = [""; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        kinds[i] = TABLE[i].name;
        i += 1;
    }
    kinds
};

fn find(kind: &str) -> Option<&'static Kind> {
    TABLE.iter().find(|k| k.name == kind)
}

/// The built-in policy of `kind`, before any configured layer.
pub fn builtin_policy(kind: &str) -> Policy {
    find(kind).map_or(Policy::DEFAULT, |k| k.policy.clone())
}

/// Whether the actors of `kind` report heartbeats, so that a liveness timeout can apply to
/// them. True for a kind without a row.
pub fn reports_heartbeat(kind: &str) -> bool {
    find(kind).is_none_or(|k| k.heartbeat)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::time::Duration;

    use warden_actors::supervision::settings::validate_effective;
    use warden_actors::supervision::{Action, Backoff};

    use super::*;
    use crate::config::DEFAULTS_TOML;

    #[test]
    fn every_built_in_policy_is_valid() {
        for kind in KINDS.iter().chain(&["something_else"]) {
            assert_eq!(validate_effective(&builtin_policy(kind)), Ok(()), "{kind}");
        }
    }

    /// The policies before each actor module declared its own: `builtin_policy` as it was
    /// for the kinds it knew, and the policies the other kinds' specs set themselves.
    fn policy_before(kind: &str) -> Policy {
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
            // `ChildSpec::supervisor`.
            "supervisor" => {
                let mut policy = Policy {
                    shutdown_timeout: Duration::from_secs(30),
                    ..Policy::default()
                };
                policy.backoff.initial = Duration::from_millis(100);
                policy.backoff.max = Duration::from_secs(10);
                policy
            }
            // `gateway::approvals::spec`.
            "approvals_broker" => Policy {
                backoff: Backoff {
                    initial: Duration::from_millis(200),
                    max: Duration::from_secs(10),
                    ..Policy::default().backoff
                },
                ..Policy::default()
            },
            // `gateway::session::spec`, less the liveness backstop it still derives from
            // the gateway's settings (the listener keeps it; its own test checks that).
            "gateway_session" => Policy {
                shutdown_timeout: Duration::from_secs(2),
                ..Policy::default()
            },
            _ => base,
        }
    }

    #[test]
    fn kinds_without_a_heartbeat_get_no_liveness_timeout() {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        let layer = "[supervision.defaults]\nliveness_timeout_ms = 60000\n";
        let config: crate::config::Config = Figment::from(Toml::string(DEFAULTS_TOML))
            .merge(Toml::string(layer))
            .extract()
            .expect("config");
        for kind in KINDS {
            let liveness = config.policy_for(kind, None).liveness_timeout;
            let expected = reports_heartbeat(kind).then_some(Duration::from_secs(60));
            assert_eq!(liveness, expected, "{kind}");
        }
        let silent: Vec<&str> = KINDS
            .into_iter()
            .filter(|k| !reports_heartbeat(k))
            .collect();
        assert_eq!(silent, ["start_slots", "supervisor", "approvals_broker"]);
    }

    #[test]
    fn the_built_in_policies_are_what_they_were() {
        for kind in KINDS.iter().chain(&["something_else"]) {
            assert_eq!(builtin_policy(kind), policy_before(kind), "{kind}");
        }
    }

    /// Every `pub const KIND: &str = "…";` under `dir`, recursively.
    fn declared_kinds(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                declared_kinds(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                for line in text.lines() {
                    if let Some(rest) = line.strip_prefix("pub const KIND: &str = \"") {
                        out.insert(rest.trim_end_matches("\";").to_string());
                    }
                }
            }
        }
    }

    #[test]
    fn every_kind_declared_in_the_source_has_a_row() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut declared = BTreeSet::new();
        declared_kinds(&root.join("src"), &mut declared);
        declared_kinds(&root.join("actors/src"), &mut declared);
        let listed: BTreeSet<String> = KINDS.iter().map(|k| k.to_string()).collect();
        assert_eq!(declared, listed);
    }

    /// A duration as `config/warden.toml` writes it: `200 ms`, `5 s`.
    fn human(d: Duration) -> String {
        if d >= Duration::from_secs(1) && d.subsec_millis() == 0 {
            format!("{} s", d.as_secs())
        } else {
            format!("{} ms", d.as_millis())
        }
    }

    /// The row of `kind` in the table of built-in policies in `config/warden.toml`.
    fn row(kind: &str, p: &Policy) -> String {
        let b = &p.backoff;
        let backoff = format!("{} → {} ×{}", human(b.initial), human(b.max), b.multiplier);
        let budget = match p.max_restarts {
            0 => "unlimited".to_string(),
            n => format!("{n} in {}", human(p.window)),
        };
        let give_up = format!("{}/{}", p.on_exhausted.as_str(), p.on_fatal.as_str());
        let mut other = Vec::new();
        if let Some(liveness) = p.liveness_timeout {
            other.push(format!("liveness {}", human(liveness)));
        }
        if p.warn_after > 0 {
            other.push(format!("warn_after {}", p.warn_after));
        }
        if p.shutdown_timeout != Policy::DEFAULT.shutdown_timeout {
            other.push(format!("shutdown {}", human(p.shutdown_timeout)));
        }
        let line = format!(
            "#   {kind:<17} {backoff:<17} {:<6} {:<6} {budget:<10} {give_up:<10} {}",
            b.jitter,
            human(b.reset_after),
            other.join(", ")
        );
        line.trim_end().to_string()
    }

    #[test]
    fn warden_toml_and_the_readme_show_every_kind() {
        let missing: Vec<String> = TABLE
            .iter()
            .map(|kind| row(kind.name, &kind.policy))
            .filter(|row| !DEFAULTS_TOML.lines().any(|line| line == row))
            .collect();
        assert!(
            missing.is_empty(),
            "config/warden.toml lacks these rows:\n{}",
            missing.join("\n")
        );
        let readme = include_str!("../../README.md");
        for kind in KINDS {
            assert!(readme.contains(&format!("`{kind}`")), "README.md: {kind}");
        }
    }
}
