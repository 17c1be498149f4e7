//! The node host's connection to the gateway: connects, handshakes as role `node`,
//! answers `node.invoke`, and fails when the connection is lost.
//!
//! ## Messages
//! `Beat` — a frame arrived (the pump saw it); `Lost` — the connection ended, with the cause
//! and the gateway's `expected_back_ms` if it announced a restart.
//!
//! ## Supervision
//! `root/connection` in node mode (`warden node`), a permanent child of the root. It owns a
//! pump task (aborted with its state) that holds the [`GatewayClient`], reads frames, admits
//! invocations, runs commands concurrently and answers them. The pump owns the runs (a
//! `JoinSet`) and the queue of waiting invocations; when the connection ends it aborts the
//! runs — which kills their process groups — before it reports the loss, and an answer never
//! outlives the connection it was asked on.
//!
//! ## Invocations
//! A `node.invoke` is checked in the pump, in this order, and answered at once when it
//! fails: a declared command (`unknown_command`); arguments that are strings, allowed, and
//! not option-like unless the command says so (`bad_request`, naming the argument); room to
//! run or wait (`busy`, naming the limit); and, for a command announced with `approval =
//! true`, a grant for exactly this node, command and arguments, keyed with the node's own
//! token, unexpired and never used before (`approval_required` without one, `forbidden`
//! naming why otherwise). A grant that passes is spent even if the run then fails; a grant
//! on a command that needs none is ignored. The used grants are remembered in the
//! [`Admission`] shared by every incarnation, so a reconnect does not make a grant new.
//!
//! At most `node.max_concurrent_commands` run at once; further invocations wait in arrival
//! order, at most `node.max_queued_commands` of them. A command's timeout counts from the
//! moment it starts running, not from its arrival: the gateway's own `timeout_ms` bounds
//! how long its caller waits. An invocation that reaches the head of the queue after
//! waiting longer than its command's timeout is answered `busy` and not run, so a queue
//! that drained slowly does not start work whose caller gave up long ago.
//!
//! ## Restart policy
//! Kind `node_connection`: the supervisor's restart *is* the reconnect — there is no retry
//! loop here. Any loss of the connection is a transient failure (500 ms → 30 s, ×2, jitter,
//! unlimited, reset after 30 s connected; the kernel logs a WARN per attempt with its
//! number, delay and cause). After a `shutdown {restart, expected_back_ms}` notice the node
//! does not wait for the hint: for twice that long every attempt is retried within
//! [`HINTED_RETRY`] (100 ms, at a random point of it), so it is back a few dozen ms after
//! the gateway listens again, without the nodes handshaking in step. For a while after losing an established
//! connection — `reconnect_window` plus the hint — failures ask the supervisor to retry
//! within `reconnect_within`, so a gateway that restarts is found again within about that
//! long rather than after a grown backoff. A rejected token (`unauthorized` or close 1008)
//! is fatal: no reconnect can fix it, and `on_fatal` (default `exit`, code 78) applies.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use super::commands::{self, CommandError, CommandSpec};
use crate::gateway::client::{ConnectError, ConnectOptions, GatewayClient, Incoming};
use crate::gateway::protocol::auth::Secret;
use crate::gateway::protocol::grant::{GrantError, UsedGrants};
use crate::gateway::protocol::{
    ClientInfo, CommandInfo, ErrorBody, NodeInfo, NodeInvokeParams, Role, close, code,
};
use crate::supervision::{
    Action, Backoff, ChildContext, ChildSpec, Failure, Jitter, Policy, Probe, Restart,
};
use crate::task::{self, AbortOnDrop};

/// The kind of the connection child, for policies and metrics.
pub const KIND: &str = "node_connection";

/// The connection's built-in policy: 500 ms → 30 s, reset after 30 s connected, unlimited,
/// `exit` (78) on a fatal failure (a rejected token); otherwise [`Policy::DEFAULT`].
pub const DEFAULT_POLICY: Policy = Policy {
    backoff: Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        reset_after: Duration::from_secs(30),
        ..Policy::DEFAULT.backoff
    },
    max_restarts: 0,
    on_fatal: Action::Exit,
    ..Policy::DEFAULT
};

/// How a node connects and what it runs.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// `ws://host:port/ws`.
    pub gateway_url: String,
    /// The gateway token.
    pub token: String,
    /// The name the node announces.
    pub name: String,
    /// Its commands by name.
    pub commands: Arc<BTreeMap<String, CommandSpec>>,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// After losing an established connection, retry fast for this long (plus the
    /// gateway's `expected_back_ms` when it announced a restart).
    pub reconnect_window: Duration,
    /// The retry interval inside that window.
    pub reconnect_within: Duration,
}

/// What the node knows about its connection, for `/healthz` and `max_disconnected_ms`.
/// Shared across incarnations of the connection actor.
#[derive(Debug, Default)]
pub struct NodeStatus(Mutex<StatusInner>);

#[derive(Debug, Default)]
struct StatusInner {
    connected: bool,
    last_connected_at: Option<SystemTime>,
    /// Since when it has been without a connection (from the start, before the first one).
    disconnected_since: Option<Instant>,
    /// Until when failures ask for a fast retry.
    fast_retry_until: Option<Instant>,
    /// Until when failures ask for a retry within [`HINTED_RETRY`]: the time the gateway
    /// said it would be away (`expected_back_ms`), twice over.
    hinted_until: Option<Instant>,
    last_error: Option<String>,
    /// Failed connects and lost connections since the last successful connect.
    consecutive_failures: u32,
}

