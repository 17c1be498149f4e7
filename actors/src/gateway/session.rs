//! One gateway session: the actor that owns one WebSocket, from the upgrade to the close.
//!
//! On start it sends `connect.challenge {nonce, ts}`. The first text frame must be a `req`
//! `connect` with valid [`ConnectParams`]: protocol 1, the gateway token (compared in
//! constant time; any token when none is configured), for role `node` its name and
//! commands, and for role `approver` the account it serves. Success answers `hello-ok` and
//! releases the socket's pre-auth slot; any refusal answers an error (`unauthorized` for a
//! wrong token, `bad_request` otherwise) and closes with 1008. Anything but `connect` before
//! `hello-ok` — another request, a `res`, an `event` — is a policy failure too: a request
//! gets error `unauthorized` ("connect first"), then the socket is closed with 1008.
//! With a handshake cost set ([`GatewayState::set_handshake_cost`], benchmarks and tests
//! only), handling `connect` first burns that much CPU on the actor's thread.
//!
//! | what | close |
//! |---|---|
//! | no `hello-ok` within `handshake_timeout_ms` | 4408 "handshake timeout" |
//! | a frame over 64 KiB before `hello-ok`, over `max_frame_bytes` after (64 KiB for a socket that did not show its credential on the upgrade) | 1009 |
//! | invalid JSON, not a frame of the protocol, a binary frame, invalid UTF-8 | 1007 |
//! | no client frame (text, ping or pong) for 2 × `tick_interval_ms` | 4000 |
//! | subscribed, and more than [`hub::CAPACITY`](super::hub::CAPACITY) events behind | 4001 |
//! | a newer connection of the same node name | 1008 "replaced by a new connection" |
//! | the program announces a shutdown, or a graceful stop | event `shutdown`, then 1012 / 1001 |
//!
//! A request with an unknown method gets error `unknown_method` and the session goes on.
//! After `hello-ok` the session sends `tick {ts}` and a WebSocket ping every tick interval.
//!
//! Methods: `health` (every role); `subscribe {events}` (operator, approver); `status`,
//! `tree`, `nodes.list`, `nodes.invoke {node, command, args, timeout_ms?}` and `chat.send
//! {account, room_id, body, thread_root?}` → `{event_id}` (operator; others get
//! `forbidden`); `approvals.request {node, command, args?, reason, timeout_s?}` (operator),
//! `approvals.resolve {id, decision, by}` (approver) and `approvals.list` (operator,
//! approver), which the session checks (role, params: `bad_request` naming the field) and
//! hands to the approvals broker ([`super::approvals`]); without approvals configured they
//! answer `not_implemented`. `chat.send` runs off the actor; its answer, and every answer of
//! the broker (that of `approvals.request` once the approval is over), comes back as a
//! `Reply` message.
//! `nodes.invoke` forwards a `req node.invoke {command, args}` to the node's session, which
//! relays the node's `res` back; the operator's session times the call out. The broker
//! runs an approved command through the same path (`dispatch_invoke`, with an
//! [`InvokeReply::Oneshot`](super::invoke::InvokeReply::Oneshot)).
//!
//! ## Messages
//! From the socket, forwarded by the pump task: `Inbound` (a frame), `ReadFailed` (a read
//! error: too big, bad UTF-8, broken), `ReadEnded`; from the hub through the same task:
//! `Event`, `Lagged`; and `Shutdown`, when the program announces one
//! ([`GatewayState::set_shutdown_intent`]). Timers: `HandshakeTimeout`, `Tick`, `IdleCheck`,
//! `LingerOver`. From other sessions: `Replaced` (a newer session took this node's name),
//! `Invoke` (to a node's session, from an operator's session or the broker), `InvokeDone`
//! (back to the operator's session). `InvokeTimedOut` and `InvokeExpired` end a pending
//! invocation on either side. `Reply`: an answer worked out elsewhere (`chat.send`, the
//! approvals broker).
//!
//! ## Supervision
//! A temporary child `conn-<n>` of `root/gateway/sessions`, added by the listener for each
//! upgraded socket. It owns the socket's write half and one task, the pump, which reads the
//! socket and the hub and forwards both as messages; the state aborts the pump and every
//! timer when dropped (also on a kill). Every client frame beats the session's probe; the
//! kernel's `liveness_timeout` (the longer of 2 × tick and the handshake timeout, plus
//! [`LIVENESS_MARGIN`]) is a backstop for a session that stops processing.
//!
//! ## Restart policy
//! `temporary`: never restarted — the client reconnects. `post_stop` (a graceful stop)
//! tells an authenticated client `shutdown {restart, expected_back_ms}` from the gateway's
//! shutdown intent, then closes every socket, handshaking ones too, with 1012 (restart) or
//! 1001 (stop). No socket is left to a generic close.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef, SpawnErr};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tracing::{Instrument, debug, info, warn};

