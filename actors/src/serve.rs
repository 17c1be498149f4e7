//! An HTTP server as a supervised actor: binds, serves an axum router, fails if serving ends.
//!
//! ## Messages
//! `Tick` — periodic: the caller's upkeep hook, a heartbeat, and a check that the server
//! task still runs. `Ended` — the server task finished without being asked to (normally,
//! with an error, or by a panic: a drop guard reports it while unwinding).
//!
//! ## Supervision
//! A leaf; the gateway listener and the admin endpoint are both one. The server task is
//! owned by the actor's state: `post_stop` stops accepting at once (freeing the port) and
//! gives in-flight requests [`DRAIN`] before aborting them; a kill drops the state, which
//! aborts the task, so an old incarnation never keeps the port.
//!
//! ## Restart policy
//! A bind failure fails the start as transient (the address may be freed later; the
//! child's budget and `on_exhausted` decide how long to keep trying). The server ending on
//! its own is a transient failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{Instrument, info, warn};

use crate::supervision::{ChildContext, Failure, Probe};

/// How long `post_stop` lets in-flight requests finish before aborting them.
pub const DRAIN: Duration = Duration::from_secs(2);

/// How often the actor ticks (upkeep hook, heartbeat, server check).
pub const TICK: Duration = Duration::from_secs(5);

/// Something to run on every tick (e.g. metrics upkeep).
pub type TickHook = Arc<dyn Fn() + Send + Sync>;

/// What a server actor needs.
#[derive(Clone)]
pub struct ServeArgs {
    /// What it serves, for logs (`gateway`, `admin`).
    pub name: &'static str,
    /// Where to bind (port 0 picks a free port).
    pub bind: SocketAddr,
    /// The routes.
    pub router: Router,
    /// Receives the bound address on each start, and `None` when that incarnation stops.
    pub bound: Arc<watch::Sender<Option<SocketAddr>>>,
    /// Run on every tick.
    pub on_tick: Option<TickHook>,
}

/// Messages of [`ServeActor`].
#[derive(Debug)]
pub enum ServeMsg {
    /// Periodic upkeep, heartbeat and server check.
    Tick,
    /// The server task ended on its own.
    Ended(String),
}

/// The server actor.
pub struct ServeActor;

/// One incarnation's arguments.
pub struct ServeStart {
    args: ServeArgs,
    path: String,
    probe: Probe,
    span: tracing::Span,
}

/// A running server: its task and how to stop it.
pub struct ServeState {
    name: &'static str,
    path: String,
    addr: SocketAddr,
    probe: Probe,
    on_tick: Option<TickHook>,
    bound: Arc<watch::Sender<Option<SocketAddr>>>,
    /// Asks the server to stop accepting and drain; taken when used.
    drain: Option<oneshot::Sender<()>>,
    /// The server task; taken when joined in `post_stop`, aborted on drop (a kill).
    task: Option<tokio::task::JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

impl ServeActor {
    /// Spawns a server linked to the context's supervisor (for use in a start function).
    pub async fn start(ctx: ChildContext, args: ServeArgs) -> Result<ActorCell, SpawnErr> {
        let start = ServeStart {
            args,
            path: ctx.path.clone(),
            probe: ctx.probe.clone(),
            span: ctx.span(),
        };
        let (actor, _) =
            Actor::spawn_linked(None, ServeActor, start, ctx.supervisor.clone()).await?;
        Ok(actor.get_cell())
    }
}

/// Tells the actor when the server task ends, in every way but an abort by the actor itself
/// (which then no longer listens): normally, with an error, or by a panic.
struct EndReport {
    actor: ActorRef<ServeMsg>,
    reason: Option<String>,
}

impl Drop for EndReport {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or_else(|| {
            if std::thread::panicking() {
                "the server task panicked"
            } else {
                "the server task was cancelled"
            }
            .to_string()
        });
        let _ = self.actor.send_message(ServeMsg::Ended(reason));
    }
}

impl Actor for ServeActor {
    type Msg = ServeMsg;
    type State = ServeState;
    type Arguments = ServeStart;