impl NodeStatus {
    /// A status that counts as disconnected from now.
    pub fn new() -> Self {
        Self(Mutex::new(StatusInner {
            disconnected_since: Some(Instant::now()),
            ..StatusInner::default()
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut StatusInner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether a connection is up.
    pub fn connected(&self) -> bool {
        self.with(|s| s.connected)
    }

    /// How long the node has been without a connection, if it is.
    pub fn disconnected_for(&self) -> Option<Duration> {
        self.with(|s| s.disconnected_since.map(|t| t.elapsed()))
    }

    /// `{connected, last_connected_at, disconnected_ms, consecutive_failures, last_error}` for
    /// `/healthz`.
    pub fn to_json(&self) -> Value {
        self.with(|s| {
            json!({
                "connected": s.connected,
                "last_connected_at": s.last_connected_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                "disconnected_ms": s.disconnected_since.map(|t| t.elapsed().as_millis() as u64),
                "consecutive_failures": s.consecutive_failures,
                "last_error": s.last_error,
            })
        })
    }

    fn up(&self) {
        self.with(|s| {
            s.connected = true;
            s.last_connected_at = Some(SystemTime::now());
            s.disconnected_since = None;
            s.fast_retry_until = None;
            s.last_error = None;
            s.consecutive_failures = 0;
        });
    }

    fn down(&self, cause: &str, fast_for: Option<Duration>) {
        self.with(|s| {
            s.connected = false;
            s.disconnected_since.get_or_insert_with(Instant::now);
            if let Some(window) = fast_for {
                s.fast_retry_until = Some(Instant::now() + window);
            }
            s.last_error = Some(cause.to_string());
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        });
    }

    fn in_fast_window(&self) -> bool {
        self.with(|s| s.fast_retry_until.is_some_and(|t| Instant::now() < t))
    }

    /// Marks the next `window` as the gateway's announced restart (see [`HINTED_RETRY`]).
    fn expect_back_within(&self, window: Duration) {
        self.with(|s| s.hinted_until = Some(Instant::now() + window));
    }

    fn in_hinted_window(&self) -> bool {
        self.with(|s| s.hinted_until.is_some_and(|t| Instant::now() < t))
    }
}

/// While a gateway that announced a restart is due back (twice its `expected_back_ms`), a
/// node retries within this, at a random point of it: about ten attempts a second, spread
/// over the interval so that many nodes do not handshake in step when it listens again.
pub const HINTED_RETRY: Duration = Duration::from_millis(100);

/// A retry cap inside the announced restart: [`HINTED_RETRY`] × (0.2 to 1.0).
fn hinted_retry(jitter: &Jitter) -> Duration {
    HINTED_RETRY.mul_f64(0.2 + 0.8 * jitter.unit())
}

/// Default `node.max_concurrent_commands`.
pub const DEFAULT_MAX_CONCURRENT_COMMANDS: usize = 4;

/// Default `node.max_queued_commands`.
pub const DEFAULT_MAX_QUEUED_COMMANDS: usize = 32;

/// How many used, unexpired approval grants a node remembers to refuse their replay; past
/// that, runs that need approval are answered `busy` until some expire.
pub const MAX_USED_GRANTS: usize = 1024;

/// How a node admits invocations, shared across incarnations of the connection actor: the
/// limits on running and waiting commands, and the approval grants it has used.
#[derive(Debug)]
pub struct Admission {
    /// At most this many commands run at once (at least 1).
    max_running: usize,
    /// At most this many invocations wait for a slot, in arrival order.
    max_queued: usize,
    /// The grants redeemed and not yet expired: a replay is refused, across reconnects.
    used_grants: Mutex<UsedGrants>,
}

impl Admission {
    /// Runs at most `max_running` commands at once (0 counts as 1) and queues at most
    /// `max_queued` more.
    pub fn new(max_running: usize, max_queued: usize) -> Self {
        Self {
            max_running: max_running.max(1),
            max_queued,
            used_grants: Mutex::new(UsedGrants::new(MAX_USED_GRANTS)),
        }
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONCURRENT_COMMANDS, DEFAULT_MAX_QUEUED_COMMANDS)
    }
}

/// The connection child's spec, with the default [`Admission`] (for embedders such as the
/// benchmarks; `warden node` uses [`spec_with_admission`]).
pub fn spec(config: ConnectionConfig, status: Arc<NodeStatus>, policy: Policy) -> ChildSpec {
    spec_with_admission(config, status, Arc::new(Admission::default()), policy)
}

/// The connection child's spec; every incarnation shares `status` and `admission`.
pub fn spec_with_admission(
    config: ConnectionConfig,
    status: Arc<NodeStatus>,
    admission: Arc<Admission>,
    policy: Policy,
) -> ChildSpec {
    ChildSpec::new(
        "connection",
        KIND,
        Restart::Permanent,
        move |ctx: ChildContext| {
            let args = ConnectionArgs {
                config: config.clone(),
                status: status.clone(),
                admission: admission.clone(),
                probe: ctx.probe.clone(),
                jitter: ctx.jitter.clone(),
                span: ctx.span(),
            };
            start(ctx, args)
        },
    )
    .with_policy(policy)
    .reports_readiness()
}

async fn start(ctx: ChildContext, args: ConnectionArgs) -> Result<ActorCell, SpawnErr> {
    let (actor, _) =
        Actor::spawn_linked(None, ConnectionActor, args, ctx.supervisor.clone()).await?;
    Ok(actor.get_cell())
}

/// Messages of [`ConnectionActor`].
#[derive(Debug)]
pub enum ConnectionMsg {
    /// A frame arrived.
    Beat,
    /// The connection ended.
    Lost {
        /// Why.
        cause: String,
        /// The gateway's restart hint, if it announced one.
        expected_back_ms: Option<u64>,
    },
}

/// The connection actor.
pub struct ConnectionActor;

/// One incarnation's arguments.
pub struct ConnectionArgs {
    config: ConnectionConfig,
    status: Arc<NodeStatus>,
    admission: Arc<Admission>,
    probe: Probe,
    jitter: Jitter,
    span: tracing::Span,
}

/// A connected node.
pub struct ConnectionState {
    args: ConnectionArgs,
    /// Reads the connection and runs commands; ends with the state (a kill included).
    pump: Option<AbortOnDrop>,
}

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        _: ActorRef<ConnectionMsg>,
        args: ConnectionArgs,
    ) -> Result<ConnectionState, ActorProcessingErr> {
        Ok(ConnectionState { args, pump: None })
    }

    /// Connects here, in the actor's own task: the supervisor is not held, and the child
    /// counts as running only once it is connected.
    async fn post_start(
        &self,
        myself: ActorRef<ConnectionMsg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        let args = &state.args;
        let config = &args.config;
        let options = ConnectOptions {
            role: Role::Node,
            token: config.token.clone(),
            client: ClientInfo {
                name: "warden-node".to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            node: Some(NodeInfo {
                name: config.name.clone(),
                commands: config
                    .commands
                    .iter()
                    .map(|(name, spec)| CommandInfo {
                        name: name.clone(),
                        approval: spec.approval,
                    })
                    .collect(),
            }),
            account: None,
            handshake_timeout: config.handshake_timeout,
        };
        let client = match GatewayClient::connect(&config.gateway_url, options)
            .instrument(args.span.clone())
            .await
        {
            Ok((client, _hello)) => client,
            Err(err) => {
                let failure = classify(&err, config, &args.status, &args.jitter);
                args.status.down(&failure.reason, None);
                return Err(Box::new(failure));
            }
        };
        args.status.up();
        args.probe.beat();
        args.probe.set_ready(true);
        args.span.in_scope(|| info!(gateway = %config.gateway_url, node = %config.name, "Connected to the gateway."));
        let invoker = Invoker {
            commands: config.commands.clone(),
            node: config.name.clone(),
            key: Secret::new(config.token.clone()),
            admission: args.admission.clone(),
        };
        let actor = myself.clone();
        // A pump that returns has reported `Lost` itself; one that panics has not.
        let report = move |ended: task::Ended| {
            if ended.panicked() {
                let _ = actor.send_message(ConnectionMsg::Lost {
                    cause: ended.to_string(),
                    expected_back_ms: None,
                });
            }
        };
        let pump = pump(client, myself, invoker);
        state.pump = Some(task::spawn("pump", args.span.clone(), pump, report));
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<ConnectionMsg>,
        msg: ConnectionMsg,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        let args = &state.args;
        match msg {
            ConnectionMsg::Beat => {
                args.probe.beat();
                Ok(())
            }
            ConnectionMsg::Lost {
                cause,
                expected_back_ms,
            } => {
                let hint = expected_back_ms.map(Duration::from_millis);
                let window = args.config.reconnect_window + hint.unwrap_or_default();
                args.status.down(&cause, Some(window));
                args.probe.set_ready(false);
                let mut failure = Failure::transient(format!("connection lost: {cause}"))
                    .retry_within(args.config.reconnect_within);
                if let Some(hint) = hint {
                    // The gateway is restarting and said for how long: knock every few
                    // dozen ms (at a random point, so that nodes do not come in step) for
                    // twice that long, to be back as soon as it listens.
                    args.status.expect_back_within(hint * 2);
                    failure = failure.retry_within(hinted_retry(&args.jitter));
                }
                Err(Box::new(failure))
            }
        }
    }
}

/// A connect error as a supervised failure.
fn classify(
    err: &ConnectError,
    config: &ConnectionConfig,
    status: &NodeStatus,
    jitter: &Jitter,
) -> Failure {
    let rejected = match err {
        ConnectError::Rejected { code: c, .. } => c == code::UNAUTHORIZED,
        ConnectError::Closed { code: c, .. } => *c == close::POLICY,
        _ => false,
    };
    if rejected {
        return Failure::fatal(format!(
            "the gateway at {} refused node {:?}: {err}; check node.token",
            config.gateway_url, config.name
        ));
    }
    let mut failure = Failure::transient(err.to_string());
    if status.in_hinted_window() {
        // Refused, reset or 503 while the gateway restarts: it is due any moment.
        return failure.retry_within(hinted_retry(jitter));
    }
    let fast = status.in_fast_window();
    if fast {
        failure = failure.retry_within(config.reconnect_within);
    }
    match err {
        // A 503 means the gateway is up but its pre-auth budget is full; slots free up as
        // handshakes finish, within milliseconds. Its `Retry-After` cannot say less than a
        // second, so inside the fast window the node retries at a random point of its fast
        // interval instead, which also spreads the nodes that were refused together.
        ConnectError::Busy { .. } if fast => {
            failure =
                failure.retry_within(config.reconnect_within.mul_f64(0.2 + 0.8 * jitter.unit()));
        }
        _ => {
            if let Some(hint) = err.retry_after() {
                failure = failure.retry_after(hint);
            }
        }
    }
    failure
}

/// Reads frames, admits invocations, runs them (at most `max_running` at once, the rest
/// in arrival order), answers them; reports the end of the connection to the actor.
async fn pump(mut client: GatewayClient, actor: ActorRef<ConnectionMsg>, invoker: Invoker) {
    let mut running = Runs::new();
    let mut slots = Slots::new(&invoker.admission);
    let cause = 'pump: loop {
        tokio::select! {
            incoming = client.next_event() => match incoming {
                Ok(Incoming::Event { .. }) => {
                    let _ = actor.send_message(ConnectionMsg::Beat);
                }
                Ok(Incoming::Request { id, method, params }) => {
                    let _ = actor.send_message(ConnectionMsg::Beat);
                    let refused = if method != "node.invoke" {
                        fail(code::UNKNOWN_METHOD, format!("a node does not answer {method}"))
                    } else {
                        match invoker.admit(id.clone(), params, slots.has_room(), unix_ms()) {
                            Ok(call) => {
                                if let Some(call) = slots.offer(call) {
                                    spawn_run(&mut running, call);
                                }
                                continue;
                            }
                            Err(refused) => refused,
                        }
                    };
                    if let Err(e) = client.respond(&id, Err(refused)).await {
                        break e.to_string();
                    }
                }
                Err(e) => break e.to_string(),
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                let (next, expired) = slots.finished();
                if let Some(call) = next {
                    spawn_run(&mut running, call);
                }
                let mut answers: Vec<_> = expired
                    .into_iter()
                    .map(|call| {
                        let refused = slots.expired(&call);
                        (call.id, Err(refused))
                    })
                    .collect();
                match done {
                    Ok(answer) => answers.push(answer),
                    Err(e) => warn!(error = %e, "A command run ended without an answer."),
                }
                for (id, answer) in answers {
                    if let Err(e) = client.respond(&id, answer).await {
                        break 'pump e.to_string();
                    }
                }
            }
        }
    };
    warn!(cause = %cause, running = running.len(), queued = slots.waiting.len(),
        "Lost the connection to the gateway.");
    // Their answers could go nowhere: stop the runs (killing their process groups) before
    // the loss is reported and a new connection starts.
    running.shutdown().await;
    let expected_back_ms = client.expected_back_ms();
    let _ = actor.send_message(ConnectionMsg::Lost {
        cause,
        expected_back_ms,
    });
}

/// The pump's runs: each yields its request id and answer.
type Runs = JoinSet<(String, Result<Value, ErrorBody>)>;

/// Starts `call` in `running`, in a span naming it.
fn spawn_run(running: &mut Runs, call: Call) {
    let span = info_span!("node_command", command = %call.command, request = %call.id);
    running.spawn(call.execute().instrument(span));
}

/// An error answer.
fn fail(code: &str, message: String) -> ErrorBody {
    ErrorBody {
        code: code.to_string(),
        message,
    }
}

/// Now, in ms since the Unix epoch: the clock of grant expiries.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What one connection needs to admit a `node.invoke`.
struct Invoker {
    /// The declared commands by name.
    commands: Arc<BTreeMap<String, CommandSpec>>,
    /// The name the node announced: grants are bound to it.
    node: String,
    /// The node's own gateway token: the key its grants are signed with.
    key: Secret,
    /// The limits and the used grants, shared across reconnects.
    admission: Arc<Admission>,
}

impl Invoker {
    /// Checks request `id` (see the module doc for the order); `has_room` says whether
    /// one more invocation may run or wait, and `now_ms` is the grant clock. A grant that
    /// passes is spent here.
    fn admit(
        &self,
        id: String,
        params: Value,
        has_room: bool,
        now_ms: u64,
    ) -> Result<Call, ErrorBody> {
        let params: NodeInvokeParams = serde_json::from_value(params)
            .map_err(|e| fail(code::BAD_REQUEST, format!("bad node.invoke params: {e}")))?;
        let spec = self.commands.get(&params.command).ok_or_else(|| {
            fail(
                code::UNKNOWN_COMMAND,
                format!("this node has no command {:?}", params.command),
            )
        })?;
        let args = string_args(&params.args)?;
        commands::check_args(spec, &args).map_err(|e| fail(code::BAD_REQUEST, e.to_string()))?;
        if !has_room {
            let Admission {
                max_running,
                max_queued,
                ..
            } = *self.admission;
            return Err(fail(
                code::BUSY,
                format!(
                    "node {} already runs {max_running} commands \
                     (node.max_concurrent_commands) with {max_queued} more waiting \
                     (node.max_queued_commands); try again later",
                    self.node
                ),
            ));
        }
        if spec.approval {
            self.redeem(&params, now_ms)?;
        }
        Ok(Call {
            id,
            command: params.command,
            spec: spec.clone(),
            args,
            approval: params.grant.map(|g| g.approval).filter(|_| spec.approval),
            admitted_at: Instant::now(),
        })
    }

