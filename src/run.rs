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
//! The process ends on SIGTERM or SIGINT (exit 0 after an ordered shutdown), when a child
//! whose policy says `exit` gives up (75 or 78, after the same shutdown), or if the root
//! itself dies (70). Before an ordered shutdown it sets the gateway's shutdown intent from
//! `gateway.on_shutdown`, which decides what every session tells its client (event
//! `shutdown`, then close 1012 or 1001).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;
use warden_actors::gateway::{
    self, GatewayPolicies, GatewayState, ShutdownIntent, listener, session,
};
use warden_actors::inbox::{self, Inbox};
use warden_actors::matrix::approvals::{self, GatewayAddr, HandlerConfig};
use warden_actors::matrix::{self, AccountSpec};
use warden_actors::supervision::{SlotClient, slots, supervisor};

use crate::admin;
use crate::config::{Config, Loaded};
use crate::program::Program;

/// Runs the gateway until a signal or an exit request; returns the process exit code.
pub async fn run(loaded: Loaded) -> i32 {
    let program = match Program::start(&loaded) {
        Ok(program) => program,
        Err(code) => return code,
    };
    let config = &loaded.config;

    let admin_state = program.admin_state(&loaded);
    let gateway_bound = Arc::new(watch::Sender::new(None));
    let mut gateway_settings = config.gateway.clone();
    if gateway_settings.token.is_none() && gateway_settings.operators.is_empty() {
        // Nothing is accepted without a credential: make one the CLI can find.
        match crate::token::operator_token(&config.state.dir) {
            Ok((token, path, made)) => {
                if made {
                    info!(path = %path.display(), "No gateway.token or gateway.operators configured: generated an operator token (mode 0600); warden call reads it from there.");
                } else {
                    info!(path = %path.display(), "No gateway.token or gateway.operators configured: using the operator token stored there.");
                }
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
    approvals.approvers = config
        .matrix
        .accounts
        .iter()
        .filter(|(_, account)| account.approvals.enabled)
        .map(|(alias, account)| (alias.clone(), account.approvals.approvers.clone()))
        .collect();
    let _ = gateway_state.set_approvals(approvals);
    let slots = SlotClient::new();
    // Approval handlers reach the gateway wherever its listener bound.
    let bound = gateway_bound.subscribe();
    let supervisor_policy = config.policy_for(supervisor::KIND, None);
    let gateway_policies = GatewayPolicies {
        listener: config.policy_for(listener::KIND, None),
        approvals: config.policy_for(gateway::approvals::KIND, None),
        session: config.policy_for(session::KIND, None),
        supervisor: supervisor_policy.clone(),
    };
    let mut children = vec![
        slots
            .spec("start_slots", config.pools())
            .with_policy(config.policy_for(slots::KIND, None)),
        gateway::spec_with(&gateway_state, gateway_policies, gateway_bound),
    ];
    if !config.matrix.accounts.is_empty() {
        children.push(matrix::channels_spec(
            matrix_accounts(config, &gateway_state, GatewayAddr::Bound(bound)),
            gateway_state.chat(),
            &slots,
            &supervisor_policy,
        ));
    }
    children.push(admin::spec(
        &config.admin,
        admin_state.clone(),
        config.policy_for(admin::KIND, None),
    ));
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

/// Each `[matrix.accounts.<alias>]` with its client's policy (`matrix_account`, then the
/// account's own `supervision` layer) and, when `approvals.enabled` with approvers, its
/// approval handler (`approval_handler`).
fn matrix_accounts(
    config: &Config,
    state: &GatewayState,
    gateway: GatewayAddr,
) -> Vec<AccountSpec> {
    config
        .matrix
        .accounts
        .iter()
        .map(|(alias, acc)| {
            let handler = acc.approvals.runs_handler().then(|| {
                // The handler's credential lives in memory only: no client outside this
                // process can hold role approver.
                let credential = state.add_approver(alias);
                let handler = HandlerConfig {
                    alias: alias.clone(),
                    gateway: gateway.clone(),
                    token: credential.expose().to_string(),
                    handshake_timeout: Duration::from_millis(config.gateway.handshake_timeout_ms),
                };
                (handler, config.policy_for(approvals::KIND, None))
            });
            AccountSpec {
                config: acc.resolve(alias, &config.state.dir),
                policy: config.policy_for(matrix::KIND, Some(&acc.supervision)),
                handler,
            }
        })
        .collect()
}
