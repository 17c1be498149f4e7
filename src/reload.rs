//! Config reload: what `warden run` keeps of the tree it built so that `SIGHUP`,
//! `POST /admin/reload` and `warden reload` can apply a changed config to it without
//! restarting what did not change.
//!
//! [`Live`] holds the running config and every handle through which a change applies:
//!
//! | what changed | how it applies |
//! |---|---|
//! | `supervision.*`, an account's `supervision` | the kind's (or account's) [`PolicyCell`]: the next backoff, budget, liveness and stop decisions use it; nothing restarts |
//! | `start_slots.*` | [`SlotClient::configure`]: in place, holders and queue kept |
//! | `gateway.*` principals, caps, timeouts, origins | [`GatewayState::reconfigure`]: new connections and requests read them; a session whose credential no longer admits it is closed with 1008 |
//! | an account added / removed | its `<alias>` subtree is added to / stopped in order and removed from `root/channels/matrix` |
//! | an account's credentials, homeserver, filters or approvers | that account alone restarts (removed, then added anew) |
//! | an account's `approvals.enabled` alone | its approval handler alone starts or stops |
//! | `approvals.*` (and who lists which approver) | [`GatewayState::set_approval_routing`]: the next request and the broker's next sweep read it; notices of accounts that no longer list their approver move at once (the sweep's period stays as at start) |
//! | `gateway.bind`, `gateway.header_read_timeout_ms`, `gateway.max_connections`, `gateway.node_forget_after_ms`, `matrix.send_retry_within_ms`, `admin.*` (its token compared by value), `state.*`, `inbox.*`, `telemetry.*`, `shutdown.*`, `node.*` | nothing: reported as needing a restart, the running value kept |
//!
//! A new config is loaded and checked whole ([`Loaded::reload`]); an invalid one is
//! refused with the error start-up would print, and nothing changes. Reloads run one at a
//! time inside the program's wait ([`Live::serve`]), never inside the request that asked:
//! a client that goes away cannot cut one off halfway. Every applied change
//! is logged on one line; the generation (1 at start) moves by one per applied reload.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};
use warden_actors::gateway::{
    self, GatewayPolicies, GatewaySettings, GatewayState, listener, session,
};
use warden_actors::matrix::approvals::{self as handlers, GatewayAddr, HandlerConfig};
use warden_actors::matrix::{self, AccountSpec, AccountSubtree};
use warden_actors::supervision::metrics as m;
use warden_actors::supervision::{
    ChildSet, ChildSpec, Policy, PolicyCell, ROOT, SlotClient, SupervisorError, TreeHandle, slots,
    supervisor,
};

use crate::admin::{self, AdminState};
use crate::config::{AccountSettings, Config, ConfigEntry, ConfigError, Loaded};

/// Where the accounts' subtree hangs.
const CHANNELS_PATH: &str = "root/channels";

/// Keys a running process cannot change: a reload reports them as needing a restart and
/// keeps their running values. A key is one of these, or below one of them.
pub const NEEDS_RESTART: &[&str] = &[
    "gateway.bind",
    "gateway.header_read_timeout_ms",
    "gateway.max_connections",
    "gateway.node_forget_after_ms",
    "matrix.send_retry_within_ms",
    "admin",
    "state",
    "inbox",
    "telemetry",
    "shutdown",
    "node",
];

