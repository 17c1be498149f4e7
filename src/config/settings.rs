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

/// `[approvals]`: how approvers are notified when several accounts list them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// The account that notifies an approver it lists, when it is ready; else the first
    /// ready account (by alias) that lists the approver. Default none.
    pub default_account: Option<String>,
    /// How long a notifying account may stay down before its approvers are notified
    /// through another ready account, in ms. Default 60000; at least 100.
    pub renotify_after_ms: u64,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            default_account: None,
            renotify_after_ms: 60_000,
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
