//! The approval handler of one Matrix account: a loopback gateway client (role `approver`)
//! that tells the account's approvers about each approval request and turns their answers
//! into `approvals.resolve`.
//!
//! ## Start (in `post_start`)
//! Every start and restart first takes a slot of the `approvals` start-slot pool (first
//! start jittered), holds it for the handshake only — connect, `hello-ok` — and gives it
//! back whether the handshake worked or not. So however many accounts start on the same
//! tick, at most `max_concurrent` handshakes reach the gateway at once. Then it subscribes
//! to `approval.requested` / `approval.notify` / `approval.resolved` and sends the
//! notifications of every pending approval that the broker gave to this account and that
//! were not delivered yet (`approvals.list`, page by page).
//!
//! ## One DM per approver
//! The broker, not the handler, decides who is told through which account: each event and
//! each listing names its notifications (`notify`, `notices`), and a handler sends only
//! its own account's, and drops one the broker hands to another account meanwhile. Each
//! delivery is reported with `approvals.notified {id, approver, room_id, event_id}`, which
//! the broker stores, so a restarted handler never sends a delivered notification again; a
//! report the gateway could not take ends the connection, so that the restart finds it
//! undelivered. A handler killed between the send and the report sends it again with the
//! same Matrix transaction ID, which the homeserver answers with the first event for as
//! long as it keeps the transaction (Synapse: about 30 minutes, same device).
//!
//! ## Messages
//! `Lost` — the connection ended (the pump saw it).
//!
//! ## Supervision
//! `root/channels/matrix/<alias>/approvals`, the second child of its account's
//! `rest_for_one` supervisor (mod.rs), after the account's client: a restart of the client
//! restarts the handler too. It has no child actors. Its state owns the pump task (aborted
//! when the state is dropped, on a stop or a kill), which holds the gateway client, hands
//! each approval request to the [`ApprovalChannel`] (again every few seconds until it is
//! delivered), sends the approvers' decisions as `approvals.resolve`, and reports the end
//! of the connection as `Lost`. The handler is ready once subscribed.
//!
//! ## Restart policy
//! Kind `approval_handler`: 1 s → 60 s, ×2, jitter 20 %, unlimited, a named WARN after 5
//! failures in a row. There is no reconnect loop here: a lost connection, a failed
//! handshake, no start slot, or a failed `subscribe` / `approvals.list` fails the
//! incarnation as transient (a gateway's retry hint raises the delay), and the
//! supervisor's restart is the retry. A token the gateway refuses (`unauthorized`, close
//! 1008) is fatal: the handler is parked.
//!
//! ## The Matrix side
//! An [`ApprovalChannel`] carries requests out to the approvers and their decisions back.
//! For a Matrix account it is the account itself (client.rs): a direct message to each
//! approver, and `approve <id>` / `deny <id>` messages, replies (`approve` / `deny`) to the
//! request message, or ✅ / ❌ reactions on it, from listed approvers. Each decision goes
//! to the broker with its room and events; the broker takes it only where the approver
//! was asked. The benchmark runs handlers with [`NoChannel`], against the gateway alone.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, warn};

use crate::gateway::client::{CallError, ConnectError, ConnectOptions, GatewayClient, Incoming};
use crate::gateway::protocol::{ClientInfo, NoticeTarget, Role, close, code};
use crate::supervision::{ChildContext, ChildSpec, Failure, Policy, Probe, Restart, SlotClient};
use crate::task::{self, AbortOnDrop};

/// The kind of the handler child, for policies and metrics.
pub const KIND: &str = "approval_handler";

/// The handler's built-in policy: a named warning after 5 failures in a row, otherwise
/// [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy {
    warn_after: 5,
    ..Policy::DEFAULT
};
/// The start-slot pool every handler start passes.
pub const POOL: &str = "approvals";

/// How often notifications that could not be delivered are tried again.
const NOTIFY_RETRY: Duration = Duration::from_secs(5);

