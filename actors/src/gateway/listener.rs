//! The gateway listener: `GET /health` and the WebSocket endpoint `GET /ws`.
//!
//! It is a [`ServeActor`]: HTTP/1.1 only, every connection closed unless it sends a whole
//! request head within `header_read_timeout_ms` (from accept, and again between requests
//! of a kept-alive connection), and at most `max_connections` connections open, counted
//! from accept to close (a WebSocket until the socket closes); the next one is answered
//! `503` with `Retry-After: 1` and `too_many_connections`, and closed.
//!
//! `/ws`, in order:
//! 1. more than `max_preauth_per_ip` handshaking sockets from the client's IP ⇒ HTTP 503
//!    with `Retry-After: 1` and a JSON error, no upgrade; else a pre-auth slot is taken
//!    (released at `hello-ok` or when the socket ends);
//! 2. upgrade, with `max_frame_bytes` as the largest frame and message;
//! 3. the tree is not set yet (the program is starting) ⇒ close 1013 with
//!    `starting; retry_after_ms=…`;
//! 4. else the socket becomes a temporary child `conn-<n>` of `root/gateway/sessions` (a
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
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::protocol::{close, try_again_reason};
use super::session::{self, SessionStart};
use super::{GatewayState, SESSIONS_PATH, metrics};
use crate::serve::{ServeActor, ServeArgs, ServeLimits, ServeMetrics};
use crate::supervision::{ChildContext, ChildSpec, Policy, Restart};

/// The kind of the listener child, for policies and metrics.
pub const KIND: &str = "gateway_listener";

/// The listener's id under `gateway`.
pub const ID: &str = "listener";

/// What a socket that arrives before the tree is set is told to wait (close 1013).
pub const STARTING_RETRY_AFTER_MS: u64 = 500;

/// How long a socket that arrives before the tree is set waits for it before 1013.
pub const STARTING_WAIT: Duration = Duration::from_secs(2);

/// How long a socket the listener closes itself may take to answer the close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The gateway's routes over `state`.
pub fn router(state: GatewayState) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ws", get(upgrade))
        .with_state(state)
}

/// The listener's child spec; `bound` receives its address on each start.
pub fn spec(
    state: &GatewayState,
    policy: Policy,
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
) -> ChildSpec {
    let state = state.clone();
    ChildSpec::new(ID, KIND, Restart::Permanent, move |ctx: ChildContext| {
        let settings = state.settings();
        let args = ServeArgs {
            name: "gateway",
            bind: settings.bind,
            router: router(state.clone()),
            bound: bound.clone(),
            on_tick: None,
            limits: ServeLimits {
                header_read_timeout: Duration::from_millis(settings.header_read_timeout_ms),
                max_connections: Some(settings.max_connections as usize),
                metrics: Some(ServeMetrics {
                    open: metrics::CONNECTIONS,
                    refused: metrics::CONNECTION_CAP_REFUSALS_TOTAL,
                }),
            },
            on_accept: None,
        };
        ServeActor::start(ctx, args)
    })
    .with_policy(policy)
}

/// `GET /ws`.
async fn upgrade(
    State(state): State<GatewayState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(slot) = state.try_preauth(peer.ip()) else {
        ::metrics::counter!(metrics::PREAUTH_REJECTIONS_TOTAL).increment(1);
        let max = state.settings().max_preauth_per_ip;
        debug!(peer = %peer, max, "Too many handshaking sockets from one address; answering 503.");
        let body = Json(json!({ "error": {
            "code": "too_many_handshakes",
            "message": format!("more than {max} sockets from this address are still handshaking; retry later"),
        }}));
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let max = state.settings().max_frame_bytes;
    // A small read buffer: tungstenite's 128 KiB default stays resident per idle socket
    // (1.4 GiB for 10,000 connections); larger frames still reserve what they announce.
    ws.read_buffer_size(4 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(move |e| debug!(peer = %peer, error = %e, "WebSocket upgrade failed."))
        .on_upgrade(move |socket| accept(state, socket, peer, slot))
}

/// Hands an upgraded socket to a new session, or closes it with the reason it cannot have
/// one.
async fn accept(
    state: GatewayState,
    socket: WebSocket,
    peer: SocketAddr,
    slot: super::PreauthSlot,
) {
    // The program hands the tree over right after it has started, and children of that
    // tree (approval handlers) may connect just before: wait a moment rather than turn
    // them away. A socket that waits is counted against the pre-auth budget meanwhile.
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
    })));
    let spec = session::spec(&id, &state, start.clone());
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
