//! The gateway: the WebSocket listener, the approvals broker, one session actor per socket,
//! the event hub and the node registry.
//!
//! ```text
//! root/gateway        rest_for_one          (spec)
//! ├── listener        permanent             (listener.rs) axum: WS /ws, GET /health
//! ├── approvals       permanent             (approvals.rs) pending approvals, persisted;
//! │                                         only when approvals are configured
//! └── sessions        one_for_one, dynamic  one temporary `conn-<n>` per socket (session.rs)
//! ```
//!
//! A listener restart restarts the broker and the sessions, in order; a broker restart
//! restarts the sessions.
//!
//! * [`GatewayState`] — what the listener and every session share: settings, the tree handle
//!   (unset while the program is still starting), the [`hub::Hub`] of events, the
//!   [`registry::Registry`] of nodes, the approvals settings and the handle that reaches the
//!   broker, the per-IP pre-auth counter, session counts by role and the shutdown intent the
//!   program sets before it shuts the tree down. For benchmarks and tests it also keeps
//!   plain handshake totals ([`GatewayState::handshake_stats`]) and can make every
//!   handshake burn CPU ([`GatewayState::set_handshake_cost`]).
//! * [`spec_with`] — the `gateway` subtree, each kind with its policy from
//!   [`GatewayPolicies`]: `warden run` gives the configured ones; [`spec`], which the tests
//!   and benchmarks start, the built-in ones (and the listener's as given).
//! * [`approvals`] — the approvals broker: `approvals.request`, `approvals.resolve`,
//!   `approvals.list`.
//! * [`invoke`] — invocation routing: `nodes.invoke` and approved commands to the node's
//!   session, with the approval grant a command may need.
//! * [`chat`] — the chat accounts `chat.send` reaches and whose messages become
//!   `chat.message` events.
//! * [`protocol`] — the wire format; [`client`] — the client side of it; [`metrics`] — every
//!   metric name the gateway records.

pub mod approvals;
pub mod chat;
pub mod client;
pub mod hub;
pub mod invoke;
pub mod listener;
pub mod metrics;
pub mod protocol;
pub mod registry;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::supervision::{ChildSpec, Policy, PolicyCell, Strategy, TreeHandle, supervisor};
use approvals::ApprovalsClient;
pub use approvals::{ApprovalRouting, ApprovalsSettings};
use chat::Chat;
use hub::Hub;
use protocol::auth::{Principals, Secret};
use protocol::{Role, ShutdownNotice, close};
use registry::Registry;

/// Path of the sessions supervisor when [`spec`] is a child of the root.
pub const SESSIONS_PATH: &str = "root/gateway/sessions";

