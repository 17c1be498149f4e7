//! The node registry: which nodes are connected, through which session, with which
//! commands; and which were connected before (so `nodes.invoke` can tell `unknown_node`
//! from `node_offline`).
//!
//! A node session registers at `connect` and holds a `Registration`; dropping it (the
//! session ending in any way, a kill included) unregisters the node — unless a newer
//! session of the same name has replaced it meanwhile, so no ghost entry can outlive its
//! session and a late drop never unregisters its successor. Registering emits
//! `node.connected`, unregistering `node.disconnected`, on the hub.
//!
//! A name is held by the credential that registered it (its *holder*: `node:<name>` for a
//! configured node, `operator:<op>` for an unlisted one). A new connection of the same
//! holder replaces a live one (the node restarted); any other holder is refused while the
//! name is live, and for an unlisted name also while it is remembered offline (so another
//! operator cannot squat it during a reconnect). A name disconnected for `gateway.node_forget_after_ms` is forgotten, and
//! the registry holds at most [`MAX_NODES`] names (the oldest disconnected ones go first).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::hub::event;
use super::protocol::{CommandInfo, NodeListing};

/// Names the registry remembers at most, live or not.
pub const MAX_NODES: usize = 4096;
use super::invoke::NodeSession;
use super::{GatewayState, now_ms};

/// Nodes by name.
pub struct Registry {
    nodes: Mutex<BTreeMap<String, Entry>>,
    /// `gateway.node_forget_after_ms`.
    forget_after_ms: u64,
}

struct Entry {
    commands: Arc<[CommandInfo]>,
    /// When a frame was last received from it; shared with its session while connected.
    last_seen: Arc<AtomicU64>,
    /// The credential that registered it.
    holder: String,
    live: Option<Live>,
    /// When it disconnected (ms since the Unix epoch), while it is not live.
    gone_at: u64,
}

struct Live {
    /// The socket number of the session it is connected through.
    conn: u64,
    session: NodeSession,
    connected_at: u64,
}

/// What `nodes.invoke` finds under a name.
pub(crate) enum Lookup {
    /// Never connected.
    Unknown,
    /// Connected before, not now.
    Offline,
    /// Connected now.
    Online {
        commands: Arc<[CommandInfo]>,
        session: NodeSession,
        /// The credential it connected with (`node:<name>` or `operator:<op>`).
        holder: String,
    },
}

impl Registry {
    /// An empty registry that forgets names disconnected for `forget_after_ms`.
    pub fn new(forget_after_ms: u64) -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
            forget_after_ms,
        }
    }

    /// Forgets names disconnected for longer than `forget_after_ms`.
    fn prune(nodes: &mut BTreeMap<String, Entry>, forget_after_ms: u64, now: u64) {
        nodes.retain(|_, e| e.live.is_some() || now.saturating_sub(e.gone_at) < forget_after_ms);
    }
}

impl Registry {
    /// Every node connected now or within `forget_after_ms`, by name.
    pub fn list(&self) -> Vec<NodeListing> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        Self::prune(&mut nodes, self.forget_after_ms, now_ms());
        nodes
            .iter()
            .map(|(name, e)| NodeListing {
                name: name.clone(),
                commands: e.commands.iter().map(|c| c.name.clone()).collect(),
                approval_required: e
                    .commands
                    .iter()
                    .filter(|c| c.approval)
                    .map(|c| c.name.clone())
                    .collect(),
                connected: e.live.is_some(),
                connected_at: e.live.as_ref().map(|l| l.connected_at),
                last_seen: e.last_seen.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub(crate) fn lookup(&self, name: &str) -> Lookup {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        Self::prune(&mut nodes, self.forget_after_ms, now_ms());
        match nodes.get(name) {
            None => Lookup::Unknown,
            Some(Entry { live: None, .. }) => Lookup::Offline,
            Some(Entry {
                live: Some(live),
                commands,
                holder,
                ..
            }) => Lookup::Online {
                commands: commands.clone(),
                session: live.session.clone(),
                holder: holder.clone(),
            },
        }
    }
}

/// A node session's registration; unregisters on drop if it is still the current one.
pub(crate) struct Registration {
    state: GatewayState,
    name: String,
    conn: u64,
    last_seen: Arc<AtomicU64>,
}

impl Registration {
    /// Registers `name` as connected through session `conn`, held by `holder`. Returns the
    /// registration and the session it replaces, if one of the same holder was connected
    /// under that name; or, when the name is live under another holder (or the registry
    /// is full of live names), `Err` naming who holds it.
    pub(crate) fn register(
        state: &GatewayState,
        name: &str,
        holder: &str,
        commands: Vec<CommandInfo>,
        conn: u64,
        session: NodeSession,
    ) -> Result<(Registration, Option<NodeSession>), String> {
        let now = now_ms();
        let last_seen = Arc::new(AtomicU64::new(now));
        let commands: Arc<[CommandInfo]> = commands.into();
        let registry = state.registry();
        let replaced = {
            let mut nodes = registry.nodes.lock().unwrap_or_else(|e| e.into_inner());
            Registry::prune(&mut nodes, registry.forget_after_ms, now);
            match nodes.get(name) {
                // A live name is its holder's; an unlisted name stays its operator's until
                // forgotten, so nobody can squat it while its node is briefly away. A
                // configured node's own credential always gets its name back.
                Some(e)
                    if e.holder != holder && (e.live.is_some() || !holder.starts_with("node:")) =>
                {
                    return Err(e.holder.clone());
                }
                Some(_) => {}
                None if nodes.len() >= MAX_NODES => {
                    let oldest = nodes
                        .iter()
                        .filter(|(_, e)| e.live.is_none())
                        .min_by_key(|(_, e)| e.gone_at)
                        .map(|(n, _)| n.clone());
                    match oldest {
                        Some(oldest) => {
                            nodes.remove(&oldest);
                        }
                        None => {
                            return Err(format!("the registry is full ({MAX_NODES} live nodes)"));
                        }
                    }
                }
                None => {}
            }
            let previous = nodes.insert(
                name.to_string(),
                Entry {
                    commands: commands.clone(),
                    last_seen: last_seen.clone(),
                    holder: holder.to_string(),
                    live: Some(Live {
                        conn,
                        session,
                        connected_at: now,
                    }),
                    gone_at: 0,
                },
            );
            previous.and_then(|e| e.live).map(|l| l.session)
        };
        state.hub().publish(
            event::NODE_CONNECTED,
            json!({
                "name": name,
                "commands": commands.iter().map(|c| &c.name).collect::<Vec<_>>(),
                "approval_required": commands
                    .iter()
                    .filter(|c| c.approval)
                    .map(|c| &c.name)
                    .collect::<Vec<_>>(),
            }),
        );
        let registration = Registration {
            state: state.clone(),
            name: name.to_string(),
            conn,
            last_seen,
        };
        Ok((registration, replaced))
    }

    /// Records that a frame arrived from the node.
    pub(crate) fn seen(&self) {
        self.last_seen.store(now_ms(), Ordering::Relaxed);
    }

    /// The node's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let ours = {
            let mut nodes = self
                .state
                .registry()
                .nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match nodes.get_mut(&self.name) {
                Some(entry) if entry.live.as_ref().is_some_and(|l| l.conn == self.conn) => {
                    entry.live = None;
                    entry.gone_at = now_ms();
                    true
                }
                _ => false,
            }
        };
        if ours {
            self.state
                .hub()
                .publish(event::NODE_DISCONNECTED, json!({ "name": self.name }));
        }
    }
}