    /// Spends the grant of `params`, which must be for exactly this run.
    fn redeem(&self, params: &NodeInvokeParams, now_ms: u64) -> Result<(), ErrorBody> {
        let Some(grant) = &params.grant else {
            return Err(fail(
                code::APPROVAL_REQUIRED,
                GrantError::Missing.to_string(),
            ));
        };
        let redeemed = self
            .admission
            .used_grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .redeem(
                grant,
                &self.key,
                &self.node,
                &params.command,
                &params.args,
                now_ms,
            );
        redeemed.map_err(|e| {
            warn!(command = %params.command, approval = %grant.approval, reason = %e,
                "Refused a command that needs approval: its grant does not admit the run.");
            let code = match e {
                GrantError::Full => code::BUSY,
                _ => code::FORBIDDEN,
            };
            fail(code, e.to_string())
        })
    }
}

/// The caller's arguments: absent, or a list of strings.
fn string_args(args: &Value) -> Result<Vec<String>, ErrorBody> {
    match args {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(fail(
                    code::BAD_REQUEST,
                    format!("arguments must be strings, got {other}"),
                )),
            })
            .collect(),
        other => Err(fail(
            code::BAD_REQUEST,
            format!("args must be a list of strings, got {other}"),
        )),
    }
}

/// An admitted `node.invoke`, running or waiting for a slot.
#[derive(Debug)]
struct Call {
    /// The request to answer.
    id: String,
    /// The command's name.
    command: String,
    /// The command.
    spec: CommandSpec,
    /// The caller's arguments, checked.
    args: Vec<String>,
    /// The approval its grant was issued for, for a command that needs one.
    approval: Option<String>,
    /// When it was admitted.
    admitted_at: Instant,
}