/// Where the gateway is.
#[derive(Debug, Clone)]
pub enum GatewayAddr {
    /// A fixed `ws://host:port/ws`.
    Url(String),
    /// The address the local listener bound (known once it has; a wildcard address is
    /// reached on loopback).
    Bound(watch::Receiver<Option<SocketAddr>>),
}

impl GatewayAddr {
    async fn url(&self) -> Result<String, Failure> {
        match self {
            GatewayAddr::Url(url) => Ok(url.clone()),
            GatewayAddr::Bound(bound) => {
                let mut bound = bound.clone();
                let addr = *bound
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| Failure::transient("the gateway listener is gone"))?;
                let Some(mut addr) = addr else {
                    return Err(Failure::transient("the gateway listener is not bound"));
                };
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    });
                }
                Ok(format!("ws://{addr}/ws"))
            }
        }
    }
}

/// How a handler reaches its gateway. `Debug` masks the credential.
#[derive(Clone)]
pub struct HandlerConfig {
    /// The account alias it serves (`account` of its `connect`).
    pub alias: String,
    /// The local gateway.
    pub gateway: GatewayAddr,
    /// The handler's in-memory credential ([`crate::gateway::GatewayState::add_approver`]).
    pub token: String,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for HandlerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerConfig")
            .field("alias", &self.alias)
            .field("gateway", &self.gateway)
            .field("token", &"****")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// An approval request, as `approval.requested` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApprovalRequest {
    /// Its 8-character id.
    pub id: String,
    /// The node to run on.
    pub node: String,
    /// The command.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Value,
    /// Why, in the requester's words.
    #[serde(default)]
    pub reason: String,
    /// When it is denied for want of a decision (ms since the epoch).
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// Whom to notify through which account (events only).
    #[serde(default)]
    pub notify: Vec<NoticeTarget>,
}

/// An approver's decision, as seen in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The approval's id, when the approver wrote it.
    pub id: Option<String>,
    /// Approve (true) or deny.
    pub approve: bool,
    /// The approver's Matrix ID.
    pub by: String,
    /// The room it was made in.
    pub room_id: String,
    /// Its own event (the message or the reaction).
    pub event_id: String,
    /// The event it reacts or replies to.
    pub relates_to: Option<String>,
}

/// Where a notification was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The room (the direct message with the approver).
    pub room_id: String,
    /// The message.
    pub event_id: String,
}

/// A boxed notification future: per approver, where the message went or why it did not.
pub type NotifyFuture =
    Pin<Box<dyn Future<Output = Vec<(String, Result<Delivered, String>)>> + Send>>;

/// Where requests go out to approvers, and decisions come back from.
pub trait ApprovalChannel: Send + Sync {
    /// Tells `approvers` about `request`; an error says why one was not told (tried again
    /// later).
    fn notify(&self, request: ApprovalRequest, approvers: Vec<String>) -> NotifyFuture;
    /// Sends decisions to this incarnation of the handler from now on.
    fn attach(&self, decisions: mpsc::UnboundedSender<Decision>);
}

/// A channel with no approvers on the other end (benchmarks): requests go nowhere, and
/// nothing is reported delivered.
#[derive(Debug, Default)]
pub struct NoChannel;

impl ApprovalChannel for NoChannel {
    fn notify(&self, _: ApprovalRequest, _: Vec<String>) -> NotifyFuture {
        Box::pin(async { Vec::new() })
    }

    fn attach(&self, _: mpsc::UnboundedSender<Decision>) {}
}