/// Whether `key` is (below) one of [`NEEDS_RESTART`].
fn needs_restart(key: &str) -> bool {
    NEEDS_RESTART.iter().any(|prefix| {
        key == *prefix
            || key
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The running config and the handles a reload applies changes through.
pub struct Live {
    state: tokio::sync::Mutex<LiveState>,
    status: RwLock<Status>,
    /// Reloads asked over the admin endpoint, for [`Live::serve`].
    requests: mpsc::Sender<Request>,
    /// Taken by [`Live::serve`].
    inbox: std::sync::Mutex<Option<mpsc::Receiver<Request>>>,
}

/// A reload asked by `trigger`, answered on `reply`.
type Request = (&'static str, oneshot::Sender<Result<Report, ConfigError>>);

/// Reloads waiting for [`Live::serve`] at most; more are refused as busy.
const MAX_WAITING: usize = 4;

/// Why a reload asked for did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid; nothing changed.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// Reloads are not being served (the process is stopping) or too many wait.
    #[error("{0}")]
    Unavailable(&'static str),
}

/// Where the running config stands, for the tree, `/admin/config` and the reload answer.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// 1 at start, one more per applied reload.
    pub generation: u64,
    /// When the running config was applied (RFC 3339).
    pub applied_at: String,
    /// Keys changed in the file, environment or flags that wait for a restart.
    pub pending_restart: Vec<String>,
}

/// What one applied reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The generation now running.
    pub generation: u64,
    /// When it was applied.
    pub applied_at: String,
    /// One line per change, as logged.
    pub changes: Vec<String>,
    /// Keys that changed but need a restart (their running values are kept).
    pub needs_restart: Vec<String>,
}

struct LiveState {
    /// The config as last loaded (its entries are what `/admin/config` shows).
    loaded: Loaded,
    /// The config the tree runs: `loaded`, with the keys that need a restart at their
    /// start-up values.
    running: Config,
    /// The entries at start-up: what the keys that need a restart still run with.
    boot: Vec<ConfigEntry>,
    policies: Policies,
    slots: SlotClient,
    gateway: GatewayState,
    gateway_addr: GatewayAddr,
    /// `root/channels/matrix`'s children, one `<alias>` subtree each.
    accounts: ChildSet,
    subtrees: BTreeMap<String, Account>,
    /// The operator token `warden run` made when none is configured.
    generated_token: Option<String>,
    tree: Option<TreeHandle>,
    admin: AdminState,
}

/// One running account: its subtree and the settings it runs with.
struct Account {
    subtree: AccountSubtree,
    settings: AccountSettings,
}

/// Every policy cell the tree's specs read, by kind, and the accounts' own.
#[derive(Default)]
struct Policies {
    kinds: BTreeMap<String, PolicyCell>,
    accounts: BTreeMap<String, PolicyCell>,
}

impl Policies {
    /// The cell of `kind` (made from `config` the first time).
    fn kind(&mut self, config: &Config, kind: &str) -> PolicyCell {
        self.kinds
            .entry(kind.to_string())
            .or_insert_with(|| PolicyCell::new(config.policy_for(kind, None)))
            .clone()
    }

    /// The cell of account `alias`'s client, set from `account`.
    fn account(&mut self, config: &Config, alias: &str, account: &AccountSettings) -> PolicyCell {
        let policy = config.policy_for(matrix::KIND, Some(&account.supervision));
        let cell = self
            .accounts
            .entry(alias.to_string())
            .or_insert_with(|| PolicyCell::new(policy.clone()));
        cell.set(policy);
        cell.clone()
    }

    /// Sets every cell from `config`; returns a line per kind or account whose policy
    /// changed: `kind matrix_account: backoff.max_ms 60000 → 5000`.
    fn apply(&mut self, config: &Config) -> Vec<String> {
        let mut changed = Vec::new();
        let mut set = |who: String, cell: &PolicyCell, policy: Policy| {
            let was = cell.get();
            if cell.set(policy.clone()) {
                changed.push(format!(
                    "{who}: {}",
                    policy_changes(&was, &policy).join(", ")
                ));
            }
        };
        for (kind, cell) in &self.kinds {
            set(format!("kind {kind}"), cell, config.policy_for(kind, None));
        }
        for (alias, cell) in &self.accounts {
            if let Some(account) = config.matrix.accounts.get(alias) {
                let policy = config.policy_for(matrix::KIND, Some(&account.supervision));
                set(format!("account {alias}'s client"), cell, policy);
            }
        }
        changed
    }
}

/// What [`Live::build`] makes: the tree's children and the live handles.
pub struct Built {
    /// The root's children, in start order.
    pub children: Vec<ChildSpec>,
    /// The handles, to hand the tree to once started.
    pub live: Arc<Live>,
}

impl Live {
    /// Builds the gateway tree's children from `loaded` and keeps what a reload needs.
    /// `generated_token` is the operator token made when none is configured.
    pub fn build(
        loaded: Loaded,
        gateway: GatewayState,
        gateway_bound: Arc<tokio::sync::watch::Sender<Option<std::net::SocketAddr>>>,
        generated_token: Option<String>,
        admin_state: AdminState,
    ) -> Built {
        let config = loaded.config.clone();
        let mut policies = Policies::default();
        let slots_client = SlotClient::new();
        let gateway_addr = GatewayAddr::Bound(gateway_bound.subscribe());
        let supervisor_policy = policies.kind(&config, supervisor::KIND);
        let gateway_policies = GatewayPolicies {
            listener: policies.kind(&config, listener::KIND),
            approvals: policies.kind(&config, gateway::approvals::KIND),
            session: policies.kind(&config, session::KIND),
            supervisor: supervisor_policy.clone(),
        };
        let mut state = LiveState {
            boot: loaded.entries(),
            running: config.clone(),
            loaded,
            policies,
            slots: slots_client.clone(),
            gateway: gateway.clone(),
            gateway_addr,
            accounts: ChildSet::default(),
            subtrees: BTreeMap::new(),
            generated_token,
            tree: None,
            admin: admin_state.clone(),
        };
        for (alias, account) in &config.matrix.accounts {
            let subtree = state.build_account(alias, account);
            state.accounts.put(subtree.spec.clone());
            let settings = account.clone();
            state
                .subtrees
                .insert(alias.clone(), Account { subtree, settings });
        }
        let slots_policy = state.policies.kind(&config, slots::KIND);
        let admin_policy = state.policies.kind(&config, admin::KIND);
        let mut children = vec![
            slots_client
                .spec("start_slots", config.pools())
                .with_policy_cell(slots_policy),
            gateway::spec_with(&gateway, gateway_policies, gateway_bound),
        ];
        if !config.matrix.accounts.is_empty() {
            children.push(matrix::channels_spec(&state.accounts, &supervisor_policy));
        }
        children.push(
            admin::spec(
                &config.admin,
                admin_state,
                config.policy_for(admin::KIND, None),
            )
            .with_policy_cell(admin_policy),
        );
        let status = Status {
            generation: 1,
            applied_at: now_rfc3339(),
            pending_restart: Vec::new(),
        };
        state
            .admin
            .set_config(config_document(&state.loaded, &status, &state.boot));
        let (requests, inbox) = mpsc::channel(MAX_WAITING);
        let live = Arc::new(Live {
            state: tokio::sync::Mutex::new(state),
            status: RwLock::new(status),
            requests,
            inbox: std::sync::Mutex::new(Some(inbox)),
        });
        metrics::gauge!(m::CONFIG_GENERATION).set(1.0);
        Built { children, live }
    }

    /// Hands the started tree over: reloads act on it from now on.
    pub async fn set_tree(&self, tree: TreeHandle) {
        self.state.lock().await.tree = Some(tree);
    }

    /// Where the running config stands.
    pub fn status(&self) -> Status {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves reloads, one at a time, until dropped: one per SIGHUP and per
    /// [`Live::request`]. The program polls it while it waits for a stop, so a reload runs
    /// to its end even when whoever asked for it goes away, and ends only with the process.
    pub async fn serve<S>(&self, mut hangups: crate::program::Hangups) -> S {
        let taken = self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut requests) = taken else {
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                () = hangups.recv() => {
                    let _ = self.reload("SIGHUP").await;
                }
                Some((trigger, reply)) = requests.recv() => {
                    let _ = reply.send(self.reload(trigger).await);
                }
            }
        }
    }

    /// Asks [`Live::serve`] for a reload and waits for its outcome.
    pub async fn request(&self, trigger: &'static str) -> Result<Report, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send((trigger, reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    ReloadError::Unavailable("too many reloads are waiting; try again shortly")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    ReloadError::Unavailable("the process is stopping")
                }
            })?;
        match answer.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ReloadError::Unavailable("the process is stopping")),
        }
    }

    /// Loads the config again and applies what changed. `trigger` names who asked
    /// (`SIGHUP`, `POST /admin/reload`), for the log. An invalid config changes nothing.
    async fn reload(&self, trigger: &str) -> Result<Report, ConfigError> {
        let mut state = self.state.lock().await;
        let next = match state.loaded.reload() {
            Ok(next) => next,
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "rejected").increment(1);
                error!(trigger, key = %e.key, source = %e.source, error = %e,
                    "Config reload rejected; the running config stays.");
                return Err(e);
            }
        };
        if let Err(e) = state.ensure_operator_token(&next.config) {
            metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "rejected").increment(1);
            error!(trigger, key = %e.key, error = %e, "Config reload rejected; the running config stays.");
            return Err(e);
        }
        let (changes, needs_restart) = state.apply(next).await;
        let generation = {
            let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
            status.generation += 1;
            status.applied_at = now_rfc3339();
            status.pending_restart = needs_restart.clone();
            status.generation
        };
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "applied").increment(1);
        metrics::gauge!(m::CONFIG_GENERATION).set(generation as f64);
        for line in &changes {
            info!(trigger, generation, "Config reload: {line}.");
        }
        if !needs_restart.is_empty() {
            warn!(trigger, generation, keys = %needs_restart.join(", "),
                "Config reload: these keys changed but need a restart; their running values stay.");
        }
        info!(
            trigger,
            generation,
            changes = changes.len(),
            "Config reload applied."
        );
        let status = self.status();
        state
            .admin
            .set_config(config_document(&state.loaded, &status, &state.boot));
        Ok(Report {
            generation,
            applied_at: status.applied_at,
            changes,
            needs_restart,
        })
    }
}