use super::hub::{HubEvent, event};
use super::invoke::{InvokeDone, NodeMsg};
use super::protocol::auth::{Principal, Secret};
use super::protocol::{Frame, MAX_PREAUTH_FRAME_BYTES, close};
use super::registry::Registration;
use super::{GatewayState, PreauthSlot, RoleCount, ShutdownIntent, metrics, now_ms};
use crate::supervision::{ChildContext, ChildSpec, Policy, Probe, Restart};
use crate::task::{self, AbortOnDrop, Timer};

mod handshake;
mod invocations;
mod methods;
mod replay;

pub use replay::ReplayMsg;

use invocations::NodeCalls;

/// The kind of session children, for policies and metrics.
pub const KIND: &str = "gateway_session";

/// A session's built-in policy: it is temporary, so only its stop limit and liveness
/// matter; 2 s to stop, otherwise [`Policy::DEFAULT`]. The listener keeps the liveness
/// backstop of [`spec`] under whatever policy is configured.
pub const DEFAULT_POLICY: Policy = Policy {
    shutdown_timeout: SHUTDOWN_TIMEOUT,
    ..Policy::DEFAULT
};

/// Added to the kernel's liveness timeout of a session, over what the session enforces
/// itself, so that the kernel only ever catches a session that stopped processing.
pub const LIVENESS_MARGIN: Duration = Duration::from_secs(5);

/// How long a write to the socket may take before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The reason of a 4001 close.
pub const SLOW_CONSUMER_REASON: &str = "fell behind the event stream; reconnect and resubscribe";

/// After the server's close frame: how long to wait for the client's.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// In `post_stop`: how long the shutdown notice, the close frame and the client's answer
/// may take together (sessions stop one after the other, so keep it short).
const STOP_LINGER: Duration = Duration::from_millis(500);

/// A session's graceful stop limit; above [`STOP_LINGER`] plus a margin.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// What a session is started with: the socket, moved in once.
pub struct SessionStart {
    /// The upgraded socket.
    pub socket: WebSocket,
    /// The client's address.
    pub peer: SocketAddr,
    /// The socket's number (`conn-<n>`).
    pub conn: u64,
    /// The socket's pre-auth slot, held until `hello-ok`.
    pub preauth: PreauthSlot,
    /// The largest frame its WebSocket layer takes: `max_frame_bytes`, or 64 KiB for a
    /// socket that did not show its credential on the upgrade.
    pub max_frame_bytes: usize,
}

/// The spec of session `id`: temporary, with a liveness backstop. Its start function takes
/// the socket out of `start`; a second start (there is none for a temporary child) fails.
pub fn spec(id: &str, state: &GatewayState, start: Arc<Mutex<Option<SessionStart>>>) -> ChildSpec {
    let settings = state.settings();
    let tick = Duration::from_millis(settings.tick_interval_ms);
    let handshake = Duration::from_millis(settings.handshake_timeout_ms);
    let policy = Policy {
        liveness_timeout: Some((tick * 2).max(handshake) + LIVENESS_MARGIN),
        shutdown_timeout: SHUTDOWN_TIMEOUT,
        ..Policy::default()
    };
    let state = state.clone();
    ChildSpec::new(id, KIND, Restart::Temporary, move |ctx: ChildContext| {
        let taken = start.lock().unwrap_or_else(|e| e.into_inner()).take();
        let state = state.clone();
        async move {
            let Some(start) = taken else {
                return Err(SpawnErr::StartupFailed(
                    "the session's socket was already taken".into(),
                ));
            };
            SessionActor::start(ctx, state, start).await
        }
    })
    .with_policy(policy)
}