/// The handler child's spec (id `approvals`).
pub fn spec(
    config: HandlerConfig,
    channel: Arc<dyn ApprovalChannel>,
    slots: SlotClient,
    policy: Policy,
) -> ChildSpec {
    let label = format!("approval handler for {}", config.alias);
    ChildSpec::new(
        "approvals",
        KIND,
        Restart::Permanent,
        move |ctx: ChildContext| {
            let args = HandlerArgs {
                config: config.clone(),
                channel: channel.clone(),
                slots: slots.clone(),
                probe: ctx.probe.clone(),
                first_start: ctx.is_first_start(),
                path: ctx.path.clone(),
                span: ctx.span(),
            };
            async move {
                let (actor, _) =
                    Actor::spawn_linked(None, HandlerActor, args, ctx.supervisor.clone()).await?;
                Ok::<ActorCell, SpawnErr>(actor.get_cell())
            }
        },
    )
    .with_policy(policy)
    .with_label(label)
    .reports_readiness()
}

/// Messages of [`HandlerActor`].
#[derive(Debug)]
pub enum HandlerMsg {
    /// The connection ended.
    Lost(String),
}

/// The handler actor.
pub struct HandlerActor;

/// One incarnation's arguments.
pub struct HandlerArgs {
    config: HandlerConfig,
    channel: Arc<dyn ApprovalChannel>,
    slots: SlotClient,
    probe: Probe,
    first_start: bool,
    path: String,
    span: tracing::Span,
}

/// A connected handler.
pub struct HandlerState {
    args: HandlerArgs,
    /// Reads the gateway and carries decisions; ends with the state (a kill included).
    pump: Option<AbortOnDrop>,
}

impl Actor for HandlerActor {
    type Msg = HandlerMsg;
    type State = HandlerState;
    type Arguments = HandlerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<HandlerMsg>,
        args: HandlerArgs,
    ) -> Result<HandlerState, ActorProcessingErr> {
        Ok(HandlerState { args, pump: None })
    }

    async fn post_start(
        &self,
        myself: ActorRef<HandlerMsg>,
        state: &mut HandlerState,
    ) -> Result<(), ActorProcessingErr> {
        let args = &state.args;
        let span = args.span.clone();
        let mut client = connect(args).instrument(span.clone()).await?;
        let events =
            json!({ "events": ["approval.requested", "approval.notify", "approval.resolved"] });
        client
            .call("subscribe", events)
            .await
            .map_err(|e| Failure::transient(format!("subscribe failed: {e}")))?;
        let pending = list_pending(&mut client, &args.config.alias)
            .await
            .map_err(|e| Failure::transient(format!("approvals.list failed: {e}")))?;
        let (decisions, decided) = mpsc::unbounded_channel();
        args.channel.attach(decisions);
        args.probe.beat();
        args.probe.set_ready(true);
        let pump = Pump {
            client,
            actor: myself.clone(),
            channel: args.channel.clone(),
            probe: args.probe.clone(),
            decided,
            unsent: pending,
            alias: args.config.alias.clone(),
        };
        span.in_scope(|| info!(account = %args.config.alias, pending = pump.unsent.len(), "Approval handler connected."));
        // A pump that returns has reported `Lost` itself; one that panics has not.
        let report = move |ended: task::Ended| {
            if ended.panicked() {
                let _ = myself.send_message(HandlerMsg::Lost(ended.to_string()));
            }
        };
        state.pump = Some(task::spawn("pump", span, pump.run(), report));
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<HandlerMsg>,
        msg: HandlerMsg,
        state: &mut HandlerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HandlerMsg::Lost(cause) => {
                state.args.probe.set_ready(false);
                Err(Box::new(Failure::transient(format!(
                    "connection lost: {cause}"
                ))))
            }
        }
    }
}