/// What `/admin/config` serves: every entry with its source, and the reload status. An
/// entry waiting for a restart also says what still runs (`running_value`, absent when the
/// key was not set at start-up).
fn config_document(loaded: &Loaded, status: &Status, boot: &[ConfigEntry]) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = loaded
        .entries()
        .into_iter()
        .map(|e| {
            let mut entry = json!({ "key": e.key, "value": e.value, "source": e.source });
            if status.pending_restart.contains(&e.key) {
                entry["pending_restart"] = json!(true);
                if let Some(running) = boot.iter().find(|b| b.key == e.key) {
                    entry["running_value"] = json!(running.value);
                }
            }
            entry
        })
        .collect();
    json!({
        "entries": entries,
        "generation": status.generation,
        "applied_at": status.applied_at,
        "pending_restart": status.pending_restart,
    })
}

impl LiveState {
    /// The `<alias>` subtree of `account`, with its handler when it runs one.
    fn build_account(&mut self, alias: &str, account: &AccountSettings) -> AccountSubtree {
        let config = self.running.clone();
        let handler = account.approvals.runs_handler().then(|| {
            let policy = self.policies.kind(&config, handlers::KIND);
            (self.handler_config(alias), policy)
        });
        let mut resolved = account.resolve(alias, &config.state.dir);
        resolved.send_retry_within =
            std::time::Duration::from_millis(config.matrix.send_retry_within_ms);
        let spec = AccountSpec {
            config: resolved,
            policy: self.policies.account(&config, alias, account),
            handler,
        };
        let supervisor = self.policies.kind(&config, supervisor::KIND);
        matrix::account_spec(spec, self.gateway.chat(), &self.slots, &supervisor)
    }