/// `[gateway]` settings. `Debug` masks `token`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Address of the WebSocket listener. Default `127.0.0.1:18789`.
    pub bind: SocketAddr,
    /// The credential of operator `default` (the single shared token of earlier versions).
    /// Secret. With neither this nor `operators`, `warden run` generates one into
    /// `<state.dir>/gateway.token`.
    pub token: Option<String>,
    /// File holding `token` (trailing newline ignored).
    pub token_file: Option<PathBuf>,
    /// `[gateway.operators.<name>]`: operator credentials. Default none.
    pub operators: BTreeMap<String, Credential>,
    /// `[gateway.nodes.<name>]`: node credentials; node `<name>` connects only with its
    /// own. Default none.
    pub nodes: BTreeMap<String, Credential>,
    /// Admit node hosts that `nodes` does not list, with an operator's credential. Default
    /// false.
    pub allow_unlisted_nodes: bool,
    /// The registry forgets a node that has been disconnected this long, in ms. Default
    /// 3600000 (1 h).
    pub node_forget_after_ms: u64,
    /// Browser origins (`scheme://host[:port]`) whose pages may open a WebSocket. An
    /// upgrade carrying any other `Origin` header gets HTTP 403. Default none.
    pub allowed_origins: Vec<String>,
    /// A connection that has not sent its request headers within this long is closed, in
    /// ms. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Open connections (handshaking or not) at most; past it, HTTP 503 with
    /// `Retry-After`. Default 4096.
    pub max_connections: u32,
    /// Event names one session may subscribe to. Default 64.
    pub max_subscriptions: usize,
    /// Largest `timeout_ms` a `nodes.invoke` may ask for, in ms. Default 600000 (10 min).
    pub max_invoke_timeout_ms: u64,
    /// `nodes.invoke` calls one session may have open at once. Default 256.
    pub max_pending_invocations: usize,
    /// A socket that has not completed `connect` by then is closed (4408). Default 10000.
    pub handshake_timeout_ms: u64,
    /// Handshaking sockets allowed per client IP; more get HTTP 503. Default 32. Four
    /// times as many connections that have not authenticated may be open per address
    /// (every loopback address counting as one); more are answered 503 at accept.
    pub max_preauth_per_ip: u32,
    /// Interval of `tick` events. Default 30000.
    pub tick_interval_ms: u64,
    /// Largest frame after `hello-ok`, in bytes. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// What clients are told on a graceful shutdown (SIGTERM, SIGINT, an exit request):
    /// `restart` (event `shutdown {restart: true}`, close 1012) or `stop` (close 1001).
    /// Default `restart`.
    pub on_shutdown: OnShutdown,
    /// With `on_shutdown = "restart"`: the `expected_back_ms` clients are given. Default 1000.
    pub expected_back_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 18789)),
            token: None,
            token_file: None,
            operators: BTreeMap::new(),
            nodes: BTreeMap::new(),
            allow_unlisted_nodes: false,
            node_forget_after_ms: 3_600_000,
            allowed_origins: Vec::new(),
            header_read_timeout_ms: 10_000,
            max_connections: 4096,
            max_subscriptions: 64,
            max_invoke_timeout_ms: 600_000,
            max_pending_invocations: 256,
            handshake_timeout_ms: 10_000,
            max_preauth_per_ip: 32,
            tick_interval_ms: 30_000,
            max_frame_bytes: 1 << 20,
            on_shutdown: OnShutdown::Restart,
            expected_back_ms: 1000,
        }
    }
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Exhaustive, so a new field cannot be forgotten here.
        let Self {
            bind,
            token,
            token_file,
            operators,
            nodes,
            allow_unlisted_nodes,
            node_forget_after_ms,
            allowed_origins,
            header_read_timeout_ms,
            max_connections,
            max_subscriptions,
            max_invoke_timeout_ms,
            max_pending_invocations,
            handshake_timeout_ms,
            max_preauth_per_ip,
            tick_interval_ms,
            max_frame_bytes,
            on_shutdown,
            expected_back_ms,
        } = self;
        f.debug_struct("GatewaySettings")
            .field("bind", bind)
            .field("token", &token.as_ref().map(|_| "****"))
            .field("token_file", token_file)
            .field("operators", operators)
            .field("nodes", nodes)
            .field("allow_unlisted_nodes", allow_unlisted_nodes)
            .field("node_forget_after_ms", node_forget_after_ms)
            .field("allowed_origins", allowed_origins)
            .field("header_read_timeout_ms", header_read_timeout_ms)
            .field("max_connections", max_connections)
            .field("max_subscriptions", max_subscriptions)
            .field("max_invoke_timeout_ms", max_invoke_timeout_ms)
            .field("max_pending_invocations", max_pending_invocations)
            .field("handshake_timeout_ms", handshake_timeout_ms)
            .field("max_preauth_per_ip", max_preauth_per_ip)
            .field("tick_interval_ms", tick_interval_ms)
            .field("max_frame_bytes", max_frame_bytes)
            .field("on_shutdown", on_shutdown)
            .field("expected_back_ms", expected_back_ms)
            .finish()
    }
}

/// `[gateway.operators.<name>]` / `[gateway.nodes.<name>]`: one principal's credential.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The token. Secret.
    pub token: Option<String>,
    /// File holding `token` (trailing newline ignored).
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("token", &self.token.as_ref().map(|_| "****"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// `gateway.on_shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// The process is expected back (a container restart, a deploy).
    Restart,
    /// The process stops for good.
    Stop,
}

/// What sessions tell their clients when the tree shuts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownIntent {
    /// Back soon: event `shutdown {restart: true, expected_back_ms}`, close 1012.
    Restart {
        /// When to expect the gateway back.
        expected_back_ms: u64,
    },
    /// Gone for good: event `shutdown {restart: false}`, close 1001.
    Stop,
}

