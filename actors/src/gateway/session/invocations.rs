//! A session's side of `nodes.invoke`; how a call finds the node's session is
//! [`gateway::invoke`](crate::gateway::invoke).
//!
//! * As an operator's session: `nodes.invoke` checks its params and this session's limits,
//!   hands the call to [`dispatch_invoke`], and times it out itself (`InvokeTimedOut`:
//!   error `timeout`); the node's answer comes back as `InvokeDone`.
//! * As a node's session: an `Invoke` goes to the node as `req node.invoke` under a request
//!   id of the gateway (`inv-<n>`), and the node's `res` goes back to whoever asked. The
//!   session forgets a call at its timeout (`InvokeExpired`); one that ends answers every
//!   open call `node_offline`.

use std::collections::HashMap;
use std::time::Duration;

use ractor::ActorRef;
use serde_json::Value;
use tracing::debug;

use super::super::invoke::{Invoke, InvokeDone, InvokeReply, dispatch_invoke};
use super::super::protocol::{
    DEFAULT_INVOKE_TIMEOUT_MS, ErrorBody, Frame, InvokeParams, NodeInvokeParams, code,
};
use super::{SessionMsg, SessionState, to_value};
use crate::task::Timer;

/// (Node side.) The invocations sent to this node, waiting for its `res`.
pub(super) struct NodeCalls {
    /// By the gateway's request id; each holds its expiry timer.
    open: HashMap<String, PendingInvoke>,
    /// The number of the next request id (`inv-<n>`).
    next_req: u64,
}

/// An invocation sent to this node, waiting for its `res`.
struct PendingInvoke {
    reply: InvokeReply,
    _expiry: Timer<SessionMsg>,
}

impl NodeCalls {
    pub(super) fn new() -> Self {
        Self {
            open: HashMap::new(),
            next_req: 1,
        }
    }
}

impl Drop for NodeCalls {
    fn drop(&mut self) {
        // A node that goes away leaves no operator waiting for its timeout.
        for (_, pending) in self.open.drain() {
            pending.reply.send(Err(ErrorBody {
                code: code::NODE_OFFLINE.to_string(),
                message: "the node disconnected before answering".to_string(),
            }));
        }
    }
}

impl SessionState {
    /// `nodes.invoke` from an operator: hands the call to the node's session, or says why not.
    pub(super) fn invoke(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: &str,
        params: Value,
    ) -> Result<(), (&'static str, String)> {
        let params: InvokeParams = serde_json::from_value(params)
            .map_err(|e| (code::BAD_REQUEST, format!("bad nodes.invoke params: {e}")))?;
        if self.invokes_out.contains_key(id) {
            return Err((code::BAD_REQUEST, format!("request {id:?} is still open")));
        }
        let settings = self.gateway.settings();
        let max = settings.max_pending_invocations;
        if self.invokes_out.len() >= max {
            let message = format!(
                "{max} nodes.invoke calls are already open on this session (gateway.max_pending_invocations)"
            );
            return Err((code::BUSY, message));
        }
        let timeout_ms = params
            .timeout_ms
            .unwrap_or(DEFAULT_INVOKE_TIMEOUT_MS.min(settings.max_invoke_timeout_ms));
        if timeout_ms == 0 || timeout_ms > settings.max_invoke_timeout_ms {
            let message = format!(
                "timeout_ms must be from 1 to {} (gateway.max_invoke_timeout_ms), got {timeout_ms}",
                settings.max_invoke_timeout_ms
            );
            return Err((code::BAD_REQUEST, message));
        }
        let timeout = Duration::from_millis(timeout_ms);
        let reply = InvokeReply::Session {
            session: myself.get_derived(),
            req_id: id.to_string(),
        };
        dispatch_invoke(
            &self.gateway,
            &params.node,
            params.command,
            params.args,
            timeout,
            reply,
            None,
        )?;
        let timed_out = id.to_string();
        let timer = myself.send_after(timeout, move || SessionMsg::InvokeTimedOut {
            id: timed_out,
        });
        self.invokes_out.insert(id.to_string(), timer.into());
        Ok(())
    }

    /// (Operator side.) The node answered request `id`: relayed to the client, unless the
    /// call timed out first.
    pub(super) async fn invoke_done(&mut self, myself: &ActorRef<SessionMsg>, done: InvokeDone) {
        let InvokeDone { id, result } = done;
        if self.invokes_out.remove(&id).is_some() {
            let frame = match result {
                Ok(payload) => Frame::ok(id, payload),
                Err(error) => Frame::Res {
                    id,
                    ok: false,
                    payload: None,
                    error: Some(error),
                },
            };
            self.send(myself, &frame).await;
        }
    }

    /// (Operator side.) No answer to request `id` in time: error `timeout`.
    pub(super) async fn invoke_timed_out(&mut self, myself: &ActorRef<SessionMsg>, id: String) {
        if self.invokes_out.remove(&id).is_some() {
            let frame = Frame::err(id, code::TIMEOUT, "the node did not answer in time");
            self.send(myself, &frame).await;
        }
    }

    /// (Node side.) Sends `node.invoke` to the node and remembers who asked.
    pub(super) async fn forward_invoke(&mut self, myself: &ActorRef<SessionMsg>, invoke: Invoke) {
        let Invoke {
            command,
            args,
            grant,
            timeout,
            reply,
        } = invoke;
        let offline = |message: &str| {
            Err(ErrorBody {
                code: code::NODE_OFFLINE.to_string(),
                message: message.to_string(),
            })
        };
        if self.closing || self.registration().is_none() {
            reply.send(offline("the node is disconnecting"));
            return;
        }
        let max = self.gateway.settings().max_pending_invocations;
        if self.to_node.open.len() >= max {
            reply.send(Err(ErrorBody {
                code: code::BUSY.to_string(),
                message: format!(
                    "node has {max} invocations open already (gateway.max_pending_invocations)"
                ),
            }));
            return;
        }
        let id = format!("inv-{}", self.to_node.next_req);
        self.to_node.next_req += 1;
        let params = NodeInvokeParams {
            command,
            args,
            grant,
        };
        let frame = Frame::Req {
            id: id.clone(),
            method: "node.invoke".to_string(),
            params: to_value(&params),
        };
        if !self.send(myself, &frame).await {
            reply.send(offline("the node's connection failed"));
            return;
        }
        let expired = id.clone();
        let expiry = myself.send_after(timeout, move || SessionMsg::InvokeExpired { id: expired });
        self.to_node.open.insert(
            id,
            PendingInvoke {
                reply,
                _expiry: expiry.into(),
            },
        );
    }

    /// (Node side.) Forgets the call sent as request `id`: its timeout is over.
    pub(super) fn invoke_expired(&mut self, id: &str) {
        self.to_node.open.remove(id);
    }

    /// (Node side.) A `res` from the node: relayed to the operator that asked.
    pub(super) fn node_answer(
        &mut self,
        id: String,
        ok: bool,
        payload: Option<Value>,
        error: Option<ErrorBody>,
    ) {
        let Some(pending) = self.to_node.open.remove(&id) else {
            debug!(peer = %self.peer, id = %id, "Ignoring an answer to no open request.");
            return;
        };
        let result = if ok {
            Ok(payload.unwrap_or(Value::Null))
        } else {
            Err(error.unwrap_or_else(|| ErrorBody {
                code: code::INTERNAL.to_string(),
                message: "the node failed without saying why".to_string(),
            }))
        };
        pending.reply.send(result);
    }
}