    /// An approval handler's settings, with a new in-memory credential for it.
    fn handler_config(&self, alias: &str) -> HandlerConfig {
        let credential = self.gateway.add_approver(alias);
        HandlerConfig {
            alias: alias.to_string(),
            gateway: self.gateway_addr.clone(),
            token: credential.expose().to_string(),
            handshake_timeout: Duration::from_millis(self.running.gateway.handshake_timeout_ms),
        }
    }

    /// Applies `next`; returns the change lines and the keys that need a restart.
    async fn apply(&mut self, next: Loaded) -> (Vec<String>, Vec<String>) {
        let before = self.loaded.entries();
        let after = next.entries();
        let mut changes = Vec::new();
        let old: BTreeMap<&str, &str> = before
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        let new: BTreeMap<&str, &str> = after
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        // An empty table is one entry (`supervision.kinds = {}`) until it gets keys: that is
        // no change of its own.
        let has_keys_below = |entries: &BTreeMap<&str, &str>, table: &str| {
            let prefix = format!("{table}.");
            entries
                .range(prefix.as_str()..)
                .next()
                .is_some_and(|(key, _)| key.starts_with(&prefix))
        };
        let later = |key: &str| match needs_restart(key) {
            true => " (needs a restart)",
            false => "",
        };
        for (key, value) in &new {
            match old.get(key) {
                Some(was) if was == value => {}
                Some(was) => changes.push(format!("{key}: {was} → {value}{}", later(key))),
                None if *value == "{}" && has_keys_below(&old, key) => {}
                None => changes.push(format!("{key}: set to {value}{}", later(key))),
            }
        }
        for key in old.keys().filter(|k| !new.contains_key(*k)) {
            if !has_keys_below(&new, key) {
                changes.push(format!("{key}: removed{}", later(key)));
            }
        }
        let boot: BTreeMap<&str, &str> = self
            .boot
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        let mut pending: Vec<String> = new
            .iter()
            .filter(|(key, value)| needs_restart(key) && boot.get(*key) != Some(*value))
            .map(|(key, _)| key.to_string())
            .chain(
                boot.keys()
                    .filter(|k| needs_restart(k) && !new.contains_key(*k))
                    .map(|k| k.to_string()),
            )
            .collect();
        pending.sort();
        // Secrets show as **** (or as their `_file` path) in the entries: a changed secret
        // is found in the config itself. The admin token is the one a restart must apply.
        if next.config.admin.token != self.running.admin.token {
            pending.push("admin.token".to_string());
        }
        // Set or unset shows in the entries; a new value of a token that stays set does not.
        let (was, now) = (&self.loaded.config.admin.token, &next.config.admin.token);
        if was.is_some() && now.is_some() && was != now {
            changes.push("admin.token: changed (needs a restart)".to_string());
        }
        pending.sort();
        pending.dedup();
        let mut running = next.config.clone();
        keep_restart_only(&mut running, &self.running);
        if running.gateway != self.running.gateway {
            let settings = self.gateway_settings(&running.gateway);
            self.gateway.reconfigure(settings);
            if principals_differ(&running.gateway, &self.running.gateway) {
                changes.push(
                    "gateway principals replaced; sessions whose credential was revoked are closed"
                        .to_string(),
                );
            }
        }
        self.running = running;
        self.loaded = next;
        // Applied to the next decisions; nothing restarts for a policy.
        changes.extend(self.policies.apply(&self.running));
        self.slots.configure(self.running.pools());
        changes.extend(self.apply_accounts().await);
        (changes, pending)
    }

