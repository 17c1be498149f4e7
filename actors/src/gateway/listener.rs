//! The gateway listener: `GET /health` now; the WebSocket protocol at `/ws` is issue 4.
//!
//! ## Messages
//! None of its own: it is a [`ServeActor`] with the gateway's routes.
//!
//! ## Supervision
//! `root/gateway/listener`, the first child of the `gateway` supervisor (`rest_for_one`):
//! when it restarts, the sessions started after it restart too.
//!
//! ## Restart policy
//! Kind `gateway_listener`: 200 ms → 5 s, at most 5 failures in 60 s, then `exit` (the
//! process exits 75 so the container runtime restarts it — a gateway that cannot bind its
//! port is not worth keeping alive half-way).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use super::GatewaySettings;
use crate::serve::{ServeActor, ServeArgs};
use crate::supervision::{ChildContext, ChildSpec, Policy, Restart};

/// The kind of the listener child, for policies and metrics.
pub const KIND: &str = "gateway_listener";

/// The gateway's routes.
pub fn router() -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route(
            "/ws",
            get(|| async {
                (
                    StatusCode::NOT_IMPLEMENTED,
                    Json(json!({ "error": {
                        "code": "not_implemented",
                        "message": "the gateway WebSocket protocol is not implemented in this version",
                    }})),
                )
            }),
        )
}

/// The listener's child spec; `bound` receives its address on each start.
pub fn spec(
    settings: &GatewaySettings,
    policy: Policy,
    bound: Arc<watch::Sender<Option<std::net::SocketAddr>>>,
) -> ChildSpec {
    let bind = settings.bind;
    ChildSpec::new(
        "listener",
        KIND,
        Restart::Permanent,
        move |ctx: ChildContext| {
            let args = ServeArgs {
                name: "gateway",
                bind,
                router: router(),
                bound: bound.clone(),
                on_tick: None,
            };
            ServeActor::start(ctx, args)
        },
    )
    .with_policy(policy)
}
