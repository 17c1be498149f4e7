//! The config sections that belong to no actor module: `[state]`, `[supervision]`,
//! `[matrix]`, `[node]` and `[shutdown]`.
//!
//! Every struct denies unknown fields. Defaults are documented per field and repeated in
//! `config/warden.toml`, which a test keeps equal to these `Default` impls.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use warden_actors::supervision::settings::PolicySettings;

/// What `Debug` prints in place of a secret.
const MASK: &str = "****";

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

/// `[matrix]` settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixSettings {
    /// `[matrix.accounts.<alias>]`, by alias. Default none. Aliases set from the
    /// environment are lower-cased, so keep aliases lower-case.
    pub accounts: BTreeMap<String, AccountSettings>,
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

/// `[node]`: this process also acts as a node host connected to a gateway.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Gateway WebSocket URL, `ws://…` or `wss://…`. Required.
    pub gateway_url: String,
    /// Gateway token. Secret. Required, here or through `token_file`: the node
    /// authenticates with it and checks approval grants with it.
    pub token: Option<String>,
    /// File holding `token`.
    pub token_file: Option<PathBuf>,
    /// Name the node announces; `None` = the host name.
    pub name: Option<String>,
    /// Exit (for the container to restart) after being disconnected this long, in ms;
    /// 0 = never. Default 0.
    #[serde(default)]
    pub max_disconnected_ms: u64,
    /// `[node.commands.<name>]`: the only commands the node runs. Default none.
    #[serde(default)]
    pub commands: BTreeMap<String, NodeCommand>,
    /// After losing an established connection, retry within `reconnect_within_ms` for this
    /// long (plus the gateway's announced `expected_back_ms`), in ms. Default 10000.
    #[serde(default = "default_reconnect_window_ms")]
    pub reconnect_window_ms: u64,
    /// The retry interval inside that window, in ms (jittered). Default 500.
    #[serde(default = "default_reconnect_within_ms")]
    pub reconnect_within_ms: u64,
    /// Commands run at once at most (> 0). Default 4.
    #[serde(default = "default_max_concurrent_commands")]
    pub max_concurrent_commands: usize,
    /// Invocations that wait, first come first served, while that many run; more are
    /// answered `busy` at once. 0 = none wait. Default 32.
    #[serde(default = "default_max_queued_commands")]
    pub max_queued_commands: usize,
}

fn default_max_concurrent_commands() -> usize {
    4
}

fn default_max_queued_commands() -> usize {
    32
}

fn default_reconnect_window_ms() -> u64 {
    10_000
}

fn default_reconnect_within_ms() -> u64 {
    500
}

impl fmt::Debug for NodeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSettings")
            .field("gateway_url", &self.gateway_url)
            .field("token", &mask(&self.token))
            .field("token_file", &self.token_file)
            .field("name", &self.name)
            .field("max_disconnected_ms", &self.max_disconnected_ms)
            .field("commands", &self.commands)
            .field("reconnect_window_ms", &self.reconnect_window_ms)
            .field("reconnect_within_ms", &self.reconnect_within_ms)
            .field("max_concurrent_commands", &self.max_concurrent_commands)
            .field("max_queued_commands", &self.max_queued_commands)
            .finish()
    }
}

/// `[node.commands.<name>]`: one command a node may run.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCommand {
    /// Program and fixed arguments, run without a shell. Required, non-empty.
    pub argv: Vec<String>,
    /// Whether callers may append arguments. Default false.
    #[serde(default)]
    pub args: bool,
    /// Whether each run needs an approval first: the node runs it only with a grant the
    /// gateway signed with the node's token for exactly this run. Default false.
    #[serde(default)]
    pub approval: bool,
    /// The run is killed (its whole process group) after this long, in ms, counted from
    /// its start. Default 60000.
    #[serde(default = "default_command_timeout_ms")]
    pub timeout_ms: u64,
    /// Bytes kept of each of stdout and stderr. Default 65536.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Variables set for the program, beside PATH, LANG and HOME copied from the node's
    /// environment (these win over them). Names non-empty, without `=` or NUL. Default
    /// empty.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Put callers' arguments after a literal `--`, so the program reads them as operands,
    /// never options. Default false.
    #[serde(default)]
    pub args_after_separator: bool,
    /// Accept callers' arguments that start with `-` (they may turn into options of the
    /// program). When false, such an argument is refused with `bad_request`, unless
    /// `args_after_separator` is set. Default false.
    #[serde(default)]
    pub allow_option_args: bool,
}

fn default_max_output_bytes() -> usize {
    64 * 1024
}

fn default_command_timeout_ms() -> u64 {
    60_000
}
