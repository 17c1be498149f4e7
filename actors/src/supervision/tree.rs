//! A running supervision tree: start it, read it, act on it, shut it down.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorRef, RactorErr, SpawnErr};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::backoff::Jitter;
use super::child::ChildSpec;
use super::exit::ExitHandle;
use super::snapshot::{NodeSnapshot, NodeState, RestartKind};
use super::supervisor::{
    ControlAction, Strategy, Supervisor, SupervisorArgs, SupervisorError, SupervisorMsg,
};
use super::view::{self, Inner};

/// The name of the root node; every path starts with it.
pub const ROOT: &str = "root";

/// How long an operator action may take (a stop waits for the child's shutdown timeout).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of a tree.
#[derive(Debug, Clone)]
pub struct TreeOptions {
    /// The root's strategy.
    pub strategy: Strategy,
    /// The tree's randomness; inject a fixed one in tests.
    pub jitter: Jitter,
    /// Where children ask for a process exit.
    pub exit: ExitHandle,
}

impl Default for TreeOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::OneForOne,
            jitter: Jitter::random(),
            exit: ExitHandle::new(),
        }
    }
}

/// A running tree, owned by the program.
pub struct Tree {
    handle: TreeHandle,
    exit: ExitHandle,
}

/// A cheap, cloneable view of a running tree: snapshots and operator actions.
#[derive(Clone)]
pub struct TreeHandle {
    root: ActorRef<SupervisorMsg>,
    inner: watch::Receiver<Inner>,
    strategy: Strategy,
    started: (Instant, SystemTime),
}

/// What a shutdown achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Everything stopped within the deadline.
    pub graceful: bool,
    /// Paths that were still up at the deadline (then killed).
    pub still_running: Vec<String>,
}

impl Tree {
    /// Starts the root supervisor; returns once every child has been spawned (each
    /// supervisor spawns its children in `pre_start`) and the tree is published.
    pub async fn start(children: Vec<ChildSpec>, options: TreeOptions) -> Result<Tree, SpawnErr> {
        let (tx, rx) = watch::channel(Inner::Leaf);
        let args = SupervisorArgs {
            path: ROOT.to_string(),
            strategy: options.strategy,
            children,
            exit: options.exit.clone(),
            jitter: options.jitter,
            inner: Arc::new(tx),
        };
        let (root, _join) = Actor::spawn(None, Supervisor, args).await?;
        let handle = TreeHandle {
            root,
            inner: rx,
            strategy: options.strategy,
            started: (Instant::now(), SystemTime::now()),
        };
        Ok(Tree {
            handle,
            exit: options.exit,
        })
    }

    /// The handle for readers and operators.
    pub fn handle(&self) -> TreeHandle {
        self.handle.clone()
    }

    /// Where exit requests arrive.
    pub fn exit(&self) -> &ExitHandle {
        &self.exit
    }

    /// Resolves when the root has stopped (after a shutdown, or if the root itself failed).
    pub async fn stopped(&self) {
        let _ = self.handle.root.get_cell().wait(None).await;
    }

    /// Stops the whole tree in reverse start order within `deadline`, then kills what is
    /// left. Reports what was still up if the deadline passed.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let root = self.handle.root.get_cell();
        info!(
            deadline_ms = deadline.as_millis() as u64,
            "Shutting down the tree."
        );
        match root
            .stop_and_wait(Some("shutdown".to_string()), Some(deadline))
            .await
        {
            Ok(()) | Err(RactorErr::Messaging(_)) => ShutdownReport {
                graceful: true,
                still_running: Vec::new(),
            },
            Err(_) => {
                let still_running: Vec<String> = self
                    .handle
                    .snapshot()
                    .walk()
                    .into_iter()
                    .filter(|n| {
                        matches!(
                            n.state,
                            NodeState::Running | NodeState::Starting | NodeState::Stopping
                        )
                    })
                    .filter(|n| n.children.is_empty())
                    .map(|n| n.path.to_string())
                    .collect();
                warn!(still_running = ?still_running, "Shutdown deadline passed; killing what is left.");
                let _ = root.kill_and_wait(Some(Duration::from_secs(2))).await;
                ShutdownReport {
                    graceful: false,
                    still_running,
                }
            }
        }
    }
}