impl ShutdownIntent {
    /// The intent `settings` ask for.
    pub fn from_settings(settings: &GatewaySettings) -> Self {
        match settings.on_shutdown {
            OnShutdown::Restart => Self::Restart {
                expected_back_ms: settings.expected_back_ms,
            },
            OnShutdown::Stop => Self::Stop,
        }
    }

    /// The close code and reason that go with it.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            Self::Restart { .. } => (close::RESTART, "service restart"),
            Self::Stop => (close::GOING_AWAY, "server stopping"),
        }
    }

    /// The payload of the `shutdown` event.
    pub fn notice(self) -> ShutdownNotice {
        match self {
            Self::Restart { expected_back_ms } => ShutdownNotice {
                restart: true,
                expected_back_ms,
            },
            Self::Stop => ShutdownNotice {
                restart: false,
                expected_back_ms: 0,
            },
        }
    }
}

/// What the listener and every session share. Cheap to clone: everything is behind one `Arc`.
#[derive(Clone)]
pub struct GatewayState(Arc<Shared>);

struct Shared {
    /// The settings now (a config reload replaces them; see [`GatewayState::reconfigure`]).
    settings: std::sync::RwLock<Arc<GatewaySettings>>,
    /// Every credential the gateway accepts (see [`GatewayState::principals`]).
    principals: std::sync::RwLock<Arc<Principals>>,
    /// Moves each time credentials are revoked; every authenticated session watches it and
    /// closes (1008) once its own credential no longer admits it.
    revocations: watch::Sender<u64>,
    /// The tree the sessions are children of. The gateway is itself part of that tree, so
    /// the program sets it once `Tree::start` returns; until then sockets get 1013.
    tree: OnceLock<TreeHandle>,
    /// Wakes sockets waiting for `tree`.
    tree_set: tokio::sync::Notify,
    /// Events for subscribed sessions.
    hub: Hub,
    /// Chat accounts (`chat.send`) and their inbound messages (`chat.message`).
    chat: Chat,
    /// Connected (and formerly connected) nodes.
    registry: Registry,
    /// Set once, before [`spec`] is built: the broker exists only with these.
    approvals: OnceLock<ApprovalsSettings>,
    /// The approvers by account and the routing of notifications now: those of
    /// `approvals` until a reload replaces them.
    routing: std::sync::RwLock<Arc<ApprovalRouting>>,
    /// Reaches the approvals broker; follows it across restarts.
    broker: ApprovalsClient,
    /// Pre-auth slots held per client IP (see [`PreauthSlot`]).
    preauth: Mutex<HashMap<IpAddr, u32>>,
    /// Open unauthenticated connections per address, loopback as one (see
    /// [`AddressShare`]).
    unauthenticated: Mutex<HashMap<IpAddr, u32>>,
    /// Pre-auth slots held in all, exempt ones included.
    handshaking: AtomicU64,
    /// The most pre-auth slots ever held at once.
    handshaking_peak: AtomicU64,
    /// Upgrades refused (503) for want of a pre-auth slot.
    preauth_rejections: AtomicU64,
    /// Sockets closed with 4408.
    handshake_timeouts: AtomicU64,
    /// CPU every `connect` burns before it is answered, in ns (0: none). Benchmarks only.
    handshake_cost_ns: AtomicU64,
    /// Authenticated sessions by role: operator, node, approver.
    roles: [AtomicU64; 3],
    /// Authenticated approval handler sessions by account.
    handlers: Mutex<HashMap<String, u32>>,
    /// Numbers the sockets: `conn-<n>`.
    next_conn: AtomicU64,
    /// When this state was built (the gateway's uptime).
    started_at: Instant,
    /// Set by the program before it shuts the tree down (until then, what the settings
    /// say); every session watches it, so all close at once rather than one after another.
    intent: watch::Sender<Option<ShutdownIntent>>,
}