/// Messages of [`SessionActor`].
pub enum SessionMsg {
    /// A frame from the client, with its place in the session's inbound window (released
    /// once the frame is handled).
    Inbound(Message, OwnedSemaphorePermit),
    /// Reading the socket failed; nothing more will be read.
    ReadFailed(ReadFailure),
    /// The socket's read half ended (after a close, or the connection dropped).
    ReadEnded,
    /// An event from the hub, holding one of the [`MAX_EVENTS_IN_FLIGHT`] slots until
    /// handled.
    Event(Arc<HubEvent>, OwnedSemaphorePermit),
    /// The session fell this many events behind the hub's [`CAPACITY`](super::hub::CAPACITY)
    /// and lost them: closed with 4001.
    Lagged(u64),
    /// The handshake deadline.
    HandshakeTimeout,
    /// Time to send `tick` and a ping.
    Tick,
    /// Time to check that the client sent a frame within two ticks.
    IdleCheck,
    /// The client did not answer the close frame in time.
    LingerOver,
    /// The program announced a shutdown: tell the client and close now.
    Shutdown(ShutdownIntent),
    /// Credentials were revoked (a config reload): close with 1008 unless this session's
    /// own credential still admits it.
    Revoked,
    /// (To a node's session.) From another session or the broker, through the registry:
    /// an invocation to forward (`Invoke`), or a newer session took the name (`Replaced`).
    Node(NodeMsg),
    /// (To an operator's session.) The node's answer to one of its requests.
    InvokeDone(InvokeDone),
    /// (Operator side.) The node did not answer request `id` in time.
    InvokeTimedOut {
        /// The operator's request id.
        id: String,
    },
    /// (Node side.) Forget the invocation sent as request `id`.
    InvokeExpired {
        /// The gateway's request id towards the node.
        id: String,
    },
    /// A reply worked out off the actor (`chat.send`) or by the approvals broker, to send as
    /// it is.
    Reply(Frame),
    /// A replay step (`subscribe` with `since` or `consumer`), read off the actor.
    Replay(ReplayMsg),
}

impl From<NodeMsg> for SessionMsg {
    fn from(msg: NodeMsg) -> Self {
        SessionMsg::Node(msg)
    }
}

impl TryFrom<SessionMsg> for NodeMsg {
    type Error = SessionMsg;

    fn try_from(msg: SessionMsg) -> Result<Self, SessionMsg> {
        match msg {
            SessionMsg::Node(msg) => Ok(msg),
            other => Err(other),
        }
    }
}

impl From<InvokeDone> for SessionMsg {
    fn from(done: InvokeDone) -> Self {
        SessionMsg::InvokeDone(done)
    }
}

impl TryFrom<SessionMsg> for InvokeDone {
    type Error = SessionMsg;

    fn try_from(msg: SessionMsg) -> Result<Self, SessionMsg> {
        match msg {
            SessionMsg::InvokeDone(done) => Ok(done),
            other => Err(other),
        }
    }
}

/// Why reading a socket failed.
#[derive(Debug)]
pub enum ReadFailure {
    /// A frame or message over the size limit.
    TooBig,
    /// A text frame that is not UTF-8.
    BadUtf8,
    /// The connection broke.
    Broken(String),
}

impl ReadFailure {
    fn classify(err: axum::Error) -> Self {
        match err.into_inner().downcast::<tungstenite::Error>() {
            Ok(e) => match *e {
                tungstenite::Error::Capacity(_) => Self::TooBig,
                tungstenite::Error::Utf8(_) => Self::BadUtf8,
                other => Self::Broken(other.to_string()),
            },
            Err(other) => Self::Broken(other.to_string()),
        }
    }
}

/// The session actor.
pub struct SessionActor;

/// One socket's arguments.
pub struct SessionArgs {
    gateway: GatewayState,
    start: SessionStart,
    probe: Probe,
    span: tracing::Span,
}

impl SessionActor {
    /// Spawns a session linked to the context's supervisor (for the start function).
    async fn start(
        ctx: ChildContext,
        gateway: GatewayState,
        start: SessionStart,
    ) -> Result<ractor::ActorCell, SpawnErr> {
        let args = SessionArgs {
            gateway,
            start,
            probe: ctx.probe.clone(),
            span: ctx.span(),
        };
        let (actor, _) =
            Actor::spawn_linked(None, SessionActor, args, ctx.supervisor.clone()).await?;
        Ok(actor.get_cell())
    }
}