impl Call {
    /// Runs the command; returns the request id and its answer.
    async fn execute(self) -> (String, Result<Value, ErrorBody>) {
        let result = commands::run(&self.spec, &self.args).await;
        let answer = match result {
            Ok(out) => {
                info!(
                    exit_code = out.exit_code,
                    duration_ms = out.duration_ms,
                    approval = self.approval.as_deref(),
                    "Ran a command."
                );
                Ok(json!({
                    "exit_code": out.exit_code,
                    "stdout": out.stdout,
                    "stderr": out.stderr,
                    "truncated": out.truncated,
                    "duration_ms": out.duration_ms,
                }))
            }
            Err(e) => {
                info!(error = %e, approval = self.approval.as_deref(), "A command did not run to its end.");
                let code = match &e {
                    CommandError::Timeout(_) => code::TIMEOUT,
                    e if e.is_bad_request() => code::BAD_REQUEST,
                    _ => code::INTERNAL,
                };
                Err(fail(code, e.to_string()))
            }
        };
        (self.id, answer)
    }
}

/// The pump's slots: at most `max_running` calls run, at most `max_queued` wait, first
/// come first served.
#[derive(Debug)]
struct Slots {
    max_running: usize,
    max_queued: usize,
    /// How many calls run now.
    running: usize,
    /// The calls waiting for a slot, oldest first.
    waiting: VecDeque<Call>,
}

