//! `warden run`: builds the tree from the config, serves, and shuts down in order.
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

use serde_json::json;
use tokio::sync::watch;
use tracing::{error, info, warn};
use warden_actors::gateway::{self, GatewayState, ShutdownIntent, listener};
use warden_actors::supervision::{SlotClient, Tree, TreeOptions};

use crate::admin::{self, AdminState};
use crate::config::{EXIT_CONFIG, Loaded};
use crate::telemetry;

/// The process exit code when the root supervisor died on its own (EX_SOFTWARE).
pub const EXIT_ROOT_DIED: i32 = 70;

/// Why `run` is ending.
enum Stop {
    Signal(&'static str),
    Exit(warden_actors::supervision::ExitRequest),
    RootDied,
}

/// Runs the gateway until a signal or an exit request; returns the process exit code.
pub async fn run(loaded: Loaded) -> i32 {
    let config = &loaded.config;
    let telemetry = match telemetry::init(&config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln_line(&format!("warden: {e}"));
            return EXIT_CONFIG;
        }
    };
    if let Some(alias) = config.matrix.accounts.keys().next() {
        error!(key = %format!("matrix.accounts.{alias}"),
            "Matrix accounts are not supported by this version yet; remove them from the config to run the gateway.");
        telemetry.shutdown().await;
        return EXIT_CONFIG;
    }
    let metrics = match admin::install_metrics() {
        Ok(handle) => Some(handle),
        Err(e) => {
            warn!(error = %e, "Metrics are off: cannot install the recorder.");
            None
        }
    };

    let entries: Vec<serde_json::Value> = loaded
        .entries()
        .into_iter()
        .map(|e| json!({ "key": e.key, "value": e.value, "source": e.source }))
        .collect();
    let admin_state = AdminState::new(
        json!({ "entries": entries }),
        config.admin.token.clone(),
        metrics,
    );
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
    let tree = match Tree::start(children, TreeOptions::default()).await {
        Ok(tree) => tree,
        Err(e) => {
            error!(error = %e, "Cannot start the supervision tree.");
            telemetry.shutdown().await;
            return EXIT_ROOT_DIED;
        }
    };
    let _ = admin_state.set_tree(tree.handle());
    let _ = gateway_state.set_tree(tree.handle());
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %loaded.file().map_or("(none)".to_string(), |p| p.display().to_string()),
        gateway = %config.gateway.bind,
        admin = %config.admin.bind,
        "warden started."
    );

    let stop = tokio::select! {
        name = signal() => Stop::Signal(name),
        request = tree.exit().requested() => Stop::Exit(request),
        () = tree.stopped() => Stop::RootDied,
    };
    let deadline = Duration::from_millis(config.shutdown.deadline_ms);
    let code = match &stop {
        Stop::Signal(name) => {
            info!(signal = name, "Signal received; shutting down.");
            0
        }
        Stop::Exit(request) => {
            error!(actor = %request.path, code = request.code, reason = %request.reason,
                "A child gave up and its policy says exit; shutting down.");
            request.code
        }
        Stop::RootDied => {
            error!("The root supervisor died; exiting.");
            EXIT_ROOT_DIED
        }
    };
    if !matches!(stop, Stop::RootDied) {
        gateway_state.set_shutdown_intent(ShutdownIntent::from_settings(&config.gateway));
        let report = tree.shutdown(deadline).await;
        if report.graceful {
            info!(code, "Shutdown complete.");
        } else {
            warn!(still_running = ?report.still_running, "Shutdown deadline passed; the rest was killed.");
        }
    }
    telemetry.shutdown().await;
    code
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            // Without signal handlers only the exit paths can end the process.
            warn!("Cannot install signal handlers.");
            std::future::pending().await
        }
    }
}

/// For the one error that can happen before logging is set up.
fn eprintln_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
