//! The node registry: which nodes are connected, through which session, with which
//! commands; and which were connected before (so `nodes.invoke` can tell `unknown_node`
//! from `node_offline`).
//!
//! A node session registers at `hello-ok` and holds a `Registration`; dropping it (the
//! session ending in any way, a kill included) unregisters the node — unless a newer
//! session of the same name has replaced it meanwhile, so no ghost entry can outlive its
//! session and a late drop never unregisters its successor. Registering emits
//! `node.connected`, unregistering `node.disconnected`, on the hub.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ractor::ActorRef;
use serde_json::json;

use super::hub::event;
use super::protocol::{CommandInfo, NodeListing};
use super::session::SessionMsg;
use super::{GatewayState, now_ms};

/// Nodes by name.
#[derive(Default)]
pub struct Registry {
    nodes: Mutex<BTreeMap<String, Entry>>,
}

struct Entry {
    commands: Arc<[CommandInfo]>,
    /// When a frame was last received from it; shared with its session while connected.
    last_seen: Arc<AtomicU64>,
    live: Option<Live>,
}

struct Live {
    /// The socket number of the session it is connected through.
    conn: u64,
    session: ActorRef<SessionMsg>,
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
        session: ActorRef<SessionMsg>,
    },
}

impl Registry {
    /// Every node seen since the gateway started, by name.
    pub fn list(&self) -> Vec<NodeListing> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
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
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        match nodes.get(name) {
            None => Lookup::Unknown,
            Some(Entry { live: None, .. }) => Lookup::Offline,
            Some(Entry {
                live: Some(live),
                commands,
                ..
            }) => Lookup::Online {
                commands: commands.clone(),
                session: live.session.clone(),
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
    /// Registers `name` as connected through session `conn`. Returns the registration and
    /// the session it replaces, if one was connected under that name.
    pub(crate) fn register(
        state: &GatewayState,
        name: &str,
        commands: Vec<CommandInfo>,
        conn: u64,
        session: ActorRef<SessionMsg>,
    ) -> (Registration, Option<ActorRef<SessionMsg>>) {
        let now = now_ms();
        let last_seen = Arc::new(AtomicU64::new(now));
        let commands: Arc<[CommandInfo]> = commands.into();
        let replaced = {
            let mut nodes = state
                .registry()
                .nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let previous = nodes.insert(
                name.to_string(),
                Entry {
                    commands: commands.clone(),
                    last_seen: last_seen.clone(),
                    live: Some(Live {
                        conn,
                        session,
                        connected_at: now,
                    }),
                },
            );
            previous.and_then(|e| e.live).map(|l| l.session)
        };
        state.hub().publish(
            event::NODE_CONNECTED,
            json!({ "name": name, "commands": commands.as_ref() }),
        );
        let registration = Registration {
            state: state.clone(),
            name: name.to_string(),
            conn,
            last_seen,
        };
        (registration, replaced)
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