impl GatewayState {
    /// A state for `settings`; the tree is set later with [`GatewayState::set_tree`].
    pub fn new(settings: GatewaySettings) -> Self {
        let hub = Hub::new();
        let principals = std::sync::RwLock::new(Arc::new(principals_of(&settings)));
        Self(Arc::new(Shared {
            principals,
            chat: Chat::new(hub.clone()),
            hub,
            registry: Registry::new(settings.node_forget_after_ms),
            approvals: OnceLock::new(),
            routing: std::sync::RwLock::new(Arc::new(ApprovalRouting::default())),
            broker: ApprovalsClient::default(),
            tree: OnceLock::new(),
            tree_set: tokio::sync::Notify::new(),
            preauth: Mutex::new(HashMap::new()),
            unauthenticated: Mutex::new(HashMap::new()),
            handshaking: AtomicU64::new(0),
            handshaking_peak: AtomicU64::new(0),
            preauth_rejections: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            handshake_cost_ns: AtomicU64::new(0),
            roles: Default::default(),
            handlers: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            started_at: Instant::now(),
            intent: watch::Sender::new(None),
            revocations: watch::Sender::new(0),
            settings: std::sync::RwLock::new(Arc::new(settings)),
        }))
    }

    /// Applies reloaded `[gateway]` settings: every later connection, handshake and
    /// request reads them (caps, timeouts, origins); the principals become those of
    /// `settings` (approval handlers kept), and every session whose credential no longer
    /// admits it is closed with 1008. `bind`, `header_read_timeout_ms`, `max_connections`
    /// and `node_forget_after_ms` are read when the listener (or the gateway) starts: the
    /// caller reports them as needing a restart. The approvals broker denies the pending
    /// approvals of operators no longer configured.
    pub fn reconfigure(&self, settings: GatewaySettings) {
        let next = principals_of(&settings);
        *self.0.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        {
            let mut principals = self.0.principals.write().unwrap_or_else(|e| e.into_inner());
            let next = next.with_approvers_of(&principals);
            *principals = Arc::new(next);
        }
        self.0.revocations.send_modify(|n| *n += 1);
        // A revoked operator's pending approvals must not be approved later.
        if let Some(broker) = self.approvals() {
            // Best effort: a broker that is down checks the principals when it loads.
            let _ = broker.send(approvals::ApprovalsMsg::PrincipalsChanged);
        }
    }

    /// Removes the approval handler credential of `account` (its handler was stopped) and
    /// closes a session still holding it.
    pub fn remove_approver(&self, account: &str) {
        let removed = {
            let mut principals = self.0.principals.write().unwrap_or_else(|e| e.into_inner());
            let mut next = Principals::clone(&principals);
            let removed = next.remove_approver(account);
            *principals = Arc::new(next);
            removed
        };
        if removed {
            self.0.revocations.send_modify(|n| *n += 1);
        }
    }

    /// Follows revocations (see [`GatewayState::reconfigure`]).
    pub(crate) fn watch_revocations(&self) -> watch::Receiver<u64> {
        self.0.revocations.subscribe()
    }