impl TreeHandle {
    /// The whole tree as it is now, read without messaging any actor.
    pub fn snapshot(&self) -> NodeSnapshot {
        let now = Instant::now();
        let (strategy, children, pools) = view::read_inner(&self.inner, now);
        let alive = matches!(
            self.root.get_status(),
            ractor::ActorStatus::Starting | ractor::ActorStatus::Running
        );
        NodeSnapshot {
            path: ROOT.into(),
            id: ROOT.into(),
            kind: super::supervisor::KIND.into(),
            state: if alive {
                NodeState::Running
            } else {
                NodeState::Stopped
            },
            restart: RestartKind::Permanent,
            strategy: strategy.or_else(|| Some(self.strategy.as_str().to_string())),
            generation: 1,
            restarts_total: 0,
            restarts_in_window: 0,
            consecutive_failures: 0,
            warning: None,
            last_failure: None,
            next_restart_in_ms: None,
            started_at: alive.then(|| view::rfc3339(self.started.1).into()),
            uptime_ms: alive
                .then(|| now.saturating_duration_since(self.started.0).as_millis() as u64),
            ready: alive,
            pools,
            children,
        }
    }

    /// Whether the root supervisor runs; cheap (no snapshot).
    pub fn is_running(&self) -> bool {
        matches!(
            self.root.get_status(),
            ractor::ActorStatus::Starting | ractor::ActorStatus::Running
        )
    }

    /// The root actor's cell.
    pub fn root_cell(&self) -> ActorCell {
        self.root.get_cell()
    }

    /// The supervisor at `path` (`root` or a supervisor below it), for dynamic children.
    pub fn supervisor(&self, path: &str) -> Option<SupervisorRef> {
        let segments = split(path)?;
        let mut inner = self.inner.clone();
        for segment in segments {
            inner = view::child_inner(&inner, segment)?;
        }
        view::control_of(&inner).map(SupervisorRef)
    }

    /// Applies an operator action to the node at `path`.
    pub async fn control(&self, path: &str, action: ControlAction) -> Result<(), SupervisorError> {
        let unknown = || SupervisorError::UnknownChild(path.to_string());
        let segments = split(path).ok_or_else(unknown)?;
        let Some((id, parents)) = segments.split_last() else {
            return Err(SupervisorError::Conflict {
                path: path.to_string(),
                reason: "the root cannot be controlled; stop the process instead".to_string(),
            });
        };
        let mut inner = self.inner.clone();
        for segment in parents {
            inner = view::child_inner(&inner, segment).ok_or_else(unknown)?;
        }
        let parent = view::control_of(&inner).ok_or_else(unknown)?;
        let id = id.to_string();
        call(&parent, move |reply| SupervisorMsg::Control {
            id,
            action,
            reply,
        })
        .await
    }
}

/// A handle on one supervisor, for adding and removing dynamic children.
#[derive(Clone)]
pub struct SupervisorRef(ActorRef<SupervisorMsg>);

impl SupervisorRef {
    /// Adds `spec` and starts it; returns the started actor's cell.
    pub async fn add(&self, spec: ChildSpec) -> Result<ActorCell, SupervisorError> {
        call(&self.0, move |reply| SupervisorMsg::Add { spec, reply }).await
    }

    /// Stops child `id` gracefully and forgets it.
    pub async fn remove(&self, id: &str) -> Result<(), SupervisorError> {
        let id = id.to_string();
        call(&self.0, move |reply| SupervisorMsg::Remove { id, reply }).await
    }
}

/// `root/a/b` → `[a, b]`; `None` unless it starts at the root.
fn split(path: &str) -> Option<Vec<&str>> {
    let path = path.trim_matches('/');
    let mut segments = path.split('/');
    if segments.next()? != ROOT {
        return None;
    }
    let rest: Vec<&str> = segments.collect();
    if rest.iter().any(|s| s.is_empty()) {
        return None;
    }
    Some(rest)
}

async fn call<T: Send + 'static>(
    actor: &ActorRef<SupervisorMsg>,
    build: impl FnOnce(ractor::RpcReplyPort<Result<T, SupervisorError>>) -> SupervisorMsg,
) -> Result<T, SupervisorError> {
    match actor.call(build, Some(CONTROL_TIMEOUT)).await {
        Ok(CallResult::Success(result)) => result,
        Ok(CallResult::Timeout) => Err(SupervisorError::Timeout(CONTROL_TIMEOUT.as_secs())),
        _ => Err(SupervisorError::ShuttingDown),
    }
}
