//! Method dispatch: a request after `hello-ok`, checked against the session's role and
//! answered here, or handed on — `nodes.invoke` to the node's session (see
//! [`invocations`](super::invocations)), `chat.send` to a task the session owns, the
//! `approvals.*` methods to the approvals broker.
//!
//! | method | roles | answer |
//! |---|---|---|
//! | `health` | every role | `{status: "ok"}` |
//! | `status`, `tree`, `nodes.list` | operator | counts and uptime; the supervision tree; the node registry |
//! | `subscribe {events, since?, consumer?}` | operator, approver (not `chat.*`) | every event name subscribed so far (`too_large` past `max_subscriptions` or for a name over 64 bytes); with `since` or `consumer` (operator, with `chat.message`), `from` too, then the replay (see [`replay`](super::replay)) |
//! | `nodes.invoke`, `chat.send` | operator | the node's answer; `{event_id}` |
//! | `chat.react {account, room_id, event_id, key}`, `chat.edit {account, room_id, event_id, body}`, `chat.typing {account, room_id, typing, timeout_ms?}` | operator | `{event_id}`, `{event_id}`, `{}` |
//! | `chat.ack {consumer, cursor}` | operator | `{consumer, cursor}`: the consumer's cursor now |
//! | `inbox.stats` | operator | the inbox's [`Stats`](crate::inbox::Stats) |
//! | `approvals.request` / `approvals.resolve`, `approvals.notified` / `approvals.list` | operator / approver / both | the broker's answer (`not_implemented` without approvals) |
//!
//! A role a method is not for gets `forbidden`; an unknown method `unknown_method`.

use ractor::ActorRef;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tracing::Instrument;

use super::super::approvals::{ApprovalsMsg, ReplyTo};
use super::super::chat::{ChatAction, ChatError, MESSAGE_EVENT, SendParams};
use super::super::protocol::auth::Principal;
use super::super::protocol::{
    AckParams, ApprovalNotifiedParams, ApprovalRequestParams, ApprovalResolveParams, Frame, Role,
    SubscribeParams, code, parse_approvals_list,
};
use super::{MAX_EVENT_NAME, Phase, SessionMsg, SessionState, replay, to_value};
use crate::inbox::{InboxError, Since, check_name};

impl SessionState {
    /// A request after `hello-ok`: answered now, or handed on (then answered later).
    pub(super) async fn request(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        method: &str,
        params: Value,
    ) {
        let Phase::Ready(authed) = &self.phase else {
            return;
        };
        let role = authed.principal.role();
        let account = match &authed.principal {
            Principal::Approver { account } => Some(account.clone()),
            _ => None,
        };
        let operator_only = matches!(
            method,
            "status"
                | "tree"
                | "nodes.list"
                | "nodes.invoke"
                | "chat.send"
                | "chat.react"
                | "chat.edit"
                | "chat.typing"
                | "chat.ack"
                | "inbox.stats"
        );
        if operator_only && role != Role::Operator {
            let message = format!("{method} is for operators, not {}s", role.as_str());
            self.send(myself, &Frame::err(id, code::FORBIDDEN, message))
                .await;
            return;
        }
        let reply = match method {
            "connect" => Some(Frame::err(id, code::BAD_REQUEST, "already connected")),
            "health" => Some(Frame::ok(id, json!({ "status": "ok" }))),
            "status" => Some(self.status(id)),
            "tree" => Some(self.tree(id).await),
            "subscribe" => self.subscribe(myself, id, role, params),
            "nodes.list" => Some(Frame::ok(id, to_value(&self.gateway.registry().list()))),
            "nodes.invoke" => {
                let handed = self.invoke(myself, &id, params);
                refusal(id, handed)
            }
            "chat.send" => self.chat_send(myself, id, params),
            "chat.react" | "chat.edit" | "chat.typing" => self.chat_act(myself, id, method, params),
            "chat.ack" | "inbox.stats" => self.inbox_call(myself, id, method, params),
            "approvals.request" | "approvals.list" | "approvals.resolve" | "approvals.notified" => {
                let handed = self.approvals(myself, &id, method, params, role, account);
                refusal(id, handed)
            }
            other => Some(Frame::err(
                id,
                code::UNKNOWN_METHOD,
                format!("no method {other:?}"),
            )),
        };
        if let Some(reply) = reply {
            self.send(myself, &reply).await;
        }
    }