    /// The approvers (user IDs) by account and the routing of notifications now.
    pub fn approval_routing(&self) -> Arc<ApprovalRouting> {
        self.0
            .routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the approvers by account and the routing (a reload enabled, disabled or
    /// changed an account's approvals, or `[approvals]`).
    pub fn set_approval_routing(&self, routing: ApprovalRouting) {
        *self.0.routing.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
        if let Some(broker) = self.approvals() {
            // Notices of accounts that no longer list their approver move at once; a broker
            // that is down sweeps when it loads.
            let _ = broker.send(approvals::ApprovalsMsg::Sweep);
        }
    }

    /// Whether account `alias` can notify approvers now: its chat account is ready and its
    /// approval handler is connected.
    pub fn can_notify(&self, alias: &str) -> bool {
        let connected = self
            .0
            .handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(alias)
            .is_some_and(|n| *n > 0);
        connected && self.chat().is_ready(alias)
    }

    /// Every credential the gateway accepts now: the operators and nodes of the settings,
    /// plus the approval handlers registered with [`GatewayState::add_approver`].
    pub fn principals(&self) -> Arc<Principals> {
        self.0
            .principals
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes an in-memory credential for the approval handler of `account` and returns it:
    /// the only way to hold role `approver`. Never written anywhere.
    pub fn add_approver(&self, account: &str) -> Secret {
        let secret = Secret::generate();
        let mut principals = self.0.principals.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Principals::clone(&principals);
        next.add_approver(account, secret.clone());
        *principals = Arc::new(next);
        secret
    }

    /// Hands the running tree to the gateway. Only the first call has an effect; a second
    /// one returns its handle back.
    pub fn set_tree(&self, handle: TreeHandle) -> Result<(), TreeHandle> {
        self.0.tree.set(handle)?;
        self.0.tree_set.notify_waiters();
        Ok(())
    }

    /// The tree, waiting up to `within` for the program to set it.
    pub async fn wait_tree(&self, within: Duration) -> Option<&TreeHandle> {
        let deadline = Instant::now() + within;
        loop {
            // Registered before the check, so a set in between is not missed.
            let notified = self.0.tree_set.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(tree) = self.0.tree.get() {
                return Some(tree);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.0.tree.get();
            }
        }
    }

    /// Enables approvals: [`spec`] then adds the broker, and sessions reach it. Call it
    /// before building the spec; only the first call has an effect, a second one returns
    /// its settings back.
    pub fn set_approvals(&self, settings: ApprovalsSettings) -> Result<(), Box<ApprovalsSettings>> {
        let routing = settings.routing();
        self.0.approvals.set(settings).map_err(Box::new)?;
        self.set_approval_routing(routing);
        Ok(())
    }

    /// The approvals settings, once set.
    pub fn approvals_settings(&self) -> Option<&ApprovalsSettings> {
        self.0.approvals.get()
    }

    /// The handle of the approvals broker, when approvals are configured.
    pub(crate) fn approvals(&self) -> Option<&ApprovalsClient> {
        self.0.approvals.get().map(|_| &self.0.broker)
    }

    /// The handle the broker points at itself while it runs.
    pub(crate) fn approvals_client(&self) -> &ApprovalsClient {
        &self.0.broker
    }

    /// Announces the shutdown that follows: every running session tells its client
    /// (event `shutdown`, then close 1012 or 1001) at once, in parallel; sessions that
    /// start or stop later use the same intent. The program calls it right before
    /// `Tree::shutdown`; without it, a tree shutdown still closes every session, one after
    /// the other, with the intent the settings give.
    pub fn set_shutdown_intent(&self, intent: ShutdownIntent) {
        self.0.intent.send_replace(Some(intent));
    }

    /// What clients are told when the tree shuts down.
    pub fn shutdown_intent(&self) -> ShutdownIntent {
        self.0
            .intent
            .borrow()
            .unwrap_or_else(|| ShutdownIntent::from_settings(&self.settings()))
    }

    /// Follows the announced shutdown (see [`GatewayState::set_shutdown_intent`]).
    pub(crate) fn watch_shutdown(&self) -> watch::Receiver<Option<ShutdownIntent>> {
        self.0.intent.subscribe()
    }

    /// The settings now.
    pub fn settings(&self) -> Arc<GatewaySettings> {
        self.0
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The tree, once the program has set it.
    pub fn tree(&self) -> Option<&TreeHandle> {
        self.0.tree.get()
    }

    /// The event hub.
    pub fn hub(&self) -> &Hub {
        &self.0.hub
    }

    /// The chat accounts.
    pub fn chat(&self) -> &Chat {
        &self.0.chat
    }

    /// The node registry.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// How long the gateway has been up.
    pub fn uptime(&self) -> Duration {
        self.0.started_at.elapsed()
    }

    /// A fresh socket number.
    pub(crate) fn next_conn(&self) -> u64 {
        self.0.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Session counts: `(operator, node, approver, handshaking)`.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let r = &self.0.roles;
        (
            r[0].load(Ordering::Relaxed),
            r[1].load(Ordering::Relaxed),
            r[2].load(Ordering::Relaxed),
            self.0.handshaking.load(Ordering::Relaxed),
        )
    }

    /// Handshake totals since this state was built: the peak of sockets handshaking at
    /// once, 503s for want of a pre-auth slot, 4408 closes. The same events feed the
    /// metrics recorder ([`metrics`]); these plain counters are for benchmarks and tests,
    /// which install no recorder.
    pub fn handshake_stats(&self) -> HandshakeStats {
        HandshakeStats {
            handshaking_peak: self.0.handshaking_peak.load(Ordering::Relaxed),
            preauth_rejections: self.0.preauth_rejections.load(Ordering::Relaxed),
            handshake_timeouts: self.0.handshake_timeouts.load(Ordering::Relaxed),
        }
    }

    /// **For benchmarks and tests only** (no config key sets it): from now on every session
    /// burns `cost` of CPU on its actor's thread — a busy loop, occupying a runtime worker
    /// like real work would — when it handles a `connect` request, before it answers it.
    /// It stands in for a loaded gateway whose handshakes are expensive. Zero (the default)
    /// turns it off.
    pub fn set_handshake_cost(&self, cost: Duration) {
        let ns = u64::try_from(cost.as_nanos()).unwrap_or(u64::MAX);
        self.0.handshake_cost_ns.store(ns, Ordering::Relaxed);
    }

    /// The CPU each `connect` burns (see [`GatewayState::set_handshake_cost`]).
    pub(crate) fn handshake_cost(&self) -> Duration {
        Duration::from_nanos(self.0.handshake_cost_ns.load(Ordering::Relaxed))
    }

    /// Counts one socket closed with 4408.
    pub(crate) fn count_handshake_timeout(&self) {
        self.0.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a pre-auth slot for `ip`, unless it already holds `max_preauth_per_ip`. A
    /// refusal is not counted here: the caller may still admit the connection otherwise
    /// (see [`GatewayState::count_preauth_rejection`]).
    pub(crate) fn try_preauth(&self, ip: IpAddr) -> Option<PreauthSlot> {
        let max = self.settings().max_preauth_per_ip;
        let mut map = self.0.preauth.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.entry(ip).or_insert(0);
        if *held >= max {
            if *held == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *held += 1;
        drop(map);
        Some(self.count_handshaking(Some(ip)))
    }

    /// Unauthenticated connections one address may have open:
    /// `4 × max_preauth_per_ip`.
    pub(crate) fn max_unauthenticated_per_address(&self) -> u32 {
        self.settings().max_preauth_per_ip.saturating_mul(4)
    }

    /// Counts one more open unauthenticated connection from `ip`'s address (every loopback
    /// address is one), unless it already has
    /// [`max_unauthenticated_per_address`](Self::max_unauthenticated_per_address) open.
    pub(crate) fn try_address_share(&self, ip: IpAddr) -> Option<AddressShare> {
        let address = address_of(ip);
        let max = self.max_unauthenticated_per_address();
        let mut map = self
            .0
            .unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let open = map.entry(address).or_insert(0);
        if *open >= max {
            if *open == 0 {
                map.remove(&address);
            }
            return None;
        }
        *open += 1;
        Some(AddressShare {
            state: self.clone(),
            address,
        })
    }

    /// A pre-auth slot outside every IP's budget, for a connection that authenticated with
    /// a known credential before it got one: counted as handshaking until `hello-ok`.
    pub(crate) fn exempt_preauth(&self) -> PreauthSlot {
        self.count_handshaking(None)
    }

    /// Counts one upgrade refused (503) for want of a pre-auth slot.
    pub(crate) fn count_preauth_rejection(&self) {
        self.0.preauth_rejections.fetch_add(1, Ordering::Relaxed);
    }

    fn count_handshaking(&self, ip: Option<IpAddr>) -> PreauthSlot {
        let now = self.0.handshaking.fetch_add(1, Ordering::Relaxed) + 1;
        self.0.handshaking_peak.fetch_max(now, Ordering::Relaxed);
        ::metrics::gauge!(metrics::HANDSHAKING).increment(1.0);
        PreauthSlot {
            state: self.clone(),
            ip,
            address: None,
        }
    }

    /// Gives `ip`'s share of its pre-auth allowance back.
    fn release_preauth(&self, ip: IpAddr) {
        let mut map = self.0.preauth.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get_mut(&ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Counts one authenticated session of `role` (the approval handler of `account`)
    /// until the guard drops.
    pub(crate) fn count_role(&self, role: Role, account: Option<&str>) -> RoleCount {
        self.0.roles[role_index(role)].fetch_add(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::SESSIONS, "role" => role.as_str()).increment(1.0);
        let handler = account
            .filter(|_| role == Role::Approver)
            .map(str::to_string);
        if let Some(account) = &handler {
            let mut handlers = self.0.handlers.lock().unwrap_or_else(|e| e.into_inner());
            *handlers.entry(account.clone()).or_default() += 1;
        }
        RoleCount {
            handler,
            state: self.clone(),
            role,
        }
    }
}

/// The principals `settings` configure: `token` as operator `default`, `operators`,
/// `nodes`, `allow_unlisted_nodes`. Credentials without a token (the config refuses them)
/// are left out.
pub fn principals_of(settings: &GatewaySettings) -> Principals {
    let mut principals = Principals::new();
    if let Some(token) = &settings.token {
        principals.add_operator(DEFAULT_OPERATOR, Secret::new(token.clone()));
    }
    for (name, credential) in &settings.operators {
        if let Some(token) = &credential.token {
            principals.add_operator(name.clone(), Secret::new(token.clone()));
        }
    }
    for (name, credential) in &settings.nodes {
        if let Some(token) = &credential.token {
            principals.add_node(name.clone(), Secret::new(token.clone()));
        }
    }
    principals.set_allow_unlisted_nodes(settings.allow_unlisted_nodes);
    principals
}

/// The operator `gateway.token` stands for.
pub const DEFAULT_OPERATOR: &str = "default";

/// Handshake totals of one [`GatewayState`] (see [`GatewayState::handshake_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeStats {
    /// The most connections handshaking at once: holding a pre-auth slot, from accept (or
    /// from an upgrade authenticated by its header) to `hello-ok`.
    pub handshaking_peak: u64,
    /// Upgrades answered 503 because their IP held `max_preauth_per_ip` handshakes.
    pub preauth_rejections: u64,
    /// Sockets closed with 4408: no `hello-ok` within `handshake_timeout_ms`.
    pub handshake_timeouts: u64,
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Operator => 0,
        Role::Node => 1,
        Role::Approver => 2,
    }
}

/// The address a client counts under for the per-address cap on unauthenticated
/// connections: its IP, except that every loopback address (127.0.0.0/8, `::1`, and
/// 127.0.0.0/8 mapped into IPv6) is one, so a local client cannot spread over 127.x.y.z.
fn address_of(ip: IpAddr) -> IpAddr {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        ip
    }
}

/// One open connection that has not authenticated, counted against its address from accept
/// until it proves a credential (a known bearer on the upgrade, or `hello-ok`) or closes.
pub(crate) struct AddressShare {
    state: GatewayState,
    address: IpAddr,
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut map = self
            .state
            .0
            .unauthenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(open) = map.get_mut(&self.address) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                map.remove(&self.address);
            }
        }
    }
}

/// One unauthenticated connection's share of its IP's pre-auth allowance, taken when the
/// listener accepts it; released on drop (at `hello-ok`, or when the connection ends
/// however it ends). A slot counts as handshaking for its whole life; an exempt one (the
/// upgrade carried a known credential) no longer counts against its IP.
pub struct PreauthSlot {
    state: GatewayState,
    /// The IP whose allowance it holds; `None` once exempt.
    ip: Option<IpAddr>,
    /// The connection's place under its address's cap on unauthenticated connections,
    /// once an upgrade without a credential has moved it here; given back with the IP's
    /// share.
    address: Option<AddressShare>,
}

impl PreauthSlot {
    /// Gives the IP's share back (the connection proved a credential) and stays counted as
    /// handshaking until dropped.
    pub(crate) fn exempt(&mut self) {
        if let Some(ip) = self.ip.take() {
            self.state.release_preauth(ip);
        }
        self.address = None;
    }

    /// Keeps the connection's place under its address's cap until the slot is given back
    /// (`hello-ok`, or the socket ends).
    pub(crate) fn hold(&mut self, address: Option<AddressShare>) {
        self.address = address;
    }
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        self.exempt();
        self.state.0.handshaking.fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::HANDSHAKING).decrement(1.0);
    }
}