    /// `settings` with the generated operator token when it configures none, as at start
    /// ([`LiveState::ensure_operator_token`] made it).
    fn gateway_settings(&self, settings: &GatewaySettings) -> GatewaySettings {
        let mut settings = settings.clone();
        if settings.token.is_none() && settings.operators.is_empty() {
            settings.token = self.generated_token.clone();
        }
        settings
    }

    /// A config with no operator credential gets the generated token, as at a start
    /// without one; made now if the process started with credentials of its own. When it
    /// cannot be stored, the config is refused (as start-up refuses it): applied, it would
    /// lock every operator out.
    fn ensure_operator_token(&mut self, next: &Config) -> Result<(), ConfigError> {
        let gateway = &next.gateway;
        if gateway.token.is_some()
            || !gateway.operators.is_empty()
            || self.generated_token.is_some()
        {
            return Ok(());
        }
        match crate::token::operator_token(&self.running.state.dir) {
            Ok((token, path, _)) => {
                info!(path = %path.display(), "No gateway.token or gateway.operators configured any more: operators use the generated token stored there.");
                self.generated_token = Some(token);
                Ok(())
            }
            Err(e) => Err(ConfigError {
                key: "gateway.token".to_string(),
                source: "the reloaded config".to_string(),
                message: format!(
                    "no gateway.token or gateway.operators configured, and no operator token \
                     can be stored under state.dir: {e}"
                ),
            }),
        }
    }

