//! `warden node`: this process as a node host connected to a gateway.
//!
//! ```text
//! root                one_for_one
//! ├── connection      permanent   the gateway connection; its restart is the reconnect
//! └── admin           permanent   /healthz (with the connection's state) /readyz /metrics /admin/*
//! ```
//!
//! `/healthz` adds `connected`, `last_connected_at`, `disconnected_ms`, `last_error` and
//! `consecutive_failures`. With `node.max_disconnected_ms` set, a node that stays
//! disconnected that long exits 75 after an ordered shutdown, so its service manager
//! restarts it.
//!
//! The node needs `node.token` (or `token_file`): it authenticates with it, and checks the
//! approval grants of commands that need approval with it; config validation refuses a
//! `[node]` without one (exit 64). This is where the node's own environment is read for its
//! commands: each gets only `PATH`, `LANG` and `HOME` from it, plus its own `env` table.
//! The [`Admission`](connection::Admission) — the limits on running and queued commands
//! and the grants already used — is made once here and outlives every reconnect.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};
use warden_actors::node::connection::{self, NodeStatus};
use warden_actors::supervision::EXIT_BUDGET_EXHAUSTED;

use crate::admin;
use crate::config::{EXIT_CONFIG, Loaded};
use crate::program::{Program, Stop};

/// Runs the node host until a signal, an exit request or too long a disconnection.
pub async fn run(loaded: Loaded) -> i32 {
    let program = match Program::start(&loaded) {
        Ok(program) => program,
        Err(code) => return code,
    };
    let config = &loaded.config;
    let Some(node) = config.node.clone() else {
        error!(
            key = "node",
            "warden node needs a [node] table: gateway_url, token and commands."
        );
        program.abort().await;
        return EXIT_CONFIG;
    };
    // The one place the node's own environment is read: its commands get PATH, LANG and
    // HOME from it.
    let connection_config = node.resolve(|key| std::env::var(key).ok(), host_name);
    let name = connection_config.name.clone();
    let status = Arc::new(NodeStatus::new());
    let admission = Arc::new(node.admission());

    let probe_status = status.clone();
    let admin_state = program
        .admin_state(&loaded)
        .with_health(Arc::new(move || probe_status.to_json()));
    let children = vec![
        connection::spec_with_admission(
            connection_config,
            status.clone(),
            admission,
            config.policy_for(connection::KIND, None),
        ),
        admin::spec(
            &config.admin,
            admin_state.clone(),
            config.policy_for(admin::KIND, None),
        ),
    ];
    let (mut program, tree) = match program.start_tree(children, &admin_state).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    info!(version = env!("CARGO_PKG_VERSION"), gateway = %node.gateway_url, node = %name,
        admin = %config.admin.bind, "warden node started.");

    let limit = Duration::from_millis(node.max_disconnected_ms);
    // A node does not reload its config: a SIGHUP is said to be ignored, not fatal.
    let mut hangups = program.take_hangups();
    let too_long = async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                () = hangups.recv() => {
                    warn!("SIGHUP ignored: warden node does not reload its config; restart it to apply a change.");
                    continue;
                }
                _ = every.tick() => {}
            }
            if limit.is_zero() {
                continue;
            }
            if let Some(away) = status.disconnected_for()
                && away >= limit
            {
                return Stop::Other {
                    reason: format!(
                        "disconnected from the gateway for {} ms, over node.max_disconnected_ms; exiting so the service manager restarts the node",
                        away.as_millis()
                    ),
                    code: EXIT_BUDGET_EXHAUSTED,
                };
            }
        }
    };
    let deadline = Duration::from_millis(config.shutdown.deadline_ms);
    program.serve(tree, deadline, too_long, || {}).await
}

/// The host name, for a node without `node.name`.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_string())
}