/// One authenticated session in the counts by role; uncounted on drop.
pub(crate) struct RoleCount {
    state: GatewayState,
    role: Role,
    /// The account of an approval handler's session.
    handler: Option<String>,
}

impl Drop for RoleCount {
    fn drop(&mut self) {
        if let Some(account) = &self.handler {
            let mut handlers = self
                .state
                .0
                .handlers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = handlers.get_mut(account) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    handlers.remove(account);
                }
            }
        }
        self.state.0.roles[role_index(self.role)].fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::SESSIONS, "role" => self.role.as_str()).decrement(1.0);
    }
}

/// The restart policies of the `gateway` subtree, one per kind, each in a cell a config
/// reload may change. [`Default`] gives each kind's built-in policy; `warden run` gives the
/// configured ones.
#[derive(Debug, Clone)]
pub struct GatewayPolicies {
    /// `gateway_listener`: the listener.
    pub listener: PolicyCell,
    /// `approvals_broker`: the approvals broker.
    pub approvals: PolicyCell,
    /// `gateway_session`: every per-socket session (temporary: only its stop limit and
    /// liveness apply, and its liveness is never below the session's own backstop).
    pub session: PolicyCell,
    /// `supervisor`: `gateway` and `sessions`.
    pub supervisor: PolicyCell,
}