impl Slots {
    fn new(admission: &Admission) -> Self {
        Self {
            max_running: admission.max_running,
            max_queued: admission.max_queued,
            running: 0,
            waiting: VecDeque::new(),
        }
    }

    /// Whether one more call may be admitted, to run now or to wait.
    fn has_room(&self) -> bool {
        self.running < self.max_running || self.waiting.len() < self.max_queued
    }

    /// Takes an admitted call: gives it back when it may start now, keeps it waiting
    /// otherwise. The caller checked [`has_room`](Self::has_room).
    fn offer(&mut self, call: Call) -> Option<Call> {
        if self.running < self.max_running && self.waiting.is_empty() {
            self.running += 1;
            return Some(call);
        }
        self.waiting.push_back(call);
        None
    }

    /// A run ended: the next call to start, if one waits, and the calls before it that
    /// waited longer than their own command's timeout (to be refused, never run).
    fn finished(&mut self) -> (Option<Call>, Vec<Call>) {
        self.running = self.running.saturating_sub(1);
        let mut expired = Vec::new();
        while let Some(call) = self.waiting.pop_front() {
            if call.admitted_at.elapsed() > call.spec.timeout {
                expired.push(call);
                continue;
            }
            self.running += 1;
            return (Some(call), expired);
        }
        (None, expired)
    }