    /// Adds, removes and restarts accounts to match `self.running`; starts or stops
    /// approval handlers; updates the approvers the broker accepts.
    async fn apply_accounts(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let wanted = self.running.matrix.accounts.clone();
        let gone: Vec<String> = self
            .subtrees
            .keys()
            .filter(|alias| !wanted.contains_key(*alias))
            .cloned()
            .collect();
        for alias in gone {
            self.stop_account(&alias).await;
            self.gateway.chat().unregister(&alias);
            lines.push(format!("account {alias} removed (stopped in order)"));
        }
        for (alias, account) in &wanted {
            let Some(running) = self.subtrees.get(alias) else {
                self.start_account(alias, account).await;
                lines.push(format!("account {alias} added"));
                continue;
            };
            let was = running.settings.clone();
            if restarts(&was, account) {
                self.stop_account(alias).await;
                self.start_account(alias, account).await;
                lines.push(format!(
                    "account {alias} restarted: its credentials, homeserver, filters or approvers changed"
                ));
            } else if was.approvals.runs_handler() != account.approvals.runs_handler() {
                let started = self.toggle_handler(alias, account).await;
                lines.push(format!(
                    "account {alias}: approval handler {}",
                    if started { "started" } else { "stopped" }
                ));
            }
            if let Some(running) = self.subtrees.get_mut(alias) {
                running.settings = account.clone();
            }
        }
        self.gateway
            .set_approval_routing(self.running.approval_routing());
        lines
    }

    /// Builds and starts account `alias`'s subtree (and `root/channels` if it is the first).
    async fn start_account(&mut self, alias: &str, account: &AccountSettings) {
        let subtree = self.build_account(alias, account);
        let spec = subtree.spec.clone();
        self.accounts.put(spec.clone());
        let settings = account.clone();
        self.subtrees
            .insert(alias.to_string(), Account { subtree, settings });
        let Some(tree) = &self.tree else { return };
        let result = match tree.supervisor(matrix::ACCOUNTS_PATH) {
            Some(accounts) => accounts.add(spec).await,
            // The first account of a process that started with none: `root/channels` is
            // added, with every account of the set.
            None if tree.snapshot().find(CHANNELS_PATH).is_none() => {
                let supervisor = self.policies.kind(&self.running, supervisor::KIND);
                let channels = matrix::channels_spec(&self.accounts, &supervisor);
                match tree.supervisor(ROOT) {
                    Some(root) => root.add(channels).await,
                    None => Err(SupervisorError::ShuttingDown),
                }
            }
            // The accounts' supervisor is restarting, stopped or parked: it starts the
            // account with the others, from the set.
            None => {
                warn!(
                    account = alias,
                    "Config reload: the accounts' supervisor is not running; the account starts when it does."
                );
                return;
            }
        };
        report_start(&format!("account {alias}"), result);
    }

