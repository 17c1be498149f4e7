//! The event hub: gateway events fanned out to every session, which forwards those its
//! client subscribed to (`subscribe {events: [...]}`).
//!
//! An event is encoded once, as the text of its `event` frame, and shared (`Arc<str>`) by
//! every session that forwards it. A session that falls more than [`CAPACITY`] events behind
//! loses the oldest ones (and logs how many); the hub never waits for a slow session.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use super::protocol::Frame;

/// Events kept for a session that has not read them yet.
pub const CAPACITY: usize = 1024;

/// Names of the events the gateway emits.
pub mod event {
    /// First frame on every socket: `{nonce, ts}`.
    pub const CHALLENGE: &str = "connect.challenge";
    /// Every tick interval after `hello-ok`: `{ts}`.
    pub const TICK: &str = "tick";
    /// Before the server closes every socket: `{restart, expected_back_ms}`.
    pub const SHUTDOWN: &str = "shutdown";
    /// A node completed its handshake: `{name, commands}`.
    pub const NODE_CONNECTED: &str = "node.connected";
    /// A node's session ended: `{name}`.
    pub const NODE_DISCONNECTED: &str = "node.disconnected";
    /// An operator asked for an approval: `{id, node, command, args, reason, expires_at_ms}`.
    pub const APPROVAL_REQUESTED: &str = "approval.requested";
    /// An approval is over: `{id, decision, by, result?, error?}` (after the command ran,
    /// when approved).
    pub const APPROVAL_RESOLVED: &str = "approval.resolved";
}

/// One event, encoded.
#[derive(Debug)]
pub struct HubEvent {
    /// Its name, matched against subscriptions.
    pub name: String,
    /// The text of its `event` frame.
    pub text: Arc<str>,
}

/// Fans events out to sessions.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<HubEvent>>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            tx: broadcast::Sender::new(CAPACITY),
        }
    }

    /// Emits event `name` to every session (those not subscribed to it drop it).
    pub fn publish(&self, name: &str, payload: Value) {
        let text = Frame::event(name, payload).to_text();
        // No receiver means no session: nobody to tell.
        let _ = self.tx.send(Arc::new(HubEvent {
            name: name.to_string(),
            text: text.into(),
        }));
    }

    /// A new receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubEvent>> {
        self.tx.subscribe()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}
