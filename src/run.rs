//! `warden run`: builds the gateway tree from the config, serves, and shuts down in order.
//!
//! ```text
//! root                one_for_one
//! ├── start_slots     permanent   FIFO start-slot pools
//! ├── gateway         rest_for_one
//! │   ├── listener    permanent   WS /ws, GET /health
//! │   └── sessions    one_for_one one temporary child per socket
//! └── admin           permanent   /healthz /readyz /metrics /admin/*
//! ```
//!
//! The process ends on SIGTERM or SIGINT (exit 0 after an ordered shutdown), when a child
//! whose policy says `exit` gives up (75 or 78, after the same shutdown), or if the root
//! itself dies (70). Before an ordered shutdown it sets the gateway's shutdown intent from
//! `gateway.on_shutdown`, which decides what every session tells its client (event
//! `shutdown`, then close 1012 or 1001).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};
use warden_actors::gateway::{self, GatewayState, ShutdownIntent, listener};
use warden_actors::supervision::SlotClient;

use crate::admin;
use crate::config::{EXIT_CONFIG, Loaded};
use crate::program::Program;

/// Runs the gateway until a signal or an exit request; returns the process exit code.
pub async fn run(loaded: Loaded) -> i32 {
    let program = match Program::start(&loaded) {
        Ok(program) => program,
        Err(code) => return code,
    };
    let config = &loaded.config;
    if let Some(alias) = config.matrix.accounts.keys().next() {
        error!(key = %format!("matrix.accounts.{alias}"),
            "Matrix accounts are not supported by this version yet; remove them from the config to run the gateway.");
        program.abort().await;
        return EXIT_CONFIG;
    }

    let admin_state = program.admin_state(&loaded);
    let gateway_bound = Arc::new(watch::Sender::new(None));
    let gateway_state = GatewayState::new(config.gateway.clone());
    let slots = SlotClient::new();
    let children = vec![
        slots
            .spec("start_slots", config.pools())
            .with_policy(config.policy_for("start_slots", None)),
        gateway::spec(
            &gateway_state,
            config.policy_for(listener::KIND, None),
            gateway_bound,
        ),
        admin::spec(
            &config.admin,
            admin_state.clone(),
            config.policy_for("admin", None),
        ),
    ];
    let (program, tree) = match program.start_tree(children, &admin_state).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let _ = gateway_state.set_tree(tree.handle());
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %loaded.file().map_or("(none)".to_string(), |p| p.display().to_string()),
        gateway = %config.gateway.bind,
        admin = %config.admin.bind,
        "warden started."
    );
    let deadline = Duration::from_millis(config.shutdown.deadline_ms);
    let intent = ShutdownIntent::from_settings(&config.gateway);
    program
        .serve(tree, deadline, std::future::pending(), || {
            gateway_state.set_shutdown_intent(intent)
        })
        .await
}
