//! Matrix accounts as supervised actors. The only module that imports `matrix_sdk`.
//!
//! ```text
//! root/channels              one_for_one   (channels_spec)
//! └── matrix                 one_for_one
//!     └── <alias>            rest_for_one  one per configured account (account_spec)
//!         ├── client         permanent     login/restore, sync loop, send (client.rs)
//!         └── approvals      permanent     only with approvals enabled (approvals.rs)
//! ```
//!
//! * [`settings`] — `[matrix]` as configured ([`MatrixSettings`]); an account's
//!   [`AccountSettings::resolve`] makes its [`AccountConfig`], the settings its actors run
//!   with, once the program has validated them.
//! * `client.rs` — the client actor: opens the local state (store.rs), restores the session
//!   or logs in through the `matrix_login` start-slot pool, then syncs; every error ends the
//!   incarnation and the supervisor restarts it (errors.rs says how).
//! * `inbound.rs` — which messages become `chat.message` events.
//!
//! Each account registers itself with the gateway's [`Chat`] when its subtree is built, so
//! `chat.send` reaches it through whichever incarnation of the client is running.

pub mod approvals;
mod client;
mod errors;
mod inbound;
pub mod settings;
mod store;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::gateway::chat::Chat;
use crate::supervision::{ChildSet, ChildSpec, PolicyCell, SlotClient, Strategy};

pub use client::{DEFAULT_POLICY, KIND};
pub use settings::{AccountSettings, ApprovalSettings, MatrixSettings};

/// The start-slot pool every password login passes.
pub const LOGIN_POOL: &str = "matrix_login";

/// One account's settings.
#[derive(Clone)]
pub struct AccountConfig {
    /// The alias: the subtree's name and the `account` of `chat.*`.
    pub alias: String,
    /// Homeserver base URL.
    pub homeserver: String,
    /// Full user ID; with a token it may be left out (then `whoami` finds it).
    pub user_id: Option<String>,
    /// Password, for a password login (and a fresh login when local state is unusable or
    /// the token is rejected).
    pub password: Option<String>,
    /// Access token of an existing session.
    pub access_token: Option<String>,
    /// The device of `access_token`.
    pub device_id: Option<String>,
    /// Recovery key, applied on every start that finds the account's secrets missing.
    pub recovery_key: Option<String>,
    /// Rooms the account acts in; empty = every joined room.
    pub allowed_rooms: Vec<String>,
    /// Senders whose messages are forwarded; empty = nobody, `*` = anyone.
    pub allowed_senders: Vec<String>,
    /// Join rooms an allowed sender invites the account to.
    pub auto_join: bool,
    /// Forward only messages that mention the account, outside direct chats.
    pub mention_only: bool,
    /// Whose `approve`/`deny` count; the approval handler runs only when `handler` is set
    /// and this is not empty.
    pub approvers: Vec<String>,
    /// `<state.dir>/matrix/<alias>`.
    pub dir: PathBuf,
    /// How long a send the homeserver rate-limits (429) is retried, after each
    /// `retry_after` (`matrix.send_retry_within_ms`).
    pub send_retry_within: std::time::Duration,
}

impl fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mask = |s: &Option<String>| s.as_ref().map(|_| "****");
        f.debug_struct("AccountConfig")
            .field("alias", &self.alias)
            .field("homeserver", &self.homeserver)
            .field("user_id", &self.user_id)
            .field("password", &mask(&self.password))
            .field("access_token", &mask(&self.access_token))
            .field("device_id", &self.device_id)
            .field("recovery_key", &mask(&self.recovery_key))
            .field("allowed_rooms", &self.allowed_rooms)
            .field("allowed_senders", &self.allowed_senders)
            .field("auto_join", &self.auto_join)
            .field("mention_only", &self.mention_only)
            .field("approvers", &self.approvers)
            .field("dir", &self.dir)
            .field("send_retry_within", &self.send_retry_within)
            .finish()
    }
}

/// One account's subtree: its settings, its client's policy, and its approval handler's
/// settings and policy when approvals are enabled. The policies are cells a config reload
/// may change in place.
pub struct AccountSpec {
    /// The account.
    pub config: AccountConfig,
    /// The client's policy.
    pub policy: PolicyCell,
    /// The approval handler, when `approvals.enabled` and there are approvers.
    pub handler: Option<(approvals::HandlerConfig, PolicyCell)>,
}

/// The `channels` subtree: `channels/matrix` and its accounts, each `<alias>` subtree in
/// `accounts` (a reload adds and removes accounts there and in the running supervisor).
/// `supervisor` is the policy of every supervisor in it (kind `supervisor`).
pub fn channels_spec(accounts: &ChildSet, supervisor: &PolicyCell) -> ChildSpec {
    let matrix = ChildSpec::supervisor_of(MATRIX_ID, Strategy::OneForOne, accounts.clone())
        .with_policy_cell(supervisor.clone());
    ChildSpec::supervisor(CHANNELS_ID, Strategy::OneForOne, vec![matrix])
        .with_policy_cell(supervisor.clone())
}

/// `root/channels`, the id of [`channels_spec`] under the root.
pub const CHANNELS_ID: &str = "channels";

/// The id of the supervisor of every account, under `channels`.
pub const MATRIX_ID: &str = "matrix";

/// Path of the supervisor of every account.
pub const ACCOUNTS_PATH: &str = "root/channels/matrix";

/// One account's running subtree, as built by [`account_spec`]: what a reload needs to
/// start or stop its approval handler alone.
pub struct AccountSubtree {
    /// The `<alias>` supervisor's spec.
    pub spec: ChildSpec,
    /// Its children (`client`, then `approvals`).
    pub children: ChildSet,
    account: Arc<client::Account>,
    slots: SlotClient,
}

impl AccountSubtree {
    /// The spec of this account's approval handler (id [`HANDLER_ID`]), sharing the
    /// account's client.
    pub fn handler_spec(&self, handler: approvals::HandlerConfig, policy: PolicyCell) -> ChildSpec {
        approvals::spec(
            handler,
            self.account.clone(),
            self.slots.clone(),
            policy.get(),
        )
        .with_policy_cell(policy)
    }
}

/// The id of an account's approval handler under `<alias>`.
pub const HANDLER_ID: &str = "approvals";

/// The `<alias>` subtree of one account — `client`, then `approvals` when enabled;
/// registers the account with `chat` (replacing an earlier one of that alias). The
/// `<alias>` supervisor gets `supervisor`.
pub fn account_spec(
    spec: AccountSpec,
    chat: &Chat,
    slots: &SlotClient,
    supervisor: &PolicyCell,
) -> AccountSubtree {
    let AccountSpec {
        config,
        policy,
        handler,
    } = spec;
    let alias = config.alias.clone();
    let handler = handler.filter(|_| !config.approvers.is_empty());
    let account = Arc::new(client::Account::new(config, chat.clone()));
    chat.register(&alias, account.clone());
    let client =
        client::spec(account.clone(), policy.get(), slots.clone()).with_policy_cell(policy);
    let subtree = AccountSubtree {
        spec: ChildSpec::supervisor("unused", Strategy::RestForOne, Vec::new()),
        children: ChildSet::new(vec![client]),
        account,
        slots: slots.clone(),
    };
    if let Some((handler, policy)) = handler {
        subtree.children.put(subtree.handler_spec(handler, policy));
    }
    AccountSubtree {
        spec: ChildSpec::supervisor_of(alias, Strategy::RestForOne, subtree.children.clone())
            .with_policy_cell(supervisor.clone()),
        ..subtree
    }
}
