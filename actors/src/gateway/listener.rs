//! The gateway listener: `GET /health` and the WebSocket endpoint `GET /ws`.
//!
//! It is a [`ServeActor`]: HTTP/1.1 only, every connection closed unless it sends a whole
//! request head within `header_read_timeout_ms` of accept, **no keep-alive** (a connection
//! that does not upgrade is closed after its one answer), and at most `max_connections`
//! connections open, counted from accept to close (a WebSocket until the socket closes);
//! the next one is answered `503` with `Retry-After: 1` and `too_many_connections`, and
//! closed.
//!
//! ## Unauthenticated connections per address
//! Every accepted connection counts against its address until it authenticates (a known
//! bearer on the upgrade, or `hello-ok`) or closes; every loopback address (127.0.0.0/8,
//! `::1`) is one address here. An address may have `4 × max_preauth_per_ip` (default 128)
//! such connections open; past that a new connection is answered, before anything is read,
//! the same fixed `503` with `Retry-After: 1` as past `max_connections`, with the error
//! `too_many_connections_from_address` naming the limit (counted in
//! `warden_gateway_address_cap_refusals_total`). So one address cannot fill
//! `max_connections` and lock authenticated clients out.
//!
//! The trade-off: a client behind the same address as an attacker (the same NAT, or any
//! local process when the attacker is local) is refused while the attacker holds the
//! address's 128 unauthenticated connections. Each of them lives at most one header read
//! timeout plus one request without keep-alive (an upgrade without a credential: the
//! handshake timeout, within the smaller pre-auth budget below), so the attacker must keep
//! reopening them, and clients from other addresses are unaffected. The check happens at
//! accept, before the `Authorization` header can be read: a bearer on the upgrade spares a
//! connection the handshake budget below, not this cap.
//!
//! ## Pre-auth accounting: what counts when
//! Each IP has `max_preauth_per_ip` pre-auth slots; the `handshaking` count (and its gauge
//! and peak) is the number of slots held.
//! * **Accept.** Every admitted connection (one under its address's cap above) takes a
//!   slot of its IP, if one is free, before it has sent a byte. A connection that found none holds nothing (it still counts
//!   against `max_connections`, and the header read timeout still closes it).
//! * **`/ws` with `Authorization: Bearer <token>`, `token` a credential the gateway knows**
//!   (any operator's, node's or approval handler's): the upgrade is authenticated at the
//!   HTTP layer and exempt from the IP budget. The connection's slot, if it has one, gives
//!   its IP share back at once but stays counted as handshaking; if it had none, an exempt
//!   one is made. Either way the upgrade goes ahead, whatever the IP's count.
//! * **`/ws` with any other `Authorization` header** ⇒ HTTP 401 `unauthorized` ("wrong
//!   token"), no upgrade; the connection's slot is released. (While the gateway has no
//!   operator or node credential configured the header is ignored instead, and the
//!   `connect` check alone decides.)
//! * **`/ws` without `Authorization`** uses the connection's slot; if it has none it tries
//!   once more for a free one; failing that ⇒ HTTP 503 `too_many_handshakes` with
//!   `Retry-After: 1`, no upgrade (counted in `preauth_rejections`).
//! * **Release.** The slot travels with the upgraded socket into its session and is given
//!   back at `hello-ok`, or when the socket ends (4408 at the handshake timeout, 1013, a
//!   refusal …). A connection that never upgrades (`/health`, silence, a trickle) gives it
//!   back when it closes — at the latest at the header read timeout.
//!
//! The `connect` frame is checked exactly as before: a bearer header only spares the
//! upgrade the IP budget, it grants no role.
//!
//! ## `/ws`, in order
//! 1. an `Origin` header not listed in `allowed_origins` (compared without case, and
//!    without a trailing `/`) ⇒ HTTP 403 `forbidden_origin` naming it, no upgrade; no
//!    `Origin` header (every non-browser client) passes;
//! 2. the credential and the pre-auth slot, as above (401 / 503);
//! 3. upgrade, with `max_frame_bytes` as the largest frame and message;
//! 4. the tree is not set yet (the program is starting) ⇒ close 1013 with
//!    `starting; retry_after_ms=…`;
//! 5. else the socket becomes a temporary child `conn-<n>` of `root/gateway/sessions` (a
//!    [`SessionActor`](super::session::SessionActor)); if the sessions supervisor refuses
//!    it (it is shutting down) ⇒ close 1012 "service restart" (1001 when the shutdown
//!    intent is `stop`).
//!
//! ## Messages
//! None of its own: it is a [`ServeActor`] with the gateway's routes.
//!
//! ## Supervision
//! `root/gateway/listener`, the first child of the `gateway` supervisor (`rest_for_one`):
//! when it restarts, the sessions started after it restart too. The sockets themselves are
//! owned by their session actors, not by the server task, so stopping the listener does not
//! cut them off; stopping `sessions` (which comes first in a shutdown) closes them properly.
//!
//! ## Restart policy
//! Kind `gateway_listener`: 200 ms → 5 s, at most 5 failures in 60 s, then `exit` (the
//! process exits 75 so the container runtime restarts it — a gateway that cannot bind its
//! port is not worth keeping alive half-way).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::protocol::{MAX_PREAUTH_FRAME_BYTES, close, code, try_again_reason};
use super::session::{self, SessionStart};
use super::{AddressShare, GatewayState, PreauthSlot, SESSIONS_PATH, metrics};
use crate::serve::{AcceptHook, Refusal, ServeActor, ServeArgs, ServeLimits, ServeMetrics};
use crate::supervision::{Action, Backoff, ChildContext, ChildSpec, Policy, PolicyCell, Restart};