impl Default for GatewayPolicies {
    fn default() -> Self {
        Self {
            listener: PolicyCell::new(listener::DEFAULT_POLICY),
            approvals: PolicyCell::new(approvals::DEFAULT_POLICY),
            session: PolicyCell::new(session::DEFAULT_POLICY),
            supervisor: PolicyCell::new(supervisor::DEFAULT_POLICY),
        }
    }
}

/// [`spec_with`] `listener_policy` for the listener and the built-in policy of every other
/// kind: what the tests and benchmarks start.
pub fn spec(
    state: &GatewayState,
    listener_policy: Policy,
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
) -> ChildSpec {
    let policies = GatewayPolicies {
        listener: PolicyCell::new(listener_policy),
        ..GatewayPolicies::default()
    };
    spec_with(state, policies, bound)
}

/// The `gateway` subtree: `listener` (`bound` receives its address on each start), then
/// `approvals` if [`GatewayState::set_approvals`] was called, then `sessions`, a one-for-one
/// supervisor of per-socket children added at run time; each child with its kind's policy
/// from `policies`.
pub fn spec_with(
    state: &GatewayState,
    policies: GatewayPolicies,
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
) -> ChildSpec {
    let mut children = vec![listener::spec(
        state,
        policies.listener,
        policies.session,
        bound,
    )];
    if state.approvals_settings().is_some() {
        children.push(approvals::spec(state, policies.approvals));
    }
    children.push(
        ChildSpec::supervisor("sessions", Strategy::OneForOne, Vec::new())
            .with_policy_cell(policies.supervisor.clone()),
    );
    ChildSpec::supervisor("gateway", Strategy::RestForOne, children)
        .with_policy_cell(policies.supervisor)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_credential() {
        let settings = GatewaySettings {
            token: Some("op-secret-1".into()),
            operators: [(
                "ops".to_string(),
                Credential {
                    token: Some("op-secret-2".into()),
                    token_file: None,
                },
            )]
            .into(),
            ..GatewaySettings::default()
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("op-secret"), "{text}");
        assert!(text.contains("****"), "{text}");
        let state = GatewayState::new(settings);
        let handler = state.add_approver("nova");
        let principals = format!("{:?}", state.principals());
        assert!(
            !principals.contains("op-secret") && !principals.contains(handler.expose()),
            "{principals}"
        );
    }
}
