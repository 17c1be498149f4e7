//! Invocation routing: how a `nodes.invoke` from an operator's session, or an approved
//! command from the approvals broker, reaches the node's session, and where its answer goes.
//!
//! [`dispatch_invoke`] finds the node in the registry, checks that it declared the command,
//! and for a command the node marked `approval` issues the single-use grant of an approved
//! approval (only the broker passes an approval id). The node's session then sends
//! `node.invoke` and answers the [`InvokeReply`] exactly once, whatever happens to the node.
//!
//! Sessions reach each other through the two narrow views of a session defined here,
//! [`NodeSession`] (what the registry holds for a node) and the `InvokeDone` recipient of an
//! operator's session, so neither the registry nor the broker names the session's messages.

use std::time::Duration;

use ractor::DerivedActorRef;
use serde_json::Value;
use tokio::sync::oneshot;

use super::protocol::auth::Principal;
use super::protocol::grant::{self, Grant};
use super::protocol::{ErrorBody, code};
use super::registry::Lookup;
use super::{GatewayState, now_ms};

/// What the rest of the gateway sends a node's session.
pub enum NodeMsg {
    /// Forward `node.invoke` to the node.
    Invoke(Invoke),
    /// A newer session registered this node's name: close this one.
    Replaced,
}

/// A node's session as the registry holds it: it takes [`NodeMsg`]s only.
pub type NodeSession = DerivedActorRef<NodeMsg>;

/// (To an operator's session.) The node's answer to its request `id`.
pub struct InvokeDone {
    /// The operator's request id.
    pub id: String,
    /// The node's payload, or its error.
    pub result: Result<Value, ErrorBody>,
}

/// A `nodes.invoke` on its way to a node's session.
pub struct Invoke {
    /// The command.
    pub command: String,
    /// Its arguments.
    pub args: Value,
    /// The approval grant, for a command that needs one.
    pub grant: Option<Grant>,
    /// How long the caller waits.
    pub timeout: Duration,
    /// Where the node's answer goes.
    pub reply: InvokeReply,
}

/// Where the answer to an invocation goes: exactly one answer, whatever happens to the node.
pub enum InvokeReply {
    /// An operator's session, as `InvokeDone` for its request `req_id`.
    Session {
        /// The operator's session.
        session: DerivedActorRef<InvokeDone>,
        /// The operator's request id.
        req_id: String,
    },
    /// A caller inside the gateway (the approvals broker). A sender dropped without an
    /// answer means the node's session forgot the call at its timeout.
    Oneshot(oneshot::Sender<Result<Value, ErrorBody>>),
}

impl InvokeReply {
    /// Delivers the node's payload or error; a caller that is gone is not an error.
    pub fn send(self, result: Result<Value, ErrorBody>) {
        match self {
            InvokeReply::Session { session, req_id } => {
                let _ = session.send_message(InvokeDone { id: req_id, result });
            }
            InvokeReply::Oneshot(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Routes an invocation of `command` on `node` the way `nodes.invoke` does: the registry
/// finds the node's session, which must have declared the command; the session then sends
/// `node.invoke` and relays the answer (or `node_offline`) to `reply`. The caller times the
/// call out itself; the node's session forgets it after `timeout`. On an error, `reply`
/// is dropped unanswered.
///
/// A command the node marked `approval` runs only for an approval: `approval` is the id of
/// an approved approval (only the broker passes one), for which a single-use grant, keyed
/// with the node's credential, goes with the request; without one the call is refused
/// with `approval_required`.
pub(crate) fn dispatch_invoke(
    gateway: &GatewayState,
    node: &str,
    command: String,
    args: Value,
    timeout: Duration,
    reply: InvokeReply,
    approval: Option<&str>,
) -> Result<(), (&'static str, String)> {
    let offline = || {
        (
            code::NODE_OFFLINE,
            format!("node {node:?} is not connected"),
        )
    };
    let (commands, session, holder) = match gateway.registry().lookup(node) {
        Lookup::Unknown => {
            return Err((
                code::UNKNOWN_NODE,
                format!("no node {node:?} has connected"),
            ));
        }
        Lookup::Offline => return Err(offline()),
        Lookup::Online {
            commands,
            session,
            holder,
        } => (commands, session, holder),
    };
    let Some(info) = commands.iter().find(|c| c.name == command) else {
        let message = format!("node {node:?} has no command {command:?}");
        return Err((code::UNKNOWN_COMMAND, message));
    };
    let grant = match (info.approval, approval) {
        (false, _) => None,
        (true, None) => {
            let message = format!(
                "command {command:?} on node {node:?} needs an approval for each run: ask with approvals.request"
            );
            return Err((code::APPROVAL_REQUIRED, message));
        }
        (true, Some(id)) => {
            let principal = Principal::Node {
                name: node.to_string(),
                holder,
            };
            let principals = gateway.principals();
            let Some(key) = principals.secret_of(&principal) else {
                let message = format!("no credential of node {node:?} to sign the approval with");
                return Err((code::INTERNAL, message));
            };
            let lifetime = (timeout.as_millis() as u64).min(grant::MAX_LIFETIME_MS);
            let expires_at_ms = now_ms().saturating_add(lifetime);
            Some(Grant::issue(key, id, node, &command, &args, expires_at_ms))
        }
    };
    let invoke = Invoke {
        command,
        args,
        grant,
        timeout,
        reply,
    };
    session
        .send_message(NodeMsg::Invoke(invoke))
        .map_err(|_| offline())
}