    /// The `status` method: version, uptime and sessions by role.
    fn status(&self, id: String) -> Frame {
        let (operator, node, approver, handshaking) = self.gateway.counts();
        Frame::ok(
            id,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_ms": self.gateway.uptime().as_millis() as u64,
                "sessions": {
                    "operator": operator,
                    "node": node,
                    "approver": approver,
                    "handshaking": handshaking,
                },
            }),
        )
    }

    /// The `subscribe` method: adds event names (within `max_subscriptions`); the first one
    /// hands the pump its hub receiver. With `since` or `consumer` it starts a replay and is
    /// answered once the replay's start is known (then `None` here).
    fn subscribe(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        role: Role,
        params: Value,
    ) -> Option<Frame> {
        if role == Role::Node {
            return Some(Frame::err(id, code::FORBIDDEN, "nodes cannot subscribe"));
        }
        let p = match serde_json::from_value::<SubscribeParams>(params) {
            Ok(p) => p,
            Err(e) => {
                let message = format!("bad subscribe params: {e}");
                return Some(Frame::err(id, code::BAD_REQUEST, message));
            }
        };
        let max = self.gateway.settings().max_subscriptions;
        if let Some(long) = p
            .events
            .iter()
            .find(|e| e.is_empty() || e.len() > MAX_EVENT_NAME)
        {
            let shown: String = long.chars().take(32).collect();
            let message = format!("event names are 1 to {MAX_EVENT_NAME} bytes; {shown:?}… is not");
            return Some(Frame::err(id, code::TOO_LARGE, message));
        }
        // An approver serves one account's approvals; people's messages are not its to read.
        if role == Role::Approver
            && let Some(chat) = p.events.iter().find(|e| e.starts_with("chat."))
        {
            let message = format!("{chat} is for operators, not approvers");
            return Some(Frame::err(id, code::FORBIDDEN, message));
        }
        let replay = p.since.is_some() || p.consumer.is_some();
        let since = match p.since.as_ref().map(parse_since).transpose() {
            Ok(since) => since,
            Err(message) => return Some(Frame::err(id, code::BAD_REQUEST, message)),
        };
        if let Some(name) = &p.consumer
            && let Err(e) = check_name("consumer", name, &[])
        {
            return Some(Frame::err(id, code::BAD_REQUEST, e.to_string()));
        }
        let inbox = if replay {
            if !p.events.iter().any(|e| e == MESSAGE_EVENT) {
                let message = "since and consumer replay chat.message: list it in events";
                return Some(Frame::err(id, code::BAD_REQUEST, message));
            }
            if self.subscriptions.contains(MESSAGE_EVENT) {
                let message = "this session already receives chat.message; replay on a new session";
                return Some(Frame::err(id, code::BAD_REQUEST, message));
            }
            match self.gateway.chat().inbox() {
                Some(inbox) => Some(inbox.clone()),
                None => {
                    let message = "this gateway keeps no inbox to replay";
                    return Some(Frame::err(id, code::NOT_IMPLEMENTED, message));
                }
            }
        } else {
            None
        };
        let mut all = self.subscriptions.clone();
        all.extend(p.events);
        if all.len() > max {
            let message =
                format!("at most {max} event names per session (gateway.max_subscriptions)");
            return Some(Frame::err(id, code::TOO_LARGE, message));
        }
        self.subscriptions = all;
        if let Some(handoff) = self.hub_handoff.take() {
            let _ = handoff.send(self.gateway.hub().subscribe());
        }
        let mut events: Vec<String> = self.subscriptions.iter().cloned().collect();
        events.sort();
        match inbox {
            Some(inbox) => {
                self.start_replay(myself, inbox, id, events, p.consumer, since);
                None
            }
            None => Some(Frame::ok(id, json!({ "events": events }))),
        }
    }

    /// `chat.ack` and `inbox.stats`: answered off the actor, like `chat.send` (and within
    /// the same bound).
    fn inbox_call(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        method: &str,
        params: Value,
    ) -> Option<Frame> {
        let Some(inbox) = self.gateway.chat().inbox().cloned() else {
            let message = "this gateway keeps no inbox";
            return Some(Frame::err(id, code::NOT_IMPLEMENTED, message));
        };
        let ack = if method == "chat.ack" {
            let p = match serde_json::from_value::<AckParams>(params) {
                Ok(p) => p,
                Err(e) => {
                    let message = format!("bad chat.ack params: {e}");
                    return Some(Frame::err(id, code::BAD_REQUEST, message));
                }
            };
            if let Err(e) = check_name("consumer", &p.consumer, &[]) {
                return Some(Frame::err(id, code::BAD_REQUEST, e.to_string()));
            }
            Some(p)
        } else {
            None
        };
        self.chat_call(myself, id, async move {
            let refused = |e: InboxError| (replay::refusal(&e), e.to_string());
            match ack {
                Some(p) => {
                    let cursor = inbox.ack(&p.consumer, p.cursor).await.map_err(refused)?;
                    Ok(json!({ "consumer": p.consumer, "cursor": cursor }))
                }
                None => Ok(json!(inbox.stats().await.map_err(refused)?)),
            }
        })
    }

    /// The `chat.send` method: the send waits on the homeserver, so it runs off the actor
    /// and is answered by `Reply`; it is the session's (aborted with it) and bounded per
    /// session. Returns an answer only when the send does not start.
    fn chat_send(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        params: Value,
    ) -> Option<Frame> {
        let params = match serde_json::from_value::<SendParams>(params) {
            Ok(params) => params,
            Err(e) => {
                let message = format!("bad chat.send params: {e}");
                return Some(Frame::err(id, code::BAD_REQUEST, message));
            }
        };
        let chat = self.gateway.chat().clone();
        self.chat_call(myself, id, async move {
            let event_id = chat.send(params).await.map_err(wire)?;
            Ok(json!({ "event_id": event_id }))
        })
    }

    /// `chat.react` (→ `{event_id}`), `chat.edit` (→ `{event_id}`) and `chat.typing`
    /// (→ `{}`): checked here, then run off the actor like `chat.send`, counted with those
    /// under `max_pending_invocations`.
    fn chat_act(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        method: &str,
        params: Value,
    ) -> Option<Frame> {
        let action = match ChatAction::parse(method, params) {
            Some(Ok(action)) => action,
            Some(Err(e)) => return Some(Frame::err(id, e.code(), e.message().to_string())),
            None => {
                return Some(Frame::err(
                    id,
                    code::UNKNOWN_METHOD,
                    format!("no method {method:?}"),
                ));
            }
        };
        let chat = self.gateway.chat().clone();
        self.chat_call(myself, id, async move {
            Ok(match chat.act(action).await.map_err(wire)? {
                Some(event_id) => json!({ "event_id": event_id }),
                None => json!({}),
            })
        })
    }

    /// Runs a `chat.*` or inbox call off the actor (it waits on the homeserver or the
    /// inbox's writer) and answers request `id` with its payload or its (code, message); at
    /// most `max_pending_invocations` at once per session, `busy` past that.
    fn chat_call(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: String,
        call: impl Future<Output = Result<Value, (&'static str, String)>> + Send + 'static,
    ) -> Option<Frame> {
        while self.chat_sends.try_join_next().is_some() {}
        let max = self.gateway.settings().max_pending_invocations;
        if self.chat_sends.len() >= max {
            let message = format!(
                "{max} chat calls are already open on this session (gateway.max_pending_invocations)"
            );
            return Some(Frame::err(id, code::BUSY, message));
        }
        let me = myself.clone();
        let answer = async move {
            let frame = match call.await {
                Ok(payload) => Frame::ok(id, payload),
                Err((code, message)) => Frame::err(id, code, message),
            };
            let _ = me.send_message(SessionMsg::Reply(frame));
        };
        self.chat_sends.spawn(answer.instrument(self.span.clone()));
        None
    }

    /// The `tree` method: the kernel's snapshot, taken off the actor's thread, with the
    /// inbox's figures on each account's node.
    async fn tree(&self, id: String) -> Frame {
        let Some(tree) = self.gateway.tree().cloned() else {
            return Frame::err(id, code::INTERNAL, "the tree is not available yet");
        };
        let stats = match self.gateway.chat().inbox() {
            Some(inbox) => inbox.stats().await.ok(),
            None => None,
        };
        let encode = move || {
            let mut tree = serde_json::to_value(tree.snapshot())?;
            if let Some(stats) = stats {
                stats.annotate(&mut tree);
            }
            Ok::<_, serde_json::Error>(tree)
        };
        match tokio::task::spawn_blocking(encode).await {
            Ok(Ok(snapshot)) => Frame::ok(id, snapshot),
            Ok(Err(e)) => Frame::err(id, code::INTERNAL, format!("cannot encode the tree: {e}")),
            Err(e) => Frame::err(id, code::INTERNAL, format!("cannot read the tree: {e}")),
        }
    }

    /// The approvals methods: checks the role and the params and hands the request to the
    /// broker, which answers it (`approvals.request` once the approval is decided).
    fn approvals(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        id: &str,
        method: &str,
        params: Value,
        role: Role,
        account: Option<String>,
    ) -> Result<(), (&'static str, String)> {
        let allowed = match method {
            "approvals.request" => role == Role::Operator,
            "approvals.resolve" | "approvals.notified" => role == Role::Approver,
            _ => role != Role::Node,
        };
        if !allowed {
            let message = format!("{method} is not for {}s", role.as_str());
            return Err((code::FORBIDDEN, message));
        }
        let Some(broker) = self.gateway.approvals() else {
            let message = "approvals are not configured on this gateway".to_string();
            return Err((code::NOT_IMPLEMENTED, message));
        };
        let bad = |e: String| (code::BAD_REQUEST, format!("bad {method} params: {e}"));
        let (port, answer) = oneshot::channel();
        let reply = ReplyTo::new(port.into(), id);
        let msg = match method {
            "approvals.request" => ApprovalsMsg::Request {
                requester: match &self.phase {
                    Phase::Ready(authed) => authed.principal.label(),
                    Phase::Handshake { .. } => String::new(),
                },
                params: ApprovalRequestParams::parse(params).map_err(bad)?,
                reply,
            },
            "approvals.resolve" => ApprovalsMsg::Resolve {
                params: ApprovalResolveParams::parse(params).map_err(bad)?,
                account,
                reply,
            },
            "approvals.notified" => ApprovalsMsg::Notified {
                params: ApprovalNotifiedParams::parse(params).map_err(bad)?,
                account,
                reply,
            },
            _ => ApprovalsMsg::List {
                params: parse_approvals_list(params).map_err(bad)?,
                reply,
            },
        };
        broker
            .send(msg)
            .map_err(|e| (code::INTERNAL, e.to_string()))?;
        self.await_broker(myself, answer);
        Ok(())
    }

    /// Waits off the actor for the broker's answer and hands it to the session as `Reply`.
    /// The wait is the session's: it ends with it, and a broker that stops first answers.
    fn await_broker(&mut self, myself: &ActorRef<SessionMsg>, answer: oneshot::Receiver<Frame>) {
        while self.broker_answers.try_join_next().is_some() {}
        let me = myself.clone();
        let wait = async move {
            if let Ok(frame) = answer.await {
                let _ = me.send_message(SessionMsg::Reply(frame));
            }
        };
        self.broker_answers
            .spawn(wait.instrument(self.span.clone()));
    }
}

/// `since`: a cursor, or `"earliest"`.
fn parse_since(since: &Value) -> Result<Since, String> {
    match since {
        Value::String(s) if s == "earliest" => Ok(Since::Earliest),
        Value::Number(n) if n.as_u64().is_some() => Ok(Since::After(n.as_u64().unwrap_or(0))),
        other => Err(format!(
            "since must be a cursor (a whole number ≥ 0) or \"earliest\", not {other}"
        )),
    }
}

/// The answer to request `id` when it could not be handed on; none when it was.
fn refusal(id: String, handed: Result<(), (&'static str, String)>) -> Option<Frame> {
    handed
        .err()
        .map(|(code, message)| Frame::err(id, code, message))
}

/// A chat error as the wire has it: its code and message.
fn wire(e: ChatError) -> (&'static str, String) {
    (e.code(), e.message().to_string())
}