    /// The answer to a call that waited too long.
    fn expired(&self, call: &Call) -> ErrorBody {
        fail(
            code::BUSY,
            format!(
                "waited {} ms for one of the node's {} command slots \
                 (node.max_concurrent_commands), longer than the command's timeout of {} ms; \
                 not run",
                call.admitted_at.elapsed().as_millis(),
                self.max_running,
                call.spec.timeout.as_millis()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::protocol::grant::Grant;
    use crate::supervision::{Decision, Exit, FailureClass, History, decide};

    const TOKEN: &str = "node-token";

    /// An invoker for node `box` with commands `plain` and `guarded` (needs approval),
    /// both taking arguments.
    fn invoker(admission: &Arc<Admission>) -> Invoker {
        let echo = CommandSpec {
            args: true,
            ..CommandSpec::new(["echo"])
        };
        let guarded = CommandSpec {
            approval: true,
            ..echo.clone()
        };
        let commands = BTreeMap::from([
            ("plain".to_string(), echo),
            ("guarded".to_string(), guarded),
        ]);
        Invoker {
            commands: Arc::new(commands),
            node: "box".to_string(),
            key: Secret::new(TOKEN),
            admission: admission.clone(),
        }
    }

    fn params(command: &str, args: &Value, grant: Option<&Grant>) -> Value {
        json!({"command": command, "args": args, "grant": grant})
    }

    /// A call of a command with timeout `timeout_ms`.
    fn call(id: &str, timeout_ms: u64) -> Call {
        Call {
            id: id.to_string(),
            command: "c".to_string(),
            spec: CommandSpec {
                timeout: Duration::from_millis(timeout_ms),
                ..CommandSpec::new(["true"])
            },
            args: Vec::new(),
            approval: None,
            admitted_at: Instant::now(),
        }
    }

    #[tokio::test]
    async fn a_command_that_needs_approval_runs_once_with_a_grant_for_exactly_it() {
        let admission = Arc::new(Admission::default());
        let node = invoker(&admission);
        let now = 1_000_000;
        let args = json!(["/srv"]);
        let key = Secret::new(TOKEN);
        let refusal = |p: Value, room: bool| {
            let err = node.admit("1".into(), p, room, now).expect_err("refused");
            (err.code, err.message)
        };

        let missing = refusal(params("guarded", &args, None), true);
        assert_eq!(
            missing,
            ("approval_required".into(), GrantError::Missing.to_string())
        );
        let other_key = Grant::issue(
            &Secret::new("another"),
            "a1",
            "box",
            "guarded",
            &args,
            now + 60_000,
        );
        let forged = refusal(params("guarded", &args, Some(&other_key)), true);
        assert_eq!(
            forged,
            ("forbidden".into(), GrantError::Invalid.to_string())
        );

        let grant = Grant::issue(&key, "a2", "box", "guarded", &args, now + 60_000);
        let other_args = refusal(params("guarded", &json!(["/etc"]), Some(&grant)), true);
        assert_eq!(
            other_args.0, "forbidden",
            "the grant is bound to its arguments"
        );
        let (code, message) = refusal(params("guarded", &args, Some(&grant)), false);
        assert_eq!(code, "busy");
        assert!(message.contains("node.max_queued_commands"), "{message}");

        // Refused while the node was busy, the grant was not spent.
        let admitted = node
            .admit(
                "2".into(),
                params("guarded", &args, Some(&grant)),
                true,
                now,
            )
            .expect("admitted");
        assert_eq!(
            (admitted.approval.as_deref(), admitted.args.as_slice()),
            (Some("a2"), ["/srv".to_string()].as_slice())
        );
        let replayed = refusal(params("guarded", &args, Some(&grant)), true);
        assert_eq!(
            replayed,
            ("forbidden".into(), GrantError::Replayed.to_string())
        );
        // A new incarnation of the connection shares the used grants.
        let reconnected = invoker(&admission);
        let err = reconnected
            .admit(
                "3".into(),
                params("guarded", &args, Some(&grant)),
                true,
                now,
            )
            .expect_err("still a replay");
        assert_eq!(err.message, GrantError::Replayed.to_string());

        let stale = Grant::issue(&key, "a3", "box", "guarded", &args, now);
        let expired = refusal(params("guarded", &args, Some(&stale)), true);
        assert_eq!(
            expired,
            ("forbidden".into(), GrantError::Expired.to_string())
        );

        // A grant on a command that needs none is ignored, even a forged one.
        let plain = node
            .admit(
                "4".into(),
                params("plain", &args, Some(&other_key)),
                true,
                now,
            )
            .expect("admitted");
        assert_eq!(plain.approval, None);
    }

    #[tokio::test]
    async fn arguments_are_checked_before_room_and_grants() {
        let node = invoker(&Arc::new(Admission::default()));
        let refusal = |p: Value| {
            let err = node.admit("1".into(), p, false, 0).expect_err("refused");
            (err.code, err.message)
        };
        let (code, message) = refusal(params("guarded", &json!(["-rf"]), None));
        assert_eq!(code, "bad_request");
        assert!(message.contains("\"-rf\""), "{message}");
        assert_eq!(refusal(params("plain", &json!([1]), None)).0, "bad_request");
        assert_eq!(
            refusal(params("rm", &Value::Null, None)).0,
            "unknown_command"
        );
    }

    #[tokio::test]
    async fn four_run_the_fifth_waits_for_one_of_them_and_the_queue_is_bounded() {
        let mut slots = Slots::new(&Admission::new(4, 2));
        for id in ["1", "2", "3", "4"] {
            assert!(slots.has_room());
            assert_eq!(
                slots.offer(call(id, 1000)).map(|c| c.id),
                Some(id.to_string())
            );
        }
        assert!(slots.offer(call("5", 1000)).is_none(), "the fifth waits");
        assert!(slots.offer(call("6", 1000)).is_none(), "so does the sixth");
        assert!(
            !slots.has_room(),
            "four running and two waiting: the next is refused"
        );

        let (next, expired) = slots.finished();
        assert_eq!(
            next.map(|c| c.id).as_deref(),
            Some("5"),
            "first come, first served"
        );
        assert!(expired.is_empty());
        assert!(slots.has_room());
        let (next, _) = slots.finished();
        assert_eq!(next.map(|c| c.id).as_deref(), Some("6"));
        let (next, _) = slots.finished();
        assert!(next.is_none());
        assert_eq!(slots.running, 3);
        assert_eq!(
            slots.offer(call("7", 1000)).map(|c| c.id).as_deref(),
            Some("7")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waited_longer_than_its_timeout_is_refused_not_run() {
        let mut slots = Slots::new(&Admission::new(1, 3));
        assert!(slots.offer(call("running", 60_000)).is_some());
        assert!(slots.offer(call("short", 1000)).is_none());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(slots.offer(call("long", 10_000)).is_none());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(slots.offer(call("edge", 0)).is_none());

        // At 1000 ms `short` has waited exactly its timeout: it still runs.
        let (next, expired) = slots.finished();
        assert_eq!(next.map(|c| c.id).as_deref(), Some("short"));
        assert!(expired.is_empty());

        tokio::time::advance(Duration::from_millis(1)).await;
        let (next, expired) = slots.finished();
        assert_eq!(next.map(|c| c.id).as_deref(), Some("long"));
        assert_eq!(expired.len(), 0, "`long` waited 501 ms of its 10 s");

        let (next, expired) = slots.finished();
        assert!(next.is_none());
        let ids: Vec<&str> = expired.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["edge"], "`edge` waited 1 ms, over its 0 ms");
        let refusal = slots.expired(&expired[0]);
        assert_eq!(refusal.code, "busy");
        assert!(
            refusal
                .message
                .starts_with("waited 1 ms for one of the node's 1 command slots"),
            "{}",
            refusal.message
        );
        assert_eq!(slots.running, 0);
    }

    // ---- the retry-within window, on the paused clock ----

    /// The jitter draw of these tests: with `node_connection`'s jitter of 0.2, every
    /// jittered delay is 90 % of its cap, and the restart hint is stretched by 10 %.
    const UNIT: f64 = 0.5;

    /// The connection's arguments: the default `reconnect_window_ms` (10 s) and
    /// `reconnect_within_ms` (500 ms), a gateway that is never dialled here.
    fn connection_args(status: &Arc<NodeStatus>, jitter: &Jitter) -> ConnectionArgs {
        ConnectionArgs {
            config: ConnectionConfig {
                gateway_url: "ws://127.0.0.1:9/ws".to_string(),
                token: TOKEN.to_string(),
                name: "box".to_string(),
                commands: Arc::default(),
                handshake_timeout: Duration::from_secs(10),
                reconnect_window: Duration::from_secs(10),
                reconnect_within: Duration::from_millis(500),
            },
            status: status.clone(),
            admission: Arc::default(),
            probe: Probe::new(Instant::now()),
            jitter: jitter.clone(),
            span: tracing::Span::none(),
        }
    }

    /// Stands in for the connection actor where its handlers want their own reference.
    struct StandIn;

    impl Actor for StandIn {
        type Msg = ConnectionMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _: ActorRef<ConnectionMsg>,
            _: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    /// A connection that is up, as `post_start` leaves it, with the reference its
    /// handlers get.
    async fn connected(
        status: &Arc<NodeStatus>,
        jitter: &Jitter,
    ) -> (ConnectionState, ActorRef<ConnectionMsg>) {
        let (myself, _) = Actor::spawn(None, StandIn, ()).await.expect("a stand-in");
        let state = ConnectionActor
            .pre_start(myself.clone(), connection_args(status, jitter))
            .await
            .expect("the connection's state");
        status.up();
        (state, myself)
    }

    /// The supervisor's delay before the next attempt after `failure`, decided now for an
    /// incarnation that ran for `ran_for`.
    fn next_delay(failure: &Failure, ran_for: Duration, history: &mut History) -> Duration {
        let exit = Exit::Failed(failure.clone());
        // `node_connection`'s built-in policy: 500 ms → 30 s, ×2, jitter 0.2, reset after a
        // 30 s connection, unlimited.
        let policy = DEFAULT_POLICY;
        let now = Instant::now();
        match decide(
            &exit,
            Restart::Permanent,
            &policy,
            history,
            ran_for,
            now,
            UNIT,
        ) {
            Decision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    /// A reconnect that finds nobody listening.
    fn refused() -> ConnectError {
        ConnectError::Refused(std::io::ErrorKind::ConnectionRefused)
    }

    /// A connection up for a minute (a healthy run: the backoff starts over), then lost
    /// with `cause` and the restart hint `expected_back_ms`: the status, the connection's
    /// config, when it was lost and the failure the incarnation ended with.
    async fn lost_after_a_minute(
        cause: &str,
        expected_back_ms: Option<u64>,
    ) -> (Arc<NodeStatus>, ConnectionConfig, Instant, Failure) {
        let status = Arc::new(NodeStatus::new());
        let jitter = Jitter::fixed(UNIT);
        let (mut state, myself) = connected(&status, &jitter).await;
        let config = connection_args(&status, &jitter).config;
        tokio::time::advance(Duration::from_secs(60)).await;
        let lost_at = Instant::now();
        let lost = ConnectionMsg::Lost {
            cause: cause.to_string(),
            expected_back_ms,
        };
        let err = ConnectionActor
            .handle(myself, lost, &mut state)
            .await
            .expect_err("a lost connection fails the incarnation");
        (status, config, lost_at, Failure::classify(&err))
    }

    /// The gateway announces a restart (`shutdown {restart, expected_back_ms: 2000}`) and
    /// stays away longer than it said. The node does not wait for the hint: for twice the
    /// hint (4 s) every attempt is retried within 60 ms (100 ms × (0.2 + 0.8 × 0.5)), so it
    /// is back a few dozen ms after the gateway listens; then, for `reconnect_window`
    /// (10 s) plus the hint after the loss, within `reconnect_within` (500 ms); the first
    /// failure after that waits out the grown backoff.
    #[tokio::test(start_paused = true)]
    async fn after_a_restart_notice_retries_fast_through_the_hint_then_within_the_window() {
        let jitter = Jitter::fixed(UNIT);
        let mut history = History::default();
        let cause = "gateway closed the connection (1012): service restart";
        let (status, config, lost_at, failure) = lost_after_a_minute(cause, Some(2000)).await;
        assert_eq!(failure.class, FailureClass::Transient);
        assert_eq!(failure.retry_within, Some(Duration::from_millis(60)));
        assert_eq!(failure.retry_after, None, "the hint is not waited for");
        assert!(!status.connected());
        let mut delay = next_delay(&failure, Duration::from_secs(60), &mut history);

        // The gateway is not back: every attempt is refused.
        let mut attempts = Vec::new();
        let mut within = Vec::new();
        loop {
            tokio::time::advance(delay).await;
            attempts.push(Instant::now() - lost_at);
            let failure = classify(&refused(), &config, &status, &jitter);
            status.down(&failure.reason, None);
            within.push(failure.retry_within);
            delay = next_delay(&failure, Duration::ZERO, &mut history);
            if failure.retry_within.is_none() {
                break;
            }
        }
        let ms = |ms: u64| Duration::from_millis(ms);
        // Every 54 ms (60 ms less the backoff's jitter) while 2 × the hint (4 s) lasts…
        let mut expected: Vec<Duration> = (1..=74).map(|k| ms(54 * k)).collect();
        // …then every 450 ms while the window (until 12 s) lasts…
        expected.extend((0..=17).map(|k| ms(4050 + 450 * k)));
        // …and 12.15 s: the window is over.
        expected.push(ms(12_150));
        assert_eq!(attempts, expected);
        assert!(
            within[..74].iter().all(|w| *w == Some(ms(60))),
            "{within:?}"
        );
        assert!(
            within[74..92].iter().all(|w| *w == Some(ms(500))),
            "{within:?}"
        );
        assert_eq!(within[92], None);
        assert_eq!(
            delay,
            Duration::from_secs(27),
            "the 94th failure in a row: 30 s, jittered"
        );
        assert_eq!(status.to_json()["consecutive_failures"], 94);
    }

    /// Without a restart notice the window is `reconnect_window` alone, and the first
    /// attempt does not wait for a hint. A 503 inside the window is retried at a random
    /// point of the fast interval instead of after its `Retry-After`; outside it, after
    /// its `Retry-After`.
    #[tokio::test(start_paused = true)]
    async fn a_lost_connection_without_notice_retries_within_reconnect_window_alone() {
        let jitter = Jitter::fixed(UNIT);
        let mut history = History::default();
        let (status, config, lost_at, failure) =
            lost_after_a_minute("connection reset by peer", None).await;
        assert_eq!(failure.retry_after, None);
        assert_eq!(
            next_delay(&failure, Duration::from_secs(60), &mut history),
            Duration::from_millis(450),
            "the first backoff step, 500 ms jittered"
        );

        let busy = ConnectError::Busy {
            retry_after_ms: Some(1000),
        };
        tokio::time::advance(Duration::from_millis(9999)).await;
        let inside = classify(&busy, &config, &status, &jitter);
        assert_eq!(
            (inside.retry_within, inside.retry_after),
            (Some(Duration::from_millis(300)), None),
            "500 ms × (0.2 + 0.8 × 0.5)"
        );
        assert_eq!(
            classify(&refused(), &config, &status, &jitter).retry_within,
            Some(Duration::from_millis(500))
        );

        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(Instant::now() - lost_at, Duration::from_secs(10));
        let outside = classify(&busy, &config, &status, &jitter);
        assert_eq!(
            (outside.retry_within, outside.retry_after),
            (None, Some(Duration::from_secs(1)))
        );
        assert_eq!(
            classify(&refused(), &config, &status, &jitter).retry_within,
            None
        );
    }
}
