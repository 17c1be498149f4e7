//! `[matrix]`: the Matrix accounts as configured, and [`AccountSettings::resolve`], which
//! turns one into the [`AccountConfig`] its actors run with.
//!
//! Every struct denies unknown fields. Defaults are documented per field and repeated in
//! `config/warden.toml`. The program reads `_file` secrets in and validates the values
//! before anything resolves them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::AccountConfig;
use crate::supervision::settings::PolicySettings;

/// What `Debug` prints in place of a secret.
const MASK: &str = "****";

/// `[matrix]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixSettings {
    /// `[matrix.accounts.<alias>]`, by alias. Default none. Aliases set from the
    /// environment are lower-cased, so keep aliases lower-case.
    pub accounts: BTreeMap<String, AccountSettings>,
    /// How long a send the homeserver rate-limits (429) is sent again, each time after
    /// the server's `retry_after`, before it fails with `rate_limited`, in ms. Default
    /// 30000; 0 sends once.
    pub send_retry_within_ms: u64,
}

/// `matrix.send_retry_within_ms` unless configured.
pub const DEFAULT_SEND_RETRY_WITHIN_MS: u64 = 30_000;

impl Default for MatrixSettings {
    fn default() -> Self {
        Self {
            accounts: BTreeMap::new(),
            send_retry_within_ms: DEFAULT_SEND_RETRY_WITHIN_MS,
        }
    }
}

/// `[matrix.accounts.<alias>]`: one Matrix account. Needs `password` or `access_token`
/// (directly or through their `_file` forms).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    /// Homeserver base URL, `http://…` or `https://…`. Required.
    pub homeserver: String,
    /// Full user ID, `@name:server`. Required with a password; with an access token it may be
    /// left out (a `whoami` finds it before the first sync).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Login password. Secret.
    pub password: Option<String>,
    /// File holding `password` (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Access token of an existing session, used instead of a password login. Secret.
    pub access_token: Option<String>,
    /// File holding `access_token`.
    pub access_token_file: Option<PathBuf>,
    /// Device ID of the session that `access_token` belongs to (without it, a `whoami`
    /// finds it before the first sync: the crypto store is keyed by the device).
    pub device_id: Option<String>,
    /// Key-backup recovery key. Secret.
    pub recovery_key: Option<String>,
    /// File holding `recovery_key`.
    pub recovery_key_file: Option<PathBuf>,
    /// When non-empty, the account acts only in these rooms: room IDs (`!…`), not aliases.
    /// Default empty: every joined room.
    #[serde(default)]
    pub allowed_rooms: Vec<String>,
    /// Users whose messages the account forwards: full IDs, case-insensitive; `"*"` is
    /// anyone. Default empty: nobody.
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    /// Join rooms it is invited to (by an allowed sender). Default true.
    #[serde(default = "default_true")]
    pub auto_join: bool,
    /// In a room of more than two members, forward only messages that mention the account
    /// (`m.mentions`, its user ID or its display name); a direct chat's always. Default
    /// false.
    #[serde(default)]
    pub mention_only: bool,
    /// `approvals = { … }`: whether this account hosts an approval handler.
    #[serde(default)]
    pub approvals: ApprovalSettings,
    /// Per-account restart-policy layer, over `supervision.kinds.matrix_account`.
    #[serde(default)]
    pub supervision: PolicySettings,
}

fn default_true() -> bool {
    true
}

/// Masks a secret for `Debug`.
fn mask(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| MASK)
}

impl fmt::Debug for AccountSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountSettings")
            .field("homeserver", &self.homeserver)
            .field("user_id", &self.user_id)
            .field("password", &mask(&self.password))
            .field("password_file", &self.password_file)
            .field("access_token", &mask(&self.access_token))
            .field("access_token_file", &self.access_token_file)
            .field("device_id", &self.device_id)
            .field("recovery_key", &mask(&self.recovery_key))
            .field("recovery_key_file", &self.recovery_key_file)
            .field("allowed_rooms", &self.allowed_rooms)
            .field("allowed_senders", &self.allowed_senders)
            .field("auto_join", &self.auto_join)
            .field("mention_only", &self.mention_only)
            .field("approvals", &self.approvals)
            .field("supervision", &self.supervision)
            .finish()
    }
}

