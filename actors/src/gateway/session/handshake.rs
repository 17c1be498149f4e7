//! The session before `hello-ok`: the challenge, the `connect` frame, and the handshake
//! deadline.
//!
//! The first text frame must be a `req connect` that [`handshake::check`] accepts (its
//! credential backs the claimed role, node name or account). Accepted: for a node its
//! registration (a name held by another credential is refused), then `hello-ok`, which
//! drops the pre-auth slot and starts the ticks. Refused: an error, then close 1008.
//! Anything else before `hello-ok` is a policy failure (1008; an invalid frame 1007), and a
//! socket that does not finish in `handshake_timeout_ms` is closed with 4408.

use std::time::Duration;

use ractor::ActorRef;
use tracing::{debug, info, warn};

use super::super::hub::event;
use super::super::invoke::NodeMsg;
use super::super::metrics;
use super::super::now_ms;
use super::super::protocol::auth::{Principal, Secret};
use super::super::protocol::handshake::{self, Accepted, Refused};
use super::super::protocol::{Challenge, Frame, HelloOk, ServerInfo, SessionPolicy, close, code};
use super::super::registry::Registration;
use super::{Authed, Phase, SessionMsg, SessionState, to_value};

impl SessionState {
    /// Sends `connect.challenge {nonce, ts}`: the first frame of every socket.
    pub(super) async fn challenge(&mut self, myself: &ActorRef<SessionMsg>) {
        debug!(peer = %self.peer, "Socket opened; sending the challenge.");
        let challenge = Challenge {
            nonce: nonce(),
            ts: now_ms(),
        };
        let frame = Frame::event(event::CHALLENGE, to_value(&challenge));
        self.send(myself, &frame).await;
    }

    /// A text frame before `hello-ok`: a `connect` is accepted or refused; anything else
    /// closes the socket. With a handshake cost set, burns it first.
    pub(super) async fn handshake(&mut self, myself: &ActorRef<SessionMsg>, text: &str) {
        burn(self.gateway.handshake_cost());
        let principals = self.gateway.principals();
        match handshake::check(text, &principals) {
            Ok(accepted) => {
                // The credential it showed, from the principals that admitted it: a reload
                // that rotates it meanwhile is then seen by `still_admits`.
                let secret = principals
                    .secret_of(&accepted.principal)
                    .cloned()
                    .unwrap_or_else(|| Secret::new(String::new()));
                self.accept(myself, accepted, secret).await
            }
            Err(Refused::NotAFrame) => {
                debug!(peer = %self.peer, "Invalid frame before hello; closing with 1007.");
                self.close(myself, close::INVALID_FRAME, "not a frame of the protocol")
                    .await;
            }
            Err(Refused::ConnectFirst { id }) => {
                let reply = Frame::err(id, code::UNAUTHORIZED, "send connect first");
                if self.send(myself, &reply).await {
                    self.close(myself, close::POLICY, "connect first").await;
                }
            }
            Err(Refused::Unexpected) => {
                self.close(myself, close::POLICY, "connect first").await;
            }
            Err(Refused::Connect { id, code, message }) => {
                if code == code::UNAUTHORIZED {
                    warn!(peer = %self.peer, reason = %message, "Connect refused: the credential does not admit the claim.");
                }
                self.refuse(myself, id, code, message).await;
            }
        }
    }