/// The kind of the listener child, for policies and metrics.
pub const KIND: &str = "gateway_listener";

/// The listener's built-in policy: 200 ms → 5 s, at most 5 failures in 60 s, then `exit`
/// (75), also on a fatal failure (78); otherwise [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy {
    backoff: Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
        ..Policy::DEFAULT.backoff
    },
    max_restarts: 5,
    window: Duration::from_secs(60),
    on_exhausted: Action::Exit,
    on_fatal: Action::Exit,
    ..Policy::DEFAULT
};

/// The listener's id under `gateway`.
pub const ID: &str = "listener";

/// What a socket that arrives before the tree is set is told to wait (close 1013).
pub const STARTING_RETRY_AFTER_MS: u64 = 500;

/// How long a socket that arrives before the tree is set waits for it before 1013.
pub const STARTING_WAIT: Duration = Duration::from_secs(2);

/// How long a socket the listener closes itself may take to answer the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The gateway's routes over `state`; the sessions they start get `session_policy` (see
/// [`session_child_policy`]).
pub fn router(state: GatewayState, session_policy: PolicyCell) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ws", get(upgrade))
        .layer(Extension(SessionChildPolicy(session_policy)))
        .with_state(state)
}

/// The listener's child spec, with `policy`; its sessions get `session_policy` as it is
/// when each starts. `bound` receives its address on each start.
pub fn spec(
    state: &GatewayState,
    policy: PolicyCell,
    session_policy: PolicyCell,
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
) -> ChildSpec {
    let state = state.clone();
    ChildSpec::new(ID, KIND, Restart::Permanent, move |ctx: ChildContext| {
        let settings = state.settings();
        let args = ServeArgs {
            name: "gateway",
            bind: settings.bind,
            router: router(state.clone(), session_policy.clone()),
            bound: bound.clone(),
            on_tick: None,
            limits: ServeLimits {
                header_read_timeout: Duration::from_millis(settings.header_read_timeout_ms),
                max_connections: Some(settings.max_connections as usize),
                keep_alive: false,
                metrics: Some(ServeMetrics {
                    open: metrics::CONNECTIONS,
                    refused: metrics::CONNECTION_CAP_REFUSALS_TOTAL,
                }),
            },
            on_accept: Some(preauth_at_accept(state.clone())),
        };
        ServeActor::start(ctx, args)
    })
    .with_policy_cell(policy)
}

/// The configured `gateway_session` policy, for the sessions the routes start.
#[derive(Clone)]
struct SessionChildPolicy(PolicyCell);

/// The policy of a session whose spec is `spec`: `configured`, with a liveness timeout no
/// shorter than the one `spec` sets (what the session enforces itself, plus a margin), so
/// no configuration can have the kernel kill a session that is still working.
fn session_child_policy(configured: &Policy, spec: &ChildSpec) -> Policy {
    Policy {
        liveness_timeout: configured
            .liveness_timeout
            .max(spec.policy().liveness_timeout),
        ..configured.clone()
    }
}

/// What a connection took when it was accepted: its place under its address's cap on
/// unauthenticated connections, and the pre-auth slot, if it got one. Shared by the
/// connection, which drops them when it closes, and its requests: an upgrade moves them
/// into the session (or drops the place, when it proves a credential).
#[derive(Clone)]
struct AcceptedSlot(Arc<Mutex<Accepted>>);

struct Accepted {
    address: Option<AddressShare>,
    slot: Option<PreauthSlot>,
}