/// Takes a start slot, handshakes, gives the slot back.
async fn connect(args: &HandlerArgs) -> Result<GatewayClient, Failure> {
    let config = &args.config;
    let url = config.gateway.url().await?;
    let slot = args
        .slots
        .acquire(POOL, &args.path, args.first_start)
        .await
        .map_err(|e| Failure::transient(format!("no start slot: {e}")))?;
    let mut options = ConnectOptions::new(
        Role::Approver,
        config.token.clone(),
        ClientInfo {
            name: "warden-approvals".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    );
    options.account = Some(config.alias.clone());
    options.handshake_timeout = config.handshake_timeout;
    let connected = GatewayClient::connect(&url, options).await;
    slot.release();
    match connected {
        Ok((client, _hello)) => Ok(client),
        Err(err) => Err(classify(&err)),
    }
}

fn classify(err: &ConnectError) -> Failure {
    let refused = match err {
        ConnectError::Rejected { code: c, .. } => c == code::UNAUTHORIZED,
        ConnectError::Closed { code: c, .. } => *c == close::POLICY,
        _ => false,
    };
    if refused {
        return Failure::fatal(format!(
            "the gateway refused the approval handler: {err}; check gateway.token"
        ));
    }
    let failure = Failure::transient(err.to_string());
    match err.retry_after() {
        Some(delay) => failure.retry_after(delay),
        None => failure,
    }
}

/// Entries per `approvals.list` page the handler asks for (the most the gateway gives).
const LIST_PAGE: usize = 200;

/// Every approval still pending with notifications of `alias` not delivered yet, read
/// page by page from `approvals.list` (open approvals come first, so the pages stop where
/// the resolved ones begin).
async fn list_pending(client: &mut GatewayClient, alias: &str) -> Result<Vec<Unsent>, CallError> {
    let mut pending = Vec::new();
    let mut params = json!({ "limit": LIST_PAGE });
    loop {
        let page = client.call("approvals.list", params).await?;
        pending.extend(pending_requests(&page, alias));
        let resolved_reached = page["approvals"]
            .as_array()
            .and_then(|a| a.last())
            .is_some_and(|a| a["resolved"] == true);
        match page.get("next").and_then(Value::as_str) {
            Some(next) if !resolved_reached => {
                params = json!({ "limit": LIST_PAGE, "cursor": next });
            }
            _ => return Ok(pending),
        }
    }
}

/// A request and the approvers this account has yet to tell about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unsent {
    request: ApprovalRequest,
    approvers: Vec<String>,
}

/// The pending requests of an `approvals.list` answer with current, undelivered notices
/// through `alias`.
fn pending_requests(list: &Value, alias: &str) -> Vec<Unsent> {
    let Some(items) = list["approvals"].as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .filter(|a| a["resolved"] != true && a.get("decision").is_none_or(Value::is_null))
        .filter_map(|a| {
            let request: ApprovalRequest = serde_json::from_value(a.clone()).ok()?;
            let approvers: Vec<String> = a["notices"]
                .as_array()?
                .iter()
                .filter(|n| n["account"] == alias && n["active"] == true)
                .filter(|n| n.get("event_id").is_none_or(Value::is_null))
                .filter_map(|n| n["approver"].as_str().map(str::to_string))
                .collect();
            (!approvers.is_empty()).then_some(Unsent { request, approvers })
        })
        .collect()
}

/// The approvers of an `approval.requested` / `approval.notify` event this account tells.
fn addressed_to(request: ApprovalRequest, alias: &str) -> Option<Unsent> {
    let approvers: Vec<String> = request
        .notify
        .iter()
        .filter(|t| t.account == alias)
        .map(|t| t.approver.clone())
        .collect();
    (!approvers.is_empty()).then_some(Unsent { request, approvers })
}

/// Reads the connection, sends notifications, forwards decisions.
struct Pump {
    client: GatewayClient,
    actor: ActorRef<HandlerMsg>,
    channel: Arc<dyn ApprovalChannel>,
    probe: Probe,
    decided: mpsc::UnboundedReceiver<Decision>,
    /// Requests whose approvers have not been told yet.
    unsent: Vec<Unsent>,
    alias: String,
}