    /// A `connect` that authenticated: `hello-ok`, then (for a node) its registration.
    async fn accept(&mut self, myself: &ActorRef<SessionMsg>, accepted: Accepted, secret: Secret) {
        let Accepted {
            id,
            principal,
            client,
            node,
        } = accepted;
        // A node name is held by one live connection; only the holder's credential
        // replaces it (the node restarted). Anything else keeps the live node.
        let registration = match (&principal, node) {
            (Principal::Node { name, holder }, Some(node)) => {
                match Registration::register(
                    &self.gateway,
                    name,
                    holder,
                    node.commands,
                    self.conn,
                    myself.get_derived(),
                ) {
                    Ok(registered) => Some(registered),
                    Err(held_by) => {
                        warn!(peer = %self.peer, node = %name, held_by = %held_by,
                            "Connect refused: the node name is held by another credential.");
                        let message = format!(
                            "node name {name:?} is held by a live connection of another credential"
                        );
                        return self.refuse(myself, id, code::UNAUTHORIZED, message).await;
                    }
                }
            }
            _ => None,
        };
        let role = principal.role();
        let settings = self.gateway.settings();
        let hello = HelloOk {
            kind: "hello-ok".to_string(),
            server: ServerInfo {
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            policy: SessionPolicy {
                tick_interval_ms: settings.tick_interval_ms,
                max_frame_bytes: self.max_frame_bytes,
            },
        };
        let tick = Duration::from_millis(settings.tick_interval_ms);
        // Dropping the handshake phase releases the pre-auth slot.
        self.handshake_timer = None;
        let (registration, replaced) = match registration {
            Some((registration, replaced)) => (Some(registration), replaced),
            None => (None, None),
        };
        info!(peer = %self.peer, principal = %principal.label(), client = %client.name,
            "Session authenticated.");
        self.phase = Phase::Ready(Authed {
            _count: self.gateway.count_role(role, principal.account()),
            secret,
            principal,
            client: client.name,
            node: registration,
        });
        if let Some(old) = replaced {
            let _ = old.send_message(NodeMsg::Replaced);
        }
        if !self.send(myself, &Frame::ok(id, to_value(&hello))).await {
            return;
        }
        self.ticker = Some(myself.send_interval(tick, || SessionMsg::Tick).into());
        self.idle_timer = Some(myself.send_after(tick * 2, || SessionMsg::IdleCheck).into());
    }

    /// Refuses a `connect`: the error, then close 1008.
    async fn refuse(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        code: &str,
        message: String,
    ) {
        ::metrics::counter!(metrics::CONNECT_REFUSALS_TOTAL, "reason" => code.to_string())
            .increment(1);
        debug!(peer = %self.peer, code, message = %message, "Connect refused; closing with 1008.");
        if self.send(myself, &Frame::err(id, code, message)).await {
            self.close(myself, close::POLICY, code).await;
        }
    }

    /// No `hello-ok` within `handshake_timeout_ms`: close with 4408.
    pub(super) async fn handshake_timeout(&mut self, myself: &ActorRef<SessionMsg>) {
        if matches!(self.phase, Phase::Handshake { .. }) {
            let timeout_ms = self.gateway.settings().handshake_timeout_ms;
            warn!(peer = %self.peer, timeout_ms, "Handshake timed out; closing with 4408.");
            ::metrics::counter!(metrics::HANDSHAKE_TIMEOUTS_TOTAL).increment(1);
            self.gateway.count_handshake_timeout();
            self.close(myself, close::HANDSHAKE_TIMEOUT, "handshake timeout")
                .await;
        }
    }
}

/// Busy-waits `cost` on this thread (the handshake cost of benchmarks, a stand-in for a
/// loaded gateway): it holds the runtime worker, as real work would. Zero returns at once.
fn burn(cost: Duration) {
    if cost.is_zero() {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < cost {
        std::hint::spin_loop();
    }
}

/// 16 random bytes, hex.
fn nonce() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio::sync::watch;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    use crate::gateway::client::{ConnectOptions, GatewayClient};
    use crate::gateway::protocol::{ClientInfo, Role, close};
    use crate::gateway::{GatewaySettings, GatewayState, spec};
    use crate::supervision::{Jitter, Policy, Tree, TreeOptions};

    fn options() -> ConnectOptions {
        let client = ClientInfo {
            name: "test".into(),
            version: "0".into(),
        };
        ConnectOptions::new(Role::Operator, "any", client)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_handshake_cost_delays_hello_and_the_totals_count() {
        let state = GatewayState::new(GatewaySettings {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_preauth_per_ip: 1,
            handshake_timeout_ms: 300,
            token: Some("any".into()),
            ..GatewaySettings::default()
        });
        let bound = Arc::new(watch::Sender::new(None));
        let options_ = TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..TreeOptions::default()
        };
        let tree = Tree::start(
            vec![spec(&state, Policy::default(), bound.clone())],
            options_,
        )
        .await
        .expect("tree");
        assert!(state.set_tree(tree.handle()).is_ok());
        let addr = bound.borrow().expect("bound");
        let url = format!("ws://{addr}/ws");

        // A cost: `hello-ok` comes no sooner.
        let cost = Duration::from_millis(60);
        state.set_handshake_cost(cost);
        let t = std::time::Instant::now();
        let (client, _) = GatewayClient::connect(&url, options())
            .await
            .expect("hello-ok");
        assert!(t.elapsed() >= cost, "hello-ok after {:?}", t.elapsed());
        client.close().await;
        assert_eq!(state.handshake_stats().handshaking_peak, 1);

        // A socket that never sends `connect` holds the only pre-auth slot: the next one
        // gets 503; the silent one is closed with 4408. Both are counted.
        let (mut silent, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("upgrade");
        // Without a credential on the upgrade: 503. With one, the budget does not apply.
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 503)
            }
            other => panic!("not refused: {:?}", other.map(|_| ())),
        }
        let (with_credential, _) = GatewayClient::connect(&url, options())
            .await
            .expect("a client with its credential is not locked out");
        with_credential.close().await;
        let code = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(msg)) = silent.next().await {
                if let WsMessage::Close(frame) = msg {
                    return frame.map(|f| u16::from(f.code));
                }
            }
            None
        })
        .await
        .expect("closed in time");
        assert_eq!(code, Some(close::HANDSHAKE_TIMEOUT));
        let stats = state.handshake_stats();
        assert_eq!((stats.preauth_rejections, stats.handshake_timeouts), (1, 1));
        // The silent socket and the client with its credential handshook at once.
        assert_eq!(stats.handshaking_peak, 2);
        let _ = tree.shutdown(Duration::from_secs(5)).await;
    }
}
