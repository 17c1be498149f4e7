//! The node host's connection to the gateway: connects, handshakes as role `node`,
//! answers `node.invoke`, and fails when the connection is lost.
//!
//! ## Messages
//! `Beat` — a frame arrived (the pump saw it); `Lost` — the connection ended, with the cause
//! and the gateway's `expected_back_ms` if it announced a restart.
//!
//! ## Supervision
//! `root/connection` in node mode (`warden node`), a permanent child of the root. It owns a
//! pump task (aborted with its state) that holds the [`GatewayClient`], reads frames, runs
//! commands concurrently and answers them.
//!
//! ## Restart policy
//! Kind `node_connection`: the supervisor's restart *is* the reconnect — there is no retry
//! loop here. Any loss of the connection is a transient failure (500 ms → 30 s, ×2, jitter,
//! unlimited, reset after 30 s connected; the kernel logs a WARN per attempt with its
//! number, delay and cause). After a `shutdown {restart, expected_back_ms}` notice the first
//! attempt waits for that hint (jittered). For a while after losing an established
//! connection — `reconnect_window` plus the hint — failures ask the supervisor to retry
//! within `reconnect_within`, so a gateway that restarts is found again within about that
//! long rather than after a grown backoff. A rejected token (`unauthorized` or close 1008)
//! is fatal: no reconnect can fix it, and `on_fatal` (default `exit`, code 78) applies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

use super::commands::{self, CommandError, CommandSpec};
use crate::gateway::client::{ConnectError, ConnectOptions, GatewayClient, Incoming};
use crate::gateway::protocol::{
    ClientInfo, CommandInfo, ErrorBody, NodeInfo, NodeInvokeParams, Role, close, code,
};
use crate::supervision::{ChildContext, ChildSpec, Failure, Jitter, Policy, Probe, Restart};

/// The kind of the connection child, for policies and metrics.
pub const KIND: &str = "node_connection";

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
}

/// The connection child's spec.
pub fn spec(config: ConnectionConfig, status: Arc<NodeStatus>, policy: Policy) -> ChildSpec {
    ChildSpec::new(
        "connection",
        KIND,
        Restart::Permanent,
        move |ctx: ChildContext| {
            let args = ConnectionArgs {
                config: config.clone(),
                status: status.clone(),
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
    probe: Probe,
    jitter: Jitter,
    span: tracing::Span,
}

/// A connected node.
pub struct ConnectionState {
    args: ConnectionArgs,
    pump: Option<JoinHandle<()>>,
}

impl Drop for ConnectionState {
    fn drop(&mut self) {
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
    }
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
                    .keys()
                    .map(|name| CommandInfo::plain(name.clone()))
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
        let pump = pump(client, myself, config.commands.clone());
        state.pump = Some(tokio::spawn(pump.instrument(args.span.clone())));
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
                    // Wait for the announced restart, spread over a fifth of it more.
                    failure = failure.retry_after(hint.mul_f64(1.0 + 0.2 * args.jitter.unit()));
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

/// Reads frames, runs invocations concurrently, answers them; reports the end of the
/// connection to the actor.
async fn pump(
    mut client: GatewayClient,
    actor: ActorRef<ConnectionMsg>,
    commands: Arc<BTreeMap<String, CommandSpec>>,
) {
    let mut running: JoinSet<(String, Result<Value, ErrorBody>)> = JoinSet::new();
    let cause = loop {
        tokio::select! {
            incoming = client.next_event() => match incoming {
                Ok(Incoming::Event { .. }) => {
                    let _ = actor.send_message(ConnectionMsg::Beat);
                }
                Ok(Incoming::Request { id, method, params }) => {
                    let _ = actor.send_message(ConnectionMsg::Beat);
                    if method != "node.invoke" {
                        let err = ErrorBody { code: code::UNKNOWN_METHOD.to_string(), message: format!("a node does not answer {method}") };
                        if let Err(e) = client.respond(&id, Err(err)).await {
                            break e.to_string();
                        }
                        continue;
                    }
                    let commands = commands.clone();
                    running.spawn(async move { (id, invoke(&commands, params).await) });
                }
                Err(e) => break e.to_string(),
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((id, result)) = done else { continue };
                if let Err(e) = client.respond(&id, result).await {
                    break e.to_string();
                }
            }
        }
    };
    warn!(cause = %cause, "Lost the connection to the gateway.");
    let expected_back_ms = client.expected_back_ms();
    let _ = actor.send_message(ConnectionMsg::Lost {
        cause,
        expected_back_ms,
    });
}

/// Runs one `node.invoke`.
async fn invoke(
    commands: &BTreeMap<String, CommandSpec>,
    params: Value,
) -> Result<Value, ErrorBody> {
    let fail = |code: &str, message: String| ErrorBody {
        code: code.to_string(),
        message,
    };
    let params: NodeInvokeParams = serde_json::from_value(params)
        .map_err(|e| fail(code::BAD_REQUEST, format!("bad node.invoke params: {e}")))?;
    let spec = commands.get(&params.command).ok_or_else(|| {
        fail(
            "unknown_command",
            format!("this node has no command {:?}", params.command),
        )
    })?;
    let args: Vec<String> = match params.args {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(fail(
                    code::BAD_REQUEST,
                    format!("arguments must be strings, got {other}"),
                )),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(fail(
                code::BAD_REQUEST,
                format!("args must be a list of strings, got {other}"),
            ));
        }
    };
    match commands::run(spec, &args).await {
        Ok(out) => Ok(json!({
            "exit_code": out.exit_code,
            "stdout": out.stdout,
            "stderr": out.stderr,
            "truncated": out.truncated,
            "duration_ms": out.duration_ms,
        })),
        Err(e @ CommandError::Timeout(_)) => Err(fail("timeout", e.to_string())),
        Err(e @ CommandError::ArgsNotAllowed) => Err(fail(code::BAD_REQUEST, e.to_string())),
        Err(e) => Err(fail(code::INTERNAL, e.to_string())),
    }
}