/// `approvals = { … }` of a Matrix account. Opt-in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalSettings {
    /// Run an approval handler on this account. Default false.
    pub enabled: bool,
    /// Users whose `approve`/`deny` count. The handler runs only with at least one.
    pub approvers: Vec<String>,
}

impl AccountSettings {
    /// The runtime config of account `alias`, its local state under
    /// `<state_dir>/matrix/<alias>`, retrying rate-limited sends for
    /// [`DEFAULT_SEND_RETRY_WITHIN_MS`] (the caller sets the configured value).
    pub fn resolve(&self, alias: &str, state_dir: &Path) -> AccountConfig {
        AccountConfig {
            alias: alias.to_string(),
            homeserver: self.homeserver.clone(),
            user_id: self.user_id.clone(),
            password: self.password.clone(),
            access_token: self.access_token.clone(),
            device_id: self.device_id.clone(),
            recovery_key: self.recovery_key.clone(),
            allowed_rooms: self.allowed_rooms.clone(),
            allowed_senders: self.allowed_senders.clone(),
            auto_join: self.auto_join,
            mention_only: self.mention_only,
            approvers: self.approvals.approvers.clone(),
            dir: state_dir.join("matrix").join(alias),
            send_retry_within: std::time::Duration::from_millis(DEFAULT_SEND_RETRY_WITHIN_MS),
        }
    }
}

impl ApprovalSettings {
    /// Whether the account runs an approval handler: enabled, with at least one approver.
    pub fn runs_handler(&self) -> bool {
        self.enabled && !self.approvers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountSettings {
        AccountSettings {
            homeserver: "http://localhost:8008".into(),
            user_id: Some("@nova:localhost".into()),
            password: Some("pw-secret".into()),
            password_file: None,
            access_token: Some("token-secret".into()),
            access_token_file: None,
            device_id: Some("WARDENNOVA".into()),
            recovery_key: Some("key-secret".into()),
            recovery_key_file: None,
            allowed_rooms: vec!["!room:localhost".into()],
            allowed_senders: vec!["@owner:localhost".into()],
            auto_join: false,
            mention_only: false,
            approvals: ApprovalSettings {
                enabled: true,
                approvers: vec!["@owner:localhost".into()],
            },
            supervision: PolicySettings::default(),
        }
    }

    #[test]
    fn an_account_resolves_to_its_runtime_config() {
        let config = account().resolve("nova", Path::new("/var/lib/warden"));
        assert_eq!(config.alias, "nova");
        assert_eq!(config.homeserver, "http://localhost:8008");
        assert_eq!(config.user_id.as_deref(), Some("@nova:localhost"));
        assert_eq!(config.password.as_deref(), Some("pw-secret"));
        assert_eq!(config.access_token.as_deref(), Some("token-secret"));
        assert_eq!(config.device_id.as_deref(), Some("WARDENNOVA"));
        assert_eq!(config.recovery_key.as_deref(), Some("key-secret"));
        assert_eq!(config.allowed_rooms, ["!room:localhost"]);
        assert_eq!(config.allowed_senders, ["@owner:localhost"]);
        assert!(!config.auto_join);
        assert_eq!(config.approvers, ["@owner:localhost"]);
        assert_eq!(config.dir, Path::new("/var/lib/warden/matrix/nova"));
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let text = format!("{:?}", account());
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains(MASK), "{text}");
    }

    #[test]
    fn a_handler_needs_approvals_enabled_and_an_approver() {
        let approvals = |enabled, approvers: &[&str]| ApprovalSettings {
            enabled,
            approvers: approvers.iter().map(|a| a.to_string()).collect(),
        };
        assert!(approvals(true, &["@a:b"]).runs_handler());
        assert!(!approvals(true, &[]).runs_handler());
        assert!(!approvals(false, &["@a:b"]).runs_handler());
    }
}