    /// Stops account `alias`'s subtree in order and forgets it.
    async fn stop_account(&mut self, alias: &str) {
        self.accounts.remove(alias);
        self.subtrees.remove(alias);
        // Stopped first, then its handler's credential revoked: a handler refused while it
        // still runs would count a failure, fatal at that.
        if let Some(accounts) = self
            .tree
            .as_ref()
            .and_then(|t| t.supervisor(matrix::ACCOUNTS_PATH))
        {
            match accounts.remove(alias).await {
                Ok(()) | Err(SupervisorError::UnknownChild(_)) => {}
                Err(e) => {
                    warn!(account = alias, error = %e, "Config reload: cannot stop the account.")
                }
            }
        }
        self.gateway.remove_approver(alias);
    }

    /// Starts or stops account `alias`'s approval handler alone; returns whether it runs
    /// now.
    async fn toggle_handler(&mut self, alias: &str, account: &AccountSettings) -> bool {
        let start = account.approvals.runs_handler();
        let path = format!("{}/{alias}", matrix::ACCOUNTS_PATH);
        let supervisor = self.tree.as_ref().and_then(|t| t.supervisor(&path));
        if start {
            let policy = self.policies.kind(&self.running, handlers::KIND);
            let handler = self.handler_config(alias);
            let Some(running) = self.subtrees.get(alias) else {
                return false;
            };
            let spec = running.subtree.handler_spec(handler, policy);
            running.subtree.children.put(spec.clone());
            if let Some(supervisor) = supervisor {
                report_start(
                    &format!("account {alias}'s approval handler"),
                    supervisor.add(spec).await,
                );
            }
        } else {
            if let Some(running) = self.subtrees.get(alias) {
                running.subtree.children.remove(matrix::HANDLER_ID);
            }
            if let Some(supervisor) = supervisor {
                match supervisor.remove(matrix::HANDLER_ID).await {
                    Ok(()) | Err(SupervisorError::UnknownChild(_)) => {}
                    Err(e) => {
                        warn!(account = alias, error = %e, "Config reload: cannot stop the approval handler.")
                    }
                }
            }
            self.gateway.remove_approver(alias);
        }
        start
    }
}

/// Logs how a start asked by a reload went: a child that exists already (its supervisor
/// restarted from the changed set meanwhile) or that failed its first start (its policy
/// retries it) is no reload error.
fn report_start<T>(what: &str, result: Result<T, SupervisorError>) {
    match result {
        Ok(_) | Err(SupervisorError::Conflict { .. }) => {}
        Err(SupervisorError::StartFailed { .. }) => {
            warn!(
                what,
                "Config reload: the first start failed; its policy retries it."
            )
        }
        Err(e) => warn!(what, error = %e, "Config reload: cannot start it."),
    }
}