    async fn pre_start(
        &self,
        myself: ActorRef<ServeMsg>,
        start: ServeStart,
    ) -> Result<ServeState, ActorProcessingErr> {
        let ServeStart {
            args,
            path,
            probe,
            span,
        } = start;
        let name = args.name;
        // `?` boxes a `Failure` once, so the supervisor reads its class back.
        let listener = TcpListener::bind(args.bind).await.map_err(|e| {
            Failure::transient(format!(
                "cannot bind the {name} endpoint on {}: {e}",
                args.bind
            ))
        })?;
        let addr = listener.local_addr().map_err(|e| {
            Failure::transient(format!("cannot read the {name} endpoint's address: {e}"))
        })?;
        let (drain, drained) = oneshot::channel::<()>();
        let report = EndReport {
            actor: myself.clone(),
            reason: None,
        };
        let router = args.router;
        let task = tokio::spawn(
            async move {
                let mut report = report;
                let served = axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    // A dropped sender (the actor is gone) also means stop.
                    let _ = drained.await;
                })
                .await;
                report.reason = Some(match served {
                    Ok(()) => format!("the {name} server stopped serving"),
                    Err(e) => format!("the {name} server failed: {e}"),
                });
            }
            .instrument(span.clone()),
        );
        let ticker = myself.send_interval(TICK, || ServeMsg::Tick);
        span.in_scope(|| info!(addr = %addr, "{} endpoint listening.", capitalise(name)));
        args.bound.send_replace(Some(addr));
        Ok(ServeState {
            name,
            path,
            addr,
            probe,
            on_tick: args.on_tick,
            bound: args.bound,
            drain: Some(drain),
            task: Some(task),
            ticker,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ServeMsg>,
        msg: ServeMsg,
        state: &mut ServeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServeMsg::Tick => {
                if state.task.as_ref().is_some_and(|t| t.is_finished()) {
                    return Err(Box::new(Failure::transient(format!(
                        "the {} server task ended",
                        state.name
                    ))));
                }
                if let Some(hook) = &state.on_tick {
                    hook();
                }
                state.probe.beat();
                Ok(())
            }
            ServeMsg::Ended(reason) => {
                warn!(actor = %state.path, addr = %state.addr, reason = %reason, "Server stopped serving.");
                Err(Box::new(Failure::transient(reason)))
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ServeMsg>,
        state: &mut ServeState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        if let Some(drain) = state.drain.take() {
            let _ = drain.send(());
        }
        if let Some(mut task) = state.task.take()
            && tokio::time::timeout(DRAIN, &mut task).await.is_err()
        {
            let timeout_ms = DRAIN.as_millis() as u64;
            warn!(actor = %state.path, timeout_ms, "Requests did not finish in time; aborting them.");
            task.abort();
            let _ = task.await;
        }
        state.unpublish();
        info!(actor = %state.path, addr = %state.addr, "{} endpoint stopped.", capitalise(state.name));
        Ok(())
    }
}

impl ServeState {
    /// Stops publishing our address, unless a later incarnation already published its own.
    fn unpublish(&self) {
        let mine = Some(self.addr);
        self.bound.send_if_modified(|current| {
            let ours = *current == mine;
            if ours {
                *current = None;
            }
            ours
        });
    }
}

impl Drop for ServeState {
    /// A killed actor skips `post_stop`; its dropped state must not leave the server running.
    fn drop(&mut self) {
        self.ticker.abort();
        if let Some(task) = &self.task {
            task.abort();
        }
        self.unpublish();
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervision::{ChildSpec, Jitter, NodeState, Policy, Restart, Tree, TreeOptions};

    /// A server task that dies (here: panics while holding its end report) fails the actor
    /// as transient; the supervisor restarts it on a new port binding.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_server_task_fails_the_actor() {
        let bound = Arc::new(watch::Sender::new(None));
        let mut policy = Policy::default();
        policy.backoff.initial = Duration::from_millis(10);
        let b = bound.clone();
        let spec = ChildSpec::new(
            "web",
            "test",
            Restart::Permanent,
            move |ctx: ChildContext| {
                let args = ServeArgs {
                    name: "test",
                    bind: ([127, 0, 0, 1], 0).into(),
                    router: Router::new(),
                    bound: b.clone(),
                    on_tick: None,
                };
                ServeActor::start(ctx, args)
            },
        )
        .with_policy(policy);
        let tree = Tree::start(
            vec![spec],
            TreeOptions {
                jitter: Jitter::fixed(0.0),
                ..TreeOptions::default()
            },
        )
        .await
        .expect("tree");
        assert!(bound.borrow().is_some(), "bound before the start returns");
        let cell = tree
            .handle()
            .root_cell()
            .get_children()
            .into_iter()
            .next()
            .expect("child");
        let actor: ActorRef<ServeMsg> = cell.into();
        let task = tokio::spawn(async move {
            let _report = EndReport {
                actor,
                reason: None,
            };
            panic!("the server task blew up (expected by this test)");
        });
        assert!(task.await.is_err());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let node = tree
                .handle()
                .snapshot()
                .find("root/web")
                .cloned()
                .expect("node");
            if node.state == NodeState::Running && node.generation == 2 {
                let f = node.last_failure.expect("failure");
                assert_eq!(
                    (f.class.as_str(), f.reason.as_str()),
                    ("transient", "the server task panicked")
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not restarted: {node:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            bound.borrow().is_some(),
            "the new incarnation published its address"
        );
    }
}