impl Pump {
    async fn run(mut self) {
        let mut resolved = HashSet::new();
        let mut retry = tokio::time::interval(NOTIFY_RETRY);
        loop {
            tokio::select! {
                biased;
                Some(decision) = self.decided.recv() => self.resolve(decision).await,
                // Events before the retry: a hand-over to another account is seen before a
                // stale notice is tried again.
                incoming = self.client.next_event() => match incoming {
                    Ok(Incoming::Event { event, payload }) => {
                        self.probe.beat();
                        match event.as_str() {
                            "approval.requested" | "approval.notify" => {
                                match serde_json::from_value::<ApprovalRequest>(payload) {
                                    Ok(request) => {
                                        if self.queue(request) && !self.notify_unsent(&resolved).await {
                                            return;
                                        }
                                    }
                                    Err(e) => warn!(error = %e, event = %event, "Ignoring a malformed approval event."),
                                }
                            }
                            "approval.resolved" => {
                                if let Some(id) = payload["id"].as_str() {
                                    resolved.insert(id.to_string());
                                    self.unsent.retain(|u| u.request.id != id);
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(Incoming::Request { id, method, .. }) => {
                        let reply = Err(crate::gateway::protocol::ErrorBody {
                            code: code::UNKNOWN_METHOD.to_string(),
                            message: format!("an approval handler answers no {method:?}"),
                        });
                        let _ = self.client.respond(&id, reply).await;
                    }
                    Err(e) => {
                        let _ = self.actor.send_message(HandlerMsg::Lost(e.to_string()));
                        return;
                    }
                },
                _ = retry.tick() => {
                    if !self.notify_unsent(&resolved).await {
                        return;
                    }
                }
            }
        }
    }

    /// Adds the approvers `request.notify` gives this account to the unsent ones (one
    /// entry per approval, each approver once), and drops those it now gives to another
    /// account (a hand-over: this account's notice was superseded). Whether any was added.
    fn queue(&mut self, request: ApprovalRequest) -> bool {
        let elsewhere: Vec<String> = request
            .notify
            .iter()
            .filter(|t| t.account != self.alias)
            .map(|t| t.approver.to_lowercase())
            .collect();
        for unsent in self
            .unsent
            .iter_mut()
            .filter(|u| u.request.id == request.id)
        {
            unsent
                .approvers
                .retain(|a| !elsewhere.contains(&a.to_lowercase()));
        }
        self.unsent.retain(|u| !u.approvers.is_empty());
        let Some(new) = addressed_to(request, &self.alias) else {
            return false;
        };
        match self
            .unsent
            .iter_mut()
            .find(|u| u.request.id == new.request.id)
        {
            Some(unsent) => {
                for approver in new.approvers {
                    if !unsent
                        .approvers
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(&approver))
                    {
                        unsent.approvers.push(approver);
                    }
                }
            }
            None => self.unsent.push(new),
        }
        true
    }

    /// Tries every unsent notification once and reports each delivery to the broker;
    /// keeps the approvers not reached. False when a delivery could not be reported: the
    /// connection is then reported lost, and the restarted handler finds the notification
    /// still undelivered and sends it again (the same Matrix transaction).
    async fn notify_unsent(&mut self, resolved: &HashSet<String>) -> bool {
        let unsent = std::mem::take(&mut self.unsent);
        for Unsent { request, approvers } in unsent {
            if resolved.contains(&request.id) {
                continue;
            }
            let id = request.id.clone();
            let results = self.channel.notify(request.clone(), approvers).await;
            let mut missed = Vec::new();
            for (approver, result) in results {
                match result {
                    Ok(delivered) => {
                        if !self.report(&id, &approver, delivered).await {
                            return false;
                        }
                    }
                    Err(e) => {
                        debug!(id = %id, approver = %approver, error = %e, "Could not notify an approver yet.");
                        missed.push(approver);
                    }
                }
            }
            if !missed.is_empty() {
                self.unsent.push(Unsent {
                    request,
                    approvers: missed,
                });
            }
        }
        true
    }

    /// `approvals.notified`: the broker records the delivery, so that it is never sent
    /// again. False (and `Lost` sent) when the gateway could not take the report.
    async fn report(&mut self, id: &str, approver: &str, delivered: Delivered) -> bool {
        let params = json!({
            "id": id,
            "approver": approver,
            "room_id": delivered.room_id,
            "event_id": delivered.event_id,
        });
        match self.client.call("approvals.notified", params).await {
            Ok(_) => {
                debug!(id, approver, "Approver notified.");
                true
            }
            // Not this account's to send (any more): nothing to record.
            Err(CallError::Failed { code: c, message }) if c == code::FORBIDDEN => {
                debug!(id, approver, error = %message, "The gateway did not take a notification.");
                true
            }
            Err(e) => {
                warn!(id, approver, error = %e, "The gateway did not record a notification; reconnecting.");
                let cause = format!("approvals.notified failed: {e}");
                let _ = self.actor.send_message(HandlerMsg::Lost(cause));
                false
            }
        }
    }

    async fn resolve(&mut self, decision: Decision) {
        let params = json!({
            "id": decision.id,
            "decision": if decision.approve { "approve" } else { "deny" },
            "by": decision.by,
            "room_id": decision.room_id,
            "event_id": decision.event_id,
            "relates_to": decision.relates_to,
        });
        match self.client.call("approvals.resolve", params).await {
            Ok(answer) => {
                info!(account = %self.alias, id = %answer["id"].as_str().unwrap_or_default(),
                by = %decision.by, approve = decision.approve, "Approval decided.")
            }
            Err(CallError::Failed { code: c, message })
                if c == code::FORBIDDEN || c == code::UNKNOWN_APPROVAL =>
            {
                debug!(account = %self.alias, by = %decision.by, room = %decision.room_id,
                    error = %message, "Ignoring a decision: not where the approver was asked.");
            }
            Err(e) => info!(account = %self.alias, id = decision.id.as_deref().unwrap_or_default(),
                by = %decision.by, error = %e, "The decision was not taken."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_sends_only_its_accounts_undelivered_notices() {
        let list = json!({"approvals": [
            {"id": "abcd1234", "node": "n", "command": "uptime", "args": [], "reason": "r",
             "resolved": false, "notices": [
                {"approver": "@a:hs", "account": "nova", "active": true},
                {"approver": "@b:hs", "account": "nova", "active": true,
                 "room_id": "!r:hs", "event_id": "$e"},
                {"approver": "@c:hs", "account": "vega", "active": true},
                {"approver": "@d:hs", "account": "nova", "active": false},
            ]},
            {"id": "efgh5678", "node": "n", "command": "c", "reason": "r", "resolved": false,
             "notices": [{"approver": "@c:hs", "account": "vega", "active": true}]},
            {"id": "ijkl9012", "node": "n", "command": "c", "reason": "r", "resolved": true,
             "decision": "approved", "notices": [{"approver": "@a:hs", "account": "nova", "active": true}]},
            {"id": "bad"},
        ]});
        let got = pending_requests(&list, "nova");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].request.id, "abcd1234");
        assert_eq!(
            got[0].approvers,
            ["@a:hs"],
            "delivered, other accounts' and superseded ones are left out"
        );
        assert_eq!(pending_requests(&list, "vega").len(), 2);

        let event: ApprovalRequest = serde_json::from_value(json!({
            "id": "abcd1234", "node": "n", "command": "uptime", "reason": "r",
            "notify": [{"approver": "@a:hs", "account": "nova"}, {"approver": "@c:hs", "account": "vega"}],
        }))
        .expect("event");
        let mine = addressed_to(event.clone(), "vega").expect("vega's");
        assert_eq!(mine.approvers, ["@c:hs"]);
        assert!(addressed_to(event, "lyra").is_none());
    }
}