/// Each field that differs between `was` and `now`, as `field old → new` (durations in
/// ms, as configured).
fn policy_changes(was: &Policy, now: &Policy) -> Vec<String> {
    let ms = |d: Duration| d.as_millis().to_string();
    let opt_ms = |d: Option<Duration>| d.map_or("none".to_string(), ms);
    let fields: [(&str, String, String); 12] = [
        (
            "backoff.initial_ms",
            ms(was.backoff.initial),
            ms(now.backoff.initial),
        ),
        ("backoff.max_ms", ms(was.backoff.max), ms(now.backoff.max)),
        (
            "backoff.multiplier",
            was.backoff.multiplier.to_string(),
            now.backoff.multiplier.to_string(),
        ),
        (
            "backoff.jitter",
            was.backoff.jitter.to_string(),
            now.backoff.jitter.to_string(),
        ),
        (
            "backoff.reset_after_ms",
            ms(was.backoff.reset_after),
            ms(now.backoff.reset_after),
        ),
        (
            "max_restarts",
            was.max_restarts.to_string(),
            now.max_restarts.to_string(),
        ),
        ("window_ms", ms(was.window), ms(now.window)),
        (
            "on_exhausted",
            was.on_exhausted.as_str().to_string(),
            now.on_exhausted.as_str().to_string(),
        ),
        (
            "on_fatal",
            was.on_fatal.as_str().to_string(),
            now.on_fatal.as_str().to_string(),
        ),
        (
            "liveness_timeout_ms",
            opt_ms(was.liveness_timeout),
            opt_ms(now.liveness_timeout),
        ),
        (
            "shutdown_timeout_ms",
            ms(was.shutdown_timeout),
            ms(now.shutdown_timeout),
        ),
        (
            "warn_after",
            was.warn_after.to_string(),
            now.warn_after.to_string(),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(field, a, b)| format!("{field} {a} → {b}"))
        .collect()
}

/// Whether an account must restart to apply `now` over `was`: anything but its
/// `supervision` (a policy, applied in place) and `approvals.enabled` (its handler alone).
fn restarts(was: &AccountSettings, now: &AccountSettings) -> bool {
    let normal = |a: &AccountSettings| {
        let mut a = a.clone();
        a.supervision = Default::default();
        a.approvals.enabled = false;
        a
    };
    normal(was) != normal(now)
}

/// Whether the credentials `a` and `b` configure differ.
fn principals_differ(a: &GatewaySettings, b: &GatewaySettings) -> bool {
    a.token != b.token
        || a.operators != b.operators
        || a.nodes != b.nodes
        || a.allow_unlisted_nodes != b.allow_unlisted_nodes
}

/// Puts the running values of every key that needs a restart into `next`.
fn keep_restart_only(next: &mut Config, running: &Config) {
    next.gateway.bind = running.gateway.bind;
    next.gateway.header_read_timeout_ms = running.gateway.header_read_timeout_ms;
    next.gateway.max_connections = running.gateway.max_connections;
    next.gateway.node_forget_after_ms = running.gateway.node_forget_after_ms;
    next.matrix.send_retry_within_ms = running.matrix.send_retry_within_ms;
    next.admin = running.admin.clone();
    next.state = running.state.clone();
    next.inbox = running.inbox.clone();
    next.telemetry = running.telemetry.clone();
    next.shutdown = running.shutdown.clone();
    next.node = running.node.clone();
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_are_matched_whole() {
        assert!(needs_restart("gateway.bind"));
        assert!(needs_restart("admin.bind"));
        assert!(needs_restart("state.dir"));
        assert!(!needs_restart("gateway.binder"));
        assert!(!needs_restart("gateway.max_subscriptions"));
        assert!(!needs_restart(
            "supervision.kinds.matrix_account.backoff.max_ms"
        ));
        assert!(!needs_restart("administrator"));
    }

    /// Every key [`NEEDS_RESTART`] names keeps its running value in what a reload applies:
    /// an account a later reload builds gets the value warden started with.
    #[test]
    fn restart_only_keys_keep_their_running_values() {
        let running = Config::default();
        let mut next = Config::default();
        next.gateway.bind = "127.0.0.1:1".parse().expect("addr");
        next.gateway.max_connections += 1;
        next.matrix.send_retry_within_ms += 1;
        next.inbox.retention_ms += 1;
        keep_restart_only(&mut next, &running);
        assert_eq!(next, running);
    }

    #[test]
    fn an_account_restarts_for_its_settings_not_its_policy_or_handler_switch() {
        let was: AccountSettings =
            serde_json::from_value(json!({ "homeserver": "http://hs", "password": "pw" }))
                .expect("an account");
        let mut now = was.clone();
        now.supervision.max_restarts = Some(3);
        now.approvals.enabled = true;
        assert!(!restarts(&was, &now));
        now.approvals.approvers = vec!["@owner:hs".into()];
        assert!(restarts(&was, &now));
        let mut moved = was.clone();
        moved.homeserver = "http://other".into();
        assert!(restarts(&was, &moved));
    }
}
