//! The config sections that belong to no actor module: `[state]`, `[supervision]` and
//! `[shutdown]`.
//!
//! Every struct denies unknown fields. Defaults are documented per field and repeated in
//! `config/warden.toml`, which a test keeps equal to these `Default` impls.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use warden_actors::supervision::settings::PolicySettings;

/// `[state]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    /// Directory for durable state (pending approvals, Matrix stores). Default `.warden`,
    /// relative to the working directory; the container sets `/var/lib/warden`.
    pub dir: PathBuf,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".warden"),
        }
    }
}

/// `[supervision]`: restart-policy layers over the built-in kind defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionSettings {
    /// `[supervision.defaults]`: laid over every kind's built-in policy. Default empty.
    pub defaults: PolicySettings,
    /// `[supervision.kinds.<kind>]`: laid over `defaults` for one kind. Default empty.
    pub kinds: BTreeMap<String, PolicySettings>,
}

/// `[shutdown]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// The whole tree must have stopped within this long after a signal, in ms. Default 10000.
    pub deadline_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            deadline_ms: 10_000,
        }
    }
}
