//! `warden run`: builds the gateway tree from the config, serves, and shuts down in order.
//!
//! ```text
//! root                one_for_one
//! ├── start_slots     permanent   FIFO start-slot pools
//! ├── gateway         rest_for_one
//! │   ├── listener    permanent   WS /ws, GET /health
//! │   ├── approvals   permanent   the approvals broker, one file per approval under
//! │   │                           `<state.dir>/approvals/`
//! │   └── sessions    one_for_one one temporary child per socket
//! ├── channels        one_for_one (only with `[matrix.accounts.*]`)
//! │   └── matrix      one_for_one
//! │       └── <alias> rest_for_one one per account: `client`, then `approvals` when the
//! │                                account enables approvals and names approvers
//! └── admin           permanent   /healthz /readyz /metrics /admin/*
//! ```
//!
//! Beside the tree, the inbox (`<state.dir>/inbox.sqlite3`, `warden_actors::inbox`) is
//! opened before the tree starts: the accounts store inbound messages in it and the
//! sessions replay them.
//!
//! SIGHUP (like `POST /admin/reload` and `warden reload`) reloads the config and applies
//! what changed to the running tree (`crate::reload`).
//!
//! The process ends on SIGTERM or SIGINT (exit 0 after an ordered shutdown), when a child
//! whose policy says `exit` gives up (75 or 78, after the same shutdown), or if the root
//! itself dies (70). Before an ordered shutdown it sets the gateway's shutdown intent from
//! `gateway.on_shutdown`, which decides what every session tells its client (event
//! `shutdown`, then close 1012 or 1001).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;
use warden_actors::gateway::{self, GatewayState, ShutdownIntent};
use warden_actors::inbox::{self, Inbox};

use crate::config::Loaded;
use crate::program::Program;
use crate::reload::{Built, Live};

/// Runs the gateway until a signal or an exit request; returns the process exit code.
pub async fn run(loaded: Loaded) -> i32 {
    let program = match Program::start(&loaded) {
        Ok(program) => program,
        Err(code) => return code,
    };
    let config = loaded.config.clone();
    let config = &config;

    let admin_state = program.admin_state(&loaded);
    let gateway_bound = Arc::new(watch::Sender::new(None));
    let mut gateway_settings = config.gateway.clone();
    let mut generated_token = None;
    if gateway_settings.token.is_none() && gateway_settings.operators.is_empty() {
        // Nothing is accepted without a credential: make one the CLI can find.
        match crate::token::operator_token(&config.state.dir) {
            Ok((token, path, made)) => {
                if made {
                    info!(path = %path.display(), "No gateway.token or gateway.operators configured: generated an operator token (mode 0600); warden call reads it from there.");
                } else {
                    info!(path = %path.display(), "No gateway.token or gateway.operators configured: using the operator token stored there.");
                }
                generated_token = Some(token.clone());
                gateway_settings.token = Some(token);
            }
            Err(e) => {
                tracing::error!(key = "gateway.token", error = %e, "No gateway.token or gateway.operators configured, and no operator token can be stored under state.dir; set gateway.token or gateway.operators.");
                program.abort().await;
                return crate::config::EXIT_CONFIG;
            }
        }
    }
    let gateway_state = GatewayState::new(gateway_settings);
    // The inbox: inbound messages are stored before an account's sync moves on.
    let inbox_path = config.state.dir.join(inbox::FILE);
    match Inbox::open(
        &inbox_path,
        config.inbox.clone(),
        gateway_state.hub().clone(),
    ) {
        Ok(inbox) => {
            let _ = admin_state.set_inbox(inbox.clone());
            let _ = gateway_state.chat().set_inbox(inbox);
        }
        Err(e) => {
            tracing::error!(key = "state.dir", error = %e, "Cannot open the inbox under state.dir; set state.dir to a writable directory.");
            program.abort().await;
            return crate::config::EXIT_CONFIG;
        }
    }
    // The approvals broker: approvals stored under the state dir; the approvers of each
    // account that enables approvals may resolve them.
    let mut approvals = gateway::ApprovalsSettings::new(config.state.dir.join("approvals"));
    let routing = config.approval_routing();
    approvals.approvers = routing.approvers;
    approvals.default_account = routing.default_account;
    approvals.renotify_after = routing.renotify_after;
    let _ = gateway_state.set_approvals(approvals);
    let file = loaded.file().map(|p| p.display().to_string());
    let (gateway_bind, admin_bind) = (config.gateway.bind, config.admin.bind);
    let deadline = Duration::from_millis(config.shutdown.deadline_ms);
    let Built { children, live } = Live::build(
        loaded,
        gateway_state.clone(),
        gateway_bound,
        generated_token,
        admin_state.clone(),
    );
    let (mut program, tree) = match program.start_tree(children, &admin_state).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let _ = gateway_state.set_tree(tree.handle());
    live.set_tree(tree.handle()).await;
    let _ = admin_state.set_live(live.clone());
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %file.as_deref().unwrap_or("(none)"),
        gateway = %gateway_bind,
        admin = %admin_bind,
        "warden started."
    );
    // Reloads (SIGHUP, POST /admin/reload) run inside `serve`'s wait, so they end with it.
    let reloads = live.serve(program.take_hangups());
    program
        .serve(tree, deadline, reloads, || {
            // The intent the running `gateway.on_shutdown` asks for (a reload may change it).
            gateway_state
                .set_shutdown_intent(ShutdownIntent::from_settings(&gateway_state.settings()))
        })
        .await
}