impl AcceptedSlot {
    fn take_slot(&self) -> Option<PreauthSlot> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).slot.take()
    }

    fn take_address(&self) -> Option<AddressShare> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .address
            .take()
    }
}

/// Counts every accepted connection against its address, refusing it past the cap, and
/// takes a pre-auth slot for it — before it has sent anything.
fn preauth_at_accept(state: GatewayState) -> AcceptHook {
    Arc::new(move |peer: SocketAddr| {
        let Some(address) = state.try_address_share(peer.ip()) else {
            ::metrics::counter!(metrics::ADDRESS_CAP_REFUSALS_TOTAL).increment(1);
            let max = state.max_unauthenticated_per_address();
            return Err(Refusal {
                code: "too_many_connections_from_address",
                message: format!(
                    "this address has its maximum of {max} unauthenticated connections to the gateway open; retry later"
                ),
            });
        };
        let slot = state.try_preauth(peer.ip());
        let mut values = Extensions::new();
        values.insert(AcceptedSlot(Arc::new(Mutex::new(Accepted {
            address: Some(address),
            slot,
        }))));
        Ok(values)
    })
}

/// `GET /ws`.
async fn upgrade(
    State(state): State<GatewayState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(SessionChildPolicy(session_policy)): Extension<SessionChildPolicy>,
    accepted: Option<Extension<AcceptedSlot>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(origin) = foreign_origin(&state.settings().allowed_origins, &headers) {
        ::metrics::counter!(metrics::UPGRADE_REFUSALS_TOTAL, "reason" => "origin").increment(1);
        debug!(peer = %peer, origin = ?origin, "Refused an upgrade from a foreign origin (403).");
        let shown: String = origin.chars().take(200).collect();
        return error(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!(
                "origin {shown:?} may not open a gateway WebSocket: it is not in gateway.allowed_origins"
            ),
        );
    }
    let accepted = accepted.map(|Extension(accepted)| accepted);
    let held = accepted.as_ref().and_then(AcceptedSlot::take_slot);
    let shown = bearer(&state, &headers);
    let credentialed = matches!(shown, Bearer::Known);
    let slot = match shown {
        Bearer::Known => {
            // Authenticated: no longer counted against the address.
            drop(accepted.as_ref().and_then(AcceptedSlot::take_address));
            Some(match held {
                Some(mut slot) => {
                    slot.exempt();
                    slot
                }
                None => state.exempt_preauth(),
            })
        }
        Bearer::Unknown => {
            ::metrics::counter!(metrics::UPGRADE_REFUSALS_TOTAL, "reason" => "unauthorized")
                .increment(1);
            debug!(peer = %peer, "Refused an upgrade with an unknown credential (401).");
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                code::UNAUTHORIZED,
                "wrong token".into(),
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        Bearer::Absent => held.or_else(|| state.try_preauth(peer.ip())),
    };
    let Some(mut slot) = slot else {
        state.count_preauth_rejection();
        ::metrics::counter!(metrics::PREAUTH_REJECTIONS_TOTAL).increment(1);
        let max = state.settings().max_preauth_per_ip;
        debug!(peer = %peer, max, "Too many handshaking sockets from one address; answering 503.");
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_handshakes",
            format!("more than {max} sockets from this address are still handshaking; retry later"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    // Until `hello-ok` the upgraded socket still counts against its address.
    if let Some(accepted) = &accepted {
        slot.hold(accepted.take_address());
    }
    // The WebSocket layer's limit is fixed here, before `connect`: a socket that did not
    // show its credential is held to the pre-auth limit (64 KiB) for its whole life, so a
    // stranger cannot make the gateway buffer 1 MiB frames before it is refused.
    let max = if credentialed {
        state.settings().max_frame_bytes
    } else {
        MAX_PREAUTH_FRAME_BYTES.min(state.settings().max_frame_bytes)
    };
    // A small read buffer: tungstenite's 128 KiB default stays resident per idle socket
    // (1.4 GiB for 10,000 connections); larger frames still reserve what they announce.
    ws.read_buffer_size(4 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(move |e| debug!(peer = %peer, error = %e, "WebSocket upgrade failed."))
        .on_upgrade(move |socket| accept(state, socket, peer, slot, max, session_policy))
}

/// An error answer: `{"error":{"code","message"}}`.
fn error(status: StatusCode, code: &'static str, message: String) -> Response {
    let body = Json(json!({ "error": { "code": code, "message": message } }));
    (status, body).into_response()
}

/// What the `Authorization` header of an upgrade says.
enum Bearer {
    /// No header (or the gateway knows no operator or node credential to compare with).
    Absent,
    /// `Bearer <token>` with a token the gateway knows.
    Known,
    /// Anything else.
    Unknown,
}

fn bearer(state: &GatewayState, headers: &HeaderMap) -> Bearer {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Bearer::Absent;
    };
    let token = value.to_str().ok().and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    if token.is_some_and(|token| state.principals().identify(token).is_some()) {
        return Bearer::Known;
    }
    // With nothing configured to compare with, the session's `connect` check alone decides
    // (it is what decides whether such a gateway admits anyone).
    let settings = state.settings();
    if settings.token.is_none() && settings.operators.is_empty() && settings.nodes.is_empty() {
        return Bearer::Absent;
    }
    Bearer::Unknown
}

/// The first `Origin` header of `headers` that `allowed` does not list, if any.
fn foreign_origin(allowed: &[String], headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::ORIGIN)
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .find(|origin| {
            let origin = normalise_origin(origin);
            !allowed.iter().any(|a| normalise_origin(a) == origin)
        })
}

/// An origin for comparison: scheme and host are case-insensitive; a trailing `/` (which
/// a browser never sends, but a config may hold) is dropped.
fn normalise_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Hands an upgraded socket to a new session, or closes it with the reason it cannot have
/// one.
async fn accept(
    state: GatewayState,
    socket: WebSocket,
    peer: SocketAddr,
    slot: PreauthSlot,
    max_frame_bytes: usize,
    session_policy: PolicyCell,
) {
    // The program hands the tree over right after it has started, and children of that
    // tree (approval handlers) may connect just before: wait a moment rather than turn
    // them away. A socket that waits keeps its pre-auth slot meanwhile.
    let Some(tree) = state.wait_tree(STARTING_WAIT).await else {
        debug!(peer = %peer, "A socket arrived before the tree was set; closing with 1013.");
        close_socket(
            socket,
            close::TRY_AGAIN,
            try_again_reason(STARTING_RETRY_AFTER_MS),
        )
        .await;
        return;
    };
    let (code, reason) = state.shutdown_intent().close();
    let Some(sessions) = tree.supervisor(SESSIONS_PATH) else {
        debug!(peer = %peer, "The sessions supervisor is not running; closing the socket.");
        close_socket(socket, code, reason.to_string()).await;
        return;
    };
    let conn = state.next_conn();
    let id = format!("conn-{conn}");
    let start = Arc::new(Mutex::new(Some(SessionStart {
        socket,
        peer,
        conn,
        preauth: slot,
        max_frame_bytes,
    })));
    let spec = session::spec(&id, &state, start.clone());
    let policy = session_child_policy(&session_policy.get(), &spec);
    let spec = spec.with_policy(policy);
    if let Err(e) = sessions.add(spec).await {
        // Still ours if the start function never ran (the supervisor refused the child).
        let start = start.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(start) = start {
            info!(peer = %peer, error = %e, code, "Cannot start a session for a new socket; closing it.");
            close_socket(start.socket, code, reason.to_string()).await;
        } else {
            warn!(peer = %peer, error = %e, "A session failed to start; its socket is dropped.");
        }
    }
}

/// Sends a close frame and waits (briefly) for the client to answer it.
async fn close_socket(mut socket: WebSocket, code: u16, reason: String) {
    ::metrics::counter!(metrics::CLOSES_TOTAL, "code" => code.to_string()).increment(1);
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if socket.send(frame).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::super::GatewaySettings;
    use super::*;

    #[test]
    fn a_session_keeps_its_liveness_backstop_under_any_configured_policy() {
        let state = GatewayState::new(GatewaySettings::default());
        let spec = session::spec("conn-1", &state, Arc::new(Mutex::new(None)));
        let backstop = spec.policy().liveness_timeout.expect("a backstop");

        // The built-in policy: exactly what the session's spec sets.
        assert_eq!(
            session_child_policy(&session::DEFAULT_POLICY, &spec),
            spec.policy()
        );
        // A configured policy applies, but its liveness never goes below the backstop.
        let shorter = Policy {
            liveness_timeout: Some(Duration::from_secs(1)),
            shutdown_timeout: Duration::from_secs(7),
            ..Policy::DEFAULT
        };
        let policy = session_child_policy(&shorter, &spec);
        assert_eq!(policy.liveness_timeout, Some(backstop));
        assert_eq!(policy.shutdown_timeout, Duration::from_secs(7));
        let longer = Policy {
            liveness_timeout: Some(backstop * 2),
            ..Policy::DEFAULT
        };
        let policy = session_child_policy(&longer, &spec);
        assert_eq!(policy.liveness_timeout, Some(backstop * 2));
    }
}