/// Where a session is in its life.
enum Phase {
    /// Before `hello-ok`: holds the pre-auth slot.
    Handshake { _preauth: PreauthSlot },
    /// After `hello-ok`.
    Ready(Authed),
}

/// An authenticated client.
struct Authed {
    /// Who it is, as the server decided from its credential.
    principal: Principal,
    /// The credential it authenticated with, to tell whether a reload revoked it.
    secret: Secret,
    /// The client program's name, for logs.
    client: String,
    /// Counts this session by role until dropped.
    _count: RoleCount,
    /// For a node: its registration, dropped (unregistered) with the state.
    node: Option<Registration>,
}

/// What a session knows while it runs.
pub struct SessionState {
    gateway: GatewayState,
    /// The socket's number (`conn-<n>`), which identifies its node registration.
    conn: u64,
    /// Largest frame after `hello-ok` (see [`SessionStart::max_frame_bytes`]).
    max_frame_bytes: usize,
    peer: SocketAddr,
    probe: Probe,
    /// `actor` span of this session; wraps every handler and the pump.
    span: tracing::Span,
    /// The socket's write half; only the actor writes.
    sink: SplitSink<WebSocket, Message>,
    /// Reads the socket and the hub; joined (briefly) in `post_stop`, aborted on drop.
    pump: AbortOnDrop,
    phase: Phase,
    /// A close frame was sent or received: no more frames go out.
    closing: bool,
    /// The read half ended with an error (its unread bytes make lingering worthwhile).
    read_failed: bool,
    /// When the client last sent a frame of any kind.
    last_frame: Instant,
    /// Event names this client subscribed to.
    subscriptions: HashSet<String>,
    /// Hands the pump a hub receiver at the first `subscribe`; `None` after that.
    hub_handoff: Option<oneshot::Sender<broadcast::Receiver<Arc<HubEvent>>>>,
    handshake_timer: Option<Timer<SessionMsg>>,
    ticker: Option<AbortOnDrop>,
    idle_timer: Option<Timer<SessionMsg>>,
    linger_timer: Option<Timer<SessionMsg>>,
    /// (Operator side.) Invocations waiting for a node, by the operator's request id; each
    /// holds its timeout timer.
    invokes_out: HashMap<String, Timer<SessionMsg>>,
    /// (Node side.) Invocations sent to this node; answered `node_offline` when dropped.
    to_node: NodeCalls,
    /// `chat.send` calls waiting on the homeserver; aborted when the session ends.
    chat_sends: tokio::task::JoinSet<()>,
    /// Waits for the approvals broker's answers (an `approvals.request` until its approval
    /// is over); aborted when the session ends.
    broker_answers: tokio::task::JoinSet<()>,
    /// Where `chat.message` events come from: live, or a replay then live.
    feed: replay::Feed,
    /// The replay's one read in progress; aborted when the session ends.
    replay_task: Option<AbortOnDrop>,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let SessionArgs {
            gateway,
            start,
            probe,
            span,
        } = args;
        let (sink, stream) = start.socket.split();
        // The hub receiver is handed to the pump only when the client subscribes: a
        // session that never subscribes (every node) is never woken by the hub.
        let (hub_handoff, hub_receiver) = oneshot::channel();
        let session = myself.clone();
        // A pump that returns has reported `ReadEnded` itself; one that panics has not.
        let report = move |ended: task::Ended| {
            if ended.panicked() {
                let failure = ReadFailure::Broken(ended.to_string());
                let _ = session.send_message(SessionMsg::ReadFailed(failure));
            }
        };
        let pump = pump(
            stream,
            hub_receiver,
            gateway.watch_shutdown(),
            gateway.watch_revocations(),
            myself.clone(),
        );
        let pump = task::spawn("pump", span.clone(), pump, report);
        let timeout = Duration::from_millis(gateway.settings().handshake_timeout_ms);
        let handshake_timer = myself.send_after(timeout, || SessionMsg::HandshakeTimeout);
        Ok(SessionState {
            gateway,
            conn: start.conn,
            max_frame_bytes: start.max_frame_bytes,
            peer: start.peer,
            probe,
            span,
            sink,
            pump,
            phase: Phase::Handshake {
                _preauth: start.preauth,
            },
            closing: false,
            read_failed: false,
            last_frame: Instant::now(),
            subscriptions: HashSet::new(),
            hub_handoff: Some(hub_handoff),
            handshake_timer: Some(handshake_timer.into()),
            ticker: None,
            idle_timer: None,
            linger_timer: None,
            invokes_out: HashMap::new(),
            to_node: NodeCalls::new(),
            chat_sends: tokio::task::JoinSet::new(),
            broker_answers: tokio::task::JoinSet::new(),
            feed: replay::Feed::default(),
            replay_task: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        state.challenge(&myself).instrument(span).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        state.on_message(&myself, msg).instrument(span).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        state.on_stop().instrument(span).await;
        Ok(())
    }
}

/// The next hub event, once the pump has a receiver.
async fn next_event(
    events: &mut Option<broadcast::Receiver<Arc<HubEvent>>>,
) -> Result<Arc<HubEvent>, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Longest event name a session may subscribe to (the real ones are a few words).
const MAX_EVENT_NAME: usize = 64;

/// Client frames a session may have waiting in its mailbox before the pump stops reading.
const MAX_INBOUND_IN_FLIGHT: usize = 32;

/// Hub events a session may have waiting in its mailbox before the pump stops taking
/// more; the rest wait in the hub, which closes a session that falls too far behind.
pub const MAX_EVENTS_IN_FLIGHT: usize = 64;

/// Forwards the socket's frames, the hub's events and an announced shutdown to the
/// session, until the socket's read half ends.
async fn pump(
    mut stream: SplitStream<WebSocket>,
    mut hub_receiver: oneshot::Receiver<broadcast::Receiver<Arc<HubEvent>>>,
    mut shutdown: watch::Receiver<Option<ShutdownIntent>>,
    mut revocations: watch::Receiver<u64>,
    session: ActorRef<SessionMsg>,
) {
    let mut events: Option<broadcast::Receiver<Arc<HubEvent>>> = None;
    // At most this many client frames wait in the session's mailbox; past that the pump
    // stops reading and TCP pushes back on the client, so a client flooding large frames
    // cannot grow the gateway's memory.
    let window = Arc::new(Semaphore::new(MAX_INBOUND_IN_FLIGHT));
    // The same for hub events: a session stuck writing to a client that does not read
    // stops taking events, so it falls behind in the hub (which bounds it) rather than
    // in its own mailbox (which would not).
    let event_window = Arc::new(Semaphore::new(MAX_EVENTS_IN_FLIGHT));
    let mut awaiting_hub = true;
    let mut hub_open = true;
    let mut shutdown_open = true;
    let mut revocations_open = true;
    loop {
        // A failed send means the session is stopping; keep reading so its close completes.
        tokio::select! {
            (permit, item) = async {
                let permit = window.clone().acquire_owned().await;
                (permit, stream.next().await)
            } => match item {
                Some(Ok(msg)) => {
                    // The semaphore is never closed, so a permit is always granted.
                    if let Ok(permit) = permit {
                        let _ = session.send_message(SessionMsg::Inbound(msg, permit));
                    }
                }
                Some(Err(e)) => {
                    let _ = session.send_message(SessionMsg::ReadFailed(ReadFailure::classify(e)));
                }
                None => {
                    let _ = session.send_message(SessionMsg::ReadEnded);
                    return;
                }
            },
            handed = &mut hub_receiver, if awaiting_hub => {
                awaiting_hub = false;
                events = handed.ok();
            }
            (permit, ev) = async {
                let permit = event_window.clone().acquire_owned().await;
                (permit, next_event(&mut events).await)
            }, if hub_open && events.is_some() => match ev {
                Ok(ev) => {
                    // The semaphore is never closed, so a permit is always granted.
                    if let Ok(permit) = permit {
                        let _ = session.send_message(SessionMsg::Event(ev, permit));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = session.send_message(SessionMsg::Lagged(n));
                }
                Err(broadcast::error::RecvError::Closed) => hub_open = false,
            },
            changed = shutdown.changed(), if shutdown_open => match changed {
                Ok(()) => {
                    let intent = *shutdown.borrow_and_update();
                    if let Some(intent) = intent {
                        let _ = session.send_message(SessionMsg::Shutdown(intent));
                    }
                }
                Err(_) => shutdown_open = false,
            },
            changed = revocations.changed(), if revocations_open => match changed {
                Ok(()) => {
                    let _ = session.send_message(SessionMsg::Revoked);
                }
                Err(_) => revocations_open = false,
            },
        }
    }
}

impl SessionState {
    /// Every message, by where it comes from: the socket and the hub (through the pump),
    /// timers, the program, other sessions and the broker.
    async fn on_message(&mut self, myself: &ActorRef<SessionMsg>, msg: SessionMsg) {
        match msg {
            SessionMsg::Inbound(frame, _in_flight) => self.on_frame(myself, frame).await,
            SessionMsg::ReadFailed(failure) => self.on_read_failed(myself, failure).await,
            SessionMsg::ReadEnded => self.on_read_ended(myself),
            SessionMsg::Event(ev, _in_flight) => self.on_event(myself, &ev).await,
            SessionMsg::Lagged(n) => self.on_lagged(myself, n).await,
            SessionMsg::HandshakeTimeout => self.handshake_timeout(myself).await,
            SessionMsg::Tick => self.tick(myself).await,
            SessionMsg::IdleCheck => self.idle_check(myself).await,
            SessionMsg::LingerOver => {
                debug!(peer = %self.peer, "The client did not answer the close frame in time.");
                myself.stop(None);
            }
            SessionMsg::Shutdown(intent) => self.on_shutdown(myself, intent).await,
            SessionMsg::Revoked => self.on_revoked(myself).await,
            SessionMsg::Node(NodeMsg::Replaced) => self.on_replaced(myself).await,
            SessionMsg::Node(NodeMsg::Invoke(invoke)) => self.forward_invoke(myself, invoke).await,
            SessionMsg::InvokeDone(done) => self.invoke_done(myself, done).await,
            SessionMsg::InvokeTimedOut { id } => self.invoke_timed_out(myself, id).await,
            SessionMsg::InvokeExpired { id } => self.invoke_expired(&id),
            SessionMsg::Reply(frame) => {
                self.send(myself, &frame).await;
            }
            SessionMsg::Replay(step) => self.on_replay(myself, step).await,
        }
    }

    /// Reading the socket failed: close with 1009 (too big) or 1007 (bad UTF-8), or stop
    /// at once (the connection broke).
    async fn on_read_failed(&mut self, myself: &ActorRef<SessionMsg>, failure: ReadFailure) {
        self.read_failed = true;
        match failure {
            ReadFailure::TooBig => {
                let limit = self.frame_limit();
                debug!(peer = %self.peer, limit, "Frame too big; closing with 1009.");
                self.close(
                    myself,
                    close::TOO_BIG,
                    &format!("frame larger than {limit} bytes"),
                )
                .await;
            }
            ReadFailure::BadUtf8 => {
                self.close(myself, close::INVALID_FRAME, "text frame is not UTF-8")
                    .await;
            }
            ReadFailure::Broken(error) => {
                debug!(peer = %self.peer, error = %error, "Socket broke.");
                self.closing = true;
                myself.stop(Some("socket broke".to_string()));
            }
        }
    }

    /// The read half ended: the client dropped the connection, or the close handshake is
    /// complete.
    fn on_read_ended(&mut self, myself: &ActorRef<SessionMsg>) {
        if !self.closing {
            debug!(peer = %self.peer, "The client dropped the connection without a close frame.");
            self.closing = true;
            myself.stop(Some("connection dropped".to_string()));
        } else if !self.read_failed {
            // The close handshake is complete.
            myself.stop(None);
        }
        // Else: unread bytes may remain; keep the socket until the linger is over,
        // so the client reads the close frame before the connection resets.
    }

    /// A hub event: sent on if the client subscribed to it.
    async fn on_event(&mut self, myself: &ActorRef<SessionMsg>, ev: &HubEvent) {
        if !self.is_ready() || !self.subscriptions.contains(&ev.name) {
            return;
        }
        if ev.name == super::chat::MESSAGE_EVENT {
            self.on_live_message(myself, ev).await;
        } else {
            let text = ev.text.to_string();
            self.write(myself, Message::Text(text.into())).await;
        }
    }

    /// The session lost `dropped` events in the hub: a subscriber is closed with 4001.
    async fn on_lagged(&mut self, myself: &ActorRef<SessionMsg>, dropped: u64) {
        if !self.subscriptions.is_empty() {
            warn!(peer = %self.peer, dropped, capacity = super::hub::CAPACITY,
                "Session fell behind the event stream; closing with 4001.");
            ::metrics::counter!(metrics::SLOW_CONSUMER_CLOSES_TOTAL).increment(1);
            self.close(myself, close::SLOW_CONSUMER, SLOW_CONSUMER_REASON)
                .await;
        }
    }

    /// `tick {ts}` and a ping.
    async fn tick(&mut self, myself: &ActorRef<SessionMsg>) {
        let frame = Frame::event(event::TICK, json!({ "ts": now_ms() }));
        if self.send(myself, &frame).await {
            self.write(myself, Message::Ping(Default::default())).await;
        }
    }

    /// The program announced a shutdown: the notice (to an authenticated client), then
    /// 1012 or 1001.
    async fn on_shutdown(&mut self, myself: &ActorRef<SessionMsg>, intent: ShutdownIntent) {
        if self.is_ready() {
            let notice = Frame::event(event::SHUTDOWN, to_value(&intent.notice()));
            self.send(myself, &notice).await;
        }
        let (code, reason) = intent.close();
        self.close(myself, code, reason).await;
    }

    /// A newer connection took this node's name: close with 1008.
    /// Credentials changed: a session whose own credential no longer admits it as the same
    /// principal closes with 1008. A session still handshaking is checked by `connect`.
    async fn on_revoked(&mut self, myself: &ActorRef<SessionMsg>) {
        let Phase::Ready(authed) = &self.phase else {
            return;
        };
        if self.closing
            || self
                .gateway
                .principals()
                .still_admits(&authed.principal, &authed.secret)
        {
            return;
        }
        info!(peer = %self.peer, principal = %authed.principal.label(),
            "This session's credential was revoked by a config reload; closing it with 1008.");
        self.close(myself, close::POLICY, "credential revoked")
            .await;
    }

    async fn on_replaced(&mut self, myself: &ActorRef<SessionMsg>) {
        info!(peer = %self.peer, node = %self.node_name().unwrap_or_default(),
            "A newer connection took this node's name; closing this one with 1008.");
        self.close(myself, close::POLICY, "replaced by a new connection")
            .await;
    }

    /// One frame from the client.
    async fn on_frame(&mut self, myself: &ActorRef<SessionMsg>, msg: Message) {
        if self.closing {
            return;
        }
        self.probe.beat();
        self.last_frame = Instant::now();
        if let Some(node) = self.registration() {
            node.seen();
        }
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => {
                self.close(
                    myself,
                    close::INVALID_FRAME,
                    "binary frames are not part of the protocol",
                )
                .await;
                return;
            }
            Message::Ping(_) | Message::Pong(_) => return,
            Message::Close(frame) => {
                debug!(peer = %self.peer, code = frame.as_ref().map(|f| f.code), "The client closed the socket.");
                // The WebSocket layer answers the close; the read half then ends.
                self.closing = true;
                return;
            }
        };
        let limit = self.frame_limit();
        if text.len() > limit {
            debug!(peer = %self.peer, limit, "Frame too big; closing with 1009.");
            self.close(
                myself,
                close::TOO_BIG,
                &format!("frame larger than {limit} bytes"),
            )
            .await;
            return;
        }
        if !self.is_ready() {
            self.handshake(myself, text.as_str()).await;
            return;
        }
        let frame = match Frame::parse(text.as_str()) {
            Ok(frame) => frame,
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "Invalid frame; closing with 1007.");
                self.close(myself, close::INVALID_FRAME, "not a frame of the protocol")
                    .await;
                return;
            }
        };
        match frame {
            Frame::Req { id, method, params } => {
                self.request(myself, id, &method, params).await;
            }
            Frame::Res {
                id,
                ok,
                payload,
                error,
            } => {
                self.node_answer(id, ok, payload, error);
            }
            Frame::Event { event, .. } => {
                debug!(peer = %self.peer, event = %event, "Ignoring an event from a client.");
            }
        }
    }

    /// Closes with 4000 after two ticks without a client frame; else checks again when the
    /// two ticks since the last frame are over.
    async fn idle_check(&mut self, myself: &ActorRef<SessionMsg>) {
        let window = Duration::from_millis(self.gateway.settings().tick_interval_ms) * 2;
        let silent = self.last_frame.elapsed();
        if silent >= window {
            let silent_ms = silent.as_millis() as u64;
            info!(peer = %self.peer, silent_ms, "No frame from the client for two ticks; closing with 4000.");
            ::metrics::counter!(metrics::IDLE_CLOSES_TOTAL).increment(1);
            self.close(myself, close::NO_TICK, "no frame for 2 ticks")
                .await;
        } else {
            let next = window - silent;
            self.idle_timer = Some(myself.send_after(next, || SessionMsg::IdleCheck).into());
        }
    }

    /// Sends a close frame, then waits for the client's (or the linger) before stopping.
    async fn close(&mut self, myself: &ActorRef<SessionMsg>, code: u16, reason: &str) {
        if self.closing {
            return;
        }
        let sent = self.write(myself, close_message(code, reason)).await;
        self.closing = true;
        self.stop_timers();
        if sent {
            ::metrics::counter!(metrics::CLOSES_TOTAL, "code" => code.to_string()).increment(1);
            self.linger_timer = Some(
                myself
                    .send_after(CLOSE_LINGER, || SessionMsg::LingerOver)
                    .into(),
            );
        }
    }

    /// Graceful stop: tells the client why and closes the socket, unless it is closed already.
    async fn on_stop(&mut self) {
        self.stop_timers();
        let role = match &self.phase {
            Phase::Ready(a) => Some((a.principal.role(), a.client.clone())),
            Phase::Handshake { .. } => None,
        };
        if !self.closing {
            self.closing = true;
            let intent = self.gateway.shutdown_intent();
            let (code, reason) = intent.close();
            let notice = Frame::event(event::SHUTDOWN, to_value(&intent.notice()));
            let sink = &mut self.sink;
            let pump = &mut self.pump;
            let closed = tokio::time::timeout(STOP_LINGER, async {
                if role.is_some() {
                    sink.send(Message::Text(notice.to_text().into())).await?;
                }
                sink.send(close_message(code, reason)).await?;
                // Let the client answer, so the connection ends cleanly.
                let _ = pump.await;
                Ok::<(), axum::Error>(())
            })
            .await;
            ::metrics::counter!(metrics::CLOSES_TOTAL, "code" => code.to_string()).increment(1);
            debug!(peer = %self.peer, code, answered = matches!(closed, Ok(Ok(()))), "Socket closed on stop.");
        }
        if let Some((role, client)) = role {
            info!(peer = %self.peer, role = role.as_str(), client = %client, "Session ended.");
        }
    }

    fn stop_timers(&mut self) {
        self.handshake_timer = None;
        self.ticker = None;
        self.idle_timer = None;
    }

    /// Sends a frame; false (and the session stopping) if the socket failed.
    async fn send(&mut self, myself: &ActorRef<SessionMsg>, frame: &Frame) -> bool {
        self.write(myself, Message::Text(frame.to_text().into()))
            .await
    }

    /// Writes one message within [`WRITE_TIMEOUT`]; on failure the session stops.
    async fn write(&mut self, myself: &ActorRef<SessionMsg>, msg: Message) -> bool {
        if self.closing {
            return false;
        }
        let error = match tokio::time::timeout(WRITE_TIMEOUT, self.sink.send(msg)).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no progress within {} ms", WRITE_TIMEOUT.as_millis()),
        };
        debug!(peer = %self.peer, error = %error, "Cannot write to the socket; ending the session.");
        self.closing = true;
        myself.stop(Some("socket write failed".to_string()));
        false
    }

    /// Largest frame accepted now: 64 KiB before `hello-ok`, `max_frame_bytes` after.
    fn frame_limit(&self) -> usize {
        match self.phase {
            Phase::Handshake { .. } => MAX_PREAUTH_FRAME_BYTES,
            Phase::Ready(_) => self.max_frame_bytes,
        }
    }

    fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    fn registration(&self) -> Option<&Registration> {
        match &self.phase {
            Phase::Ready(Authed { node: Some(r), .. }) => Some(r),
            _ => None,
        }
    }

    fn node_name(&self) -> Option<String> {
        self.registration().map(|r| r.name().to_string())
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// JSON of a wire type; these serialize infallibly (strings, numbers, JSON values).
fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
