//! The event hub: gateway events fanned out to every session, which forwards those its
//! client subscribed to (`subscribe {events: [...]}`).
//!
//! An event is encoded once, as the text of its `event` frame, and shared (`Arc<str>`) by
//! every session that forwards it. The hub never waits for a slow session.
//!
//! ## Bounds
//! The hub is one ring of [`CAPACITY`] events (a `tokio::sync::broadcast` channel) shared
//! by every subscribed session; an event is dropped once every session has taken it, or
//! when a newer one overwrites it. A session takes at most
//! [`MAX_EVENTS_IN_FLIGHT`](super::session::MAX_EVENTS_IN_FLIGHT) events into its mailbox
//! and only as fast as it writes them to its socket, so what one session has not sent yet
//! is at most `CAPACITY + MAX_EVENTS_IN_FLIGHT` events, plus the socket's buffers. A
//! session that falls more than [`CAPACITY`] events behind would lose the oldest: instead
//! it is closed with 4001
//! ([`close::SLOW_CONSUMER`](super::protocol::close::SLOW_CONSUMER), counted in
//! [`SLOW_CONSUMER_CLOSES_TOTAL`](super::metrics::SLOW_CONSUMER_CLOSES_TOTAL)), and its
//! client reconnects, resubscribes and reads current state from the list methods. A client
//! never silently misses an event it subscribed to.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use super::protocol::Frame;

/// Events kept for a session that has not taken them yet (a power of two: the ring's size
/// exactly); a session further behind is closed with 4001.
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
    /// An operator asked for an approval: `{id, node, command, args, reason, expires_at_ms,
    /// notify: [{approver, account}]}`.
    pub const APPROVAL_REQUESTED: &str = "approval.requested";
    /// Approvers of a pending approval are to be notified through another account (theirs
    /// stayed down) or for the first time: `approval.requested`'s payload, its `notify`
    /// naming only them.
    pub const APPROVAL_NOTIFY: &str = "approval.notify";
    /// An approval is over: `{id, decision, by, result?, error?, via?}` (after the command
    /// ran, when approved; `via {account, room_id, event_id}` when an approver decided).
    pub const APPROVAL_RESOLVED: &str = "approval.resolved";
}

/// One event, encoded.
#[derive(Debug)]
pub struct HubEvent {
    /// Its name, matched against subscriptions.
    pub name: String,
    /// The text of its `event` frame.
    pub text: Arc<str>,
    /// A stored chat message's cursor and account (`chat.message` from the inbox), so a
    /// replaying session can tell what it already sent without parsing the text.
    pub stored: Option<(u64, Arc<str>)>,
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
        self.emit(name, payload, None);
    }

    /// Emits the stored chat message `cursor` of `account` as event `name`.
    pub fn publish_stored(&self, name: &str, payload: Value, cursor: u64, account: &str) {
        self.emit(name, payload, Some((cursor, account.into())));
    }

    fn emit(&self, name: &str, payload: Value, stored: Option<(u64, Arc<str>)>) {
        let text = Frame::event(name, payload).to_text();
        // No receiver means no session: nobody to tell.
        let _ = self.tx.send(Arc::new(HubEvent {
            name: name.to_string(),
            text: text.into(),
            stored,
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;
    use tokio::sync::watch;
    use tokio::time::Instant;

    use super::super::client::{CallError, ConnectOptions, GatewayClient, Incoming};
    use super::super::protocol::{ClientInfo, Role, close};
    use super::super::session::SLOW_CONSUMER_REASON;
    use super::super::{GatewaySettings, GatewayState, spec};
    use super::*;
    use crate::supervision::{Jitter, Policy, Tree, TreeOptions};

    const BURST: &str = "test.burst";

    /// Deadline of every wait.
    const STEP: Duration = Duration::from_secs(10);

    async fn subscriber(url: &str) -> GatewayClient {
        let client = ClientInfo {
            name: "test".into(),
            version: "0".into(),
        };
        let options = ConnectOptions::new(Role::Operator, "any", client);
        let (mut c, _) = GatewayClient::connect(url, options)
            .await
            .expect("hello-ok");
        c.call("subscribe", json!({ "events": [BURST] }))
            .await
            .expect("subscribe");
        c
    }

    /// The `n` of the next burst event (ticks are skipped), or why the connection ended.
    async fn next_n(client: &mut GatewayClient) -> Result<u64, CallError> {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, client.next_event()).await {
                Ok(Ok(Incoming::Event { event, payload })) if event == BURST => {
                    return Ok(payload["n"].as_u64().expect("n"));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("no event within {STEP:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_that_does_not_read_is_closed_with_4001_and_the_others_keep_receiving() {
        let state = GatewayState::new(GatewaySettings {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: Some("any".into()),
            ..GatewaySettings::default()
        });
        let bound = Arc::new(watch::Sender::new(None));
        let options = TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..TreeOptions::default()
        };
        let tree = Tree::start(
            vec![spec(&state, Policy::default(), bound.clone())],
            options,
        )
        .await
        .expect("tree");
        assert!(state.set_tree(tree.handle()).is_ok());
        let addr = bound.borrow().expect("bound");
        let url = format!("ws://{addr}/ws");
        let mut slow = subscriber(&url).await;
        let mut fast = subscriber(&url).await;
        let hub = state.hub().clone();

        // `fast` reads every event as it comes; `slow` reads nothing. First 8 events of
        // 1 MiB: more than the socket buffers between the server and `slow` hold, so its
        // session is stuck writing and stops taking events from the hub.
        let mut n = 0;
        let big = "x".repeat(1 << 20);
        for _ in 0..8 {
            hub.publish(BURST, json!({ "n": n, "pad": big }));
            assert_eq!(next_n(&mut fast).await.expect("fast reads"), n);
            n += 1;
        }
        // Then more small ones than the hub keeps for `slow`, in batches `fast` keeps up with.
        let small_total = 2 * CAPACITY as u64;
        for _ in 0..small_total / 256 {
            let first = n;
            for _ in 0..256 {
                hub.publish(BURST, json!({ "n": n }));
                n += 1;
            }
            for want in first..n {
                assert_eq!(next_n(&mut fast).await.expect("fast reads"), want);
            }
        }
        let published = n;

        // `slow` reads at last: what its socket and mailbox held, in order, then 4001.
        let mut got = 0;
        let (code, reason) = loop {
            match next_n(&mut slow).await {
                Ok(m) => {
                    assert_eq!(m, got, "in order, no gap before the close");
                    got += 1;
                }
                Err(CallError::Closed { code, reason, .. }) => break (code, reason),
                Err(other) => panic!("slow ended otherwise: {other}"),
            }
        };
        assert_eq!(
            (code, reason.as_str()),
            (close::SLOW_CONSUMER, SLOW_CONSUMER_REASON)
        );
        assert!(
            got < published - CAPACITY as u64,
            "slow got {got} of {published} events; the rest were not kept for it"
        );

        // `fast` goes on receiving.
        hub.publish(BURST, json!({ "n": published }));
        assert_eq!(next_n(&mut fast).await.expect("fast reads"), published);
        fast.close().await;
        let _ = tree.shutdown(Duration::from_secs(5)).await;
    }
}
